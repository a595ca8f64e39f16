"""DPO throughput and memory: tunesmith's `method: dpo` against TRL's DPOTrainer + PEFT LoRA, same model, data, settings.

Run from the repository root (`make bench` runs it after bench/sft.py):

    python bench/dpo.py [--pairs 64] [--steps 8] [--max-length 512] [--threads N] [--workdir DIR]

The parent process builds the data once (preference pairs cut from CPython's `pydoc_data.topics`, seeded:
the prompt asks to quote a passage, `chosen` is that passage, `rejected` a slice of similar length from
another topic or the passage with its sentences shuffled), writes it as JSONL (prompt/chosen/rejected
strings), then runs each side in its own child process (`--side tunesmith|trl`) so that peak RSS is per
side. It prints a settings line, one JSON line per side, one line of ratios (tunesmith / TRL) and one line
that compares how the two sides tokenised the pairs.

Shared settings: LoRA r=16, alpha=32, dropout 0 on all linear layers; sigmoid DPO loss, beta 0.1; the
reference is the policy with its adapter disabled (TRL does this itself with `peft_config` and no
`ref_model`); AdamW at a constant lr 5e-5, no warm-up, no weight decay, gradient clipping at 1.0; 8 pairs
per step, no gradient accumulation; each sequence (prompt + answer, chat template applied on both sides)
at most --max-length tokens; seed 0; float32; no gradient checkpointing unless asked for.

TRL keeps its own defaults otherwise: padding_free off (TRL 1.16 ignores it anyway), precompute_ref_log_probs
off, truncation_mode keep_start, pad_to_multiple_of auto (no padding on CPU/CUDA), disable_dropout on, its
default optimizer. What is set on TRL's side only to match tunesmith: bf16/fp16 off (TRL defaults to bf16
mixed precision), activation_checkpointing (transformers 5's name for gradient_checkpointing) off (TRL
defaults to on), lr_scheduler_type constant (Trainer defaults to linear decay), learning_rate (TRL's DPO
default is 1e-6), max_length (default 1024), and logging every step with no saving, eval or reporting.
tunesmith runs without packing by default (so each step is exactly 8 pairs, as on TRL's side);
--packing turns its default packing back on (a step is then 8 rows of several pairs each).

Timing: training only, model loading and data preparation excluded. Both sides take a wall-clock stamp at
the end of every optimizer step (tunesmith: its loop's on_step_end callback; TRL: a TrainerCallback's
on_step_end); throughput runs from the end of step 1 to the end of the last step, so the first step is
left out as warm-up. Tokens are counted the same way on both sides: the non-padding tokens of both
sequences (prompt + chosen, prompt + rejected) of every pair trained on (tunesmith's step tokens, TRL's
sum of the attention mask, its `num_tokens` metric). Pairs: what each tunesmith step's loss was averaged
over (its `count`), and on TRL's side half the rows of every micro-batch.
"""

from __future__ import annotations

import argparse
import random
import re
from functools import partial
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script.
from common import (
    LORA,
    PROMPTS,
    LoopTimer,
    StepClock,
    add_side_options,
    check_tokens,
    loss_summary,
    machine_facts,
    peft_lora,
    print_line,
    ratio_line,
    run_side_here,
    run_sides,
    save_trl_tokens,
    slice_at_word,
    start_parent,
    train_dtype,
    trl_timer,
    write_jsonl,
)

# The settings both sides share (with common.LORA); each side's code below maps them to its own config keys.
LR, BATCH_SIZE, GRAD_ACCUM, SEED, MAX_GRAD_NORM = 5e-5, 8, 1, 0, 1.0
DPO_LOSS, BETA = "sigmoid", 0.1


# ---------------------------------------------------------------- data


def _shuffled_sentences(text: str, rng: random.Random) -> str | None:
    """`text` with its sentences in a different order, or None when it has too few to shuffle."""
    sentences = [s for s in re.split(r"(?<=[.!?:])\s+", text.strip()) if s]
    if len(sentences) < 3:
        return None
    for _ in range(5):
        order = sentences[:]
        rng.shuffle(order)
        if order != sentences:
            return " ".join(order)
    return None


def make_pairs(num_pairs: int, seed: int, min_chars: int = 80, max_chars: int = 1200) -> list[dict[str, str]]:
    """Seeded prompt/chosen/rejected pairs: chosen quotes a pydoc topic, rejected is another topic or shuffled."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    pairs = []
    while len(pairs) < num_pairs:
        length = rng.randint(min_chars, max_chars)
        name = rng.choice([n for n in names if len(topics[n]) >= length])
        chosen = slice_at_word(topics[name], length, rng)
        rejected = _shuffled_sentences(chosen, rng) if rng.random() < 0.5 else None
        if rejected is None:
            # A passage of similar length (within 15%) from a different topic.
            target = rng.randint(int(0.85 * len(chosen)), int(1.15 * len(chosen)) + 1)
            other = rng.choice([n for n in names if n != name and len(topics[n]) >= target])
            rejected = slice_at_word(topics[other], target, rng)
        if not chosen.strip() or not rejected.strip() or rejected == chosen:
            continue
        opening = " ".join(chosen.split()[:6])
        prompt = rng.choice(PROMPTS).format(topic=name, opening=opening)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# ---------------------------------------------------------------- shared measurements


def timed_steps(clock: StepClock) -> dict[str, float | int | None]:
    """Throughput from the end of step 1 to the end of the last step (step 1 is warm-up, left out)."""
    stamps, tokens, pairs = clock.stamps, clock.tokens, clock.items
    if len(stamps) < 2:
        return {"timed_steps": 0, "timed_s": None, "steps_per_s": None, "s_per_step": None,
                "pairs_per_s": None, "tokens_per_s": None}
    timed_s = stamps[-1] - stamps[0]
    steps = len(stamps) - 1
    ok = timed_s > 0
    return {
        "timed_steps": steps,
        "timed_s": timed_s,
        "steps_per_s": steps / timed_s if ok else None,
        "s_per_step": timed_s / steps,
        "pairs_per_s": (pairs[-1] - pairs[0]) / timed_s if ok else None,
        "tokens_per_s": (tokens[-1] - tokens[0]) / timed_s if ok else None,
    }


def side_result(side: str, clock: StepClock, losses: list[float], **extra: Any) -> dict:
    """One side's result line: throughput without the first step, time per step, peak memory, losses."""
    return {
        "side": side,
        **timed_steps(clock),
        "steps": len(clock.stamps),
        "pairs": int(clock.items[-1]) if clock.items else 0,
        "tokens": clock.tokens[-1] if clock.tokens else 0,
        "first_step_s": clock.stamps[0] - clock.begin if clock.stamps else None,  # warm-up, not in the throughput
        **loss_summary(losses),
        # CPU seconds of the whole process over the whole loop (first step included): less sensitive than
        # wall time to other load on the machine.
        "cpu_s": clock.cpu_s,
        **machine_facts(clock),  # peak RSS when training ended (and CUDA memory), RSS at its start, threads, load
        **extra,
    }


# ---------------------------------------------------------------- the two sides


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict:
    """DPO with tunesmith (`method: dpo`), timed by its loop callbacks."""
    import tunesmith

    run_dir = workdir / "tunesmith-run"
    cfg = {
        "method": "dpo",
        "model": args.model_path,  # the folder the parent resolved (by default, the default model's), as TRL's
        "output_dir": str(run_dir),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": dict(LORA),
        "dpo": {"loss": DPO_LOSS, "beta": BETA, "precompute_ref": False},
        "train": {
            "max_steps": args.steps,
            "batch_size": BATCH_SIZE,
            "grad_accum": GRAD_ACCUM,
            "lr": LR,
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 1.0,  # with no warm-up: a constant learning rate, as on the TRL side
            "max_grad_norm": MAX_GRAD_NORM,
            "max_length": args.max_length,
            "packing": args.packing,
            "seed": SEED,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 1,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "load": {"dtype": train_dtype()},
        "eval": {"before": False},
        "output": {"merge": False, "save_adapter": False},
    }

    timer = LoopTimer()  # a DPO step's `count` is its pairs, over all its forward passes (train.forward_tokens)
    result = tunesmith.train(cfg, callbacks=[timer])
    stats = result.train_stats
    return side_result(
        "tunesmith",
        timer.clock,
        losses=[loss for loss in timer.losses if loss is not None],
        final_accuracy=timer.stats[-1].get("rewards/accuracy") if timer.stats else None,
        packing=args.packing,
        data_pairs=stats.num_documents,
        data_rows=stats.num_rows,
        data_tokens=stats.num_tokens,
        truncated_pairs=stats.num_truncated,
        trainable_params=result.parameters.get("trainable"),
    )


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    """DPO with TRL's DPOTrainer + PEFT LoRA on the same pairs in conversational form (TRL pads, no packing)."""
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer

    class CountingDPOTrainer(trl.DPOTrainer):
        """DPOTrainer that counts the pairs it trains on (a batch holds its chosen rows, then its rejected)."""

        items_seen = 0  # pairs, read by the timer at the end of every step

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kwargs: Any) -> Any:
            """Count the pairs of this micro-batch, then train on it as DPOTrainer does."""
            self.items_seen += int(inputs["input_ids"].shape[0]) // 2
            return super().training_step(model, inputs, *rest, **kwargs)

    # The same file as tunesmith reads, turned into TRL's conversational form so TRL applies the chat template.
    raw = datasets.load_dataset(
        "json", data_files=str(workdir / "train.jsonl"), split="train", cache_dir=str(workdir / "hf-datasets")
    )
    dataset = raw.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        },
        remove_columns=raw.column_names,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    config = trl.DPOConfig(
        output_dir=str(workdir / "trl-run"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        learning_rate=LR,  # TRL's DPO default is 1e-6
        weight_decay=0.0,
        lr_scheduler_type="constant",  # Trainer's default is linear decay; tunesmith runs constant here
        max_grad_norm=MAX_GRAD_NORM,
        max_steps=args.steps,
        max_length=args.max_length,  # per sequence: prompt + chosen, prompt + rejected (TRL's default 1024)
        loss_type=[DPO_LOSS],
        beta=BETA,
        seed=SEED,
        bf16=train_dtype() == "bfloat16",  # TRL defaults to bf16 mixed precision; both sides: float32 on CPU, bf16 on CUDA
        fp16=False,
        activation_checkpointing=args.gradient_checkpointing,  # TRL defaults to on; tunesmith to off
        model_init_kwargs={"dtype": train_dtype(), "attn_implementation": "sdpa"},
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
    )
    timer = trl_timer()
    trainer = CountingDPOTrainer(
        model=args.model_path,
        ref_model=None,  # with peft_config: the reference is the policy with its adapter disabled
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora(),
        callbacks=[timer],
    )
    timer.trainer = trainer
    trainer.train()
    prepared = trainer.train_dataset
    logs = [e for e in trainer.state.log_history if "loss" in e]
    result = side_result(
        "trl",
        timer.clock,
        losses=[e["loss"] for e in logs],
        final_accuracy=logs[-1].get("rewards/accuracies") if logs else None,
        packing=False,
        data_pairs=len(prepared),
        data_rows=len(prepared),
        data_tokens=sum(
            min(len(p) + len(a), args.max_length)
            for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
            for a in (c, r)
        ),
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    )
    save_trl_tokens(workdir, {k: prepared[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return result


# ---------------------------------------------------------------- parent


def same_pairs(tokenizer: Any, trl_rows: dict[str, list[list[int]]], workdir: Path, max_length: int) -> dict:
    """TRL's tokenised pairs against tunesmith's: whole sequences, and the answer tokens each side scores."""
    from tunesmith.data.preference import build_pairs
    from tunesmith.ops.losses import IGNORE_INDEX

    docs = build_pairs(str(workdir / "train.jsonl"), tokenizer, max_length=max_length, packing=False).rows
    same = scored_ts = scored_trl = 0
    for doc, prompt, chosen, rejected in zip(docs, trl_rows["prompt_ids"], trl_rows["chosen_ids"], trl_rows["rejected_ids"]):
        trl_seqs = [(prompt + answer)[:max_length] for answer in (chosen, rejected)]
        start = 0
        for n, trl_seq in zip(doc.seq_lens, trl_seqs):
            same += doc.input_ids[start : start + n] == trl_seq
            scored_ts += sum(label != IGNORE_INDEX for label in doc.labels[start : start + n])
            scored_trl += max(0, len(trl_seq) - len(prompt))
            start += n
    return {
        "pairs": [len(docs), len(trl_rows["prompt_ids"])],
        "sequences_with_same_input_ids": same,
        "sequences": 2 * min(len(docs), len(trl_rows["prompt_ids"])),
        "scored_tokens_tunesmith": scored_ts,
        "scored_tokens_trl": scored_trl,
    }


def child_args(args: argparse.Namespace) -> list[str]:
    """The options the parent passes each side's child."""
    out = ["--model-path", args.model_path, "--max-length", str(args.max_length), "--steps", str(args.steps)]
    return out + ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--packing"] * args.packing


RATIO_KEYS = ("steps_per_s", "pairs_per_s", "tokens_per_s", "s_per_step", "peak_rss_mib", "peak_cuda_mib", "cpu_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=64, help="preference pairs to build (default 64)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps on both sides (default 8; the first is warm-up)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence, prompt + answer (default 512)")
    p.add_argument("--data-seed", type=int, default=0, help="seed for building the pairs")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn it on for both sides (off by default)")
    p.add_argument("--packing", action="store_true",
                   help="tunesmith packs several pairs into each of its 8 rows (off by default: 8 pairs a step, as TRL)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the two sides' tokenisation")
    add_side_options(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.pairs < 1:
        p.error("--steps and --pairs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parent: build data, run each side in a child, print JSON lines. Child (--side): train and write its result."""
    args = parse_args(argv)
    if run_side_here(args, {"tunesmith": run_tunesmith, "trl": run_trl}):
        return

    sides, workdir = start_parent(args, "dpo")
    write_jsonl(workdir / "train.jsonl", make_pairs(args.pairs, args.data_seed))
    print_line({"settings": {
        "pairs": args.pairs, "steps": args.steps, "max_length": args.max_length, "batch_pairs": BATCH_SIZE,
        "grad_accum": GRAD_ACCUM, "lr": LR, "loss": DPO_LOSS, "beta": BETA, "lora": LORA,
        "gradient_checkpointing": args.gradient_checkpointing, "tunesmith_packing": args.packing,
        "threads": args.threads, "dtype": train_dtype(), "seed": SEED,
        "model_path": args.model_path, "workdir": str(workdir),
    }})
    results = run_sides(Path(__file__).resolve(), sides, workdir, child_args(args), args.threads)
    line = ratio_line(results, RATIO_KEYS)
    if line is not None:
        print_line(line)
    if "trl" in results and not args.no_check:
        print_line(check_tokens(workdir, args.model_path, partial(same_pairs, max_length=args.max_length)))


if __name__ == "__main__":
    main()
