"""Shared fixtures: a tiny model folder and small data files, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import build_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Llama-style model with a ChatML tokenizer."""
    return build_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tiny model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's torch work on one thread: a width-64 model gains nothing from threads, and on a
    shared CPU their barriers make small matmuls crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def sft_file(tmp_path: Path) -> Path:
    """A small prompt/completion file with a learnable mapping."""
    rows = [{"prompt": f"Repeat the word {w}", "completion": f"{w} {w} {w}"} for w in
            ["apple", "river", "stone", "cloud", "lamp", "tiger", "paper", "glass", "music", "bread",
             "chair", "ocean", "light", "plant", "honey", "storm"]]
    return write_jsonl(tmp_path / "sft.jsonl", rows)
