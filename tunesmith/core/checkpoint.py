"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place;
the rename is the commit. A folder without its `checkpoint.json` manifest, or whose files do
not match the manifest, is never taken for a good checkpoint.
"""

from __future__ import annotations

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

MANIFEST = "checkpoint.json"
PREFIX = "step-"


@dataclass
class TrainerState:
    """Where the loop stands: the next step to run and what has been seen so far."""

    step: int = 0
    tokens_seen: int = 0
    method: dict[str, Any] = field(default_factory=dict)  # what a method carries between steps (e.g. a KL coefficient)


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


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and is_complete(d):
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[len(PREFIX) :]))


def is_complete(ckpt: Path) -> bool:
    """True when the manifest exists and every file it lists is there with its recorded size."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((ckpt / name).is_file() and (ckpt / name).stat().st_size == size for name, size in files.items())


def save_checkpoint(
    root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    info: DistInfo,
    keep: int,
) -> Path:
    """Write checkpoint `step-N` atomically on every rank's behalf; keep the newest `keep`."""
    final = root / f"{PREFIX}{state.step:07d}"
    tmp = root / f".tmp-{PREFIX}{state.step:07d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")  # each rank draws its own dropout masks
    barrier(info)
    if info.is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": state.step, "tokens_seen": state.tokens_seen, "method": state.method}))
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = f.stat().st_size
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"step": state.step, "world_size": info.world_size, "files": files}))
        _fsync_file(manifest)
        _fsync_dir(tmp)
        if final.exists():  # a stale one from a run that was killed after this step; ours is newer
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


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
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], method=trainer.get("method", {}))


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
