"""`tunesmith score` and the reward column of `tunesmith compare`, with a reward model trained on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import WORDS, run_config
from tests.methods.test_preference_methods import HELD_OUT, TRAIN_WORDS, pair_rows
from tunesmith.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A reward model that prefers "<word> is good" to "<word> is bad"."""
    tmp = tmp_path_factory.mktemp("reward")
    cfg = run_config(tiny_model_dir, write_jsonl(tmp / "train.jsonl", pair_rows(TRAIN_WORDS)), tmp / "run",
                     max_steps=15, batch_size=8, lr=1e-2, max_length=64)
    cfg["method"] = "reward"
    tunesmith.train(cfg)
    return tmp / "run"


def test_score_pairs_gives_accuracy_and_margin(reward_run: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(HELD_OUT))
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--reward-model", str(reward_run), "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(HELD_OUT)} pairs: reward model prefers the chosen answer in 100.0%" in printed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(HELD_OUT) and all(x["chosen_score"] > x["rejected_score"] for x in lines)


def test_score_rows(reward_run: Path, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": f"Tell me about {w}", "completion": f"{w} is {kind}"} for w in HELD_OUT for kind in ("good", "bad")]
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--reward-model", str(reward_run / "reward_model"), "--data",
                 str(write_jsonl(tmp_path / "rows.jsonl", rows)), "--out", str(out)]) == 0
    assert "rows: mean reward" in capsys.readouterr().out
    scores = [json.loads(x)["score"] for x in out.read_text().splitlines()]
    assert all(good > bad for good, bad in zip(scores[0::2], scores[1::2]))


def test_score_refuses_a_folder_without_a_reward_model(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(HELD_OUT))
    assert main(["score", "--reward-model", str(tiny_model_dir), "--data", str(data)]) == 2
    assert "no reward model there" in capsys.readouterr().err


def test_compare_adds_reward_and_win_rate(reward_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": f"Tell me about {w}", "completion": f"{w} is good"} for w in WORDS[:6]]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "report"
    code = main(["compare", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--data", str(data),
                 "--out", str(out), "--max-new-tokens", "6", "--reward-model", str(reward_run)])
    assert code == 0
    assert "Judged by the reward model, tuned's answer beats base's on 50.0% of 6 rows" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    base, tuned = results["results"]
    assert all("reward" in row["scores"] for row in base["rows"] + tuned["rows"])
    # the same model twice: identical answers, identical rewards, every row a tie
    assert [r["scores"]["reward"] for r in base["rows"]] == [r["scores"]["reward"] for r in tuned["rows"]]
    measures = results["comparison"]["measures"]
    assert measures["reward_win_rate"]["models"]["tuned"]["value"] == 0.5
    assert measures["reward_win_rate"]["models"]["tuned"]["verdict"] == "level"
    html = (out / "report.html").read_text()
    assert "reward win rate" in html and "reward" in html


def test_win_rate_counts_wins_ties_and_losses() -> None:
    from tunesmith.eval.report import compare_results
    from tunesmith.eval.results import EvalResult, EvalRow

    def result(label: str, rewards: list[float]) -> EvalResult:
        rows = [EvalRow(index=i, output="x", scores={"reward": r}) for i, r in enumerate(rewards)]
        return EvalResult(label=label, spec=label, data="d", metrics={}, rows=rows)

    c = compare_results([result("base", [0.0, 1.0, 2.0, 3.0]), result("tuned", [1.0, 1.0, 1.0, 9.0])])
    win = next(m for m in c.measures if m.name == "reward_win_rate").scores["tuned"]
    assert win.value == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win.delta == pytest.approx(win.value - 0.5)


def test_eval_points_a_reward_run_to_score(reward_run: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Tell me about lamp", "completion": "lamp is good"}])
    assert main(["eval", "--model", str(reward_run), "--data", str(data)]) == 2
    assert "tunesmith score --reward-model" in capsys.readouterr().err
