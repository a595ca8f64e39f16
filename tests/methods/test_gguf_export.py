"""GGUF export on tiny random models of every supported architecture: read back by transformers' GGUF loader (and,
where llama-cpp-python is installed, by llama.cpp itself), the file gives the original's logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_jsonl
from tests.helpers import run_config, write_chat
from tests.tiny import build_arch_model
from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model import gguf_export
from tunesmith.model.gguf_export import MODELFILE, export, load_source, reload_gguf

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]
TEXTS = ["The quick brown fox jumps over 13 lazy dogs.", "Hello world\n\tand  two spaces, ünïcödé 😀"]
F32 = LoadConfig(dtype="float32", attn_implementation="eager")


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model folder per architecture, each with its family's kind of tokenizer."""
    root = tmp_path_factory.mktemp("arch-models")
    return {arch: build_arch_model(root / arch, arch) for arch in ARCHS}


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:32]])


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_reads_back_with_the_same_logits_and_greedy_tokens(arch: str, arch_dirs, tmp_path: Path,
                                                                     one_thread) -> None:
    out = tmp_path / "out" / "model.gguf"
    report = export(str(arch_dirs[arch]), gguf=out, quant="f32", prompts=3)
    assert out.is_file() and report.size_bytes == out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["model.gguf", MODELFILE])  # no temporary left
    check = report.check
    assert check is not None and check.skipped is None
    assert (check.agree, check.tokenizer_agree) == (3, 3), report.summary()  # greedy tokens, token for token
    assert check.matched == check.tokens > 0

    model, tokenizer = load_source(str(arch_dirs[arch]), F32)
    reloaded, file_tokenizer, _ = reload_gguf(out, model.config, gguf_export.architecture_of(model.config))
    for text in TEXTS:  # the tokenizer written into the file is the original's
        assert file_tokenizer(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = _ids(tokenizer)
    with torch.no_grad():
        want, got = model(ids).logits, reloaded(ids).logits
    # exact up to float rounding: Gemma's norms are stored as 1 + w and read back as (1 + w) - 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_computes_the_same_logits_and_tokens(arch: str, arch_dirs, tmp_path: Path, one_thread) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")  # the dev extra; llama.cpp itself, reading our metadata
    out = tmp_path / "model.gguf"
    export(str(arch_dirs[arch]), gguf=out, quant="f32", check=False)
    model, tokenizer = load_source(str(arch_dirs[arch]), F32)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    try:
        for text in TEXTS[:1] + ["a\nb  c"]:  # Llama 2-style SentencePiece differs only where a text starts with a space
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = _ids(tokenizer)
        llm.eval(ids[0].tolist())
        got = np.asarray(llm.scores[: ids.shape[1]])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_each_quant_is_written_typed_and_checked(arch_dirs, tmp_path: Path, one_thread) -> None:
    import gguf

    T = gguf.GGMLQuantizationType
    sizes = {}
    for quant in ("f16", "bf16", "q8_0", "q4_0"):
        out = tmp_path / f"m-{quant}.gguf"
        report = export(str(arch_dirs["qwen2"]), gguf=out, quant=quant, prompts=2)
        assert report.check is not None and report.check.skipped is None and report.check.prompts == 2
        sizes[quant] = out.stat().st_size
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_norm.weight"] == T.F32 and types["blk.0.attn_q.bias"] == T.F32
        want = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
        assert types["blk.1.ffn_down.weight"] == want
        assert types["token_embd.weight"] == (T.Q8_0 if quant == "q4_0" else want)  # q4_0 keeps the embedding at q8_0
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q4_0"]


def test_modelfile_has_the_template_stop_tokens_and_default_system_prompt(tmp_path: Path) -> None:
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    text, has_template = gguf_export.modelfile_text("m.gguf", tokenizer, ["<|im_end|>"], add_bos=False)
    assert has_template and "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert "SYSTEM" not in text  # this template has no default system prompt
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
                               "{% endif %}" + tokenizer.chat_template)
    text, has_template = gguf_export.modelfile_text("m.gguf", tokenizer, ["<|im_end|>"], add_bos=False)
    assert has_template and 'SYSTEM """Be kind."""' in text
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    text, has_template = gguf_export.modelfile_text("m.gguf", tokenizer, [], add_bos=False)
    assert not has_template and "TEMPLATE" not in text


def test_an_unsupported_architecture_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny import build_tokenizer

    folder = tmp_path / "gpt2"
    tok = build_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(TunesmithError, match=r"cannot write model type 'gpt2'.*llama.*qwen2.*qwen3.*gemma2"):
        export(str(folder), gguf=out, quant="f32")
    assert not out.parent.exists()  # not even the folder


def test_bad_arguments_are_clear_errors(arch_dirs, tmp_path: Path) -> None:
    model = str(arch_dirs["llama"])
    with pytest.raises(TunesmithError, match="does not end in .gguf"):
        export(model, gguf=tmp_path / "m.bin")
    with pytest.raises(TunesmithError, match="is not one of f32, f16, bf16, q8_0, q4_0"):
        export(model, gguf=tmp_path / "m.gguf", quant="q5_k")
    with pytest.raises(TunesmithError, match="nothing to write"):
        export(model)
    with pytest.raises(TunesmithError, match="not a LoRA run folder"):
        export(model, lora_gguf=tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(arch_dirs, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    calls = []

    def disk_full(tensor, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(tensor, qtype)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(str(arch_dirs["llama"]), gguf=out, quant="f32", check=False)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_file_that_disagrees_at_f32_fails_the_export_and_is_not_kept(arch_dirs, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        one_thread) -> None:
    # Without the Q/K reordering llama.cpp needs, the file computes another model; the check must catch it.
    monkeypatch.setattr(gguf_export, "_permute_rotary", lambda weight, n_head: weight.flip(0))
    out = tmp_path / "m.gguf"
    failed = r"export check failed: at f32 .* differ; first: '.+': (after \d+ equal tokens, )?original"
    with pytest.raises(TunesmithError, match=failed):
        export(str(arch_dirs["llama"]), gguf=out, quant="f32", prompts=3)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_run_exports_at_the_end_and_a_new_run_starts_from_its_gguf(tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture,
                                                                          one_thread) -> None:
    import gguf

    from tunesmith.cli import main
    from tunesmith.run import train

    data = write_chat(tmp_path)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Say apple 2 times", "completion": "apple apple"},
                                                  {"prompt": "Say river 1 times", "completion": "river"}])
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", max_steps=3)
    cfg["data"]["test"] = str(test)
    cfg["output"] = {"gguf": "f32"}
    cfg["eval"] = {"max_new_tokens": 8}
    result = train(cfg)
    exported = tmp_path / "run" / "gguf" / "model.f32.gguf"
    assert result.outputs["gguf"] == str(exported) and exported.is_file()
    assert result.outputs["modelfile"] == str(exported.parent / MODELFILE)
    printed = capsys.readouterr().out
    assert "check: 2/2 prompts give the same greedy tokens" in printed and "the run's data.test" in printed

    # the adapter alone, for llama.cpp's --lora, through the command
    adapter = tmp_path / "adapter.gguf"
    assert main(["export", str(tmp_path / "run"), "--lora-gguf", str(adapter)]) == 0
    reader = gguf.GGUFReader(adapter)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.architecture"] == "llama"
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * 7 * 2 and {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names

    # a new run starts from the exported file
    again = run_config(exported, data, tmp_path / "run2", max_steps=2)
    second = train(again)
    assert second.loop.steps == 2 and second.loop.final_loss is not None


def test_output_gguf_is_checked_with_the_rest_of_the_config() -> None:
    from tunesmith.config import load_config

    base = {"data": {"train": "x.jsonl"}}
    assert load_config({**base, "output": {"gguf": "q4_0"}}).output.gguf == "q4_0"
    with pytest.raises(TunesmithError, match=r"output.gguf: expected 'f32' \| 'f16' \| 'bf16' \| 'q8_0' \| 'q4_0' or null"):
        load_config({**base, "output": {"gguf": "q5_k"}})
    with pytest.raises(TunesmithError, match="output.gguf: a reward model"):
        load_config({**base, "method": "reward", "output": {"gguf": "f32"}})
    with pytest.raises(TunesmithError, match="keeps no model to export"):
        load_config({**base, "output": {"gguf": "f32", "merge": False, "save_adapter": False}})
