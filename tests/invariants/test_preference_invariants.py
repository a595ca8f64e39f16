"""Equalities the preference methods rest on: one packed forward over many pairs equals each sequence
run alone, and the LoRA reference is exactly the base model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import write_jsonl
from tunesmith.config import DpoConfig, LoraConfig
from tunesmith.core.next_token import answer_logps
from tunesmith.data.preference import build_pairs, collate_pairs
from tunesmith.methods.dpo import DpoLoss
from tunesmith.model import apply_lora
from tunesmith.model.parts import decoder_and_head
from tunesmith.ops.losses import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(tmp: Path, tok, packing: bool):
    rows = [{"prompt": f"Question {i}: what follows {i}?", "chosen": f"{i + 1}, surely" + "!" * i, "rejected": f"{i - 1}"}
            for i in range(7)]
    return build_pairs(str(write_jsonl(tmp / "pairs.jsonl", rows)), tok, max_length=96, packing=packing).rows


def _alone_logps(model, ids: list[int], labels: list[int]) -> float:
    """Answer log-prob of one sequence from a plain forward over it alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (seq, vocab)
    logps = torch.log_softmax(logits, -1)
    return sum(logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


def test_one_packed_forward_equals_each_sequence_alone(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = _pairs(tmp_path, tiny_tokenizer, packing=True)
    assert len(rows) < 7  # several pairs share a row
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        sums, counts = answer_logps(decoder, head, batch["input_ids"], batch["labels"], batch["position_ids"],
                                    batch["seq_index"])
    expected = []
    for row in rows:
        start = 0
        for n in row.seq_lens:
            expected.append(_alone_logps(model, row.input_ids[start : start + n], row.labels[start : start + n]))
            start += n
    assert sums.shape == (14,) and (counts > 0).all()
    assert torch.allclose(sums.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_lora_reference_is_the_base_model_and_dpo_starts_at_ln2(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, dropout=0.0))
    # move the adapter away from its zero init so the policy differs from the base
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    loss = DpoLoss(policy, DpoConfig(beta=0.1)).eval()
    b = collate_pairs(_pairs(tmp_path, tiny_tokenizer, True), tiny_tokenizer.pad_token_id)
    ref = loss.reference_logps(b)
    decoder, head = decoder_and_head(base)
    with torch.no_grad():
        base_logps, _ = answer_logps(decoder, head, b["input_ids"], b["labels"], b["position_ids"], b["seq_index"])
        total, n, stats = loss(**b)
    assert torch.allclose(ref, base_logps, atol=1e-5)
    assert abs(total.item() / n.item() - math.log(2)) > 1e-3  # the moved adapter changed the policy
    assert all(p.requires_grad for name, p in policy.named_parameters() if "lora_" in name)  # adapters back on
    # with the reference given as the policy's own log-probs, the loss is exactly ln 2
    with torch.no_grad():
        own, _ = answer_logps(*decoder_and_head(policy), b["input_ids"], b["labels"], b["position_ids"], b["seq_index"])
        total, n, _ = loss(**b, ref_logps=own)
    assert total.item() / n.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_two_ranks_equal_one_rank_with_an_eval_shard_left_empty(tmp_path: Path, tiny_model_dir: Path) -> None:
    """2 ranks x 4 pairs equal 1 rank x 8 pairs; eval has one pair, so rank 1's eval shard is empty and must not hang."""
    import subprocess
    import sys

    import yaml

    import tunesmith
    from tests.faults.common import child_env
    from tests.helpers import WORDS, final_weights, run_config

    rows = [{"prompt": f"Tell me about {w}", "chosen": f"{w} is good", "rejected": f"{w} is bad"} for w in WORDS[:16]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    held = write_jsonl(tmp_path / "eval.jsonl", rows[:1])
    configs = {}
    for name, batch in (("one", 8), ("two", 4)):
        cfg = run_config(tiny_model_dir, data, tmp_path / name, max_steps=3, batch_size=batch, lr=1e-3, max_length=64,
                         eval_every=1)
        cfg.update(method="dpo")
        cfg["data"]["eval"] = str(held)
        cfg["train"]["packing"] = False  # a row per pair, so both layouts see the same pairs per step
        configs[name] = cfg
    tunesmith.train(configs["one"])
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(configs["two"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tunesmith.cli", "train", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    evals = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [e["eval_rewards/accuracy"] for e in evals if "eval_loss" in e] != []
