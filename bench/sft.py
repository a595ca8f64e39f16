"""SFT and continued-pretraining throughput, memory and MFU: tunesmith against TRL's SFTTrainer (+ PEFT for LoRA)
on the same model, data and settings.

Run from the repository root (`make bench` does this after installing the `bench` extra):

    python bench/sft.py [--jobs lora,full,pretrain] [--rows 64] [--max-length 512] [--threads N]

Jobs:
  lora      prompt/completion SFT, LoRA r=16 on all linear layers, lr 2e-4 (4·N FLOPs per token)
  full      the same rows, all weights trained, lr 2e-5 (6·N FLOPs per token)
  pretrain  plain text in blocks of max_length, all weights trained, lr 2e-5 (6·N FLOPs per token)

The parent process builds the data once per job (rows cut from CPython's `pydoc_data.topics`, seeded), measures the
machine's fp32 matmul rate, then runs each side in its own child process (`--side tunesmith|trl`) so that peak RSS
is per side. It prints one JSON line per side, then one line of ratios (tunesmith / TRL, with MFU), and for the SFT
jobs one line that checks both sides tokenised the data to the same ids. Only training is timed; model loading and
saving are not, and peak RSS is read when training ends. Tokens are counted the same way on both sides: non-padding
tokens of the training batches seen. Each job trains for one epoch over its data on both sides.

Batches: 8 documents per optimizer step on both sides. TRL pads SFT rows, one document each, so its step is 8 rows;
tunesmith packs documents into rows of max_length, so for SFT its rows per step are scaled to carry 8 documents on
average (`tunesmith_batch_size`): both sides then make about as many updates of about as many tokens, and their
losses compare. Pretraining packs on both sides: 8 rows per step each. After training (not timed) each side's
final model is scored on the whole training data with the same code (`final_train_loss`).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (bench/ is not a package; its scripts run as files)
    LORA,
    PROMPTS,
    LoopTimer,
    StepClock,
    add_side_options,
    check_tokens,
    loss_summary,
    machine_facts,
    matmul_gflops,
    peft_lora,
    print_line,
    ratio_line,
    read_jsonl,
    run_side_here,
    run_sides,
    save_trl_tokens,
    set_threads,
    slice_at_word,
    start_parent,
    tokenizer_of,
    trl_timer,
    write_jsonl,
)

# The settings both sides share (with common.LORA); each side's code below maps them to its own config keys.
BATCH_SIZE, GRAD_ACCUM, SEED, MAX_GRAD_NORM = 8, 1, 0, 1.0
JOBS: dict[str, dict[str, Any]] = {
    "lora": {"method": "sft", "lora": True, "lr": 2e-4, "flops_per_param": 4},
    "full": {"method": "sft", "lora": False, "lr": 2e-5, "flops_per_param": 6},
    "pretrain": {"method": "pretrain", "lora": False, "lr": 2e-5, "flops_per_param": 6},
}
RATIO_KEYS = ("final_train_loss", "tokens_per_s", "tokens_per_cpu_s", "median_step_tokens_per_s", "s_per_step", "peak_rss_mib",
              "peak_cuda_mib", "mfu")
# (tokens/s ratio at least, peak memory ratio at most): CPU (peak RSS) per job; CUDA (peak GPU memory) for all jobs
GOALS = {"lora": (2.5, 0.5), "full": (2.0, 0.6), "pretrain": (1.5, 0.6)}
GPU_GOAL = (2.0, 0.4)


# ---------------------------------------------------------------- data


def _topic_slices(count: int, rng: random.Random, min_chars: int, max_chars: int) -> Iterator[tuple[str, str]]:
    """(topic name, slice of its text) pairs: a seeded length, a topic long enough for it, a slice starting at a word."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    for _ in range(count):
        length = rng.randint(min_chars, max_chars)
        name = rng.choice([n for n in names if len(topics[n]) >= length])
        yield name, slice_at_word(topics[name], length, rng)


def make_rows(num_rows: int, seed: int, min_chars: int = 80, max_chars: int = 1200) -> list[dict[str, str]]:
    """Prompt/completion rows whose answers are seeded slices (min_chars..max_chars) of pydoc topic texts."""
    rng = random.Random(seed)
    rows = []
    for name, answer in _topic_slices(num_rows, rng, min_chars, max_chars):
        opening = " ".join(answer.split()[:6])
        rows.append({"prompt": rng.choice(PROMPTS).format(topic=name, opening=opening), "completion": answer})
    return rows


def make_texts(num_docs: int, seed: int, min_chars: int = 300, max_chars: int = 2500) -> list[dict[str, str]]:
    """Plain-text documents for continued pretraining: seeded slices of pydoc topic texts, some longer than a block."""
    rng = random.Random(seed)
    return [{"text": text} for _, text in _topic_slices(num_docs, rng, min_chars, max_chars)]


def side_result(side: str, clock: StepClock, losses: list[float], **extra: Any) -> dict:
    """One side's result line: throughput, time per step, peak memory (when training ended), losses."""
    ordered = sorted(clock.step_tokens_per_s())
    tokens, steps = (clock.tokens[-1] if clock.tokens else 0), len(clock.stamps)
    train_s, cpu_s = clock.train_s, clock.cpu_s
    return {
        "side": side,
        "tokens_per_s": tokens / train_s if train_s > 0 else None,
        "tokens": tokens,
        "train_s": train_s,
        "steps": steps,
        "s_per_step": train_s / steps if steps else None,
        **loss_summary(losses),
        # CPU seconds of the whole process during training: less sensitive than wall time to other load.
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": tokens / cpu_s if cpu_s > 0 else None,
        "median_step_tokens_per_s": ordered[len(ordered) // 2] if ordered else None,
        **machine_facts(clock),  # peak RSS when training ended, RSS at its start, threads, load
        **extra,
    }


def final_train_loss(model: Any, args: argparse.Namespace, workdir: Path) -> float:
    """The trained model's mean token loss over the whole training data, each document alone, masked as tunesmith
    trains (answer tokens for SFT, every token for pretraining): one yardstick for both sides' final models."""
    import torch

    from tunesmith.core.next_token import CausalLMLoss
    from tunesmith.data import build_dataset, collate
    from tunesmith.methods import get_method

    tokenizer = tokenizer_of(args.model_path)
    rows = build_dataset(str(workdir / "train.jsonl"), tokenizer, labels=get_method(JOBS[args.job]["method"]).LABELS,
                         max_length=args.max_length, packing=False).rows
    loss = CausalLMLoss(model)
    device = next(model.parameters()).device
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate(rows[start : start + 8], tokenizer.pad_token_id)
            loss_sum, n, _ = loss(**{k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)


# ---------------------------------------------------------------- the two sides


def tunesmith_batch_size(args: argparse.Namespace, workdir: Path) -> int:
    """Packed rows per step that carry as many documents (and tokens) per update as TRL's BATCH_SIZE padded rows.

    TRL pads SFT rows (one document each); tunesmith packs several documents into each row. With the same number
    of rows per step, tunesmith would make fewer, larger updates over the epoch and its loss would not be
    comparable. Pretraining packs on both sides, so rows per step stay equal there; so does --no-packing.
    """
    if JOBS[args.job]["method"] == "pretrain" or args.no_packing or args.same_rows_per_step:
        return BATCH_SIZE
    from tunesmith.data import build_dataset

    tokenizer = tokenizer_of(args.model_path)
    stats = build_dataset(str(workdir / "train.jsonl"), tokenizer, labels="assistant", max_length=args.max_length,
                          packing=True).stats
    return max(1, round(BATCH_SIZE * stats.num_rows / max(stats.num_documents, 1)))


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict:
    """The job with tunesmith (its defaults: packed rows, passes of train.forward_tokens), timed by its loop callbacks."""
    import tunesmith

    job = JOBS[args.job]
    train: dict[str, Any] = {
        "batch_size": tunesmith_batch_size(args, workdir), "grad_accum": GRAD_ACCUM, "lr": job["lr"], "weight_decay": 0.0,
        "warmup_ratio": 0.0, "min_lr_ratio": 1.0,  # with no warm-up: a constant learning rate, as on the TRL side
        "max_grad_norm": MAX_GRAD_NORM, "max_length": args.max_length, "packing": not args.no_packing,
        "seed": SEED, "save_every": 0, "eval_every": 0, "log_every": 1,
        "gradient_checkpointing": args.gradient_checkpointing, "epochs": 1,
        "forward_tokens": args.forward_tokens,
    }
    cfg = {
        "method": job["method"],
        "model": args.model_path,
        "output_dir": str(workdir / "tunesmith-run"),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": dict(LORA) if job["lora"] else None,
        "train": train,
        "load": {"dtype": "float32" if args.device == "cpu" else "bfloat16"},
        "output": {"merge": False, "save_adapter": False},
    }
    timer = LoopTimer(after=lambda model: final_train_loss(model, args, workdir))  # the loss: after the clock
    result = tunesmith.train(cfg, callbacks=[timer])
    stats = result.train_stats
    return side_result(
        "tunesmith",
        timer.clock,
        losses=[loss for loss in timer.losses if loss is not None],
        final_train_loss=timer.after_result,
        packing=train["packing"],
        rows_per_step=train["batch_size"],
        data_rows=stats.num_rows,
        data_tokens=stats.num_tokens,
        data_trained_tokens=stats.num_trained_tokens,
        truncated=stats.num_truncated,
        trainable_params=result.parameters.get("trainable"),
        # the model without its adapters: what MFU counts
        model_params=result.parameters.get("total", 0) - (result.parameters.get("trainable", 0) if job["lora"] else 0),
    )


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    """The job with TRL's SFTTrainer: SFT rows padded (TRL's default), pretraining text packed (bfd_split)."""
    import datasets
    import trl
    from transformers import AutoTokenizer

    job = JOBS[args.job]

    records = read_jsonl(workdir / "train.jsonl")
    if job["method"] == "pretrain":
        dataset = datasets.Dataset.from_list(records)
    else:
        dataset = datasets.Dataset.from_list([
            {"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]}
            for r in records
        ])
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    bf16 = args.device == "cuda"
    config = trl.SFTConfig(
        output_dir=str(workdir / "trl-run"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=job["lr"],
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        num_train_epochs=1,
        max_length=args.max_length,
        # Pretraining: blocks of max_length, long texts split (as tunesmith's pretrain); SFT: TRL's default, padded.
        packing=job["method"] == "pretrain",
        packing_strategy="bfd_split",
        seed=SEED,
        bf16=bf16,  # float32 on CPU on both sides; bf16 on CUDA on both sides
        fp16=False,
        activation_checkpointing=args.gradient_checkpointing,  # TRL defaults to on; tunesmith to off
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32", "attn_implementation": "sdpa"},
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    timer = trl_timer()
    trainer = trl.SFTTrainer(model=args.model_path, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_lora() if job["lora"] else None, callbacks=[timer])
    timer.trainer = trainer
    trainer.train()
    # Tokens: TRL's own count (its `num_tokens` metric), the attention_mask sum (padded) or the packed length per batch.
    prepared = trainer.train_dataset
    params = list(trainer.model.parameters())  # tied weights once
    result = side_result(
        "trl",
        timer.clock,
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        final_train_loss=final_train_loss(trainer.model, args, workdir),  # not timed
        packing=config.packing,
        rows_per_step=BATCH_SIZE,
        data_rows=len(prepared),
        data_tokens=sum(len(ids) for ids in prepared["input_ids"]),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        model_params=sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n),
    )
    if job["method"] != "pretrain":
        result["data_trained_tokens"] = sum(sum(1 for x in labels if x != -100) for labels in prepared["labels"])
        save_trl_tokens(workdir, {"input_ids": prepared["input_ids"], "labels": prepared["labels"]})
    return result


# ---------------------------------------------------------------- parent


def same_rows(tokenizer: Any, trl_rows: dict[str, list[list[int]]], workdir: Path, max_length: int) -> dict:
    """TRL's prepared rows against tunesmith's unpacked documents: token ids, and the trained-token masks."""
    from tunesmith.data import build_dataset

    docs = build_dataset(
        str(workdir / "train.jsonl"), tokenizer, labels="assistant", max_length=max_length, packing=False
    ).rows
    pairs = list(zip(docs, trl_rows["input_ids"], trl_rows["labels"]))
    same_ids = sum(d.input_ids == ids for d, ids, _ in pairs)
    only_trl = only_ts = 0
    for d, _, labels in pairs:
        for a, b in zip(d.labels, labels):
            only_ts += a != -100 and b == -100
            only_trl += a == -100 and b != -100
    return {
        "rows": [len(docs), len(trl_rows["input_ids"])],
        "rows_with_same_input_ids": same_ids,
        "tokens_trained_only_by_trl": only_trl,
        "tokens_trained_only_by_tunesmith": only_ts,
    }


def add_mfu(result: dict, job: str, rate_gflops: float) -> None:
    """Model-FLOPs utilisation: flops_per_param · N · tokens/s over the measured matmul rate, with N the model's
    parameters without adapters (4·N for LoRA, which computes no weight gradients; 6·N for all weights)."""
    rate = result.get("tokens_per_s")
    flops = JOBS[job]["flops_per_param"] * (result.get("model_params") or 0) * rate / 1e9 if rate else None
    result["model_gflops_per_s"] = flops
    result["mfu"] = flops / rate_gflops if flops else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated jobs, in order (default {','.join(JOBS)})")
    p.add_argument("--rows", type=int, default=64, help="SFT rows, and pretraining texts, to build per job (default 64)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--data-seed", type=int, default=0, help="seed for building the data")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn it on for both sides (off by default)")
    p.add_argument("--no-packing", action="store_true", help="tunesmith without packing (padded rows like TRL)")
    p.add_argument("--same-rows-per-step", action="store_true",
                   help="tunesmith takes 8 packed rows per step, not as many documents per step as TRL's 8 padded rows")
    p.add_argument("--forward-tokens", type=int, default=None,
                   help="tunesmith's train.forward_tokens (default: its own default for the device)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the two sides' tokenisation")
    add_side_options(p)
    p.add_argument("--job", choices=list(JOBS), default="lora", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be at least 1")
    return args


def child_args(args: argparse.Namespace, job: str) -> list[str]:
    """The options the parent passes each side's child for `job`."""
    out = ["--job", job, "--model-path", args.model_path, "--max-length", str(args.max_length)]
    if args.forward_tokens:
        out += ["--forward-tokens", str(args.forward_tokens)]
    out += ["--same-rows-per-step"] * args.same_rows_per_step
    return out + ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--no-packing"] * args.no_packing


def finish_side(result: dict, job: str, rate_gflops: float) -> None:
    """Name the job in a side's result line and add its MFU."""
    result["job"] = job
    add_mfu(result, job, rate_gflops)


def main(argv: list[str] | None = None) -> None:
    """Parent: per job, build data, run each side in a child, print JSON lines. Child (--side): train one side."""
    args = parse_args(argv)
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if run_side_here(args, {"tunesmith": run_tunesmith, "trl": run_trl}):
        return

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        raise SystemExit(f"--jobs: unknown {', '.join(unknown)}; choose from {', '.join(JOBS)}")
    sides, root = start_parent(args, "sft")
    set_threads(args.threads)
    rate = matmul_gflops()
    print_line({"settings": {
        "jobs": jobs, "rows": args.rows, "max_length": args.max_length, "batch_size": BATCH_SIZE,
        "grad_accum": GRAD_ACCUM, "lr": {j: JOBS[j]["lr"] for j in jobs}, "lora": LORA,
        "gradient_checkpointing": args.gradient_checkpointing, "forward_tokens": args.forward_tokens,
        "device": args.device,
        "dtype": "float32" if args.device == "cpu" else "bfloat16", "threads": torch.get_num_threads(),
        "seed": SEED, "model_path": args.model_path, "workdir": str(root),
        "matmul_gflops": rate,  # the best (2048 x 2048) @ (2048 x 2048) matmul here, measured before the jobs
    }})
    for job in jobs:
        workdir = root / job
        workdir.mkdir(parents=True, exist_ok=True)
        records = make_texts(args.rows, args.data_seed) if JOBS[job]["method"] == "pretrain" else make_rows(
            args.rows, args.data_seed)
        write_jsonl(workdir / "train.jsonl", records)
        results = run_sides(Path(__file__).resolve(), sides, workdir, child_args(args, job), args.threads,
                            partial(finish_side, job=job, rate_gflops=rate))
        line = ratio_line(results, RATIO_KEYS, job=job)
        if line is not None:
            speed_goal, memory_goal = GPU_GOAL if args.device == "cuda" else GOALS[job]
            memory = line.get("peak_cuda_mib") or line.get("peak_rss_mib")
            line[f"goal_tokens_per_s_ge_{speed_goal}"] = (line.get("tokens_per_s") or 0) >= speed_goal
            line[f"goal_peak_memory_le_{memory_goal}"] = memory is not None and memory <= memory_goal
            line["goal_final_train_loss_within_2pct"] = (line.get("final_train_loss") or 9.0) <= 1.02
            if job == "lora":
                line["goal_mfu_ge_0.5"] = (results["tunesmith"].get("mfu") or 0) >= 0.5
            print_line(line)
        if "trl" in results and JOBS[job]["method"] != "pretrain" and not args.no_check:
            compare = partial(same_rows, max_length=args.max_length)
            print_line({"job": job, **check_tokens(workdir, args.model_path, compare)})


if __name__ == "__main__":
    main()
