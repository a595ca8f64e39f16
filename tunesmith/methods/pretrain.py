"""Continued pretraining on plain domain text: every token counts, documents split into full blocks."""

from __future__ import annotations

from torch import nn

from tunesmith.config import Config
from tunesmith.core.lm_loss import CausalLMLoss
from tunesmith.data import TokenizedData
from tunesmith.methods import build_lm_data

NAME = "pretrain"


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Tokenize `source` text, split long documents into max_length blocks, and pack them."""
    return build_lm_data(cfg, tokenizer, source, NAME)


def loss_module(model: nn.Module) -> nn.Module:
    """Next-token cross-entropy over every token."""
    return CausalLMLoss(model)
