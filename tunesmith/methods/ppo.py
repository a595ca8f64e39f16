"""PPO with a value head, as InstructGPT trained its policy (Ouyang et al. 2022; Stiennon et al. 2020).

Per completion token t the reward is −β · (log π_old − log π_ref) (k1 KL estimate); the last token
also gets the score of the reward model (and any reward functions). GAE turns rewards and the value
head's estimates into advantages and returns (Schulman et al. 2016); the loss is PPO's clipped
surrogate (Schulman et al. 2017) plus `ppo.vf_coef` times the clipped value loss, averaged over
completion tokens, over `rl.update_epochs` passes of minibatches. β is fixed (`rl.kl_coef`) or follows
the adaptive controller of Ziegler et al. 2019 (`ppo.adaptive_kl`), whose state is checkpointed.
The value head reads the policy's own final hidden states (a shared trunk).

One step, in call order (the loop calls `RLObjective.train_step`, rollout/step.py):
  sample      completions per prompt                  rollout/step.py `sample` -> model/generate.py
  score       reward model and/or reward functions    rollout/rewards.py `RewardSet.score`
  measure     old and reference log-probs, values     rollout/step.py `measure` (`measure_values` here)
  advantages  KL-penalised token rewards, GAE,        here: `PpoObjective.advantages` -> ops/rl.py `kl_k1`, `gae`,
              whitening (over every rank's answers)   `whiten`; rollout/step.py `gathered`
  update      clipped policy + value losses, over     here: `PpoObjective.forward` -> ops/rl.py `clipped_policy_loss`,
              update_epochs x minibatches             `clipped_value_loss`; through the loop's `StepTools.update`
  after_step  the adaptive KL coefficient             here: `PpoObjective.after_step` -> ops/rl.py `AdaptiveKLController`
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.core.distributed import DistInfo
from tunesmith.core.next_token import count_targets, labelled_states
from tunesmith.data import TokenizedData
from tunesmith.methods import build_rl_data, nothing_to_prepare, save_lm_outputs
from tunesmith.model.parts import scalar_head
from tunesmith.ops.losses import chunked_token_logps
from tunesmith.ops.rl import AdaptiveKLController, clipped_policy_loss, clipped_value_loss, gae, kl_k1, whiten
from tunesmith.rollout.rewards import Scored
from tunesmith.rollout.sequences import Completion, collate_sequences
from tunesmith.rollout.step import RLObjective, gathered

__all__ = ["GENERATES", "NAME", "PolicyWithValue", "PpoObjective", "build_data", "collate", "loss_module",
           "prepare", "save_outputs", "wrap_model"]

GENERATES = True
NAME = "ppo"

collate = collate_sequences
prepare = nothing_to_prepare


class PolicyWithValue(nn.Module):
    """The policy LM and a linear value head on its final hidden states."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = scalar_head(lm, bias=True)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


def wrap_model(model: nn.Module, cfg: Config) -> PolicyWithValue:
    """The policy plus a fresh value head (always trained)."""
    return PolicyWithValue(model)


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Prompt rows (any prompt-bearing format); their other fields go to the reward functions."""
    return build_rl_data(cfg, tokenizer, source)


def loss_module(model: PolicyWithValue, cfg: Config, tokenizer) -> nn.Module:
    """The PPO objective on the policy and its value head."""
    return PpoObjective(model, model.lm, cfg, tokenizer)


def save_outputs(model: PolicyWithValue, tokenizer, cfg: Config, run_dir: Path) -> dict[str, str]:
    """The tuned policy, as for SFT (the value head is a training aid and is not saved)."""
    return save_lm_outputs(model.lm, tokenizer, cfg, run_dir)


class PpoObjective(RLObjective):
    """PPO: KL-penalised token rewards, GAE, clipped policy and value losses; forward(**batch) is the update's loss."""

    def __init__(self, model: PolicyWithValue, policy: nn.Module, cfg: Config, tokenizer) -> None:
        super().__init__(model, policy, cfg, tokenizer)
        self.kl_ctl = AdaptiveKLController(cfg.rl.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)

    def uses_reference(self) -> bool:
        """PPO penalises the KL unless its coefficient is fixed at 0."""
        return self.rl.kl_coef > 0 or self.cfg.ppo.adaptive_kl

    def kl_estimate(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """k1, log π − log π_ref: the estimate InstructGPT's reward penalty uses."""
        return kl_k1(logps, ref_logps)

    def measure_values(self, selected: torch.Tensor) -> torch.Tensor:
        """The value head on the states that predict each completion token: (tokens,)."""
        return self.model.value_head(selected.float()).squeeze(-1)

    def method_state(self) -> dict[str, float]:
        """The adaptive KL coefficient, for the checkpoint."""
        return {"kl_coef": self.kl_ctl.value}

    def load_method_state(self, state: dict[str, float]) -> None:
        """Restore the adaptive KL coefficient from a checkpoint."""
        if "kl_coef" in state:
            self.kl_ctl.value = state["kl_coef"]

    def after_step(self, measured: dict[str, float], num_completions: int) -> None:
        """Move the adaptive KL coefficient toward its target."""
        if self.cfg.ppo.adaptive_kl and "kl_per_completion" in measured:
            self.kl_ctl.update(measured["kl_per_completion"], num_completions)

    def advantages(self, seqs: list[Completion], scored: Scored, group_size: int,
                   info: DistInfo | None = None) -> tuple[list[Completion], dict[str, float]]:
        """Token rewards (KL penalty, score at the end), GAE advantages and returns, whitened advantages.
        Whitening and the logged statistics span every rank's completions (`gathered`), as in one process."""
        p = self.cfg.ppo
        beta = self.kl_ctl.value
        every_score, mine = gathered(torch.tensor(scored.total, dtype=torch.float64), info)
        scores = every_score[mine]
        if p.whiten_rewards and every_score.numel() > 1:
            scores = whiten(every_score, shift_mean=False)[mine]
        all_adv, all_ret, all_val = [], [], []
        for s in seqs:
            old = torch.tensor(s.token_fields["old_logps"], dtype=torch.float64)
            values = torch.tensor(s.token_fields["old_values"], dtype=torch.float64)
            rewards = torch.zeros_like(old)
            if "ref_logps" in s.token_fields:
                rewards -= beta * kl_k1(old, torch.tensor(s.token_fields["ref_logps"], dtype=torch.float64))
            if rewards.numel():
                rewards[-1] += scores[s.index]
            adv, ret = gae(rewards, values, p.gamma, p.lam)
            all_adv.append(adv)
            all_ret.append(ret)
            all_val.append(values)
            s.token_fields["returns"] = ret.tolist()
        every_adv, mine = gathered(torch.cat(all_adv), info)
        flat_adv = every_adv[mine]
        if p.whiten_advantages and every_adv.numel() > 1:
            flat_adv = whiten(every_adv)[mine]
        start = 0
        for s in seqs:
            n = len(s.completion_ids)
            s.token_fields["advantages"] = flat_adv[start : start + n].tolist()
            start += n
        returns, values = gathered(torch.cat(all_ret), info)[0], gathered(torch.cat(all_val), info)[0]
        var = returns.var(unbiased=False)
        explained = float(1 - (returns - values).var(unbiased=False) / var) if var > 0 else 0.0
        return seqs, {"kl_coef": beta, "explained_variance": explained, "value_mean": float(values.mean()),
                      "return_mean": float(returns.mean())}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Completion tokens: PPO's losses are token means."""
        return count_targets(batch["labels"])

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        old_values: torch.Tensor,
        **_: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over completion tokens of policy loss + vf_coef · value loss, the token count, and statistic sums."""
        selected, targets, _ = labelled_states(self._decoder, input_ids, labels, position_ids)
        logps = chunked_token_logps(selected, targets, self._head)  # (tokens,)
        values = self.model.value_head(selected.float()).squeeze(-1)  # (tokens,)
        policy_loss, clipped = clipped_policy_loss(logps, old_logps, advantages, self.rl.clip_eps)
        value_loss = clipped_value_loss(values, old_values, returns, self.cfg.ppo.value_clip)
        loss_sum = (policy_loss + self.cfg.ppo.vf_coef * value_loss).sum()
        stats = {"policy_loss": policy_loss.detach().sum(), "value_loss": value_loss.detach().sum(),
                 "clip_frac": clipped.float().sum()}
        return loss_sum, torch.tensor(float(targets.numel())), stats
