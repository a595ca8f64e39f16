"""GRPO step time and memory: tunesmith's `method: grpo` against TRL's GRPOTrainer + PEFT LoRA, same model, prompts, settings.

Run from the repository root (`make bench` runs it after bench/dpo.py):

    python bench/grpo.py [--prompts 16] [--steps 4] [--group-size 4] [--max-new-tokens 64] [--threads N] [--workdir DIR]

The parent process builds the prompts once (seeded requests to summarise a topic of CPython's
`pydoc_data.topics`), writes them as JSONL (a `prompt` string per row), then runs each side in its own
child process (`--side tunesmith|trl`) so that peak RSS is per side. It prints a settings line, one JSON
line per side and one line of ratios (tunesmith / TRL).

Shared settings: LoRA r=16, alpha=32, dropout 0 on all linear layers; 4 prompts per step, --group-size
completions each (so 16 completions a step by default), at most --max-new-tokens tokens each, sampled at
temperature 1.0, top_p 1, no top-k; the same reward function on both sides (`share_of_e` below: the share
of the letters of a completion that are "e"); group-relative advantages scaled by the group's std;
PPO-clipped ratio (epsilon 0.2) plus 0.04 x KL (k3) to the reference, the policy with its adapter disabled;
the loss averaged over all completion tokens of the step (TRL's default loss_type "dapo", tunesmith's
`grpo.loss_normalization: token`); one pass and one optimizer update per step (TRL num_iterations=1,
tunesmith rl.update_epochs=1 with rl.minibatch_size null); AdamW at a constant lr 1e-5, no warm-up, no
weight decay, gradient clipping at 1.0; seed 0; float32; no gradient checkpointing. Both sides render the
prompts with the tokenizer's chat template (TRL gets them in conversational form) and stop a completion
at the model's EOS ids (the EOS counts in its length on both sides). Forward passes take 8 completions at
a time on both sides (tunesmith rl.micro_batch_size, TRL per_device_train_batch_size with
gradient_accumulation_steps = completions per step / 8, so steps_per_generation = the same and one
generation of all the step's completions precedes each optimizer step); both generate all the step's
completions as one batch.

TRL keeps its own defaults otherwise: epsilon 0.2, top_k 0, repetition_penalty 1, mask_truncated_completions
off, disable_dropout off, shuffle_dataset on, importance_sampling_level token, its default optimizer. What is
set on TRL's side only to match tunesmith: bf16/fp16 off (TRL defaults to bf16 mixed precision),
activation_checkpointing off (TRL defaults to on), learning_rate (TRL's GRPO default is 1e-6),
lr_scheduler_type constant (Trainer's default is linear decay), beta (default 0.0: no reference at all),
num_generations (default 8), max_completion_length (default 512), loss_type and scale_rewards spelled out
(their defaults), and logging every step with no saving, eval or reporting. No vLLM, no continuous batching.

Work that differs by design, not by setting: with one update per step both sides take the rollout
policy's log-probs from the update's own forward, detached (no separate pass; tunesmith then logs the
entropy and KL from the update), and tunesmith leaves groups whose rewards are all equal out of the update
(TRL trains on them; their advantage is 0, only the KL term acts). tunesmith trains each group's four
answers as one tree holding the prompt once (`rl.share_prompts`, its default; the same log-probs and
gradients as one document per answer), and generates with its own KV-cache sampler (a repeated prompt
prefilled once, finished rows leave the batch, LoRA merged into oneDNN-packed weights on CPU), TRL
with `model.generate`. Completions differ between
the sides (different samplers, different prompt order), so mean completion length is reported on both
sides: compare it before reading the time ratios.

Timing: model loading and data preparation excluded. Both sides take a wall-clock stamp at the end of
every optimizer step (tunesmith: its loop's on_step_end callback; TRL: a TrainerCallback's on_step_end);
seconds per step run from the end of step 1 to the end of the last step, so the first step is left out as
warm-up. Each timed step is split into rollout (generation) and training (the rest): tunesmith's
`time/rollout_s` (a statistic of the step the callback receives), and on TRL the time spent in
`GRPOTrainer._generate_single_turn` (prompt padding, `model.generate`, cutting at EOS). Both sides also
give the middle part: rewards and the no-grad log-prob passes (tunesmith `time/reward_s` + `time/measure_s`;
TRL the rest of `_generate_and_score_completions`), and the update (tunesmith `time/update_s`; TRL the step
minus `_generate_and_score_completions`, so its logging between steps lands there).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script.
from common import (
    LORA,
    LoopTimer,
    StepClock,
    add_side_options,
    machine_facts,
    peft_lora,
    print_line,
    ratio_line,
    read_jsonl,
    run_side_here,
    run_sides,
    start_parent,
    train_dtype,
    trl_timer,
    write_jsonl,
)

# The settings both sides share (with common.LORA); each side's code below maps them to its own config keys.
LR, PROMPTS_PER_STEP, MICRO_BATCH, SEED, MAX_GRAD_NORM = 1e-5, 4, 8, 0, 1.0
TEMPERATURE, TOP_P, KL_BETA, CLIP_EPS, MAX_LENGTH = 1.0, 1.0, 0.04, 0.2, 512
TEMPLATES = (
    "Summarise the Python documentation topic {topic!r} in one sentence.",
    "In one sentence, what does the Python reference say about {topic!r}?",
    "Explain the Python topic {topic!r} briefly, in a single sentence.",
    "Give a one-sentence summary of {topic!r} from the Python docs.",
)


# ---------------------------------------------------------------- data and reward


def make_prompts(num_prompts: int, seed: int) -> list[dict[str, str]]:
    """Seeded prompt rows asking for a one-sentence summary of a pydoc topic (distinct topics while they last)."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    chosen: list[str] = []
    while len(chosen) < num_prompts:
        chosen += rng.sample(names, min(len(names), num_prompts - len(chosen)))
    return [{"prompt": rng.choice(TEMPLATES).format(topic=name)} for name in chosen]


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string (tunesmith, TRL standard) or a list of messages (TRL conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role") == "assistant")


def share_of_e(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The share of a completion's letters that are "e" or "E" (0 for a completion without letters)."""
    out = []
    for completion in completions:
        letters = [c for c in _completion_text(completion).lower() if c.isalpha()]
        out.append(letters.count("e") / len(letters) if letters else 0.0)
    return out


# ---------------------------------------------------------------- shared measurements


def micro_batch(completions_per_step: int) -> int:
    """Completions per forward pass on both sides: MICRO_BATCH, or a divisor of the step's completions."""
    return math.gcd(MICRO_BATCH, completions_per_step)


def _mean(values: list[float]) -> float | None:
    """The mean, or None for no values."""
    return statistics.fmean(values) if values else None


def side_result(
    side: str,
    clock: StepClock,
    *,
    rollout_s: list[float],
    score_measure_s: list[float],
    lengths: list[float],
    rewards: list[float],
    kls: list[float],
    completions_per_step: int,
    **extra: Any,
) -> dict:
    """One side's result line: time per step (without step 1) split into rollout and training, memory, rewards.

    Every list holds one value per step: its rollout seconds, its reward + no-grad log-prob seconds, its mean
    completion length, mean reward and mean KL; the clock holds each step's wall-clock end.
    """
    stamps = clock.stamps
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..n
    timed = len(step_s)
    rollout, middle = rollout_s[1:], score_measure_s[1:]
    timed_s = stamps[-1] - stamps[0] if timed else None
    s_per_step = timed_s / timed if timed_s is not None else None
    rollout_per_step = _mean(rollout)
    generated = [n * completions_per_step for n in lengths[1:]]
    return {
        "side": side,
        "steps": len(stamps),
        "timed_steps": timed,
        "timed_s": timed_s,
        "s_per_step": s_per_step,
        "rollout_s_per_step": rollout_per_step,
        "training_s_per_step": s_per_step - rollout_per_step if timed and rollout_per_step is not None else None,
        "score_measure_s_per_step": _mean(middle),
        "update_s_per_step": _mean([s - r - m for s, r, m in zip(step_s, rollout, middle)]),
        "rollout_share": rollout_per_step / s_per_step if timed and rollout_per_step is not None and s_per_step else None,
        "first_step_s": stamps[0] - clock.begin if stamps else None,  # warm-up, not in the figures above
        "completions_per_step": completions_per_step,
        "mean_completion_length": _mean(lengths),
        "timed_mean_completion_length": _mean(lengths[1:]),
        # generated tokens (EOS included) per second of rollout, timed steps only
        "rollout_tokens_per_s": sum(generated) / sum(rollout) if rollout and sum(rollout) > 0 else None,
        "first_reward": rewards[0] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "final_kl": kls[-1] if kls else None,
        # CPU seconds of the whole process over the whole loop (first step included): less sensitive than
        # wall time to other load on the machine.
        "cpu_s": clock.cpu_s,
        "per_step": {
            "step_s": [round(stamps[0] - clock.begin, 3)] + [round(s, 3) for s in step_s] if stamps else [],
            "rollout_s": [round(s, 3) for s in rollout_s],
            "completion_length": [round(n, 2) for n in lengths],
            "reward": [round(r, 4) for r in rewards],
        },
        **machine_facts(clock),  # peak RSS when training ended (and CUDA memory), RSS at its start, threads, load
        **extra,
    }


# ---------------------------------------------------------------- the two sides


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict:
    """GRPO with tunesmith (`method: grpo`), timed by its loop callbacks (stamps, and the steps' time/* statistics)."""
    import tunesmith

    run_dir = workdir / "tunesmith-run"
    completions = PROMPTS_PER_STEP * args.group_size
    cfg = {
        "method": "grpo",
        "model": args.model_path,  # the folder the parent resolved (by default, the default model's), as TRL's
        "output_dir": str(run_dir),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": dict(LORA),
        "rl": {
            # file-path form: tunesmith imports this very file (its __main__ guard keeps it from running)
            "rewards": [f"{Path(__file__).resolve()}:share_of_e"],
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "top_k": 0,
            "clip_eps": CLIP_EPS,
            "kl_coef": KL_BETA,
            "update_epochs": 1,
            "minibatch_size": None,  # one optimizer update over all of a step's completions
            "micro_batch_size": micro_batch(completions),
            "samples_every": 0,
        },
        "grpo": {"scale_rewards": True, "loss_normalization": "token"},
        "train": {
            "max_steps": args.steps,
            # prompts per step (per rank under torchrun, as bench/rl_ranks.py runs this side: the same global batch)
            "batch_size": PROMPTS_PER_STEP // int(os.environ.get("WORLD_SIZE", "1")),
            "grad_accum": 1,
            "lr": LR,
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 1.0,  # with no warm-up: a constant learning rate, as on the TRL side
            "max_grad_norm": MAX_GRAD_NORM,
            "max_length": MAX_LENGTH,
            "seed": SEED,
            "eval_every": 0,
            "save_every": 0,
            "log_every": 1,
            "gradient_checkpointing": False,
        },
        "load": {"dtype": train_dtype()},
        "eval": {"before": False},
        "output": {"merge": False, "save_adapter": False},
    }

    timer = LoopTimer()
    result = tunesmith.train(cfg, callbacks=[timer])
    steps = timer.stats  # one dict of statistics per step, as its metrics.jsonl line has them
    return side_result(
        "tunesmith",
        timer.clock,
        rollout_s=[r["time/rollout_s"] for r in steps],
        score_measure_s=[r["time/reward_s"] + r["time/measure_s"] for r in steps],
        lengths=[r["completion_length"] for r in steps],
        rewards=[r["reward"] for r in steps],
        kls=[r["kl"] for r in steps if "kl" in r],
        completions_per_step=completions,
        tokens=timer.clock.tokens[-1] if timer.clock.tokens else None,  # prompt + completion tokens of every step
        frac_zero_adv_groups=_mean([r.get("frac_zero_adv_groups", 0.0) for r in steps]),
        final_loss=timer.losses[-1] if timer.losses else None,
        trainable_params=result.parameters.get("trainable"),
    )


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    """GRPO with TRL's GRPOTrainer + PEFT LoRA on the same prompts in conversational form."""
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer

    class TimedGRPOTrainer(trl.GRPOTrainer):
        """GRPOTrainer that times its generation and its whole generate-and-score phase, per optimizer step."""

        generate_s: dict[int, float]
        prepare_s: dict[int, float]

        def _generate_single_turn(self, *a: Any, **kw: Any) -> Any:
            """Time the pure generation call (padding, model.generate, cutting at EOS)."""
            start = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                step = self.state.global_step
                self.generate_s[step] = self.generate_s.get(step, 0.0) + time.perf_counter() - start

        def _generate_and_score_completions(self, *a: Any, **kw: Any) -> Any:
            """Time generation plus rewards, reference log-probs and advantages."""
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*a, **kw)
            finally:
                step = self.state.global_step
                self.prepare_s[step] = self.prepare_s.get(step, 0.0) + time.perf_counter() - start

    records = read_jsonl(workdir / "train.jsonl")
    # The same prompts as tunesmith reads, in TRL's conversational form so TRL applies the chat template.
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    completions = PROMPTS_PER_STEP * args.group_size
    per_device = micro_batch(completions)
    config = trl.GRPOConfig(
        output_dir=str(workdir / "trl-run"),
        # In GRPO, per_device_train_batch_size counts completions, not prompts; with steps_per_generation left
        # unset it equals gradient_accumulation_steps, so generation_batch_size = per_device x accumulation =
        # the step's completions: one generation, then one optimizer step over all of them.
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=completions // per_device,
        num_generations=args.group_size,  # TRL's default is 8
        max_completion_length=args.max_new_tokens,  # TRL's default is 512
        temperature=TEMPERATURE,
        top_p=TOP_P,
        beta=KL_BETA,  # TRL's default 0.0 loads no reference at all
        num_iterations=1,
        epsilon=CLIP_EPS,
        loss_type="dapo",  # TRL 1.16's default: token-level mean over the whole generation batch
        scale_rewards="group",  # the default (True maps to it)
        learning_rate=LR,  # TRL's GRPO default is 1e-6
        weight_decay=0.0,
        lr_scheduler_type="constant",  # Trainer's default is linear decay; tunesmith runs constant here
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        max_steps=args.steps,
        seed=SEED,
        bf16=train_dtype() == "bfloat16",  # TRL defaults to bf16 mixed precision; both sides: float32 on CPU, bf16 on CUDA
        fp16=False,
        activation_checkpointing=False,  # TRL defaults to on (transformers 5's name for gradient_checkpointing)
        model_init_kwargs={"dtype": train_dtype(), "attn_implementation": "sdpa"},
        use_cpu=not torch.cuda.is_available(),
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
    )
    timer = trl_timer()
    trainer = TimedGRPOTrainer(
        model=args.model_path,
        reward_funcs=share_of_e,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora(),  # with beta > 0 and no ref model: the reference is the policy with its adapter disabled
        callbacks=[timer],
    )
    timer.trainer = trainer
    trainer.generate_s, trainer.prepare_s = {}, {}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "reward" in e]
    steps = len(timer.clock.stamps)
    generate = [trainer.generate_s.get(i, 0.0) for i in range(steps)]
    prepare = [trainer.prepare_s.get(i, 0.0) for i in range(steps)]
    return side_result(
        "trl",
        timer.clock,
        rollout_s=generate,
        score_measure_s=[p - g for p, g in zip(prepare, generate)],
        lengths=[e["completions/mean_length"] for e in logs],
        rewards=[e["reward"] for e in logs],
        kls=[e["kl"] for e in logs if "kl" in e],
        completions_per_step=completions,
        tokens=int(trainer.state.num_input_tokens_seen),  # prompt + completion tokens of every step
        final_loss=logs[-1].get("loss") if logs else None,
        frac_zero_adv_groups=_mean([e.get("frac_reward_zero_std", 0.0) for e in logs]),  # TRL trains on them anyway
        clipped_ratio=_mean([e.get("completions/clipped_ratio", 0.0) for e in logs]),  # hit max_completion_length
        generation_batch_size=config.generation_batch_size,
        steps_per_generation=config.steps_per_generation,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    )


# ---------------------------------------------------------------- parent


def child_args(args: argparse.Namespace) -> list[str]:
    """The options the parent passes each side's child."""
    return ["--model-path", args.model_path, "--steps", str(args.steps), "--group-size", str(args.group_size),
            "--max-new-tokens", str(args.max_new_tokens)]


RATIO_KEYS = ("s_per_step", "rollout_s_per_step", "training_s_per_step", "score_measure_s_per_step",
              "update_s_per_step", "rollout_tokens_per_s", "peak_rss_mib", "peak_cuda_mib", "cpu_s",
              "timed_mean_completion_length", "mean_completion_length")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompt rows to build (default 16; 4 are used per step)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps on both sides (default 4; the first is warm-up)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (default 4; TRL num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="longest completion (default 64; TRL max_completion_length)")
    p.add_argument("--data-seed", type=int, default=0, help="seed for building the prompts")
    add_side_options(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or args.max_new_tokens < 1:
        p.error("--steps, --prompts and --max-new-tokens must be at least 1")
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (GRPO compares completions of the same prompt)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parent: build prompts, run each side in a child, print JSON lines. Child (--side): train and write its result."""
    args = parse_args(argv)
    if run_side_here(args, {"tunesmith": run_tunesmith, "trl": run_trl}):
        return

    sides, workdir = start_parent(args, "grpo")
    write_jsonl(workdir / "train.jsonl", make_prompts(args.prompts, args.data_seed))
    completions = PROMPTS_PER_STEP * args.group_size
    print_line({"settings": {
        "prompts": args.prompts, "steps": args.steps, "prompts_per_step": PROMPTS_PER_STEP,
        "group_size": args.group_size, "completions_per_step": completions,
        "micro_batch": micro_batch(completions), "max_new_tokens": args.max_new_tokens,
        "temperature": TEMPERATURE, "top_p": TOP_P, "kl_beta": KL_BETA, "clip_eps": CLIP_EPS, "lr": LR,
        "loss_normalization": "token (TRL dapo)", "scale_rewards": True, "reward": "share_of_e", "lora": LORA,
        "threads": args.threads, "dtype": train_dtype(), "seed": SEED,
        "model_path": args.model_path, "workdir": str(workdir),
    }})
    results = run_sides(Path(__file__).resolve(), sides, workdir, child_args(args), args.threads)
    line = ratio_line(results, RATIO_KEYS)
    if line is not None:
        print_line(line)


if __name__ == "__main__":
    main()
