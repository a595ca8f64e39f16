"""Reinforcement-learning maths for PPO and GRPO: advantages, KL estimates, clipped losses, normalisation.

Pure functions on tensors. Token-level tensors are flat, shape (tokens,), holding the completion
tokens of every sequence in order; `owner` (tokens,) says which sequence each token belongs to.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath §4.1.2): (r − mean_group) / (std_group + eps).

    `rewards` (groups * group_size,) holds each group's completions together. With `scale_by_std=False`
    the advantage is r − mean_group only, as Dr. GRPO recommends (Liu et al. 2025, "Understanding R1-Zero-Like
    Training"): dividing by the std up-weights groups that are nearly all right or all wrong.
    """
    grouped = rewards.reshape(-1, group_size)  # (groups, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


def zero_advantage_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) True where every completion of a group got the same reward: that group teaches nothing."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over one sequence's tokens.

    δ_t = r_t + γ V_{t+1} − V_t (V after the last token is 0); A_t = Σ_k (γλ)^k δ_{t+k}; returns R_t = A_t + V_t.
    rewards, values: (T,). Returns (advantages, returns), each (T,).
    """
    advantages = torch.zeros_like(rewards)
    last = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    for t in range(rewards.shape[0] - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < rewards.shape[0] else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages, advantages + values


def whiten(x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over all tokens; with shift_mean=False the mean is added back (scale only)."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log π − log π_ref (Schulman 2020, k1): unbiased, used as PPO's reward penalty."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate exp(r) − r − 1 with r = log π_ref − log π (Schulman 2020, k3): ≥ 0, low
    variance; GRPO's penalty (Shao et al. 2024, eq. 4)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, and whether the clip was active.

    ratio = exp(log π − log π_old); loss = −min(ratio · A, clip(ratio, 1 − ε, 1 + ε) · A).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO value loss with the value change clipped around the rollout's values, per token:
    ½ · max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def sequence_mean(per_token: torch.Tensor, owner: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Mean of each sequence's token values: (seqs,)."""
    sums = per_token.new_zeros(num_seqs).index_add(0, owner, per_token)
    counts = per_token.new_zeros(num_seqs).index_add(0, owner, torch.ones_like(per_token))
    return sums / counts.clamp_min(1)


class AdaptiveKLController:
    """The KL coefficient that steers the measured KL toward a target (Ziegler et al. 2019, §2.2).

    e = clip(KL / target − 1, −0.2, 0.2); β ← β · (1 + e · n_steps / horizon).
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch whose mean sequence KL was `kl`, over `n_steps` samples."""
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
