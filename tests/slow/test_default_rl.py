"""The slow tier for RL: a short GRPO run on the real default model with the demo task's exact-match reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from tunesmith.demo import make_task


@pytest.mark.slow
def test_grpo_on_default_model(tmp_path: Path) -> None:
    train, _ = make_task(8, 2, seed=3)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    result = tunesmith.train({
        "method": "grpo",
        "model": "default",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # exact match and the format check are level for most groups this early; the dense share-of-e reward is not
        "rl": {"rewards": ["exact_match", "regex:^\\{.*\\}$", "tests.methods.test_rl_methods:share_of_e"],
               "group_size": 2, "max_new_tokens": 24, "samples_every": 1},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "max_length": 192},
    })
    steps = [h for h in result.loop.history if "reward" in h]
    assert len(steps) == 2 and steps[0]["kl"] == 0.0
    assert {"reward/exact_match", "reward/regex:^\\{.*\\}$", "entropy", "completion_length"} <= set(steps[0])
    samples = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2 and all("completion" in s for s in samples)
    assert set(result.outputs) >= {"adapter", "merged"}
