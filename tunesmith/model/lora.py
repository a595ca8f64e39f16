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
    `target_modules="all-linear"` adapts every linear layer except the output head. Over a quantized base
    (`load.quantize`) peft puts its bitsandbytes LoRA layers, whose adapters stay in full precision.
    """
    import peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
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


def active_adapters(layer: torch.nn.Module) -> list[str]:
    """The adapters of a LoRA layer that its forward applies now."""
    held = {*layer.lora_A, *getattr(layer, "lora_embedding_A", {})}
    return [a for a in layer.active_adapters if a in held]


def _plain(layer: torch.nn.Module, active: list[str]) -> bool:
    """A LoRA linear whose adapters are `scale·B·A` alone (no DoRA or other variant, no bias of their own)."""
    from peft.tuners.lora import Linear as LoraLinear

    return type(layer) is LoraLinear and not any(a in layer.lora_variant or layer.lora_bias.get(a) for a in active)


@torch.no_grad()
def merged_weight(layer: torch.nn.Module, active: list[str]) -> torch.Tensor:
    """A new tensor: the layer's base weight with its `active` adapters folded in, the layer left as it was.

    A plain LoRA linear is `W + sum of scale·B·A` in one pass over W; any other LoRA layer (DoRA, embeddings,
    convolutions) is merged by peft's own code into a copy of W, which is then put back.
    """
    weight = layer.get_base_layer().weight
    if quantized_weight(layer.get_base_layer()):
        return _merged_quantized(layer, active)
    if _plain(layer, active):
        merged = weight.detach()
        for adapter in active:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if layer.fan_in_fan_out:  # weights stored (in, out), as GPT-2's Conv1D
                merged = torch.addmm(merged, a.t(), b.t(), alpha=layer.scaling[adapter])
            else:
                merged = torch.addmm(merged, b, a, alpha=layer.scaling[adapter])
        return merged
    original, merged_before = weight.data, list(layer.merged_adapters)
    try:
        weight.data = original.clone()
        layer.merge(adapter_names=active)
        return weight.data
    finally:
        weight.data = original
        layer.merged_adapters[:] = merged_before


def quantized_weight(module: torch.nn.Module) -> bool:
    """Whether `module` is a bitsandbytes linear whose own weight is stored in 4 or 8 bits (`load.quantize`).

    Its own: a LoRA layer over such a linear shows the base layer's weight as `.weight` too, but is not one.
    """
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    return type(weight).__name__ in ("Params4bit", "Int8Params")


@torch.no_grad()
def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A new `dtype` tensor: the weight of a bitsandbytes linear (`quantized_weight`) de-quantized."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).to(dtype)


@torch.no_grad()
def _merged_quantized(layer: torch.nn.Module, active: list[str]) -> torch.Tensor:
    """The de-quantized base weight with the adapters folded in, in the adapters' dtype (full precision).

    peft's own merge for these layers would quantize the sum again, rounding a young adapter's small change away;
    this one keeps it, and leaves the layer untouched.
    """
    dtype = next(iter(layer.lora_A[active[0]].parameters())).dtype if active else torch.float32
    merged = dequantized_weight(layer.get_base_layer(), dtype)
    for adapter in active:
        if adapter in layer.lora_variant:  # DoRA: peft's merge of the variant, on a copy
            merged = layer.lora_variant[adapter].merge_safe(layer, adapter, merged)
        else:
            merged = merged + layer.get_delta_weight(adapter).to(dtype)
    return merged


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names, each LoRA layer's active adapters merged into its
    weight (on the CPU, in the weight's dtype); the model itself is left exactly as it was.

    A quantized base (`load.quantize`) comes out de-quantized in the model's dtype (that of its unquantized
    weights), with bitsandbytes' bookkeeping entries (absmax, quant_map, SCB, ...) left out: a plain model.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    lora_layers: dict[str, torch.nn.Module] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            if any(module.lora_bias.values()):
                raise TunesmithError(f"cannot merge {name!r}: its LoRA adapter trains a bias; save only the adapter")
            lora_layers[name] = module
        elif isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            raise TunesmithError(f"cannot merge {name!r}: it is a {type(module).__name__}, and only LoRA adapters merge; "
                                 "save only the adapter (output.merge=false)")
    merged = {}
    for name, layer in lora_layers.items():
        # an already-merged layer holds its merged weight
        weight = layer.get_base_layer().weight if layer.merged else merged_weight(layer, active_adapters(layer))
        merged[f"{name}.weight"] = weight.detach().to("cpu")

    dtype = base.dtype  # the first floating-point weight's: quantized weights are integers
    quantized = {name: module for name, module in base.named_modules() if quantized_weight(module)}
    for name, module in quantized.items():
        owner = _owning_layer(f"{name}.weight", lora_layers)
        if owner is None:  # a quantized linear without an adapter
            merged[f"{name}.weight"] = dequantized_weight(module, dtype).to("cpu")
        elif merged[f"{owner}.weight"].dtype != dtype:
            merged[f"{owner}.weight"] = merged[f"{owner}.weight"].to(dtype)

    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        holder = _owning_layer(key, quantized)
        if holder is not None and key not in (f"{holder}.weight", f"{holder}.bias"):
            continue  # bitsandbytes' quantization state of that weight
        owner = _owning_layer(key, lora_layers)
        if owner is None:
            state_dict[key] = merged.get(key, tensor)
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base_layer."):  # lora_A / lora_B / magnitude entries are dropped
            clean = f"{owner}.{rest[len('base_layer.'):]}"
            state_dict[clean] = merged.get(clean, tensor)

    tied = getattr(base, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in merged or source in merged:
            raise TunesmithError(
                f"cannot merge: the adapter changes {target if target in merged else source!r}, which this model ties "
                f"to {source if target in merged else target!r}; leave embeddings and lm_head out of "
                "lora.target_modules (e.g. 'all-linear'), or save only the adapter (output.merge=false)"
            )
    return state_dict


def _owning_layer(key: str, layers: dict[str, object]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def mergeable_lora_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[str]]]:
    """The LoRA layers `merged_lora` can merge with their active adapters, or [] when any layer rules merging out."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    uses: dict[int, int] = {}  # how many modules hold each parameter: a tied weight must not be swapped
    for module in model.modules():
        for param in module.parameters(recurse=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not hasattr(module, "lora_A"):
            return []  # another tuner: it keeps its own forward
        active = active_adapters(module)
        weight = module.get_base_layer().weight
        if (not _plain(module, active)  # DoRA-free plain LoRA linears only
                or module.disable_adapters or module.merged or not active or weight.dtype != torch.float32
                or uses.get(id(weight), 0) > 1):  # e.g. an adapted lm_head tied to the input embeddings
            return []
        layers.append((module, active))
    return layers
