"""Run logs: metrics.jsonl, TensorBoard event files and the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tunesmith.model.export import RESUME_ADVICE, disk_full_error


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Drop metric lines logged after `keep_through_step` (a resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if rec.get("step", 0) <= keep_through_step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


class RunLogger:
    """Writes metrics to metrics.jsonl and TensorBoard, and drives the progress bar (main rank only)."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._tb = None
        self._bar = None
        self._failed = False  # a write failed (and was reported): closing must not report it again
        if not self.enabled:
            return
        assert run_dir is not None
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one set of metrics for `step`."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        assert self._file is not None
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            self._failed = True
            full = disk_full_error(exc, Path(self._file.name), "the metrics log", RESUME_ADVICE)
            if full is not None:
                raise full from None
            raise
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def progress(self, steps: int, postfix: dict[str, str]) -> None:
        """Advance the progress bar and show the live figures."""
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(steps)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        """Flush and close everything."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                if not self._failed:
                    raise
