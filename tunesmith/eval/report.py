"""The base-vs-tuned report: results.json with every number, PNG plots, and one self-contained report.html.

report.html opens offline and can be mailed as one file: CSS is inline, the plots are embedded as
base64 data URIs, and nothing is fetched (no fonts, scripts or links to other hosts). The page is
templates/report.html.j2, rendered with autoescape: every string that came from the user (labels,
paths, prompts, references, outputs) is HTML-escaped. This module computes the numbers and formats
them; the template only lays them out.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from tunesmith.data.examples import EvalExample
from tunesmith.eval import plots
from tunesmith.eval.results import REWARD, EvalResult, EvalRow, write_results
from tunesmith.eval.stats import bootstrap_ci, paired_delta_ci, paired_perplexity_delta_ci, perplexity_ci

CONFIDENCE = 0.95
NUM_BOOTSTRAP = 2000
SEED = 0  # one seed for every model: the same row scores give the same interval in any column
MAX_EXAMPLES = 200  # rows shown in report.html; results.json holds all of them
PERPLEXITY = "perplexity"
TEXT_PERPLEXITY = "text_perplexity"  # of held-out plain text (compare --text): what continued pretraining lowers
PERPLEXITIES = (PERPLEXITY, TEXT_PERPLEXITY)
WIN_RATE = "reward_win_rate"  # share of rows where the reward model prefers a model's answer to the base's


# ---------------------------------------------------------------- the numbers


@dataclass
class ModelScore:
    """One model's value of one measure, with its interval and its difference from the base."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    num_rows: int = 0
    delta: float | None = None  # model - base, over the rows both were scored on
    delta_lo: float | None = None
    delta_hi: float | None = None
    verdict: str | None = None  # "better" | "worse" | "level" (interval of the delta holds 0)
    # In a chain of stages: the difference from the model before this one, over the rows both were scored on
    previous: str | None = None
    step_delta: float | None = None
    step_lo: float | None = None
    step_hi: float | None = None
    step_verdict: str | None = None


@dataclass
class Measure:
    """One row of the scores table: a metric, or perplexity."""

    name: str
    higher_is_better: bool
    percent: bool  # every row score is in [0, 1]: shown as a percentage, deltas in points
    scores: dict[str, ModelScore] = field(default_factory=dict)  # label -> score


@dataclass
class Comparison:
    """Everything the report says, computed once from the results."""

    base_label: str
    labels: list[str]
    measures: list[Measure]
    num_rows: int
    headline: list[str]
    disagreements: list[int]  # row indices where the models' scores differ
    chain: bool = False  # the models are stages in order: each is also compared with the one before it


def compare_results(results: list[EvalResult], base_label: str = "base", *, chain: bool = False) -> Comparison:
    """Means, bootstrap intervals and paired deltas against the base, for every metric and perplexity.

    With `chain`, the results are stages in order (base -> stage 1 -> stage 2 ...): every model after the
    base also gets its paired delta against the model just before it, and the headline says what each stage added.
    """
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    if base_label not in labels:
        raise ValueError(f"base model {base_label!r} is not among the results {labels}")
    if chain and labels[0] != base_label:
        raise ValueError(f"a chain starts at its base: {base_label!r} must come first, got {labels}")
    by_label = {r.label: r for r in results}
    base = by_label[base_label]
    measures = [_metric_measure(name, results, base) for name in _metric_names(results)]
    for name in PERPLEXITIES:
        if any(_perplexity_value(r, name) is not None for r in results):
            measures.append(_perplexity_measure(results, base, name))
    if any(REWARD in row.scores for r in results for row in r.rows):
        measures.append(_win_rate_measure(results, base))
    comparison = Comparison(
        base_label=base_label,
        labels=labels,
        measures=measures,
        num_rows=max((len(r.rows) for r in results), default=0),
        headline=[],
        disagreements=_disagreements(results),
        chain=chain,
    )
    if chain:
        _add_steps(comparison, results)
    comparison.headline = _chain_headline_lines(comparison) if chain else _headline_lines(comparison)
    return comparison


def headline(results: list[EvalResult], base_label: str = "base", *, chain: bool = False) -> str:
    """The headline numbers as console text: one sentence per model against the base (per stage, in a chain)."""
    return "\n".join(compare_results(results, base_label, chain=chain).headline)


def _metric_names(results: list[EvalResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        for name in list(r.metrics) + [k for row in r.rows for k in row.scores]:
            if name not in names:
                names.append(name)
    return names


def _row_scores(result: EvalResult, name: str) -> dict[int, float]:
    """Row index -> score, for the rows where the metric was computed."""
    out = {}
    for row in result.rows:
        value = row.scores.get(name)
        if value is not None and math.isfinite(value):
            out[row.index] = float(value)
    return out


def _metric_measure(name: str, results: list[EvalResult], base: EvalResult) -> Measure:
    per_model = {r.label: _row_scores(r, name) for r in results}
    all_scores = [v for scores in per_model.values() for v in scores.values()]
    # a reward model's raw scores are not shares of rows, even when they happen to fall in [0, 1]
    percent = name != REWARD and all(0.0 <= v <= 1.0 for v in all_scores)
    measure = Measure(name=name, higher_is_better=True, percent=percent)
    base_scores = per_model[base.label]
    for r in results:
        scores = per_model[r.label]
        if name in r.metrics and r.metrics[name] is not None:
            value = float(r.metrics[name])
        elif scores:
            value = sum(scores.values()) / len(scores)
        else:
            continue  # this model was not scored on the metric
        lo, hi = bootstrap_ci(list(scores.values()), num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED)
        score = ModelScore(value=value, lo=lo, hi=hi, num_rows=len(scores))
        if r is not base:
            paired = _paired_scores(scores, base_scores)
            if paired is not None:
                score.delta, score.delta_lo, score.delta_hi, score.verdict = paired
        measure.scores[r.label] = score
    return measure


def _paired_scores(scores: dict[int, float], other: dict[int, float]) -> tuple[float, float, float, str] | None:
    """Mean of scores - other over the rows both hold, its paired interval and verdict; None when no row is shared."""
    shared = sorted(set(scores) & set(other))
    if not shared:
        return None
    delta, lo, hi = paired_delta_ci([scores[k] for k in shared], [other[k] for k in shared],
                                    num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED)
    return delta, lo, hi, verdict(lo, hi, higher_is_better=True)


def _paired_perplexity(losses: dict[int, tuple[float, float]], other: dict[int, tuple[float, float]]
                       ) -> tuple[float, float, float, str] | None:
    """Perplexity of `losses` minus that of `other` on the rows both hold, with its paired interval and verdict."""
    shared = sorted(set(losses) & set(other))
    if not shared:
        return None
    delta, lo, hi = paired_perplexity_delta_ci(
        [losses[k][0] for k in shared], [other[k][0] for k in shared],
        [losses[k][1] for k in shared], [other[k][1] for k in shared],
        num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED,
    )
    return delta, lo, hi, verdict(lo, hi, higher_is_better=False)


def _add_steps(c: Comparison, results: list[EvalResult]) -> None:
    """Each stage's paired change from the stage before it, on every metric and on perplexity.

    The reward win rate is measured against the base only (it is a share of wins over the base's answers).
    """
    for prev, r in zip(results, results[1:]):
        for m in c.measures:
            s = m.scores.get(r.label)
            if s is None or m.name == WIN_RATE:
                continue
            s.previous = prev.label
            if m.name in PERPLEXITIES:
                before = m.scores.get(prev.label)
                if before is None:
                    continue
                losses_of = _LOSSES[m.name]
                paired = _paired_perplexity(losses_of(r), losses_of(prev))
                if paired is None:  # no per-row losses: the change, without an interval
                    s.step_delta = s.value - before.value
                    s.step_verdict = "better" if s.step_delta < 0 else "worse" if s.step_delta > 0 else "level"
                    continue
            else:
                paired = _paired_scores(_row_scores(r, m.name), _row_scores(prev, m.name))
                if paired is None:
                    continue
            s.step_delta, s.step_lo, s.step_hi, s.step_verdict = paired


def _win_rate_measure(results: list[EvalResult], base: EvalResult) -> Measure:
    """Per row, 1 when the reward model scores a model's answer above the base's, 0.5 on a tie, else 0.

    Its "delta" is against an even split (0.5), so the verdict says whether the model wins more often than not.
    """
    measure = Measure(name=WIN_RATE, higher_is_better=True, percent=True)
    base_scores = _row_scores(base, REWARD)
    for r in results:
        if r is base:
            continue
        scores = _row_scores(r, REWARD)
        shared = sorted(set(scores) & set(base_scores))
        if not shared:
            continue
        wins = [1.0 if scores[k] > base_scores[k] else 0.5 if scores[k] == base_scores[k] else 0.0 for k in shared]
        lo, hi = bootstrap_ci(wins, num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED)
        value = sum(wins) / len(wins)
        measure.scores[r.label] = ModelScore(
            value=value, lo=lo, hi=hi, num_rows=len(wins), delta=value - 0.5, delta_lo=lo - 0.5, delta_hi=hi - 0.5,
            verdict=verdict(lo - 0.5, hi - 0.5, higher_is_better=True),
        )
    return measure


def _perplexity_value(result: EvalResult, name: str) -> float | None:
    """The result's perplexity of the reference answers (PERPLEXITY) or of the held-out text (TEXT_PERPLEXITY)."""
    value = result.perplexity if name == PERPLEXITY else result.text_perplexity
    return None if value is None or not math.isfinite(value) else float(value)


def _perplexity_measure(results: list[EvalResult], base: EvalResult, name: str = PERPLEXITY) -> Measure:
    """Perplexity of the reference answers, or of the held-out text; intervals come from per-row (per-document)
    losses when the results carry them, paired by row."""
    measure = Measure(name=name, higher_is_better=False, percent=False)
    losses_of = _LOSSES[name]
    base_losses = losses_of(base)
    base_value = _perplexity_value(base, name)
    for r in results:
        value = _perplexity_value(r, name)
        if value is None:
            continue
        losses = losses_of(r)
        score = ModelScore(value=value, num_rows=len(losses) or len(r.rows))
        if losses:
            score.lo, score.hi = perplexity_ci(
                [v[0] for v in losses.values()], [v[1] for v in losses.values()],
                num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED,
            )
        if r is not base and base_value is not None:
            score.delta = score.value - base_value
            paired = _paired_perplexity(losses, base_losses)
            if paired is not None:
                _, score.delta_lo, score.delta_hi, score.verdict = paired
            else:
                score.verdict = "better" if score.delta < 0 else "worse" if score.delta > 0 else "level"
        measure.scores[r.label] = score
    return measure


def _row_losses(result: EvalResult) -> dict[int, tuple[float, float]]:
    """Row index -> (mean token loss, token count) of each reference answer behind the perplexity.

    Rows without a reference carry no loss and are not part of the perplexity. Empty when no row carries
    one (results saved before evaluate() recorded them) or when a loss is not finite: no interval then.
    """
    out = {}
    for row in result.rows:
        if row.answer_loss is None or not row.answer_tokens:
            continue
        if not math.isfinite(row.answer_loss):
            return {}
        out[row.index] = (float(row.answer_loss), float(row.answer_tokens))
    return out


def _text_losses(result: EvalResult) -> dict[int, tuple[float, float]]:
    """Document index -> (mean token loss, token count) of the held-out text; empty when one is not finite."""
    out = {}
    for k, (loss, tokens) in enumerate(result.text_losses):
        if not tokens:
            continue
        if not math.isfinite(loss):
            return {}
        out[k] = (float(loss), float(tokens))
    return out


_LOSSES = {PERPLEXITY: _row_losses, TEXT_PERPLEXITY: _text_losses}


def verdict(lo: float, hi: float, *, higher_is_better: bool) -> str:
    """"better" or "worse" when the interval of a change excludes zero, else "level"."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0 <= hi:
        return "level"
    improved = lo > 0 if higher_is_better else hi < 0
    return "better" if improved else "worse"


def _disagreements(results: list[EvalResult]) -> list[int]:
    """Indices of rows where the models got different scores on some metric."""
    rows = [{row.index: row for row in r.rows} for r in results]
    indices = sorted({i for by_index in rows for i in by_index})
    out = []
    for i in indices:
        names = {k for by_index in rows if i in by_index for k in by_index[i].scores}
        for name in names:
            values = {_score_key(by_index[i].scores.get(name)) if i in by_index else None for by_index in rows}
            if len(values) > 1:
                out.append(i)
                break
    return out


def _score_key(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 9)


# ---------------------------------------------------------------- words and numbers


_PERPLEXITY_OF = {PERPLEXITY: "Perplexity of the reference answers", TEXT_PERPLEXITY: "Perplexity of the held-out text"}


def _pretty(name: str) -> str:
    return "held-out text perplexity" if name == TEXT_PERPLEXITY else name.replace("_", " ")


def _fmt_value(value: float, percent: bool) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else _fmt_number(value)


def _fmt_number(value: float) -> str:
    """Two decimals for small numbers, one for large: 1.46, 14.2, 508.9."""
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _fmt_delta(value: float | None, percent: bool) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:+.1f} points" if percent else ("+" if value >= 0 else "") + _fmt_number(value)


def _fmt_interval(lo: float | None, hi: float | None, percent: bool, *, signed: bool) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    scale = 100.0 if percent else 1.0
    fmt = ("{:+.1f}" if signed else "{:.1f}") if percent else ("{:+.4g}" if signed else "{:.4g}")
    return f"{fmt.format(lo * scale)} to {fmt.format(hi * scale)}"


def _headline_lines(c: Comparison) -> list[str]:
    lines = []
    primary = next((m for m in c.measures if m.name not in (*PERPLEXITIES, REWARD, WIN_RATE)), None)
    ppls = [m for m in c.measures if m.name in PERPLEXITIES]
    wins = next((m for m in c.measures if m.name == WIN_RATE), None)
    for label in c.labels:
        if label == c.base_label:
            continue
        parts = []
        if primary is not None and label in primary.scores and c.base_label in primary.scores:
            parts.append(_metric_sentence(primary, label, c.base_label))
        for ppl in ppls:
            if label in ppl.scores and c.base_label in ppl.scores:
                parts.append(_perplexity_sentence(ppl, label, c.base_label, alone=not parts))
        if wins is not None and label in wins.scores:
            w = wins.scores[label]
            parts.append(f"Judged by the reward model, {label}'s answer beats {c.base_label}'s on "
                         f"{_fmt_value(w.value, True)} of {w.num_rows} rows (95% CI "
                         f"{_fmt_interval(w.lo, w.hi, True, signed=False)}; ties count half).")
        if parts:
            lines.append(" ".join(parts))
    return lines or ["no comparable scores: the models share no metric with the base"]


def _chain_headline_lines(c: Comparison) -> list[str]:
    """One line per stage: what it added to the stage before it; then the last stage against the base."""
    primary = next((m for m in c.measures if m.name not in (*PERPLEXITIES, REWARD, WIN_RATE)), None)
    ppls = [m for m in c.measures if m.name in PERPLEXITIES]
    lines = []
    for label in c.labels[1:]:
        parts = []
        if primary is not None and label in primary.scores:
            parts.append(_step_sentence(primary, label))
        for ppl in ppls:
            if label in ppl.scores and ppl.scores[label].previous in ppl.scores:
                parts.append(_step_perplexity_sentence(ppl, label))
        if parts:
            lines.append(" ".join(p for p in parts if p))
    if len(c.labels) > 2:  # the whole chain at once; with one stage its line above says it already
        last = c.labels[-1]
        if primary is not None and last in primary.scores and c.base_label in primary.scores:
            lines.append(f"Overall: {_metric_sentence(primary, last, c.base_label)}")
    return lines or ["no comparable scores: the stages share no metric"]


def _step_sentence(m: Measure, label: str) -> str:
    """What stage `label` did to measure `m` compared with the stage before it."""
    s = m.scores[label]
    prev = s.previous
    if prev is None or prev not in m.scores or s.step_delta is None:
        return ""
    p = m.scores[prev]
    name = _pretty(m.name)
    ci = _fmt_interval(s.step_lo, s.step_hi, m.percent, signed=True)
    ci = f" (95% CI {ci})" if ci else ""
    delta = _fmt_delta(s.step_delta, m.percent)
    both = f"{_fmt_value(p.value, m.percent)} -> {_fmt_value(s.value, m.percent)}"
    if s.step_delta == 0 and s.step_lo == 0 and s.step_hi == 0:
        return f"{label} changed nothing on {name} after {prev}: {both}, the same on every row."
    if s.step_verdict == "better":
        return f"{label} added {delta} on {name} to {prev}{ci}: {both}."
    if s.step_verdict == "worse":
        return f"{label} lost {delta} on {name} from {prev}{ci}: {both}."
    return f"{label} did not change {name} beyond noise after {prev}: {delta}{ci}, {both}."


def _step_perplexity_sentence(m: Measure, label: str) -> str:
    s = m.scores[label]
    p = m.scores[s.previous]
    ci = _fmt_interval(s.step_lo, s.step_hi, False, signed=True)
    ci = f", 95% CI of the change {ci}" if ci else ""
    word = {"better": "down", "worse": "up"}.get(s.step_verdict or "level", "level within noise")
    return (f"{_PERPLEXITY_OF[m.name]} {word}: {_fmt_number(p.value)} -> {_fmt_number(s.value)} "
            f"(lower is better{ci}).")


def _metric_sentence(m: Measure, label: str, base_label: str) -> str:
    s, b = m.scores[label], m.scores[base_label]
    ci = _fmt_interval(s.delta_lo, s.delta_hi, m.percent, signed=True)
    ci = f" (95% CI {ci})" if ci else ""
    name = _pretty(m.name)
    delta = _fmt_delta(s.delta, m.percent)
    both = f"{_fmt_value(s.value, m.percent)} vs {_fmt_value(b.value, m.percent)} on {s.num_rows} rows"
    if s.delta == 0 and s.delta_lo == 0 and s.delta_hi == 0:  # every paired difference is zero
        return f"{label} and {base_label} score the same on {name} on every row: {both}."
    if s.verdict == "better":
        return f"{label} beats {base_label} on {name} by {delta}{ci}: {both}."
    if s.verdict == "worse":
        return f"{label} is worse than {base_label} on {name} by {delta}{ci}: {both}."
    return f"{label} and {base_label} are level on {name} within noise: {delta}{ci}, {both}."


def _perplexity_sentence(m: Measure, label: str, base_label: str, *, alone: bool) -> str:
    s, b = m.scores[label], m.scores[base_label]
    ci = _fmt_interval(s.delta_lo, s.delta_hi, False, signed=True)
    ci = f", 95% CI of the change {ci}" if ci else ""
    text = (f"{_PERPLEXITY_OF[m.name]} {_fmt_number(b.value)} -> {_fmt_number(s.value)} "
            f"(lower is better{ci}).")
    return f"{label} vs {base_label}: {text}" if alone else text


# ---------------------------------------------------------------- files


def write_report(
    results: list[EvalResult],
    examples: list[EvalExample],
    out_dir: Path,
    *,
    base_label: str = "base",
    title: str = "Base vs tuned",
    chain: bool = False,
) -> Path:
    """Write results.json, the PNG plots and a self-contained report.html into out_dir; returns report.html.

    With `chain`, the results are stages in order from the base, and every stage is also compared with the one
    before it (`compare_results`).

    The files are written aside and moved in together: a failed write (a full disk) leaves the previous report whole.
    """
    from tunesmith.model.export import atomic_files

    out_dir = Path(out_dir)
    comparison = compare_results(results, base_label, chain=chain)
    with atomic_files(out_dir, "the report into") as tmp:
        write_results(tmp, results, examples, _comparison_dict(comparison))
        images = _write_plots(results, comparison, tmp)
        page = _render_html(results, examples, comparison, images, title=title)
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return out_dir / "report.html"


def _comparison_dict(c: Comparison) -> dict[str, Any]:
    return {
        "base": c.base_label,
        "chain": c.chain,
        "confidence": CONFIDENCE,
        "bootstrap_samples": NUM_BOOTSTRAP,
        "headline": c.headline,
        "measures": {
            m.name: {
                "higher_is_better": m.higher_is_better,
                "unit": "fraction" if m.percent else "value",
                "models": {
                    label: {
                        "value": s.value,
                        "ci": [s.lo, s.hi],
                        "num_rows": s.num_rows,
                        **({} if s.delta is None else {
                            "delta": s.delta, "delta_ci": [s.delta_lo, s.delta_hi], "verdict": s.verdict,
                        }),
                        **({} if s.step_delta is None else {
                            "previous": s.previous, "step_delta": s.step_delta,
                            "step_delta_ci": [s.step_lo, s.step_hi], "step_verdict": s.step_verdict,
                        }),
                    }
                    for label, s in m.scores.items()
                },
            }
            for m in c.measures
        },
        "disagreements": c.disagreements,
    }


@dataclass
class _Image:
    path: Path
    alt: str
    caption: str


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "model"


def _write_plots(results: list[EvalResult], c: Comparison, out_dir: Path) -> dict[str, list[_Image]]:
    colors = plots.model_colors(c.labels, c.base_label)
    images: dict[str, list[_Image]] = {"scores": [], "training": []}
    for percent in (True, False):
        group = [m for m in c.measures if m.name not in PERPLEXITIES and m.percent == percent]
        if not group:
            continue
        name = "metrics.png" if percent else "metrics_other.png"
        bars = {m.name: {k: plots.Bar(s.value, s.lo, s.hi) for k, s in m.scores.items()} for m in group}
        path = plots.plot_metric_bars(bars, out_dir / name, colors=colors, percent=percent,
                                      title="Scores (higher is better)",
                                      ylabel="% of rows" if percent else "mean score")
        images["scores"].append(_Image(path, "bar chart of each metric per model",
                                       "Mean score per model; whiskers are 95% bootstrap intervals."))
    for ppl in (m for m in c.measures if m.name in PERPLEXITIES and m.scores):
        bars = {ppl.name: {k: plots.Bar(s.value, s.lo, s.hi) for k, s in ppl.scores.items()}}
        what = _PERPLEXITY_OF[ppl.name]
        short = "Held-out text" if ppl.name == TEXT_PERPLEXITY else "Perplexity"
        path = plots.plot_metric_bars(bars, out_dir / f"{ppl.name}.png", colors=colors,
                                      title=f"{short} (lower is better)", ylabel="perplexity")
        images["scores"].append(_Image(path, f"bar chart of {what.lower()} per model",
                                       f"{what}; lower is better. Whiskers are 95% bootstrap intervals."))
    used: set[str] = set()
    for r in results:
        if not r.run_dir:
            continue
        curves = plots.read_loss_curves(r.run_dir)
        if not curves:
            continue
        slug = _slug(r.label)
        while slug in used:
            slug += "_"
        used.add(slug)
        path = plots.plot_loss_curves(curves, out_dir / f"loss_{slug}.png", color=colors[r.label],
                                      title=f"{r.label}: training loss")
        last = []
        if curves.train_loss:
            last.append(f"final train loss {curves.train_loss[-1]:.4g} at step {curves.train_steps[-1]}")
        if curves.eval_loss:
            last.append(f"final eval loss {curves.eval_loss[-1]:.4g}")
        images["training"].append(_Image(path, f"loss curves of {r.label}",
                                         f"{r.label} — run folder {r.run_dir}; " + ", ".join(last)))
    return images


# ---------------------------------------------------------------- HTML

TEMPLATE = "report.html.j2"  # in templates/ beside this file


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,  # every value is text: user strings never become markup
        undefined=jinja2.StrictUndefined,  # a misspelt name fails instead of rendering as nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html(
    results: list[EvalResult],
    examples: list[EvalExample],
    c: Comparison,
    images: dict[str, list[_Image]],
    *,
    title: str,
) -> str:
    """The report page as one HTML string (no external resources)."""
    colors = plots.model_colors(c.labels, c.base_label)
    verdicts = {m.scores[k].verdict for m in c.measures[:1] for k in m.scores if k != c.base_label}
    if c.chain:  # the tone follows what every stage added
        verdicts = {m.scores[k].step_verdict for m in c.measures[:1] for k in m.scores if k != c.base_label}
    page = _environment().get_template(TEMPLATE).render(
        title=title,
        num_models=len(c.labels),
        num_rows=c.num_rows,
        data=results[0].data if results else "",
        text=_text_note(results),
        settings=_settings_text(results),
        when=time.strftime("%Y-%m-%d %H:%M"),
        tone="better" if verdicts == {"better"} else "worse" if verdicts == {"worse"} else "",
        headline=c.headline,
        chain=c.chain,
        columns=[{"label": k, "color": colors[k]} for k in c.labels],
        scores=_scores_table(c),
        images={group: [{"src": _data_uri(img.path), "alt": img.alt, "caption": img.caption} for img in imgs]
                for group, imgs in images.items()},
        examples=_examples_table(results, examples, c),
        models=[_model_row(r, colors) for r in results],
    )
    # markupsafe writes a double quote as &#34;; the report has always used the named entity
    return page.replace("&#34;", "&quot;")


def _text_note(results: list[EvalResult]) -> dict[str, Any] | None:
    """The held-out text the perplexity row was measured on (compare --text), and its number of documents."""
    measured = [r for r in results if r.text_data]
    if not measured:
        return None
    return {"source": measured[0].text_data, "num_docs": max(len(r.text_losses) for r in measured)}


def _settings_text(results: list[EvalResult]) -> str:
    gen = results[0].generation if results else {}
    if not gen:
        return ""
    temperature = gen.get("temperature", 0)
    mode = "greedy decoding" if not temperature else f"sampling at temperature {temperature}"
    limit = gen.get("max_new_tokens")
    return f" · {mode}" + (f", at most {limit} new tokens" if limit else "")


def _delta_columns(c: Comparison) -> list[tuple[str, str, str]]:
    """(label, against, kind) of each delta column: against the base; in a chain, each stage against the one
    before it first, then each stage after the first against the base (the first's is its step already)."""
    others = [k for k in c.labels if k != c.base_label]
    if not c.chain:
        return [(k, c.base_label, "base") for k in others]
    steps = [(k, prev, "step") for prev, k in zip(c.labels, c.labels[1:])]
    return steps + [(k, c.base_label, "base") for k in others[1:]]


def _delta_cell(s: ModelScore | None, kind: str, percent: bool) -> dict[str, str] | None:
    if s is None:
        return None
    if kind == "step":
        delta, lo, hi, word = s.step_delta, s.step_lo, s.step_hi, s.step_verdict
    else:
        delta, lo, hi, word = s.delta, s.delta_lo, s.delta_hi, s.verdict
    if delta is None:
        return None
    word = word or "level"
    return {
        "text": _fmt_delta(delta, percent),
        "ci": _fmt_interval(lo, hi, percent, signed=True),
        "verdict": word,
        "word": {"better": "better", "worse": "worse", "level": "within noise"}[word],
    }


def _scores_table(c: Comparison) -> dict[str, Any]:
    """The rows of the scores table: each measure's formatted values and deltas, in column order."""
    columns = _delta_columns(c)
    rows = []
    for m in c.measures:
        cells: list[dict[str, str] | None] = []
        for label in c.labels:
            s = m.scores.get(label)
            cells.append(None if s is None else {
                "text": _fmt_value(s.value, m.percent),
                "ci": _fmt_interval(s.lo, s.hi, m.percent, signed=False),
            })
        deltas = [_delta_cell(m.scores.get(label), kind, m.percent) for label, _, kind in columns]
        rows.append({"name": _pretty(m.name), "higher_is_better": m.higher_is_better, "cells": cells,
                     "deltas": deltas})
    ppl = next((m for m in c.measures if m.name == PERPLEXITY), None)
    return {
        "rows": rows,
        "deltas": [{"label": label, "against": against, "step": kind == "step"} for label, against, kind in columns],
        "confidence": int(CONFIDENCE * 100),
        "num_bootstrap": NUM_BOOTSTRAP,
        "win_rate": any(m.name == WIN_RATE for m in c.measures),
        "answer_perplexity": ppl is not None,
        "perplexity_without_interval": ppl is not None and any(
            s.delta is not None and s.delta_lo is None for s in ppl.scores.values()
        ),
    }


def _examples_table(results: list[EvalResult], examples: list[EvalExample], c: Comparison) -> dict[str, Any]:
    """The rows of the examples table: disagreeing rows first, each with every model's output cell."""
    rows_by_model = [{row.index: row for row in r.rows} for r in results]
    by_index = {e.index: e for e in examples}
    indices = sorted({i for rows in rows_by_model for i in rows} | set(by_index))
    disagree = set(c.disagreements)
    ordered = [i for i in indices if i in disagree] + [i for i in indices if i not in disagree]
    shown = ordered[:MAX_EXAMPLES]
    primary = next((m.name for m in c.measures if m.name not in PERPLEXITIES), None)
    num_models = len(results)
    # Prompt and reference get fixed shares; the model columns split the rest evenly.
    model_share = 64 / max(num_models, 1) if num_models <= 2 else 70 / num_models
    rows: list[dict[str, Any]] = []
    for pos, i in enumerate(shown):
        if pos == 0 and i in disagree:
            rows.append({"separator": f"Rows where the models disagree ({len(disagree)})"})
        if i not in disagree and (pos == 0 or shown[pos - 1] in disagree):
            rows.append({"separator": f"Rows where the models agree ({len(indices) - len(disagree)})"})
        ex = by_index.get(i)
        rows.append({
            "separator": None,
            "index": i,
            "differ": i in disagree,
            "prompt": ex.prompt if ex else "",
            "reference": ex.reference if ex and ex.reference is not None else "",
            "outputs": [_output_cell(by_model.get(i), primary) for by_model in rows_by_model],
        })
    return {
        "rows": rows,
        "num_shown": len(shown),
        "num_rows": len(indices),
        "primary": _pretty(primary) if primary else None,
        "model_share": f"{model_share:.1f}",
    }


def _output_cell(row: EvalRow | None, primary: str | None) -> dict[str, Any] | None:
    """One model's answer on one row, its scores and errors, and the tone of its score on `primary`."""
    if row is None:
        return None
    score = row.scores.get(primary) if primary else None
    tone = ""
    if score is not None and math.isfinite(score):
        tone = "win" if score >= 1.0 else "loss" if score <= 0.0 else "mid"
    text = row.output if row.output is not None else ""
    bits = []
    for name, value in row.scores.items():
        shown = "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"
        bits.append({"text": f"{_pretty(name)} {shown}", "error": False})
    for name, message in row.errors.items():
        bits.append({"text": f"{_pretty(name)}: {message}", "error": True})
    return {
        "tone": tone,
        "text": text,
        # a blank answer would be an empty, tall cell: say what it held instead
        "blank": None if text.strip() else _describe_blank(text),
        "scores": bits,
    }


def _describe_blank(text: str) -> str:
    if not text:
        return "(empty answer)"
    breaks = text.count("\n")
    spaces = len(text) - breaks
    parts = [f"{breaks} line break{'s' if breaks != 1 else ''}"] if breaks else []
    parts += [f"{spaces} other whitespace character{'s' if spaces != 1 else ''}"] if spaces else []
    return f"(blank answer: {' and '.join(parts)})"


def _model_row(r: EvalResult, colors: dict[str, str]) -> dict[str, Any]:
    """One row of the models table: where the model came from and how fast it generated."""
    timing = r.timing or {}
    speed = []
    if timing.get("seconds") is not None:
        speed.append(f"{timing['seconds']:.1f} s")
    if timing.get("new_tokens_per_s") is not None:
        speed.append(f"{timing['new_tokens_per_s']:.1f} new tokens/s")
    return {"label": r.label, "color": colors[r.label], "spec": r.spec, "run_dir": r.run_dir,
            "speed": ", ".join(speed)}
