"""Two processes, one run folder: a second train refuses while the first is alive, a reader gets a clear message
instead of half-written outputs, and the lock of a killed run is taken over."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.conftest import write_jsonl
from tests.faults.common import PRELUDE, child_env, small_run
from tests.helpers import chat_rows, final_weights, write_chat
from tunesmith.cli import main
from tunesmith.errors import TunesmithError

pytestmark = pytest.mark.usefixtures("one_thread")

# Train argv[1]; after step argv[2] (and its checkpoint), create the file argv[3] and wait, holding the run folder.
HELD = PRELUDE + """
import time
from pathlib import Path
class Hold(LoopCallback):
    def on_step_end(self, step, outcome):
        if step == int(sys.argv[2]):
            Path(sys.argv[3]).touch()
            time.sleep(3600)  # until the test kills this process
cli(sys.argv[1], Hold())
"""


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Wait until the child has created `path` (it is then inside its run, holding the folder)."""
    deadline = time.monotonic() + 600
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child run ended early: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "the child run never got to its step"
        time.sleep(0.05)


def test_second_train_refuses_readers_wait_and_a_killed_runs_lock_is_taken_over(
        tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    data = write_chat(tmp_path, 24)
    straight, _ = small_run(tmp_path, tiny_model_dir, data, "straight")
    tunesmith.train(straight)
    cfg, config = small_run(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    first = subprocess.Popen([sys.executable, "-c", HELD, str(config), "4", str(ready)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, first)

        # a second train on the same folder refuses, naming the live one
        with pytest.raises(TunesmithError) as caught:
            tunesmith.train(cfg)
        assert f"output_dir {str(run)!r} is in use: another tunesmith train (pid {first.pid}) is training in it now" \
            in str(caught.value)

        # compare on the half-finished run gets a clear message, before any generation
        test = write_jsonl(tmp_path / "test.jsonl", chat_rows(2))
        compare = ["compare", "--base", str(tiny_model_dir), "--tuned", str(run), "--data", str(test),
                   "--out", str(tmp_path / "report"), "--max-new-tokens", "2"]
        capsys.readouterr()
        assert main(compare) == 2
        err = capsys.readouterr().err
        assert f"run folder {str(run)!r} is being trained now (pid {first.pid}): its outputs are not all written" in err
        assert not (tmp_path / "report").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # killed: its lock is stale. A reader is told the outputs are not written; the next train takes over.
    assert main(compare) == 2
    assert f"run folder {str(run)!r} holds no trained model yet" in capsys.readouterr().err
    result = tunesmith.train(cfg)
    assert f"taking over the lock of pid {first.pid}, which is no longer running" in capsys.readouterr().err
    assert result.loop.resumed_from == 3
    expected, got = final_weights(tmp_path / "straight"), final_weights(run)
    for k in expected:
        assert torch.equal(expected[k], got[k])
