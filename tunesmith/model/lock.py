"""One `train` per run folder: an exclusive lock on `run_dir/train.lock`, which holds the trainer's pid.

It lives beside the other code that reads and writes run folders (outputs: `export.py`), below the loop, so that
everything that reads a run can ask it. The lock is an OS file lock (flock), so it dies with its process: a lock left by a killed run is free, and the
next `train` takes it over (saying whose it was: a run that ends, however it ends, blanks its pid; a killed one
cannot). A second `train` on a folder whose run is alive refuses and
names the other process. Readers (`compare`, `eval` on a run folder) call `refuse_while_training`: a folder that
is being trained has outputs that are not all written yet.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from tunesmith.errors import TunesmithError

LOCK_FILE = "train.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the pid in the file is checked instead
    fcntl = None  # type: ignore[assignment]


def _recorded(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, '') when it cannot be read."""
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(run_dir: str | Path) -> int | None:
    """The pid of the live `train` that holds the lock on `run_dir` (not this process), or None."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    pid, host = _recorded(path)
    if pid == os.getpid():
        return None
    if fcntl is None:
        return pid if pid is not None and host == socket.gethostname() and pid_alive(pid) else None
    try:
        with open(path, encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return pid if pid is not None else -1
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def in_use(run_dir: str | Path, pid: int) -> TunesmithError:
    """The refusal for a run folder another live `train` is writing to."""
    who = f"pid {pid}" if pid > 0 else "a process whose pid is not written yet"
    return TunesmithError(
        f"output_dir {str(run_dir)!r} is in use: another tunesmith train ({who}) is training in it now. Wait for it "
        f"to finish, stop it (kill -TERM {pid if pid > 0 else 'PID'} stops it after a checkpoint), or choose another "
        "output_dir"
    )


def refuse_while_training(run: str | Path, spec: str) -> None:
    """A run folder that a live `train` holds has no finished outputs to read yet: say so, naming the process."""
    pid = holder(run)
    if pid is not None:
        raise TunesmithError(
            f"run folder {spec!r} is being trained now (pid {pid}): its outputs are not all written yet; wait until "
            "that run finishes (its summary.json appears), then run this again"
        )


class RunLock:
    """The lock of one run folder, taken by `acquire` (the main rank only) and released on exit or `release`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse naming the live process that holds it; a stale lock is taken over."""
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        if fcntl is not None:
            for attempt in range(5):  # a reader's probe holds it for an instant
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        fh.close()
                        pid, _ = _recorded(self.path)
                        raise in_use(self.path.parent, pid if pid is not None else -1) from None
                    time.sleep(0.2)
        fh.seek(0)
        previous, host = _recorded(self.path)
        if fcntl is None and previous is not None and previous != os.getpid() and host == socket.gethostname() \
                and pid_alive(previous):
            fh.close()
            raise in_use(self.path.parent, previous)
        if previous is not None and previous != os.getpid():
            print(f"tunesmith: {self.path.parent}: taking over the lock of pid {previous}"
                  f"{' on ' + host if host and host != socket.gethostname() else ''}, which is no longer running "
                  "(a killed run)", file=sys.stderr, flush=True)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        """Free the lock and blank the pid: only a process killed while it held the lock leaves its pid behind."""
        if self._fh is not None:
            try:
                self._fh.seek(0)
                self._fh.truncate()
            except OSError:
                pass
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
