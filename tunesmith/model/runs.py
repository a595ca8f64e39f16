"""What a model name means when it may be a training run: which weights, which adapter, which tokenizer.

Everything `train` accepts as `model:` (a folder, a hub id, a .gguf file, `default`) is a model as it is. A run
folder (it holds config.yaml) means its trained model: merged/ for a LoRA run, else its base with adapter/
applied, else model/ for full fine-tuning. Eval, chat, serve and export all read a run the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.loading import ResolvedModel, load_model, load_tokenizer, resolve_model
from tunesmith.model.lock import refuse_while_training
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


@dataclass
class RunModel:
    """Where the weights of a model name are: `base` to load, and a LoRA `adapter` to apply on it, if any."""

    spec: str  # the name as given
    run_dir: Path | None  # the run folder, when the name is one
    base: str  # what to load: a model folder, hub id, .gguf or `default`
    adapter: Path | None = None  # a PEFT adapter folder to apply on `base`
    merged: Path | None = None  # the run's merged/ folder, when it wrote one

    @property
    def name(self) -> str:
        """A short name for the model: the run folder's name, else the name as given."""
        return self.run_dir.name if self.run_dir is not None else self.spec


def locate(spec: str) -> RunModel:
    """Where the weights of `spec` are; a run folder without a trained model yet is a clear error."""
    path = Path(spec).expanduser()
    if not is_run_dir(path):
        return RunModel(spec=spec, run_dir=None, base=spec)
    refuse_while_training(path, spec)  # its outputs are not all written yet
    if (path / "reward_model").is_dir():
        raise TunesmithError(
            f"run folder {spec!r} holds a reward model (method: reward), which scores answers but does not write "
            f"them; use `tunesmith score --reward-model {spec}`, or `--reward-model {spec}` with tunesmith compare"
        )
    merged = path / "merged" if (path / "merged" / "config.json").is_file() else None
    adapter = path / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return RunModel(spec=spec, run_dir=path, base=run_base_spec(path, spec), adapter=adapter, merged=merged)
    if merged is not None:
        return RunModel(spec=spec, run_dir=path, base=str(merged), merged=merged)
    if (path / "model" / "config.json").is_file():
        return RunModel(spec=spec, run_dir=path, base=str(path / "model"))
    raise TunesmithError(
        f"run folder {spec!r} holds no trained model yet (no merged/, adapter/ or model/); let the run finish "
        "(re-running its train command resumes it), or give a model folder"
    )


def tokenizer_source(run: RunModel, load: LoadConfig) -> ResolvedModel:
    """Where the model's tokenizer and chat template come from: the run's merged/ or adapter/ folder (each is saved
    with them), else the weights it loads."""
    if run.merged is None and run.adapter is not None and (run.adapter / "tokenizer_config.json").is_file():
        return ResolvedModel(spec=str(run.adapter), path=str(run.adapter), source="local")
    return resolve_model(str(run.merged or run.base), load)


def apply_adapter(model: Any, run: RunModel, adapter_name: str = "default") -> Any:
    """`model` (the base) with the run's adapter loaded under `adapter_name`, as a PeftModel (or added to one)."""
    import peft

    try:
        with warnings.catch_warnings():
            # peft probes a property transformers has deprecated; the warning says nothing to our users
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if isinstance(model, peft.PeftModel):
                model.load_adapter(str(run.adapter), adapter_name=adapter_name)
                return model
            return peft.PeftModel.from_pretrained(model, str(run.adapter), adapter_name=adapter_name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TunesmithError(f"run folder {run.spec!r}: could not apply {run.adapter} to {run.base!r}: {exc}") from exc


def load_base(run: RunModel, load: LoadConfig, device: torch.device | None = None) -> Any:
    """The model `run.base` names, with a clear error that names the run when it fails."""
    try:
        return load_model(resolve_model(run.base, load), load, device)
    except TunesmithError as exc:
        if run.adapter is None:
            raise
        raise TunesmithError(f"run folder {run.spec!r}: its adapter needs base model {run.base!r}, which fails: {exc}") from None


def load_run_model(spec: str, load: LoadConfig, device: torch.device | None = None) -> tuple[Any, Any, RunModel]:
    """(model in eval mode, tokenizer, where it came from) of any model name or run folder.

    A LoRA run's adapter is folded into the weights (`merged_state_dict`, the one merge), so generation runs at the
    plain model's speed; a run that wrote merged/ loads it directly.
    """
    run = locate(spec)
    if run.adapter is not None and run.merged is None:
        adapted = apply_adapter(load_base(run, load, device), run)
        merged = merged_state_dict(adapted)
        model = adapted.unload()
        model.load_state_dict(merged)
    else:
        model = load_model(resolve_model(str(run.merged or run.base), load), load, device)
    return model.eval(), load_tokenizer(tokenizer_source(run, load), load), run


def load_run(run: Path, spec: str, load: LoadConfig, device: torch.device | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a run folder: merged/, else the base with adapter/ folded in, else model/."""
    model, tokenizer, _ = load_run_model(str(run), load, device)
    return model, tokenizer
