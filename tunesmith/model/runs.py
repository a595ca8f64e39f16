"""A training run's folder as a model: its merged/ model, its base with adapter/ folded in, or its full model/.

`tunesmith eval`, `compare` and `export` accept a run folder (one that holds config.yaml) wherever they accept a
model; this is where such a folder is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.loading import ResolvedModel, load_model, load_tokenizer, resolve_model
from tunesmith.model.lora import merged_state_dict

RUN_CONFIG = "config.yaml"


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a tunesmith run folder (it holds the run's config.yaml)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / RUN_CONFIG).is_file()


def run_config(run: str | Path) -> dict[str, Any]:
    """The run's saved config as plain data (config.yaml)."""
    import yaml

    return yaml.safe_load((Path(run) / RUN_CONFIG).read_text(encoding="utf-8")) or {}


def run_base_spec(run: Path, spec: str) -> str:
    """The model the run started from, as its config.yaml names it."""
    base = run_config(run).get("model")
    if not base:
        raise TunesmithError(f"run folder {spec!r}: config.yaml names no base model for adapter/; the file is damaged")
    return str(base)


def load_run(run: Path, spec: str, load: LoadConfig, device: torch.device | None = None):
    """(model, tokenizer) of a run folder: merged/, else the base with adapter/ folded in, else model/."""
    if (run / "reward_model").is_dir():
        raise TunesmithError(
            f"run folder {spec!r} holds a reward model (method: reward), which scores answers but does not write "
            f"them; use `tunesmith score --reward-model {spec}`, or `--reward-model {spec}` with tunesmith compare"
        )
    if (run / "merged" / "config.json").is_file():
        return _load_plain(run / "merged", load, device)
    adapter = run / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return _load_adapter(run, spec, load, device)
    if (run / "model" / "config.json").is_file():
        return _load_plain(run / "model", load, device)
    raise TunesmithError(
        f"run folder {spec!r} holds no trained model yet (no merged/, adapter/ or model/); let the run finish "
        "(re-running its train command resumes it), or give a model folder"
    )


def _load_plain(folder: Path, load: LoadConfig, device: torch.device | None):
    resolved = resolve_model(str(folder), load)
    return load_model(resolved, load, device), load_tokenizer(resolved, load)


def _load_adapter(run: Path, spec: str, load: LoadConfig, device: torch.device | None):
    import peft

    adapter = run / "adapter"
    base_spec = run_base_spec(run, spec)
    try:
        resolved = resolve_model(base_spec, load)
        model = load_model(resolved, load, device)
    except TunesmithError as exc:
        raise TunesmithError(f"run folder {spec!r}: its adapter needs base model {base_spec!r}, which fails: {exc}") from None
    try:
        with warnings.catch_warnings():
            # peft probes a property transformers has deprecated; the warning says nothing to our users
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            adapted = peft.PeftModel.from_pretrained(model, str(adapter))
        # Folded into the weights: generation then runs at the plain model's speed.
        merged = merged_state_dict(adapted)
        model = adapted.unload()
        model.load_state_dict(merged)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TunesmithError(f"run folder {spec!r}: could not apply {adapter} to {base_spec!r}: {exc}") from exc
    if (adapter / "tokenizer_config.json").is_file():  # saved with the adapter, chat template included
        resolved = ResolvedModel(spec=str(adapter), path=str(adapter), source="local")
    return model, load_tokenizer(resolved, load)
