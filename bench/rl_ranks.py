"""GRPO on one process against the same run on 2 ranks under torchrun (gloo on CPU): step time, memory per rank,
and whether the two sample, score and learn alike.

Run from the repository root:

    python bench/rl_ranks.py [--steps 4] [--group-size 4] [--max-new-tokens 64] [--threads 2] [--workdir DIR]

Both sides are bench/grpo.py's tunesmith side (its settings, prompts and reward; 4 prompts a step, 16
completions): `one` in one process with --threads torch threads, `two` as `torchrun --nproc_per_node 2` with
--threads / 2 threads per rank (2 prompts a rank), so both use the same cores. Each writes one JSON line
(bench/grpo.py's `side_result`, per rank for `two`); a last line sets them side by side: seconds per step
and its parts (rank 0's for `two`), peak RSS per process, and the largest difference between the sides'
per-step mean rewards and losses (one process and 2 ranks sample the same answers: each answer has its own seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is on sys.path when this file runs as a script.
import grpo
from common import ROOT, default_model_path, print_line, write_result

SIDES = ("one", "two")


def run_rank(args: argparse.Namespace) -> None:
    """A child (one process, or one torchrun rank): bench/grpo.py's tunesmith side, its result per rank."""
    import torch

    torch.set_num_threads(args.threads_per_process)
    workdir = Path(args.workdir)
    result = grpo.run_tunesmith(args, workdir)
    metrics = [json.loads(x) for x in (workdir / "tunesmith-run/metrics.jsonl").read_text().splitlines()]
    result["per_step_loss"] = [m["loss"] for m in metrics if "loss" in m]
    result["per_step_reward_exact"] = [m["reward"] for m in metrics if "reward" in m]
    write_result(workdir, f"{args.side}-rank{os.environ.get('RANK', '0')}", result)


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Launch one side (plain, or under torchrun) in its own folder; its per-rank result lines."""
    folder = workdir / side
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(workdir / "train.jsonl", folder / "train.jsonl")
    ranks = 2 if side == "two" else 1
    threads = max(1, args.threads // ranks)
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    cmd = [*launcher, str(Path(__file__).resolve()), "--side", side, "--workdir", str(folder),
           "--model-path", args.model_path, "--steps", str(args.steps), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--threads-per-process", str(threads)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"--- {side}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed (exit status {proc.returncode}); its output is above")
    results = [json.loads((folder / f"{side}-rank{r}.json").read_text()) for r in range(ranks)]
    for rank, result in enumerate(results):
        result.update(side=side, rank=rank, process_s=time.perf_counter() - started)
        result.pop("per_step", None)
        print_line(result)
    return results


def compare(one: list[dict], two: list[dict]) -> dict:
    """The sides next to each other: time per step and its parts (rank 0), peak RSS per process, agreement."""
    a, b = one[0], two[0]

    def largest_gap(key: str) -> float:
        return max(abs(x - y) for x, y in zip(a[key], b[key]))

    keys = ("s_per_step", "rollout_s_per_step", "score_measure_s_per_step", "update_s_per_step")
    return {
        "compare": "two ranks / one process",
        **{k: b[k] / a[k] if a.get(k) and b.get(k) is not None else None for k in keys},
        "peak_rss_mib_one": a["peak_rss_mib"],
        "peak_rss_mib_per_rank_two": [r["peak_rss_mib"] for r in two],
        "max_reward_gap": largest_gap("per_step_reward_exact"),
        "max_loss_gap": largest_gap("per_step_loss"),
        "mean_completion_length": [a["mean_completion_length"], b["mean_completion_length"]],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4; the first is warm-up)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (default 64)")
    p.add_argument("--prompts", type=int, default=16, help="prompt rows to build (default 16; 4 a step)")
    p.add_argument("--data-seed", type=int, default=0, help="seed for building the prompts")
    p.add_argument("--threads", type=int, default=2, help="torch threads of a side, shared out among its ranks")
    p.add_argument("--model-path", default=None, help="HF folder to train (default: tunesmith's default model)")
    p.add_argument("--workdir", default=None, help="folder for data and runs (default: a new temp folder)")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads-per-process", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parent: build the prompts, run both sides, print JSON lines. Child (--side): train and write its result."""
    args = parse_args(argv)
    if args.side:
        run_rank(args)
        return
    args.model_path = args.model_path or default_model_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-bench-rl-ranks-"))
    workdir.mkdir(parents=True, exist_ok=True)
    grpo.write_jsonl(workdir / "train.jsonl", grpo.make_prompts(args.prompts, args.data_seed))
    print_line({"settings": {"steps": args.steps, "prompts_per_step": grpo.PROMPTS_PER_STEP,
                             "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                             "threads": args.threads, "model_path": args.model_path, "workdir": str(workdir)}})
    one = run_side("one", args, workdir)
    two = run_side("two", args, workdir)
    print_line(compare(one, two))
    print(f"wrote the runs under {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
