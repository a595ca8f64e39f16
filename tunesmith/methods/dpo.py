"""Direct preference optimisation: learn from chosen/rejected pairs without a reward model.

The losses (DPO, conservative DPO, IPO, SimPO, ORPO) are pure functions in `tunesmith.ops.preference`.
The reference model is the policy with its LoRA adapters disabled (never a second copy); with full
fine-tuning it is a frozen copy of the starting weights, or nothing at all with `dpo.precompute_ref`,
which scores every pair with the reference once before the first step.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import Config, DpoConfig
from tunesmith.core.contract import Objective
from tunesmith.core.next_token import answer_logps
from tunesmith.data import TokenizedData
from tunesmith.data.preference import collate_pairs, count_pairs
from tunesmith.methods import build_pair_data, keep_model, save_lm_outputs
from tunesmith.model.parts import decoder_and_head, frozen_copy, reference_model, unwrap
from tunesmith.ops import preference as losses
from tunesmith.ops.preference import sft_term

__all__ = ["GENERATES", "NAME", "build_data", "collate", "loss_module", "prepare", "save_outputs", "wrap_model"]

GENERATES = True
NAME = "dpo"
REFERENCE_FREE = ("simpo", "orpo")

collate = collate_pairs
save_outputs = save_lm_outputs
wrap_model = keep_model


def build_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Preference pairs rendered with the chat template, answers scored, pairs packed whole."""
    return build_pair_data(cfg, tokenizer, source)


def loss_module(model: nn.Module, cfg: Config, tokenizer=None) -> nn.Module:
    """The configured DPO-family loss on `model`, with its reference."""
    needs_ref = cfg.dpo.loss not in REFERENCE_FREE
    frozen = None
    if needs_ref and not cfg.dpo.precompute_ref and not hasattr(model, "disable_adapter"):
        frozen = frozen_copy(model)  # full fine-tuning: the weights at step 0
    return DpoLoss(model, cfg.dpo, frozen_reference=frozen)


def prepare(loss: DpoLoss, data: TokenizedData, cfg: Config, info) -> None:
    """With dpo.precompute_ref, score every pair with the reference now, so training never runs it."""
    if not cfg.dpo.precompute_ref or not loss.needs_reference:
        return
    from tqdm import tqdm

    was_training = loss.training
    loss.eval()
    rows = data.rows
    step = cfg.train.batch_size
    for start in tqdm(range(0, len(rows), step), desc="reference log-probs", unit="batch", disable=not info.is_main):
        chunk = rows[start : start + step]
        batch = {k: v.to(info.device) for k, v in collate_pairs(chunk, loss.pad_id).items()}
        ref = loss.reference_logps(batch).tolist()
        for row in chunk:
            n = len(row.seq_lens)
            row.ref_logps, ref = ref[:n], ref[n:]
    loss.train(was_training)


class DpoLoss(Objective):
    """forward(**pair batch) -> (sum of pair losses, number of pairs, sums of the logged statistics)."""

    reports_perplexity = False
    count = staticmethod(count_pairs)

    def __init__(self, model: nn.Module, cfg: DpoConfig, frozen_reference: nn.Module | None = None,
                 chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.chunk_size = chunk_size
        self._decoder, self._head = decoder_and_head(model)
        self.needs_reference = cfg.loss not in REFERENCE_FREE
        self.pad_id = getattr(unwrap(model).config, "pad_token_id", None) or 0
        # kept out of the module tree: not trained, not checkpointed, not seen by DDP
        self._frozen = [frozen_reference] if frozen_reference is not None else []

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer log-probs of every sequence under the reference model: (seqs,)."""
        with reference_model(self.model, self._frozen[0] if self._frozen else None) as (decoder, head):
            sums, _ = answer_logps(decoder, head, batch["input_ids"], batch["labels"], batch["position_ids"],
                                   batch["seq_index"], self.chunk_size)
        return sums.float()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        seq_index: torch.Tensor,
        margins: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the pair losses of a batch, its number of pairs, and statistic sums to log."""
        logps, num_tokens = answer_logps(self._decoder, self._head, input_ids, labels, position_ids, seq_index,
                                         self.chunk_size)  # (seqs,), (seqs,)
        chosen, rejected = logps[0::2], logps[1::2]  # (pairs,)
        chosen_mean, rejected_mean = chosen / num_tokens[0::2], rejected / num_tokens[1::2]
        c = self.cfg
        if self.needs_reference:
            if ref_logps is None:
                ref_logps = self.reference_logps(
                    {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_index": seq_index}
                )
            ref_chosen, ref_rejected = ref_logps[0::2], ref_logps[1::2]
            if c.loss == "sigmoid":
                pair_losses = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta)
            elif c.loss == "cdpo":
                pair_losses = losses.cdpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta, c.label_smoothing)
            else:
                pair_losses = losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta)
            reward_chosen = c.beta * (chosen - ref_chosen).detach()
            reward_rejected = c.beta * (rejected - ref_rejected).detach()
        else:
            if c.loss == "simpo":
                pair_losses = losses.simpo_loss(chosen_mean, rejected_mean, c.beta, c.simpo_gamma)
                scale = c.beta
            else:
                pair_losses = losses.orpo_loss(chosen_mean, rejected_mean, c.orpo_lambda)
                scale = c.orpo_lambda
            reward_chosen, reward_rejected = scale * chosen_mean.detach(), scale * rejected_mean.detach()
        if c.nll_weight > 0 and c.loss != "orpo":  # ORPO has its own SFT term
            pair_losses = pair_losses + c.nll_weight * sft_term(chosen_mean)
        stats = {
            "rewards/chosen": reward_chosen.sum(),
            "rewards/rejected": reward_rejected.sum(),
            "rewards/accuracy": (reward_chosen > reward_rejected).float().sum(),
            "rewards/margin": (reward_chosen - reward_rejected).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return pair_losses.sum(), torch.tensor(chosen.numel(), device=logps.device), stats
