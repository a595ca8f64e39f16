"""The weights a model decodes with: CPU linears on oneDNN-packed weights, LoRA folded in.

Decoding a token at a time runs every linear layer on a handful of rows. On CPU, MKL's GEMM for such
small batches re-packs the weight at every call; oneDNN with the weight packed once (the kernel
PyTorch's own CPU compiler uses for frozen weights) runs a 135M model's linears 20-45 % faster at 4-16
rows, and a whole rollout about a third faster. The packed copies are made at the start of a
generation (a LoRA adapter merged into them on the way, so each layer is one matmul) and dropped at
its end: one extra copy of the linear weights in memory while generating (0.5 GB for SmolLM2-135M),
about 0.4 s to make, and the model's parameters are never touched. A quantized base (`load.quantize`) is
de-quantized into those copies: bitsandbytes would otherwise de-quantize every weight again at every
token (greedy decoding of SmolLM2-135M in nf4 on one CPU thread: 28 tokens/s that way, 39-47 with the
copies, 46-50 for the float32 model). Elsewhere (CUDA, bf16, a PyTorch without the
kernel), LoRA is merged into plain weights when it can be (`merged_lora`), else nothing changes.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.model.lora import (
    base_layers_only,
    dequantized_weight,
    mergeable_lora_layers,
    merged_lora,
    merged_weight,
    quantized_weight,
)

_PACKED = "_tunesmith_packed_weight"


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, getattr(self, _PACKED), self.bias, "none", [None], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@functools.cache
def can_pack() -> bool:
    """Whether this PyTorch packs linear weights for oneDNN and gets F.linear's results from them (checked once)."""
    try:
        gen = torch.Generator().manual_seed(0)
        weight, bias, x = (torch.randn(*shape, generator=gen) for shape in ((24, 16), (24,), (3, 1, 16)))
        out = torch.ops.mkldnn._linear_pointwise(x, _pack(weight), bias, "none", [None], "")
        return bool(torch.allclose(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _packable(model: nn.Module, lora: list[tuple[nn.Module, list[str]]]) -> bool:
    """CPU float32 linears without hooks of their own, and every mergeable LoRA layer's base one of them."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    quantized = [m for m in model.modules() if quantized_weight(m)]
    return (
        bool(linears)
        and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears)
        and all(m.weight.device.type == "cpu" and getattr(m, "compute_dtype", torch.float32) in (None, torch.float32)
                and "forward" not in vars(m) for m in quantized)
        and not any("forward" in vars(m) for m in linears)  # e.g. accelerate's hooks: leave such models alone
        # a LoRA layer over anything else (GPT-2's Conv1D) must keep its own weight swap: merged_lora handles it
        and all(type(layer.get_base_layer()) is nn.Linear for layer, _ in lora)
        and can_pack()
    )


@contextmanager
def decoding_weights(model: nn.Module, *, merge_lora: bool = True) -> Iterator[str]:
    """Inside (and without gradients): the model's linears on their decoding weights; yields "packed", "merged" or "plain".

    With `merge_lora=False` (several adapters chosen per row) the LoRA layers keep computing their adapters, on
    top of packed base weights.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("decoding_weights is for generation: enter it under torch.no_grad()")
    lora = mergeable_lora_layers(model) if merge_lora else []
    if not _packable(model, lora):
        if not merge_lora:
            yield "plain"
            return
        with merged_lora(model) as merged:
            yield "merged" if merged else "plain"
        return
    merged_into = {id(layer.get_base_layer()): (layer, active) for layer, active in lora}
    unused = {id(m) for layer, active in lora for a in active for m in (layer.lora_A[a], layer.lora_B[a])}
    patched: list[nn.Linear] = []
    try:
        for module in model.modules():
            quantized = quantized_weight(module)
            if (type(module) is not nn.Linear and not quantized) or id(module) in unused:
                continue
            entry = merged_into.get(id(module))
            weight = merged_weight(*entry) if entry else dequantized_weight(module, torch.float32) if quantized else module.weight
            setattr(module, _PACKED, _pack(weight))
            module.forward = types.MethodType(_packed_forward, module)
            patched.append(module)
        with base_layers_only(lora):  # the LoRA layers run their packed, merged base layer alone
            yield "packed"
    finally:
        for module in patched:
            del module.forward
            delattr(module, _PACKED)
