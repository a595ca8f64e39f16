"""The default model exported to GGUF and run by llama.cpp itself (llama-cpp-python): the same greedy answers as
tunesmith on the demo's prompts, with the chat template and stop token taken from the file; and a LoRA adapter
written as a GGUF adapter, applied by llama.cpp, answering as the merged model does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunesmith.config import LoadConfig, LoraConfig, load_config, save_config
from tunesmith.demo import make_task
from tunesmith.model import apply_lora, save_adapter
from tunesmith.model.generate import GenerationSettings, generate
from tunesmith.model.gguf_export import export, load_source

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")

MAX_NEW = 40
F32 = LoadConfig(dtype="float32")


@pytest.fixture(scope="module")
def prompts() -> list[list[dict]]:
    """Four of the demo's held-out prompts (system + user), without their answers."""
    _, test = make_task(8, 4, seed=0)
    return [row["messages"][:-1] for row in test]


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model written at f32 (the check is left to the tests on tiny models)."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2.f32.gguf"
    export("default", gguf=out, quant="f32", check=False)
    return out


@pytest.fixture(scope="module")
def base_answers(prompts):
    """tunesmith's greedy answers of the default model to the prompts."""
    model, tokenizer = load_source("default", F32)
    return generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=MAX_NEW))


def _llama_cpp_answers(model_path: Path, prompts: list[list[dict]], lora: Path | None = None) -> list[dict]:
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=512,
                          n_threads=2, verbose=False)
    try:
        # no chat_format given: llama-cpp-python renders the file's tokenizer.chat_template and stops at its EOS
        return [llm.create_chat_completion(messages=p, temperature=0.0, max_tokens=MAX_NEW)["choices"][0]
                for p in prompts]
    finally:
        llm.close()


def _assert_same(tunesmith_answers, llama_answers) -> None:
    for mine, theirs in zip(tunesmith_answers, llama_answers):
        assert theirs["message"]["content"] == mine.text
        assert theirs["finish_reason"] == ("length" if mine.finish_reason == "length" else "stop")


def test_llama_cpp_answers_the_demo_prompts_as_tunesmith_does(base_gguf: Path, prompts, base_answers) -> None:
    assert sum(m.finish_reason == "eos" for m in base_answers) >= 2  # the stop token is exercised, not only the length
    _assert_same(base_answers, _llama_cpp_answers(base_gguf, prompts))


def test_a_lora_adapter_gguf_on_the_base_answers_as_the_merged_model(base_gguf: Path, prompts, base_answers,
                                                                      tmp_path: Path) -> None:
    # A LoRA run folder whose adapter is far from zero, as a trained one would be.
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config({"model": "default", "output_dir": str(run), "data": {"train": "train.jsonl"},
                             "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}), run / "config.yaml")
    model, tokenizer = load_source("default", F32)
    adapted = apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    save_adapter(adapted, tokenizer, run / "adapter")

    adapter = tmp_path / "adapter.gguf"
    export(str(run), lora_gguf=adapter)
    merged, merged_tokenizer = load_source(str(run), F32)
    mine = generate(merged, merged_tokenizer, prompts, GenerationSettings(max_new_tokens=MAX_NEW))
    assert [m.token_ids for m in mine] != [b.token_ids for b in base_answers]  # the adapter changes the answers
    _assert_same(mine, _llama_cpp_answers(base_gguf, prompts, lora=adapter))
