"""The one exception type for user errors (bad config, bad data, a model that cannot load, a full disk), and the
exception of a run stopped by a signal."""

from __future__ import annotations


class TunesmithError(Exception):
    """A problem with the user's input; the CLI prints it without a traceback and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class DiskFullError(TunesmithError):
    """A write failed for lack of space (or the file-size limit); the message names the path and the free space."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason  # "no space left on the device", ...
        super().__init__(message)


class RunStopped(Exception):
    """A run stopped on a signal after saving a checkpoint: not finished, and resumable with `command`."""

    def __init__(self, message: str, *, exit_code: int, step: int, checkpoint: str | None, command: str) -> None:
        self.exit_code = exit_code
        self.step = step
        self.checkpoint = checkpoint
        self.command = command
        super().__init__(message)
