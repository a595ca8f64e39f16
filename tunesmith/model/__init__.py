"""Models: resolve and load (local folder, hub id, .gguf, built-in default), LoRA, and saving outputs."""

from __future__ import annotations

from tunesmith.model.export import atomic_dir, save_adapter, save_full, save_merged
from tunesmith.model.loading import (
    ResolvedModel,
    cache_root,
    default_device,
    load_model,
    load_tokenizer,
    resolve_model,
)
from tunesmith.model.lora import apply_lora, count_parameters

__all__ = [
    "ResolvedModel",
    "apply_lora",
    "atomic_dir",
    "cache_root",
    "count_parameters",
    "default_device",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "save_adapter",
    "save_full",
    "save_merged",
]
