"""SIGTERM and SIGINT stop a run after the step it is in, with a checkpoint and the command that resumes it;
a second signal stops at once and leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.faults.common import PRELUDE, child_env, run_child, small_run
from tests.helpers import final_weights, write_chat
from tunesmith.core import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

# Signal this process once, in the middle of step argv[2]; with argv[4] == "twice", once more while the checkpoint
# that stop writes is half done (its weights are being gathered).
SIGNALLED = PRELUDE + """
import tunesmith.core.checkpoint as ckpt
sig = getattr(signal, sys.argv[3])
first = At(int(sys.argv[2]), lambda: os.kill(os.getpid(), sig))
if sys.argv[4] == "twice":
    gather = ckpt.trainable_state
    def gather_then_signal(model):
        if first.fired:
            os.kill(os.getpid(), sig)
        return gather(model)
    ckpt.trainable_state = gather_then_signal
cli(sys.argv[1], first)
"""


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:
    """The data and the final weights of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_chat(tmp, 24)
    cfg, _ = small_run(tmp, tiny_model_dir, data, "run")
    torch.set_num_threads(1)
    tunesmith.train(cfg)
    return data, final_weights(tmp / "run")


def test_sigterm_stops_after_the_step_and_the_printed_command_resumes_bit_exact(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict]) -> None:
    data, expected = straight
    _, config = small_run(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    stopped = run_child(SIGNALLED, config, 5, "SIGTERM", "once")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    # finished step 5 (the signal came in its first forward pass), saved it, wrote nothing that marks it finished
    assert _steps_logged(run) == [1, 2, 3, 4, 5]
    assert [d.name for d in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step-0000003", "step-0000005"]
    assert ckpt.is_complete(run / "checkpoints/step-0000005")
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()
    command = f"cd {os.getcwd()} && tunesmith train {run / 'config.yaml'}"
    assert "stopped by SIGTERM after step 5 of 10" in stopped.stderr and command in stopped.stderr

    # the printed command, as printed (with this checkout's module in place of the installed script)
    resumed = subprocess.run(command.replace("tunesmith train", f"{shlex.quote(sys.executable)} -m tunesmith.cli train"), shell=True,
                             env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 5
    assert _steps_logged(run) == list(range(1, 11))
    _assert_same_weights(expected, final_weights(run), "SIGTERM then resume")


def test_sigint_exits_130_with_a_checkpoint(tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict]) -> None:
    data, _ = straight
    _, config = small_run(tmp_path, tiny_model_dir, data, "run")
    stopped = run_child(SIGNALLED, config, 2, "SIGINT", "once")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT after step 2 of 10" in stopped.stderr
    assert ckpt.is_complete(tmp_path / "run/checkpoints/step-0000002")
    assert not (tmp_path / "run/summary.json").exists()


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", -signal.SIGTERM), ("SIGINT", 130)])
def test_second_signal_stops_at_once_and_the_previous_checkpoint_stays(
        tmp_path: Path, tiny_model_dir: Path, straight: tuple[Path, dict], sig: str, code: int) -> None:
    data, expected = straight
    _, config = small_run(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    killed = run_child(SIGNALLED, config, 5, sig, "twice")
    # SIGTERM ends the process as its default does; SIGINT interrupts it (KeyboardInterrupt: the command line's 130)
    assert killed.returncode == code, killed.stderr[-3000:]
    assert "stopped by" not in killed.stderr
    # the checkpoint of step 5 was never committed; the one of step 3 is whole
    assert [d.name for d in ckpt.checkpoint_dirs(run / "checkpoints")] == ["step-0000003"]
    assert ckpt.is_complete(run / "checkpoints/step-0000003")
    assert not (run / "summary.json").exists()

    result = tunesmith.train(str(run / "config.yaml"))
    assert result.loop.resumed_from == 3
    _assert_same_weights(expected, final_weights(run), f"two {sig}s then resume")
