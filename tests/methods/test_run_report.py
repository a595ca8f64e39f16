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


def _text(tmp_path: Path, name: str, words: list[str]) -> Path:
    return write_jsonl(tmp_path / name, [{"text": " ".join(words[k : k + 8])} for k in range(0, len(words) - 8, 4)])


@pytest.mark.parametrize("where", ["eval", "test"])
def test_pretrain_run_is_judged_on_held_out_text(tmp_path: Path, tiny_model_dir: Path, where: str) -> None:
    """A pretrain run's report holds the base's and the tuned model's perplexity on its held-out text, per document;
    training on the same kind of text lowers it."""
    from tests.helpers import WORDS

    train = _text(tmp_path, "train.jsonl", WORDS * 4)
    held_out = _text(tmp_path, "held_out.jsonl", WORDS[3:] + WORDS[:3])
    with held_out.open("a") as f:  # one document longer than train.max_length: scored in blocks, as eval does
        f.write(json.dumps({"text": " ".join(WORDS * 2)}) + "\n")
    cfg = run_config(tiny_model_dir, train, tmp_path / "run", max_steps=12, lr=2e-2, max_length=32)
    cfg["method"] = "pretrain"
    cfg["data"][where] = str(held_out)
    result = tunesmith.train(cfg)

    saved = json.loads((tmp_path / "run/report/results.json").read_text())
    base, tuned = saved["results"]
    assert base["rows"] == [] and len(base["text_losses"]) == len(tuned["text_losses"]) == 7
    assert tuned["text_perplexity"] < base["text_perplexity"] and tuned["text_data"] == str(held_out)
    text = saved["comparison"]["measures"]["text_perplexity"]["models"]["tuned"]
    assert text["verdict"] == "better" and text["delta_ci"][1] < 0
    assert list(saved["comparison"]["measures"]) == ["text_perplexity"]
    assert saved["comparison"]["headline"][0].startswith("tuned vs base: Perplexity of the held-out text ")
    html = Path(result.outputs["report"]).read_text()
    assert "on the perplexity of 7 held-out documents of <code>" in html and 'id="examples"' not in html
    if where == "eval":  # the report's number is the eval loss the run logged on the same file
        logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
        eval_ppl = [x["eval_ppl"] for x in logged if "eval_ppl" in x][-1]
        assert tuned["text_perplexity"] == pytest.approx(eval_ppl, rel=1e-4)
