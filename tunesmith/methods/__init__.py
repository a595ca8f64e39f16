"""Training methods: each file holds what is its own (data, objective, outputs); the loop is shared.

Every method module satisfies `tunesmith.core.contract.Method` (NAME, GENERATES, build_data, collate,
wrap_model, loss_module, prepare, save_outputs), and its `loss_module` returns a
`tunesmith.core.contract.Objective`. Where the maths of each lives:

  sft, pretrain  methods/sft.py, methods/pretrain.py say which tokens carry labels (`LABELS`);
                 the loss is core/next_token.py's CausalLMLoss (ops/losses.py's chunked cross-entropy)
  reward         methods/reward.py (RewardLoss), ops/preference.py's bradley_terry_loss;
                 the model with its head is model/reward_model.py
  dpo            methods/dpo.py (DpoLoss), the DPO-family losses in ops/preference.py
  grpo, ppo      methods/grpo.py, methods/ppo.py (advantages and the update's loss), the step they
                 share in rollout/step.py, the maths in ops/rl.py
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from tunesmith.config import Config
    from tunesmith.core.contract import Method, Objective
    from tunesmith.core.distributed import DistInfo
    from tunesmith.data import TokenizedData
    from tunesmith.data.dataset import Labels


def get_method(name: str) -> Method:
    """The module implementing method `name` (one of config's `method` values)."""
    from tunesmith.methods import dpo, grpo, ppo, pretrain, reward, sft

    modules: dict[str, ModuleType] = {m.NAME: m for m in (sft, pretrain, reward, dpo, grpo, ppo)}
    return modules[name]  # type: ignore[return-value]  # a module that satisfies the Method protocol


def keep_model(model: nn.Module, cfg: Config) -> nn.Module:
    """`wrap_model` of a method that trains the LM as it is."""
    return model


def nothing_to_prepare(objective: Objective, data: TokenizedData, cfg: Config, info: DistInfo) -> None:
    """`prepare` of a method with no work before its first step."""


def build_lm_data(cfg: Config, tokenizer, source: str, labels: Labels) -> TokenizedData:
    """Token rows for a next-token method (sft, pretrain) from the data and train sections of `cfg`."""
    from tunesmith.data import build_dataset

    return build_dataset(
        source,
        tokenizer,
        labels=labels,
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
    from tunesmith.rollout.rewards import RewardSet
    from tunesmith.rollout.sequences import build_prompts

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
