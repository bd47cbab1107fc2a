"""The embedded default backbone: a small open_clip CLIP, pretrained offline on synthetic captions.

Architecture lives in ``embedded_clip.json``; ``fedbench backbone pretrain`` trains it with the
CLIP contrastive loss on captions of a split of the embedded suite that no client ever sees (the
suite's pretraining corpus, handed to :func:`pretrain` by the command) and writes
``embedded_clip.safetensors`` beside it (committed, ~5 MB, so a default run needs no network and no
training). A word-level tokenizer whose vocabulary is stored in the checkpoint keeps the embedding
table (and the file) small.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fedbench.api.backbone import OPENAI_MEAN, OPENAI_STD, Backbone, BackboneUnavailable, normalize_images
from fedbench.api.registry import register_backbone
from fedbench.utils.integrity import IntegrityError, read_checked, sha256_file

if TYPE_CHECKING:
    import open_clip

HERE = Path(__file__).parent
CONFIG_PATH = HERE / "embedded_clip.json"
WEIGHTS_PATH = HERE / "embedded_clip.safetensors"
_WORD = re.compile(r"[a-z]+|[0-9]+")


class WordTokenizer:
    """Lower-cased words -> ids; unknown words fall back to characters. EOT has the largest id.

    open_clip's text tower pools at the position of the largest token id (``pool_type=argmax``),
    so end-of-text must be the last id of the vocabulary.
    """

    SPECIALS = ("<pad>", "<unk>", "<sot>")
    CHARS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")

    def __init__(self, words: Sequence[str], context_length: int) -> None:
        self.vocab = [*self.SPECIALS, *self.CHARS, *sorted(set(words) - set(self.CHARS)), "<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def build(cls, texts: Sequence[str], context_length: int) -> WordTokenizer:
        words = {w for t in texts for w in _WORD.findall(t.lower())}
        return cls(sorted(words), context_length)

    @property
    def eot(self) -> int:
        return len(self.vocab) - 1

    def ids(self, text: str) -> list[int]:
        out = []
        for word in _WORD.findall(text.lower()):
            if word in self.index:
                out.append(self.index[word])
            else:
                out.extend(self.index.get(c, 1) for c in word)
        return out

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        n = self.context_length
        batch = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [*[2, *self.ids(text)][: n - 1], self.eot]
            batch[i, : len(ids)] = torch.tensor(ids)
        return batch


def _load_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def build_clip(vocab_size: int, config: dict | None = None) -> open_clip.CLIP:
    cfg = (config or _load_config())["model"]
    import open_clip  # imported on use: `fedbench list` stays fast
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text_cfg = CLIPTextCfg(vocab_size=vocab_size, **cfg["text_cfg"])
    return open_clip.CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), text_cfg)


def _wrap(model: open_clip.CLIP, tokenizer: WordTokenizer, name: str, meta: dict | None = None) -> Backbone:
    model.visual.output_tokens = True
    cfg = _load_config()["model"]

    def encode_text(texts: Sequence[str]) -> torch.Tensor:
        device = model.positional_embedding.device
        return model.encode_text(tokenizer(texts).to(device))

    return Backbone(
        model,
        model.visual,
        model.visual,
        encode_text,
        image_size=cfg["vision_cfg"]["image_size"],
        token_dim=cfg["vision_cfg"]["width"],
        embed_dim=cfg["embed_dim"],
        name=name,
        meta=meta,
    )


def load_embedded(path: Path = WEIGHTS_PATH) -> tuple[open_clip.CLIP, WordTokenizer, dict]:
    """Load the committed weights; returns (model, tokenizer, metadata)."""
    if not path.is_file():
        raise BackboneUnavailable(f"embedded backbone weights '{path}' are missing: run `fedbench backbone pretrain`")
    check_weights(path)
    from safetensors import SafetensorError, safe_open

    try:  # a checkpoint without a recorded checksum is still refused in one line when unreadable
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        vocab = json.loads(meta["vocab"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"embedded backbone weights '{path}' cannot be read ({type(err).__name__})") from None
    config = _load_config()
    tokenizer = WordTokenizer(
        vocab[len(WordTokenizer.SPECIALS) + len(WordTokenizer.CHARS) : -1],
        config["model"]["text_cfg"]["context_length"],
    )
    if tokenizer.vocab != vocab:
        raise BackboneUnavailable(f"embedded backbone '{path}' has a vocabulary this tokenizer cannot rebuild")
    model = build_clip(len(vocab), config)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model, tokenizer, {k: json.loads(v) for k, v in meta.items()}


def checksum_path(path: Path) -> Path:
    """The sha256 of weights ``path``, recorded beside it when written (``sha256sum -c`` reads it)."""
    return path.with_name(path.name + ".sha256")


def check_weights(path: Path) -> None:
    """One line naming the file when the weights do not hash to their recorded sha256 (the committed
    weights must have one; another checkpoint is checked when it has one)."""
    recorded = checksum_path(path)
    if not recorded.is_file():
        if path.resolve() == WEIGHTS_PATH.resolve():
            raise IntegrityError(f"the checksum '{recorded}' of the embedded backbone weights is missing; restore it")
        return
    fix = "restore it (git checkout) or run `fedbench backbone pretrain`"
    read_checked(path, recorded.read_text().split()[0], "embedded backbone weights", fix)


@register_backbone("embedded")
def create_embedded(rest: str, spec: str) -> Backbone:
    """``embedded`` (the committed weights) or ``embedded:PATH`` (another checkpoint of the same config)."""
    model, tokenizer, meta = load_embedded(Path(rest) if rest else WEIGHTS_PATH)
    shown = ("zero_shot_acc", "chance", "steps", "synthetic")
    return _wrap(model, tokenizer, spec, {k: meta[k] for k in shown if k in meta})


def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer: WordTokenizer,
    images: torch.Tensor,
    labels: np.ndarray,
    prompts: Sequence[str],
) -> float:
    """Top-1 zero-shot classification accuracy: nearest prompt embedding to each image."""
    backbone = _wrap(model, tokenizer, "embedded")
    model.eval()
    model.visual.output_tokens = True
    with torch.no_grad():
        text = F.normalize(backbone.encode_text(list(prompts)), dim=-1)
        preds = []
        for i in range(0, len(images), 256):
            _, pooled = backbone.encode_image(images[i : i + 256])
            preds.append((F.normalize(pooled, dim=-1) @ text.T).argmax(-1))
    return float((torch.cat(preds).numpy() == labels).mean())


Corpus = Callable[[int, int], tuple[torch.Tensor, list[str], np.ndarray]]


def pretrain(
    corpus: Corpus,
    prompts_fn: Callable[[], list[str]],
    out: Path = WEIGHTS_PATH,
    steps: int | None = None,
    log: Callable[[str], object] = print,
) -> dict:
    """Contrastively pretrain the embedded CLIP on a held-out caption corpus; write safetensors.

    ``corpus(n, seed)`` gives ``n`` images, their captions and class labels, drawn from scenes no
    client ever sees; ``prompts_fn()`` the zero-shot prompts, one per class (the caller hands both:
    the embedded suite's, :func:`fedbench.tasks.scenes.pretrain_corpus`). Deterministic on CPU for a
    fixed config. Returns the metadata written into the file (zero-shot accuracy, chance, steps, seconds).
    """
    config = _load_config()
    pcfg = dict(config["pretrain"])
    pcfg["corpus"] = f"{corpus.__module__}:{corpus.__qualname__}"  # provenance, as the file has always said
    pcfg["prompts"] = f"{prompts_fn.__module__}:{prompts_fn.__qualname__}"
    steps = steps or pcfg["steps"]
    torch.manual_seed(pcfg["seed"])
    images, captions, _labels = corpus(pcfg["corpus_images"], pcfg["seed"])
    zs_images, _zs_captions, zs_labels = corpus(pcfg["zero_shot_images"], pcfg["seed"] + 1)
    prompts = prompts_fn()
    tokenizer = WordTokenizer.build([*captions, *prompts], config["model"]["text_cfg"]["context_length"])
    model = build_clip(len(tokenizer.vocab), config)
    model.visual.output_tokens = True
    tokens = tokenizer(captions)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    size = config["model"]["vision_cfg"]["image_size"]
    import open_clip

    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=pcfg["lr"], weight_decay=pcfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pcfg["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(pcfg["seed"])
    start = time.process_time()
    model.train()
    for step in range(steps):
        idx = torch.randint(len(images), (pcfg["batch_size"],), generator=gen)
        img = model.visual(normalize_images(images[idx], size, mean, std))[0]
        txt = model.encode_text(tokens[idx])
        loss = loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps}  clip loss {loss.item():.3f}")
    seconds = time.process_time() - start
    acc = zero_shot_accuracy(model, tokenizer, zs_images, zs_labels, prompts)
    meta = {
        "vocab": tokenizer.vocab,
        "zero_shot_acc": round(acc, 4),
        "chance": round(1 / len(prompts), 4),
        "steps": steps,
        "cpu_process_s": round(seconds, 1),
        "pretrain": pcfg,
        "synthetic": True,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(out)
    checksum_path(out).write_text(f"{sha256_file(out)}  {out.name}\n")  # checked by every load
    return meta
