"""RL maths against hand-worked values: advantages, GAE, KL estimates, clipped losses, the KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.ops.rl import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_k1,
    kl_k3,
    sequence_mean,
    whiten,
    zero_advantage_groups,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_group_advantages_hand_worked() -> None:
    rewards = t(1.0, 3.0, 2.0, 2.0)
    # group 1: mean 2, unbiased std sqrt(2); group 2: all equal
    adv = group_advantages(rewards, 2)
    s = math.sqrt(2) + 1e-4
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0])
    assert group_advantages(rewards, 2, scale_by_std=False).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    assert zero_advantage_groups(rewards, 2).tolist() == [False, True]


def test_gae_hand_worked() -> None:
    adv, ret = gae(t(0.0, 0.0, 1.0), t(0.5, 0.5, 0.5), gamma=1.0, lam=0.5)
    assert adv.tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert ret.tolist() == pytest.approx([0.625, 0.75, 1.0])
    adv, _ = gae(t(0.0, 0.0, 1.0), t(0.5, 0.5, 0.5), gamma=0.9, lam=1.0)
    assert adv.tolist() == pytest.approx([0.31, 0.4, 0.5])


def test_kl_estimates() -> None:
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    same = t(-1.3, -0.2)
    assert kl_k3(same, same).tolist() == [0.0, 0.0] and kl_k1(same, same).tolist() == [0.0, 0.0]


def test_clipped_policy_loss_hand_worked() -> None:
    logps, old = t(math.log(1.5), math.log(1.5)), t(0.0, 0.0)
    loss, clipped = clipped_policy_loss(logps, old, t(2.0, -2.0), clip_eps=0.2)
    # A = 2: min(1.5 * 2, 1.2 * 2) = 2.4 (clipped); A = -2: min(-3, -2.4) = -3 (not clipped)
    assert loss.tolist() == pytest.approx([-2.4, 3.0])
    assert clipped.tolist() == [True, False]


def test_clipped_value_loss_hand_worked() -> None:
    # V = 2 moved from 1 by more than 0.2: the clipped value 1.2 is further from the return 3 and counts
    assert clipped_value_loss(t(2.0), t(1.0), t(3.0), clip=0.2).item() == pytest.approx(0.5 * 1.8**2)
    assert clipped_value_loss(t(1.1), t(1.0), t(3.0), clip=0.2).item() == pytest.approx(0.5 * 1.9**2)


def test_zero_advantage_gives_zero_policy_gradient() -> None:
    logps = t(-1.0, -2.0, -0.5).requires_grad_()
    loss, _ = clipped_policy_loss(logps, t(-1.1, -1.9, -0.4), torch.zeros(3, dtype=torch.float64), 0.2)
    loss.sum().backward()
    assert logps.grad.abs().max().item() == 0.0


def test_whiten_and_sequence_mean() -> None:
    x = t(1.0, 2.0, 3.0, 4.0)
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, std sqrt(1.25)
    std = math.sqrt(1.25)
    w = whiten(x)
    assert w.tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], rel=1e-6)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-12) and w.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    # scale only: the spread becomes std 1 and the mean stays
    scaled = whiten(x, shift_mean=False)
    assert scaled.tolist() == pytest.approx([2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std, 2.5 + 1.5 / std], rel=1e-6)
    assert scaled.mean().item() == pytest.approx(2.5) and scaled.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert sequence_mean(x, torch.tensor([0, 0, 1, 1]), 2).tolist() == [1.5, 3.5]


def test_adaptive_kl_controller_hand_worked() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(3.0, n_steps=100)  # error 3/6 - 1 = -0.5, clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.002 * (1 - 0.002))
