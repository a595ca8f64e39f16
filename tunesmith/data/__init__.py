"""Data: read files and datasets, detect the format, render chats with loss masks, pack rows."""

from __future__ import annotations

from tunesmith.data.chat import render_and_mask
from tunesmith.data.dataset import DataStats, TokenizedData, build_dataset
from tunesmith.data.formats import detect_format
from tunesmith.data.inspect import inspect_data
from tunesmith.data.packing import Row, collate
from tunesmith.data.readers import load_records

__all__ = [
    "DataStats",
    "Row",
    "TokenizedData",
    "build_dataset",
    "collate",
    "detect_format",
    "inspect_data",
    "load_records",
    "render_and_mask",
]
