"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place;
the rename is the commit. The manifest `checkpoint.json` records each file's size and SHA-256.
Under `train.distributed: fsdp` the weights and the optimizer go in
`dcp/`, written by every rank with Distributed Checkpoint (each rank its shards, by parameter name), so a run
resumes on any number of ranks: DCP reads the shards a rank needs whatever the split that wrote them. The manifest
lists the DCP files too and is written after all of them, so a half-written sharded checkpoint is damaged like any
other. A `step-N` folder without its manifest, or whose files do not match it (a flipped byte, a
truncated or deleted file), is damaged: it is reported with its path and the run resumes from
the newest good one before it, never silently from step 0. A write that fails for lack of space
removes the temporary folder and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.core.distributed import DistInfo, barrier
from tunesmith.errors import TunesmithError
from tunesmith.model.export import disk_full_error

MANIFEST = "checkpoint.json"
PREFIX = "step-"
SHARDED_DIR = "dcp"  # Distributed Checkpoint's files of a sharded checkpoint


@dataclass
class TrainerState:
    """Where the loop stands: the next step to run and what has been seen so far."""

    step: int = 0
    tokens_seen: int = 0
    method: dict[str, Any] = field(default_factory=dict)  # what a method carries between steps (e.g. a KL coefficient)
    nonfinite_steps: int = 0  # steps skipped so far for a non-finite loss or gradient norm


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name, as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every random generator the loop can touch."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_of(d: Path) -> int | None:
    suffix = d.name[len(PREFIX) :]
    return int(suffix) if d.name.startswith(PREFIX) and suffix.isdigit() else None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every committed checkpoint folder (`step-N`) under `root`, good or damaged, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and _step_of(d) is not None]
    return sorted(found, key=lambda d: _step_of(d) or 0)


_verified: dict[tuple, None] = {}  # checkpoints already found good in this process, by their files' sizes and times


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (no manifest, a missing or truncated file, a checksum that differs); None
    when every file matches its manifest."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing"
    try:
        record = json.loads(manifest.read_text())
        files, sums = record["files"], record.get("sha256", {})  # checkpoints of older versions have no checksums
    except (ValueError, KeyError, TypeError, OSError):
        return f"{MANIFEST} is unreadable"
    stamp = []
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != size:
            return f"{name} has {stat.st_size} bytes where the manifest says {size}: truncated or overwritten"
        stamp.append((name, stat.st_size, stat.st_mtime_ns))
    key = (str(ckpt.absolute()), tuple(stamp))
    if key in _verified:
        return None
    for name, expected in sums.items():
        if sha256_file(ckpt / name) != expected:
            return f"{name} does not match its checksum: its bytes changed after it was written"
    _verified[key] = None
    return None


def is_complete(ckpt: Path) -> bool:
    """True when the manifest exists and every file it lists is there with its recorded size and checksum."""
    return damage(ckpt) is None


def find_resumable(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest good checkpoint under `root` (None if there is none), and the newer damaged ones with why."""
    damaged: list[tuple[Path, str]] = []
    for d in reversed(checkpoint_dirs(root)):
        why = damage(d)
        if why is None:
            return d, damaged
        damaged.append((d, why))
    return None, damaged


def damaged_text(damaged: list[tuple[Path, str]]) -> str:
    """One line per damaged checkpoint: its path and what is wrong."""
    return "; ".join(f"{d} ({why})" for d, why in damaged)


def no_good_checkpoint(root: Path, damaged: list[tuple[Path, str]]) -> TunesmithError:
    """The error for a run folder whose every checkpoint is damaged: it says so, and how to start over."""
    return TunesmithError(
        f"{root}: no checkpoint is good, so there is nothing to resume from (the run does not start again from "
        f"step 0 on its own); to start over, delete the folder {root} (or choose a new output_dir) and run the same "
        "command. The damaged checkpoints:",
        problems=[f"{d}: {why}" for d, why in damaged],
    )


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to `damaged-step-N` (kept for a look, never resumed from); returns the new path."""
    target = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"damaged-{ckpt.name}-{n}")
    os.replace(ckpt, target)
    return target


def nonfinite_weights(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _fresh_folder(root: Path, tmp: Path, info: DistInfo) -> None:
    """Rank 0 makes an empty temporary checkpoint folder (a leftover of a killed save is removed); all ranks wait."""
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)


def _full_disk_advice(root: Path, final: Path) -> str:
    """What to do when the disk filled while writing `final`: resume from the checkpoint before it, if any."""
    previous = [d for d in checkpoint_dirs(root) if d != final]
    return (f"the previous checkpoint {previous[-1]} is intact: free some space, then run the same train command "
            "again to resume from it") if previous else "free some space and run the same command again"


def _commit(tmp: Path, final: Path, root: Path, keep: int) -> None:
    """Rename the written folder into place (the commit) and drop all but the newest `keep` checkpoints."""
    if final.exists():  # a stale one from a run that was killed after this step; ours is newer
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    info: DistInfo,
    keep: int,
    *,
    sharded: bool = False,
) -> Path:
    """Write checkpoint `step-N` atomically on every rank's behalf; keep the newest `keep`.

    `sharded`: weights and optimizer through Distributed Checkpoint, each rank writing its own shards (FSDP).
    Weights that are not finite are never saved; a full disk raises one `DiskFullError` and leaves the previous
    checkpoint as it was.
    """
    if sharded:
        return _save_sharded(root, model, optimizer, scheduler, state, info, keep)
    final = root / f"{PREFIX}{state.step:07d}"
    tmp = root / f".tmp-{PREFIX}{state.step:07d}"
    _fresh_folder(root, tmp, info)
    with open(tmp / f"rng-rank{info.rank}.pt", "wb") as fh:  # each rank draws its own dropout masks
        torch.save(rng_state(), fh)
    barrier(info)
    if info.is_main:
        weights = trainable_state(model)
        bad = nonfinite_weights(weights)
        if bad:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TunesmithError(f"step {state.step}: weights {', '.join(bad[:3])} hold NaN or infinite values; no "
                                 "checkpoint is written, and the previous one stays as it was")
        try:
            _write_files(tmp, weights, optimizer, scheduler, state, info)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            full = disk_full_error(exc, final, "checkpoint", _full_disk_advice(root, final))
            if full is not None:
                raise full from None
            raise
        _commit(tmp, final, root, keep)
    barrier(info)
    return final


def _write_files(tmp: Path, weights: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer | None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, info: DistInfo) -> None:
    """The files rank 0 writes (weights and optimizer unless they are sharded), then the manifest of everything."""
    if weights is not None:
        save_file(weights, str(tmp / "trainable.safetensors"))
    # through a Python file: a failed write then says why (torch's own writer reports only an iostream error)
    if optimizer is not None:
        with open(tmp / "optimizer.pt", "wb") as fh:
            torch.save(optimizer.state_dict(), fh)
    with open(tmp / "scheduler.pt", "wb") as fh:
        torch.save(scheduler.state_dict(), fh)
    (tmp / "trainer.json").write_text(json.dumps({"step": state.step, "tokens_seen": state.tokens_seen,
                                                  "method": state.method, "nonfinite_steps": state.nonfinite_steps}))
    files, sums = {}, {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        name = f.relative_to(tmp).as_posix()
        _fsync_file(f)
        files[name] = f.stat().st_size
        sums[name] = sha256_file(f)
    for d in [p for p in tmp.rglob("*") if p.is_dir()]:
        _fsync_dir(d)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"step": state.step, "world_size": info.world_size, "files": files, "sha256": sums,
                                    "sharded": weights is None}))
    _fsync_file(manifest)
    _fsync_dir(tmp)


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable weights and the optimizer state by parameter name, as this rank holds them (its shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optim": get_optimizer_state_dict(model, optimizer)}


def _save_sharded(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, info: DistInfo,
                  keep: int) -> Path:
    """`save_checkpoint` for sharded weights: every rank writes its shards with DCP into the temporary folder, then
    rank 0 writes the rest and the manifest and renames the folder into place."""
    import torch.distributed.checkpoint as dcp

    from tunesmith.core import fsdp

    final = root / f"{PREFIX}{state.step:07d}"
    tmp = root / f".tmp-{PREFIX}{state.step:07d}"
    bad = fsdp.nonfinite_shards(model, info)
    if bad:
        raise TunesmithError(f"step {state.step}: weights {', '.join(bad[:3])} hold NaN or infinite values; no "
                             "checkpoint is written, and the previous one stays as it was")
    _fresh_folder(root, tmp, info)
    advice = _full_disk_advice(root, final)
    try:
        with open(tmp / f"rng-rank{info.rank}.pt", "wb") as fh:  # each rank draws its own dropout masks
            torch.save(rng_state(), fh)
        with warnings.catch_warnings():  # one process writing all of a checkpoint is what DCP warns about, and meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDED_DIR), no_dist=not info.enabled)
        barrier(info)
        if info.is_main:
            _write_files(tmp, None, None, scheduler, state, info)
    except Exception as exc:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(exc, final, "checkpoint", advice)
        if full is not None:
            raise full from None
        raise
    if info.is_main:
        _commit(tmp, final, root, keep)
    barrier(info)
    return final


def world_size_of(ckpt: Path) -> int | None:
    """How many ranks wrote checkpoint `ckpt` (None when its manifest does not say)."""
    try:
        return int(json.loads((ckpt / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: DistInfo,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote; returns the loop position.

    A sharded checkpoint loads on any number of ranks (DCP reads what each rank's shards need). A rank the writing
    run did not have takes the random generators of rank (its rank mod the ranks that wrote)."""
    if (ckpt / SHARDED_DIR).is_dir():
        _load_sharded(ckpt, model, optimizer)
    else:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        assert not missing, f"checkpoint {ckpt} lacks trainable parameters {missing[:3]}"
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        device = next(model.parameters()).device
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng-rank{info.rank}.pt"
    if not rng_file.is_file():
        rng_file = ckpt / f"rng-rank{info.rank % (world_size_of(ckpt) or 1)}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    trainer = json.loads((ckpt / "trainer.json").read_text())
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], method=trainer.get("method", {}),
                        nonfinite_steps=trainer.get("nonfinite_steps", 0))


def _load_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint's weights and optimizer state into this rank's shards (or whole tensors on one rank)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _sharded_state(model, optimizer)
    with warnings.catch_warnings():  # one process reading all of a checkpoint is what DCP warns about, and meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
