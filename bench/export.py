"""GGUF export at every precision: time, size, and how the file answers, against the model it came from.

Run from the repository root (needs the dev extra's llama-cpp-python):

    python bench/export.py [--model default] [--rows 48] [--max-new-tokens 48] [--quants f32 f16 bf16 q8_0 q4_0]
                           [--workdir DIR]

`--model` takes anything `tunesmith export` does (default: the built-in SmolLM2-135M-Instruct); the SFT run of
`make demo` (runs/demo/run) gives a model that gets the held-out rows right, where the untuned default gets none.
For each precision: `tunesmith export` writes the file (timed alone, the check off) and its size is read; the
file read back with transformers' GGUF loader answers the demo's held-out prompts greedily
(`tunesmith.model.generate`), compared token for token with the original model's answers; then llama.cpp itself
(llama-cpp-python; chat template and stop token from the file's metadata; greedy) answers the same rows, scored
by exact match against the references. One JSON line per precision, after one with the settings and the original
model's own answers (exact match through tunesmith).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    """Measure export time, size and answer agreement per precision; print one JSON line per result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model or run folder to export (default: the built-in)")
    parser.add_argument("--rows", type=int, default=48, help="held-out demo rows (the demo's own test set is 48)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the demo's eval setting")
    parser.add_argument("--quants", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--workdir", default="/tmp/bench-export")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--llama-threads", type=int, default=1,
                        help="llama.cpp threads (1: its threads spin at barriers, which a shared CPU punishes)")
    args = parser.parse_args(argv)

    import llama_cpp
    import torch

    from tunesmith.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    from tunesmith.config import LoadConfig
    from tunesmith.demo import make_task
    from tunesmith.model.generate import GenerationSettings, generate
    from tunesmith.model.gguf_export import architecture_of, export, load_source, reload_gguf
    from tunesmith.scoring import exact_match

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    _, test = make_task(320, args.rows)  # the demo's split: the same held-out rows `make demo` evaluates on
    prompts = [row["messages"][:-1] for row in test]
    references = [row["messages"][-1]["content"] for row in test]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=16)

    def score(outputs: list[str]) -> float:
        return sum(exact_match(p[-1]["content"], o, r) for p, o, r in zip(prompts, outputs, references)) / len(test)

    model, tokenizer = load_source(args.model, LoadConfig(dtype="float32", attn_implementation="eager"))
    started = time.time()
    original = generate(model, tokenizer, prompts, settings, desc="original")
    print(json.dumps({
        "settings": {"model": args.model, "rows": len(test), "max_new_tokens": args.max_new_tokens, "quants": args.quants,
                     "threads": args.threads, "llama_threads": args.llama_threads, "workdir": str(work)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "llama_cpp_python": llama_cpp.__version__},
        "side": "original (tunesmith, float32)", "exact_match": score([g.text for g in original]),
        "generate_s": round(time.time() - started, 1),
        "tokens": sum(len(g.token_ids) for g in original)}), flush=True)

    arch = architecture_of(model.config)
    for quant in args.quants:
        out = work / f"model.{quant}.gguf"
        started = time.time()
        export(args.model, gguf=out, quant=quant, check=False)
        export_s = time.time() - started
        line = {"quant": quant, "export_s": round(export_s, 1), "size_mib": round(out.stat().st_size / 2**20, 1)}

        started = time.time()
        try:
            reloaded, file_tokenizer, taken = reload_gguf(out, model.config, arch)
            answers = generate(reloaded, file_tokenizer, prompts, settings, desc=f"{quant} (transformers)")
            del reloaded
            line["transformers_same_answers"] = sum(a.token_ids == b.token_ids for a, b in zip(original, answers))
            line["transformers_same_tokens_before_first_difference"] = sum(
                next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     min(len(a.token_ids), len(b.token_ids))) for a, b in zip(original, answers))
            line["transformers_exact_match"] = score([a.text for a in answers])
        except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as exc:
            line["transformers_error"] = str(exc).splitlines()[0][:200]
        line["transformers_s"] = round(time.time() - started, 1)

        started = time.time()
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=args.llama_threads, verbose=False)
        try:
            outputs = [llm.create_chat_completion(messages=p, temperature=0.0, max_tokens=args.max_new_tokens)
                       ["choices"][0]["message"]["content"] for p in prompts]
        finally:
            llm.close()
        line["llama_cpp_exact_match"] = score(outputs)
        line["llama_cpp_same_text_as_original"] = sum(o == g.text for o, g in zip(outputs, original))
        line["llama_cpp_s"] = round(time.time() - started, 1)
        line["rows"] = len(test)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
