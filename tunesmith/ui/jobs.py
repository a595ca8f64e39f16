"""Commands the dashboard starts (`tunesmith train`, `tunesmith compare`), each as its own process.

A job is launched through `python -m tunesmith.ui.jobs RECORD -- ARGS`: a small launcher in a new session, so the
command survives the browser closing and the dashboard stopping. The launcher starts the command with its output
in a log file, writes the command's pid into the job's record, waits, and writes its exit code there; the record
(`RUNS/.tunesmith-ui/jobs/ID.json`) is how a later dashboard knows a job that failed from one that was stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.model.lock import pid_alive

STATE_DIR = ".tunesmith-ui"  # inside --runs: job records and logs (a dot folder: never listed as a run)


@dataclass
class Job:
    """One launched command and what became of it."""

    id: str
    kind: str  # train | compare
    name: str  # the run folder's name (train) or the comparison's folder name (compare)
    argv: list[str]
    log: Path
    record: Path
    started: float
    config: dict[str, Any] | None = None  # train: the settings it was started with (before its folder exists)
    out: str | None = None  # compare: the report folder
    launcher_pid: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    ended: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        """Whether the command (or its launcher, before it started the command) still runs."""
        if self.exit_code is not None:
            return False
        return any(_alive(p) for p in (self.pid, self.launcher_pid) if p)

    @property
    def signalled(self) -> bool:
        """Whether it ended by a signal (a stop, a kill), rather than by an error of its own."""
        return self.exit_code is not None and (self.exit_code < 0 or self.exit_code == 130)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64_000))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        text = text.replace("\r", "\n")  # progress bars redraw with \r
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the record file and the page)."""
        out = asdict(self)
        out["log"], out["record"] = str(self.log), str(self.record)
        out["alive"] = self.alive
        return out


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    try:  # a child of this process that ended and was not reaped yet is not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def state_dir(runs: Path) -> Path:
    """The dashboard's own folder inside `runs`."""
    return runs / STATE_DIR / "jobs"


def _write(record: Path, data: dict[str, Any]) -> None:
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(record)


def _load(record: Path) -> Job | None:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        data["log"], data["record"] = Path(data["log"]), Path(data["record"])
        data.pop("alive", None)
        job = Job(**data)
        if job.launcher_pid is None:
            launcher = record.with_suffix(".launcher")
            job.launcher_pid = int(launcher.read_text(encoding="utf-8")) if launcher.is_file() else None
        return job
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_jobs(runs: Path) -> list[Job]:
    """Every job launched under `runs`, oldest first."""
    folder = state_dir(runs)
    if not folder.is_dir():
        return []
    jobs = [j for j in (_load(p) for p in folder.glob("*.json")) if j is not None]
    return sorted(jobs, key=lambda j: j.started)


def launch(runs: Path, kind: str, name: str, args: list[str], *, config: dict[str, Any] | None = None,
           out: str | None = None) -> Job:
    """Start `tunesmith ARGS` in its own session, its output in a log beside its record; returns the job."""
    folder = state_dir(runs)
    folder.mkdir(parents=True, exist_ok=True)
    ident = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{name}-{os.urandom(3).hex()}"
    job = Job(id=ident, kind=kind, name=name, argv=["tunesmith", *args], log=folder / f"{ident}.log",
              record=folder / f"{ident}.json", started=time.time(), config=config, out=out)
    _write(job.record, job.to_dict())
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith.ui.jobs", str(job.record), "--", *args],
                                stdin=devnull, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    job.launcher_pid = proc.pid
    # beside the record, which the launcher rewrites: the job counts as alive from now on
    job.record.with_suffix(".launcher").write_text(str(proc.pid), encoding="utf-8")
    return job


def stop(pid: int) -> None:
    """Ask a train to stop as SIGTERM does: it finishes its step, writes a checkpoint and exits, resumable."""
    os.kill(pid, signal.SIGTERM)


def _run(record: Path, args: list[str]) -> int:
    """The launcher: run `tunesmith ARGS`, record its pid and exit code."""
    data = json.loads(record.read_text(encoding="utf-8"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(data["log"], "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        data.update(pid=proc.pid, launcher_pid=os.getpid())
        _write(record, data)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stop is the command's to handle, not the launcher's
        code = proc.wait()
    data.update(exit_code=code, ended=time.time())
    _write(record, data)
    return 0


if __name__ == "__main__":
    sys.exit(_run(Path(sys.argv[1]), sys.argv[3:]))
