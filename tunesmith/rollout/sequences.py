"""Prompt rows the RL methods sample from, and training rows of sampled completions.

A completion is trained as one document, prompt + completion, with only the completion tokens
labelled; several documents share a row (positions restart, no cross-attention), so one forward
pass scores many completions without padding. With `share_prompts`, the completions of one prompt
form one tree instead: the prompt but its last token once, then per completion that last token and
the completion, positions going on from the prompt (`tunesmith.model.attention`). Each completion
sees exactly what it would see alone, and a group of G answers computes its prompt once, not G
times. Per-token values fixed at rollout time (the old and reference log-probs, advantages,
returns, values) travel with the row, in the order of its labelled tokens, which is the order the
loss sees them in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tunesmith.data.dataset import DataStats, TokenizedData
from tunesmith.data.packing import Row, collate, pack_bins, positions
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
    from tunesmith.data.examples import load_eval_examples
    from tunesmith.model.generate import prompt_ids

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
class Completion:
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
    owners: list[int] = field(default_factory=list)  # per token: its completion's place in `indices`; -1 on a shared prompt


def pack_sequences(seqs: list[Completion], max_length: int, *, share_prompts: bool = False) -> list[SeqRow]:
    """Documents prompt + completion (completion labelled) packed into rows of at most max_length tokens;
    with `share_prompts`, completions of the same prompt as trees that hold the prompt once (module docstring)."""
    docs = _trees(seqs, max_length) if share_prompts else [[s] for s in seqs]
    rows = []
    for members in pack_bins([_tree_length(d) for d in docs], max_length):
        row = SeqRow([], [], [], indices=[], token_fields={}, owners=[])
        for i in members:
            doc = docs[i]
            shared = _shared_length(doc)
            row.input_ids += doc[0].prompt_ids[:shared]
            row.labels += [IGNORE_INDEX] * shared
            row.position_ids += positions(shared)
            row.owners += [-1] * shared
            for s in doc:
                ids = s.prompt_ids[shared:] + s.completion_ids
                row.input_ids += ids
                row.labels += [IGNORE_INDEX] * (len(s.prompt_ids) - shared) + s.completion_ids
                row.position_ids += positions(shared + len(ids))[shared:]
                row.owners += [len(row.indices)] * len(ids)
                row.indices.append(s.index)
                for name, values in s.token_fields.items():
                    row.token_fields.setdefault(name, []).extend(values)
        rows.append(row)
    return rows


def _shared_length(doc: list[Completion]) -> int:
    """Tokens a tree holds once: its prompt but the last token (none for a single document)."""
    return len(doc[0].prompt_ids) - 1 if len(doc) > 1 else 0


def _tree_length(doc: list[Completion]) -> int:
    """Tokens of a tree: the shared prompt but its last token once, then each completion with that token."""
    shared = _shared_length(doc)
    return shared + sum(len(s.prompt_ids) - shared + len(s.completion_ids) for s in doc)


def _trees(seqs: list[Completion], max_length: int) -> list[list[Completion]]:
    """Completions grouped by prompt (in order of first appearance), each group cut into trees of at most
    max_length tokens; a prompt of one token has nothing to share and gives single documents."""
    groups: dict[tuple[int, ...], list[Completion]] = {}
    for s in seqs:
        groups.setdefault(tuple(s.prompt_ids), []).append(s)
    trees: list[list[Completion]] = []
    for prompt, members in groups.items():
        if len(prompt) < 2:
            trees += [[s] for s in members]
            continue
        current: list[Completion] = []
        for s in members:
            if current and _tree_length([*current, s]) > max_length:
                trees.append(current)
                current = []
            current.append(s)
        trees.append(current)
    return trees


def collate_sequences(rows: list[SeqRow], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus seq_index (batch, T) numbering the completions of the batch (-1 on shared prompts and
    padding), their batch indices (seqs,), and every per-token field flattened in labelled-token order (tokens,)."""
    batch = collate(rows, pad_id)
    seq_index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)  # (batch, T)
    offset = 0
    for b, row in enumerate(rows):
        owners = torch.tensor(row.owners, dtype=torch.long)
        seq_index[b, : len(owners)] = torch.where(owners >= 0, owners + offset, owners)
        offset += len(row.indices)
    batch["seq_index"] = seq_index
    batch["completion_index"] = torch.tensor([i for r in rows for i in r.indices], dtype=torch.long)  # (seqs,)
    for name in TOKEN_FIELDS:
        if all(name in r.token_fields for r in rows):
            batch[name] = torch.tensor([v for r in rows for v in r.token_fields[name]], dtype=torch.float32)
    return batch

