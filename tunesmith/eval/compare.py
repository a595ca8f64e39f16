"""`tunesmith compare`: several models on the same rows, one report.

Models are loaded one at a time and freed before the next, so comparing a base with its tuned
copy needs the memory of one model, not two.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import TunesmithError
from tunesmith.eval.results import DEFAULT_METRICS, RESULTS_FILE

if TYPE_CHECKING:  # heavy imports stay out of `tunesmith --help`
    from tunesmith.config import LoadConfig
    from tunesmith.model.generate import GenerationSettings


def compare(
    models: dict[str, str],
    data: str,
    out_dir: str | Path,
    *,
    metrics: list[str],
    settings: GenerationSettings,
    load: LoadConfig,
    base_label: str = "base",
    limit: int | None = None,
    device: str | None = None,
    reward_model: str | None = None,
    chain: bool = False,
    text: str | None = None,
) -> Path:
    """Evaluate every model (label -> spec) on the same rows of `data` and write the report; returns report.html.

    With `chain`, the models are stages in the order given, the base first: the report also compares each
    with the one before it. With `text` (held-out plain text, e.g. the domain's documents), every model's
    perplexity on it joins the report, paired by document.
    """
    from tunesmith.data.examples import load_eval_examples
    from tunesmith.eval.evaluate import add_text_perplexity, evaluate, load_for_eval
    from tunesmith.eval.report import write_report
    from tunesmith.model.lock import refuse_while_training

    if base_label not in models:
        raise TunesmithError(f"the base model {base_label!r} is not among the models to compare ({', '.join(models)})")
    if chain and next(iter(models)) != base_label:
        raise TunesmithError(f"--chain: the stages start at the base {base_label!r}, but the first model given is "
                             f"{next(iter(models))!r}; list the models in the order the stages ran, base first")
    if len(models) < 2:
        raise TunesmithError(f"compare needs at least two models, got {len(models)}: add --tuned M or --model NAME=M")
    if limit is not None and limit < 1:
        raise TunesmithError(f"--limit: must be at least 1, got {limit}")
    if reward_model is not None:
        from tunesmith.model.reward_model import find_reward_model

        if Path(reward_model).expanduser().is_dir():
            refuse_while_training(Path(reward_model).expanduser(), reward_model)
        find_reward_model(reward_model)  # a wrong path fails before any generation
    for spec in models.values():  # a run folder still being trained fails before any generation
        if Path(spec).expanduser().is_dir():
            refuse_while_training(Path(spec).expanduser(), spec)
    settings.check()
    _check_metrics(metrics)
    examples = [e for e in load_eval_examples(data) if e.reference is not None]
    if not examples:
        raise TunesmithError(
            f"{data}: no row has a reference answer to score against; give prompt/completion, "
            "prompt/answer, or messages ending in an assistant turn"
        )
    if limit is not None:
        examples = examples[:limit]
    if text is not None:
        from tunesmith.data.dataset import text_records

        text_records(text)  # a missing or non-text file fails before any model loads
    # The base goes first: its row of every table, and its failure (a typo in --base) comes before any waiting.
    order = [base_label] + [label for label in models if label != base_label]
    results = []
    for label in order:
        spec = models[label]
        print(f"compare: evaluating {label} ({spec}) on {len(examples)} rows of {data}", flush=True)
        model, tokenizer, run_dir = load_for_eval(spec, load, device=device)
        try:
            result = evaluate(model, tokenizer, examples, metrics=metrics, settings=settings, perplexity=True,
                              label=label, spec=spec, data=data, run_dir=run_dir)
            if text is not None:
                add_text_perplexity(result, model, tokenizer, text, batch_size=settings.batch_size)
        finally:
            del model, tokenizer
            _free_memory()
        results.append(result)
    if reward_model is not None:
        from tunesmith.eval.score import add_reward_scores

        print(f"compare: scoring every answer with the reward model {reward_model}", flush=True)
        add_reward_scores(results, examples, reward_model, batch_size=settings.batch_size)
        _free_memory()
    title = (" -> " if chain else " vs ").join(order)
    return write_report(results, examples, Path(out_dir), base_label=base_label, title=f"{title} on {Path(data).name}",
                        chain=chain)


def _check_metrics(metrics: list[str]) -> None:
    """Unknown metrics fail before any model loads."""
    from tunesmith.eval.metrics import resolve_metrics

    resolve_metrics(metrics)


def _free_memory() -> None:
    """Give the last model's memory back before the next one loads."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_models(base: str, tuned: str | None, named: list[str]) -> dict[str, str]:
    """The label -> spec mapping from --base, --tuned and each --model NAME=SPEC."""
    models = {"base": base}
    if tuned is not None:
        models["tuned"] = tuned
    for item in named:
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise TunesmithError(
                f"--model {item!r}: expected NAME=MODEL, e.g. --model dpo=runs/dpo or --model big=Qwen/Qwen2.5-1.5B"
            )
        if name in models:
            raise TunesmithError(
                f"--model {item!r}: the name {name!r} is already taken ({models[name]}); give each model its own name"
            )
        models[name] = spec
    if len(models) < 2:
        raise TunesmithError("compare needs a model to compare the base with: add --tuned M or --model NAME=M")
    return models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tunesmith compare`."""
    parser.description = (
        "Generate answers with every model on the same rows, score them, and write report.html (self-contained), "
        "results.json and PNG plots into --out. Models load one at a time."
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="the model tuning started from: spec, folder or run folder")
    parser.add_argument("--tuned", metavar="MODEL", help="the tuned model: a run folder, model folder or spec")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=MODEL",
                        help="another model to put in the same tables (repeatable)")
    parser.add_argument("--data", required=True, metavar="FILE", help="rows with reference answers (.jsonl/.json/.csv/.parquet, HF dataset)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, results.json and the plots")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                        help=f"generation metrics (default: {' '.join(DEFAULT_METRICS)}); module:function for your own")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest generated answer")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts generated together")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N rows")
    parser.add_argument("--reward-model", metavar="RUN", help="a `method: reward` run: adds a reward column and "
                        "each model's win rate against the base, judged by it")
    parser.add_argument("--chain", action="store_true",
                        help="the models are stages in the order given (--base, --tuned, then each --model): each is "
                        "also compared with the one before it, and the headline says what each stage added")
    parser.add_argument("--text", metavar="FILE", help="held-out plain text (field 'text', or .txt): adds each model's "
                        "perplexity on it, paired by document, the measure of continued pretraining")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `tunesmith compare` from parsed arguments; prints the headline and what it wrote."""
    from tunesmith.config import LoadConfig
    from tunesmith.model.generate import GenerationSettings

    models = parse_models(args.base, args.tuned, args.model)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    load = LoadConfig(trust_remote_code=args.trust_remote_code)
    report = compare(models, args.data, args.out, metrics=args.metrics, settings=settings, load=load,
                     limit=args.limit, reward_model=args.reward_model, chain=args.chain, text=args.text)
    # The headline was computed once for the report; reading it back keeps console and report identical.
    comparison = json.loads((report.parent / RESULTS_FILE).read_text(encoding="utf-8"))["comparison"]
    print("\n".join(comparison["headline"]))
    print("wrote:")
    print(f"  report   {report}")
    print(f"  numbers  {report.parent / RESULTS_FILE}")
    for png in sorted(report.parent.glob("*.png")):
        print(f"  plot     {png}")
    return 0
