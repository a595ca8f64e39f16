"""Small builders shared by the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.tiny import corpus_lines

WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "paper", "glass", "music", "bread",
         "chair", "ocean", "light", "plant", "honey", "storm", "maple", "ember", "frost", "delta",
         "cedar", "pearl", "quartz", "amber", "raven", "sable", "tulip", "willow", "zephyr", "lotus",
         "orbit", "prism"]


def chat_rows(n: int = 32) -> list[dict]:
    """Prompt/completion rows of varied length with a mapping a tiny model can learn."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"Say {w} {1 + i % 4} times", "completion": " ".join([w] * (1 + i % 4))})
    return rows


def text_rows(n: int = 40) -> list[dict]:
    """Plain-text rows for continued pretraining."""
    lines = corpus_lines(n * 3)
    return [{"text": " ".join(lines[3 * i : 3 * i + 3])} for i in range(n)]


def run_config(model_dir: Path, train_file: Path, out: Path, **train: Any) -> dict[str, Any]:
    """A small, fast config for the tiny model; `train` entries override the train section."""
    return {
        "method": "sft",
        "model": str(model_dir),
        "output_dir": str(out),
        "data": {"train": str(train_file)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "max_length": 128,
                  "warmup_ratio": 0.0, "eval_every": 0, "save_every": 0, "seed": 3, **train},
    }


def write_chat(tmp: Path, n: int = 32) -> Path:
    """A chat data file in prompt/completion form."""
    return write_jsonl(tmp / "train.jsonl", chat_rows(n))


def final_weights(run_dir: Path) -> dict:
    """The trained weights a run saved (adapter or full model)."""
    for rel in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        if (run_dir / rel).exists():
            return load_file(str(run_dir / rel))
    raise AssertionError(f"no saved weights in {run_dir}")
