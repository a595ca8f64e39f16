"""A value that is not text where text belongs (a number, true/false, an object, null) is an error naming the file,
the line and the field, in every data format; it is never turned into text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data import build_dataset
from tunesmith.data.examples import load_eval_examples
from tunesmith.data.preference import build_pairs
from tunesmith.errors import TunesmithError

BAD = {"number": (42, "got number 42; if it is meant as text, write it in quotes: \"42\""),
       "boolean": (True, "got boolean true; if it is meant as text, write it in quotes: \"true\""),
       "object": ({"text": "hi"}, "got dict {'text': 'hi'}"),
       "null": (None, "got null")}


def _chat(content: object) -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "fine"}]


# format -> (a good record, a record with the bad value in it, the field the error names)
FORMATS = {
    "messages": (lambda v: {"messages": _chat(v)}, "messages[0].content"),
    "messages text part": (lambda v: {"messages": _chat([{"type": "text", "text": v}])}, "messages[0].content[0]"),
    "prompt_completion": (lambda v: {"prompt": "Say hi", "completion": v}, "field 'completion'"),
    "prompt_answer": (lambda v: {"prompt": v, "answer": "hi"}, "field 'prompt'"),
    "alpaca": (lambda v: {"instruction": "Say hi", "input": v, "output": "hi"}, "field 'input'"),
    "sharegpt": (lambda v: {"conversations": [{"from": "human", "value": v}, {"from": "gpt", "value": "hi"}]},
                 "conversations[0].value"),
    "text": (lambda v: {"text": v}, "field 'text'"),
}
GOOD = {"messages": {"messages": _chat("hello")}, "text": {"text": "hello"},
        "alpaca": {"instruction": "Say hi", "output": "hi"},
        "sharegpt": {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}}


def _write(tmp_path: Path, good: dict, bad: dict) -> Path:
    # through json.dumps, as a user's script writes it: the number is a JSON number, not a string
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(TunesmithError) as caught:
        fn(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_formats(tmp_path: Path, tiny_tokenizer, fmt: str, value: str) -> None:
    build, field = FORMATS[fmt]
    raw, shown = BAD[value]
    if fmt == "messages text part" and value in ("object", "null"):
        shown = "is dict {'type': 'text', 'text'"  # not a text part at all
    path = _write(tmp_path, GOOD.get(fmt.split()[0], {"prompt": "Say hi", "completion": "hi"}), build(raw))
    labels = "all" if fmt == "text" else "assistant"
    if fmt == "alpaca" and value == "null":  # the optional input, given as null: there is none
        assert len(build_dataset(str(path), tiny_tokenizer, labels=labels, max_length=64, packing=False).rows) == 2
        return
    msg = _error(build_dataset, str(path), tiny_tokenizer, labels=labels, max_length=64, packing=False)
    where = f"{path} line 2: {field}"
    assert f"{where}{'.text' if fmt == 'messages text part' and value in ('number', 'boolean') else ''}" in msg
    assert shown in msg, msg


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize(("record", "field"), [
    (lambda v: {"prompt": v, "chosen": "a", "rejected": "b"}, "field 'prompt'"),
    (lambda v: {"prompt": "p", "chosen": v, "rejected": "b"}, "field 'chosen'"),
    (lambda v: {"chosen": _chat(v), "rejected": _chat(v)[:1] + [{"role": "assistant", "content": "no"}]},
     "chosen[0].content"),
], ids=["prompt", "chosen", "message"])
def test_preference_pairs(tmp_path: Path, tiny_tokenizer, record, field: str, value: str) -> None:
    raw, shown = BAD[value]
    path = _write(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"}, record(raw))
    msg = _error(build_pairs, str(path), tiny_tokenizer, max_length=64, packing=False)
    assert f"{path} line 2: {field}" in msg and "must be a string" in msg
    if value in ("number", "boolean"):
        assert shown in msg, msg


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize(("record", "field"), [
    (lambda v: {"prompt": v}, "field 'prompt'"),
    (lambda v: {"prompt": "2+2?", "answer": v}, "field 'answer'"),
    (lambda v: {"messages": [{"role": "user", "content": v}]}, "messages[0].content"),
], ids=["prompt only", "answer", "open conversation"])
def test_evaluation_rows(tmp_path: Path, record, field: str, value: str) -> None:
    raw, shown = BAD[value]
    good = {"messages": _chat("hello")[:1]} if "messages" in record("x") else {"prompt": "hello"}
    path = _write(tmp_path, good, record(raw))
    msg = _error(load_eval_examples, str(path))
    assert f"{path} line 2: {field} must be a string" in msg and shown in msg, msg
