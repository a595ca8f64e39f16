"""What an evaluation produces: per-row outputs and scores, and per-model aggregates.

`tunesmith eval`, `tunesmith compare` and the report built into `train` all read and write these,
and `results.json` is their plain-data form (written by `write_results`). Nothing here imports torch,
so command-line parsing can use the names below.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import DEFAULT_METRICS

if TYPE_CHECKING:
    from tunesmith.data.examples import EvalExample

__all__ = ["DEFAULT_METRICS", "REWARD", "RESULTS_FILE", "EvalResult", "EvalRow", "headline_numbers", "write_results"]

RESULTS_FILE = "results.json"
REWARD = "reward"  # the metric name of reward-model scores (tunesmith.eval.score) in results and reports


@dataclass
class EvalRow:
    """One row's outcome for one model."""

    index: int
    output: str | None  # generated text (None when generation was not asked for)
    scores: dict[str, float | None]  # metric -> score; None where the metric failed on this row
    errors: dict[str, str] = field(default_factory=dict)  # metric -> error message for this row
    num_new_tokens: int = 0
    answer_loss: float | None = None  # mean token loss of the reference answer (None: no reference, or not measured)
    answer_tokens: int = 0  # the answer tokens that loss is over; the result's perplexity counts them all


@dataclass
class EvalResult:
    """One model evaluated on one dataset."""

    label: str  # name in tables: "base", "tuned", or the user's NAME
    spec: str  # what was loaded: a model spec or a run folder
    data: str  # the data source
    metrics: dict[str, float]  # metric -> mean over the rows where it was computed
    rows: list[EvalRow]
    perplexity: float | None = None  # of the reference answers, masked as in training
    mean_loss: float | None = None  # mean token loss behind the perplexity
    generation: dict[str, Any] = field(default_factory=dict)  # settings used: max_new_tokens, temperature, ...
    timing: dict[str, float] = field(default_factory=dict)  # seconds, new_tokens, new_tokens_per_s
    run_dir: str | None = None  # the training run folder, when the model came from one
    # Held-out plain text (compare --text): the domain's own text, the measure of continued pretraining
    text_data: str | None = None  # its source
    text_perplexity: float | None = None  # over every predicted token of every document
    text_losses: list[list[float]] = field(default_factory=list)  # per document, in order: [mean token loss, tokens]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Rebuild from `to_dict` output."""
        data = dict(data)
        data["rows"] = [EvalRow(**r) for r in data.get("rows", [])]
        return cls(**data)


def write_results(
    out_dir: Path, results: list[EvalResult], examples: list[EvalExample], comparison: dict[str, Any] | None = None
) -> Path:
    """Write results, examples and the report's comparison (when given) to out_dir/results.json; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"results": [r.to_dict() for r in results], "examples": [asdict(e) for e in examples]}
    if comparison is not None:
        payload["comparison"] = comparison
    from tunesmith.model.export import write_file

    # default=str: extra fields of Parquet or HF rows may hold dates or bytes
    text = json.dumps(_finite_or_none(payload), indent=2, ensure_ascii=False, default=str) + "\n"
    return write_file(out_dir / RESULTS_FILE, text, "the results", "free some space and run the command again")


def headline_numbers(payload: dict[str, Any]) -> dict[str, float]:
    """The report's numbers from a results.json payload, flat: `report/<model>/<measure>` for every model's value
    and `report/<model>/<measure>_delta` for its difference from the base (empty without a comparison)."""
    numbers: dict[str, float] = {}
    measures = (payload.get("comparison") or {}).get("measures") or {}
    for measure, entry in measures.items():
        for label, score in (entry.get("models") or {}).items():
            for key, name in (("value", measure), ("delta", f"{measure}_delta")):
                value = score.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numbers[f"report/{label}/{name}"] = float(value)
    return numbers


def _finite_or_none(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers and other tools reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
