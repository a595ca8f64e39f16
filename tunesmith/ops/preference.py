"""Losses that learn from preference pairs: one pure function per loss, each returning per-pair losses.

Inputs are per-pair tensors of shape (pairs,). `*_logps` are summed log-probabilities of the answer
tokens of a sequence, `*_mean_logps` the same divided by the number of answer tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022; margin as in Llama 2, Touvron et al. 2023).

    loss = -log σ(r_chosen − r_rejected − margin)
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def dpo_logits(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)), shared by DPO-family losses."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO, sigmoid loss (Rafailov et al. 2023, eq. 7): loss = -log σ(β · h)."""
    h = dpo_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def cdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023): labels flipped with probability ε.

    loss = −(1 − ε) log σ(β h) − ε log σ(−β h)
    """
    h = dpo_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, with τ = β): loss = (h − 1 / (2β))², h on summed log-probs.

    Summed, as in the paper; TRL's `ipo` averages the log-probs per token instead, which changes the
    scale of h and so the β that works.
    """
    h = dpo_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised.

    loss = −log σ(β/|y_w| · log π(y_w|x) − β/|y_l| · log π(y_l|x) − γ)
    """
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, orpo_lambda: float
) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: SFT on the chosen answer plus an odds-ratio term.

    odds(y|x) = P / (1 − P) with P = exp(mean token log-prob);
    loss = −mean log P(y_w|x) − λ · log σ(log odds(y_w|x) − log odds(y_l|x))
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        _log1m_exp(chosen_mean_logps) - _log1m_exp(rejected_mean_logps)
    )
    return -chosen_mean_logps - orpo_lambda * F.logsigmoid(log_odds)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable near 0 and for very negative x (Mächler 2012)."""
    x = x.clamp_max(-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sft_term(chosen_mean_logps: torch.Tensor) -> torch.Tensor:
    """The chosen answer's mean token NLL, −log π(y_w|x) / |y_w|, added to DPO in RPO (Pang et al. 2024, eq. 2)."""
    return -chosen_mean_logps
