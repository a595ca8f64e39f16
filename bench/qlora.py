"""QLoRA against LoRA on the same run: peak RSS, tokens/s and losses of LoRA SFT on a full-precision base, on a base held in
4-bit NF4 (or 8-bit) by bitsandbytes (`load.quantize`, what tunesmith uses), and on a base held in torchao's NF4 tensor.

Every side is the same tunesmith run (bench/sft.py's LoRA job: its rows, LoRA r=16 on all linear layers, 8 documents
a step, constant lr), timed through the loop's callbacks, each in its own process so its peak RSS is its own:

  lora          the full-precision base (load.quantize: null; float32 on CPU, bfloat16 on CUDA)
  nf4, int8     load.quantize: nf4 / int8 (bitsandbytes, quantized as the weights load)
  torchao_nf4   the float32 base loaded, then, before the first step, every LoRA layer's frozen base weight replaced by
                torchao's NF4Tensor (block 64, as QLoRA) and the other frozen weights copied out of the memory-mapped
                file (as load.quantize does); F.linear on NF4 de-quantizes and multiplies, with a backward.
                Not a tunesmith option: measured here to choose the CPU backend of `load.quantize`.

    python bench/qlora.py --rows 32 --threads 1                                    # lora, nf4, int8
    python bench/qlora.py --rows 32 --threads 1 --sides torchao_nf4,int8,nf4,lora  # torchao too (the bench extra)

Each side prints one JSON line (peak_cuda_mib too on a GPU); the last line gives each side's tokens/s and peak RSS
over the lora side's.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

from common import (
    LORA,
    LoopTimer,
    default_model_path,
    print_line,
    rss_mib,
    run_child,
    set_threads,
    train_dtype,
    write_jsonl,
)
from sft import make_rows, side_result

SIDES = ("lora", "nf4", "int8", "torchao_nf4")
BATCH_SIZE, SEED, LR = 8, 0, 2e-4


def nf4_scaler_block(num_blocks: int) -> int:
    """torchao quantizes the per-block scales again in groups that must divide the number of blocks: the largest of
    256 (its default), 128, ... that does (SmolLM2's k/v projections have 1,728 blocks of 64)."""
    size = 256
    while num_blocks % size:
        size //= 2
    return size


class TorchaoNF4(LoopTimer):
    """The loop timer that first swaps each LoRA layer's frozen base weight for a torchao NF4Tensor (untimed)."""

    def on_train_begin(self, model: Any, step: int) -> None:
        """Quantize the base weights, free the float32 ones, then start the clock."""
        import torch
        from peft.tuners.lora import LoraLayer
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        before = rss_mib()
        for module in model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                weight = base.weight.detach()
                nf4 = to_nf4(weight, 64, nf4_scaler_block(weight.numel() // 64))
                base.weight = torch.nn.Parameter(nf4, requires_grad=False)
        with torch.no_grad():  # as load.quantize does on CPU: nothing left a view of the memory-mapped weights file
            for param in model.parameters():
                if not param.requires_grad and type(param.data).__name__ != "NF4Tensor":
                    param.data = param.data.clone()
        gc.collect()
        self.rss_before_quantizing = before
        super().on_train_begin(model, step)


def run_side(args: argparse.Namespace, workdir: Path) -> dict:
    """One side: the LoRA SFT run with this side's base weights, timed by the loop's callbacks."""
    import tunesmith

    side = args.side
    cfg = {
        "method": "sft",
        "model": args.model_path,
        "output_dir": str(workdir / f"{side}-run"),
        "data": {"train": str(workdir / "train.jsonl")},
        "lora": dict(LORA),
        "train": {"batch_size": args.batch_size, "grad_accum": 1, "lr": LR, "weight_decay": 0.0, "warmup_ratio": 0.0,
                  "min_lr_ratio": 1.0, "max_grad_norm": 1.0, "max_length": args.max_length, "seed": SEED,
                  "save_every": 0, "eval_every": 0, "epochs": 1},
        "load": {"dtype": train_dtype(), "quantize": side if side in ("nf4", "int8") else None},
        "output": {"merge": False, "save_adapter": False},
    }
    timer = TorchaoNF4() if side == "torchao_nf4" else LoopTimer()
    result = tunesmith.train(cfg, callbacks=[timer])
    extra = {"rss_before_quantizing_mib": timer.rss_before_quantizing} if side == "torchao_nf4" else {}
    return side_result(side, timer.clock, losses=[x for x in timer.losses if x is not None], **extra,
                       data_rows=result.train_stats.num_rows, data_tokens=result.train_stats.num_tokens,
                       trainable_params=result.parameters.get("trainable"))


def versions() -> dict[str, str | None]:
    """The versions of the libraries measured."""
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "torchao"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="lora,nf4,int8",
                   help=f"comma-separated sides, in order, of {', '.join(SIDES)} (default lora,nf4,int8)")
    p.add_argument("--rows", type=int, default=32, help="SFT rows to build (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--batch-size", type=int, default=3, help="packed rows per step (default 3: about 8 documents)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each side (default: torch's)")
    p.add_argument("--model-path", default=None, help="HF folder to train (default: tunesmith's default model)")
    p.add_argument("--workdir", default=None, help="folder for data and run outputs (default: a new temp folder)")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parent: build the data, run each side in a child, print JSON lines. Child (--side): train one side."""
    import tempfile

    args = parse_args(argv)
    if args.side:
        set_threads(args.threads)
        workdir = Path(args.workdir)
        (workdir / f"{args.side}.json").write_text(__import__("json").dumps(run_side(args, workdir)))
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    args.model_path = args.model_path or default_model_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunesmith-bench-qlora-"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_jsonl(workdir / "train.jsonl", make_rows(args.rows, SEED))
    print_line({"settings": {"sides": sides, "rows": args.rows, "max_length": args.max_length,
                             "batch_size": args.batch_size, "lr": LR, "lora": LORA, "dtype": train_dtype(),
                             "threads": args.threads, "model_path": args.model_path, "workdir": str(workdir),
                             "versions": versions()}})
    child = ["--model-path", args.model_path, "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    results = {}
    for side in sides:
        results[side] = run_child(Path(__file__).resolve(), side, workdir, child, args.threads)
        print_line(results[side])
    if "lora" in results:
        base = results["lora"]
        print_line({"ratio": "side/lora", **{side: {
            "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_rss_mib": r["peak_rss_mib"] / base["peak_rss_mib"],
            "rss_at_train_start_mib": r["rss_at_train_start_mib"] / base["rss_at_train_start_mib"],
        } for side, r in results.items()}})
    print(f"wrote: the runs and each side's result line under {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
