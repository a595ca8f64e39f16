"""The parts of a causal LM that training and decoding reach for, under any DDP or PEFT wrapper: the transformers
model, its decoder stack and output head, packed-row forward passes, and the reference model of the preference and
RL methods."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.attention import document_attention


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

    def linear_weight(self) -> torch.Tensor | None:
        """The weight when the head is just `hidden @ weight.T` (no bias, scale or softcap, not adapted), else None."""
        if type(self.proj) is nn.Linear and self.proj.bias is None and self.scale is None and not self.softcap:
            return self.proj.weight
        return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab)."""
        logits = self.proj(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the output head of a causal LM, under any wrapper."""
    lm = unwrap(model)
    return lm.get_decoder(), _Head(lm)


def packed_hidden(decoder: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (batch, seq, hidden) over packed rows: documents never attend to each
    other (positions restart), and attention runs per document, with no masked blocks."""
    with document_attention(position_ids) as layout:
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    if layout.has_branches and layout.calls == 0:
        raise TunesmithError(
            f"this model's attention ({getattr(getattr(decoder, 'config', None), '_attn_implementation', None)!r}) does not "
            "go through tunesmith's per-document SDPA, which rows of answers sharing one prompt need; load the "
            "model with SDPA attention, or set rl.share_prompts: false"
        )
    return out.last_hidden_state


def scalar_head(lm: nn.Module, *, bias: bool) -> nn.Linear:
    """A linear map from the LM's final hidden state to one number (a reward or a value), on the LM's device.

    float32 even when the LM is bf16: AdamW steps on a bf16 head would round small updates away.
    """
    ref = unwrap(lm).get_output_embeddings().weight
    hidden = unwrap(lm).config.get_text_config().hidden_size
    return nn.Linear(hidden, 1, bias=bias, device=ref.device, dtype=torch.float32)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the model's current weights: the reference of full fine-tuning (LoRA needs none)."""
    return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)


@contextmanager
def reference_model(policy: nn.Module, frozen: nn.Module | None) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(decoder, head) of the reference model of DPO, PPO and GRPO, for the duration of the block.

    A frozen copy when one was made (full fine-tuning); else the policy itself with its LoRA adapters
    disabled, so the reference costs no second copy in memory (or the policy as it is, when it has no
    adapters: full fine-tuning whose reference log-probs are measured before its first step).
    """
    if frozen is not None:
        yield decoder_and_head(frozen)
        return
    with policy.disable_adapter() if hasattr(policy, "disable_adapter") else nullcontext():
        yield decoder_and_head(policy)
