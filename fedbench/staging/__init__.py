"""What a seed stages once for every row: the example table, partition, rows on the device, the
frozen towers' feature and text caches, and the prompt views routers may read."""

from fedbench.utils.lazy import lazy_exports

_API = {
    "Prepared": "prepare",
    "prepare": "prepare",
    "RowStore": "row_store",
    "TextEncoder": "row_store",
    "TokenRowStore": "token_rows",
    "resolve_device": "prepare",
    "majority_scores": "prepare",
    "FeatureCache": "feature_cache",
    "cache_root": "feature_cache",
    "partition_summary": "partition",
    "PromptViews": "prompt_view",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
