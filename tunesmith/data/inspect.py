"""The report `tunesmith data inspect FILE [--model M]` prints: format, sizes, and what the loss sees."""

from __future__ import annotations

from tunesmith.data.chat import IGNORE_INDEX
from tunesmith.data.dataset import METHOD_OF_LABELS, tokenize_samples
from tunesmith.data.formats import FORMATS, detect_format, normalise_records
from tunesmith.data.preference import is_preference_record, normalise_pairs, tokenize_pair_side
from tunesmith.data.readers import load_records
from tunesmith.errors import TunesmithError

MARK_OPEN, MARK_CLOSE = "[[", "]]"  # plain text marks: readable in a terminal, a log file or a bug report
_NUM_BINS = 10
_BAR_WIDTH = 40
_EXAMPLE_CHARS = 2000


def inspect_data(
    source: str, tokenizer=None, *, max_length: int = 1024, format: str = "auto", split: str = "train"
) -> str:
    """A readable report on a data source: format, rows, length histogram, truncation, one marked example."""
    if format != "auto" and format not in FORMATS:
        raise TunesmithError(f"--format: expected auto or one of {', '.join(FORMATS)}, got {format!r}")
    records = load_records(source, split)
    if format == "auto" and records and all(is_preference_record(r[0] if isinstance(r, tuple) else r) for r in records):
        return _inspect_pairs(source, records, tokenizer, max_length)
    fmt = format if format != "auto" else detect_format(records, source)
    labels = "all" if fmt == "text" else "assistant"  # plain text is pretraining data, the rest sft data
    method = METHOD_OF_LABELS[labels]
    normalised = normalise_records(records, fmt, source)
    how = "given" if format != "auto" else "detected"
    lines = [f"data:    {source}", f"format:  {fmt} ({how}; trains with method: {method})", f"records: {len(records):,}"]

    if tokenizer is None:
        lengths = [_num_chars(record) for record, _ in normalised]
        lines += ["", "characters per record:", *_histogram(lengths), "",
                  "give --model M to count tokens, see truncation at max_length and the trained tokens"]
        return "\n".join(lines)

    samples = tokenize_samples(normalised, tokenizer, labels)
    lengths = [len(ids) for ids, _, _ in samples]
    num_tokens = sum(lengths)
    num_trained = sum(len(labels) - labels.count(IGNORE_INDEX) for _, labels, _ in samples)
    share = 100 * num_trained / num_tokens if num_tokens else 0.0
    num_long = sum(1 for n in lengths if n > max_length)
    if labels == "all":
        fate = "pretrain splits them into chunks of max_length; nothing is lost"
    else:
        fate = "truncated with data.overflow=truncate, dropped with overflow=drop"
    lines += [
        f"tokens:  {num_tokens:,} ({num_trained:,} trained, {share:.0f}%)",
        "",
        "tokens per record:",
        *_histogram(lengths),
        "",
        f"longer than max_length={max_length}: {num_long:,} of {len(lengths):,} records ({fate})",
        "",
        f"example ({samples[0][2]}; trained tokens inside {MARK_OPEN} {MARK_CLOSE}):",
        _marked_text(samples[0][0], samples[0][1], tokenizer),
    ]
    return "\n".join(lines)


def _inspect_pairs(source: str, records: list, tokenizer, max_length: int) -> str:
    """The same report for preference pairs: both answers of each pair, and what is scored."""
    pairs = normalise_pairs(records, source)
    lines = [f"data:    {source}", "format:  preference pairs (detected; trains with method: reward or dpo)",
             f"records: {len(records):,}"]
    if tokenizer is None:
        lengths = [len(p.chosen) + len(p.rejected) + sum(len(m["content"]) for m in p.prompt) for p in pairs]
        lines += ["", "characters per pair (prompt and both answers):", *_histogram(lengths), "",
                  "give --model M to count tokens, see truncation at max_length and the scored tokens"]
        return "\n".join(lines)
    sides = [(tokenize_pair_side(p.prompt, p.chosen, tokenizer, p.where),
              tokenize_pair_side(p.prompt, p.rejected, tokenizer, p.where)) for p in pairs]
    lengths = [len(ids) for pair in sides for ids, _ in pair]
    scored = [len(labels) - labels.count(IGNORE_INDEX) for pair in sides for _, labels in pair]
    num_long = sum(1 for pair in sides if any(len(ids) > max_length for ids, _ in pair))
    (c_ids, c_labels), (r_ids, r_labels) = sides[0]
    lines += [
        f"tokens:  {sum(lengths):,} in {len(lengths):,} sequences ({sum(scored):,} answer tokens scored)",
        "",
        "tokens per sequence (prompt + one answer):",
        *_histogram(lengths),
        "",
        f"pairs with a side longer than max_length={max_length}: {num_long:,} of {len(pairs):,} "
        "(truncated with data.overflow=truncate, dropped with overflow=drop)",
        "",
        f"example ({pairs[0].where}; scored tokens inside {MARK_OPEN} {MARK_CLOSE}):",
        "chosen:",
        _marked_text(c_ids, c_labels, tokenizer),
        "rejected:",
        _marked_text(r_ids, r_labels, tokenizer),
    ]
    return "\n".join(lines)


def _num_chars(record: dict) -> int:
    if "text" in record:
        return len(record["text"])
    return sum(len(m["content"]) for m in record["messages"])


def _histogram(lengths: list[int]) -> list[str]:
    """Equal-width bins between the shortest and longest value, as text bars."""
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // _NUM_BINS))  # ceil division
    counts = [0] * (((high - low) // width) + 1)
    for n in lengths:
        counts[(n - low) // width] += 1
    peak = max(counts)
    digits = len(f"{high:,}")
    out = []
    for b, count in enumerate(counts):
        start = low + b * width
        end = min(start + width - 1, high)
        bar = "#" * max(1 if count else 0, round(_BAR_WIDTH * count / peak))
        out.append(f"  {start:>{digits},} - {end:>{digits},} | {bar} {count:,}")
    ordered = sorted(lengths)
    out.append(f"  min {low:,}, median {ordered[len(ordered) // 2]:,}, max {high:,}")
    return out


def _marked_text(ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode runs of trained and untrained tokens, wrapping the trained runs in marks."""
    pieces = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:t])
            pieces.append(MARK_OPEN + text + MARK_CLOSE if labels[start] != IGNORE_INDEX else text)
            start = t
    text = "".join(pieces)
    if len(text) > _EXAMPLE_CHARS:
        text = text[:_EXAMPLE_CHARS] + f"... ({len(text) - _EXAMPLE_CHARS:,} more characters)"
    return text
