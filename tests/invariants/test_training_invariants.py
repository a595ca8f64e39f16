"""Equalities the loop must keep: accumulation ≡ larger batch, 2 ranks ≡ 1 rank, resume ≡ uninterrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tunesmith
from tests.faults.common import KILLED_AT_STEP, child_env
from tests.helpers import final_weights, run_config, write_chat


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_accumulation_and_split_passes_equal_larger_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_chat(tmp_path, 24)
    runs = {}
    # big: 8 rows in one pass; accum: 4 micro-batches of 2; split: 8 rows run one pass per row (forward_tokens)
    for name, batch, accum, passes in (("big", 8, 1, 10**6), ("accum", 2, 4, 10**6), ("split", 8, 1, 64)):
        cfg = run_config(tiny_model_dir, data, tmp_path / name, max_steps=4, batch_size=batch, grad_accum=accum,
                         lr=1e-3, max_length=64, forward_tokens=passes)
        cfg["lora"] = None
        tunesmith.train(cfg)
        runs[name] = final_weights(tmp_path / name)
    _assert_close(runs["big"], runs["accum"], atol=1e-5)
    _assert_close(runs["big"], runs["split"], atol=1e-5)
    moved = final_weights(tmp_path / "big")
    assert any(not torch.equal(v, runs["accum"][k]) or v.abs().sum() > 0 for k, v in moved.items())


def test_two_ranks_equal_one_rank(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_chat(tmp_path, 24)
    one = run_config(tiny_model_dir, data, tmp_path / "one", max_steps=4, batch_size=8, lr=1e-3, max_length=64)
    two = run_config(tiny_model_dir, data, tmp_path / "two", max_steps=4, batch_size=4, lr=1e-3, max_length=64)
    for cfg in (one, two):
        cfg["lora"]["dropout"] = 0.0
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    tunesmith.train(one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tunesmith.cli", "train", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=1e-5)


def _train_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "train", str(cfg_path)]


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Killed right after the checkpoint of step 6, and one step later, when step 7 is logged but not checkpointed
    # (its metrics line must give way to the resumed run's). Both resume from step 6.
    kill_at = {"killed": 6, "killed_later": 7}
    data = write_chat(tmp_path, 48)
    configs = {}
    for name in ("straight", *kill_at):
        cfg = run_config(tiny_model_dir, data, tmp_path / name, max_steps=40, batch_size=8, lr=2e-3,
                         max_length=256, save_every=2, keep_checkpoints=2)
        cfg["lora"]["dropout"] = 0.1  # dropout draws random numbers: resume must restore the generators
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))

    straight = subprocess.run(_train_cmd(configs["straight"]), env=child_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = final_weights(tmp_path / "straight")

    for name, step in kill_at.items():
        killed = subprocess.run([sys.executable, str(KILLED_AT_STEP), str(configs[name]), str(step)], env=child_env(),
                                capture_output=True, text=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not (tmp_path / name / "summary.json").exists(), "the run finished before it could be killed"
        steps = [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, step + 1))
        assert (tmp_path / name / "checkpoints/step-0000006/checkpoint.json").is_file()

        resumed = subprocess.run(_train_cmd(configs[name]), env=child_env(), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["resumed_from"] == 6 and summary["steps"] == 40
        b = final_weights(tmp_path / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
        steps = [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) == len(set(steps)) == 40


@pytest.mark.parametrize("junk", ["tmp", "no_manifest"])
def test_half_written_checkpoint_is_ignored(tmp_path: Path, tiny_model_dir: Path, junk: str) -> None:
    data = write_chat(tmp_path, 16)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", max_steps=4, save_every=2)
    tunesmith.train(cfg)
    (tmp_path / "run/summary.json").unlink()
    ckpts = tmp_path / "run/checkpoints"
    bogus = ckpts / (".tmp-step-0000003" if junk == "tmp" else "step-0000003")
    bogus.mkdir()
    (bogus / "trainable.safetensors").write_bytes(b"garbage")
    result = tunesmith.train(cfg)
    assert result.loop.resumed_from == 2
