"""The dashboard's cache of parsed run files: re-read on change, bounded, and rid of deleted runs' files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.ui import runs


def _count_lines(text: str) -> int:
    return len(text.splitlines())


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "_cache", {})
    monkeypatch.setattr(runs, "CACHE_FILES", 3)


def test_a_file_is_parsed_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("a\n")
    calls = []

    def parse(text: str) -> int:
        calls.append(text)
        return _count_lines(text)

    assert runs._parsed(path, parse, -1) == 1 and runs._parsed(path, parse, -1) == 1 and len(calls) == 1
    path.write_text("a\nb\n")
    assert runs._parsed(path, parse, -1) == 2 and len(calls) == 2


def test_deleted_runs_leave_the_cache_and_it_stays_bounded(tmp_path: Path) -> None:
    files = []
    for k in range(5):
        files.append(tmp_path / f"run{k}" / "metrics.jsonl")
        files[-1].parent.mkdir()
        files[-1].write_text("x\n" * (k + 1))
    for path in files[:3]:
        runs._parsed(path, _count_lines, -1)
    files[0].unlink()
    assert runs._parsed(files[0], _count_lines, -1) == -1  # a file looked up after its run was deleted goes at once
    assert (files[0], _count_lines) not in runs._cache
    files[1].unlink()  # one nobody looks up again goes when the cache is full
    runs._parsed(files[2], _count_lines, -1)  # read recently: kept before older files
    for path in files[3:]:
        runs._parsed(path, _count_lines, -1)
    assert {key[0] for key in runs._cache} == {files[2], files[3], files[4]}
    runs._parsed(files[0].with_name("other.jsonl"), _count_lines, -1)  # missing, never cached
    extra = tmp_path / "run9.jsonl"
    extra.write_text("y\n")
    runs._parsed(extra, _count_lines, -1)
    assert len(runs._cache) == 3 and (files[2], _count_lines) not in runs._cache  # the least recently read went
