"""Next-token loss of a causal LM, from its hidden states, for `sft` and `pretrain`."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.ops.losses import IGNORE_INDEX, chunked_cross_entropy_sum, shift_targets


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and PEFT wrappers (LoRA layers stay injected in it)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class _Head(nn.Module):
    """The output projection plus the logit transforms some architectures apply after it."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.proj = lm.get_output_embeddings()
        config = lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so one forward returns (sum of token losses, number of counted tokens).

    The whole loss lives inside `forward` so DDP sees every parameter use in one call.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        lm = unwrap(model)
        self._decoder = lm.get_decoder()
        self._head = _Head(lm)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of next-token cross-entropies over counted tokens, and their number."""
        out = self._decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        hidden = out.last_hidden_state  # (batch, seq, hidden)
        positions, targets = shift_targets(labels)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (counted, hidden)
        loss_sum = chunked_cross_entropy_sum(selected, targets, self._head, self.chunk_size)
        return loss_sum, torch.tensor(targets.numel(), device=hidden.device)


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens a batch's loss counts (each document's first label is already ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
