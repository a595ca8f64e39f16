"""grpo and ppo end to end on the tiny model, with a verifiable reward the policy can learn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.conftest import write_jsonl
from tests.helpers import WORDS, final_weights
from tunesmith.core import checkpoint as ckpt
from tunesmith.errors import TunesmithError

pytestmark = pytest.mark.usefixtures("one_thread")

CALLS = {"n": 0}


def share_of_e(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """A dense, verifiable reward: the share of the letter e in the completion."""
    return [c.count("e") / max(1, len(c)) for c in completions]


def constant(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The same reward for everything: every group is level, nothing to learn."""
    return [1.0] * len(completions)


def fails_on_third_call(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Works twice, then raises."""
    CALLS["n"] += 1
    if CALLS["n"] >= 3:
        raise RuntimeError("reward server down")
    return [0.0] * len(completions)


SEEN: list[dict[str, list[str]]] = []


def sees_answers(prompts: list[str], completions: list[str], answer: list[str], topic: list[str], **_) -> list[float]:
    """Records what it was given, for the test to check; 1 when the answer is in the completion."""
    SEEN.append({"prompts": list(prompts), "completions": list(completions), "answer": list(answer),
                 "topic": list(topic)})
    return [float(a in c) for a, c in zip(answer, completions)]


def _config(model_dir: Path, tmp: Path, method: str, reward: str, **rl) -> dict:
    rows = [{"prompt": f"Write about {w}", "answer": w, "topic": "words"} for w in WORDS[:16]]
    data = write_jsonl(tmp / "prompts.jsonl", rows)
    return {
        "method": method,
        "model": str(model_dir),
        "output_dir": str(tmp / "run"),
        "data": {"train": str(data), "eval": str(data)},
        "lora": None,
        "rl": {"rewards": [f"tests.methods.test_rl_methods:{reward}"], "group_size": 4, "max_new_tokens": 8,
               "update_epochs": 2, "samples_every": 5, **rl},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 1e-2, "max_length": 64, "warmup_ratio": 0.0,
                  "eval_every": 0, "save_every": 0, "seed": 3},
        "eval": {"before": False},
    }


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "factor"), [("grpo", 3.0), ("ppo", 1.4)])
def test_mean_reward_rises(method: str, factor: float, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, method, "share_of_e")
    if method == "ppo":  # the score is small next to the KL penalty: scale it to std 1 (as InstructGPT normalised it)
        cfg["ppo"] = {"whiten_rewards": True}
    result = tunesmith.train(cfg)
    rewards = [h["reward"] for h in _history(tmp_path / "run") if "reward" in h]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > factor * first, rewards
    line = _history(tmp_path / "run")[-2]  # the last step's metrics (the last line is the eval)
    for key in ("reward_std", "kl", "entropy", "clip_frac", "completion_length"):
        assert key in line, key
    if method == "ppo":
        assert {"value_loss", "explained_variance", "kl_coef"} <= set(line)
    else:
        assert "frac_zero_adv_groups" in line
    assert "eval_reward" in _history(tmp_path / "run")[-1]
    samples = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {5, 10, 15, 20, 25, 30} and len(samples) == 6 * 16
    assert set(result.outputs) >= {"model"}


def test_kl_is_zero_at_the_start_under_lora(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "share_of_e")
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg["train"].update(max_steps=2, lr=1e-2)
    tunesmith.train(cfg)
    steps = [h for h in _history(tmp_path / "run") if "kl" in h]
    assert steps[0]["kl"] == 0.0  # the adapters start at zero: policy == reference
    assert steps[1]["kl"] > 0.0


@pytest.mark.parametrize(("method", "lora"), [("grpo", None), ("grpo", {"r": 4, "alpha": 8, "dropout": 0.0}),
                                           ("ppo", None)])
def test_shared_prompts_train_the_same_way(method: str, lora: dict | None, tmp_path: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # One step of two updates (old, reference and, for PPO, value passes all used): the group's prompt held once
    # per tree gives the losses, KL, entropy, gradient norms and weights of one document per completion.
    # (LoRA dropout is off: its masks are drawn per token, and the two layouts hold different numbers of tokens.)
    import tunesmith.rollout.step as step_module

    real_pack, shared_prefixes = step_module.pack_sequences, []

    def spying(*args, **kwargs):
        rows = real_pack(*args, **kwargs)
        shared_prefixes.append(any(-1 in row.owners for row in rows))
        return rows

    monkeypatch.setattr(step_module, "pack_sequences", spying)
    runs = {}
    for share in (True, False):
        shared_prefixes.clear()
        (tmp_path / str(share)).mkdir()
        cfg = _config(tiny_model_dir, tmp_path / str(share), method, "share_of_e", share_prompts=share,
                      micro_batch_size=6)
        cfg["lora"] = lora
        cfg["train"]["max_steps"] = 1
        tunesmith.train(cfg)
        runs[share] = (_history(tmp_path / str(share) / "run")[0], final_weights(tmp_path / str(share) / "run"))
        assert shared_prefixes and all(shared_prefixes) == share  # the trees really were (not) built
    (shared, shared_weights), (plain, plain_weights) = runs[True], runs[False]
    keys = ["loss", "grad_norm", "kl", "entropy", "clip_frac", "reward", "completion_length", "tokens_seen"]
    for key in keys + (["value_loss"] if method == "ppo" else []):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert shared["grad_norm"] > 0 and shared["num_updates"] == 2
    # Adam's first steps are lr x sign(gradient): float noise in a near-zero gradient can flip a lone element by a
    # whole step (1e-2), so weights are compared in bulk; layouts that differed in maths would differ everywhere.
    diffs = torch.cat([(shared_weights[k] - w).abs().flatten() for k, w in plain_weights.items()])
    assert float((diffs > 1e-4).float().mean()) < 1e-3 and float(diffs.mean()) < 1e-6


def test_level_groups_teach_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "constant")
    cfg["train"]["max_steps"] = 3
    tunesmith.train(cfg)
    steps = [h for h in _history(tmp_path / "run") if "reward" in h]
    assert all(h["frac_zero_adv_groups"] == 1.0 and h["num_updates"] == 0.0 for h in steps)
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = final_weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)


def test_row_fields_reach_the_reward_functions(tmp_path: Path, tiny_model_dir: Path) -> None:
    SEEN.clear()
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "sees_answers")
    cfg["train"]["max_steps"] = 1
    tunesmith.train(cfg)
    rollout, held_out = SEEN  # the step's 4 prompts x 4 completions, then one greedy answer per data.eval prompt
    assert len(rollout["completions"]) == 16 and len(held_out["completions"]) == 16
    for call in SEEN:
        n = len(call["completions"])
        assert len(call["prompts"]) == len(call["answer"]) == n
        assert call["topic"] == ["words"] * n  # a field the rewards do not know, passed on as it is
        assert [f"Write about {a}" for a in call["answer"]] == call["prompts"]  # each completion gets its own row's
    groups = [rollout["answer"][i : i + 4] for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4
    assert held_out["answer"] == WORDS[:16]


def test_faulty_reward_stops_the_run_and_keeps_the_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    CALLS["n"] = 0
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "fails_on_third_call")
    cfg["train"].update(max_steps=6, save_every=2)
    with pytest.raises(TunesmithError, match="fails_on_third_call' raised RuntimeError: reward server down"):
        tunesmith.train(cfg)
    found = ckpt.checkpoint_dirs(tmp_path / "run/checkpoints")
    assert [d.name for d in found] == ["step-0000002"] and ckpt.is_complete(found[0])
    assert not (tmp_path / "run/summary.json").exists()


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_resumes_exactly_from_a_checkpoint(method: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, method, "share_of_e", **({"minibatch_size": 8} if method == "ppo" else {}))
    cfg["train"].update(max_steps=6, save_every=3)
    if method == "ppo":
        cfg["ppo"] = {"adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 100}
    tunesmith.train(cfg)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "run", stopped)
    for name in ("summary.json", "model"):
        target = stopped / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = tunesmith.train({**cfg, "output_dir": str(stopped)})
    assert result.loop.resumed_from == 3
    a, b = final_weights(tmp_path / "run"), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole = [h for h in _history(tmp_path / "run") if "reward" in h]
    resumed = [h for h in _history(stopped) if "reward" in h]
    assert [h["reward"] for h in whole] == [h["reward"] for h in resumed]
    if method == "ppo":
        assert [h["kl_coef"] for h in whole] == [h["kl_coef"] for h in resumed]
        assert len({h["kl_coef"] for h in whole}) > 1  # the adaptive coefficient moved and was restored
    samples = [json.loads(x)["step"] for x in (stopped / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(5) == 16  # the redone steps' samples are not doubled


def test_ppo_with_a_reward_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.helpers import run_config
    from tests.methods.test_preference_methods import TRAIN_WORDS, pair_rows

    rm_cfg = run_config(tiny_model_dir, write_jsonl(tmp_path / "pairs.jsonl", pair_rows(TRAIN_WORDS)), tmp_path / "rm",
                        max_steps=5, batch_size=8, lr=1e-2, max_length=64)
    rm_cfg["method"] = "reward"
    tunesmith.train(rm_cfg)
    cfg = _config(tiny_model_dir, tmp_path, "ppo", "share_of_e", reward_model=str(tmp_path / "rm"),
                  reward_model_weight=0.5)
    cfg["rl"]["rewards"] = []
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg["train"]["max_steps"] = 2
    tunesmith.train(cfg)
    steps = [h for h in _history(tmp_path / "run") if "reward" in h]
    assert all(h["reward"] == pytest.approx(0.5 * h["reward/reward_model"]) for h in steps)
    assert steps[0]["kl"] == 0.0  # k1 under LoRA at the first step


def test_rl_config_is_checked_before_anything_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "share_of_e", group_size=1, temperature=0.0)
    cfg["rl"]["rewards"] = []
    with pytest.raises(TunesmithError) as info:
        tunesmith.train(cfg)
    text = str(info.value)
    assert "needs a reward" in text and "rl.group_size" in text and "rl.temperature" in text
    assert not (tmp_path / "run").exists()
    cfg = _config(tiny_model_dir, tmp_path, "grpo", "share_of_e")
    cfg["rl"]["rewards"] = ["exact_match"]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "no answer here"}])
    with pytest.raises(TunesmithError, match="compare completions with a reference answer"):
        tunesmith.train(cfg)
