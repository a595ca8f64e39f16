"""QLoRA (load.quantize) and DoRA / rsLoRA on the tiny model: training learns, resume is bit-exact, and merged
outputs are plain models that compute what the adapter did."""

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
from tunesmith.config import LoadConfig, LoraConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.model import apply_lora, load_model, load_tokenizer, resolve_model, save_merged

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 5, 9, 40, 77, 120, 3, 200], [1, 300, 17, 2, 88, 41, 60, 7]])
# merged/ is W_dequantized + B·A in float32, the quantized layer computes x·W_dequantized^T + x·A^T·B^T:
# the same sums in another order (nf4); int8 layers on the CPU round their inputs to float16 first.
MERGE_ATOL = {"nf4": 1e-4, "int8": 5e-2}

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (batch, seq, vocab)


def _plain(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_learns_and_merged_output_is_a_plain_model(tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    import peft

    data = write_chat(tmp_path, 16)
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", max_steps=30, lr=2e-2)
    cfg["load"] = {"quantize": kind}
    cfg["data"]["test"] = str(data)  # generation on the quantized model, before and after training
    cfg["eval"] = {"max_rows": 4, "max_new_tokens": 4, "metrics": ["exact_match"]}
    result = tunesmith.train(cfg)

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 0.3, losses
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert any(f"de-quantized from {kind} to float32" in note for note in summary["notes"]), summary["notes"]
    assert (tmp_path / "run/report/report.html").is_file()

    merged_dir = tmp_path / "run/merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = _plain(merged_dir)
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32
               for m in merged.modules() if isinstance(m, torch.nn.Linear))

    load = LoadConfig(quantize=kind)
    base = load_model(resolve_model(str(tiny_model_dir), load), load, device=CPU)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "run/adapter")).eval()
    plain_base = _plain(tiny_model_dir)
    merged_logits, adapter_logits = _logits(merged), _logits(adapted)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=MERGE_ATOL[kind], rtol=0)
    # the adapter moved the model: the comparison above is not one of two untrained copies
    assert (merged_logits - _logits(plain_base)).abs().max() > 100 * MERGE_ATOL["nf4"]
    assert result.outputs["merged"] == str(merged_dir)


def test_qlora_resume_after_sigkill_is_bit_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_chat(tmp_path, 24)
    configs = {}
    for name in ("straight", "killed"):
        cfg = run_config(tiny_model_dir, data, tmp_path / name, max_steps=8, batch_size=8, lr=2e-3, save_every=2)
        cfg["load"] = {"quantize": "nf4"}
        cfg["lora"]["dropout"] = 0.1  # dropout draws random numbers: resume must restore the generators
        cfg["output"] = {"merge": False}
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    train = [sys.executable, "-m", "tunesmith.cli", "train"]

    tunesmith.train(configs["straight"])  # here, on one thread as the children below (one_thread)
    killed = subprocess.run([sys.executable, str(KILLED_AT_STEP), str(configs["killed"]), "5"], env=child_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "killed/checkpoints/step-0000004/checkpoint.json").is_file()
    resumed = subprocess.run([*train, str(configs["killed"])], env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "killed/summary.json").read_text())["resumed_from"] == 4

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_merged_output_equals_the_adapter(tmp_path: Path, tiny_model_dir: Path, quantize: str | None) -> None:
    import peft

    load = LoadConfig(quantize=quantize)
    resolved = resolve_model(str(tiny_model_dir), load)
    model = apply_lora(load_model(resolved, load, device=CPU), LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # A, B and DoRA's magnitude all move
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.eval()
    assert any(isinstance(m, peft.tuners.lora.dora.DoraLinearLayer) for m in model.modules())
    adapter_logits = _logits(model)

    save_merged(model, load_tokenizer(resolved, load), tmp_path / "merged")
    merged = _plain(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), adapter_logits, atol=1e-4, rtol=0)
    assert torch.equal(_logits(model), adapter_logits)  # merging left the trained model as it was
    assert (adapter_logits - _logits(_plain(tiny_model_dir))).abs().max() > 1e-2


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir: Path) -> None:
    load = LoadConfig()
    base = load_model(resolve_model(str(tiny_model_dir), load), load, device=CPU)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True))
    from peft.tuners.lora import LoraLayer

    scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scalings == {8 / 4**0.5}


def test_quantize_without_lora_or_with_fsdp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match=r"load.quantize: 'nf4' .* needs LoRA .* load.quantize=null"):
        load_config({"model": "m", "output_dir": str(tmp_path), "data": {"train": "t.jsonl"}, "lora": None,
                     "load": {"quantize": "nf4"}})
    with pytest.raises(TunesmithError, match=r"load.quantize: 'int8' runs with train.distributed=ddp .* not supported"):
        load_config({"model": "m", "output_dir": str(tmp_path), "data": {"train": "t.jsonl"},
                     "load": {"quantize": "int8"}, "train": {"distributed": "fsdp"}})
    with pytest.raises(TunesmithError, match=r"load.quantize: expected 'nf4' | 'int8' or null, got 'nf3'"):
        load_config({"model": "m", "output_dir": str(tmp_path), "data": {"train": "t.jsonl"},
                     "load": {"quantize": "nf3"}})


def test_a_dora_run_is_served_beside_a_lora_run_of_the_same_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tunesmith.model import save_adapter
    from tunesmith.model.generate import GenerationSettings
    from tunesmith.serve import load_models

    load = LoadConfig()
    resolved = resolve_model(str(tiny_model_dir), load)
    tokenizer = load_tokenizer(resolved, load)
    for seed, (name, dora) in enumerate((("plain", False), ("dora", True))):
        model = apply_lora(load_model(resolved, load, device=CPU), LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=dora))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)
        save_adapter(model, tokenizer, tmp_path / name / "adapter")
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir)}))

    settings = GenerationSettings(max_new_tokens=6)
    prompt = tokenizer("Say apple 2 times")["input_ids"]

    def answers(names: list[str]) -> dict[str, list[int]]:
        served = load_models([(None, str(tmp_path / n)) for n in names])
        try:
            return {n: s.engine.generate(prompt, settings, adapter=s.adapter).token_ids for n, s in served.items()}
        finally:
            for s in served.values():
                s.engine.stop()

    together = answers(["plain", "dora"])  # peft cannot pick DoRA per row: the DoRA run gets its own engine
    assert together == {**answers(["plain"]), **answers(["dora"])}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_decoding_weights_of_a_quantized_model_compute_its_forward(tiny_model_dir: Path, kind: str) -> None:
    from tunesmith.model.decoding import can_pack, decoding_weights

    load = LoadConfig(quantize=kind)
    model = apply_lora(load_model(resolve_model(str(tiny_model_dir), load), load, device=CPU),
                       LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.eval()
    before = _logits(model)
    with torch.no_grad(), decoding_weights(model) as how:
        inside = _logits(model)
    assert how == ("packed" if can_pack() else "plain")  # the 4-bit weights de-quantized once, not at every token
    torch.testing.assert_close(inside, before, atol=MERGE_ATOL[kind], rtol=0)
    assert torch.equal(_logits(model), before)  # and put back as they were
