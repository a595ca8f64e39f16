"""Config: YAML + overrides, every problem reported at once, stable keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import Config, build_config, load_config, save_config
from tunesmith.errors import TunesmithError


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: sft\nmodel: default\ndata:\n  train: t.jsonl\ntrain:\n  lr: 2e-4\n  batch_size: 4\n")
    cfg = load_config(str(path), ["train.lr=1e-3", "lora=null", "train.packing=false", "data.eval=e.jsonl"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.batch_size == 4
    assert cfg.lora is None
    assert cfg.train.packing is False
    assert cfg.data.eval == "e.jsonl"


def test_yaml_float_strings_are_numbers() -> None:
    # YAML 1.1 reads 2e-4 as a string; a float field must still accept it.
    cfg = build_config({"data": {"train": "x"}, "train": {"lr": "2e-4"}})
    assert cfg.train.lr == pytest.approx(2e-4)


def test_stable_keys_exist() -> None:
    cfg = build_config(
        {
            "method": "pretrain",
            "model": "m",
            "output_dir": "o",
            "data": {"train": "a", "eval": "b"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {
                "max_steps": 3, "epochs": 2, "batch_size": 2, "grad_accum": 2, "lr": 1e-4,
                "max_length": 128, "packing": False, "seed": 1,
            },
        }
    )
    assert cfg.lora is not None and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 3 and cfg.method == "pretrain"


def test_all_problems_reported_together() -> None:
    with pytest.raises(TunesmithError) as info:
        build_config(
            {
                "method": "magic",
                "data": {"train": "x", "bogus": 1},
                "train": {"lr": "fast", "batch_size": 0, "unknown_knob": True},
                "extra": 5,
            }
        )
    message = str(info.value)
    for fragment in ["method", "data.bogus", "train.lr", "train.unknown_knob", "extra", "'sft'"]:
        assert fragment in message, fragment
    assert len(info.value.problems) == 5  # batch_size range is checked only once types are right


def test_range_checks_and_missing_train() -> None:
    with pytest.raises(TunesmithError) as info:
        build_config({"train": {"batch_size": 0, "grad_accum": -1}})
    message = str(info.value)
    assert "train.batch_size" in message and "train.grad_accum" in message and "data.train" in message


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match="key=value"):
        load_config({"data": {"train": "x"}}, ["train.lr"])
    with pytest.raises(TunesmithError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(TunesmithError, match="line"):
        load_config(str(bad))


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config({"data": {"train": "x"}}, ["lora.r=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and isinstance(again, Config)
