"""Preference losses against hand-worked values, and the direction their gradients push."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.ops.preference import (
    bradley_terry_loss,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    simpo_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Policy chosen -1.0, rejected -2.0; reference chosen -1.2, rejected -1.6 (different, so a swap of the two
# reference terms changes the result): h = (-1.0 + 1.2) - (-2.0 + 1.6) = 0.2 + 0.4 = 0.6.
CASE = (t(-1.0), t(-2.0), t(-1.2), t(-1.6))


def test_dpo_hand_worked() -> None:
    # β h = 0.5 * 0.6 = 0.3; -log σ(0.3) = ln(1 + e^-0.3) = ln 1.7408182 = 0.5543552
    assert dpo_loss(*CASE, beta=0.5).item() == pytest.approx(0.5543552, abs=1e-7)
    # β h = 0.1 * 0.6 = 0.06; -log σ(0.06) = ln(1 + e^-0.06) = ln 1.9417645 = 0.6635971
    assert dpo_loss(*CASE, beta=0.1).item() == pytest.approx(0.6635971, abs=1e-7)


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    logps = t(-3.0, -7.5, -0.2)
    other = t(-4.0, -1.0, -9.0)
    loss = dpo_loss(logps, other, logps, other, beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))


def test_cdpo_hand_worked() -> None:
    # -(0.9) log σ(0.3) - 0.1 log σ(-0.3); since -log σ(-x) = -log σ(x) + x, this is 0.5543552 + 0.1 * 0.3
    assert cdpo_loss(*CASE, beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.5843552, abs=1e-7)
    assert cdpo_loss(*CASE, beta=0.5, label_smoothing=0.0).item() == pytest.approx(0.5543552, abs=1e-7)


def test_ipo_hand_worked() -> None:
    assert ipo_loss(*CASE, beta=0.5).item() == pytest.approx(0.16)  # (0.6 - 1/(2*0.5))^2 = (-0.4)^2
    assert ipo_loss(*CASE, beta=0.25).item() == pytest.approx(1.96)  # (0.6 - 2)^2


def test_simpo_hand_worked() -> None:
    # -log σ(2 * (-0.5 - -1.25) - 0.5) = -log σ(1) = ln(1 + e^-1) = 0.3132617
    assert simpo_loss(t(-0.5), t(-1.25), beta=2.0, gamma=0.5).item() == pytest.approx(0.3132617, abs=1e-7)


def test_orpo_hand_worked() -> None:
    # P_w = 0.5 -> odds 1; P_l = 0.2 -> odds 1/4; the odds ratio is 4 and σ(ln 4) = 4/5
    # loss = -ln 0.5 - 0.1 * ln 0.8 = 0.6931472 + 0.0223144
    loss = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), orpo_lambda=0.1)
    assert loss.item() == pytest.approx(0.7154615, abs=1e-7)
    # P_w = 0.8 -> odds 4; P_l = 0.5 -> odds 1; σ(ln 4) = 0.8: loss = -ln 0.8 - 0.5 ln 0.8 = 1.5 * 0.2231436
    loss = orpo_loss(t(math.log(0.8)), t(math.log(0.5)), orpo_lambda=0.5)
    assert loss.item() == pytest.approx(0.3347153, abs=1e-7)


def test_orpo_stable_for_tiny_and_near_one_probabilities() -> None:
    loss = orpo_loss(t(-1e-9, -200.0), t(-300.0, -1e-9), orpo_lambda=1.0)
    assert torch.isfinite(loss).all()


def test_rpo_sft_term_is_the_chosen_mean_nll() -> None:
    from tunesmith.ops.preference import sft_term

    assert sft_term(t(-0.25, -2.0)).tolist() == [0.25, 2.0]


def test_bradley_terry_hand_worked() -> None:
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(0.3132617, abs=1e-7)  # -log σ(1)
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(math.log(2))  # -log σ(0)
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(3.0)).item() == pytest.approx(2.1269280, abs=1e-7)  # ln(1 + e^2)
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))


def test_batches_match_the_papers_formulas_pair_by_pair() -> None:
    # Each loss written out again in plain floats from its paper, on pairs away from any special point.
    gen = torch.Generator().manual_seed(0)
    pol_w, pol_l, ref_w, ref_l = (-torch.rand(6, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    mean_w, mean_l = (-torch.rand(6, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    beta, eps, gamma, lam = 0.3, 0.2, 0.4, 0.25
    got = {
        "dpo": dpo_loss(pol_w, pol_l, ref_w, ref_l, beta),
        "cdpo": cdpo_loss(pol_w, pol_l, ref_w, ref_l, beta, eps),
        "ipo": ipo_loss(pol_w, pol_l, ref_w, ref_l, beta),
        "simpo": simpo_loss(mean_w, mean_l, beta, gamma),
        "orpo": orpo_loss(mean_w, mean_l, lam),
        "bt": bradley_terry_loss(pol_w, pol_l, mean_w),
    }
    for i in range(6):
        w, l_, rw, rl = pol_w[i].item(), pol_l[i].item(), ref_w[i].item(), ref_l[i].item()
        mw, ml = mean_w[i].item(), mean_l[i].item()
        log_ratio = math.log(math.exp(w) / math.exp(rw)) - math.log(math.exp(l_) / math.exp(rl))
        p_w, p_l = math.exp(mw), math.exp(ml)
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        expected = {
            "dpo": -math.log(sigmoid(beta * log_ratio)),
            "cdpo": -(1 - eps) * math.log(sigmoid(beta * log_ratio)) - eps * math.log(sigmoid(-beta * log_ratio)),
            "ipo": (log_ratio - 1 / (2 * beta)) ** 2,
            "simpo": -math.log(sigmoid(beta * mw - beta * ml - gamma)),
            "orpo": -math.log(p_w) - lam * math.log(sigmoid(math.log(odds_ratio))),
            "bt": -math.log(sigmoid(w - l_ - mw)),
        }
        for name, value in expected.items():
            assert got[name][i].item() == pytest.approx(value, rel=1e-9, abs=1e-12), (name, i)


@pytest.mark.parametrize(
    "loss",
    [
        lambda c, r: dpo_loss(c, r, t(-1.5), t(-1.5), beta=0.1),
        lambda c, r: cdpo_loss(c, r, t(-1.5), t(-1.5), beta=0.1, label_smoothing=0.1),
        lambda c, r: ipo_loss(c, r, t(-1.5), t(-1.5), beta=0.1),
        lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5),
        lambda c, r: orpo_loss(c, r, orpo_lambda=0.1),
        lambda c, r: bradley_terry_loss(c, r),
    ],
    ids=["dpo", "cdpo", "ipo", "simpo", "orpo", "bradley_terry"],
)
def test_gradient_pushes_chosen_up_and_rejected_down(loss) -> None:
    chosen = t(-1.0).requires_grad_()
    rejected = t(-2.0).requires_grad_()
    loss(chosen, rejected).sum().backward()
    # gradient descent moves against the gradient: chosen up (negative grad), rejected down (positive grad)
    assert chosen.grad.item() < 0
    assert rejected.grad.item() > 0
