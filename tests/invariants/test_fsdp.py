"""train.distributed: fsdp on the gloo backend: 2 ranks = 1 rank, a killed run resumes on another number of ranks,
and two "nodes" of one rank each = one node of two ranks."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from tests.conftest import write_jsonl
from tests.faults.common import KILLED_AT_STEP, child_env
from tests.helpers import run_config, write_chat

REPO = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 6, 3  # checkpoints at steps 2 and 4; a kill after step 3 resumes from step 2



def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _train(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _config(tmp: Path, model_dir: Path, name: str, batch_size: int, *, method: str = "sft", lora: bool = False,
            data: Path | None = None, eval_data: Path | None = None) -> Path:
    cfg = run_config(model_dir, data or write_chat(tmp, 24), tmp / name, max_steps=STEPS, batch_size=batch_size,
                     lr=1e-3, max_length=64, save_every=2, distributed="fsdp")
    cfg["method"] = method
    if eval_data is not None:  # unpacked, 9 rows: on 2 ranks of batch 4, rank 0 runs 2 eval batches, rank 1 one
        cfg["data"]["eval"] = str(eval_data)
        cfg["train"].update(packing=False, eval_every=3)
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"} if lora else None
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    for rel in ("adapter/adapter_model.safetensors", "model/model.safetensors", "reward_model/model.safetensors"):
        if (run_dir / rel).exists():
            return load_file(str(run_dir / rel))
    raise AssertionError(f"no saved weights in {run_dir}")


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def _assert_same(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for key in ("loss", "eval_loss"):
        torch.testing.assert_close(torch.tensor(_losses(a, key)), torch.tensor(_losses(b, key)), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Uninterrupted full fine-tuning runs under fsdp: one rank (batch 8) and two ranks (batch 4 each)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one, two = _config(tmp, tiny_model_dir, "one", 8), _config(tmp, tiny_model_dir, "two", 4)
    tunesmith.train(str(one))
    _train(_torchrun("-m", "tunesmith.cli", "train", str(two)))
    return {"tmp": tmp, "one": tmp / "one", "two": tmp / "two"}


def test_two_ranks_equal_one_rank(baseline: dict[str, Path]) -> None:
    _assert_same(baseline["one"], baseline["two"], atol=1e-5)
    assert len(_losses(baseline["two"])) == STEPS
    # the checkpoint really is sharded: one DCP file per rank, each with part of the weights and optimizer
    ckpt = baseline["two"] / "checkpoints/step-0000004"
    assert json.loads((ckpt / "checkpoint.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_damaged_sharded_checkpoint_is_never_resumed(baseline: dict[str, Path], tmp_path: Path) -> None:
    from tunesmith.core import checkpoint as ckpt

    good = baseline["two"] / "checkpoints/step-0000004"
    assert ckpt.damage(good) is None
    flipped, lost = shutil.copytree(good, tmp_path / "step-0000004"), shutil.copytree(good, tmp_path / "lost")
    shard = flipped / "dcp/__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "dcp/__1_0.distcp does not match its checksum" in (ckpt.damage(flipped) or "")
    (lost / "dcp/__0_0.distcp").unlink()
    assert "dcp/__0_0.distcp is missing" in (ckpt.damage(lost) or "")


def test_resume_on_other_ranks_needs_the_same_global_batch(baseline: dict[str, Path], tmp_path: Path) -> None:
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.run import check_run_dir

    run = shutil.copytree(baseline["one"], tmp_path / "one")  # checkpoints of 1 rank with batch_size 8
    (run / "summary.json").unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["output_dir"] = str(run)
    assert check_run_dir(load_config(cfg, ["train.batch_size=4"]), world_size=2)
    assert check_run_dir(load_config(cfg, ["train.batch_size=4", "train.grad_accum=2"]), world_size=1)
    with pytest.raises(TunesmithError) as err:
        check_run_dir(load_config(cfg, ["train.batch_size=4"]), world_size=1)
    assert "train.batch_size: checkpoint has 8, now 4" in str(err.value)
    assert "written by 1, now 1" not in str(err.value)
    with pytest.raises(TunesmithError) as err:
        check_run_dir(load_config(cfg), world_size=2)
    assert "the checkpoint was written by 1, now 2" in str(err.value)


def _assert_resumed(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def _killed(cmd: list[str], run_dir: Path) -> None:
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints/step-0000002/checkpoint.json").is_file()


def test_killed_two_rank_run_resumes_on_one_rank(baseline: dict[str, Path], tiny_model_dir: Path) -> None:
    tmp = baseline["tmp"]
    cfg = _config(tmp, tiny_model_dir, "two_then_one", 4)
    _killed(_torchrun(KILLED_AT_STEP, str(cfg), str(KILL_AT)), tmp / "two_then_one")
    # on one rank the same global batch is 8 rows: batch_size may change on resume, the global batch may not
    tunesmith.train(str(cfg), ["train.batch_size=8"])
    _assert_resumed(tmp / "two_then_one")
    _assert_same(baseline["two"], tmp / "two_then_one", atol=1e-6)


def test_killed_one_rank_run_resumes_on_two_ranks(baseline: dict[str, Path], tiny_model_dir: Path) -> None:
    tmp = baseline["tmp"]
    cfg = _config(tmp, tiny_model_dir, "one_then_two", 8)
    _killed([sys.executable, KILLED_AT_STEP, str(cfg), str(KILL_AT)],
            tmp / "one_then_two")
    _train(_torchrun("-m", "tunesmith.cli", "train", str(cfg), "train.batch_size=4"))
    _assert_resumed(tmp / "one_then_two")
    _assert_same(baseline["one"], tmp / "one_then_two", atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node(baseline: dict[str, Path], tiny_model_dir: Path) -> None:
    tmp = baseline["tmp"]
    cfg = _config(tmp, tiny_model_dir, "two_nodes", 4)
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "tunesmith.cli", "train", str(cfg)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    _assert_same(baseline["two"], tmp / "two_nodes", atol=1e-6)


@pytest.mark.parametrize(("method", "lora"), [("dpo", True), ("reward", False)])
def test_preference_methods_two_ranks_equal_one_rank(tmp_path: Path, tiny_model_dir: Path, method: str,
                                                     lora: bool) -> None:
    rows = [{"prompt": f"Say {i}", "chosen": f"{i} {i}", "rejected": f"{i + 1}"} for i in range(25)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows[:16])
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[16:])
    one = _config(tmp_path, tiny_model_dir, "one", 8, method=method, lora=lora, data=data, eval_data=held_out)
    two = _config(tmp_path, tiny_model_dir, "two", 4, method=method, lora=lora, data=data, eval_data=held_out)
    tunesmith.train(str(one))
    _train(_torchrun("-m", "tunesmith.cli", "train", str(two)))
    _assert_same(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert len(_losses(tmp_path / "two", "eval_loss")) == 2  # after steps 3 and 6


def test_rl_methods_are_refused_under_fsdp() -> None:
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    cfg = {"method": "grpo", "model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
           "rl": {"rewards": ["exact_match"]}, "train": {"distributed": "fsdp"}}
    with pytest.raises(TunesmithError, match="train.distributed: fsdp covers sft, pretrain, reward and dpo"):
        load_config(cfg)
