"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place;
the rename is the commit. The manifest `checkpoint.json` records each file's size and SHA-256.
A `step-N` folder without its manifest, or whose files do not match it (a flipped byte, a
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


def save_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    info: DistInfo,
    keep: int,
) -> Path:
    """Write checkpoint `step-N` atomically on every rank's behalf; keep the newest `keep`.

    Weights that are not finite are never saved; a full disk raises one `DiskFullError` and leaves the previous
    checkpoint as it was.
    """
    final = root / f"{PREFIX}{state.step:07d}"
    tmp = root / f".tmp-{PREFIX}{state.step:07d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
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
            previous = [d for d in checkpoint_dirs(root) if d != final]
            advice = (f"the previous checkpoint {previous[-1]} is intact: free some space, then run the same train "
                      "command again to resume from it") if previous else "free some space and run the same command again"
            full = disk_full_error(exc, final, "checkpoint", advice)
            if full is not None:
                raise full from None
            raise
        if final.exists():  # a stale one from a run that was killed after this step; ours is newer
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def _write_files(tmp: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState, info: DistInfo) -> None:
    save_file(weights, str(tmp / "trainable.safetensors"))
    # through a Python file: a failed write then says why (torch's own writer reports only an iostream error)
    with open(tmp / "optimizer.pt", "wb") as fh:
        torch.save(optimizer.state_dict(), fh)
    with open(tmp / "scheduler.pt", "wb") as fh:
        torch.save(scheduler.state_dict(), fh)
    (tmp / "trainer.json").write_text(json.dumps({"step": state.step, "tokens_seen": state.tokens_seen,
                                                  "method": state.method, "nonfinite_steps": state.nonfinite_steps}))
    files, sums = {}, {}
    for f in sorted(tmp.iterdir()):
        _fsync_file(f)
        files[f.name] = f.stat().st_size
        sums[f.name] = sha256_file(f)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"step": state.step, "world_size": info.world_size, "files": files, "sha256": sums}))
    _fsync_file(manifest)
    _fsync_dir(tmp)


def load_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: DistInfo,
) -> TrainerState:
    """Restore everything `save_checkpoint` wrote; returns the loop position."""
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
    set_rng_state(torch.load(rng_file, weights_only=True))
    trainer = json.loads((ckpt / "trainer.json").read_text())
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], method=trainer.get("method", {}),
                        nonfinite_steps=trainer.get("nonfinite_steps", 0))


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
