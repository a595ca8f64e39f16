"""Peak memory per rank and tokens/s of full SFT on several ranks: FSDP2 (`train.distributed: fsdp`) against DDP,
the same model, data and global batch.

Run from the repository root:

    python bench/fsdp.py [--modes ddp,fsdp] [--nproc 2] [--rows 32] [--max-length 256] [--batch-size 2] [--steps 4]
                         [--threads 1] [--gradient-checkpointing]

The parent builds prompt/completion rows (seeded slices of CPython's pydoc topics, as bench/sft.py does), then for
each mode launches `torchrun --standalone --nproc-per-node N bench/fsdp.py --mode MODE` (gloo on CPU, NCCL on
CUDA). Every rank trains through `tunesmith.train` with bench/common.py's LoopTimer and writes its own result:
peak RSS when training ended (model loading included: every rank loads the whole model before FSDP shards it),
peak RSS when the process ended (with the outputs: under FSDP rank 0 gathers the weights into a whole copy of the
model), tokens/s, and peak CUDA memory on a GPU. The parent prints one JSON line per mode and rank, then one line
per rank of fsdp/ddp ratios. The goal on CPU (issue 17): peak RSS per rank under FSDP <= 0.6x DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LoopTimer, default_model_path, machine_facts, peak_rss_mib, print_line, write_jsonl  # noqa: E402
from sft import make_rows  # noqa: E402

MODES = ("ddp", "fsdp")
RATIO_KEYS = ("peak_rss_train_mib", "peak_rss_process_mib", "rss_at_train_start_mib", "tokens_per_s", "peak_cuda_mib")
GOAL = 0.6  # fsdp / ddp peak RSS per rank, at most


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated train.distributed values to run")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) per run")
    p.add_argument("--rows", type=int, default=32, help="prompt/completion rows of data")
    p.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=2, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="train.gradient_checkpointing: recompute activations, so the model's state dominates memory")
    p.add_argument("--model-path", default=None, help="HF folder to train (default: tunesmith's default model)")
    p.add_argument("--workdir", default=None, help="folder for data and runs (default: a new temp folder)")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)  # a rank of one run
    return p.parse_args(argv)


def config(args: argparse.Namespace, workdir: Path, mode: str) -> dict[str, Any]:
    """Full SFT of the model on the bench rows under `mode`; no eval, no checkpoint, no report."""
    return {
        "method": "sft",
        "model": args.model_path,
        "output_dir": str(workdir / mode),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": None,
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 2e-5, "max_length": args.max_length,
                  "warmup_ratio": 0.0, "eval_every": 0, "save_every": 0, "save_every_minutes": 0, "seed": 0,
                  "distributed": mode, "gradient_checkpointing": args.gradient_checkpointing},
        "log": {"report_to": []},
    }


def run_rank(args: argparse.Namespace) -> None:
    """One rank of one run (under torchrun): train, then write this rank's result for the parent."""
    import torch

    import tunesmith

    torch.set_num_threads(args.threads)
    workdir, rank = Path(args.workdir), int(os.environ.get("RANK", "0"))
    timer = LoopTimer()
    tunesmith.train(config(args, workdir, args.mode), callbacks=[timer])
    clock = timer.clock
    tokens = clock.tokens[-1] if clock.tokens else 0
    result = {
        "bench": "fsdp", "mode": args.mode, "rank": rank, "ranks": int(os.environ.get("WORLD_SIZE", "1")),
        "max_length": args.max_length, "batch_size": args.batch_size, "gradient_checkpointing": args.gradient_checkpointing,
        "steps": len(clock.stamps), "tokens": tokens, "train_s": clock.train_s,
        "tokens_per_s": tokens / clock.train_s if clock.train_s > 0 else None,
        "losses": [round(x, 5) if x is not None else None for x in timer.losses],
        "peak_rss_train_mib": clock.peak_rss,  # when training ended: loading and training
        "peak_rss_process_mib": peak_rss_mib(),  # when the process ended: the outputs too
        **{k: v for k, v in machine_facts(clock).items() if k != "peak_rss_mib"},
    }
    (workdir / f"{args.mode}-rank{rank}.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """Parent: the data, one torchrun launch per mode, the JSON lines."""
    args = parse_args(argv)
    if args.mode:
        run_rank(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.model_path = args.model_path or default_model_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-bench-fsdp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_jsonl(workdir / "train.jsonl", make_rows(args.rows, seed=0, max_chars=600))
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--mode", mode, "--workdir", str(workdir), "--model-path", args.model_path,
               "--rows", str(args.rows), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--threads", str(args.threads),
               *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (workdir / f"{mode}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: torchrun exited with {proc.returncode}; see {workdir / f'{mode}.log'}")
        results[mode] = [json.loads((workdir / f"{mode}-rank{r}.json").read_text()) for r in range(args.nproc)]
        for line in results[mode]:
            print_line(line)
    if "ddp" in results and "fsdp" in results:
        for ddp, fsdp in zip(results["ddp"], results["fsdp"]):
            ratio = {k: fsdp[k] / ddp[k] for k in RATIO_KEYS if fsdp.get(k) and ddp.get(k)}
            print_line({"bench": "fsdp", "ratio": "fsdp/ddp", "rank": ddp["rank"], **ratio,
                        "goal_peak_rss_train": GOAL, "met": ratio.get("peak_rss_train_mib", 1.0) <= GOAL})
    print(f"wrote {workdir}: the runs, each mode's log and each rank's result", file=sys.stderr)


if __name__ == "__main__":
    main()
