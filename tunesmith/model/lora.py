"""LoRA adapters through peft, so they load anywhere (`PeftModel.from_pretrained`, vLLM)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from tunesmith.config import LoraConfig
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapter parameters stay trainable.

    LoRA B starts at zero, so the wrapped model computes exactly what the base model did until it is trained.
    `target_modules="all-linear"` adapts every linear layer except the output head.
    """
    import peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # peft probes a property transformers has deprecated; the warning says nothing to our users
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TunesmithError(
            f"lora.target_modules: {lora.target_modules!r} does not fit this model ({exc}); its linear layers are "
            f"named {', '.join(linear)}; list some of them, or use 'all-linear'"
        ) from exc
    return wrapped


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
