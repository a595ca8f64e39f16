"""Run logs: metrics.jsonl, the experiment trackers (TensorBoard, W&B, MLflow, Trackio) and the progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tunesmith.core.trackers import Trackers
from tunesmith.model.export import RESUME_ADVICE, disk_full_error


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, leaving out a line cut short by a kill."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict):
            records.append(rec)
    return records


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
    """Writes metrics to metrics.jsonl, hands them to the run's trackers, and drives the progress bar (main rank
    only). Resuming at `start_step`, it first replays metrics.jsonl to the trackers (they skip what they hold)."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool,
                 trackers: Trackers | None = None) -> None:
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._trackers = trackers if self.enabled else None
        self._bar = None
        self._failed = False  # a write failed (and was reported): closing must not report it again
        if not self.enabled:
            return
        assert run_dir is not None
        if self._trackers and start_step > 0:
            self._trackers.replay(read_metrics(run_dir / "metrics.jsonl"))
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
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
        if self._trackers:
            self._trackers.log(step, metrics)

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
        """Close the progress bar and metrics.jsonl (the trackers are ended by the run, after its report)."""
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                if not self._failed:
                    raise
