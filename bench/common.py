"""What every benchmark here shares: the data helpers, the LoRA settings, the clock both sides' training runs under
(tunesmith through its loop callbacks, TRL through a TrainerCallback), memory and CPU measurements, the skeleton
that runs each side in its own child process, tunesmith/TRL ratios, the tokenisation check, and the machine's
measured fp32 matmul rate (for MFU).

Each benchmark script is both the parent (builds the data, runs the sides one after the other, prints JSON lines)
and the child (`--side NAME`: trains, then writes its result to WORKDIR/NAME.json for the parent to read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This checkout's tunesmith, whatever is installed: in the parent as in the children (see run_child).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tunesmith.core.contract import StepOutcome  # noqa: E402
from tunesmith.core.loop import LoopCallback, LoopResult  # noqa: E402

SIDES = ("tunesmith", "trl")
# The LoRA every bench trains, in tunesmith's `lora` keys (peft_lora() gives TRL's side the same).
LORA: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}

# Requests to quote a pydoc passage: the prompts of the SFT rows and of the DPO pairs.
PROMPTS = (
    "Quote the Python language reference on {topic!r}, from the passage that begins “{opening}”.",
    "What does the Python documentation say about {topic!r}? Start at “{opening}”.",
    "Recite the section of the Python docs about {topic!r} that opens with “{opening}”, word for word.",
    "I need the exact text of the Python reference entry {topic!r} beginning with “{opening}”.",
)
_WORD_START = re.compile(r"(?<=\s)\S")


def slice_at_word(text: str, length: int, rng: random.Random) -> str:
    """A seeded slice of `text` of about `length` characters (all of it when shorter) that starts at a word."""
    length = min(length, len(text))
    start = rng.randint(0, len(text) - length)
    match = _WORD_START.search(text, start)
    start = match.start() if match and match.start() <= len(text) - length else start
    return text[start : start + length].rstrip()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write `records` as JSONL (UTF-8, one record a line): the data file both sides train on."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def loss_summary(losses: list[float]) -> dict[str, float | None]:
    """First and final step loss, and the mean over the last 10% of steps (single steps are noisy)."""
    if not losses:
        return {"first_loss": None, "final_loss": None, "last10pct_loss": None}
    tail = losses[-max(1, math.ceil(0.1 * len(losses))) :]
    return {"first_loss": losses[0], "final_loss": losses[-1], "last10pct_loss": sum(tail) / len(tail)}


class StepClock:
    """One side's training under the clock: a wall-clock stamp and the running totals (tokens, and what the loss
    is averaged over: DPO pairs) at the end of every optimizer step; CPU time, RSS at the start and peak RSS."""

    def __init__(self) -> None:
        self.begin = self.end = self.cpu_begin = self.cpu_s = self.rss_at_start = self.peak_rss = 0.0
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.items: list[float] = []

    def start(self) -> None:
        """Training begins (model loading and data preparation are done)."""
        self.rss_at_start = rss_mib()
        self.begin = time.perf_counter()
        self.cpu_begin = time.process_time()

    def step(self, tokens: int, items: float = 0.0) -> None:
        """An optimizer step ended; `tokens` and `items` are the totals so far."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.tokens.append(tokens)
        self.items.append(items)

    def stop(self) -> None:
        """Training ended: CPU seconds of the whole process since start(), and its peak RSS so far."""
        self.end = time.perf_counter()
        self.cpu_s = time.process_time() - self.cpu_begin
        self.peak_rss = peak_rss_mib()

    @property
    def train_s(self) -> float:
        """Wall seconds from start() to stop()."""
        return self.end - self.begin

    def step_tokens_per_s(self) -> list[float]:
        """Tokens per second of each step, from the previous step's end (or the start) to its own."""
        starts, before = [self.begin, *self.stamps[:-1]], [0, *self.tokens[:-1]]
        return [(n - m) / max(b - a, 1e-9) for a, b, m, n in zip(starts, self.stamps, before, self.tokens)]


class LoopTimer(LoopCallback):
    """tunesmith's side of the clock, through its loop's callbacks: per step its tokens, what its loss was averaged
    over (`count`: pairs for DPO), its loss and its statistics; `after(model)`, if given, runs once training has
    ended and the clock stopped (untimed: the final train loss), its value kept in `after_result`."""

    def __init__(self, after: Callable[[Any], Any] | None = None) -> None:
        self.clock = StepClock()
        self.after = after
        self.after_result: Any = None
        self.losses: list[float | None] = []
        self.stats: list[dict[str, float]] = []

    def on_train_begin(self, model: Any, step: int) -> None:
        """Start the clock."""
        self.clock.start()

    def on_step_end(self, step: int, outcome: StepOutcome) -> None:
        """Stamp the step with the running totals; keep its loss and statistics."""
        tokens = (self.clock.tokens[-1] if self.clock.tokens else 0) + outcome.tokens
        items = (self.clock.items[-1] if self.clock.items else 0.0) + outcome.count
        self.clock.step(tokens, items)
        self.losses.append(outcome.loss)
        self.stats.append(outcome.stats)

    def on_train_end(self, model: Any, result: LoopResult) -> None:
        """Stop the clock, then run `after` on the trained model and put it back in training mode."""
        self.clock.stop()
        if self.after is not None:
            self.after_result = self.after(model)
            model.train()


def trl_timer() -> Any:
    """TRL's side of the clock: a transformers TrainerCallback; set its `trainer` once the trainer is built. Per
    step it reads the trainer's `_total_train_tokens` (TRL's `num_tokens` metric) and `items_seen` (where a
    bench's trainer subclass counts them: DPO pairs), each 0 where the trainer keeps none."""
    from transformers import TrainerCallback

    class TrlTimer(TrainerCallback):
        """StepClock from on_train_begin to on_train_end (setup and saving excluded)."""

        def __init__(self) -> None:
            self.clock = StepClock()
            self.trainer: Any = None

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            """Start the clock."""
            self.clock.start()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            """Stamp the step with the trainer's running totals."""
            trainer = self.trainer
            self.clock.step(int(getattr(trainer, "_total_train_tokens", 0)), float(getattr(trainer, "items_seen", 0)))

        def on_train_end(self, *_: Any, **__: Any) -> None:
            """Stop the clock."""
            self.clock.stop()

    return TrlTimer()


def machine_facts(clock: StepClock | None = None) -> dict[str, Any]:
    """Peak memory (RSS, and CUDA when there is a GPU), torch threads and load: read when a side ends. With a
    clock, the RSS at the start of training and the peak RSS when training ended."""
    import torch

    facts: dict[str, Any] = {
        "peak_rss_mib": clock.peak_rss if clock is not None else peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews wall times
    }
    if clock is not None:
        facts["rss_at_train_start_mib"] = clock.rss_at_start
    if torch.cuda.is_available():
        facts["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        facts["device_name"] = torch.cuda.get_device_name()
    return facts


def train_dtype() -> str:
    """The dtype both sides train in: float32 on CPU, bfloat16 on CUDA (tunesmith's own default per device)."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def matmul_gflops(m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 8) -> float:
    """The best fp32 (CPU) or bf16 (CUDA) matmul rate of this machine in GFLOP/s, with torch's current threads."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        m, k, n = 8192, 8192, 8192
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def write_result(workdir: Path, side: str, result: dict) -> None:
    """The child's last act: its result line, for the parent."""
    (workdir / f"{side}.json").write_text(json.dumps(result))


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads in a child (None leaves torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def ratios(ts: dict, trl: dict, keys: tuple[str, ...]) -> dict[str, float | None]:
    """tunesmith / TRL for each of `keys` both sides report."""
    out: dict[str, float | None] = {}
    for key in keys:
        a, b = ts.get(key), trl.get(key)
        if a is not None and b is not None:
            out[key] = a / b if b else None
    return out


def tokenizer_of(model_path: str) -> Any:
    """The tokenizer tunesmith loads for the model folder both sides train."""
    from tunesmith.config import LoadConfig
    from tunesmith.model import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model_path, LoadConfig()), LoadConfig())


def default_model_path() -> str:
    """The HF folder both sides load: the default model as tunesmith imports it from its .gguf."""
    from tunesmith.config import LoadConfig
    from tunesmith.model import resolve_model

    return resolve_model("default", LoadConfig()).path


def peft_lora() -> Any:
    """LORA as a PEFT config, for TRL's side."""
    import peft

    return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=LORA["r"], lora_alpha=LORA["alpha"],
                           lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"], bias="none")


# ---------------------------------------------------------------- the skeleton: a parent, one child per side


def add_side_options(p: argparse.ArgumentParser) -> None:
    """The options every bench takes: threads, sides, model, work folder, and the child's hidden --side."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in each side (default: torch's choice); 1 is steadier on a busy machine")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run, in order")
    p.add_argument("--model-path", default=None, help="HF folder to train (default: tunesmith's default model)")
    p.add_argument("--workdir", default=None, help="folder for data and run outputs (default: a new temp folder)")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)


def run_side_here(args: argparse.Namespace, runs: dict[str, Callable[[argparse.Namespace, Path], dict]]) -> bool:
    """In a child (--side given): fix its threads, train that side, write its result; False in the parent."""
    if not args.side:
        return False
    set_threads(args.threads)
    workdir = Path(args.workdir)
    write_result(workdir, args.side, runs[args.side](args, workdir))
    return True


def start_parent(args: argparse.Namespace, bench: str) -> tuple[list[str], Path]:
    """The parent's first steps: the checked --sides, the model folder both sides load into args.model_path (by
    default, the default model as tunesmith imports it from its .gguf), and the work folder, made."""
    sides = chosen_sides(args.sides)
    args.model_path = args.model_path or default_model_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"tunesmith-bench-{bench}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return sides, workdir


def chosen_sides(text: str) -> list[str]:
    """The --sides list, checked."""
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    return sides


def run_child(script: Path, side: str, workdir: Path, args: list[str], threads: int | None = None) -> dict:
    """Run `script --side SIDE` in its own process (so peak RSS is that side's) and read back its result line."""
    out = workdir / f"{side}.json"
    # A reused --workdir: drop this side's earlier result and run folder (tunesmith refuses a finished run's folder).
    out.unlink(missing_ok=True)
    shutil.rmtree(workdir / f"{side}-run", ignore_errors=True)
    cmd = [sys.executable, str(script), "--side", side, "--workdir", str(workdir), *args]
    if threads:
        cmd += ["--threads", str(threads)]
    # The repository root first on the path: the children measure this checkout's tunesmith, whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"--- {side}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{side} side failed (exit status {proc.returncode}); its output is above")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def run_sides(script: Path, sides: list[str], workdir: Path, child_args: list[str], threads: int | None,
              finish: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Run each side in its own child, one after the other; `finish` adds to a result before its line is printed."""
    results = {}
    for side in sides:
        results[side] = run_child(script, side, workdir, child_args, threads)
        if finish is not None:
            finish(results[side])
        print_line(results[side])
    return results


def print_line(record: dict) -> None:
    """One JSON line of the bench's output."""
    print(json.dumps(record), flush=True)


def ratio_line(results: dict[str, dict], keys: tuple[str, ...], **first: Any) -> dict | None:
    """The line of tunesmith / TRL ratios (after the `first` fields), or None unless both sides ran."""
    if "tunesmith" not in results or "trl" not in results:
        return None
    return {**first, "ratio": "tunesmith/trl", **ratios(results["tunesmith"], results["trl"], keys)}


def save_trl_tokens(workdir: Path, columns: dict[str, Any]) -> None:
    """TRL's side: the token ids of its prepared data, for the parent's check (write them after peak RSS is read)."""
    (workdir / "trl_tokens.json").write_text(json.dumps({k: [list(x) for x in v] for k, v in columns.items()}))


def check_tokens(workdir: Path, model_path: str,
                 compare: Callable[[Any, dict[str, list[list[int]]], Path], dict[str, Any]]) -> dict:
    """The parent's tokenisation check: `compare(tokenizer, trl_rows, workdir)` sets tunesmith's tokenisation of
    the data against the rows TRL's side saved (save_trl_tokens)."""
    trl_rows = json.loads((workdir / "trl_tokens.json").read_text())
    return {"check": "tokenisation", **compare(tokenizer_of(model_path), trl_rows, workdir)}
