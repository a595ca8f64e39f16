"""The base-vs-tuned evaluation built into `train`: the base model before the first step, the tuned
model after the last, and the same report `tunesmith compare` writes, in the run folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import Config
from tunesmith.data.examples import EvalExample, load_eval_examples
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import resolve_metrics
from tunesmith.eval.results import EvalResult
from tunesmith.model.generate import GenerationSettings

log = logging.getLogger(__name__)

BASE_RESULT = "base.json"  # kept in run_dir/report, so a resumed run does not evaluate the base twice


@dataclass
class RunEval:
    """The checked evaluation plan of one run."""

    source: str
    examples: list[EvalExample]
    metrics: list[str]
    settings: GenerationSettings


def plan(cfg: Config) -> RunEval | None:
    """Check the evaluation data and metrics up front (before anything is written); None when there is none."""
    if not cfg.eval.before:
        return None
    source = cfg.data.test or (cfg.data.eval if cfg.method == "sft" else None)
    if source is None:
        return None
    examples = load_eval_examples(source, cfg.data.split)
    with_reference = [e for e in examples if e.reference is not None]
    if not with_reference:
        if cfg.data.test:
            raise TunesmithError(
                f"data.test {source!r}: no row has a reference answer, so base and tuned cannot be compared; "
                "give prompt/completion, prompt/answer or messages ending in an assistant turn, "
                "or set eval.before=false"
            )
        log.warning("%s has no reference answers: no base-vs-tuned report for this run", source)
        return None
    if cfg.eval.max_rows is not None:
        with_reference = with_reference[: cfg.eval.max_rows]
    resolve_metrics(cfg.eval.metrics)  # unknown metrics fail now, not after training
    settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    return RunEval(source=source, examples=with_reference, metrics=list(cfg.eval.metrics), settings=settings)


def evaluate_base(model, tokenizer, run_eval: RunEval, run_dir: Path, spec: str) -> EvalResult:
    """Evaluate the untrained model, or reuse the result a killed run already saved."""
    from tunesmith.eval.evaluate import evaluate

    saved = run_dir / "report" / BASE_RESULT
    if saved.is_file():
        return EvalResult.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    result = evaluate(model, tokenizer, run_eval.examples, metrics=run_eval.metrics, settings=run_eval.settings,
                      label="base", spec=spec, data=run_eval.source)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    tmp.replace(saved)
    return result


def evaluate_tuned_and_report(
    model, tokenizer, run_eval: RunEval, run_dir: Path, base: EvalResult
) -> tuple[Path, str]:
    """Evaluate the trained model and write report.html beside results.json; returns (report, headline)."""
    from tunesmith.eval.evaluate import evaluate
    from tunesmith.eval.report import headline, write_report

    tuned = evaluate(model, tokenizer, run_eval.examples, metrics=run_eval.metrics, settings=run_eval.settings,
                     label="tuned", spec=str(run_dir), data=run_eval.source)
    tuned.run_dir = str(run_dir)
    report = write_report([base, tuned], run_eval.examples, run_dir / "report", base_label="base",
                          title=f"{run_dir.name}: base vs tuned")
    return report, headline([base, tuned], "base")
