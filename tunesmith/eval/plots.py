"""The report's pictures: metric bars with confidence intervals, and training loss curves. PNG files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

BASE_COLOR = "#8a8f98"
MODEL_COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04"]
_DPI = 110


def model_colors(labels: list[str], base_label: str) -> dict[str, str]:
    """One colour per model, the same in every plot and table: grey for the base."""
    colors: dict[str, str] = {}
    others = iter(MODEL_COLORS * (1 + len(labels) // len(MODEL_COLORS)))
    for label in labels:
        colors[label] = BASE_COLOR if label == base_label else next(others)
    return colors


@dataclass
class Bar:
    """One bar: a model's value of one metric, with its interval."""

    value: float
    lo: float = math.nan
    hi: float = math.nan


def plot_metric_bars(
    bars: dict[str, dict[str, Bar]],
    path: Path,
    *,
    colors: dict[str, str],
    title: str,
    ylabel: str,
    percent: bool = False,
) -> Path:
    """Grouped bars, one group per metric (bars[metric][model]), with CI error bars; writes a PNG."""
    metric_names = list(bars)
    labels = list(colors)
    num_models = len(labels)
    width = 0.8 / max(num_models, 1)
    # Width grows with the number of bars, so one bar is never a wide slab and many never crowd.
    fig, ax = plt.subplots(figsize=(min(11.0, 2.2 + 0.75 * len(metric_names) * max(num_models, 2)), 3.6))
    scale = 100.0 if percent else 1.0
    for j, label in enumerate(labels):
        xs, ys, err_lo, err_hi = [], [], [], []
        for i, metric in enumerate(metric_names):
            bar = bars[metric].get(label)
            if bar is None or not math.isfinite(bar.value):
                continue
            xs.append(i + (j - (num_models - 1) / 2) * width)
            ys.append(bar.value * scale)
            has_ci = math.isfinite(bar.lo) and math.isfinite(bar.hi)
            err_lo.append(max(0.0, (bar.value - bar.lo) * scale) if has_ci else 0.0)
            err_hi.append(max(0.0, (bar.hi - bar.value) * scale) if has_ci else 0.0)
        if not xs:
            continue
        ax.bar(xs, ys, width * 0.92, color=colors[label], label=label, zorder=2)
        with_ci = [k for k, (a, b) in enumerate(zip(err_lo, err_hi)) if a or b]
        if with_ci:
            ax.errorbar([xs[k] for k in with_ci], [ys[k] for k in with_ci],
                        yerr=[[err_lo[k] for k in with_ci], [err_hi[k] for k in with_ci]],
                        fmt="none", ecolor="#1f2937", elinewidth=1, capsize=3, zorder=3)
        for x, y, up in zip(xs, ys, err_hi):
            text = f"{y:.1f}" if percent or abs(y) >= 10 else f"{y:.2f}"  # as the report's tables write them
            ax.annotate(text, (x, y + up), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8, color="#374151")
    ax.set_xticks(range(len(metric_names)), [m.replace("_", " ") for m in metric_names])
    ax.set_title(title, fontsize=11, loc="left")
    values = [b.value for per_model in bars.values() for b in per_model.values() if math.isfinite(b.value)]
    if percent:
        ax.set_ylim(0, 112)  # room above 100 for the value labels
    elif values and min(values) > 0 and max(values) / min(values) > 30:
        # Perplexities of a base and a tuned model often differ 100-fold: on a linear axis the
        # tuned bar would be an invisible sliver.
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 2, max(values) * 3)
        ylabel += " (log scale)"
    else:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e5e7eb", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=9, ncols=min(num_models, 4), loc="upper left", bbox_to_anchor=(0, -0.12))
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class LossCurves:
    """The losses a training run logged in its metrics.jsonl."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.train_loss or self.eval_loss)


def read_loss_curves(run_dir: str | Path) -> LossCurves:
    """Train and eval losses by step from run_dir/metrics.jsonl; empty when the file is missing."""
    curves = LossCurves()
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short when a run was killed
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if _finite(rec.get("loss")):
            curves.train_steps.append(rec["step"])
            curves.train_loss.append(float(rec["loss"]))
        if _finite(rec.get("eval_loss")):
            curves.eval_steps.append(rec["step"])
            curves.eval_loss.append(float(rec["eval_loss"]))
    return curves


def plot_loss_curves(curves: LossCurves, path: Path, *, title: str, color: str = MODEL_COLORS[0]) -> Path:
    """Training loss (raw, plus a moving average when noisy) and eval loss against steps; writes a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if curves.train_loss:
        smooth = _moving_average(curves.train_loss)
        if smooth is not None:
            ax.plot(curves.train_steps, curves.train_loss, color=color, alpha=0.25, linewidth=1)
            ax.plot(curves.train_steps, smooth, color=color, linewidth=1.8, label="train loss (moving average)")
        else:
            ax.plot(curves.train_steps, curves.train_loss, color=color, linewidth=1.8, label="train loss")
    if curves.eval_loss:
        ax.plot(curves.eval_steps, curves.eval_loss, color="#111827", linewidth=1.5, marker="o", markersize=4,
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(color="#e5e7eb")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _moving_average(values: list[float]) -> list[float] | None:
    """A trailing mean over ~1/20 of the run, or None when the run is too short to need one."""
    if len(values) < 100:
        return None
    window = max(2, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})  # no version stamp: same input, same bytes
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path
