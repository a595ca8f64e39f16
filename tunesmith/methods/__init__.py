"""Training methods: each file holds what is its own (data, loss module); the loop is shared."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.data import TokenizedData


def get_method(name: str) -> ModuleType:
    """The module implementing method `name`."""
    from tunesmith.methods import pretrain, sft

    return {"sft": sft, "pretrain": pretrain}[name]


def build_lm_data(cfg: Config, tokenizer, source: str, method: str) -> TokenizedData:
    """Token rows for a next-token method (sft, pretrain) from the data and train sections of `cfg`."""
    from tunesmith.data import build_dataset

    return build_dataset(
        source,
        tokenizer,
        method=method,
        max_length=cfg.train.max_length,
        packing=cfg.train.packing,
        overflow=cfg.data.overflow,
        format=cfg.data.format,
        split=cfg.data.split,
    )
