"""Generation throughput: tunesmith's decode loop against a plain transformers `model.generate` loop.

Run from the repository root:

    python bench/generate.py [--prompts 48] [--batch-size 16] [--max-new-tokens 64] [--repeats 1] [--threads N]

Both sides get the same chat prompts (built by code from CPython's `pydoc_data.topics`, seeded,
of varied length), the same model (the built-in default, SmolLM2-135M-Instruct, on the CPU in
float32 unless CUDA is there), greedy decoding, the same batch size, the same EOS ids and the same
prompt token ids. The transformers side is the loop people write by hand: batches in data order,
left padding, `model.generate(do_sample=False)`. New tokens are counted the same way on both
sides: tokens up to and including the EOS, nothing after it. One JSON line per side and repeat,
then one line with the ratio (tunesmith / transformers) and how many answers agree token for
token. Model loading and a short warm-up are not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = (
    "Summarise this passage from the Python docs in one sentence:\n\n{text}",
    "What is the main point of the following text?\n{text}",
    "Explain to a beginner what this means: {text}",
    "Give one example that illustrates this: {text}",
)


def make_prompts(num: int, seed: int) -> list[list[dict[str, str]]]:
    """Single-turn chats whose passages are seeded slices (40..1200 characters) of pydoc topics."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    chats = []
    for _ in range(num):
        length = int(40 * (30 ** rng.random()))  # log-uniform: many short prompts, a few long ones
        text = topics[rng.choice([n for n in names if len(topics[n]) > length])]
        start = rng.randint(0, len(text) - length)
        chats.append([{"role": "user", "content": rng.choice(QUESTIONS).format(text=text[start : start + length].strip())}])
    return chats


def count_new(ids: list[int], eos: set[int]) -> list[int]:
    """The generated ids up to and including the first EOS."""
    for k, token in enumerate(ids):
        if token in eos:
            return ids[: k + 1]
    return ids


def run_tunesmith(model, tokenizer, chats, args) -> tuple[dict, list[list[int]]]:
    """Our `generate` over all prompts; (result line, generated ids per prompt)."""
    from tunesmith.model.generate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    started = time.perf_counter()
    out = generate(model, tokenizer, chats, settings, desc="tunesmith")
    seconds = time.perf_counter() - started
    finish: dict[str, int] = {}
    for g in out:
        finish[g.finish_reason] = finish.get(g.finish_reason, 0) + 1
    new = sum(g.num_new_tokens for g in out)
    line = {"side": "tunesmith", "new_tokens": new, "seconds": round(seconds, 2),
            "new_tokens_per_s": round(new / seconds, 1), "finish": finish}
    return line, [g.token_ids for g in out]


def run_transformers(model, tokenizer, chats, args, eos: set[int]) -> tuple[dict, list[list[int]]]:
    """A plain `model.generate` loop in data order with left padding; (result line, generated ids per prompt)."""
    from tunesmith.model.generate import prompt_ids

    encoded = prompt_ids(tokenizer, chats)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos))
        outputs += [count_new(row[width:].tolist(), eos) for row in out]
    seconds = time.perf_counter() - started
    new = sum(len(ids) for ids in outputs)
    line = {"side": "transformers", "new_tokens": new, "seconds": round(seconds, 2),
            "new_tokens_per_s": round(new / seconds, 1)}
    return line, outputs


def main() -> None:
    """Load the default model once, warm up, then time both sides `--repeats` times."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        # On a shared machine, one thread per core that another process also uses makes OpenMP
        # barriers spin: small matmuls then run ~20x slower (measured 46 vs 1.8 GFLOP/s). Fewer threads avoid it.
        torch.set_num_threads(args.threads)

    from tunesmith.cli import quiet_libraries

    quiet_libraries()
    from tunesmith.config import LoadConfig
    from tunesmith.model import load_model, load_tokenizer, resolve_model
    from tunesmith.model.generate import prompt_ids, stop_token_ids

    load = LoadConfig()
    resolved = resolve_model(args.model, load)
    tokenizer = load_tokenizer(resolved, load)
    model = load_model(resolved, load).eval()
    chats = make_prompts(args.prompts, args.seed)
    eos = stop_token_ids(model, tokenizer)
    lengths = [len(ids) for ids in prompt_ids(tokenizer, chats)]
    print(json.dumps({"setup": {"model": args.model, "device": str(next(model.parameters()).device),
                                "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                                "prompts": len(chats), "prompt_tokens_min_mean_max":
                                [min(lengths), round(sum(lengths) / len(lengths)), max(lengths)],
                                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}}), flush=True)

    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4, "batch_size": 2})
    run_tunesmith(model, tokenizer, chats[:2], warm)
    run_transformers(model, tokenizer, chats[:2], warm, eos)

    ours_rates, theirs_rates = [], []
    for repeat in range(args.repeats):
        # Every other repeat the transformers side goes first, so a load change on a shared machine
        # does not always favour the same side.
        for side in ("tunesmith", "transformers") if repeat % 2 == 0 else ("transformers", "tunesmith"):
            if side == "tunesmith":
                line, ours_ids = run_tunesmith(model, tokenizer, chats, args)
                ours_rates.append(line["new_tokens_per_s"])
            else:
                line, theirs_ids = run_transformers(model, tokenizer, chats, args, eos)
                theirs_rates.append(line["new_tokens_per_s"])
            print(json.dumps({"repeat": repeat, **line}), flush=True)
    same = sum(a == b for a, b in zip(ours_ids, theirs_ids))
    print(json.dumps({"ratio_new_tokens_per_s": round(sum(ours_rates) / sum(theirs_rates), 2),
                      "ratio_per_repeat": [round(a / b, 2) for a, b in zip(ours_rates, theirs_rates)],
                      "same_tokens": f"{same}/{len(chats)}"}), flush=True)


if __name__ == "__main__":
    main()
