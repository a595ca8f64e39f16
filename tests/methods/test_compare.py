"""`tunesmith compare` end to end: a random tiny model against a copy trained to answer the rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import WORDS, run_config
from tunesmith.cli import main

NUM_ROWS = 8


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(data file, run folder): full fine-tuning until the tiny model says the word it is asked for."""
    tmp = tmp_path_factory.mktemp("compare")
    rows = [{"prompt": f"Say {w} once", "completion": w} for w in WORDS[:NUM_ROWS]]
    data = write_jsonl(tmp / "words.jsonl", rows)
    cfg = run_config(tiny_model_dir, data, tmp / "run", max_steps=40, batch_size=8, lr=2e-2, max_length=64,
                     eval_every=20)
    cfg["lora"] = None
    cfg["data"]["eval"] = str(data)  # eval loss on the same rows, so the report has both curves
    cfg["eval"] = {"before": False}  # this test is about `compare`, not the report built into train
    tunesmith.train(cfg)
    return data, tmp / "run"


def test_compare_tuned_beats_base(tuned_run: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    data, run_dir = tuned_run
    out = tmp_path / "report"
    code = main(["compare", "--base", str(tiny_model_dir), "--tuned", str(run_dir), "--data", str(data),
                 "--out", str(out), "--metrics", "exact_match", "--max-new-tokens", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tuned beats base on exact match" in printed
    assert str(out / "report.html") in printed

    results = json.loads((out / "results.json").read_text())
    by_label = {r["label"]: r for r in results["results"]}
    assert set(by_label) == {"base", "tuned"}
    assert by_label["tuned"]["metrics"]["exact_match"] > by_label["base"]["metrics"]["exact_match"]
    assert by_label["tuned"]["metrics"]["exact_match"] >= 0.5
    assert by_label["tuned"]["run_dir"] == str(run_dir)
    # both models answered the same rows, and the tuned one also fits the references better
    assert [r["index"] for r in by_label["base"]["rows"]] == [r["index"] for r in by_label["tuned"]["rows"]]
    assert len(by_label["base"]["rows"]) == NUM_ROWS
    assert by_label["tuned"]["perplexity"] < by_label["base"]["perplexity"]
    em = results["comparison"]["measures"]["exact_match"]["models"]["tuned"]
    assert em["verdict"] == "better" and em["delta_ci"][0] > 0
    assert (out / "loss_tuned.png").is_file() and (out / "report.html").is_file()


def test_limit_and_named_models(tuned_run: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunesmith.config import LoadConfig
    from tunesmith.eval.compare import compare
    from tunesmith.model.generate import GenerationSettings

    data, run_dir = tuned_run
    report = compare({"base": str(tiny_model_dir), "words": str(run_dir)}, str(data), tmp_path,
                     metrics=["exact_match"], settings=GenerationSettings(max_new_tokens=2), load=LoadConfig(),
                     limit=2)
    results = json.loads((report.parent / "results.json").read_text())
    assert [r["label"] for r in results["results"]] == ["base", "words"]
    assert all(len(r["rows"]) == 2 for r in results["results"]) and len(results["examples"]) == 2


@pytest.mark.parametrize("bad", ["oops", "=models/x", "name=", "base=models/x"])
def test_bad_model_option_is_a_user_error(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", "--base", "m0", "--tuned", "m1", "--model", bad, "--data", "d.jsonl",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tunesmith: error: --model") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_base_alone_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--base", "m0", "--data", "d.jsonl", "--out", str(tmp_path)]) == 2
    assert "--tuned" in capsys.readouterr().err


def test_compare_options_are_read_without_torch() -> None:
    """`tunesmith compare --help` builds its options from eval/results.py's names without loading torch."""
    code = "import sys, tunesmith.eval.compare; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_held_out_text_perplexity_is_what_pretraining_logs_as_eval_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    """compare --text scores plain text as a pretrain run's eval does: one BOS and EOS per text, long texts in
    max_length blocks, every token but the first predicted once; so both give the same mean loss."""
    from tunesmith.config import LoadConfig
    from tunesmith.eval.evaluate import load_for_eval, text_losses

    texts = [{"text": " ".join(WORDS[k : k + 6])} for k in range(0, 30, 3)]
    texts.append({"text": " ".join(WORDS * 3)})  # longer than max_length: scored in blocks
    data = write_jsonl(tmp_path / "docs.jsonl", texts)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, eval_every=2, max_length=48)
    cfg.update(method="pretrain", eval={"before": False})
    cfg["data"]["eval"] = str(data)
    tunesmith.train(cfg)
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    eval_loss = [x["eval_loss"] for x in logged if "eval_loss" in x][-1]

    model, tokenizer, _ = load_for_eval(str(tmp_path / "run"), LoadConfig())
    losses = text_losses(model, tokenizer, str(data), max_length=48, batch_size=4)
    assert len(losses) == len(texts)
    lengths = [len(tokenizer(t["text"], add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + BOS/EOS - 1
    assert [n for _, n in losses] == lengths[:-1] + [lengths[-1]] and lengths[-1] > 48
    mean = sum(x * n for x, n in losses) / sum(n for _, n in losses)
    assert mean == pytest.approx(eval_loss, rel=1e-4)


def test_text_that_is_not_plain_text_fails_before_any_model_loads(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Say a", "completion": "a"}])
    code = main(["compare", "--base", "no/such-model", "--tuned", "no/other", "--data", str(rows), "--text", str(rows),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{rows}: held-out text must be plain text records (field 'text'" in err and "Traceback" not in err
