"""Preference data: the accepted shapes, what is scored, packing of whole pairs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.data import inspect_data
from tunesmith.data.preference import build_pairs, collate_pairs, tokenize_pair_side
from tunesmith.errors import TunesmithError
from tunesmith.ops.losses import IGNORE_INDEX

PROMPT = "Name a colour"


def _shapes() -> dict[str, dict]:
    user = {"role": "user", "content": PROMPT}
    return {
        "strings": {"prompt": PROMPT, "chosen": "Blue.", "rejected": "Seven."},
        "prompt_messages": {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
                            "rejected": "Seven."},
        "conversations": {"chosen": [user, {"role": "assistant", "content": "Blue."}],
                          "rejected": [user, {"role": "assistant", "content": "Seven."}]},
    }


def _build(path: Path, tok, **kwargs):
    return build_pairs(str(path), tok, max_length=kwargs.pop("max_length", 128), packing=kwargs.pop("packing", False),
                       **kwargs)


@pytest.mark.parametrize("shape", ["strings", "prompt_messages", "conversations"])
def test_shapes_give_the_same_tokens(shape, tiny_tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [_shapes()[shape]])
    row = _build(path, tiny_tokenizer).rows[0]
    n_chosen, n_rejected = row.seq_lens
    chosen_ids, chosen_labels = tokenize_pair_side([{"role": "user", "content": PROMPT}], "Blue.", tiny_tokenizer, "x")
    assert row.input_ids[:n_chosen] == chosen_ids
    assert row.position_ids == list(range(n_chosen)) + list(range(n_rejected))
    # only the answer and its end-of-turn marker are scored, on both sides
    for start, n, answer in ((0, n_chosen, "Blue."), (n_chosen, n_rejected, "Seven.")):
        ids = row.input_ids[start : start + n]
        scored = [t for t, lab in zip(ids, row.labels[start : start + n]) if lab != IGNORE_INDEX]
        assert tiny_tokenizer.decode(scored) == answer + "<|im_end|>"
    assert chosen_labels[0] == IGNORE_INDEX and row.labels[n_chosen] == IGNORE_INDEX


def test_hf_dataset_with_the_same_fields(tiny_tokenizer, tmp_path) -> None:
    from datasets import Dataset

    Dataset.from_list([_shapes()["strings"]] * 3).save_to_disk(str(tmp_path / "ds"))
    data = _build(tmp_path / "ds", tiny_tokenizer)
    assert data.stats.num_documents == 3 and data.stats.format == "preference"


def test_packing_keeps_pairs_whole_and_collate_numbers_sequences(tiny_tokenizer, tmp_path) -> None:
    rows = [{"prompt": f"{PROMPT} number {i}", "chosen": "Blue" + "!" * i, "rejected": "Seven"} for i in range(6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = _build(path, tiny_tokenizer, packing=True, max_length=64)
    assert len(data.rows) < 6 and sum(len(r.margins) for r in data.rows) == 6
    batch = collate_pairs(data.rows, tiny_tokenizer.pad_token_id)
    seq_index = batch["seq_index"]
    assert int(seq_index.max()) + 1 == 12 and batch["margins"].shape == (6,)
    for b, row in enumerate(data.rows):
        assert (seq_index[b, : len(row.input_ids)] >= 0).all()
        assert (seq_index[b, len(row.input_ids) :] == -1).all()
        # every sequence starts at position 0
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == len(row.seq_lens)


def test_margin_field_is_read(tiny_tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**_shapes()["strings"], "margin": 2}])
    assert _build(path, tiny_tokenizer).rows[0].margins == [2.0]


def test_overflow_truncates_answers_or_drops_pairs(tiny_tokenizer, tmp_path) -> None:
    long = {"prompt": PROMPT, "chosen": "blue " * 80, "rejected": "red"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [long, _shapes()["strings"]])
    kept = _build(path, tiny_tokenizer, max_length=40)
    assert kept.stats.num_truncated == 1 and max(max(r.seq_lens) for r in kept.rows) <= 40
    dropped = _build(path, tiny_tokenizer, max_length=40, overflow="drop")
    assert dropped.stats.num_dropped == 1 and dropped.stats.num_documents == 1


def _error(path: Path, tok) -> str:
    with pytest.raises(TunesmithError) as info:
        _build(path, tok)
    return str(info.value)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": PROMPT, "chosen": "Blue."}, "line 1: field 'rejected' is missing"),
        ({"prompt": PROMPT, "chosen": "Blue.", "rejected": "Blue."}, "line 1: 'chosen' and 'rejected' are identical"),
        ({"prompt": PROMPT, "chosen": "  ", "rejected": "Blue."}, "line 1: field 'chosen' is an empty answer"),
        ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
          "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
         "line 1: the prompt differs between the two conversations (from message 0)"),
        ({"chosen": "Blue.", "rejected": "Seven."}, "line 1: field 'prompt' is missing"),
        ({"prompt": PROMPT, "chosen": "Blue.", "rejected": "Seven.", "margin": "big"}, "field 'margin' must be a number"),
        ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "must be a user turn"),
    ],
    ids=["missing", "identical", "empty", "prompt-differs", "no-prompt", "margin", "prompt-ends-assistant"],
)
def test_bad_rows_are_named(record, expected, tiny_tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [record])
    msg = _error(path, tiny_tokenizer)
    assert str(path) in msg and expected in msg and "preference data" in msg


def test_all_bad_rows_reported_at_once(tiny_tokenizer, tmp_path) -> None:
    rows = [_shapes()["strings"], {"prompt": "p", "chosen": "a"}, _shapes()["strings"], {"prompt": "p", "chosen": "a", "rejected": "a"}]
    msg = _error(write_jsonl(tmp_path / "pairs.jsonl", rows), tiny_tokenizer)
    assert msg.startswith("2 records are not valid preference data") and "line 2:" in msg and "line 4:" in msg


def test_preference_data_given_to_sft_names_the_methods(tiny_tokenizer, tmp_path) -> None:
    from tunesmith.data import build_dataset

    path = write_jsonl(tmp_path / "pairs.jsonl", [_shapes()["strings"]])
    with pytest.raises(TunesmithError, match="method: dpo or method: reward"):
        build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=64, packing=True)


def test_inspect_understands_pairs(tiny_tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [_shapes()["strings"], _shapes()["conversations"]])
    plain = inspect_data(str(path))
    assert "preference pairs" in plain and "records: 2" in plain
    report = inspect_data(str(path), tiny_tokenizer, max_length=64)
    assert "chosen:" in report and "rejected:" in report
    assert "[[Blue.<|im_end|>]]" in report and "[[Seven.<|im_end|>]]" in report
    assert json.loads(json.dumps(report))  # plain text, printable
