"""A full disk while writing a checkpoint, the final outputs, or compare's report: one clear message naming the
path and the free space; the previous checkpoint or report stays whole, no partial folder is left, and the run
resumes once space is freed.

The disk is a real small filesystem: a 16 MiB tmpfs mounted for the test (we run as root here and in CI). Where
mounting is not allowed, the child process that writes gets a 16 KiB file-size limit (RLIMIT_FSIZE) instead, so
the same writes fail the same way (EFBIG instead of ENOSPC). `FAULTS_DISK=rlimit` forces that fallback.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.conftest import write_jsonl
from tests.faults.common import PRELUDE, run_child, small_run
from tests.helpers import chat_rows, final_weights, write_chat
from tunesmith.core import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

SLACK = 16 * 1024  # what is left free: a few metric lines fit, a checkpoint or an output does not


@dataclass
class SmallDisk:
    """A folder on a filesystem a child process can fill (`mode` tmpfs), or a file-size limit (`mode` rlimit)."""

    path: Path
    mode: str

    def free(self) -> None:
        """Give the space back (a limit ends with its child process)."""
        (self.path / "ballast").unlink(missing_ok=True)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MiB tmpfs when it can be mounted, else the RLIMIT_FSIZE fallback (never a skip)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.environ.get("FAULTS_DISK") != "rlimit":
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                     capture_output=True, text=True).returncode == 0
        except FileNotFoundError:
            mounted = False
        if mounted:
            try:
                yield SmallDisk(folder, "tmpfs")
            finally:
                subprocess.run(["umount", str(folder)], check=True)
            return
    yield SmallDisk(folder, "rlimit")


# fill(mode, folder): fill the tmpfs holding `folder` but SLACK bytes, or limit this process's files to SLACK bytes.
FILL = f"""
import resource
def fill(mode, folder):
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, ({SLACK}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    fd = os.open(os.path.join(folder, "ballast"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - {SLACK}))
    os.close(fd)
"""

# Train argv[1]; fill the disk after step argv[4] (its checkpoint written), or before the outputs with "outputs".
TRAIN_FILLING = PRELUDE + FILL + """
mode, folder, when = sys.argv[2], sys.argv[3], sys.argv[4]
class Fill(LoopCallback):
    def on_step_end(self, step, outcome):
        if when != "outputs" and step == int(when):
            fill(mode, folder)
    def on_train_end(self, model, result):
        if when == "outputs":
            fill(mode, folder)
cli(sys.argv[1], Fill())
"""

COMPARE_FILLING = PRELUDE + FILL + """
fill(sys.argv[1], sys.argv[2])
sys.exit(main(["compare", *sys.argv[3:]]))
"""


def _full_message(err: str, what: str, path: Path, disk: SmallDisk) -> None:
    reason = "no space left on the device" if disk.mode == "tmpfs" else "the file-size limit (ulimit -f) is reached"
    assert f"tunesmith: error: could not write {what} {path}: {reason} (" in err, err[-3000:]
    assert " free on its filesystem)" in err
    assert "Traceback" not in err


def test_full_disk_while_checkpointing_and_writing_outputs_then_resume(
        tmp_path: Path, tiny_model_dir: Path, small_disk: SmallDisk) -> None:
    data = write_chat(tmp_path, 24)
    straight, _ = small_run(tmp_path, tiny_model_dir, data, "straight")
    tunesmith.train(straight)
    cfg, config = small_run(small_disk.path, tiny_model_dir, data, "run")
    run = small_disk.path / "run"
    checkpoints = run / "checkpoints"

    # full after step 3's checkpoint: step 6's cannot be written
    full = run_child(TRAIN_FILLING, config, small_disk.mode, small_disk.path, 3)
    assert full.returncode == 2, full.stderr[-3000:]
    _full_message(full.stderr, "checkpoint", checkpoints / "step-0000006", small_disk)
    assert f"the previous checkpoint {checkpoints / 'step-0000003'} is intact" in full.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003"]  # no partial folder beside it
    assert ckpt.is_complete(checkpoints / "step-0000003")

    # space freed, resumed; full again before the outputs
    small_disk.free()
    full = run_child(TRAIN_FILLING, config, small_disk.mode, small_disk.path, "outputs")
    assert full.returncode == 2, full.stderr[-3000:]
    _full_message(full.stderr, "the output folder", run / "adapter", small_disk)
    assert not [p.name for p in run.iterdir() if p.name.startswith((".adapter", "adapter", ".merged", "merged"))]
    assert not (run / "summary.json").exists()
    assert [d.name for d in ckpt.checkpoint_dirs(checkpoints)] == ["step-0000003", "step-0000006", "step-0000009"]

    small_disk.free()
    result = tunesmith.train(cfg)
    assert result.loop.resumed_from == 9
    expected, got = final_weights(tmp_path / "straight"), final_weights(run)
    for k in expected:
        assert torch.equal(expected[k], got[k]), f"{k} differs from the uninterrupted run"


def test_full_disk_while_writing_the_compare_report(tmp_path: Path, tiny_model_dir: Path,
                                                    small_disk: SmallDisk) -> None:
    from tunesmith.cli import main

    rows = write_jsonl(tmp_path / "test.jsonl", chat_rows(3))
    out = small_disk.path / "report"
    args = ["--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--data", str(rows), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "4"]
    assert main(["compare", *args]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "report.html" in before and "results.json" in before

    full = run_child(COMPARE_FILLING, small_disk.mode, small_disk.path, *args)
    assert full.returncode == 2, full.stderr[-3000:]
    _full_message(full.stderr, "the report into", out, small_disk)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old report, whole; nothing half-new
