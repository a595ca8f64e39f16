"""Reward models: a causal LM with a scalar head on the final hidden state of a conversation's last token.

Saved as an HF `*ForSequenceClassification` model (num_labels=1, LoRA merged) in `reward_model/`, it loads
back with `AutoModelForSequenceClassification.from_pretrained(path)` and scores exactly as in training; a
LoRA run also keeps its adapter, with the head beside it in `reward_head.safetensors`. Training the head is
the `reward` method's (tunesmith.methods.reward); loading and scoring are here, for eval and RL alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tunesmith.data.chat import has_chat_template, render_chat, render_raw
from tunesmith.errors import TunesmithError
from tunesmith.model.export import atomic_dir
from tunesmith.model.loading import default_device
from tunesmith.model.lora import merged_state_dict
from tunesmith.model.parts import scalar_head, unwrap

REWARD_DIR = "reward_model"
HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A causal LM (plain or with LoRA adapters) and a linear head from its last hidden state to one score."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        config = unwrap(lm).config.get_text_config()
        self.score = scalar_head(lm, bias=False)
        std = getattr(config, "initializer_range", None) or 1 / math.sqrt(config.hidden_size + 1)
        nn.init.normal_(self.score.weight, std=std)


@torch.no_grad()
def save_reward_model(model: RewardModel, tokenizer, out_dir: Path) -> Path:
    """Save LM (adapters merged) + head as an HF `*ForSequenceClassification` model with num_labels=1."""
    from transformers import AutoModelForSequenceClassification

    lm = model.lm
    base = unwrap(lm)
    state = merged_state_dict(lm) if hasattr(lm, "get_base_model") else base.state_dict()
    # a quantized base (load.quantize) is saved de-quantized: its merged state dict holds plain weights
    config = base.config.__class__.from_dict({k: v for k, v in base.config.to_dict().items() if k != "quantization_config"})
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


def save_reward_head(model: RewardModel, adapter_dir: Path) -> Path:
    """Write the reward head beside a saved LoRA adapter, as `HEAD_FILE` (key `score.weight`)."""
    tmp = adapter_dir / f".{HEAD_FILE}.tmp"
    save_file({"score.weight": model.score.weight.detach().cpu().contiguous()}, str(tmp))
    os.replace(tmp, adapter_dir / HEAD_FILE)
    return adapter_dir / HEAD_FILE


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
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    model = model.to(device if device is not None else default_device())
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation (messages ending with the assistant's answer)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = []
    for messages in conversations:
        if has_chat_template(tokenizer):
            text = render_chat(messages, tokenizer, False, f"conversation {len(sequences)}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
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
