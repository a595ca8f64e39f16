"""Pack whole documents into rows and collate rows into padded batches.

Documents inside a row never attend to each other: position ids restart at 0 at every document
start, and with `attention_mask=None` transformers derives a block-diagonal causal mask from
those restarts (sdpa/eager) or varlen boundaries (flash-attention). A document's first label is
-100, so no token is predicted across a boundary either.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import torch

from tunesmith.ops.losses import IGNORE_INDEX


@dataclass
class Row:
    """One training row (packed or not)."""

    input_ids: list[int]
    labels: list[int]  # -100 where no loss; the first token of every document is always -100
    position_ids: list[int]  # restart at 0 at every document start


def make_document(input_ids: list[int], labels: list[int]) -> Row:
    """A single document as a row: positions 0..n-1 and its first label masked (takes over both lists)."""
    if labels is input_ids:  # pretraining labels are the ids themselves; masking must not touch the ids
        labels = list(labels)
    if labels:
        labels[0] = IGNORE_INDEX
    return Row(input_ids, labels, positions(len(input_ids)))


_POSITIONS: list[int] = []


def positions(n: int) -> list[int]:
    """Position ids 0..n-1 of one document.

    Slicing one shared list reuses its int objects: millions of tokens, no new ints.
    """
    if n > len(_POSITIONS):
        _POSITIONS.extend(range(len(_POSITIONS), max(n, 2 * len(_POSITIONS))))
    return _POSITIONS[:n]


def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group document indices into bins of total length <= max_length (best-fit decreasing, deterministic).

    Bins come back ordered by their first document, documents inside a bin in data order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free spaces that some open bin has
    open_bins: dict[int, list[int]] = {}  # free space -> open bins with exactly that much room
    for i in order:
        n = lengths[i]
        assert 0 < n <= max_length, f"document of length {n} cannot fit a row of {max_length}"
        k = bisect_left(spaces, n)  # the tightest bin that still fits: best fit
        if k < len(spaces):
            space = spaces[k]
            candidates = open_bins[space]
            b = candidates.pop()
            if not candidates:
                del open_bins[space]
                spaces.pop(k)
        else:
            b, space = len(bins), max_length
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in open_bins:
                open_bins[left] = []
                insort(spaces, left)
            open_bins[left].append(b)
    for members in bins:
        members.sort()
    bins.sort(key=lambda members: members[0])
    return bins


def pack_rows(documents: list[Row], max_length: int) -> list[Row]:
    """Fill rows of at most max_length tokens with whole documents; positions restart per document."""
    bins = pack_bins([len(d.input_ids) for d in documents], max_length)
    rows = []
    for members in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in members:
            doc = documents[i]
            input_ids += doc.input_ids
            labels += doc.labels
            position_ids += doc.position_ids
        rows.append(Row(input_ids, labels, position_ids))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows on the right to the longest one: input_ids, labels, position_ids, each (batch, T).

    The padding tail is its own pseudo-document (positions 0, 1, 2, ..., labels -100), so real
    tokens never attend to it. Call the model with position_ids and attention_mask=None.
    """
    assert rows, "collate needs at least one row"
    width = max(len(r.input_ids) for r in rows)
    input_ids, labels, position_ids = [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        input_ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE_INDEX] * pad)
        position_ids.append(r.position_ids + positions(pad))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (batch, T)
        "labels": torch.tensor(labels, dtype=torch.long),  # (batch, T)
        "position_ids": torch.tensor(position_ids, dtype=torch.long),  # (batch, T)
    }


def document_index(rows: list[Row], width: int) -> torch.Tensor:
    """(batch, width): the batch-wide number of the document each token belongs to, counted row by row from
    the position restarts; -1 on padding. Preference and RL losses sum per document with it."""
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    num = 0
    for b, row in enumerate(rows):
        for start, end in document_bounds(row.position_ids):
            index[b, start:end] = num
            num += 1
    return index


def document_bounds(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every document of a row: a document starts wherever its position is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return list(zip(starts, starts[1:] + [len(position_ids)]))
