"""What the dashboard knows about the run folders under `--runs`: status, progress, last loss, the report's headline.

A run folder is one that holds config.yaml (`model.runs.is_run_dir`). Its status comes from the folder alone, so a
run started in a terminal shows as well as one started from the page:

- running: a live `train` holds the folder's lock (`model.lock.holder`), or the dashboard launched one that has not
  taken the lock yet (it is still loading the model);
- finished: summary.json is there;
- failed: the dashboard launched it and it exited with an error (the error is the end of its log);
- stopped: anything else; `tunesmith train RUN/config.yaml` resumes it from its newest good checkpoint (or starts
  it afresh in the same folder when it stopped before its first one).

Paths that come from a request go through `inside`, which refuses (403) any that leaves its folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tunesmith.core.checkpoint import MANIFEST, PREFIX, checkpoint_dirs
from tunesmith.model.lock import holder
from tunesmith.model.runs import RUN_CONFIG, is_run_dir, run_config
from tunesmith.ui.jobs import Job, read_jobs

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
REPORT = Path("report") / "report.html"
RESULTS = Path("report") / "results.json"
CHECKPOINTS = "checkpoints"


class Forbidden(Exception):
    """A path from a request that leaves the folder it must stay in (answered with 403)."""


def inside(root: Path, *parts: str) -> Path:
    """`root/parts...` resolved, or Forbidden when it is not inside `root` (.., absolute parts, symlinks out)."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise Forbidden(f"{'/'.join(parts)!r} is outside {root}")
    return path


@dataclass
class RunRow:
    """One line of the runs table."""

    name: str
    method: str | None = None
    model: str | None = None
    status: str = "stopped"  # running | finished | stopped | failed
    detail: str = ""  # what the status means for this run, e.g. "resumable from step 40" or the error
    resumable: bool = False
    step: int = 0
    total_steps: int | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    wall_s: float | None = None
    eta_s: float | None = None
    started: float | None = None
    headline: list[str] = field(default_factory=list)
    has_report: bool = False
    rl: bool = False
    log: str | None = None  # the log of a run the dashboard launched (its last lines when it failed)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


@dataclass
class _Progress:
    step: int = 0
    epoch: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    first_time: float | None = None
    last_time: float | None = None
    recent: list[tuple[int, float]] = field(default_factory=list)  # (step, time) of the last train lines


T = TypeVar("T")
_cache: dict[tuple[Path, Callable], tuple[int, int, Any]] = {}
CACHE_FILES = 512  # parsed files kept; past it, those of deleted runs go first, then the least recently read


def _parsed(path: Path, parse: Callable[[str], T], missing: T) -> T:
    """`parse` of the text of `path`, read and parsed again only when the file's size or time changed (the runs
    table is rebuilt every second for every open page); `missing` when the file cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        _cache.pop((path, parse), None)
        return missing
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _cache.pop((path, parse), None)  # put back last: the dict's order is the order of use
    if cached is not None and cached[:2] == key:
        _cache[(path, parse)] = cached
        return cached[2]
    try:
        value = parse(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return missing
    _cache[(path, parse)] = (*key, value)
    if len(_cache) > CACHE_FILES:
        _forget_some()
    return value


def _forget_some() -> None:
    """Bring the cache back to CACHE_FILES: first the files that are gone (deleted runs), then the least recently
    read."""
    for cache_key in [k for k in _cache if not k[0].exists()]:
        del _cache[cache_key]
    while len(_cache) > CACHE_FILES:
        del _cache[next(iter(_cache))]


def progress_of(run_dir: Path) -> _Progress:
    """The figures of metrics.jsonl (read again only when the file changed)."""
    return _parsed(run_dir / METRICS, _progress, _Progress())


def _progress(text: str) -> _Progress:
    out = _Progress()
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill, or being written
        if not isinstance(rec, dict):
            continue
        t = rec.get("time")
        if isinstance(t, (int, float)):
            out.first_time = t if out.first_time is None else out.first_time
            out.last_time = t
        if "loss" in rec:
            out.step = int(rec.get("step", out.step))
            out.last_loss = _finite(rec.get("loss"))
            out.epoch = rec.get("epoch", out.epoch)
            if isinstance(t, (int, float)):
                out.recent = (out.recent + [(out.step, t)])[-20:]
        if "eval_loss" in rec:
            out.eval_loss = _finite(rec.get("eval_loss"))
    return out


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _total_steps(config: dict[str, Any], progress: _Progress) -> int | None:
    train = config.get("train") or {}
    if isinstance(train.get("max_steps"), int):
        return train["max_steps"]
    epochs = train.get("epochs")
    if isinstance(progress.epoch, (int, float)) and progress.epoch > 0 and isinstance(epochs, (int, float)):
        return max(progress.step, math.ceil(progress.step * epochs / progress.epoch - 1e-6))  # epoch = step x batch / rows
    return None


def _headline(run_dir: Path) -> list[str]:
    return _parsed(run_dir / RESULTS, _headline_of, [])


def _headline_of(text: str) -> list[str]:
    try:
        payload = json.loads(text)
    except ValueError:
        return []
    lines = (payload.get("comparison") or {}).get("headline") or []
    return [str(x) for x in lines]


def _job_error(job: Job) -> str:
    """The error a failed train printed: its `tunesmith: error:` block, else the end of its log."""
    text = job.log_tail(60)
    marker = text.rfind("tunesmith: error:")
    if marker >= 0:
        return text[marker + len("tunesmith: "):].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-12:]) or f"exited with code {job.exit_code}"


def run_row(runs: Path, name: str, job: Job | None = None) -> RunRow:
    """The table line of run folder `runs/name` (which may not exist yet while its launched train starts)."""
    run_dir = runs / name
    row = RunRow(name=name)
    config: dict[str, Any] = {}
    if is_run_dir(run_dir):
        try:
            config = run_config(run_dir)
        except (OSError, ValueError):
            config = {}
    elif job is not None:
        config = job.config or {}
    row.method = config.get("method")
    row.model = config.get("model")
    row.rl = row.method in ("grpo", "ppo")
    progress = progress_of(run_dir)
    row.step, row.last_loss, row.eval_loss = progress.step, progress.last_loss, progress.eval_loss
    row.total_steps = _total_steps(config, progress)
    row.started = job.started if job is not None else progress.first_time
    row.has_report = (run_dir / REPORT).is_file()
    row.headline = _headline(run_dir) if row.has_report else []
    row.log = str(job.log) if job is not None else None

    live = holder(run_dir) if run_dir.is_dir() else None
    if live is not None:  # the train holds its run's lock from loading to its last output
        done = progress.step and progress.step == row.total_steps
        row.status = "running"
        row.detail = f"{'writing its outputs and report' if done else 'training'} (pid {live})"
    elif (run_dir / SUMMARY).is_file():
        row.status, row.detail = "finished", "finished: its outputs and summary.json are written"
        try:
            summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
            row.last_loss = _finite(summary.get("final_loss")) if row.last_loss is None else row.last_loss
        except (OSError, ValueError):
            pass
    elif job is not None and job.alive:
        row.status, row.detail = "running", "starting: loading the model and data"
    elif job is not None and job.exit_code not in (None, 0) and not job.signalled:
        row.status, row.detail = "failed", _job_error(job)
        row.resumable = is_run_dir(run_dir)
    else:
        row.status = "stopped"
        row.resumable = is_run_dir(run_dir)
        good = _newest_checkpoint(run_dir)
        row.detail = (f"stopped at step {progress.step}; resumable from the checkpoint of step {good}" if good
                      else "stopped before its first checkpoint; resuming starts it again in the same folder")
    if row.status == "running":
        row.wall_s = time.time() - row.started if row.started else None
    elif progress.first_time is not None and progress.last_time is not None:
        row.wall_s = progress.last_time - progress.first_time
    if row.status == "running" and row.total_steps and len(progress.recent) >= 2:
        (s0, t0), (s1, t1) = progress.recent[0], progress.recent[-1]
        if s1 > s0:
            row.eta_s = max(0.0, (row.total_steps - s1) * (t1 - t0) / (s1 - s0) - (time.time() - t1))
    return row


def _newest_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest committed checkpoint with its manifest (its checksums are checked when it resumes:
    hashing whole checkpoints every poll would cost too much)."""
    committed = [d for d in checkpoint_dirs(run_dir / CHECKPOINTS) if (d / MANIFEST).is_file()]
    return int(committed[-1].name.removeprefix(PREFIX)) if committed else None


def list_runs(runs: Path) -> list[RunRow]:
    """Every run under `runs` (folders with config.yaml and trains the dashboard launched), newest first."""
    jobs = {j.name: j for j in read_jobs(runs) if j.kind == "train"}
    names = {p.name for p in runs.iterdir() if not p.name.startswith(".") and (p / RUN_CONFIG).is_file()} \
        if runs.is_dir() else set()
    names |= set(jobs)
    rows = [run_row(runs, n, jobs.get(n)) for n in names]
    rows.sort(key=lambda r: r.started or 0, reverse=True)
    return rows


def run_job(runs: Path, name: str) -> Job | None:
    """The newest train the dashboard launched in `runs/name`, if any."""
    found = [j for j in read_jobs(runs) if j.kind == "train" and j.name == name]
    return found[-1] if found else None


def latest_samples(run_dir: Path, limit: int = 16) -> list[dict[str, Any]]:
    """The completions an RL run sampled at its latest sampled step, with their rewards."""
    return _parsed(run_dir / SAMPLES, _latest_step, [])[:limit]


def _latest_step(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if not records:
        return []
    last = records[-1].get("step")
    return [r for r in records if r.get("step") == last]
