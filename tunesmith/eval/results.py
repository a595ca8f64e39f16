"""What an evaluation produces: per-row outputs and scores, and per-model aggregates.

`tunesmith eval`, `tunesmith compare` and the report built into `train` all read and write these,
and `results.json` is their plain-data form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tunesmith.data.examples import EvalExample

__all__ = ["EvalExample", "EvalResult", "EvalRow"]


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

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Rebuild from `to_dict` output."""
        data = dict(data)
        data["rows"] = [EvalRow(**r) for r in data.get("rows", [])]
        return cls(**data)
