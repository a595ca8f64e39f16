"""Answer metrics: each is `fn(prompt, output, reference) -> float`, built in or the user's own `module:function`.

A metric that raises on a row does not stop the others: the row gets score None and an error
message naming the row and the function, and the run reports how many rows failed per metric.
A metric that works without a reference says so with the attribute `needs_reference = False`
(it is then called with reference None on rows that have none).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable

from tunesmith.data.examples import EvalExample
from tunesmith.errors import TunesmithError
from tunesmith.scoring import (
    contains,
    describe_error,
    exact_match,
    import_module_of,
    json_equal,
    json_in_output_match,
)

Metric = Callable[[str, str, "str | None"], float]


BUILTIN: dict[str, Metric] = {
    "exact_match": exact_match,
    "contains": contains,
    "json_equal": json_equal,
    "json_in_output_match": json_in_output_match,
}


def needs_reference(fn: Metric) -> bool:
    """Whether the metric compares with a reference answer (True unless it sets `needs_reference = False`)."""
    return bool(getattr(fn, "needs_reference", True))


def metric_label(fn: Metric) -> str:
    """`module.function` of a metric, for error messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ---------------------------------------------------------------- resolving names


def resolve_metrics(names: list[str]) -> dict[str, Metric]:
    """Map each name to its function: a built-in name, `module:function`, or `path/to/file.py:function`."""
    resolved: dict[str, Metric] = {}
    for name in names:
        if name in resolved:
            continue
        if name in BUILTIN:
            resolved[name] = BUILTIN[name]
        elif ":" in name:
            resolved[name] = _import_metric(name)
        else:
            raise TunesmithError(
                f"metric {name!r}: unknown; built-in metrics are {', '.join(BUILTIN)}; for your own give "
                "module:function (e.g. mymetrics:score) or path/to/file.py:function"
            )
    return resolved


def _import_metric(name: str) -> Metric:
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise TunesmithError(f"metric {name!r}: expected module:function, e.g. mymetrics:score")
    module = import_module_of(module_name, name)
    fn = getattr(module, attr, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise TunesmithError(
            f"metric {name!r}: module {module_name!r} has no function {attr!r}"
            + (f" (it defines {', '.join(defined[:12])})" if defined else "")
        )
    if not callable(fn):
        raise TunesmithError(f"metric {name!r}: {attr!r} in {module_name!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("prompt", "output", "reference")
    except TypeError:
        raise TunesmithError(
            f"metric {name!r}: {attr}{inspect.signature(fn)} cannot be called as fn(prompt, output, reference); "
            "a metric takes those three strings and returns a number"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): find out when it is called
        pass
    return fn


# ---------------------------------------------------------------- scoring


def check_references(metrics: dict[str, Metric], examples: list[EvalExample], source: str) -> None:
    """Refuse metrics that need references when rows lack them, naming the metrics and the rows."""
    needing = [name for name, fn in metrics.items() if needs_reference(fn)]
    missing = [e for e in examples if e.reference is None]
    if not (needing and missing):
        return
    which = "none of the" if len(missing) == len(examples) else f"{len(missing)} of the"
    raise TunesmithError(
        f"{source}: {which} {len(examples)} rows have a reference answer (first without: {missing[0].location}), "
        f"but metric{'s' if len(needing) > 1 else ''} {', '.join(needing)} compare{'' if len(needing) > 1 else 's'} "
        "the output with one. Give references (prompt/completion or prompt/answer fields, messages ending in an "
        "assistant turn, alpaca output, sharegpt), or leave those metrics out (`--metrics` with no names only "
        "generates; your own metric can set needs_reference = False)"
    )


def score_row(
    metrics: dict[str, Metric], example: EvalExample, output: str
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every metric on one row: scores (None where a metric failed) and the failures' messages."""
    scores: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for name, fn in metrics.items():
        where = f"row {example.index} ({example.location}): {metric_label(fn)}"
        try:
            value = fn(example.prompt, output, example.reference)
        except Exception as exc:  # the user's code: any failure is this row's, the run goes on
            scores[name], errors[name] = None, f"{where} raised {describe_error(exc)}"
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            scores[name] = None
            errors[name] = f"{where} returned {value!r} ({type(value).__name__}); a metric must return a finite number"
            continue
        scores[name] = float(value)
    return scores, errors
