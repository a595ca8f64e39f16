"""Evaluation rows from every data shape: prompt conversation, reference (or None), other fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.data.examples import load_eval_examples
from tunesmith.errors import TunesmithError

SYSTEM = {"role": "system", "content": "Be brief."}


def _one(tmp_path: Path, row: dict) -> tuple:
    (ex,) = load_eval_examples(str(write_jsonl(tmp_path / "rows.jsonl", [row])))
    return ex


def test_prompt_and_answer(tmp_path: Path) -> None:
    ex = _one(tmp_path, {"prompt": "2+2?", "answer": "4", "id": "a1", "level": "3.10"})
    assert ex.messages == [{"role": "user", "content": "2+2?"}]
    assert (ex.reference, ex.prompt, ex.index) == ("4", "2+2?", 0)
    assert ex.fields == {"id": "a1", "level": "3.10"}  # kept as written, for user metrics
    assert ex.location.endswith("rows.jsonl line 1")


def test_prompt_and_completion(tmp_path: Path) -> None:
    ex = _one(tmp_path, {"prompt": "Say hi", "completion": " hi"})
    assert (ex.messages, ex.reference, ex.fields) == ([{"role": "user", "content": "Say hi"}], " hi", {})


def test_messages_last_assistant_turn_is_the_reference(tmp_path: Path) -> None:
    turns = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    ex = _one(tmp_path, {"messages": turns, "topic": "geo"})
    assert ex.messages == turns[:-1]
    assert (ex.reference, ex.prompt, ex.fields) == ("Paris", "Capital of France?", {"topic": "geo"})


def test_messages_with_text_parts(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": "c"}]
    ex = _one(tmp_path, {"messages": turns})
    assert (ex.messages, ex.reference) == ([{"role": "user", "content": "ab"}], "c")


def test_alpaca(tmp_path: Path) -> None:
    ex = _one(tmp_path, {"instruction": "Translate", "input": "chat", "output": "cat", "src": "fr"})
    assert ex.messages == [{"role": "user", "content": "Translate\n\nchat"}]
    assert (ex.reference, ex.prompt, ex.fields) == ("cat", "Translate\n\nchat", {"src": "fr"})


def test_sharegpt(tmp_path: Path) -> None:
    ex = _one(tmp_path, {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello"}]})
    assert ex.messages == [SYSTEM, {"role": "user", "content": "Hi"}]
    assert (ex.reference, ex.prompt) == ("Hello", "Hi")


def test_prompt_only_rows_have_no_reference(tmp_path: Path) -> None:
    rows = [{"prompt": "Write a haiku", "tag": "x"}, {"prompt": "Q", "answer": "A"},
            {"messages": [SYSTEM, {"role": "user", "content": "Hi"}]},
            {"conversations": [{"from": "human", "value": "Hey"}]}]
    first, second = load_eval_examples(str(write_jsonl(tmp_path / "a.jsonl", rows[:2])))
    assert (first.messages, first.reference, first.fields) == ([{"role": "user", "content": "Write a haiku"}], None, {"tag": "x"})
    assert second.reference == "A"  # prompt-only and prompt/answer rows may share a file
    (chat,) = load_eval_examples(str(write_jsonl(tmp_path / "b.jsonl", rows[2:3])))
    assert (chat.messages, chat.reference, chat.prompt) == ([SYSTEM, {"role": "user", "content": "Hi"}], None, "Hi")
    (share,) = load_eval_examples(str(write_jsonl(tmp_path / "c.jsonl", rows[3:])))
    assert (share.messages, share.reference) == ([{"role": "user", "content": "Hey"}], None)


def test_csv_values_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("prompt,answer,date\nWhen?,2024-01-02,1e3\n", encoding="utf-8")
    (ex,) = load_eval_examples(str(path))
    assert (ex.reference, ex.fields, ex.location) == ("2024-01-02", {"date": "1e3"}, f"{path} row 1")


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "just text"}], "plain text (field 'text') has no prompt"),
    ([{"question": "x"}], "hold no prompt"),
    ([{"prompt": "a", "answer": "b"}, {"messages": [{"role": "user", "content": "c"}]}], "mixes data formats"),
    ([{"messages": [SYSTEM]}], "ends with system, not a user turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}]}], "ends with assistant, not a user turn"),
    ([{"messages": [{"role": "robot", "content": "a"}]}], "messages[0].role is 'robot'"),
    ([{"prompt": ["a", "b"]}], "field 'prompt' must be a string"),
])
def test_bad_rows_are_clear(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(TunesmithError) as err:
        load_eval_examples(str(path))
    assert message in str(err.value)
