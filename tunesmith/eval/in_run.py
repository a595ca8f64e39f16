"""The base-vs-tuned evaluation built into `train`: the base model before the first step, the tuned
model after the last, and the same report `tunesmith compare` writes, in the run folder.

Rows with reference answers (data.test, or sft's data.eval) are answered and scored. A pretrain run is judged
on held-out plain text instead: its perplexity on data.test when that is plain text, else on data.eval."""

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

    source: str | None  # rows with reference answers; None when only held-out text is measured
    examples: list[EvalExample]
    metrics: list[str]
    settings: GenerationSettings
    text: str | None = None  # held-out plain text whose perplexity is measured (pretrain runs)
    text_max_length: int = 1024  # its documents are scored in blocks of this many tokens, as the run trains
    split: str = "train"


def plan(cfg: Config) -> RunEval | None:
    """Check the evaluation data and metrics up front (before anything is written); None when there is none."""
    if not cfg.eval.before:
        return None
    settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    text = _held_out_text(cfg) if cfg.method == "pretrain" else None
    source = cfg.data.test if cfg.data.test != text else None
    if source is None and cfg.method == "sft":
        source = cfg.data.eval
    if source is None:
        return None if text is None else RunEval(source=None, examples=[], metrics=[], settings=settings, text=text,
                                                 text_max_length=cfg.train.max_length, split=cfg.data.split)
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
    return RunEval(source=source, examples=with_reference, metrics=list(cfg.eval.metrics), settings=settings, text=text,
                   text_max_length=cfg.train.max_length, split=cfg.data.split)


def _held_out_text(cfg: Config) -> str | None:
    """A pretrain run's held-out text: data.test when it is plain text, else data.eval (checked now)."""
    from tunesmith.data.dataset import text_records

    if cfg.data.test:
        try:
            text_records(cfg.data.test, cfg.data.split)
            return cfg.data.test
        except TunesmithError:
            pass  # rows with prompts: answered and scored as for any other method
    if cfg.data.eval:
        text_records(cfg.data.eval, cfg.data.split)
        return cfg.data.eval
    return None


def _evaluate(model, tokenizer, run_eval: RunEval, label: str, spec: str) -> EvalResult:
    """One model on the plan: its answers to the rows and their scores, its perplexity on the held-out text."""
    from tunesmith.eval.evaluate import add_text_perplexity, evaluate

    if run_eval.examples:
        result = evaluate(model, tokenizer, run_eval.examples, metrics=run_eval.metrics, settings=run_eval.settings,
                          label=label, spec=spec, data=run_eval.source or "")
    else:
        result = EvalResult(label=label, spec=spec, data=run_eval.text or "", metrics={}, rows=[])
    if run_eval.text is not None:
        add_text_perplexity(result, model, tokenizer, run_eval.text, batch_size=run_eval.settings.batch_size,
                            max_length=run_eval.text_max_length, split=run_eval.split)
    return result


def evaluate_base(model, tokenizer, run_eval: RunEval, run_dir: Path, spec: str) -> EvalResult:
    """Evaluate the untrained model, or reuse the result a killed run already saved."""
    saved = run_dir / "report" / BASE_RESULT
    if saved.is_file():
        return EvalResult.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    result = _evaluate(model, tokenizer, run_eval, "base", spec)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    tmp.replace(saved)
    return result


def evaluate_tuned_and_report(
    model, tokenizer, run_eval: RunEval, run_dir: Path, base: EvalResult
) -> tuple[Path, str]:
    """Evaluate the trained model and write report.html beside results.json; returns (report, headline)."""
    from tunesmith.eval.report import headline, write_report

    tuned = _evaluate(model, tokenizer, run_eval, "tuned", str(run_dir))
    tuned.run_dir = str(run_dir)
    report = write_report([base, tuned], run_eval.examples, run_dir / "report", base_label="base",
                          title=f"{run_dir.name}: base vs tuned")
    return report, headline([base, tuned], "base")
