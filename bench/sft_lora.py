"""LoRA SFT throughput and memory: tunesmith against TRL's SFTTrainer + PEFT on the same model, data and settings.

Run from the repository root (`make bench` does this after installing the `bench` extra):

    python bench/sft_lora.py [--rows 256] [--epochs 1 | --steps N] [--max-length 512]

The parent process builds the data once (prompt/completion rows cut from CPython's `pydoc_data.topics`,
seeded), then runs each side in its own child process (`--side tunesmith|trl`) so that peak RSS is per
side. It prints one JSON line per side, then one line of ratios (tunesmith / TRL) and one line that
checks both sides tokenised the data to the same ids. Only training is timed; model loading is not.
Tokens are counted the same way on both sides: non-padding tokens of the training batches seen.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("tunesmith", "trl")
PROMPTS = (
    "Quote the Python language reference on {topic!r}, from the passage that begins “{opening}”.",
    "What does the Python documentation say about {topic!r}? Start at “{opening}”.",
    "Recite the section of the Python docs about {topic!r} that opens with “{opening}”, word for word.",
    "I need the exact text of the Python reference entry {topic!r} beginning with “{opening}”.",
)

# The settings both sides share; each side's code below maps them to its own config keys.
LORA_R, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS = 16, 32, 0.0, "all-linear"
LR, BATCH_SIZE, GRAD_ACCUM, SEED, MAX_GRAD_NORM = 2e-4, 8, 1, 0, 1.0


# ---------------------------------------------------------------- data


def make_rows(num_rows: int, seed: int, min_chars: int = 80, max_chars: int = 1200) -> list[dict[str, str]]:
    """Prompt/completion rows whose answers are seeded slices (min_chars..max_chars) of pydoc topic texts."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    rows = []
    for _ in range(num_rows):
        length = rng.randint(min_chars, max_chars)
        name = rng.choice([n for n in names if len(topics[n]) >= length])
        text = topics[name]
        start = rng.randint(0, len(text) - length)
        # Start at a word, as an answer would; the slice keeps the text's own line breaks and indents.
        match = re.compile(r"(?<=\s)\S").search(text, start)
        start = match.start() if match and match.start() <= len(text) - length else start
        answer = text[start : start + length].rstrip()
        opening = " ".join(answer.split()[:6])
        rows.append({"prompt": rng.choice(PROMPTS).format(topic=name, opening=opening), "completion": answer})
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- shared measurements


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


def side_result(
    side: str,
    *,
    tokens: int,
    train_s: float,
    cpu_s: float,
    steps: int,
    losses: list[float],
    step_tokens_per_s: list[float],
    **extra: Any,
) -> dict:
    """One side's result line: throughput, time per step, peak memory, losses, plus side-specific facts."""
    import torch

    ordered = sorted(step_tokens_per_s)
    return {
        "side": side,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "tokens": tokens,
        "train_s": train_s,
        "steps": steps,
        "s_per_step": train_s / steps if steps else None,
        "peak_rss_mib": peak_rss_mib(),
        **loss_summary(losses),
        # CPU seconds of the whole process during training: less sensitive than wall time to other load.
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": tokens / cpu_s if cpu_s > 0 else None,
        "median_step_tokens_per_s": ordered[len(ordered) // 2] if ordered else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews wall times
        **extra,
    }


# ---------------------------------------------------------------- the two sides


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict:
    """LoRA SFT with tunesmith (its defaults: packed rows), timed by its own loop."""
    import tunesmith

    train: dict[str, Any] = {
        "batch_size": BATCH_SIZE,
        "grad_accum": GRAD_ACCUM,
        "lr": LR,
        "weight_decay": 0.0,
        "warmup_ratio": 0.0,
        "min_lr_ratio": 1.0,  # with no warm-up: a constant learning rate, as on the TRL side
        "max_grad_norm": MAX_GRAD_NORM,
        "max_length": args.max_length,
        "packing": not args.no_packing,
        "seed": SEED,
        "save_every": 0,
        "eval_every": 0,
        "log_every": 1,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    if args.steps:
        train["max_steps"] = args.steps
    else:
        train["epochs"] = args.epochs
    cfg = {
        "method": "sft",
        "model": "default",
        "output_dir": str(workdir / "tunesmith-run"),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": LORA_TARGETS},
        "train": train,
        "load": {"dtype": "float32"},
        "output": {"merge": False, "save_adapter": False},
    }
    import tunesmith.core.run as run_module

    cpu = {"s": 0.0, "rss_at_start": 0.0}
    train_loop = run_module.train_loop

    def timed_loop(**kwargs: Any) -> Any:
        """tunesmith's own loop, with the process CPU time it takes recorded (its wall time it records itself)."""
        cpu["rss_at_start"] = rss_mib()
        start = time.process_time()
        try:
            return train_loop(**kwargs)
        finally:
            cpu["s"] = time.process_time() - start

    run_module.train_loop = timed_loop
    result = tunesmith.train(cfg)
    loop = result.loop
    stats = result.train_stats
    return side_result(
        "tunesmith",
        tokens=loop.tokens_seen,
        train_s=loop.wall_s,
        cpu_s=cpu["s"],
        steps=loop.steps,
        losses=[h["loss"] for h in loop.history if "loss" in h],
        step_tokens_per_s=[h["tokens_per_s"] for h in loop.history if "tokens_per_s" in h],
        rss_at_train_start_mib=cpu["rss_at_start"],
        packing=train["packing"],
        data_rows=stats.num_rows,
        data_tokens=stats.num_tokens,
        data_trained_tokens=stats.num_trained_tokens,
        truncated=stats.num_truncated,
        trainable_params=result.parameters.get("trainable"),
    )


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    """LoRA SFT with TRL's SFTTrainer + PEFT on conversational prompt-completion data (TRL pads, no packing)."""
    import datasets
    import peft
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    class Timer(TrainerCallback):
        """Wall and CPU time from train begin to train end (setup and saving excluded), and tokens/s per step."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.begin = self.end = self.cpu_begin = self.cpu_end = self.rss_at_start = 0.0
            self.last, self.last_tokens = 0.0, 0
            self.step_tokens_per_s: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.rss_at_start = rss_mib()
            self.begin = self.last = time.perf_counter()
            self.cpu_begin = time.process_time()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            now, tokens = time.perf_counter(), int(self.trainer._total_train_tokens)
            self.step_tokens_per_s.append((tokens - self.last_tokens) / max(now - self.last, 1e-9))
            self.last, self.last_tokens = now, tokens

        def on_train_end(self, *_: Any, **__: Any) -> None:
            self.end = time.perf_counter()
            self.cpu_end = time.process_time()

    records = read_jsonl(workdir / "train.jsonl")
    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in records
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    config = trl.SFTConfig(
        output_dir=str(workdir / "trl-run"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        num_train_epochs=args.epochs,
        max_steps=args.steps or -1,
        max_length=args.max_length,
        packing=False,
        seed=SEED,
        bf16=False,  # TRL defaults to bf16 mixed precision; both sides train in float32 here
        fp16=False,
        activation_checkpointing=args.gradient_checkpointing,  # TRL defaults to on; tunesmith to off
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    lora = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=LORA_TARGETS,
        bias="none",
    )
    timer = Timer()
    trainer = trl.SFTTrainer(
        model=args.model_path,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    timer.trainer = trainer
    trainer.train()
    # TRL's own count (its `num_tokens` metric): the sum of attention_mask over every batch trained on.
    tokens = int(trainer._total_train_tokens)
    prepared = trainer.train_dataset
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = side_result(
        "trl",
        tokens=tokens,
        train_s=timer.end - timer.begin,
        cpu_s=timer.cpu_end - timer.cpu_begin,
        steps=trainer.state.global_step,
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        step_tokens_per_s=timer.step_tokens_per_s,
        rss_at_train_start_mib=timer.rss_at_start,
        packing=False,
        data_rows=len(prepared),
        data_tokens=sum(len(ids) for ids in prepared["input_ids"]),
        data_trained_tokens=sum(sum(1 for x in labels if x != -100) for labels in prepared["labels"]),
        trainable_params=trainable,
    )
    # For the parent's tokenisation check; written after peak RSS was read.
    tokens_seen = {"input_ids": [list(x) for x in prepared["input_ids"]], "labels": [list(x) for x in prepared["labels"]]}
    (workdir / "trl_tokens.json").write_text(json.dumps(tokens_seen))
    return result


# ---------------------------------------------------------------- parent


def check_tokens(workdir: Path, model_path: str, max_length: int) -> dict:
    """Compare TRL's prepared rows with tunesmith's unpacked documents: token ids, and the trained-token masks."""
    from tunesmith.config import LoadConfig
    from tunesmith.data import build_dataset
    from tunesmith.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model_path, LoadConfig()), LoadConfig())
    docs = build_dataset(
        str(workdir / "train.jsonl"), tokenizer, method="sft", max_length=max_length, packing=False
    ).rows
    trl_rows = json.loads((workdir / "trl_tokens.json").read_text())
    pairs = list(zip(docs, trl_rows["input_ids"], trl_rows["labels"]))
    same_ids = sum(d.input_ids == ids for d, ids, _ in pairs)
    only_trl = only_ts = 0
    for d, _, labels in pairs:
        for a, b in zip(d.labels, labels):
            only_ts += a != -100 and b == -100
            only_trl += a == -100 and b != -100
    return {
        "check": "tokenisation",
        "rows": [len(docs), len(trl_rows["input_ids"])],
        "rows_with_same_input_ids": same_ids,
        "tokens_trained_only_by_trl": only_trl,
        "tokens_trained_only_by_tunesmith": only_ts,
    }


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run one side in a child process (so its peak RSS is its own) and read back its result."""
    out = workdir / f"{side}.json"
    # A reused --workdir: drop this side's earlier result and run folder (tunesmith refuses a finished run's folder).
    out.unlink(missing_ok=True)
    shutil.rmtree(workdir / f"{side}-run", ignore_errors=True)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--side", side, "--workdir", str(workdir),
        "--model-path", args.model_path, "--max-length", str(args.max_length), "--epochs", str(args.epochs),
    ]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.no_packing:
        cmd.append("--no-packing")
    # The repository root first on the path: the children measure this checkout's tunesmith, whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"--- {side}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{side} side failed (exit status {proc.returncode}); its output is above")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def ratios(ts: dict, trl_result: dict) -> dict:
    """tunesmith / TRL for throughput, memory and time per step; and whether the issue's goal is met."""

    def ratio(key: str) -> float | None:
        a, b = ts.get(key), trl_result.get(key)
        return a / b if a is not None and b else None

    speed, memory = ratio("tokens_per_s"), ratio("peak_rss_mib")
    return {
        "ratio": "tunesmith/trl",
        "tokens_per_s": speed,
        "peak_rss_mib": memory,
        "tokens_per_cpu_s": ratio("tokens_per_cpu_s"),
        "median_step_tokens_per_s": ratio("median_step_tokens_per_s"),
        "s_per_step": ratio("s_per_step"),
        "goal_tokens_per_s_ge_2.5": speed is not None and speed >= 2.5,
        "goal_peak_rss_le_0.5": memory is not None and memory <= 0.5,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="prompt/completion rows to build (default 256)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the rows (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps instead of --epochs, same on both sides")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--data-seed", type=int, default=0, help="seed for building the rows")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run, in order")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn it on for both sides (off by default)")
    p.add_argument("--no-packing", action="store_true", help="tunesmith without packing (padded rows like TRL)")
    p.add_argument("--workdir", default=None, help="folder for data and run outputs (default: a new temp folder)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the two sides' tokenisation")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parent: build data, run each side in a child, print JSON lines. Child (--side): train and write its result."""
    args = parse_args(argv)
    if args.side:
        workdir = Path(args.workdir)
        result = (run_tunesmith if args.side == "tunesmith" else run_trl)(args, workdir)
        (workdir / f"{args.side}.json").write_text(json.dumps(result))
        return

    from tunesmith.config import LoadConfig
    from tunesmith.model import resolve_model

    # Both sides load the same HF folder: the default model as tunesmith imports it from its .gguf.
    args.model_path = resolve_model("default", LoadConfig()).path
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.rows, args.data_seed)
    with open(workdir / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    settings = {
        "settings": {
            "rows": args.rows, "epochs": None if args.steps else args.epochs, "steps": args.steps,
            "max_length": args.max_length, "batch_size": BATCH_SIZE, "grad_accum": GRAD_ACCUM, "lr": LR,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": LORA_TARGETS},
            "gradient_checkpointing": args.gradient_checkpointing, "dtype": "float32", "seed": SEED,
            "model_path": args.model_path, "workdir": str(workdir),
        }
    }
    print(json.dumps(settings), flush=True)
    results = {}
    for side in sides:
        results[side] = run_side(side, args, workdir)
        print(json.dumps(results[side]), flush=True)
    if "tunesmith" in results and "trl" in results:
        print(json.dumps(ratios(results["tunesmith"], results["trl"])), flush=True)
    if "trl" in results and not args.no_check:
        print(json.dumps(check_tokens(workdir, args.model_path, args.max_length)), flush=True)


if __name__ == "__main__":
    main()
