"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath): RL without a critic.

Each prompt gets `rl.group_size` sampled completions; a completion's advantage is its reward minus
its group's mean (divided by the group's std unless `grpo.scale_rewards: false`, Dr. GRPO), shared by
all its tokens. The loss is PPO's clipped surrogate plus β · KL(π‖π_ref) (k3 estimate) per token,
normalised as `grpo.loss_normalization` says. A group whose rewards are all equal has zero advantage
everywhere: it is left out of the update (it would only add KL gradient) and counted in the logs as
`frac_zero_adv_groups`.

One step, in call order (the loop calls `RLObjective.train_step`, rollout/step.py):
  sample      `group_size` completions per prompt      rollout/step.py `sample` -> model/generate.py
  score       reward functions and/or reward model    rollout/rewards.py `RewardSet.score`
  measure     reference log-probs (no old pass when   rollout/step.py `measure` (`measures_old_logps` here)
              one update per step: ratio is 1)
  advantages  group-relative, zero groups dropped     here: `GrpoObjective.advantages` -> ops/rl.py `group_advantages`
              (a group is on one rank: local maths)
  update      clipped surrogate + β·k3 KL, normalised  here: `GrpoObjective.forward` -> ops/rl.py `clipped_policy_loss`,
                                                      `kl_k3`; through the loop's `StepTools.update`
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.core.distributed import DistInfo
from tunesmith.core.next_token import count_targets, labelled_states, num_sequences, token_owner
from tunesmith.data import TokenizedData
from tunesmith.methods import build_rl_data, keep_model, nothing_to_prepare, save_lm_outputs
from tunesmith.ops.losses import chunked_token_logps, chunked_token_logps_entropy
from tunesmith.ops.rl import (
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    sequence_mean,
    zero_advantage_groups,
)
from tunesmith.rollout.rewards import Scored
from tunesmith.rollout.sequences import Completion, collate_sequences
from tunesmith.rollout.step import RLObjective, gathered

__all__ = ["GENERATES", "NAME", "GrpoObjective", "build_data", "collate", "loss_module", "prepare", "save_outputs",
           "wrap_model"]

GENERATES = True
NAME = "grpo"

collate = collate_sequences
save_outputs = save_lm_outputs
wrap_model = keep_model
prepare = nothing_to_prepare


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Prompt rows (any prompt-bearing format); their other fields go to the reward functions."""
    return build_rl_data(cfg, tokenizer, source)


def loss_module(model: nn.Module, cfg: Config, tokenizer) -> nn.Module:
    """The GRPO objective on `model` (the policy)."""
    return GrpoObjective(model, model, cfg, tokenizer)


class GrpoObjective(RLObjective):
    """GRPO: group-relative advantages, clipped ratio, KL to the reference; forward(**batch) is the update's loss."""

    def measures_old_logps(self) -> bool:
        """With one update per step the ratio is exactly 1 at the update, so the update's own log-probs, detached,
        are the old ones: the rollout pass is skipped (one forward fewer per step)."""
        return not (self.rl.update_epochs == 1 and self.rl.minibatch_size is None)

    def advantages(self, seqs: list[Completion], scored: Scored, group_size: int,
                   info: DistInfo | None = None) -> tuple[list[Completion], dict[str, float]]:
        """Group-relative advantages (a group is on one rank); groups with all-equal rewards are dropped from the
        update (their advantages are 0)."""
        rewards = torch.tensor(scored.total, dtype=torch.float64)
        adv = group_advantages(rewards, group_size, scale_by_std=self.cfg.grpo.scale_rewards).tolist()
        zero = zero_advantage_groups(rewards, group_size)
        kept = []
        for s in seqs:
            s.token_fields["advantages"] = [adv[s.index]] * len(s.completion_ids)
            if not zero[s.index // group_size]:
                kept.append(s)
        every_group = gathered(zero.double(), info)[0]  # (groups of every rank,)
        return kept, {"frac_zero_adv_groups": float(every_group.sum()) / every_group.numel()}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens (token normalisation) or completions (sequence and constant normalisation)."""
        if self.cfg.grpo.loss_normalization == "token":
            return count_targets(batch["labels"])
        return int(batch["completion_index"].numel())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        seq_index: torch.Tensor,
        completion_index: torch.Tensor,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the GRPO loss over what `count` counts, that count, and statistic sums."""
        selected, targets, positions = labelled_states(self._decoder, input_ids, labels, position_ids)
        own_old = old_logps is None
        if own_old:  # one update per step: the policy that sampled is the one being updated
            # the entropy is logged from this pass, from the log-probs' own chunks of logits where the head allows
            logps, entropy = chunked_token_logps_entropy(selected, targets, self._head)  # (tokens,) each
            old_logps = logps.detach()
        else:
            logps = chunked_token_logps(selected, targets, self._head)  # (tokens,)
        per_token, clipped = clipped_policy_loss(logps, old_logps, advantages, self.rl.clip_eps)
        token_stats = {"clip_frac": clipped.float()}
        if ref_logps is not None and self.rl.kl_coef > 0:
            kl = kl_k3(logps, ref_logps)
            per_token = per_token + self.rl.kl_coef * kl
            if own_old:
                token_stats["kl"] = kl.detach()
        if own_old:
            token_stats["entropy"] = entropy
        mode = self.cfg.grpo.loss_normalization
        if mode == "token":
            loss_sum = per_token.sum()
            stats = {k: v.sum() for k, v in token_stats.items()}
        else:
            owner, n = token_owner(seq_index, positions), num_sequences(seq_index)
            if mode == "sequence":
                loss_sum = sequence_mean(per_token, owner, n).sum()
            else:  # constant: every completion counts as if it had max_new_tokens tokens
                loss_sum = per_token.sum() / self.rl.max_new_tokens
            stats = {k: sequence_mean(v, owner, n).sum() for k, v in token_stats.items()}
        count = torch.tensor(float(self.count({"labels": labels, "completion_index": completion_index})))
        return loss_sum, count, stats
