"""FSDP2 for `train.distributed: fsdp`: parameters, gradients and optimizer state sharded over the ranks.

`shard` applies `torch.distributed.fsdp.fully_shard` bottom-up: each decoder layer (the model's own
`_no_split_modules`), then any module whose parameters are of another dtype than the rest (a float32 reward or
value head on a bf16 model: FSDP reduce-scatters one dtype per group), then the objective as the root, so the
root's forward (the one the loop calls) gathers the embeddings, final norm and head. The maths is the loop's: FSDP
averages gradients over ranks as DDP does, and the loss is scaled the same way.

What FSDP asks of the loop: every rank runs the same number of forward passes (each pass all-gathers every
layer), so a rank with fewer passes in an update or an eval repeats one of its own with a zero weight
(`passes_to_match`); the gradient norm is reduced over the shards (`clip_grad_norm`); checkpoints are written with
Distributed Checkpoint (`tunesmith.core.checkpoint`); the trained weights are gathered whole into a plain copy of
the model on rank 0 for the outputs (`gather_into`). On CPU, glibc is told to return freed buffers to the system
(`return_freed_buffers`), or its heap keeps FSDP's short-lived per-layer buffers.
"""

from __future__ import annotations

import ctypes
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from tunesmith.core.distributed import DistInfo
from tunesmith.errors import TunesmithError


def is_sharded(module: nn.Module) -> bool:
    """True when `module` (or one inside it) was sharded by `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The decoder layers inside `module`: instances of the classes transformers names in `_no_split_modules`,
    innermost first."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:
        raise TunesmithError(
            f"train.distributed=fsdp: no decoder layer found in {type(module).__name__} (none of the model's "
            f"_no_split_modules {sorted(names)} is in it); FSDP shards per decoder layer. Use train.distributed=ddp "
            "for this model")
    return list(reversed(layers))


def shard(objective: nn.Module, info: DistInfo) -> None:
    """fully_shard each decoder layer, each module of an odd dtype, then `objective` itself (the root), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if info.device.type == "cpu":
        return_freed_buffers()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    layers = decoder_layers(objective)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    rest = [(m, p) for m in objective.modules() for p in m.parameters(recurse=False) if id(p) not in inside]
    sizes: Counter[torch.dtype] = Counter()
    for _, p in rest:
        sizes[p.dtype] += p.numel()
    if sizes:
        main = sizes.most_common(1)[0][0]
        odd = {id(m): m for m, p in rest if p.dtype != main}
        for module in odd.values():
            fully_shard(module, mesh=mesh)
    fully_shard(objective, mesh=mesh)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_buffers(threshold: int = 128 * 1024) -> bool:
    """On glibc, serve every allocation above `threshold` bytes from its own mapping, returned to the system when freed.

    FSDP gathers each layer's weights and reduces its gradients through buffers of a few MiB, freed a moment later.
    glibc raises its mmap threshold to the size of each such freed buffer (its default, dynamic behaviour), so the
    next ones come from the heap, which fragments and keeps their pages: on CPU that cost FSDP a third of its peak
    RSS per rank (bench/RESULTS.md). A fixed threshold is glibc's documented remedy (mallopt(3), also the
    environment variable MALLOC_MMAP_THRESHOLD_). Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor); the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded parameters to `max_norm`; returns the norm before clipping.

    The norm of each shard's gradients is reduced over the ranks, so it is the norm of the whole gradient.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def passes_to_match(num_passes: int, info: DistInfo) -> int:
    """How many passes every rank must run: the most any rank has (each pass gathers every layer on every rank)."""
    if not info.enabled:
        return num_passes
    most = torch.tensor([num_passes], dtype=torch.int64, device=info.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on at least one rank."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def nonfinite_shards(model: nn.Module, info: DistInfo) -> list[str]:
    """Names of trainable parameters holding a NaN or an infinity in this rank's shard (agreed: if any rank finds
    one, every rank returns a non-empty list)."""
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(local(p.detach())).all())]
    if any_rank(bool(bad), info) and not bad:
        return ["(on another rank)"]
    return bad


def gather_into(sharded: nn.Module, target: nn.Module | None) -> int:
    """Copy the trainable parameters of `sharded` (an FSDP model), gathered whole one at a time, into the parameters
    of the same names in `target` (a plain copy of the model, on rank 0; None on the other ranks, which take part in
    each gather). Returns the number of tensors copied."""
    from torch.distributed.tensor import DTensor

    params = dict(target.named_parameters()) if target is not None else {}
    copied = 0
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            if not p.requires_grad:
                continue
            whole = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if target is None:
                continue
            if name not in params or params[name].shape != whole.shape:
                raise TunesmithError(f"gathering the sharded model: {name} {tuple(whole.shape)} has no counterpart "
                                     "in the rebuilt model; this is a bug in tunesmith, please report it")
            params[name].copy_(whole)
            copied += 1
            del whole
    return copied

