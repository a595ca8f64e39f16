"""The slow tier: a short SFT + LoRA run on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.config import LoadConfig
from tunesmith.demo import make_task
from tunesmith.model import resolve_model


@pytest.mark.slow
def test_sft_lora_on_default_model(tmp_path: Path) -> None:
    train, _ = make_task(24, 4, seed=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    result = tunesmith.train(
        {
            "model": "default",
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(data)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 6, "batch_size": 2, "lr": 2e-3, "max_length": 128, "warmup_ratio": 0.0,
                      "save_every": 3},
        }
    )
    losses = [h["loss"] for h in result.loop.history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    # the adapter loads onto the base with peft and gives the merged model's logits
    base_dir = resolve_model("default", LoadConfig()).path
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with_adapter = PeftModel.from_pretrained(base, result.outputs["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.outputs["merged"]).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 2]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    assert merged.generation_config is not None
