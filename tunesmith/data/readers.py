"""Read records from JSONL, JSON, CSV and Parquet files and HF datasets, every text value exactly as written.

Each record comes with its location ("train.jsonl line 17", "data.csv row 4") so that later
errors can point at it. Numbering is 1-based everywhere: JSONL gives the file's line, CSV,
Parquet, JSON lists and HF datasets give the record's position (CSV rows exclude the header).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

log = logging.getLogger(__name__)

Record = tuple[dict, str]  # (record, location)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_SUPPORTED_TEXT = ".jsonl, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"
# Suffixes that mark a source as a file name rather than a hub dataset name.
_FILE_LIKE_SUFFIXES = {*SUPPORTED_SUFFIXES, ".txt", ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".zip", ".ndjson", ".yaml", ".yml"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_JSON_LIST_KEYS = ("data", "rows", "train")


def load_records(source: str, split: str = "train") -> list[Record]:
    """Read every record of a data file, saved HF dataset folder or hub dataset, with its location."""
    path = Path(source).expanduser()
    if path.is_dir():
        records = _read_saved_dataset(path, source, split)
    elif path.is_file():
        suffix = path.suffix.lower()
        reader = _READERS.get(suffix)
        if reader is None:
            raise TunesmithError(
                f"{source}: unsupported file type {suffix or '(no extension)'!r}; supported: {_SUPPORTED_TEXT}"
            )
        records = reader(path, source)
    elif _looks_like_hub_name(source):
        records = _read_hub_dataset(source, split)
    else:
        raise TunesmithError(
            f"{source}: the data file does not exist; check the path (relative paths are read from "
            f"{Path.cwd()}); supported: {_SUPPORTED_TEXT}, or an HF hub dataset name"
        )
    if not records:
        raise TunesmithError(f"{source}: the dataset is empty (no records); give a file with at least one record")
    return records


# ---------------------------------------------------------------- JSON and JSON lines


class JsonLiteral(str):
    """A JSON number, `true`, `false` or `NaN`, kept as the text written in the file (`3.10` stays "3.10").

    It is a `str`, so fields that take numbers or any value (a margin, a user metric's extra field) read it as
    written. The text fields of the data formats refuse it (`is_text`): a number where a message belongs is a
    mistake in the file, reported with its line, not text to guess at.
    """

    __slots__ = ()

    def kind(self) -> str:
        """'boolean' or 'number', for messages."""
        return "boolean" if self in ("true", "false") else "number"


def is_text(value: object) -> bool:
    """True for a string the file wrote as a string (not a number or true/false kept as text)."""
    return isinstance(value, str) and not isinstance(value, JsonLiteral)


def _bools_as_text(value: Any) -> Any:
    if value is True:
        return JsonLiteral("true")
    if value is False:
        return JsonLiteral("false")
    if isinstance(value, list):
        return [_bools_as_text(v) for v in value]
    return value


def _keep_literals(obj: dict) -> dict:
    # JSON `true`/`false` reach us as bools; write them back as the text the user typed.
    return {k: _bools_as_text(v) for k, v in obj.items()}


# Numbers keep their literal text ("3.10" stays "3.10", not 3.1), and NaN stays "NaN", as JsonLiteral: a value
# that is read as text reaches the tokenizer exactly as written, and text fields can tell it was not a string.
_DECODER = json.JSONDecoder(parse_int=JsonLiteral, parse_float=JsonLiteral, parse_constant=JsonLiteral,
                            object_hook=_keep_literals)


def _decode_json(text: str) -> Any:
    return _DECODER.decode(text)


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None


def _read_jsonl(path: Path, source: str) -> list[Record]:
    records: list[Record] = []
    for line_no, line in enumerate(_read_text(path, source).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = _decode_json(line)
        except json.JSONDecodeError as exc:
            raise TunesmithError(
                f"{source} line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        where = f"{source} line {line_no}"
        if not isinstance(obj, dict):
            raise TunesmithError(f"{where}: expected a JSON object {{...}}, got {_json_kind(obj)}; each line must be one record object")
        records.append((obj, where))
    return records


def _read_json(path: Path, source: str) -> list[Record]:
    try:
        data = _decode_json(_read_text(path, source))
    except json.JSONDecodeError as exc:
        hint = " (it looks like one object per line: name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise TunesmithError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
    if isinstance(data, dict):
        key = next((k for k in _JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise TunesmithError(
                f"{source}: expected a list of record objects, or an object holding one under 'data', 'rows' "
                f"or 'train'; got an object with keys {_field_list(data)}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise TunesmithError(f"{source}: expected a list of record objects, got {_json_kind(data)}")
    records: list[Record] = []
    for i, obj in enumerate(data, 1):
        where = f"{source} record {i}"
        if not isinstance(obj, dict):
            raise TunesmithError(f"{where}: expected a JSON object {{...}}, got {_json_kind(obj)}; every record must be an object")
        records.append((obj, where))
    return records


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the value {value!r}"
    return type(value).__name__


# ---------------------------------------------------------------- CSV and Parquet


def _read_csv(path: Path, source: str) -> list[Record]:
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB per cell) rejects long documents
    records: list[Record] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)  # every cell stays a string: no type inference
            header = reader.fieldnames
            if header is None:
                return []
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise TunesmithError(f"{source} header: duplicate column names {dupes}; give each column a unique name")
            for row_no, row in enumerate(reader, 1):
                where = f"{source} row {row_no}"
                if None in row:
                    raise TunesmithError(
                        f"{where} (line {reader.line_num}): more cells than the {len(header)} header columns; "
                        "quote cells that contain commas"
                    )
                if any(v is None for v in row.values()):
                    raise TunesmithError(
                        f"{where} (line {reader.line_num}): fewer cells than the {len(header)} header columns "
                        f"({', '.join(header)})"
                    )
                records.append((row, where))
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    except csv.Error as exc:
        raise TunesmithError(f"{source}: not valid CSV ({exc})") from None
    return records


def _read_parquet(path: Path, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise TunesmithError(f"{source}: not a readable Parquet file ({exc})") from None
    return [(row, f"{source} row {i}") for i, row in enumerate(rows, 1)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


# ---------------------------------------------------------------- HF datasets


def _read_saved_dataset(path: Path, source: str, split: str) -> list[Record]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise TunesmithError(
            f"{source}: this folder is not a dataset written by datasets' save_to_disk (it has no "
            f"dataset_dict.json or state.json); give a data file ({_SUPPORTED_TEXT})"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for damaged folders
        raise TunesmithError(f"{source}: could not read the saved HF dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise TunesmithError(
                f"{source}: split {split!r} not found; this dataset has {', '.join(sorted(loaded))}; set data.split"
            )
        loaded = loaded[split]
    elif split != "train":
        log.warning("%s: data.split=%r ignored; this saved dataset has a single split", source, split)
    return _hf_records(loaded, source)


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and Path(source).suffix.lower() not in _FILE_LIKE_SUFFIXES


def _read_hub_dataset(name: str, split: str) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, unknown name, unknown split: all user-fixable
        raise TunesmithError(
            f"{name}: not a local file or folder, and loading it as an HF hub dataset (split {split!r}) failed: "
            f"{type(exc).__name__}: {exc}. Check the path, or the dataset name and split; hub datasets need "
            "internet access (or save a copy with save_to_disk and give its folder)"
        ) from None
    return _hf_records(loaded, name)


def _hf_records(dataset: Any, source: str) -> list[Record]:
    return [(row, f"{source} (HF dataset) row {i}") for i, row in enumerate(dataset.to_list(), 1)]


def _field_list(record: dict) -> str:
    return "{" + ", ".join(str(k) for k in record) + "}"
