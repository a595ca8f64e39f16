"""Reward models: a scalar head on the causal LM, trained on preference pairs with the Bradley-Terry loss.

The reward of a conversation is the head applied to the final hidden state of its last token, as
HF `*ForSequenceClassification` reads it, so the saved `reward_model/` folder loads back with
`AutoModelForSequenceClassification.from_pretrained(path)` (num_labels=1) and scores exactly as in
training. LoRA runs also keep `adapter/` (PEFT) with the head beside it in `reward_head.safetensors`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import Config, RewardConfig
from tunesmith.core.lm_loss import decoder_and_head, last_positions, packed_hidden, unwrap
from tunesmith.data import TokenizedData
from tunesmith.data.preference import collate_pairs, count_pairs
from tunesmith.errors import TunesmithError
from tunesmith.methods import build_pair_data
from tunesmith.ops.preference import bradley_terry_loss

__all__ = [
    "GENERATES", "NAME", "RewardModel", "build_data", "collate", "find_reward_model", "load_reward_model", "loss_module",
    "save_outputs", "score_conversations", "wrap_model",
]

GENERATES = False
NAME = "reward"
REWARD_DIR = "reward_model"
HEAD_FILE = "reward_head.safetensors"

collate = collate_pairs


class RewardModel(nn.Module):
    """A causal LM (plain or with LoRA adapters) and a linear head from its last hidden state to one score."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        config = unwrap(lm).config.get_text_config()
        ref = unwrap(lm).get_output_embeddings().weight
        # float32 even when the LM is bf16: AdamW steps on a bf16 head would round small updates away
        self.score = nn.Linear(config.hidden_size, 1, bias=False, device=ref.device, dtype=torch.float32)
        std = getattr(config, "initializer_range", None) or 1 / math.sqrt(config.hidden_size + 1)
        nn.init.normal_(self.score.weight, std=std)


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


class RewardLoss(nn.Module):
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
    from safetensors.torch import save_file

    from tunesmith.model import save_adapter

    outputs = {"reward_model": str(save_reward_model(model, tokenizer, run_dir / REWARD_DIR))}
    if cfg.lora is not None and cfg.output.save_adapter:
        adapter = save_adapter(model.lm, tokenizer, run_dir / "adapter")
        tmp = adapter / f".{HEAD_FILE}.tmp"
        save_file({"score.weight": model.score.weight.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, adapter / HEAD_FILE)
        outputs["adapter"] = str(adapter)
    return outputs


@torch.no_grad()
def save_reward_model(model: RewardModel, tokenizer, out_dir: Path) -> Path:
    """Save LM (adapters merged) + head as an HF `*ForSequenceClassification` model with num_labels=1."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.model import atomic_dir
    from tunesmith.model.export import _merged_state_dict

    lm = model.lm
    base = unwrap(lm)
    if hasattr(lm, "get_base_model"):
        state = _merged_state_dict(lm)
        if state is None:
            raise TunesmithError("cannot merge this adapter into a reward model; use plain LoRA target modules")
    else:
        state = base.state_dict()
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = 1
    config.architectures = None
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = True
    try:
        seq = AutoModelForSequenceClassification.from_config(config, dtype=base.dtype)
    except ValueError as exc:
        raise TunesmithError(f"this architecture ({type(base).__name__}) has no sequence-classification model in "
                             f"transformers, so the reward model cannot be saved in HF form: {exc}") from None
    prefix = base.base_model_prefix + "."
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = getattr(seq, seq.base_model_prefix).load_state_dict(body, strict=False)
    if missing or unexpected:
        raise TunesmithError(
            f"cannot save the reward model of {type(base).__name__} as {type(seq).__name__}: its weights do not "
            f"match (missing {missing[:3]}, unexpected {unexpected[:3]}); the adapter and head are still saved "
            "with output.save_adapter"
        )
    seq.score.weight.copy_(model.score.weight.detach().to(seq.score.weight.dtype).cpu())
    with atomic_dir(out_dir) as tmp:
        seq.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def find_reward_model(path: str | Path) -> Path:
    """The folder of a saved reward model: `path`/reward_model/ for a run folder, else `path` itself."""
    folder = Path(path)
    if (folder / REWARD_DIR).is_dir():
        folder = folder / REWARD_DIR
    config = folder / "config.json"
    if not config.is_file() or "ForSequenceClassification" not in config.read_text(encoding="utf-8"):
        raise TunesmithError(
            f"--reward-model {str(path)!r}: no reward model there; give the folder of a finished `method: reward` "
            f"run (it holds {REWARD_DIR}/) or the {REWARD_DIR}/ folder itself"
        )
    return folder


def load_reward_model(path: str | Path, device: torch.device | str | None = None):
    """(model, tokenizer) of a saved reward model: a run folder holding reward_model/, or that folder itself."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = find_reward_model(path)
    from tunesmith.model import default_device

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    model = model.to(device if device is not None else default_device())
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation (messages ending with the assistant's answer)."""
    from tunesmith.data.chat import has_chat_template, render_chat

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = []
    for messages in conversations:
        if has_chat_template(tokenizer):
            text = render_chat(messages, tokenizer, False, f"conversation {len(sequences)}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            from tunesmith.data.chat import render_raw

            ids, _ = render_raw(messages[0]["content"], messages[-1]["content"], tokenizer)
        while len(ids) > 1 and ids[-1] == pad:
            ids = ids[:-1]
        sequences.append(ids)
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        scores += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores
