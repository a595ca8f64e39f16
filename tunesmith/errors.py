"""The one exception type for user errors: bad config, bad data, a model that cannot load."""

from __future__ import annotations


class TunesmithError(Exception):
    """A problem with the user's input; the CLI prints it without a traceback and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)
