"""The settings of the GRPO and reward objectives, on tiny batches worked out by hand: grpo.loss_normalization,
grpo.scale_rewards and reward.use_margin."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import write_jsonl
from tunesmith.config import build_config
from tunesmith.data.preference import build_pairs, collate_pairs
from tunesmith.methods import grpo, reward
from tunesmith.rollout.rewards import Scored
from tunesmith.rollout.sequences import Completion, collate_sequences, pack_sequences

pytestmark = pytest.mark.usefixtures("one_thread")

KL_COEF = 0.1
MAX_NEW_TOKENS = 8


def _grpo_config(**grpo_section):
    return build_config({
        "method": "grpo", "data": {"train": "prompts.jsonl"}, "lora": None, "train": {"max_length": 64},
        "rl": {"rewards": ["exact_match"], "max_new_tokens": MAX_NEW_TOKENS, "kl_coef": KL_COEF,
               "share_prompts": False},
        "grpo": grpo_section,
    })


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _alone_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probs of the completion tokens from a plain forward over prompt + completion alone."""
    ids = prompt + completion
    logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [logps[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))]


def k3(d: float) -> float:
    """KL estimate exp(r) - r - 1 at r = log π_ref - log π = d."""
    return math.exp(d) - d - 1


# Three completions of one prompt: 2, 4 and 3 tokens, advantages 1, -0.25 and 0.5 (shared by their tokens),
# and a reference log-prob that differs from the policy's by `d` at each token.
PROMPT = [5, 17, 40, 9]
COMPLETIONS = [[61, 62], [70, 71, 72, 73], [80, 81, 82]]
ADVANTAGES = [1.0, -0.25, 0.5]
DELTAS = [[0.5, -0.5], [0.2, 0.2, -1.0, 0.0], [0.0, 0.3, -0.3]]


def _batch(policy) -> dict[str, torch.Tensor]:
    seqs = []
    for i, (completion, adv, deltas) in enumerate(zip(COMPLETIONS, ADVANTAGES, DELTAS)):
        logps = _alone_logps(policy, PROMPT, completion)
        seqs.append(Completion(PROMPT, completion, i, {"advantages": [adv] * len(completion),
                                                     "ref_logps": [lp + d for lp, d in zip(logps, deltas)]}))
    rows = pack_sequences(seqs, 64)
    assert len(rows) == 1  # all three documents in one row: the per-completion sums must keep them apart
    return collate_sequences(rows, pad_id=0)


def _hand_losses() -> list[list[float]]:
    """Per-token loss: the ratio is 1 (the update's own log-probs are the old ones), so the clipped surrogate is
    -A, plus kl_coef times the k3 KL."""
    return [[-adv + KL_COEF * k3(d) for d in deltas] for adv, deltas in zip(ADVANTAGES, DELTAS)]


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_grpo_loss_normalization(mode: str, policy, tiny_tokenizer) -> None:
    objective = grpo.loss_module(policy, _grpo_config(loss_normalization=mode), tokenizer=tiny_tokenizer)
    batch = _batch(policy)
    with torch.no_grad():
        loss_sum, count, _ = objective(**batch)
    per_token = _hand_losses()
    # 9 tokens, 3 completions: the three modes give three different means on this batch
    n_tokens, n_completions = sum(map(len, per_token)), len(per_token)
    expected_sum, expected_count = {
        "token": (sum(map(sum, per_token)), n_tokens),
        "sequence": (sum(sum(x) / len(x) for x in per_token), n_completions),
        "constant": (sum(map(sum, per_token)) / MAX_NEW_TOKENS, n_completions),
    }[mode]
    assert count.item() == expected_count == objective.count(batch)
    assert loss_sum.item() == pytest.approx(expected_sum, abs=1e-5)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_scale_rewards(scale: bool, policy, tiny_tokenizer) -> None:
    objective = grpo.loss_module(policy, _grpo_config(scale_rewards=scale), tokenizer=tiny_tokenizer)
    seqs = [Completion(PROMPT, [60 + i] * (1 + i % 3), i) for i in range(8)]
    rewards = [1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0]  # group 1: mean 2; group 2 all level
    kept, stats = objective.advantages(seqs, Scored(total=rewards, parts={}), group_size=4)
    assert [s.index for s in kept] == [0, 1, 2, 3] and stats == {"frac_zero_adv_groups": 0.5}
    centred = [-1.0, 1.0, 0.0, 0.0]
    std = statistics.stdev(rewards[:4])  # sqrt(2/3)
    expected = [c / std for c in centred] if scale else centred
    for s, adv in zip(kept, expected):
        assert s.token_fields["advantages"] == pytest.approx([adv] * len(s.completion_ids), rel=2e-4, abs=1e-12)


@pytest.mark.parametrize("use_margin", [True, False])
def test_reward_use_margin(use_margin: bool, tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    rows = [
        {"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Seven.", "margin": 2.0},
        {"prompt": "Name a fruit", "chosen": "A pear.", "rejected": "A chair.", "margin": 0.5},
        {"prompt": "Name a bird", "chosen": "A robin.", "rejected": "A spoon."},  # no margin: 0
    ]
    pairs = build_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), tiny_tokenizer, max_length=64, packing=True)
    batch = collate_pairs(pairs.rows, tiny_tokenizer.pad_token_id)
    cfg = build_config({"method": "reward", "data": {"train": "pairs.jsonl"}, "reward": {"use_margin": use_margin}})
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    loss = reward.loss_module(reward.wrap_model(lm, cfg), cfg)
    with torch.no_grad():
        total, count, _ = loss(**batch)
        scores = loss.rewards(batch["input_ids"], batch["position_ids"], batch["seq_index"]).tolist()
    chosen, rejected = scores[0::2], scores[1::2]
    in_batch = batch["margins"].tolist()  # in the batch's pair order (packing may reorder the pairs)
    assert sorted(in_batch) == [0.0, 0.5, 2.0]
    margins = in_batch if use_margin else [0.0, 0.0, 0.0]
    expected = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(chosen, rejected, margins))  # -log σ(.)
    assert count.item() == 3
    assert total.item() == pytest.approx(expected, rel=1e-5)
    without = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected))
    assert (abs(total.item() - without) > 0.1) == use_margin
