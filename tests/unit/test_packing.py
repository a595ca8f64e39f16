"""Packing keeps every document whole, fills rows, restarts positions; collate pads into its own document."""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable

import torch

from tunesmith.data import Row, build_dataset, collate
from tunesmith.data.packing import make_document, pack_bins, pack_rows


def _documents(lengths: list[int]) -> list[Row]:
    docs = []
    for d, n in enumerate(lengths):
        ids = [1000 * d + t for t in range(n)]  # unique ids tell documents apart after packing
        docs.append(make_document(ids, ids))
    return docs


def _split_at_restarts(row: Row) -> list[tuple[list[int], list[int]]]:
    starts = [t for t, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
    return [(row.input_ids[a:b], row.labels[a:b]) for a, b in zip(starts, starts[1:])]


def test_documents_whole_positions_restart_rows_within_max_length():
    rng = random.Random(0)
    max_length = 128
    lengths = [rng.randint(1, max_length) for _ in range(500)] + [max_length, 1, 1, max_length - 1]
    docs = _documents(lengths)
    rows = pack_rows(docs, max_length)
    assert all(len(r.input_ids) <= max_length for r in rows)
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) for r in rows)
    found = [piece for r in rows for piece in _split_at_restarts(r)]
    # every document appears exactly once, unsplit, with its labels (first one -100)
    assert Counter(tuple(ids) for ids, _ in found) == Counter(tuple(d.input_ids) for d in docs)
    for ids, labels in found:
        assert labels == [-100, *ids[1:]]
    for r in rows:
        for ids, _ in _split_at_restarts(r):
            assert ids[0] % 1000 == 0  # each restart is a real document start


def test_rows_are_well_filled():
    rng = random.Random(1)
    max_length = 1024
    lengths = [rng.randint(16, 600) for _ in range(2000)]
    rows = pack_rows(_documents(lengths), max_length)
    lower_bound = -(-sum(lengths) // max_length)
    assert len(rows) <= lower_bound * 1.03 + 1
    fill = sum(lengths) / (len(rows) * max_length)
    assert fill > 0.96


def test_packing_is_deterministic_and_ordered():
    rng = random.Random(2)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    assert pack_bins(lengths, 64) == pack_bins(list(lengths), 64)
    bins = pack_bins(lengths, 64)
    assert [b[0] for b in bins] == sorted(b[0] for b in bins)
    assert all(b == sorted(b) for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


def _lines_run(func: Callable[..., object], *args: object) -> int:
    """Python lines executed by a call, in `func` and in everything it calls: a count of its work, not a time."""
    count = 0

    def on_line(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return on_line

    before = sys.gettrace()
    sys.settrace(lambda frame, event, arg: on_line)
    try:
        func(*args)
    finally:
        sys.settrace(before)
    return count


def test_packing_work_per_document_does_not_grow_with_the_data():
    # Best fit finds a document's bin by bisecting the distinct free spaces (at most max_length of them), so
    # each document costs a bounded number of lines however many bins are open; scanning the open bins would
    # cost lines in proportion to them, ten times more per document at 20,000 documents than at 2,000.
    per_document = {}
    for n in (2_000, 20_000):
        rng = random.Random(3)
        lengths = [rng.randint(1, 1024) for _ in range(n)]
        per_document[n] = _lines_run(pack_bins, lengths, 1024) / n
    assert per_document[20_000] < 20
    assert per_document[20_000] <= 1.05 * per_document[2_000], per_document


def test_packing_100k_documents():
    rng = random.Random(3)
    lengths = [rng.randint(1, 1024) for _ in range(100_000)]
    bins = pack_bins(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) <= 1.03 * sum(lengths) / 1024 + 1


def test_collate_pads_into_its_own_document():
    rows = pack_rows(_documents([3, 2]), 8) + [make_document([7, 8, 9, 10, 11, 12, 13], [7, 8, 9, 10, 11, 12, 13])]
    batch = collate(rows, pad_id=99)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 7), "labels": (2, 7), "position_ids": (2, 7)}
    assert batch["input_ids"][0].tolist() == [0, 1, 2, 1000, 1001, 99, 99]
    assert batch["labels"][0].tolist() == [-100, 1, 2, -100, 1001, -100, -100]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert batch["position_ids"][1].tolist() == list(range(7))
    assert all(v.dtype == torch.long for v in batch.values())


def test_counted_tokens_equal_labels_and_never_cross_documents(tiny_tokenizer, sft_file):
    data = build_dataset(str(sft_file), tiny_tokenizer, labels="assistant", max_length=128, packing=True)
    batch = collate(data.rows, tiny_tokenizer.pad_token_id)
    labels, positions = batch["labels"], batch["position_ids"]  # (batch, T)
    # the caller's shift: hidden[t] predicts token t+1 where labels[t+1] != -100
    counted = labels[:, 1:] != -100
    assert counted.sum() == (labels != -100).sum() == data.stats.num_trained_tokens
    # a counted target is never a document start, so no prediction crosses a boundary
    assert not (counted & (positions[:, 1:] == 0)).any()


def test_packed_and_unpacked_hold_the_same_documents(tiny_tokenizer, sft_file):
    packed = build_dataset(str(sft_file), tiny_tokenizer, labels="assistant", max_length=128, packing=True)
    single = build_dataset(str(sft_file), tiny_tokenizer, labels="assistant", max_length=128, packing=False)
    assert len(single.rows) == 16 and len(packed.rows) < 16
    assert all(r.position_ids == list(range(len(r.input_ids))) for r in single.rows)
    found = Counter(tuple(ids) for r in packed.rows for ids, _ in _split_at_restarts(r))
    assert found == Counter(tuple(r.input_ids) for r in single.rows)
    assert packed.stats.num_tokens == single.stats.num_tokens
    assert packed.stats.num_trained_tokens == single.stats.num_trained_tokens
