"""Bad data gives one TunesmithError that names the file, line or field, what was expected and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.data import build_dataset, detect_format, load_records
from tunesmith.errors import TunesmithError


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(TunesmithError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _build(path: Path, tok, labels: str = "assistant", **kwargs) -> str:
    return _error(build_dataset, str(path), tok, labels=labels, max_length=kwargs.pop("max_length", 256),
                  packing=True, **kwargs)


# ---------------------------------------------------------------- reading


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    msg = _error(load_records, str(path))
    assert str(path) in msg and "does not exist" in msg


def test_bad_json_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken}\n', encoding="utf-8")
    msg = _error(load_records, str(path))
    assert msg.startswith(f"{path} line 3: not valid JSON (")
    assert "one JSON object" in msg


def test_bad_json_file_reports_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    assert _error(load_records, str(path)).startswith(f"{path} line 3: not valid JSON")


def test_jsonl_named_json_gets_a_hint(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert "name the file .jsonl" in _error(load_records, str(path))


def test_record_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n["a", "b"]\n', encoding="utf-8")
    msg = _error(load_records, str(path))
    assert msg.startswith(f"{path} line 2: expected a JSON object")
    json_path = tmp_path / "d.json"
    json_path.write_text('[{"text": "a"}, "b"]', encoding="utf-8")
    assert _error(load_records, str(json_path)).startswith(f"{json_path} record 2: expected a JSON object")


def test_json_object_without_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"items": [{"text": "a"}]}', encoding="utf-8")
    msg = _error(load_records, str(path))
    assert "'data', 'rows' or 'train'" in msg and "{items}" in msg


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text\n"), ("f.csv", "")])
def test_empty_dataset(name, content, tmp_path):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    msg = _error(load_records, str(path))
    assert str(path) in msg and "empty" in msg


def test_unsupported_extension_lists_supported(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello", encoding="utf-8")
    msg = _error(load_records, str(path))
    assert str(path) in msg and "'.txt'" in msg
    for suffix in (".jsonl", ".json", ".csv", ".parquet", "save_to_disk"):
        assert suffix in msg


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    msg = _error(load_records, str(tmp_path))
    assert "not a dataset written by datasets' save_to_disk" in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "not UTF-8" in _error(load_records, str(path))


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    msg = _error(load_records, str(path))
    assert msg.startswith(f"{path} row 2 (line 3): more cells than the 2 header columns")


def test_parquet_number_column_is_refused_not_guessed(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [3.1, 2.0]}), path)
    msg = _build(path, tiny_tokenizer)
    assert f"{path} row 1: field 'completion' must be a string, got float 3.1; store it as text" in msg


# ---------------------------------------------------------------- formats


def test_record_fitting_no_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"question": "q", "reply": "r"}])
    msg = _error(detect_format, load_records(str(path)), str(path))
    assert msg.startswith(f"{path} line 2: fields {{question, reply}} fit no data format; expected one of: ")
    assert "prompt_completion: {prompt, completion}" in msg and "sharegpt: {conversations}" in msg


def test_mixed_formats(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "response": "r"}, {"text": "t"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = _error(detect_format, load_records(str(path)), str(path))
    assert msg.startswith(
        f"{path} mixes data formats: {path} line 1 has fields {{prompt, completion}} (prompt_completion) "
        f"but {path} line 3 has fields {{text}} (text)"
    )


def test_missing_and_non_string_fields_all_reported(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p"},
        {"prompt": "p", "completion": None},
        {"prompt": ["p"], "completion": "c"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = _build(path, tiny_tokenizer, format="prompt_completion")
    assert msg.startswith(f"3 records do not fit the prompt_completion format in {path}")
    assert f"{path} line 2: field 'completion' is missing (fields seen: {{prompt}}" in msg
    assert f"{path} line 3: field 'completion' must be a string, got null" in msg
    assert f"{path} line 4: field 'prompt' must be a string, got list ['p']" in msg


def test_many_problems_are_capped(tiny_tokenizer, tmp_path):
    rows = [{"prompt": [i], "completion": "c"} for i in range(25)] + [{"prompt": "p", "completion": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = _build(path, tiny_tokenizer)
    assert msg.startswith("26 records do not fit")
    assert "... and 16 more" in msg


def test_conversation_without_assistant(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert f"{path} line 1: the conversation in 'messages' has no assistant turn" in _build(path, tiny_tokenizer)


def test_conversation_starting_with_assistant(tiny_tokenizer, tmp_path):
    conv = [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conv}])
    assert f"{path} line 1: conversations[0] is an assistant turn; a conversation must start with a user" in _build(
        path, tiny_tokenizer)


def test_empty_assistant_content(tiny_tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    assert f"{path} line 1: messages[1] (assistant) has empty content" in _build(path, tiny_tokenizer)
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "answer": ""}])
    assert f"{pc} line 1: field 'answer' is empty" in _build(pc, tiny_tokenizer)


def test_bad_roles(tiny_tokenizer, tmp_path):
    msgs = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    assert "messages[0].role is 'human'; expected one of system, user, assistant" in _build(path, tiny_tokenizer)
    conv = [{"from": "bot", "value": "hi"}]
    sg = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    assert f"{sg} line 1: conversations[0].from is 'bot'; expected one of human" in _build(sg, tiny_tokenizer)


def test_image_parts_are_refused(tiny_tokenizer, tmp_path):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    assert "messages[0].content[0] is" in _build(path, tiny_tokenizer)


def test_method_and_format_must_agree(tiny_tokenizer, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    msg = _build(pc, tiny_tokenizer, labels="all")
    assert str(pc) in msg and "prompt_completion data" in msg and "use method: sft" in msg
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "t"}])
    msg = _build(text, tiny_tokenizer, labels="assistant")
    assert str(text) in msg and "plain text data" in msg and "use method: pretrain" in msg


def test_every_sample_dropped(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p " * 50, "completion": "c " * 50}] * 3)
    msg = _build(path, tiny_tokenizer, max_length=16, overflow="drop")
    assert re.search(rf"{re.escape(str(path))}: all 3 samples are longer than train.max_length=16 "
                     r"\(the longest has \d+ tokens\)", msg)
    assert "raise train.max_length or set data.overflow=truncate" in msg


def test_bad_arguments(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t"}])
    assert "data.overflow" in _build(path, tiny_tokenizer, labels="all", overflow="cut")
    assert "data.format" in _build(path, tiny_tokenizer, labels="all", format="chatml")
    assert "train.max_length" in _build(path, tiny_tokenizer, labels="all", max_length=1)
    assert "method" in _build(path, tiny_tokenizer, labels="pairs")
