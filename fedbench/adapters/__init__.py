"""Machinery several methods share: LoRA (and the LoRA rows' base), mixtures of adapters, and the
task-expert family of Pilot's CT-MoA and the multimodal router."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "LoRASpec": "lora",
    "LoRADelta": "lora",
    "inject_lora": "lora",
    "register_lora_injector": "lora",
    "LoRAMethod": "lora_method",
    "Adapter": "moa",
    "TaskExpertsMethod": "task_experts",
    "TaskExpertModel": "expert_models",
    "TaskExpertVLMModel": "expert_models",
    "TaskExpertOptions": "task_experts",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
