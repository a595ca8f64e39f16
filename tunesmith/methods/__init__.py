"""Training methods: each file holds what is its own (data, loss module, outputs); the loop is shared.

A method module provides:
  NAME; GENERATES (True when the tuned model generates, so the base-vs-tuned report applies);
  build_data(cfg, tokenizer, source) -> TokenizedData;
  collate(rows, pad_id) -> batch;
  loss_module(model, cfg, tokenizer) -> a module whose forward(**batch) returns (loss_sum, count, stats_sums)
      and whose `count(batch)` is what the loss is averaged over;
  save_outputs(model, tokenizer, cfg, run_dir) -> {name: path};
and optionally
  wrap_model(model, cfg) -> the module trained, when it is more than the LM (e.g. the LM plus a head);
  prepare(loss_module, data, cfg, info) -> None: work before the first step (e.g. reference log-probs).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from tunesmith.config import Config
    from tunesmith.data import TokenizedData


def get_method(name: str) -> ModuleType:
    """The module implementing method `name`."""
    from tunesmith.methods import dpo, grpo, ppo, pretrain, reward, sft

    return {"sft": sft, "pretrain": pretrain, "reward": reward, "dpo": dpo, "grpo": grpo, "ppo": ppo}[name]


def build_lm_data(cfg: Config, tokenizer, source: str, method: str) -> TokenizedData:
    """Token rows for a next-token method (sft, pretrain) from the data and train sections of `cfg`."""
    from tunesmith.data import build_dataset

    return build_dataset(
        source,
        tokenizer,
        method=method,
        max_length=cfg.train.max_length,
        packing=cfg.train.packing,
        overflow=cfg.data.overflow,
        format=cfg.data.format,
        split=cfg.data.split,
    )


def build_pair_data(cfg: Config, tokenizer, source: str, *, trim_pad: bool = False) -> TokenizedData:
    """Rows of whole preference pairs (reward, dpo) from the data and train sections of `cfg`."""
    from tunesmith.data.preference import build_pairs

    return build_pairs(
        source,
        tokenizer,
        max_length=cfg.train.max_length,
        packing=cfg.train.packing,
        overflow=cfg.data.overflow,
        split=cfg.data.split,
        trim_pad=trim_pad,
    )


def build_rl_data(cfg: Config, tokenizer, source: str) -> TokenizedData:
    """Prompt rows for grpo and ppo; the rewards are resolved and checked against the rows here, before any run."""
    import torch.distributed as dist

    from tunesmith.errors import TunesmithError
    from tunesmith.rollout.rewards import RewardSet
    from tunesmith.rollout.sequences import build_prompts

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise TunesmithError(f"method {cfg.method} runs on one process for now; start it without torchrun")
    if cfg.lora is not None and cfg.lora.dropout > 0:
        import logging

        logging.getLogger(__name__).warning(
            "lora.dropout=%s: the rollout's log-probs are measured without dropout and the updates run with it, so "
            "the PPO ratio starts away from 1 by noise alone; lora.dropout=0 is usual for %s", cfg.lora.dropout,
            cfg.method)
    data = build_prompts(source, tokenizer, max_length=cfg.train.max_length, max_new_tokens=cfg.rl.max_new_tokens,
                         split=cfg.data.split)
    rewards = RewardSet(cfg.rl.rewards, cfg.rl.reward_weights, cfg.rl.reward_model, cfg.rl.reward_model_weight)
    rewards.check_answers(all(r.fields.get("answer") is not None for r in data.rows), source)
    return data


def save_lm_outputs(model: nn.Module, tokenizer, cfg: Config, run_dir: Path) -> dict[str, str]:
    """The outputs of a method that tunes the LM itself: adapter and/or merged model, or the full model."""
    from tunesmith.model import save_adapter, save_full, save_merged

    outputs: dict[str, str] = {}
    if cfg.lora is not None:
        if cfg.output.save_adapter:
            outputs["adapter"] = str(save_adapter(model, tokenizer, run_dir / "adapter"))
        if cfg.output.merge:
            outputs["merged"] = str(save_merged(model, tokenizer, run_dir / "merged"))
    else:
        outputs["model"] = str(save_full(model, tokenizer, run_dir / "model"))
    return outputs
