"""Format detection and normalisation, pretraining documents, stats and the inspect report."""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl
from tunesmith.data import build_dataset, detect_format, inspect_data
from tunesmith.data.formats import normalise_records

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


@pytest.mark.parametrize("record, fmt", [
    ({"text": "t"}, "text"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": "p", "response": "c", "id": 3}, "prompt_completion"),
    ({"prompt": "p", "answer": "c"}, "prompt_completion"),
    ({"messages": MESSAGES}, "messages"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}, "sharegpt"),
    ({"messages": MESSAGES, "text": "pre-rendered"}, "messages"),  # the structured format wins
])
def test_detect(record, fmt):
    assert detect_format([record, dict(record)], "data.jsonl") == fmt


def test_detection_narrows_over_all_records():
    records = [({"messages": MESSAGES, "text": "x"}, "l1"), ({"text": "y"}, "l2")]
    assert detect_format(records, "d") == "text"


def _normalise(record: dict, fmt: str) -> dict:
    ((out, where),) = normalise_records([(record, "d.jsonl line 1")], fmt, "d.jsonl")
    assert where == "d.jsonl line 1"
    return out


def test_normalise_each_format():
    user_assistant = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert _normalise({"text": " t "}, "text") == {"text": " t "}
    assert _normalise({"prompt": "p", "completion": "c"}, "prompt_completion") == {"messages": user_assistant}
    assert _normalise({"prompt": "p", "response": "c"}, "prompt_completion") == {"messages": user_assistant}
    assert _normalise({"instruction": "p", "input": "", "output": "c"}, "alpaca") == {"messages": user_assistant}
    assert _normalise({"instruction": "p", "input": None, "output": "c"}, "alpaca") == {"messages": user_assistant}
    assert _normalise({"instruction": "Sum:", "input": "1 2", "output": "3"}, "alpaca") == {"messages": [
        {"role": "user", "content": "Sum:\n\n1 2"}, {"role": "assistant", "content": "3"}]}
    sharegpt = {"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "h"}, {"from": "gpt", "value": "g"},
        {"from": "user", "value": "u"}, {"from": "model", "value": "m"}, {"from": "assistant", "value": "a"},
    ]}
    assert [(m["role"], m["content"]) for m in _normalise(sharegpt, "sharegpt")["messages"]] == [
        ("system", "s"), ("user", "h"), ("assistant", "g"), ("user", "u"), ("assistant", "m"), ("assistant", "a")]


def test_messages_content_parts_and_extra_keys():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi", "name": "bot"},
    ]}
    assert _normalise(record, "messages") == {"messages": [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"}]}


def test_alpaca_and_sharegpt_render_like_messages(tiny_tokenizer, tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "Add\n\n1 2"}, {"from": "gpt", "value": "3"}]}])
    a = build_dataset(str(alpaca), tiny_tokenizer, labels="assistant", max_length=128, packing=False)
    s = build_dataset(str(sharegpt), tiny_tokenizer, labels="assistant", max_length=128, packing=False)
    assert a.rows == s.rows
    assert (a.stats.format, s.stats.format) == ("alpaca", "sharegpt")


def test_pretrain_documents(tiny_tokenizer, tmp_path):
    texts = ["short text", "another short one"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    data = build_dataset(str(path), tiny_tokenizer, labels="all", max_length=128, packing=False)
    for text, row in zip(texts, data.rows):
        body = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [tiny_tokenizer.bos_token_id, *body, tiny_tokenizer.eos_token_id]
        assert row.input_ids == ids
        assert row.labels == [-100, *ids[1:]]
        assert row.position_ids == list(range(len(ids)))


def test_pretrain_splits_long_texts_without_losing_tokens(tiny_tokenizer, tmp_path):
    long_text = " ".join(f"token{i}" for i in range(300))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "tail"}, {"text": ""}])
    max_length = 50
    data = build_dataset(str(path), tiny_tokenizer, labels="all", max_length=max_length, packing=False,
                         overflow="drop")
    ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(long_text, add_special_tokens=False)["input_ids"],
           tiny_tokenizer.eos_token_id]
    chunks = data.rows[:-1]
    assert all(len(c.input_ids) == max_length for c in chunks[:-1]) and 2 <= len(chunks[-1].input_ids) <= max_length
    assert all(c.labels[0] == -100 and c.position_ids[0] == 0 for c in chunks)
    # consecutive chunks share one token, so every token but the first is trained exactly once
    trained = [t for c in chunks for t in c.labels if t != -100]
    assert trained == ids[1:]
    stats = data.stats
    assert (stats.num_records, stats.num_split, stats.num_dropped, stats.num_truncated) == (3, 1, 1, 0)
    assert stats.num_documents == len(chunks) + 1
    assert stats.num_trained_tokens == len(ids) - 1 + len(data.rows[-1].input_ids) - 1


def test_pretrain_prefers_text_when_records_also_hold_messages(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain", "messages": MESSAGES}])
    assert build_dataset(str(path), tiny_tokenizer, labels="all", max_length=64, packing=True).stats.format == "text"
    assert build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=64, packing=True).stats.format == "messages"


def test_stats_and_summary(tiny_tokenizer, sft_file):
    data = build_dataset(str(sft_file), tiny_tokenizer, labels="assistant", max_length=256, packing=True)
    stats = data.stats
    assert (stats.num_records, stats.num_documents, stats.format) == (16, 16, "prompt_completion")
    assert stats.num_rows == len(data.rows) < 16
    assert stats.num_tokens == sum(len(r.input_ids) for r in data.rows)
    assert 0 < stats.num_trained_tokens < stats.num_tokens
    line = stats.summary()
    assert "\n" not in line and str(sft_file) in line and "16 prompt_completion records" in line


def test_inspect_with_tokenizer(tiny_tokenizer, tmp_path):
    rows = [{"messages": MESSAGES + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes."}]}]
    rows += [{"messages": MESSAGES}] * 4 + [{"messages": [{"role": "user", "content": "long " * 100},
                                                         {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    report = inspect_data(str(path), tiny_tokenizer, max_length=64)
    assert "format:  messages (detected; trains with method: sft)" in report
    assert "records: 6" in report
    assert "longer than max_length=64: 1 of 6 records" in report
    assert "#" in report  # histogram bars
    assert (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "[[Hello.<|im_end|>]]\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n[[Yes.<|im_end|>]]\n"
    ) in report


def test_inspect_without_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a" * n} for n in (5, 50, 500)])
    report = inspect_data(str(path))
    assert "format:  text (detected; trains with method: pretrain)" in report
    assert "records: 3" in report and "characters per record" in report
    assert "min 5, median 50, max 500" in report
    assert "--model" in report
