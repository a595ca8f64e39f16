"""RL across processes: grpo and ppo on 2 ranks (torchrun, gloo) equal one process, step by step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tunesmith
from tests.conftest import write_jsonl
from tests.faults.common import child_env
from tests.helpers import WORDS, final_weights

REPO = Path(__file__).resolve().parents[2]
CALL_LOG = "TUNESMITH_TEST_REWARD_LOG"  # where `logged_share_of_e` notes each call: its process and completions


def logged_share_of_e(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The share of the letter e in each completion; each call appends (pid, number of completions) to a log."""
    with open(os.environ[CALL_LOG], "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {len(completions)}\n")
    return [c.count("e") / max(1, len(c)) for c in completions]


STEPS, PROMPTS, GROUP, EVAL_ROWS = 3, 4, 4, 5


def _config(model_dir: Path, tmp: Path, method: str, out: str, batch_size: int) -> dict:
    train = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Write about {w}", "answer": w} for w in WORDS[:12]])
    held_out = write_jsonl(tmp / "held_out.jsonl", [{"prompt": f"Describe {w}", "answer": w} for w in WORDS[12:17]])
    cfg = {
        "method": method,
        "model": str(model_dir),
        "output_dir": str(tmp / out),
        "data": {"train": str(train), "eval": str(held_out)},
        "rl": {"rewards": ["tests.invariants.test_rl_ranks:logged_share_of_e"], "group_size": GROUP,
               "max_new_tokens": 8, "update_epochs": 2, "samples_every": 2, "micro_batch_size": 3},
        "train": {"max_steps": STEPS, "batch_size": batch_size, "lr": 1e-3, "max_length": 64, "warmup_ratio": 0.0,
                  "eval_every": 0, "save_every": 2, "seed": 3},
        "eval": {"before": False},
    }
    if method == "grpo":  # LoRA; minibatches of 3 often fall on one rank only: the other trains a zero-weight batch
        cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
        cfg["rl"]["minibatch_size"] = 3
    else:  # full fine-tuning (a frozen reference), a reward model, whitening of scores and advantages, adaptive KL
        cfg["lora"] = None
        cfg["rl"].update(minibatch_size=6, reward_model=str(tmp / "rm"), reward_model_weight=0.5)
        cfg["ppo"] = {"whiten_rewards": True, "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 100}
    return cfg



def _torchrun(cfg_path: Path, calls: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tunesmith.cli", "train", str(cfg_path)]
    proc = subprocess.run(cmd, env={**child_env(), CALL_LOG: str(calls)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/") and k != "tokens_per_s"} for line in lines]


def _calls(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_two_ranks_equal_one_process(method: str, tmp_path: Path, tiny_model_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if method == "ppo":  # a reward model, loaded by each rank to score the completions it holds
        from tests.helpers import run_config
        from tests.methods.test_preference_methods import TRAIN_WORDS, pair_rows

        pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(TRAIN_WORDS))
        tunesmith.train({**run_config(tiny_model_dir, pairs, tmp_path / "rm", max_steps=3, batch_size=8, lr=1e-2,
                                      max_length=64), "method": "reward"})
    one = _config(tiny_model_dir, tmp_path, method, "one", batch_size=PROMPTS)
    two = _config(tiny_model_dir, tmp_path, method, "two", batch_size=PROMPTS // 2)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    monkeypatch.setenv(CALL_LOG, str(tmp_path / "calls-one.log"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tunesmith.train(one)
    _torchrun(tmp_path / "two.yaml", tmp_path / "calls-two.log")

    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 3]  # three steps, then the eval
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-5), f"step {x['step']}: {key}"
    assert all(m["num_updates"] > 0 for m in a[:-1]) and "eval_reward" in a[-1]
    if method == "ppo":
        assert all("reward/reward_model" in m for m in a[:-1]) and "eval_reward/reward_model" in a[-1]
    weights, two_ranks = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert weights.keys() == two_ranks.keys()
    for k in weights:
        torch.testing.assert_close(two_ranks[k], weights[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # the same answers were sampled, scored and written, whatever rank held them
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("one", "two")]
    assert samples[0] == samples[1] and samples[0].count("\n") == PROMPTS * GROUP

    # each completion scored once: the ranks' calls add up to one process's, and no call saw more than a rank's share
    once, twice = _calls(tmp_path / "calls-one.log"), _calls(tmp_path / "calls-two.log")
    expected = STEPS * PROMPTS * GROUP + EVAL_ROWS
    assert sum(n for _, n in once) == sum(n for _, n in twice) == expected
    assert len({pid for pid, _ in twice}) == 2 and max(n for _, n in twice) <= PROMPTS // 2 * GROUP

    if method == "ppo":  # resume under torchrun from the step-2 checkpoint: the same weights and KL coefficient
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "two", resumed)
        for name in ("summary.json", "model"):
            target = resumed / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        (tmp_path / "resumed.yaml").write_text(yaml.safe_dump({**two, "output_dir": str(resumed)}))
        _torchrun(tmp_path / "resumed.yaml", tmp_path / "calls-resumed.log")
        assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 2
        weights, again = final_weights(tmp_path / "two"), final_weights(resumed)
        assert all(torch.equal(weights[k], again[k]) for k in weights)
        assert [m.get("kl_coef") for m in _metrics(resumed)] == [m.get("kl_coef") for m in b]
