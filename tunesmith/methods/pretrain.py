"""Continued pretraining on plain domain text: every token counts, documents split into full blocks."""

from __future__ import annotations

from torch import nn

from tunesmith.config import Config
from tunesmith.core.next_token import CausalLMLoss
from tunesmith.data import TokenizedData, collate
from tunesmith.methods import build_lm_data, keep_model, nothing_to_prepare, save_lm_outputs

__all__ = ["GENERATES", "LABELS", "NAME", "build_data", "collate", "loss_module", "prepare", "save_outputs", "wrap_model"]

GENERATES = True
NAME = "pretrain"
LABELS = "all"  # every token carries a label


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Tokenize `source` text, split long documents into max_length blocks, and pack them."""
    return build_lm_data(cfg, tokenizer, source, LABELS)


def loss_module(model: nn.Module, cfg: Config, tokenizer=None) -> nn.Module:
    """Next-token cross-entropy over every token."""
    return CausalLMLoss(model)


save_outputs = save_lm_outputs
wrap_model = keep_model
prepare = nothing_to_prepare
