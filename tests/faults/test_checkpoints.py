"""Checkpoints on a clock as well as on steps; damaged checkpoints found by their checksums and passed over."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.faults.common import small_run
from tests.helpers import final_weights, write_chat
from tunesmith.core import checkpoint as ckpt
from tunesmith.core import guards
from tunesmith.core.loop import LoopCallback
from tunesmith.errors import TunesmithError

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock(LoopCallback):
    """A clock that moves `minutes` at the end of every step, and only then."""

    def __init__(self, minutes: float) -> None:
        self.now, self.minutes = 1000.0, minutes

    def __call__(self) -> float:
        return self.now

    def on_step_end(self, step: int, outcome: object) -> None:
        self.now += self.minutes * 60


def test_checkpoints_every_save_every_minutes(tmp_path: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(11)
    monkeypatch.setattr(guards, "clock", clock)
    cfg, _ = small_run(tmp_path, tiny_model_dir, write_chat(tmp_path, 24), "run", save_every=0)
    assert "save_every_minutes" not in cfg["train"]  # the default, 30
    tunesmith.train(cfg, callbacks=[clock])
    # 11 minutes a step: 33 minutes after the start at step 4, 33 more at step 7; none at the last step (10)
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path / "run/checkpoints")] == ["step-0000004", "step-0000007"]


class FailAt(LoopCallback):
    """Ends the run with an error at the end of a step, as a crash would, after that step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step: int, outcome: object) -> None:
        if step == self.step:
            raise RuntimeError("crash")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a byte of the last tensor's values: the file still parses, with a wrong number in it
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped byte": ("trainable.safetensors", flip_a_byte, "does not match its checksum"),
    "truncated file": ("optimizer.pt", _truncate, ": truncated or overwritten"),
    "deleted file": ("trainable.safetensors", Path.unlink, "trainable.safetensors is missing"),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:
    """The data and the final weights of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_chat(tmp, 24)
    cfg, _ = small_run(tmp, tiny_model_dir, data, "run")
    torch.set_num_threads(1)
    tunesmith.train(cfg)
    return data, final_weights(tmp / "run")


def _crashed_run(tmp_path: Path, tiny_model_dir: Path, data: Path) -> tuple[dict, Path]:
    cfg, _ = small_run(tmp_path, tiny_model_dir, data, "run")
    with pytest.raises(RuntimeError, match="crash"):
        tunesmith.train(cfg, callbacks=[FailAt(8)])
    run = tmp_path / "run"
    assert [d.name for d in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step-0000003", "step-0000006"]
    return cfg, run


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_resumes(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict], kind: str, capsys) -> None:
    data, expected = straight
    cfg, run = _crashed_run(tmp_path, tiny_model_dir, data)
    name, damage, why = DAMAGE[kind]
    newest = run / "checkpoints/step-0000006"
    damage(newest / name)
    assert why in (ckpt.damage(newest) or "")

    capsys.readouterr()
    result = tunesmith.train(cfg)
    assert result.loop.resumed_from == 3
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged ({name}" in err and why in err
    assert f"resuming from the previous good one, {run / 'checkpoints/step-0000003'}" in err
    assert (run / "checkpoints/damaged-step-0000006").is_dir()  # set aside, for a look
    for k, v in expected.items():
        assert torch.equal(v, final_weights(run)[k]), f"{k} differs from the uninterrupted run"


def test_no_good_checkpoint_refuses_and_says_how_to_start_over(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict]) -> None:
    data, expected = straight
    cfg, run = _crashed_run(tmp_path, tiny_model_dir, data)
    flip_a_byte(run / "checkpoints/step-0000006/trainable.safetensors")
    (run / "checkpoints/step-0000003/optimizer.pt").unlink()
    metrics = (run / "metrics.jsonl").read_text()

    with pytest.raises(TunesmithError) as caught:
        tunesmith.train(cfg)
    msg = str(caught.value)
    assert "no checkpoint is good, so there is nothing to resume from" in msg
    assert f"to start over, delete the folder {run / 'checkpoints'}" in msg
    assert f"{run / 'checkpoints/step-0000006'}: trainable.safetensors does not match its checksum" in msg
    assert f"{run / 'checkpoints/step-0000003'}: optimizer.pt is missing" in msg
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing started again from step 0

    shutil.rmtree(run / "checkpoints")  # as the message says
    result = tunesmith.train(cfg)
    assert result.loop.resumed_from == 0 and result.loop.steps == 10
    for k, v in expected.items():
        assert torch.equal(v, final_weights(run)[k])


def test_resume_may_change_memory_settings_but_not_the_maths(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict], capsys) -> None:
    data, expected = straight
    cfg, run = _crashed_run(tmp_path, tiny_model_dir, data)

    changed = {**cfg, "train": {**cfg["train"], "lr": cfg["train"]["lr"] * 2}}
    with pytest.raises(TunesmithError) as caught:
        tunesmith.train(changed)
    assert f"train.lr: checkpoint has {cfg['train']['lr']!r}, now {changed['train']['lr']!r}" in str(caught.value)
    assert "train.gradient_checkpointing" in str(caught.value)  # the message says what may change

    # recomputed activations and checkpoints on another clock: less memory, the very same run
    lighter = {**cfg, "train": {**cfg["train"], "gradient_checkpointing": True, "save_every_minutes": 5}}
    capsys.readouterr()
    result = tunesmith.train(lighter)
    assert result.loop.resumed_from == 6 and result.loop.steps == 10
    err = capsys.readouterr().err
    assert "resuming with a changed setting, train.gradient_checkpointing: checkpoint has False, now True" in err
    for k, v in expected.items():
        assert torch.equal(final_weights(run)[k], v), f"{k} differs from the uninterrupted run"


def test_resume_with_smaller_passes_goes_on_and_says_dropout_differs(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict], capsys) -> None:
    data, _ = straight
    cfg, run = _crashed_run(tmp_path, tiny_model_dir, data)
    capsys.readouterr()
    result = tunesmith.train({**cfg, "train": {**cfg["train"], "forward_tokens": 64}})
    assert result.loop.resumed_from == 6 and result.loop.steps == 10
    err = capsys.readouterr().err
    assert "train.forward_tokens: checkpoint has None, now 64; dropout masks are drawn per pass" in err
    assert (run / "summary.json").exists()
