"""LoRA adapters through peft, so they load anywhere (`PeftModel.from_pretrained`, vLLM)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[bool]:
    """Inside: every plain float32 LoRA linear runs as one matmul with `W + scale·B·A`; outside, nothing changed.

    Decoding a token at a time is a stream of small matmuls; the adapter's two extra ones per layer cost
    about 15 % of a rollout on CPU. The merged weight is a new tensor swapped in for the frozen base
    weight, which is put back untouched on leaving (merging in place and unmerging would leave rounding
    in the base weight, and so in the reference). Yields whether anything was merged: nothing is when
    the model has no LoRA, adapters are off or already merged, a layer is not a plain linear (DoRA,
    embeddings, other tuners), or weights are not float32 (a bf16 weight would round a young adapter's
    small change away, and sampling would not follow the policy being trained).
    """
    layers = mergeable_lora_layers(model)
    if not layers:
        yield False
        return
    swapped = []
    try:
        for layer, active in layers:
            weight = layer.get_base_layer().weight
            swapped.append((weight, weight.data))
            weight.data = merged_weight(layer, active)
        with base_layers_only(layers):
            yield True
    finally:
        for weight, original in swapped:
            weight.data = original


@contextmanager
def base_layers_only(layers: list[tuple[torch.nn.Module, list[str]]]) -> Iterator[None]:
    """Inside: peft counts these layers' adapters as merged, so their forward runs the base layer alone."""
    before = [list(layer.merged_adapters) for layer, _ in layers]
    try:
        for layer, active in layers:
            layer.merged_adapters[:] = active
        yield
    finally:
        for (layer, _), merged in zip(layers, before):
            layer.merged_adapters[:] = merged


@torch.no_grad()
def merged_weight(layer: torch.nn.Module, active: list[str]) -> torch.Tensor:
    """A new tensor `W + sum of scale·B·A` over the active adapters of a plain LoRA linear (one pass over W)."""
    merged = layer.get_base_layer().weight.detach()
    for adapter in active:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if layer.fan_in_fan_out:  # weights stored (in, out), as GPT-2's Conv1D
            merged = torch.addmm(merged, a.t(), b.t(), alpha=layer.scaling[adapter])
        else:
            merged = torch.addmm(merged, b, a, alpha=layer.scaling[adapter])
    return merged


def mergeable_lora_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[str]]]:
    """The LoRA layers `merged_lora` can merge with their active adapters, or [] when any layer rules merging out."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    layers = []
    uses: dict[int, int] = {}  # how many modules hold each parameter: a tied weight must not be swapped
    for module in model.modules():
        for param in module.parameters(recurse=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not LoraLinear or not isinstance(module, LoraLayer):
            return []  # DoRA-free plain LoRA linears only; anything else keeps the adapter's own forward
        active = [a for a in module.active_adapters if a in module.lora_A]
        weight = module.get_base_layer().weight
        if (module.disable_adapters or module.merged or not active or weight.dtype != torch.float32
                or uses.get(id(weight), 0) > 1  # e.g. an adapted lm_head tied to the input embeddings
                or any(a in module.lora_variant or module.lora_bias.get(a) for a in active)):
            return []
        layers.append((module, active))
    return layers
