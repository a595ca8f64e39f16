"""Readers: every file kind and HF datasets, with values reaching the tokenizer exactly as written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tunesmith.data import build_dataset, load_records
from tunesmith.errors import TunesmithError

# Strings that type-guessing readers turn into numbers, dates, booleans or missing values.
TRICKY = [
    "3.10", "007", "2024-01-02", "1e5", "NaN", "True", "true", "null", "None", "NA", "", "-0", "+1",
    "0x1F", "1,000", "1_000", "Infinity", " padded ", "12345678901234567890123", "2024-01-02T03:04:05Z",
    "00:01", "1/2", "٣", "TRUE", "n/a",
]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_saved_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda p, rows: write_jsonl(p.with_suffix(".jsonl"), rows),
    "json": lambda p, rows: (p.with_suffix(".json").write_text(json.dumps(rows)), p.with_suffix(".json"))[1],
    "csv": lambda p, rows: _write_csv(p.with_suffix(".csv"), rows),
    "parquet": lambda p, rows: _write_parquet(p.with_suffix(".parquet"), rows),
    "hf": lambda p, rows: _write_saved_dataset(p, rows),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_values_reach_the_rendered_text_unchanged(kind, tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"say {v}", "completion": f"{v}|{v}"} for v in TRICKY]
    path = WRITERS[kind](tmp_path / "data", rows)
    records = [r for r, _ in load_records(str(path))]
    assert [r["prompt"] for r in records] == [f"say {v}" for v in TRICKY]
    assert [r["completion"] for r in records] == [f"{v}|{v}" for v in TRICKY]

    data = build_dataset(str(path), tiny_tokenizer, labels="assistant", max_length=512, packing=False)
    for v, row in zip(TRICKY, data.rows):
        text = tiny_tokenizer.decode(row.input_ids)
        assert text == f"<|im_start|>user\nsay {v}<|im_end|>\n<|im_start|>assistant\n{v}|{v}<|im_end|>\n"


@pytest.mark.parametrize("kind", list(WRITERS))
def test_pretrain_text_unchanged(kind, tiny_tokenizer, tmp_path):
    values = [v for v in TRICKY if v]  # empty texts are skipped by pretraining
    path = WRITERS[kind](tmp_path / "data", [{"text": v} for v in values])
    data = build_dataset(str(path), tiny_tokenizer, labels="all", max_length=512, packing=False)
    assert [tiny_tokenizer.decode(r.input_ids) for r in data.rows] == [f"<|im_start|>{v}<|im_end|>" for v in values]


def test_json_numbers_and_literals_keep_their_text(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text(
        '{"prompt": 3.10, "completion": 1e5}\n'
        '{"prompt": NaN, "completion": -0}\n'
        '{"prompt": 12345678901234567890123, "completion": 1E+05}\n'
        '{"prompt": true, "completion": [false, 2.50]}\n',
        encoding="utf-8",
    )
    records = [r for r, _ in load_records(str(path))]
    assert records == [
        {"prompt": "3.10", "completion": "1e5"},
        {"prompt": "NaN", "completion": "-0"},
        {"prompt": "12345678901234567890123", "completion": "1E+05"},
        {"prompt": "true", "completion": ["false", "2.50"]},
    ]


def test_jsonl_locations_count_file_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert [where for _, where in load_records(str(path))] == [f"{path} line 1", f"{path} line 3"]


@pytest.mark.parametrize("key", ["data", "rows", "train"])
def test_json_object_holding_a_list(key, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"meta": {"n": 2}, key: [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    records = load_records(str(path))
    assert [r for r, _ in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1][1] == f"{path} record 2"


def test_csv_quoting_multiline_and_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffprompt,completion\n"a, b","line 1\nline 2"\n"say ""hi""",  spaced  \n'.encode())
    records = load_records(str(path))
    assert [r for r, _ in records] == [
        {"prompt": "a, b", "completion": "line 1\nline 2"},
        {"prompt": 'say "hi"', "completion": "  spaced  "},
    ]
    assert [w for _, w in records] == [f"{path} row 1", f"{path} row 2"]


def test_csv_long_cells(tmp_path):
    long_text = "x" * 300_000  # over the csv module's default 128 KiB cell limit
    path = _write_csv(tmp_path / "d.csv", [{"text": long_text}])
    assert load_records(str(path))[0][0]["text"] == long_text


def test_saved_dataset_dict_split(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": "train row"}]),
        "test": datasets.Dataset.from_list([{"text": "test row"}, {"text": "007"}]),
    }).save_to_disk(str(folder))
    assert [r["text"] for r, _ in load_records(str(folder))] == ["train row"]
    records = load_records(str(folder), split="test")
    assert [r["text"] for r, _ in records] == ["test row", "007"]
    assert records[1][1] == f"{folder} (HF dataset) row 2"
    with pytest.raises(TunesmithError, match="split 'validation' not found; this dataset has test, train"):
        load_records(str(folder), split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "2024-01-02"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/some-data", split="test")
    assert calls == [("someone/some-data", "test")]
    assert records == [({"text": "2024-01-02"}, "someone/some-data (HF dataset) row 1")]


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TunesmithError, match=r"someone/data: not a local file.*ConnectionError: no internet.*internet"):
        load_records("someone/data")


def test_missing_file_with_data_suffix_is_not_a_hub_name(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub lookup for a file name"))
    with pytest.raises(TunesmithError, match="train.jsonl: the data file does not exist"):
        load_records("train.jsonl")
