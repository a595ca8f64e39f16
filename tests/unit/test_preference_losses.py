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


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# chosen -1, rejected -2, reference -1.5 for both: h = 0.5 - (-0.5) = 1
CASE = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))


def test_dpo_hand_worked() -> None:
    assert dpo_loss(*CASE, beta=0.5).item() == pytest.approx(softplus(-0.5))  # -log σ(0.5) = 0.474077
    assert softplus(-0.5) == pytest.approx(0.474077, abs=1e-6)


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    logps = t(-3.0, -7.5, -0.2)
    other = t(-4.0, -1.0, -9.0)
    loss = dpo_loss(logps, other, logps, other, beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))


def test_cdpo_hand_worked() -> None:
    # -(0.9) log σ(0.5) - 0.1 log σ(-0.5) = 0.9 * 0.474077 + 0.1 * 0.974077
    assert cdpo_loss(*CASE, beta=0.5, label_smoothing=0.1).item() == pytest.approx(0.524077, abs=1e-6)
    assert cdpo_loss(*CASE, beta=0.5, label_smoothing=0.0).item() == pytest.approx(dpo_loss(*CASE, beta=0.5).item())


def test_ipo_hand_worked() -> None:
    assert ipo_loss(*CASE, beta=0.5).item() == pytest.approx(0.0)  # (1 - 1/(2*0.5))^2
    assert ipo_loss(*CASE, beta=0.25).item() == pytest.approx(1.0)  # (1 - 2)^2


def test_simpo_hand_worked() -> None:
    # -log σ(2 * (-0.5 - -1.0) - 0.5) = -log σ(0.5)
    assert simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5).item() == pytest.approx(0.474077, abs=1e-6)


def test_orpo_hand_worked() -> None:
    # P_w = 0.5 -> odds 1; P_l = 0.25 -> odds 1/3; log odds ratio = ln 3
    # loss = -ln 0.5 - 0.1 * log σ(ln 3) = 0.693147 + 0.1 * ln(4/3)
    loss = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), orpo_lambda=0.1)
    assert loss.item() == pytest.approx(0.693147 + 0.1 * 0.287682, abs=1e-6)


def test_orpo_stable_for_tiny_and_near_one_probabilities() -> None:
    loss = orpo_loss(t(-1e-9, -200.0), t(-300.0, -1e-9), orpo_lambda=1.0)
    assert torch.isfinite(loss).all()


def test_rpo_sft_term_is_the_chosen_mean_nll() -> None:
    from tunesmith.ops.preference import sft_term

    assert sft_term(t(-0.25, -2.0)).tolist() == [0.25, 2.0]


def test_bradley_terry_known_case() -> None:
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(softplus(-1.0))  # 0.313262
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))


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
