"""Batched greedy generation from chat prompts, and simple answer metrics."""

from __future__ import annotations

import json

import torch
from tqdm import tqdm


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Chat-template each conversation (ending in a user turn) with the assistant prompt appended."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions for chat prompts, batched with left padding and the KV cache."""
    texts = render_prompts(tokenizer, conversations)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(texts), desc=desc, unit="prompt", dynamic_ncols=True, leave=False)
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
            bar.update(len(new))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in outputs]


def exact_match(output: str, reference: str) -> float:
    """1.0 when the two strings are equal up to surrounding and repeated whitespace."""
    return float(" ".join(output.split()) == " ".join(reference.split()))


def json_match(output: str, reference: str) -> float:
    """1.0 when both parse as JSON and are equal."""
    try:
        return float(json.loads(output) == json.loads(reference))
    except ValueError:
        return 0.0


def json_in_output_match(output: str, reference: str) -> float:
    """Lenient JSON equality: the first `{...}` object found anywhere in the output equals the reference."""
    decoder = json.JSONDecoder()
    start = output.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(output, start)
        except ValueError:
            start = output.find("{", start + 1)
            continue
        try:
            return float(value == json.loads(reference))
        except ValueError:
            return 0.0
    return 0.0
