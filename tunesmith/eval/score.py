"""Scoring with a trained reward model: `tunesmith score`, and the reward column of the comparison report.

A reward model scores a whole conversation (the prompt and the assistant's answer); pairs are scored
side by side, which gives the model's pairwise accuracy and margin on held-out preferences.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tunesmith.data.examples import EvalExample
from tunesmith.errors import TunesmithError
from tunesmith.eval.results import REWARD, EvalResult


def score_file(reward_model: str, data: str, out: str | Path | None = None, *, batch_size: int = 8,
               limit: int | None = None, split: str = "train") -> dict[str, Any]:
    """Score every row (prompt + answer) or every pair (chosen and rejected) of `data`; writes JSONL to `out`."""
    from tunesmith.data.preference import is_preference_record, normalise_pairs
    from tunesmith.data.readers import load_records
    from tunesmith.model.reward_model import load_reward_model, score_conversations

    if batch_size < 1:
        raise TunesmithError(f"--batch-size: must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise TunesmithError(f"--limit: must be at least 1, got {limit}")
    records = load_records(data, split)
    if limit is not None:
        records = records[:limit]
    pairs = bool(records) and all(is_preference_record(r[0] if isinstance(r, tuple) else r) for r in records)
    if pairs:
        items = normalise_pairs(records, data)
        conversations = [c for p in items for c in (_conv(p.prompt, p.chosen), _conv(p.prompt, p.rejected))]
    else:
        examples = [e for e in _examples(data, split)][: len(records)]
        missing = [e.location for e in examples if e.reference is None]
        if missing:
            raise TunesmithError(
                f"{data}: {len(missing)} rows have no answer to score (first: {missing[0]}); give prompt/completion "
                "rows, messages ending in an assistant turn, or prompt/chosen/rejected pairs"
            )
        conversations = [_conv(e.messages, e.reference or "") for e in examples]
    model, tokenizer = load_reward_model(reward_model)
    scores = score_conversations(model, tokenizer, conversations, batch_size=batch_size)

    if pairs:
        chosen, rejected = scores[0::2], scores[1::2]
        lines = [{"index": i, "chosen_score": c, "rejected_score": r, "margin": c - r} for i, (c, r) in enumerate(zip(chosen, rejected))]
        margins = [c - r for c, r in zip(chosen, rejected)]
        summary = {"kind": "pairs", "num_pairs": len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
                   "mean_margin": statistics.fmean(margins)}
    else:
        lines = [{"index": i, "score": s} for i, s in enumerate(scores)]
        summary = {"kind": "rows", "num_rows": len(scores), "mean_score": statistics.fmean(scores),
                   "std_score": statistics.pstdev(scores)}
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        tmp.replace(path)
        summary["out"] = str(path)
    return summary


def _examples(data: str, split: str) -> list[EvalExample]:
    from tunesmith.data.examples import load_eval_examples

    return load_eval_examples(data, split)


def _conv(prompt: list[dict], answer: str) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": answer}]


def add_reward_scores(results: list[EvalResult], examples: list[EvalExample], reward_model: str,
                      batch_size: int = 8) -> None:
    """Score every model's generated answers with the reward model: a `reward` score per row and its mean."""
    from tunesmith.model.reward_model import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(reward_model)
    by_index = {e.index: e for e in examples}
    for result in results:
        rows = [r for r in result.rows if r.output is not None and r.index in by_index]
        scores = score_conversations(model, tokenizer, [_conv(by_index[r.index].messages, r.output or "") for r in rows],
                                     batch_size=batch_size)
        for row, score in zip(rows, scores):
            row.scores[REWARD] = score
        if scores:
            result.metrics[REWARD] = statistics.fmean(scores)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tunesmith score`."""
    parser.description = ("Score rows (prompt + answer) or preference pairs with a reward model trained by "
                           "`method: reward`; pairs also give its pairwise accuracy and mean margin.")
    parser.add_argument("--reward-model", required=True, metavar="RUN",
                        help="a `method: reward` run folder, or its reward_model/ folder")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="prompt/completion or messages rows, or prompt/chosen/rejected pairs")
    parser.add_argument("--out", metavar="FILE", help="JSONL with one score (or chosen/rejected scores) per row")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N rows")
    parser.add_argument("--split", default="train", help="split of an HF dataset")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `tunesmith score` from parsed arguments."""
    summary = score_file(args.reward_model, args.data, args.out, batch_size=args.batch_size, limit=args.limit,
                         split=args.split)
    if summary["kind"] == "pairs":
        print(f"{summary['num_pairs']} pairs: reward model prefers the chosen answer in {100 * summary['accuracy']:.1f}% "
              f"of them; mean margin {summary['mean_margin']:.3f}")
    else:
        print(f"{summary['num_rows']} rows: mean reward {summary['mean_score']:.3f} (std {summary['std_score']:.3f})")
    if "out" in summary:
        print(f"wrote:\n  scores  {summary['out']}")
    return 0
