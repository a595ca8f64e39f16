"""Prompt rows the RL methods sample from, and training rows of sampled completions.

A completion is trained as one document, prompt + completion, with only the completion tokens
labelled; several documents share a row (positions restart, no cross-attention), so one forward
pass scores many completions without padding. Per-token values fixed at rollout time (the old
and reference log-probs, advantages, returns, values) travel with the row, in the order of its
labelled tokens, which is the order the loss sees them in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tunesmith.data.dataset import DataStats, TokenizedData
from tunesmith.data.packing import Row, _positions, collate, document_index, pack_bins
from tunesmith.errors import TunesmithError
from tunesmith.ops.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

TOKEN_FIELDS = ("old_logps", "ref_logps", "advantages", "returns", "old_values")


@dataclass
class PromptRow:
    """One prompt to sample completions for."""

    input_ids: list[int]  # the rendered prompt, ending with the assistant header
    messages: list[dict]  # the prompt conversation (ending in a user turn)
    prompt: str  # the last user message, as reward functions receive it
    fields: dict  # the row's other fields, and its reference answer as `answer` (None when absent)


def build_prompts(source: str, tokenizer, *, max_length: int, max_new_tokens: int, split: str = "train") -> TokenizedData:
    """Prompt rows from any prompt-bearing data: prompt (with or without an answer), or messages ending in a user turn
    (or in an assistant turn, which becomes the reference answer)."""
    from tunesmith.eval.examples import load_eval_examples
    from tunesmith.eval.generate import prompt_ids

    examples = load_eval_examples(source, split)
    encoded = prompt_ids(tokenizer, [e.messages for e in examples])
    limit = max_length - max_new_tokens
    rows = [
        PromptRow(ids, e.messages, e.prompt, {**e.fields, "answer": e.reference})
        for e, ids in zip(examples, encoded) if len(ids) <= limit
    ]
    dropped = len(examples) - len(rows)
    if not rows:
        longest = max(len(ids) for ids in encoded)
        raise TunesmithError(
            f"{source}: every prompt is longer than train.max_length - rl.max_new_tokens = {limit} tokens (the longest "
            f"has {longest}); raise train.max_length or lower rl.max_new_tokens"
        )
    if dropped:
        log.warning("%s: left out %d of %d prompts longer than %d tokens (train.max_length - rl.max_new_tokens)",
                    source, dropped, len(examples), limit)
    stats = DataStats(source=source, format="prompts", num_records=len(examples), num_documents=len(rows),
                      num_rows=len(rows), num_tokens=sum(len(r.input_ids) for r in rows), num_trained_tokens=0,
                      num_truncated=0, num_dropped=dropped)
    return TokenizedData(rows=rows, stats=stats)  # type: ignore[arg-type]


@dataclass
class Sequence:
    """One sampled completion of a prompt, with what the rollout measured per completion token."""

    prompt_ids: list[int]
    completion_ids: list[int]
    index: int  # position in the step's batch of completions
    token_fields: dict[str, list[float]] = field(default_factory=dict)  # each (len(completion_ids),)


@dataclass
class SeqRow(Row):
    """A row of whole prompt + completion documents."""

    indices: list[int] = field(default_factory=list)  # the completions in this row, by batch index
    token_fields: dict[str, list[float]] = field(default_factory=dict)  # per labelled token, in row order


def pack_sequences(seqs: list[Sequence], max_length: int) -> list[SeqRow]:
    """Documents prompt + completion (completion labelled) packed into rows of at most max_length tokens."""
    rows = []
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in seqs]
    for members in pack_bins(lengths, max_length):
        row = SeqRow([], [], [], indices=[], token_fields={})
        for i in members:
            s = seqs[i]
            ids = s.prompt_ids + s.completion_ids
            row.input_ids += ids
            row.labels += [IGNORE_INDEX] * len(s.prompt_ids) + s.completion_ids
            row.position_ids += _positions(len(ids))
            row.indices.append(s.index)
            for name, values in s.token_fields.items():
                row.token_fields.setdefault(name, []).extend(values)
        rows.append(row)
    return rows


def collate_sequences(rows: list[SeqRow], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus seq_index (batch, T) numbering the documents of the batch, their batch indices (seqs,),
    and every per-token field flattened in the order of the labelled tokens (tokens,)."""
    batch = collate(rows, pad_id)
    batch["seq_index"] = document_index(rows, batch["input_ids"].shape[1])  # (batch, T)
    batch["completion_index"] = torch.tensor([i for r in rows for i in r.indices], dtype=torch.long)  # (seqs,)
    for name in TOKEN_FIELDS:
        if all(name in r.token_fields for r in rows):
            batch[name] = torch.tensor([v for r in rows for v in r.token_fields[name]], dtype=torch.float32)
    return batch

