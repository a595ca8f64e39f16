"""The loop's learning-rate schedule and optimizer parameter groups, against values worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.config import LoraConfig, TrainConfig
from tunesmith.core.loop import build_optimizer, warmup_cosine
from tunesmith.model import apply_lora


def test_warmup_then_cosine_to_min_lr_ratio() -> None:
    # 100 steps, 10 of warm-up, decaying to 0.2 of the peak
    f = warmup_cosine(100, warmup_ratio=0.1, min_lr_ratio=0.2)
    assert f(0) == pytest.approx(1 / 11)  # warm-up rises linearly: (step + 1) / (warmup + 1)
    assert f(4) == pytest.approx(5 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)  # end of warm-up: the peak
    assert f(55) == pytest.approx(0.6)  # half-way through the decay: 0.2 + 0.8 * (1 + cos(pi / 2)) / 2
    assert f(100) == pytest.approx(0.2)  # the end: lr * min_lr_ratio
    assert f(130) == pytest.approx(0.2)  # and never below
    values = [f(s) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after the peak


def test_schedule_without_warmup_or_floor() -> None:
    f = warmup_cosine(10, warmup_ratio=0.0, min_lr_ratio=0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)


def _groups(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Weight decay of every parameter the optimizer holds, by name."""
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["lr"] == cfg.lr for g in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    held = [(names[id(p)], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len(dict(held))  # no parameter twice
    return dict(held)


def test_no_decay_on_biases_and_norms_frozen_left_out() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].requires_grad_(False)
    assert _groups(model, TrainConfig(weight_decay=0.1, lr=1e-3)) == {
        "0.weight": 0.1, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0}


def test_tiny_model_groups(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.get_input_embeddings().requires_grad_(False)  # frozen (and tied to the LM head)
    decay = _groups(model, TrainConfig(weight_decay=0.05))
    names = [n for n, _ in model.named_parameters()]
    assert not any("embed_tokens" in n for n in decay)
    assert {n for n, wd in decay.items() if wd == 0.05} == {n for n in names if n.endswith("_proj.weight")}
    assert {n for n, wd in decay.items() if wd == 0.0} == {n for n in names if n.endswith("norm.weight")}

    lora = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2))
    decay = _groups(lora, TrainConfig(weight_decay=0.05))
    assert decay and all("lora_" in n and wd == 0.05 for n, wd in decay.items())  # the frozen base is left out
