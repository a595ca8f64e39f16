"""The base-vs-tuned report: results.json with every number, PNG plots, and one self-contained report.html.

report.html opens offline and can be mailed as one file: CSS is inline, the plots are embedded as
base64 data URIs, and nothing is fetched (no fonts, scripts or links to other hosts). Every string
that came from the user (labels, paths, prompts, references, outputs) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.eval import plots
from tunesmith.eval.results import EvalExample, EvalResult, EvalRow
from tunesmith.eval.stats import bootstrap_ci, paired_delta_ci, paired_perplexity_delta_ci, perplexity_ci

CONFIDENCE = 0.95
NUM_BOOTSTRAP = 2000
SEED = 0  # one seed for every model: the same row scores give the same interval in any column
MAX_EXAMPLES = 200  # rows shown in report.html; results.json holds all of them
PERPLEXITY = "perplexity"
REWARD = "reward"  # reward-model scores of the generated answers (tunesmith.eval.score)
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


def compare_results(results: list[EvalResult], base_label: str = "base") -> Comparison:
    """Means, bootstrap intervals and paired deltas against the base, for every metric and perplexity."""
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    if base_label not in labels:
        raise ValueError(f"base model {base_label!r} is not among the results {labels}")
    by_label = {r.label: r for r in results}
    base = by_label[base_label]
    measures = [_metric_measure(name, results, base) for name in _metric_names(results)]
    if any(r.perplexity is not None for r in results):
        measures.append(_perplexity_measure(results, base))
    if any(REWARD in row.scores for r in results for row in r.rows):
        measures.append(_win_rate_measure(results, base))
    comparison = Comparison(
        base_label=base_label,
        labels=labels,
        measures=measures,
        num_rows=max((len(r.rows) for r in results), default=0),
        headline=[],
        disagreements=_disagreements(results),
    )
    comparison.headline = _headline_lines(comparison)
    return comparison


def headline(results: list[EvalResult], base_label: str = "base") -> str:
    """The headline numbers as console text: one sentence per model against the base."""
    return "\n".join(compare_results(results, base_label).headline)


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
            shared = sorted(set(scores) & set(base_scores))
            if shared:
                delta, dlo, dhi = paired_delta_ci(
                    [scores[k] for k in shared], [base_scores[k] for k in shared],
                    num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED,
                )
                score.delta, score.delta_lo, score.delta_hi = delta, dlo, dhi
                score.verdict = _verdict(dlo, dhi, higher_is_better=True)
        measure.scores[r.label] = score
    return measure


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
            verdict=_verdict(lo - 0.5, hi - 0.5, higher_is_better=True),
        )
    return measure


def _perplexity_measure(results: list[EvalResult], base: EvalResult) -> Measure:
    """Perplexity of the reference answers; intervals come from per-row losses when the rows carry them."""
    measure = Measure(name=PERPLEXITY, higher_is_better=False, percent=False)
    base_losses = _row_losses(base)
    for r in results:
        if r.perplexity is None or not math.isfinite(r.perplexity):
            continue
        score = ModelScore(value=float(r.perplexity), num_rows=len(r.rows))
        losses = _row_losses(r)
        if losses:
            score.lo, score.hi = perplexity_ci(
                [v[0] for v in losses.values()], [v[1] for v in losses.values()],
                num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED,
            )
        if r is not base and base.perplexity is not None and math.isfinite(base.perplexity):
            score.delta = score.value - float(base.perplexity)
            shared = sorted(set(losses) & set(base_losses))
            if shared:
                _, dlo, dhi = paired_perplexity_delta_ci(
                    [losses[k][0] for k in shared], [base_losses[k][0] for k in shared],
                    [losses[k][1] for k in shared], [base_losses[k][1] for k in shared],
                    num_samples=NUM_BOOTSTRAP, confidence=CONFIDENCE, seed=SEED,
                )
                score.delta_lo, score.delta_hi = dlo, dhi
                score.verdict = _verdict(dlo, dhi, higher_is_better=False)
            else:
                score.verdict = "better" if score.delta < 0 else "worse" if score.delta > 0 else "level"
        measure.scores[r.label] = score
    return measure


def _row_losses(result: EvalResult) -> dict[int, tuple[float, float]]:
    """Row index -> (mean token loss, token count) of each reference answer, where the rows carry them.

    evaluate() records one loss over all answer tokens, so today this is empty and perplexity has no
    interval; rows that gain `answer_loss` (mean over the answer's tokens) and `answer_tokens` get one.
    """
    out = {}
    for row in result.rows:
        loss, tokens = getattr(row, "answer_loss", None), getattr(row, "answer_tokens", None)
        if loss is None or not tokens or not math.isfinite(loss):
            return {}  # an interval from a subset of rows would describe other data
        out[row.index] = (float(loss), float(tokens))
    return out


def _verdict(lo: float, hi: float, *, higher_is_better: bool) -> str:
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


def _pretty(name: str) -> str:
    return name.replace("_", " ")


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
    primary = next((m for m in c.measures if m.name not in (PERPLEXITY, REWARD, WIN_RATE)), None)
    ppl = next((m for m in c.measures if m.name == PERPLEXITY), None)
    wins = next((m for m in c.measures if m.name == WIN_RATE), None)
    for label in c.labels:
        if label == c.base_label:
            continue
        parts = []
        if primary is not None and label in primary.scores and c.base_label in primary.scores:
            parts.append(_metric_sentence(primary, label, c.base_label))
        if ppl is not None and label in ppl.scores and c.base_label in ppl.scores:
            parts.append(_perplexity_sentence(ppl, label, c.base_label, alone=not parts))
        if wins is not None and label in wins.scores:
            w = wins.scores[label]
            parts.append(f"Judged by the reward model, {label}'s answer beats {c.base_label}'s on "
                         f"{_fmt_value(w.value, True)} of {w.num_rows} rows (95% CI "
                         f"{_fmt_interval(w.lo, w.hi, True, signed=False)}; ties count half).")
        if parts:
            lines.append(" ".join(parts))
    return lines or ["no comparable scores: the models share no metric with the base"]


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
    text = (f"Perplexity of the reference answers {_fmt_number(b.value)} -> {_fmt_number(s.value)} "
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
) -> Path:
    """Write results.json, the PNG plots and a self-contained report.html into out_dir; returns report.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare_results(results, base_label)
    payload = {
        "results": [r.to_dict() for r in results],
        "examples": [asdict(e) for e in examples],
        "comparison": _comparison_dict(comparison),
    }
    (out_dir / "results.json").write_text(
        json.dumps(_finite_or_none(payload), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    images = _write_plots(results, comparison, out_dir)
    page = _render_html(results, examples, comparison, images, title=title)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _comparison_dict(c: Comparison) -> dict[str, Any]:
    return {
        "base": c.base_label,
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
                    }
                    for label, s in m.scores.items()
                },
            }
            for m in c.measures
        },
        "disagreements": c.disagreements,
    }


def _finite_or_none(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers and other tools reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


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
        group = [m for m in c.measures if m.name != PERPLEXITY and m.percent == percent]
        if not group:
            continue
        name = "metrics.png" if percent else "metrics_other.png"
        bars = {m.name: {k: plots.Bar(s.value, s.lo, s.hi) for k, s in m.scores.items()} for m in group}
        path = plots.plot_metric_bars(bars, out_dir / name, colors=colors, percent=percent,
                                      title="Scores (higher is better)",
                                      ylabel="% of rows" if percent else "mean score")
        images["scores"].append(_Image(path, "bar chart of each metric per model",
                                       "Mean score per model; whiskers are 95% bootstrap intervals."))
    ppl = next((m for m in c.measures if m.name == PERPLEXITY), None)
    if ppl is not None and ppl.scores:
        bars = {PERPLEXITY: {k: plots.Bar(s.value, s.lo, s.hi) for k, s in ppl.scores.items()}}
        path = plots.plot_metric_bars(bars, out_dir / "perplexity.png", colors=colors,
                                      title="Perplexity (lower is better)",
                                      ylabel="perplexity")
        images["scores"].append(_Image(path, "bar chart of perplexity per model",
                                       "Perplexity of the reference answers; lower is better."))
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


_CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc;
        --win:#166534; --win-bg:#dcfce7; --loss:#991b1b; --loss-bg:#fee2e2; --mid-bg:#fef9c3; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p.meta, p.note, figcaption, .muted { color: var(--muted); font-size: 13.5px; }
p.note { margin: 4px 0 12px; max-width: 900px; }
.headline { background:#fff; border:1px solid var(--line); border-left: 6px solid var(--muted);
            border-radius: 8px; padding: 14px 18px; margin: 18px 0 8px; font-size: 17px; }
.headline.better { border-left-color: #16a34a; } .headline.worse { border-left-color: #dc2626; }
.headline p { margin: 4px 0; }
table { border-collapse: collapse; background:#fff; border:1px solid var(--line); }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background:#f1f5f9; font-size: 13px; text-transform: none; color:#334155; }
table.scores td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.scores .ci { display:block; color: var(--muted); font-size: 12px; }
.dir { display:block; color: var(--muted); font-size: 12px; font-weight: normal; }
td.better { background: var(--win-bg); color: var(--win); font-weight: 600; }
td.worse { background: var(--loss-bg); color: var(--loss); font-weight: 600; }
td.level { color: var(--muted); }
td.better .ci, td.worse .ci { color: inherit; font-weight: normal; opacity: .8; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; vertical-align: 0; }
figure { margin: 12px 0; display:inline-block; vertical-align: top; background:#fff; border:1px solid var(--line);
         border-radius: 8px; padding: 8px; max-width: 100%; }
figure img { display:block; max-width: 100%; height: auto; }
figcaption { padding: 4px 4px 0; max-width: 700px; }
table.examples { table-layout: fixed; width: 100%; }
table.examples td { font-size: 13px; }
div.prompt { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 16em; overflow: auto; }
pre { margin: 0; font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
      white-space: pre-wrap; overflow-wrap: anywhere; max-height: 16em; overflow: auto; }
td.out.win { background: #f0fdf4; box-shadow: inset 3px 0 0 #16a34a; }
td.out.loss { background: #fef2f2; box-shadow: inset 3px 0 0 #dc2626; }
td.out.mid { background: #fefce8; box-shadow: inset 3px 0 0 #ca8a04; }
.rowscores { margin-top: 6px; font-size: 12px; color: #475569; }
.rowscores .err { color: var(--loss); }
.badge { display:inline-block; margin-top: 4px; padding: 0 6px; border-radius: 9px; font-size: 11px;
         background:#e0e7ff; color:#3730a3; }
tr.sep td { background:#f1f5f9; color:#334155; font-weight:600; font-size: 13px; }
table.models td { font-size: 13.5px; } table.models code { overflow-wrap: anywhere; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
    tone = "better" if verdicts == {"better"} else "worse" if verdicts == {"worse"} else ""
    data = results[0].data if results else ""
    when = time.strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{len(c.labels)} models on the same {c.num_rows} rows of <code>{_e(data)}</code>'
        f"{_e(_settings_text(results))} &middot; written {_e(when)}</p>",
        f'<section class="headline {tone}" id="headline">'
        + "".join(f"<p>{_e(line)}</p>" for line in c.headline) + "</section>",
        _scores_section(c, colors),
    ]
    if images["scores"]:
        parts.append("<h2>Scores at a glance</h2>")
        parts += [_figure(img) for img in images["scores"]]
    if images["training"]:
        parts.append("<h2>Training</h2>")
        parts.append('<p class="note">Loss logged by the training run (metrics.jsonl): training loss per step, '
                     "and eval loss on held-out data when the run had it.</p>")
        parts += [_figure(img) for img in images["training"]]
    parts.append(_examples_section(results, examples, c, colors))
    parts.append(_models_section(results, colors))
    parts.append("<footer>Written by tunesmith. Every number on this page, and every row, is in "
                 "<code>results.json</code> beside this file.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _settings_text(results: list[EvalResult]) -> str:
    gen = results[0].generation if results else {}
    if not gen:
        return ""
    temperature = gen.get("temperature", 0)
    mode = "greedy decoding" if not temperature else f"sampling at temperature {temperature}"
    limit = gen.get("max_new_tokens")
    return f" · {mode}" + (f", at most {limit} new tokens" if limit else "")


def _scores_section(c: Comparison, colors: dict[str, str]) -> str:
    others = [k for k in c.labels if k != c.base_label]
    head = "".join(f"<th>{_swatch(colors[k])}{_e(k)}</th>" for k in c.labels)
    head += "".join(f"<th>&Delta; {_e(k)} &minus; {_e(c.base_label)}</th>" for k in others)
    body = []
    for m in c.measures:
        direction = "higher is better" if m.higher_is_better else "lower is better"
        arrow = "&uarr;" if m.higher_is_better else "&darr;"
        cells = [f'<th scope="row">{_e(_pretty(m.name))}<span class="dir">{arrow} {direction}</span></th>']
        for label in c.labels:
            s = m.scores.get(label)
            if s is None:
                cells.append('<td class="num muted">&mdash;</td>')
                continue
            ci = _fmt_interval(s.lo, s.hi, m.percent, signed=False)
            ci_html = f'<span class="ci">95% CI {_e(ci)}</span>' if ci else _NO_CI
            cells.append(f'<td class="num">{_e(_fmt_value(s.value, m.percent))}{ci_html}</td>')
        for label in others:
            s = m.scores.get(label)
            if s is None or s.delta is None:
                cells.append('<td class="num muted">&mdash;</td>')
                continue
            ci = _fmt_interval(s.delta_lo, s.delta_hi, m.percent, signed=True)
            ci_html = f'<span class="ci">95% CI {_e(ci)}</span>' if ci else _NO_CI
            verdict = s.verdict or "level"
            word = {"better": "better", "worse": "worse", "level": "within noise"}[verdict]
            cells.append(f'<td class="num {verdict}" title="{word}">{_e(_fmt_delta(s.delta, m.percent))}'
                         f"{ci_html}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        f"Mean over the rows each model was scored on. Intervals are {int(CONFIDENCE * 100)}% bootstrap "
        f"confidence intervals ({NUM_BOOTSTRAP} resamples of the rows); each &Delta; is paired by row. "
        "Green: the model is better than the base and the interval excludes zero; red: worse; grey: within noise. "
        "Percentages are shares of rows; deltas in points. Perplexity is that of the reference answers, "
        "lower is better."
    )
    if any(m.name == WIN_RATE for m in c.measures):
        note += (" Reward is the reward model's score of each generated answer; reward win rate is the share of "
                 "rows where it scores the model's answer above the base's (ties count half), and its &Delta; is "
                 "measured against an even 50%.")
    ppl = next((m for m in c.measures if m.name == PERPLEXITY), None)
    if ppl is not None and any(s.delta is not None and s.delta_lo is None for s in ppl.scores.values()):
        note += " Perplexity has no interval (the evaluation keeps one loss over all rows), so its colour shows " \
                "only the direction of the change."
    return (
        f'<h2>Scores</h2><p class="note">{note}</p>'
        f'<table class="scores" id="scores"><thead><tr><th>measure</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


_NO_CI = ('<span class="ci" title="the evaluation recorded one loss over all rows, not one per row, '
          'so there is nothing to resample">no interval</span>')


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{_e(color)}"></span>'


def _figure(img: _Image) -> str:
    return (f'<figure><img src="{_data_uri(img.path)}" alt="{_e(img.alt)}">'
            f"<figcaption>{_e(img.caption)}</figcaption></figure>")


def _examples_section(
    results: list[EvalResult], examples: list[EvalExample], c: Comparison, colors: dict[str, str]
) -> str:
    rows_by_model = [{row.index: row for row in r.rows} for r in results]
    by_index = {e.index: e for e in examples}
    indices = sorted({i for rows in rows_by_model for i in rows} | set(by_index))
    disagree = set(c.disagreements)
    ordered = [i for i in indices if i in disagree] + [i for i in indices if i not in disagree]
    shown = ordered[:MAX_EXAMPLES]
    primary = next((m.name for m in c.measures if m.name != PERPLEXITY), None)
    num_models = len(results)
    # Prompt and reference get fixed shares; the model columns split the rest evenly.
    model_share = 64 / max(num_models, 1) if num_models <= 2 else 70 / num_models
    cols = (
        '<col style="width:4.5em"><col style="width:20%"><col style="width:14%">'
        + "".join(f'<col style="width:{model_share:.1f}%">' for _ in results)
    )
    head = "<th>row</th><th>prompt</th><th>reference</th>" + "".join(
        f"<th>{_swatch(colors[r.label])}{_e(r.label)}</th>" for r in results
    )
    body = []
    num_cols = 3 + num_models
    for pos, i in enumerate(shown):
        if pos == 0 and i in disagree:
            body.append(f'<tr class="sep"><td colspan="{num_cols}">Rows where the models disagree '
                        f"({len(disagree)})</td></tr>")
        if i not in disagree and (pos == 0 or shown[pos - 1] in disagree):
            body.append(f'<tr class="sep"><td colspan="{num_cols}">Rows where the models agree '
                        f"({len(indices) - len(disagree)})</td></tr>")
        ex = by_index.get(i)
        prompt = ex.prompt if ex else ""
        reference = ex.reference if ex and ex.reference is not None else ""
        badge = '<span class="badge">differ</span>' if i in disagree else ""
        cells = [
            f'<td>{i}<br>{badge}</td>' if badge else f"<td>{i}</td>",
            f'<td><div class="prompt">{_e(prompt)}</div></td>',
            f"<td><pre>{_e(reference)}</pre></td>" if reference else '<td class="muted">none</td>',
        ]
        for rows in rows_by_model:
            cells.append(_output_cell(rows.get(i), primary))
        body.append(f'<tr data-row="{i}"' + (' class="disagree"' if i in disagree else "") + ">"
                    + "".join(cells) + "</tr>")
    shown_note = (
        f"Showing {len(shown)} of {len(indices)} rows. " if len(shown) < len(indices) else ""
    )
    note = (
        f"{shown_note}Rows where the models score differently come first. Each output cell shows the row's "
        "scores; its colour follows "
        + (f"<b>{_e(_pretty(primary))}</b>" if primary else "the first metric")
        + " (green: full score, red: zero). Every row is in results.json."
    )
    return (
        f'<h2>Examples side by side</h2><p class="note">{note}</p>'
        f'<table class="examples" id="examples"><colgroup>{cols}</colgroup>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _output_cell(row: EvalRow | None, primary: str | None) -> str:
    if row is None:
        return '<td class="muted">not evaluated</td>'
    score = row.scores.get(primary) if primary else None
    tone = ""
    if score is not None and math.isfinite(score):
        tone = " win" if score >= 1.0 else " loss" if score <= 0.0 else " mid"
    text = row.output if row.output is not None else ""
    if text.strip():
        out = f"<pre>{_e(text)}</pre>"
    else:  # a blank answer would be an empty, tall cell: say what it held instead
        out = f'<span class="muted">{_e(_describe_blank(text))}</span>'
    bits = []
    for name, value in row.scores.items():
        shown = "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"
        bits.append(f"{_e(_pretty(name))} {_e(shown)}")
    for name, message in row.errors.items():
        bits.append(f'<span class="err">{_e(_pretty(name))}: {_e(message)}</span>')
    scores = f'<div class="rowscores">{" &middot; ".join(bits)}</div>' if bits else ""
    return f'<td class="out{tone}">{out}{scores}</td>'


def _describe_blank(text: str) -> str:
    if not text:
        return "(empty answer)"
    breaks = text.count("\n")
    spaces = len(text) - breaks
    parts = [f"{breaks} line break{'s' if breaks != 1 else ''}"] if breaks else []
    parts += [f"{spaces} other whitespace character{'s' if spaces != 1 else ''}"] if spaces else []
    return f"(blank answer: {' and '.join(parts)})"


def _models_section(results: list[EvalResult], colors: dict[str, str]) -> str:
    rows = []
    for r in results:
        timing = r.timing or {}
        speed = []
        if timing.get("seconds") is not None:
            speed.append(f"{timing['seconds']:.1f} s")
        if timing.get("new_tokens_per_s") is not None:
            speed.append(f"{timing['new_tokens_per_s']:.1f} new tokens/s")
        rows.append(
            f"<tr><td>{_swatch(colors[r.label])}{_e(r.label)}</td><td><code>{_e(r.spec)}</code></td>"
            f"<td>{'<code>' + _e(r.run_dir) + '</code>' if r.run_dir else '&mdash;'}</td>"
            f"<td>{_e(', '.join(speed)) or '&mdash;'}</td></tr>"
        )
    return (
        '<h2>Models</h2><table class="models" id="models"><thead><tr><th>label</th><th>loaded from</th>'
        f"<th>training run</th><th>generation time</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
