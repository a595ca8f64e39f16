"""LoRA on the tiny model, and every output format round-tripping through the loaders other tools use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import CHATML_TEMPLATE
from tunesmith.config import LoadConfig, LoraConfig
from tunesmith.errors import TunesmithError
from tunesmith.model import (
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_model,
    save_adapter,
    save_full,
    save_merged,
)

CPU = torch.device("cpu")
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def _load(folder: Path):
    load = LoadConfig()
    resolved = resolve_model(str(folder), load)
    return load_model(resolved, load, device=CPU).eval(), load_tokenizer(resolved, load)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 40, 77, 120, 3, 200], [1, 300, 17, 2, 88, 41, 60, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits  # (batch, seq, vocab)


def _perturb_lora(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.fixture()
def trained_lora(tiny_model_dir: Path):
    """A LoRA-wrapped tiny model whose adapter is no longer zero, its tokenizer, and the base logits."""
    model, tokenizer = _load(tiny_model_dir)
    base_logits = _logits(model)
    model = apply_lora(model, LORA).eval()
    _perturb_lora(model)
    return model, tokenizer, base_logits


def test_lora_at_init_reproduces_base_logits(tiny_model_dir: Path) -> None:
    model, _ = _load(tiny_model_dir)
    base_logits = _logits(model)
    wrapped = apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05))
    assert torch.equal(_logits(wrapped.train()), base_logits)  # adapter dropout cannot matter while B is zero
    assert torch.equal(_logits(wrapped.eval()), base_logits)


def test_only_lora_parameters_train(tiny_model_dir: Path) -> None:
    model, _ = _load(tiny_model_dir)
    _, total_before = count_parameters(model)
    wrapped = apply_lora(model, LORA)
    trainable_names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_A" in n or "lora_B" in n for n in trainable_names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable_names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear, no lm_head
    trainable, total = count_parameters(wrapped)
    assert trainable == sum(p.numel() for n, p in wrapped.named_parameters() if n in set(trainable_names))
    assert total == total_before + trainable


def test_bad_target_modules_is_a_clear_error(tiny_model_dir: Path) -> None:
    model, _ = _load(tiny_model_dir)
    with pytest.raises(TunesmithError, match=r"lora.target_modules: \['c_attn'\].*q_proj"):
        apply_lora(model, LoraConfig(target_modules=["c_attn"]))


def test_adapter_round_trips_through_peft(trained_lora, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model, tokenizer, base_logits = trained_lora
    tuned_logits = _logits(model)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)

    out = save_adapter(model, tokenizer, tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    base, _ = _load(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(_logits(reloaded), tuned_logits, rtol=0, atol=1e-6)

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML_TEMPLATE


def test_merged_model_loads_as_plain_transformers(trained_lora, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _ = trained_lora
    tuned_logits = _logits(model)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    base_weight = q_proj.base_layer.weight.detach().clone()

    out = save_merged(model, tokenizer, tmp_path / "merged")
    assert "model.safetensors" in os.listdir(out) and "adapter_config.json" not in os.listdir(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.config.use_cache is True
    torch.testing.assert_close(_logits(merged), tuned_logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML_TEMPLATE

    # The caller's model is untouched: same weights, adapter still separate and active, cache still off.
    assert torch.equal(q_proj.base_layer.weight, base_weight) and not q_proj.merged
    assert torch.equal(_logits(model), tuned_logits)
    assert model.config.use_cache is False


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_merge_refuses_to_split_tied_embeddings(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TunesmithError, match="ties"):
        save_merged(model, tokenizer, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_full_model_round_trips(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    tuned_logits = _logits(model)

    out = save_full(model, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), tuned_logits, rtol=0, atol=0)
    reloaded_model, reloaded_tok = _load(out)  # and through our own loader
    assert reloaded_tok.chat_template == CHATML_TEMPLATE
    torch.testing.assert_close(_logits(reloaded_model), tuned_logits, rtol=0, atol=0)


def test_saving_again_replaces_the_folder_atomically(trained_lora, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer, _ = trained_lora
    out = tmp_path / "adapter"
    save_adapter(model, tokenizer, out)
    (out / "stale.txt").write_text("from an older save")
    save_adapter(model, tokenizer, out)
    assert not (out / "stale.txt").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_merged(model, tokenizer, tmp_path / "merged")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no half folder, no temp left behind


@pytest.mark.parametrize("kind", ["dora", "embedding"])
def test_one_merge_covers_dora_and_embedding_adapters(tiny_model_dir: Path, kind: str) -> None:
    """merged_state_dict, the one merge every output uses, folds in LoRA layers beyond plain linears too."""
    import peft

    from tunesmith.model.lora import merged_state_dict

    model, _ = _load(tiny_model_dir)
    config = (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
              if kind == "dora" else peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    adapted = peft.get_peft_model(model, config).eval()
    _perturb_lora(adapted)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    expected = _logits(adapted)
    if kind == "embedding":  # the tiny model ties its embeddings to the head: merging must refuse, clearly
        with pytest.raises(TunesmithError, match="ties"):
            merged_state_dict(adapted)
        assert all(torch.equal(before[k], v) for k, v in adapted.state_dict().items()), "the model was changed"
        return
    state = merged_state_dict(adapted)
    assert all(torch.equal(before[k], v) for k, v in adapted.state_dict().items()), "the model was changed"
    plain, _ = _load(tiny_model_dir)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is not saved twice
    torch.testing.assert_close(_logits(plain), expected, atol=1e-4, rtol=1e-4)
