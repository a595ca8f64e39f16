"""Preference pairs for `reward` and `dpo`: read, check, render with the chat template, pack, collate.

Accepted records (in any reader's file, or an HF dataset):
  - prompt / chosen / rejected as strings;
  - prompt as a list of messages, chosen / rejected as a string or as [one assistant message];
  - chosen / rejected as whole conversations (lists of messages) that share every message but the
    last, which is the assistant's answer.
An optional numeric `margin` field feeds the reward model's margin loss.

Each side is rendered as prompt + answer with the chat template; only the answer tokens (and the
template's end-of-turn marker) are scored. A pair becomes one document, chosen then rejected, each
with positions restarting at 0, so one forward pass scores both and neither sees the other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from tunesmith.data.chat import has_chat_template, render_raw, render_with_spans, tokenize_with_spans
from tunesmith.data.dataset import DataStats, TokenizedData
from tunesmith.data.formats import ROLES, bad_value
from tunesmith.data.packing import Row, collate, document_index, pack_bins, positions
from tunesmith.data.readers import is_text, load_records
from tunesmith.errors import TunesmithError
from tunesmith.ops.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

FORMAT = "preference"
EXPECTED = (
    "prompt, chosen, rejected (strings, or a prompt of messages), or chosen and rejected as whole "
    "conversations that differ only in the last, assistant, message"
)
_MAX_LISTED_PROBLEMS = 10


@dataclass
class PairRow(Row):
    """A row of whole pairs: sequences in order chosen, rejected, chosen, rejected, ..."""

    seq_lens: list[int] = field(default_factory=list)  # tokens of each sequence, in row order
    margins: list[float] = field(default_factory=list)  # one per pair
    ref_logps: list[float] | None = None  # one per sequence: the reference model's answer log-prob


@dataclass
class Pair:
    """One normalised preference pair."""

    prompt: list[dict]  # messages, ending with a user turn
    chosen: str
    rejected: str
    margin: float
    where: str


def is_preference_record(record: object) -> bool:
    """True when a record has the fields of preference data."""
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


# ---------------------------------------------------------------- normalising


class _Problem(Exception):
    pass


def normalise_pairs(records: list, source: str) -> list[Pair]:
    """Check every record and return the pairs; all problems are reported together."""
    if not records:
        raise TunesmithError(f"{source}: the dataset is empty (no records); give at least one preference pair")
    pairs: list[Pair] = []
    problems: list[str] = []
    for i, item in enumerate(records, 1):
        record, where = item if isinstance(item, tuple) else (item, f"{source} record {i}")
        try:
            pairs.append(_normalise(record, where))
        except _Problem as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        noun = "record is" if len(problems) == 1 else "records are"
        raise TunesmithError(f"{len(problems)} {noun} not valid preference data in {source} (expected {EXPECTED}):",
                             problems=shown)
    return pairs


def _normalise(record: object, where: str) -> Pair:
    if not isinstance(record, dict):
        raise _Problem(f"{where}: expected an object with fields, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise _Problem(f"{where}: field {name!r} is missing (fields seen: {{{', '.join(map(str, record))}}}); "
                           f"preference data needs {EXPECTED}")
    margin = _margin(record, where)
    if "prompt" in record:
        prompt = _prompt(record["prompt"], where)
        chosen = _answer(record["chosen"], "chosen", where)
        rejected = _answer(record["rejected"], "rejected", where)
    else:
        prompt_c, chosen = _conversation(record["chosen"], "chosen", where)
        prompt_r, rejected = _conversation(record["rejected"], "rejected", where)
        if prompt_c != prompt_r:
            k = next(j for j in range(max(len(prompt_c), len(prompt_r)))
                     if j >= min(len(prompt_c), len(prompt_r)) or prompt_c[j] != prompt_r[j])
            raise _Problem(f"{where}: the prompt differs between the two conversations (from message {k}); chosen "
                           "and rejected must share every message but the last, the assistant's answer")
        prompt = prompt_c
    if chosen == rejected:
        raise _Problem(f"{where}: 'chosen' and 'rejected' are identical; a pair needs two different answers")
    return Pair(prompt, chosen, rejected, margin, where)


def _margin(record: dict, where: str) -> float:
    value = record.get("margin")
    if value is None:
        return 0.0
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise _Problem(f"{where}: field 'margin' must be a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise _Problem(f"{where}: field 'margin' must be finite, got {value!r}")
    return margin


def _messages(raw: object, name: str, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise _Problem(f"{where}: field {name!r} must be a string or a non-empty list of {{role, content}} messages, "
                       f"got {bad_value(raw)}")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _Problem(f"{where}: {name}[{j}] must be {{role: system|user|assistant, content: string}}, got {m!r:.60}")
        if not is_text(m.get("content")):
            raise _Problem(f"{where}: {name}[{j}].content must be a string, got {bad_value(m.get('content'))}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(raw: object, where: str) -> list[dict]:
    if is_text(raw):
        assert isinstance(raw, str)
        if not raw.strip():
            raise _Problem(f"{where}: field 'prompt' is empty; every pair needs a prompt")
        return [{"role": "user", "content": raw}]
    messages = _messages(raw, "prompt", where)
    if messages[-1]["role"] != "user":
        raise _Problem(f"{where}: the prompt's last message is {messages[-1]['role']!r}; it must be a user turn "
                       "that the chosen and rejected answers reply to")
    return messages


def _answer(raw: object, name: str, where: str) -> str:
    if isinstance(raw, list):
        messages = _messages(raw, name, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise _Problem(f"{where}: with a separate 'prompt', field {name!r} must be the answer: a string or "
                           "[one assistant message]")
        raw = messages[0]["content"]
    if not is_text(raw):
        raise _Problem(f"{where}: field {name!r} must be a string or a list of messages, got {bad_value(raw)}")
    assert isinstance(raw, str)
    if not raw.strip():
        raise _Problem(f"{where}: field {name!r} is an empty answer; both answers of a pair need text")
    return raw


def _conversation(raw: object, name: str, where: str) -> tuple[list[dict], str]:
    if is_text(raw):
        raise _Problem(f"{where}: field 'prompt' is missing; with string answers give the prompt in 'prompt', "
                       f"or give {name!r} as a whole conversation (a list of messages)")
    messages = _messages(raw, name, where)
    if messages[-1]["role"] != "assistant":
        raise _Problem(f"{where}: the last message of {name!r} is {messages[-1]['role']!r}; it must be the "
                       "assistant's answer")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise _Problem(f"{where}: {name!r} needs a user message before the final assistant answer")
    if not messages[-1]["content"].strip():
        raise _Problem(f"{where}: the answer in {name!r} is empty; both answers of a pair need text")
    return messages[:-1], messages[-1]["content"]


# ---------------------------------------------------------------- tokenizing


def tokenize_pair_side(prompt: list[dict], answer: str, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer and labels that keep only the answer tokens."""
    if has_chat_template(tokenizer):
        text, spans = render_with_spans([*prompt, {"role": "assistant", "content": answer}], tokenizer, where)
        (ids,), (labels,) = tokenize_with_spans([text], [spans[-1:]], tokenizer)
        return ids, labels
    if len(prompt) != 1:
        raise TunesmithError(f"{where}: the tokenizer has no chat template, so only a single user prompt can be "
                             "rendered; use a model whose tokenizer ships a chat template")
    return render_raw(prompt[0]["content"], answer, tokenizer)


def _fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(t != IGNORE_INDEX for t in labels[1:]) else None


def build_pairs(
    source: str,
    tokenizer,
    *,
    max_length: int,
    packing: bool,
    overflow: str = "truncate",
    split: str = "train",
    trim_pad: bool = False,
) -> TokenizedData:
    """Read preference data and return rows of whole pairs (each side at most max_length tokens).

    With `packing`, several pairs share a row of 2 * max_length tokens. `trim_pad` drops pad tokens
    that end a sequence, so a reward read at the last token is read where HF's
    `*ForSequenceClassification` reads it (the last non-pad token).
    """
    records = load_records(source, split)
    pairs = normalise_pairs(records, source)
    documents: list[PairRow] = []
    num_truncated = num_dropped = 0
    for pair in pairs:
        sides = [tokenize_pair_side(pair.prompt, answer, tokenizer, pair.where) for answer in (pair.chosen, pair.rejected)]
        if trim_pad and tokenizer.pad_token_id is not None:
            sides = [_trim_pad(ids, labels, tokenizer.pad_token_id) for ids, labels in sides]
        if any(len(ids) > max_length for ids, _ in sides):
            fitted = [_fit(ids, labels, max_length) for ids, labels in sides]
            if overflow == "drop" or any(f is None for f in fitted):
                num_dropped += 1
                continue
            sides = fitted  # type: ignore[assignment]
            num_truncated += 1
        documents.append(_pair_document(sides, pair.margin))
    if not documents:
        raise TunesmithError(
            f"{source}: every one of the {len(pairs)} pairs has a side longer than train.max_length={max_length} "
            f"({'dropped with data.overflow=drop' if overflow == 'drop' else 'no answer token left after truncating'}); "
            "raise train.max_length or shorten the prompts"
        )
    if num_dropped:
        log.warning("%s: dropped %d of %d pairs longer than train.max_length=%d", source, num_dropped, len(pairs), max_length)
    rows = _pack(documents, 2 * max_length) if packing else documents
    stats = DataStats(
        source=source,
        format=FORMAT,
        num_records=len(records),
        num_documents=len(documents),
        num_rows=len(rows),
        num_tokens=sum(len(r.input_ids) for r in rows),
        num_trained_tokens=sum(len(r.labels) - r.labels.count(IGNORE_INDEX) for r in rows),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
    )
    return TokenizedData(rows=rows, stats=stats)


def _trim_pad(ids: list[int], labels: list[int], pad_id: int) -> tuple[list[int], list[int]]:
    n = len(ids)
    while n > 1 and ids[n - 1] == pad_id:
        n -= 1
    return ids[:n], labels[:n]


def _pair_document(sides: list[tuple[list[int], list[int]]], margin: float) -> PairRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ids, side_labels in sides:
        side_labels = list(side_labels)
        side_labels[0] = IGNORE_INDEX  # no token is predicted across the chosen/rejected boundary
        input_ids += ids
        labels += side_labels
        position_ids += positions(len(ids))
    return PairRow(input_ids, labels, position_ids, seq_lens=[len(ids) for ids, _ in sides], margins=[margin])


def _pack(documents: list[PairRow], row_length: int) -> list[PairRow]:
    rows = []
    for members in pack_bins([len(d.input_ids) for d in documents], row_length):
        row = PairRow([], [], [], seq_lens=[], margins=[])
        for i in members:
            doc = documents[i]
            row.input_ids += doc.input_ids
            row.labels += doc.labels
            row.position_ids += doc.position_ids
            row.seq_lens += doc.seq_lens
            row.margins += doc.margins
        rows.append(row)
    return rows


def collate_pairs(rows: list[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus, per token, the batch-wide index of its sequence (chosen 2k, rejected 2k+1; -1 on padding),
    the pair margins, and the precomputed reference log-probs when every row has them."""
    batch = collate(rows, pad_id)
    batch["seq_index"] = document_index(rows, batch["input_ids"].shape[1])  # (batch, T)
    batch["margins"] = torch.tensor([m for r in rows for m in r.margins], dtype=torch.float32)  # (pairs,)
    if all(r.ref_logps is not None for r in rows):
        batch["ref_logps"] = torch.tensor([v for r in rows for v in r.ref_logps], dtype=torch.float32)  # (seqs,)
    return batch


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a collated batch: what preference losses are averaged over."""
    return int(batch["margins"].numel())
