"""reward and dpo end to end on the tiny model: a synthetic preference task both must learn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import WORDS, run_config

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_WORDS, HELD_OUT = WORDS[:24], WORDS[24:]


def pair_rows(words: list[str]) -> list[dict]:
    """Prefer "<word> is good" over "<word> is bad": learnable, and testable on unseen words."""
    return [{"prompt": f"Tell me about {w}", "chosen": f"{w} is good", "rejected": f"{w} is bad"} for w in words]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(model_dir: Path, tmp: Path, method: str, **train) -> dict:
    train_file = write_jsonl(tmp / "train.jsonl", pair_rows(TRAIN_WORDS))
    cfg = run_config(model_dir, train_file, tmp / "run", **{"max_steps": 20, "batch_size": 8, "lr": 1e-2,
                                                            "max_length": 64, **train})
    cfg["method"] = method
    cfg["data"]["eval"] = str(write_jsonl(tmp / "eval.jsonl", pair_rows(HELD_OUT)))
    return cfg


def test_reward_model_learns_and_loads_back_with_one_call(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunesmith.model.reward_model import load_reward_model, score_conversations

    cfg = _config(tiny_model_dir, tmp_path, "reward", eval_every=1, max_steps=15)
    result = tunesmith.train(cfg)
    evals = [m for m in _metrics(tmp_path / "run") if "eval_accuracy" in m]
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_margin"] > 1.0, evals[-1]
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"]
    assert set(result.outputs) >= {"reward_model", "adapter"}
    assert (tmp_path / "run/adapter/reward_head.safetensors").exists()

    # one call loads it; it scores held-out pairs the right way round
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run/reward_model")
    assert plain.config.num_labels == 1
    model, tok = load_reward_model(tmp_path / "run")
    convs = []
    for row in pair_rows(HELD_OUT):
        for side in ("chosen", "rejected"):
            convs.append([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}])
    scores = score_conversations(model, tok, convs, batch_size=3)
    assert all(c > r for c, r in zip(scores[0::2], scores[1::2]))
    # ... and exactly as the run measured it: the mean eval margin matches
    margin = sum(c - r for c, r in zip(scores[0::2], scores[1::2])) / len(HELD_OUT)
    assert margin == pytest.approx(evals[-1]["eval_margin"], rel=1e-4)


def test_reward_full_finetune_trains_body_and_head(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "reward", max_steps=10, lr=3e-3)
    cfg["lora"] = None
    result = tunesmith.train(cfg)
    assert set(result.outputs) >= {"reward_model"} and "adapter" not in result.outputs
    assert result.loop.final_loss < math.log(2)


@pytest.mark.parametrize(
    "dpo", [{}, {"loss": "cdpo"}, {"loss": "ipo"}, {"loss": "simpo", "beta": 2.0}, {"loss": "orpo"},
            {"precompute_ref": True}, {"nll_weight": 1.0}],
    ids=["sigmoid", "cdpo", "ipo", "simpo", "orpo", "precomputed-ref", "rpo"],
)
def test_dpo_raises_the_chosen_over_rejected_margin(dpo: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "dpo")
    cfg["dpo"] = dpo
    cfg["eval"] = {"before": False}
    tunesmith.train(cfg)
    lines = _metrics(tmp_path / "run")
    first = next(m for m in lines if "loss" in m)
    last_eval = [m for m in lines if "eval_loss" in m][-1]
    if dpo.get("loss", "sigmoid") == "sigmoid" and not dpo.get("nll_weight"):
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    if dpo.get("nll_weight"):  # ln 2 plus the chosen answers' mean token NLL
        assert first["loss"] > math.log(2) + 1.0
    # on held-out words, the log-prob of "good" rose relative to "bad"
    assert last_eval["eval_rewards/accuracy"] == 1.0
    assert last_eval["eval_logps/chosen"] - last_eval["eval_logps/rejected"] > 1.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"):
        assert key in first


def test_dpo_full_finetune_frozen_reference_equals_precomputed(tmp_path: Path, tiny_model_dir: Path) -> None:
    losses = {}
    for precompute in (False, True):
        (tmp_path / str(precompute)).mkdir()
        cfg = _config(tiny_model_dir, tmp_path / str(precompute), "dpo", max_steps=5, lr=1e-3)
        cfg["lora"] = None
        cfg["dpo"] = {"precompute_ref": precompute}
        tunesmith.train(cfg)
        losses[precompute] = [m["loss"] for m in _metrics(tmp_path / str(precompute) / "run") if "loss" in m]
    assert losses[False][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[False] == pytest.approx(losses[True], abs=1e-5)
    assert losses[False][-1] < losses[False][0]


def test_dpo_resumes_exactly_from_a_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from tests.helpers import final_weights

    cfg = _config(tiny_model_dir, tmp_path, "dpo", max_steps=6, save_every=3)
    tunesmith.train(cfg)
    # a copy of the run as it stood when its step-3 checkpoint was written
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "run", stopped)
    for name in ("summary.json", "adapter", "merged"):
        target = stopped / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-0000003"]
    result = tunesmith.train({**cfg, "output_dir": str(stopped)})
    assert result.loop.resumed_from == 3
    a, b = final_weights(tmp_path / "run"), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
