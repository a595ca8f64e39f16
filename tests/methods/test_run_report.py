"""The base-vs-tuned evaluation built into `train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import chat_rows, run_config, write_chat
from tunesmith.errors import TunesmithError


def _cfg(tmp_path: Path, model: Path, **eval_section) -> dict:
    data = write_chat(tmp_path, 8)
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(4))
    cfg = run_config(model, data, tmp_path / "run", max_steps=2)
    cfg["data"]["test"] = str(test)
    cfg["eval"] = {"max_new_tokens": 4, **eval_section}
    return cfg


def test_data_test_gives_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = tunesmith.train(_cfg(tmp_path, tiny_model_dir, metrics=["exact_match", "json_equal"]))
    html = Path(result.outputs["report"]).read_text()
    assert "base" in html and "tuned" in html and "data:image/png;base64," in html
    saved = json.loads((tmp_path / "run/report/results.json").read_text())
    assert set(saved["results"][0]["metrics"]) >= {"exact_match", "json_equal"}


def test_eval_before_false_skips_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = tunesmith.train(_cfg(tmp_path, tiny_model_dir, before=False))
    assert "report" not in result.outputs
    assert not (tmp_path / "run/report").exists()


def test_test_data_without_references_is_refused_before_writing(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    write_jsonl(Path(cfg["data"]["test"]), [{"prompt": "no answer here"}])
    with pytest.raises(TunesmithError, match="reference"):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_metric_is_refused_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(TunesmithError, match="no_such_metric"):
        tunesmith.train(_cfg(tmp_path, tiny_model_dir, metrics=["no_such_metric"]))
    assert not (tmp_path / "run").exists()


def test_resume_reuses_the_base_evaluation(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg["train"].update(max_steps=4, save_every=2)
    tunesmith.train(cfg)
    base_file = tmp_path / "run/report/base.json"
    stamp = base_file.stat().st_mtime_ns
    (tmp_path / "run/summary.json").unlink()  # as if killed after the step-2 checkpoint
    result = tunesmith.train(cfg)
    assert result.loop.resumed_from == 2
    assert base_file.stat().st_mtime_ns == stamp
