"""What the fault tests share: the runs they start in child processes, and their tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import run_config

REPO = Path(__file__).resolve().parents[2]
# `python KILLED_AT_STEP CONFIG STEP`: a run that SIGKILLs itself at the end of step STEP (after its checkpoint)
KILLED_AT_STEP = REPO / "tests/invariants/killed_at_step.py"


def child_env() -> dict[str, str]:
    """The environment of a child run: one thread (as the tests' own process), this checkout importable."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    return env


def run_child(script: str, *args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a Python snippet in a child process with `args` in sys.argv[1:]; its output is captured."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def small_run(tmp: Path, model_dir: Path, data: Path, name: str, **train: Any) -> tuple[dict[str, Any], Path]:
    """A tiny run's config (max_steps 10, checkpoint every 3 steps, LoRA dropout on so resume must restore the
    generators), and the YAML file it is also written to."""
    settings = {"max_steps": 10, "batch_size": 4, "lr": 2e-3, "max_length": 64, "save_every": 3,
                "keep_checkpoints": 5, **train}
    cfg = run_config(model_dir, data, tmp / name, **settings)
    cfg["lora"]["dropout"] = 0.1
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


# The prelude of a child run: `At(step, action)` calls action() once, inside the first forward pass of step
# `step` (counted from 1), so the fault lands mid-step at the same point on every machine; `cli(config, *cbs)` runs
# `tunesmith train config` through the command line's own entry point, with the callbacks, and exits with its code.
PRELUDE = """
import os, signal, sys
import tunesmith.run
from tunesmith.cli import main
from tunesmith.core.loop import LoopCallback

class At(LoopCallback):
    def __init__(self, step, action):
        self.step, self.action, self.done, self.fired = step, action, 0, False
    def on_train_begin(self, model, step):
        self.done = step
        model.get_input_embeddings().register_forward_hook(self.hook)
    def hook(self, module, args, output):
        if self.done == self.step - 1 and not self.fired:
            self.fired = True
            self.action()
    def on_step_end(self, step, outcome):
        self.done = step

def cli(config, *callbacks):
    train = tunesmith.run.train
    tunesmith.run.train = lambda source, overrides=None: train(source, overrides, callbacks=list(callbacks))
    sys.exit(main(["train", config]))
"""
