"""Reward models: a scalar head on the causal LM, trained on preference pairs with the Bradley-Terry loss.

The reward of a conversation is the head applied to the final hidden state of its last token, as
HF `*ForSequenceClassification` reads it, so the saved `reward_model/` folder loads back with
`AutoModelForSequenceClassification.from_pretrained(path)` (num_labels=1) and scores exactly as in
training. LoRA runs also keep `adapter/` (PEFT) with the head beside it in `reward_head.safetensors`.
The model, its saving, loading and scoring live in `tunesmith.model.reward_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.config import Config, RewardConfig
from tunesmith.core.contract import Objective
from tunesmith.core.next_token import last_positions
from tunesmith.data import TokenizedData
from tunesmith.data.preference import collate_pairs, count_pairs
from tunesmith.methods import build_pair_data, nothing_to_prepare
from tunesmith.model.export import save_adapter
from tunesmith.model.parts import decoder_and_head, packed_hidden, unwrap
from tunesmith.model.reward_model import REWARD_DIR, RewardModel, save_reward_head, save_reward_model
from tunesmith.ops.preference import bradley_terry_loss

__all__ = ["GENERATES", "NAME", "build_data", "collate", "loss_module", "prepare", "save_outputs", "wrap_model"]

GENERATES = False
NAME = "reward"

collate = collate_pairs
prepare = nothing_to_prepare


def wrap_model(model: nn.Module, cfg: Config) -> RewardModel:
    """The LM plus a fresh reward head (always trained, under LoRA too)."""
    lm = unwrap(model)
    head, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        # a reward model never uses the LM head; left trainable, DDP would wait for its gradient forever
        head.weight.requires_grad_(False)
    return RewardModel(model)


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Preference pairs; trailing pad tokens are dropped so the reward is read where HF reads it."""
    return build_pair_data(cfg, tokenizer, source, trim_pad=True)


def loss_module(model: RewardModel, cfg: Config, tokenizer=None) -> nn.Module:
    """Bradley-Terry loss on the rewards of chosen and rejected answers."""
    return RewardLoss(model, cfg.reward)


class RewardLoss(Objective):
    """forward(**pair batch) -> (sum of pair losses, number of pairs, sums of the logged statistics)."""

    reports_perplexity = False
    count = staticmethod(count_pairs)

    def __init__(self, model: RewardModel, cfg: RewardConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self._decoder, _ = decoder_and_head(model.lm)

    def rewards(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
        """The reward of every sequence in a pair batch: (seqs,)."""
        hidden = packed_hidden(self._decoder, input_ids, position_ids)  # (batch, seq, hidden)
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_positions(seq_index))  # (seqs, hidden)
        return self.model.score(last.float()).squeeze(-1)  # (seqs,)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        seq_index: torch.Tensor,
        margins: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of Bradley-Terry losses of a batch, its number of pairs, and statistic sums to log."""
        rewards = self.rewards(input_ids, position_ids, seq_index)
        chosen, rejected = rewards[0::2], rewards[1::2]  # (pairs,)
        margin = margins if self.cfg.use_margin else torch.zeros_like(margins)
        pair_losses = bradley_terry_loss(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        stats = {
            "accuracy": (diff > 0).float().sum(),
            "margin": diff.sum(),
            "rewards/chosen": chosen.detach().sum(),
            "rewards/rejected": rejected.detach().sum(),
        }
        return pair_losses.sum(), torch.tensor(chosen.numel(), device=rewards.device), stats


# ---------------------------------------------------------------- outputs


def save_outputs(model: RewardModel, tokenizer, cfg: Config, run_dir: Path) -> dict[str, str]:
    """reward_model/ (HF sequence classification, LoRA merged), and adapter/ + head for LoRA runs."""
    outputs = {"reward_model": str(save_reward_model(model, tokenizer, run_dir / REWARD_DIR))}
    if cfg.lora is not None and cfg.output.save_adapter:
        adapter = save_adapter(model.lm, tokenizer, run_dir / "adapter")
        save_reward_head(model, adapter)
        outputs["adapter"] = str(adapter)
    return outputs
