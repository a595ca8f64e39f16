"""Every bad input exits with code 2, one clear message, no traceback, nothing in output_dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import run_config
from tunesmith.cli import main


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _pickle_only_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


CASES = {
    "missing_file": (lambda d: d / "nope.jsonl", {}, ["nope.jsonl"]),
    "bad_json_line": (lambda d: _write(d / "t.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n'),
                      {}, ["t.jsonl", "line 2"]),
    "missing_field": (lambda d: _jsonl(d / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]),
                      {}, ["t.jsonl", "line 2"]),
    "ill_typed_field": (lambda d: _jsonl(d / "t.jsonl", [{"prompt": "a", "completion": ["b"]}]),
                        {}, ["completion", "line 1"]),
    "empty_dataset": (lambda d: _write(d / "t.jsonl", ""), {}, ["t.jsonl", "empty"]),
    "unknown_format": (lambda d: _jsonl(d / "t.jsonl", [{"foo": "a", "bar": "b"}]), {}, ["foo"]),
    "mixed_formats": (lambda d: _jsonl(d / "t.jsonl", [{"prompt": "a", "completion": "b"},
                                                      {"messages": [{"role": "user", "content": "x"},
                                                                    {"role": "assistant", "content": "y"}]}]),
                      {}, ["t.jsonl"]),
    "no_assistant_turn": (lambda d: _jsonl(d / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
                          {}, ["assistant", "line 1"]),
    "all_over_max_length": (lambda d: _jsonl(d / "t.jsonl", [{"prompt": "a " * 200, "completion": "b " * 200}] * 3),
                            {"data": {"overflow": "drop"}, "train": {"max_length": 32}}, ["max_length"]),
    "text_for_sft": (lambda d: _jsonl(d / "t.jsonl", [{"text": "hello"}]), {}, ["pretrain"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data(case: str, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    make, extra, fragments = CASES[case]
    data = make(tmp_path)
    cfg = run_config(tiny_model_dir, data, tmp_path / "out")
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    cfg_path = _write(tmp_path / "c.yaml", yaml.safe_dump(cfg))
    rc = main(["train", str(cfg_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()


def test_bad_model_and_config(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data = _jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    cases = {
        "unknown_model": (run_config(tmp_path / "no-such-model", data, tmp_path / "out"), ["no-such-model"]),
        "pickle_only": (run_config(_pickle_only_model(tiny_model_dir, tmp_path / "pkl"), data, tmp_path / "out"),
                        ["allow_pickle"]),
    }
    bad_cfg = run_config(tiny_model_dir, data, tmp_path / "out")
    bad_cfg["train"]["bogus"] = 1
    bad_cfg["train"]["lr"] = "fast"
    cases["config"] = (bad_cfg, ["train.bogus", "train.lr"])
    for name, (cfg, fragments) in cases.items():
        cfg_path = _write(tmp_path / f"{name}.yaml", yaml.safe_dump(cfg))
        rc = main(["train", str(cfg_path)])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in err, (name, fragment, err)
        assert not (tmp_path / "out").exists(), name


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
