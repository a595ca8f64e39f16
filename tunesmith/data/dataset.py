"""Turn a data source into token rows for one method: read, detect, normalise, tokenize, fit max_length, pack."""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from tunesmith.data.chat import (
    IGNORE_INDEX,
    has_chat_template,
    render_raw,
    render_with_spans,
    tokenize_with_spans,
)
from tunesmith.data.formats import FORMATS, candidate_formats, detect_format, normalise_records
from tunesmith.data.packing import Row, make_document, pack_rows
from tunesmith.data.readers import load_records
from tunesmith.errors import TunesmithError

log = logging.getLogger(__name__)

# Which tokens of a sample carry labels, as a next-token method's file says (methods/sft.py, methods/pretrain.py):
# "all": plain text, every token trained, long texts split into max_length blocks;
# "assistant": prompts and chats, the assistant's tokens trained (every assistant turn), long samples cut or dropped.
Labels = Literal["all", "assistant"]
LABELS: tuple[str, ...] = typing.get_args(Labels)
METHOD_OF_LABELS = {"all": "pretrain", "assistant": "sft"}  # the method that learns so, named in advice to the user
OVERFLOWS = ("truncate", "drop")
_BATCH = 1024  # records per tokenizer call: the Rust tokenizer works on a batch in parallel
_BAR_FROM = 4 * _BATCH  # show a progress bar when tokenizing at least this many records


def _batches(normalised: list, desc: str):
    """Slices of `_BATCH` records, with a progress bar on large data."""
    bar = tqdm(total=len(normalised), desc=desc, unit="rec", disable=len(normalised) < _BAR_FROM, leave=False)
    for start in range(0, len(normalised), _BATCH):
        batch = normalised[start : start + _BATCH]
        yield batch
        bar.update(len(batch))
    bar.close()


@dataclass
class DataStats:
    """What building a dataset did, for logs and the run summary."""

    source: str
    format: str
    num_records: int  # records read from the source
    num_documents: int  # documents kept (for pretrain, each max_length chunk of a long text counts)
    num_rows: int
    num_tokens: int  # tokens in all rows, padding excluded
    num_trained_tokens: int  # tokens with a label (not -100)
    num_truncated: int  # samples cut to max_length (sft)
    num_dropped: int  # samples left out: too long with overflow=drop, nothing left to learn, or empty text
    num_split: int = 0  # texts longer than max_length split into chunks (pretrain)

    def summary(self) -> str:
        """One short human line."""
        share = 100 * self.num_trained_tokens / self.num_tokens if self.num_tokens else 0.0
        line = (
            f"{self.source}: {self.num_records:,} {self.format} records -> {self.num_documents:,} documents "
            f"in {self.num_rows:,} rows; {self.num_tokens:,} tokens, {self.num_trained_tokens:,} trained ({share:.0f}%)"
        )
        extras = [
            f"{n:,} {what}"
            for n, what in ((self.num_split, "split"), (self.num_truncated, "truncated"), (self.num_dropped, "dropped"))
            if n
        ]
        return line + (f"; {', '.join(extras)}" if extras else "")


@dataclass
class TokenizedData:
    """Token rows ready for `collate`, and how they were made."""

    rows: list[Row]
    stats: DataStats


def build_dataset(
    source: str,
    tokenizer,
    *,
    labels: Labels,
    max_length: int,
    packing: bool,
    overflow: str = "truncate",
    format: str = "auto",
    split: str = "train",
) -> TokenizedData:
    """Read `source` and return its token rows, `labels` saying which tokens are trained (packed into max_length
    rows when `packing`)."""
    if labels not in LABELS:
        raise TunesmithError(
            "labels: build_dataset makes data for a next-token method, "
            + " or ".join(f"{k!r} (method {m})" for k, m in METHOD_OF_LABELS.items()) + f"; got {labels!r}"
        )
    if overflow not in OVERFLOWS:
        raise TunesmithError(f"data.overflow: expected truncate or drop, got {overflow!r}")
    if max_length < 2:
        raise TunesmithError(f"train.max_length: must be at least 2 tokens, got {max_length}")
    if format != "auto" and format not in FORMATS:
        raise TunesmithError(f"data.format: expected auto or one of {', '.join(FORMATS)}, got {format!r}")

    records = load_records(source, split)
    fmt = choose_format(records, source, format, labels)
    check_format(fmt, labels, source)
    normalised = normalise_records(records, fmt, source)
    samples = tokenize_samples(normalised, tokenizer, labels)
    if labels == "all":
        documents, counts = _pretrain_documents(samples, source, max_length, overflow)
    else:
        documents, counts = _sft_documents(samples, source, max_length, overflow)

    rows = pack_rows(documents, max_length) if packing else documents
    stats = DataStats(
        source=source,
        format=fmt,
        num_records=len(records),
        num_documents=len(documents),
        num_rows=len(rows),
        num_tokens=sum(len(r.input_ids) for r in rows),
        num_trained_tokens=sum(len(r.labels) - r.labels.count(IGNORE_INDEX) for r in rows),
        **counts,
    )
    return TokenizedData(rows=rows, stats=stats)


def text_records(source: str, split: str = "train") -> list[tuple[dict, str]]:
    """The (record, location) pairs of a plain-text source (field 'text'); any other format is refused."""
    records = load_records(source, split)
    fmt = choose_format(records, source, "auto", "all")
    if fmt != "text":
        raise TunesmithError(f"{source}: held-out text must be plain text records (field 'text', or a .txt file), but "
                             f"this is {fmt} data; prompts with reference answers go to --data")
    return normalise_records(records, fmt, source)


def tokenize_text_file(source: str, tokenizer, split: str = "train") -> list[tuple[list[int], str]]:
    """(token ids, location) of every record of a plain-text source, as pretraining tokenizes them: one BOS and one
    EOS around each text; empty texts are left out."""
    samples = _tokenize_texts(text_records(source, split), tokenizer)
    kept = [(ids, where) for ids, _, where in samples if ids]
    if not kept:
        raise TunesmithError(f"{source}: every one of the {len(samples)} records has empty text; there is no text to "
                             "measure")
    return kept


def choose_format(records: list, source: str, format: str, labels: Labels) -> str:
    """The format to read `records` as: the one given, or the detected one (text first when every token trains)."""
    if format != "auto":
        return format
    if labels == "all" and "text" in candidate_formats(records, source):
        return "text"  # records holding both `text` and e.g. `messages`: pretraining wants the text
    return detect_format(records, source)


def check_format(fmt: str, labels: Labels, source: str) -> None:
    """Refuse formats the method cannot learn from, naming the method that can."""
    if labels == "all" and fmt != "text":
        raise TunesmithError(
            f"{source}: method pretrain learns from plain text (field 'text'), but this is {fmt} data; "
            "for prompt -> response pairs or chats use method: sft"
        )
    if labels == "assistant" and fmt == "text":
        raise TunesmithError(
            f"{source}: method sft learns from prompts and responses (prompt/completion, messages, alpaca or "
            "sharegpt fields), but this is plain text data (field 'text'); for plain text use method: pretrain"
        )


def tokenize_samples(
    normalised: list[tuple[dict, str]], tokenizer, labels: Labels
) -> list[tuple[list[int], list[int], str]]:
    """(input_ids, labels, location) of every record before max_length applies; the first label is always -100."""
    if labels == "all":
        return _tokenize_texts(normalised, tokenizer)
    if has_chat_template(tokenizer):
        return _tokenize_chats(normalised, tokenizer)
    return _tokenize_raw(normalised, tokenizer)


# ---------------------------------------------------------------- tokenizing


def _tokenize_texts(normalised: list[tuple[dict, str]], tokenizer) -> list[tuple[list[int], list[int], str]]:
    # BOS/EOS are added here, not by the tokenizer, so every tokenizer gives one BOS and one EOS.
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    samples = []
    for batch in _batches(normalised, "tokenize"):
        encoded = tokenizer([record["text"] for record, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (record, where) in zip(encoded, batch):
            if record["text"] == "":
                samples.append(([], [], where))  # counted as dropped by the caller
                continue
            ids = bos + ids + eos
            samples.append((ids, [IGNORE_INDEX, *ids[1:]], where))
    return samples


def _tokenize_chats(normalised: list[tuple[dict, str]], tokenizer) -> list[tuple[list[int], list[int], str]]:
    samples = []
    for batch in _batches(normalised, "render + tokenize"):
        rendered = [render_with_spans(record["messages"], tokenizer, where) for record, where in batch]
        all_ids, all_labels = tokenize_with_spans([t for t, _ in rendered], [s for _, s in rendered], tokenizer)
        for ids, labels, (_, where) in zip(all_ids, all_labels, batch):
            if labels.count(IGNORE_INDEX) == len(labels):
                raise TunesmithError(
                    f"{where}: no assistant token is left after tokenizing the rendered conversation; the "
                    "chat template or tokenizer drops the assistant text"
                )
            samples.append((ids, labels, where))
    return samples


def _tokenize_raw(normalised: list[tuple[dict, str]], tokenizer) -> list[tuple[list[int], list[int], str]]:
    samples = []
    for record, where in normalised:
        messages = record["messages"]
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise TunesmithError(
                f"{where}: the tokenizer has no chat template, so only single prompt -> response samples can be "
                f"rendered (as prompt + completion + EOS), but this conversation has roles "
                f"{[m['role'] for m in messages]}; use a model whose tokenizer ships a chat template "
                "(an -Instruct/-Chat model) or give prompt/completion data"
            )
        ids, labels = render_raw(messages[0]["content"], messages[1]["content"], tokenizer)
        samples.append((ids, labels, where))
    return samples


# ---------------------------------------------------------------- fitting max_length


def text_blocks(ids: list[int], max_length: int) -> list[list[int]]:
    """A tokenized text cut into blocks of at most max_length tokens that overlap by one token: each block's first
    token (never predicted) is the previous block's last (predicted there), so every token but the text's first is
    predicted exactly once."""
    if len(ids) <= max_length:
        return [ids]
    blocks = []
    for s in range(0, len(ids) - 1, max_length - 1):
        blocks.append(ids[s : s + max_length])
        if s + max_length >= len(ids):
            break
    return blocks


def _pretrain_documents(
    samples: list[tuple[list[int], list[int], str]], source: str, max_length: int, overflow: str
) -> tuple[list[Row], dict[str, int]]:
    if overflow == "drop":
        log.warning("%s: data.overflow=drop is ignored for pretrain: long texts are split into chunks of max_length", source)
    documents: list[Row] = []
    num_split = num_empty = 0
    for ids, labels, _ in samples:
        if not ids:
            num_empty += 1
            continue
        if len(ids) <= max_length:
            documents.append(make_document(ids, labels))
            continue
        num_split += 1
        documents.extend(make_document(chunk, chunk) for chunk in text_blocks(ids, max_length))
    if num_empty:
        log.warning("%s: skipped %d records with empty text", source, num_empty)
    if not documents:
        raise TunesmithError(f"{source}: every one of the {len(samples)} records has empty text; there is nothing to train on")
    return documents, {"num_truncated": 0, "num_dropped": num_empty, "num_split": num_split}


def _sft_documents(
    samples: list[tuple[list[int], list[int], str]], source: str, max_length: int, overflow: str
) -> tuple[list[Row], dict[str, int]]:
    documents: list[Row] = []
    num_truncated = num_too_long = num_emptied = 0
    longest = 0
    for ids, labels, _ in samples:
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if overflow == "drop":
                num_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if labels.count(IGNORE_INDEX) == len(labels):  # labels[0] is always -100 by now
                num_emptied += 1  # truncation cut every response token: nothing left to learn
                continue
            num_truncated += 1
        documents.append(make_document(ids, labels))
    num_dropped = num_too_long + num_emptied
    if not documents:
        why = (
            "they were dropped (data.overflow=drop)" if overflow == "drop"
            else "truncating them leaves no response token to learn"
        )
        raise TunesmithError(
            f"{source}: all {len(samples)} samples are longer than train.max_length={max_length} (the longest has "
            f"{longest} tokens) and {why}; raise train.max_length"
            + (" or set data.overflow=truncate" if overflow == "drop" else " or shorten the prompts")
        )
    if num_too_long:
        log.warning("%s: dropped %d of %d samples longer than train.max_length=%d (data.overflow=drop)",
                    source, num_too_long, len(samples), max_length)
    if num_emptied:
        log.warning("%s: dropped %d samples whose response starts after train.max_length=%d tokens",
                    source, num_emptied, max_length)
    if num_truncated:
        log.info("%s: truncated %d of %d samples to train.max_length=%d tokens",
                    source, num_truncated, len(samples), max_length)
    return documents, {"num_truncated": num_truncated, "num_dropped": num_dropped, "num_split": 0}
