"""A NaN or infinite loss or gradient norm skips its step and is counted; a run of them, or one at the first step,
stops the run with the usual causes. Running out of GPU memory names the settings that lower it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.faults.common import small_run
from tests.helpers import final_weights, write_chat
from tunesmith.core import checkpoint as ckpt
from tunesmith.core.loop import LoopCallback
from tunesmith.errors import TunesmithError

pytestmark = pytest.mark.usefixtures("one_thread")


class Poison(LoopCallback):
    """During the given steps (from 1): a NaN loss (the embeddings' output times NaN), an infinite gradient (a
    trainable weight's gradient times infinity), or an out-of-memory error raised in the forward pass."""

    def __init__(self, kind: str, steps: set[int]) -> None:
        self.kind, self.steps, self.done = kind, steps, 0
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, model: torch.nn.Module, step: int) -> None:
        self.model, self.done = model, step
        model.get_input_embeddings().register_forward_hook(self.forward_hook)
        next(p for p in model.parameters() if p.requires_grad).register_hook(self.grad_hook)

    def active(self) -> bool:
        return self.done + 1 in self.steps

    def forward_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.active() and self.kind == "nan_loss":
            return output * float("nan")
        if self.active() and self.kind != "inf_grad":
            raise self.kind("CUDA out of memory. Tried to allocate 20.00 GiB")  # type: ignore[operator]
        return None

    def grad_hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        return grad * float("inf") if self.active() and self.kind == "inf_grad" else None

    def on_step_end(self, step: int, outcome: object) -> None:
        self.done = step
        self.weights[step] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
def test_a_nonfinite_step_is_skipped_and_counted(tmp_path: Path, tiny_model_dir: Path, kind: str, capsys) -> None:
    cfg, _ = small_run(tmp_path, tiny_model_dir, write_chat(tmp_path, 24), "run", max_steps=6, save_every=0)
    poison = Poison(kind, {3})
    result = tunesmith.train(cfg, callbacks=[poison])
    w = poison.weights
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2]), "step 3 updated the weights"
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3]), "step 4 did not update the weights"
    metrics = _metrics(tmp_path / "run")
    assert "nonfinite_steps" not in metrics[2] and metrics[3]["nonfinite_steps"] == metrics[6]["nonfinite_steps"] == 1
    assert not math.isfinite(metrics[3]["loss"] if kind == "nan_loss" else metrics[3]["grad_norm"])
    assert json.loads((tmp_path / "run/summary.json").read_text())["nonfinite_steps"] == 1
    assert result.loop.nonfinite_steps == 1
    assert "step 3: loss" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


@pytest.mark.parametrize(("steps", "stop_at", "why"), [
    ({4, 5, 6}, 6, "for 3 steps in a row (train.max_nonfinite_steps=3)"),
    ({1}, 1, "at the first step"),
])
def test_nonfinite_steps_in_a_row_or_at_the_first_step_stop_the_run(
        tmp_path: Path, tiny_model_dir: Path, steps: set[int], stop_at: int, why: str) -> None:
    cfg, _ = small_run(tmp_path, tiny_model_dir, write_chat(tmp_path, 24), "run")
    run = tmp_path / "run"
    with pytest.raises(TunesmithError) as caught:
        tunesmith.train(cfg, callbacks=[Poison("nan_loss", steps)])
    msg = str(caught.value)
    assert msg.startswith(f"step {stop_at}: the loss or gradient norm is NaN or infinite {why} (loss nan")
    assert "train.lr=0.002 (try a tenth)" in msg and "float16 overflow" in msg and "bad rows in the data" in msg
    kept = [d.name for d in ckpt.checkpoint_dirs(run / "checkpoints")]
    if stop_at == 6:
        assert kept == ["step-0000003"] and f"the last good checkpoint, {run / 'checkpoints/step-0000003'}, is kept" in msg
    else:
        assert kept == [] and "there is no checkpoint yet" in msg
    assert not (run / "adapter").exists() and not (run / "merged").exists() and not (run / "summary.json").exists()


@pytest.mark.parametrize("error", sorted({torch.OutOfMemoryError, torch.cuda.OutOfMemoryError}, key=str))
def test_out_of_memory_names_the_settings_that_lower_memory(tmp_path: Path, tiny_model_dir: Path,
                                                           error: type[Exception]) -> None:
    cfg, _ = small_run(tmp_path, tiny_model_dir, write_chat(tmp_path, 24), "run")
    with pytest.raises(TunesmithError) as caught:
        tunesmith.train(cfg, callbacks=[Poison(error, {2})])  # type: ignore[arg-type]
    msg = str(caught.value)
    assert msg.startswith("out of memory on cpu during step 2 (CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert "train.forward_tokens=512 (the default for this device)" in msg
    assert "train.gradient_checkpointing=false" in msg and "train.batch_size=4" in msg
