"""`tunesmith eval`: load a model (or a training run), generate answers, score them, and measure perplexity.

Perplexity is that of the reference answers, tokenized and masked exactly as training masks
them (every assistant turn of the conversation, end-of-turn marker included), so on the same data
it equals the `eval_ppl` a training run logs (as long as no sample is longer than
train.max_length, which training truncates).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import LoadConfig
from tunesmith.data.chat import has_chat_template, render_raw, render_with_spans, tokenize_with_spans
from tunesmith.data.examples import EvalExample
from tunesmith.data.packing import collate, make_document
from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import check_references, resolve_metrics, score_row
from tunesmith.eval.results import DEFAULT_METRICS, EvalResult, EvalRow, write_results
from tunesmith.model.generate import GenerationSettings, generate
from tunesmith.model.runs import load_run_model
from tunesmith.ops.losses import perplexity as perplexity_of

# ---------------------------------------------------------------- loading


def load_for_eval(spec: str, load: LoadConfig, device: torch.device | None = None) -> tuple[Any, Any, str | None]:
    """Model (in eval mode), tokenizer and run folder (None for a plain model) for anything `train` accepts or a run folder.

    A run folder (it holds config.yaml) gives its merged/ model, else its base model with adapter/
    applied, else its fully fine-tuned model/ (`tunesmith.model.runs`).
    """
    model, tokenizer, run = load_run_model(spec, load, device)
    return model, tokenizer, str(run.run_dir) if run.run_dir is not None else None


# ---------------------------------------------------------------- perplexity


def answer_tokens(tokenizer, examples: list[EvalExample]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example with a reference, rendered and masked exactly as for training."""
    with_ref = [e for e in examples if e.reference is not None]
    if not with_ref:
        return []
    conversations = [[*e.messages, {"role": "assistant", "content": e.reference}] for e in with_ref]
    if has_chat_template(tokenizer):
        rendered = [render_with_spans(c, tokenizer, e.location) for c, e in zip(conversations, with_ref)]
        ids, labels = tokenize_with_spans([t for t, _ in rendered], [s for _, s in rendered], tokenizer)
        return list(zip(ids, labels))
    out = []
    for e in with_ref:
        if [m["role"] for m in e.messages] != ["user"]:
            raise TunesmithError(
                f"{e.location}: the tokenizer has no chat template, so only single prompt -> answer rows can be "
                "rendered (as training renders them: prompt + answer + EOS); use a model with a chat template, or "
                "--no-perplexity"
            )
        out.append(render_raw(e.messages[0]["content"], e.reference or "", tokenizer))
    return out


@torch.no_grad()
def document_losses(model, tokenizer, documents: list, batch_size: int = 16) -> list[tuple[float, int]]:
    """Per document (a `make_document` row), (sum of the losses of its labelled tokens, their number); documents of
    similar length are batched together, one per row, so none attends to another."""
    from tunesmith.core.next_token import answer_logps
    from tunesmith.model.parts import decoder_and_head

    out: list[tuple[float, int]] = [(0.0, 0)] * len(documents)
    if not documents:
        return out
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(documents)), key=lambda k: len(documents[k].input_ids))  # similar lengths: little padding
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([documents[k] for k in chunk], tokenizer.pad_token_id or 0)
            # one document per row: the row number says whose token each is (padding has no labels)
            seq_index = torch.arange(len(chunk))[:, None].expand_as(batch["input_ids"])
            logp_sums, counts = answer_logps(decoder, head, **{k: v.to(device) for k, v in batch.items()},
                                             seq_index=seq_index.to(device))
            for k, logp_sum, count in zip(chunk, logp_sums.tolist(), counts.tolist()):
                out[k] = (-logp_sum, int(count))
    finally:
        model.train(was_training)
    return out


def answer_losses(
    model, tokenizer, examples: list[EvalExample], batch_size: int = 16
) -> list[tuple[float, int] | None]:
    """Per example, (sum of token losses, number of tokens) of its reference answer; None where it has none."""
    owners = [k for k, e in enumerate(examples) if e.reference is not None]  # answer_tokens keeps these, in order
    documents = [make_document(ids, labels) for ids, labels in answer_tokens(tokenizer, examples)]
    out: list[tuple[float, int] | None] = [None] * len(examples)
    for k, loss in zip(owners, document_losses(model, tokenizer, documents, batch_size)):
        out[k] = loss
    return out


def text_losses(model, tokenizer, source: str, *, max_length: int = 1024, batch_size: int = 16,
                split: str = "train") -> list[tuple[float, int]]:
    """Per document of a plain-text source, (mean token loss, predicted tokens), tokenized as pretraining does;
    a document longer than max_length is scored in max_length blocks, each token predicted once."""
    from tunesmith.data.dataset import text_blocks, tokenize_text_file

    if max_length < 2:
        raise TunesmithError(f"max_length: must be at least 2 tokens, got {max_length}")
    blocks, owners = [], []
    for k, (ids, _) in enumerate(tokenize_text_file(source, tokenizer, split)):
        for block in text_blocks(ids, max_length):
            blocks.append(make_document(block, block))
            owners.append(k)
    sums, counts = [0.0] * (owners[-1] + 1), [0] * (owners[-1] + 1)
    for k, (loss_sum, n) in zip(owners, document_losses(model, tokenizer, blocks, batch_size)):
        sums[k] += loss_sum
        counts[k] += n
    return [(s / n if n else math.nan, n) for s, n in zip(sums, counts)]


def add_text_perplexity(result: EvalResult, model, tokenizer, source: str, *, batch_size: int = 16,
                        max_length: int = 1024, split: str = "train") -> None:
    """Measure the perplexity of held-out plain text `source` and keep it, per document, in `result`."""
    losses = text_losses(model, tokenizer, source, max_length=max_length, batch_size=batch_size, split=split)
    counted = [(x, n) for x, n in losses if n > 0]
    total = sum(n for _, n in counted)
    result.text_data = source
    result.text_losses = [[x, float(n)] for x, n in losses]
    result.text_perplexity = perplexity_of(math.fsum(x * n for x, n in counted) / total) if total else None


# ---------------------------------------------------------------- evaluation


def evaluate(
    model,
    tokenizer,
    examples: list[EvalExample],
    *,
    metrics: list[str],
    settings: GenerationSettings,
    perplexity: bool = True,
    label: str,
    spec: str,
    data: str,
    generate_answers: bool = True,
    run_dir: str | None = None,
) -> EvalResult:
    """Perplexity of the reference answers, generated answers scored by `metrics`, and timing."""
    settings.check()
    metric_fns = resolve_metrics(metrics)
    if metric_fns and not generate_answers:
        raise TunesmithError(f"metrics {', '.join(metric_fns)} score generated answers, but generation is off")
    check_references(metric_fns, examples, data)

    mean_loss = ppl = None
    timing: dict[str, float] = {}
    row_losses: list[tuple[float, int] | None] = [None] * len(examples)
    if perplexity:
        started = time.perf_counter()
        row_losses = answer_losses(model, tokenizer, examples, settings.batch_size)
        timing["perplexity_seconds"] = time.perf_counter() - started
        counted = [x for x in row_losses if x is not None and x[1] > 0]
        num_tokens = sum(n for _, n in counted)
        if num_tokens > 0:  # the rows' losses add up to the corpus loss: the report's intervals resample them
            mean_loss = math.fsum(s for s, _ in counted) / num_tokens
            ppl = perplexity_of(mean_loss)  # capped as training's eval_ppl
            timing["answer_tokens"] = float(num_tokens)

    outputs: list[str | None] = [None] * len(examples)
    generation: dict[str, Any] = asdict(settings) if generate_answers else {}
    num_new = [0] * len(examples)
    if generate_answers:
        started = time.perf_counter()
        generations = generate(model, tokenizer, [e.messages for e in examples], settings, desc=f"generate {label}")
        seconds = time.perf_counter() - started
        outputs = [g.text for g in generations]
        num_new = [g.num_new_tokens for g in generations]
        generation["finish_reasons"] = dict(Counter(g.finish_reason for g in generations))
        timing.update(seconds=seconds, new_tokens=float(sum(num_new)), new_tokens_per_s=sum(num_new) / max(seconds, 1e-9))

    rows = []
    for example, output, n, loss in zip(examples, outputs, num_new, row_losses):
        scores, errors = score_row(metric_fns, example, output) if output is not None else ({}, {})
        row = EvalRow(index=example.index, output=output, scores=scores, errors=errors, num_new_tokens=n)
        if loss is not None and loss[1] > 0:
            row.answer_loss, row.answer_tokens = loss[0] / loss[1], loss[1]
        rows.append(row)
    means = {}
    for name in metric_fns:
        values = [r.scores[name] for r in rows if r.scores.get(name) is not None]
        if values:  # a metric that failed on every row has no mean; its errors say why
            means[name] = sum(values) / len(values)  # type: ignore[arg-type]
    return EvalResult(label=label, spec=spec, data=data, metrics=means, rows=rows, perplexity=ppl,
                      mean_loss=mean_loss, generation=generation, timing=timing, run_dir=run_dir)


def metric_failures(result: EvalResult) -> dict[str, list[str]]:
    """Metric -> the error message of every row it failed on."""
    failed: dict[str, list[str]] = {}
    for row in result.rows:
        for name, message in row.errors.items():
            failed.setdefault(name, []).append(message)
    return failed


# ---------------------------------------------------------------- output


def default_out_dir(spec: str) -> Path:
    """`eval-<model name>` in the current folder."""
    name = Path(spec.rstrip("/\\")).name if spec not in ("", ".") else Path.cwd().name
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return Path(f"eval-{re.sub(r'[^A-Za-z0-9._-]', '_', name) or 'model'}")


def format_table(result: EvalResult, num_with_reference: int) -> str:
    """The printed summary: one line per metric, then perplexity, rows and speed."""
    failed = metric_failures(result)
    n = len(result.rows)
    lines = [f"{'metric':<28}{'value':>12}"]
    names = list(dict.fromkeys([*result.metrics, *failed]))
    for name in names:
        value = f"{result.metrics[name]:.4f}" if name in result.metrics else "-"
        note = f"  (failed on {len(failed[name])} of {n} rows)" if name in failed else ""
        lines.append(f"{name:<28}{value:>12}{note}")
    if result.perplexity is not None:
        lines.append(f"{'perplexity':<28}{result.perplexity:>12.4f}  (mean token loss {result.mean_loss:.4f} over "
                     f"{int(result.timing.get('answer_tokens', 0)):,} answer tokens)")
    elif num_with_reference == 0:
        lines.append(f"{'perplexity':<28}{'-':>12}  (no reference answers)")
    if result.text_perplexity is not None:
        tokens = sum(int(n) for _, n in result.text_losses)
        lines.append(f"{'held-out text perplexity':<28}{result.text_perplexity:>12.4f}  ({len(result.text_losses)} "
                     f"documents of {result.text_data}, {tokens:,} tokens)")
    lines.append(f"{'rows':<28}{n:>12}")
    if "new_tokens_per_s" in result.timing:
        t = result.timing
        reasons = result.generation.get("finish_reasons", {})
        cut = f"; {reasons['length']} answers reached max_new_tokens" if reasons.get("length") else ""
        lines.append(f"{'new tokens/s':<28}{t['new_tokens_per_s']:>12.1f}  ({int(t['new_tokens']):,} new tokens in "
                     f"{t['seconds']:.1f} s{cut})")
    return "\n".join(lines)


def run_eval_command(args: Any) -> int:
    """`tunesmith eval` from parsed arguments; exit code 2 when a metric failed on some rows (results still written)."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, stop=list(args.stop or []), batch_size=args.batch_size,
                                  seed=args.seed)
    settings.check()
    if args.limit is not None and args.limit < 1:
        raise TunesmithError(f"--limit: must be at least 1, got {args.limit}")
    from tunesmith.data.examples import load_eval_examples

    examples = load_eval_examples(args.data, args.split)[: args.limit]
    num_with_reference = sum(e.reference is not None for e in examples)
    generate_answers = not args.no_generate
    if args.metrics is None:  # not given: the defaults when every row has a reference, else generation only
        metrics = list(DEFAULT_METRICS) if generate_answers and num_with_reference == len(examples) else []
    else:
        metrics = list(args.metrics)
    check_references(resolve_metrics(metrics), examples, args.data)  # before the (slow) model load
    if metrics and not generate_answers:
        raise TunesmithError(f"--no-generate: metrics {', '.join(metrics)} score generated answers; drop one of them")
    if args.text:
        from tunesmith.data.dataset import text_records

        text_records(args.text, args.split)  # a missing or non-text file fails before the model loads

    load = LoadConfig(trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    model, tokenizer, run_dir = load_for_eval(args.model, load)
    label = args.label or default_out_dir(args.model).name.removeprefix("eval-")
    print(f"tunesmith eval: {args.model} on {args.data} ({len(examples)} rows, {num_with_reference} with reference "
          f"answers; metrics: {', '.join(metrics) or 'none'})", flush=True)
    result = evaluate(model, tokenizer, examples, metrics=metrics, settings=settings,
                      perplexity=not args.no_perplexity, label=label, spec=args.model, data=args.data,
                      generate_answers=generate_answers, run_dir=run_dir)
    if args.text:
        add_text_perplexity(result, model, tokenizer, args.text, batch_size=settings.batch_size, split=args.split)
    out_dir = Path(args.out) if args.out else default_out_dir(args.model)
    path = write_results(out_dir, [result], examples)
    print(format_table(result, num_with_reference))
    print(f"wrote: {path} (scores, outputs and settings of {len(examples)} rows)", flush=True)
    failed = metric_failures(result)
    if failed:
        problems = [f"{name}: failed on {len(msgs)} of {len(examples)} rows; first: {msgs[0]}" for name, msgs in failed.items()]
        raise TunesmithError(
            f"{len(failed)} metric{'s' if len(failed) > 1 else ''} raised on some rows (their score there is null; "
            f"the other metrics completed, and {path} holds every row's error):",
            problems=problems,
        )
    return 0
