"""Supervised fine-tuning: prompt -> response pairs and chats; loss on assistant tokens only."""

from __future__ import annotations

from torch import nn

from tunesmith.config import Config
from tunesmith.core.next_token import CausalLMLoss
from tunesmith.data import TokenizedData, collate
from tunesmith.methods import build_lm_data, keep_model, nothing_to_prepare, save_lm_outputs

__all__ = ["GENERATES", "LABELS", "NAME", "build_data", "collate", "loss_module", "prepare", "save_outputs", "wrap_model"]

GENERATES = True
NAME = "sft"
LABELS = "assistant"  # the assistant's tokens carry labels, every assistant turn


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Read, render with the chat template, mask to assistant tokens, and pack `source`."""
    return build_lm_data(cfg, tokenizer, source, LABELS)


def loss_module(model: nn.Module, cfg: Config, tokenizer=None) -> nn.Module:
    """Next-token cross-entropy over the assistant tokens."""
    return CausalLMLoss(model)


save_outputs = save_lm_outputs
wrap_model = keep_model
prepare = nothing_to_prepare
