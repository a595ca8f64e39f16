"""What eval metrics and RL rewards share: checks of an answer against its reference, and loading the user's own
`module:function` (or `path/file.py:function`) scorers, with clear errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

from tunesmith.errors import TunesmithError


def normalise(text: str) -> str:
    """Strip the ends and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def exact_match(prompt: str, output: str, reference: str) -> float:
    """1.0 when output and reference are equal up to surrounding and repeated whitespace."""
    return float(normalise(output) == normalise(reference))


def contains(prompt: str, output: str, reference: str) -> float:
    """1.0 when the (whitespace-normalised) reference occurs in the (whitespace-normalised) output."""
    return float(normalise(reference) in normalise(output))


def json_equal(prompt: str, output: str, reference: str) -> float:
    """1.0 when output and reference both parse as JSON and the values are equal; 0.0 otherwise."""
    try:
        return float(json.loads(output) == json.loads(reference))
    except ValueError:
        return 0.0


def json_in_output_match(prompt: str, output: str, reference: str) -> float:
    """Lenient JSON equality: the first `{...}` object found anywhere in the output equals the reference."""
    try:
        expected = json.loads(reference)
    except ValueError:
        return 0.0
    decoder = json.JSONDecoder()
    start = output.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(output, start)
        except ValueError:
            start = output.find("{", start + 1)
            continue
        return float(value == expected)
    return 0.0


def import_module_of(module_name: str, name: str, kind: str = "metric") -> ModuleType:
    """Import the module of a user's `module:function` (or `path/file.py:function`), with clear errors."""
    path = Path(module_name)
    if path.suffix == ".py":
        if not path.is_file():
            raise TunesmithError(f"{kind} {name!r}: file {module_name!r} not found (relative to {Path.cwd()})")
        spec = importlib.util.spec_from_file_location(f"tunesmith_user_metric_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise TunesmithError(f"{kind} {name!r}: running {module_name} failed: {describe_error(exc)}") from exc
        return module
    # The `tunesmith` console script does not put the current folder on sys.path; `python -m` does.
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TunesmithError(
                f"{kind} {name!r}: module {module_name!r} not found; put {module_name.replace('.', '/')}.py in the "
                f"current folder ({Path.cwd()}) or on PYTHONPATH, or give a file path (path/to/file.py:function)"
            ) from None
        raise TunesmithError(f"{kind} {name!r}: importing {module_name!r} failed: {describe_error(exc)}") from exc
    except Exception as exc:
        raise TunesmithError(f"{kind} {name!r}: importing {module_name!r} failed: {describe_error(exc)}") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())


def describe_error(exc: BaseException) -> str:
    """An exception as `Type: message at file:line`, the line where the user's code raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"
