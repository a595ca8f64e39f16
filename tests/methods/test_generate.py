"""Our batched decode loop against transformers' own `generate`, on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tunesmith.config import LoadConfig
from tunesmith.errors import TunesmithError
from tunesmith.model import generate as generate_module
from tunesmith.model import load_model, load_tokenizer, resolve_model
from tunesmith.model.generate import GenerationSettings, generate, prompt_ids

# Prompts of very different lengths, so one batch holds a lot of left padding.
PROMPTS = [
    "Hi",
    "Explain what a generator expression is in one sentence.",
    "The import statement is executed in two steps: find a module, loading and initializing it if necessary",
    "Define a name",
    "Say yes",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    load = LoadConfig()
    resolved = resolve_model(str(tiny_model_dir), load)
    model = load_model(resolved, load, device=torch.device("cpu")).eval()
    # At its initial scale the random model answers every prompt with the same token; larger weights make
    # greedy answers depend on the prompt and change at every step, so equal outputs mean something.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.15, generator=gen)
    return model, load_tokenizer(resolved, load)


def _chats(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def _hf_one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    out = []
    for ids in prompt_ids(tokenizer, _chats(prompts)):
        x = torch.tensor([ids])
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(y[0, len(ids):].tolist())
    return out


def test_greedy_equals_transformers_generate_per_prompt(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=12, batch_size=8)
    ours = generate(model, tokenizer, _chats(PROMPTS), settings)
    assert len({len(ids) for ids in prompt_ids(tokenizer, _chats(PROMPTS))}) == len(PROMPTS)
    assert len({tuple(g.token_ids) for g in ours}) == len(PROMPTS)  # the test can tell rows apart
    expected = _hf_one_at_a_time(model, tokenizer, PROMPTS, 12)
    assert [g.token_ids for g in ours] == expected
    # The same with the whole batch prefilled at once, left padding and all (the path for sliding-window caches).
    monkeypatch.setattr(generate_module, "_prefill_groups", lambda lengths: [list(range(len(lengths)))])
    assert [g.token_ids for g in generate(model, tokenizer, _chats(PROMPTS), settings)] == expected
    assert all(g.finish_reason == "length" and g.num_new_tokens == 12 for g in ours)
    assert ours[1].text == tokenizer.decode(ours[1].token_ids, skip_special_tokens=True)


def test_rows_finishing_early_leave_the_batch_and_match_transformers(tiny) -> None:
    model, tokenizer = tiny
    first = generate(model, tokenizer, _chats(PROMPTS), GenerationSettings(max_new_tokens=12))
    # Make a token the random model does emit an extra EOS, so some rows end early and others go on.
    extra_eos = first[1].token_ids[3]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    try:
        ours = generate(model, tokenizer, _chats(PROMPTS), GenerationSettings(max_new_tokens=12, batch_size=3))
        expected = _hf_one_at_a_time(model, tokenizer, PROMPTS, 12)
    finally:
        model.generation_config.eos_token_id = original
    assert [g.token_ids for g in ours] == expected
    reasons = [g.finish_reason for g in ours]
    assert "eos" in reasons and "length" in reasons
    for g in ours:
        if g.finish_reason == "eos":
            assert g.token_ids[-1] == extra_eos and g.num_new_tokens == len(g.token_ids) < 12


def test_stop_strings_cut_the_text(tiny) -> None:
    model, tokenizer = tiny
    full = generate(model, tokenizer, _chats(PROMPTS), GenerationSettings(max_new_tokens=16))
    # A stop string of plain letters from the middle of one answer (random bytes would not decode stably).
    row, match = next((r, m) for r, g in enumerate(full) for m in [re.search(r"[A-Za-z]{3}", g.text[4:])] if m)
    text, stop = full[row].text, match.group()
    cut = generate(model, tokenizer, _chats(PROMPTS), GenerationSettings(max_new_tokens=16, stop=["@@never@@", stop]))
    assert cut[row].finish_reason == "stop"
    assert cut[row].text == text[: text.find(stop)]
    assert cut[row].num_new_tokens < 16 and cut[row].token_ids == full[row].token_ids[: cut[row].num_new_tokens]
    for a, b in zip(full, cut):  # every row is the same prefix of its full answer, cut at its first stop
        k = a.text.find(stop)
        assert b.text == (a.text[:k] if k >= 0 else a.text)


def test_sampling_is_reproducible_with_a_seed(tiny) -> None:
    model, tokenizer = tiny
    chats = _chats(PROMPTS)

    def sample(seed: int, **kw) -> list[list[int]]:
        settings = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=seed, batch_size=2, **kw)
        return [g.token_ids for g in generate(model, tokenizer, chats, settings)]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, top_p=0.9, top_k=50) == sample(7, top_p=0.9, top_k=50)
    greedy = [g.token_ids for g in generate(model, tokenizer, chats, GenerationSettings(max_new_tokens=10))]
    assert sample(3, top_k=1) == greedy  # one candidate left: sampling is argmax
    assert sample(3, top_p=1e-6) == greedy


def test_seeded_answers_do_not_depend_on_their_batch(tiny) -> None:
    # RL ranks each sample their share of a step's prompts: an answer with its own seed must be the same
    # whatever else is generated with it (batch size, neighbours, a repeated prompt's other answers).
    model, tokenizer = tiny
    chats = _chats(PROMPTS) + _chats(PROMPTS[:1])  # the first prompt twice: prefilled once, two answers
    seeds = [100 + i for i in range(len(chats))]

    def sample(rows: list[int], batch_size: int) -> list[list[int]]:
        settings = GenerationSettings(max_new_tokens=10, temperature=1.0, batch_size=batch_size)
        answers = generate(model, tokenizer, [chats[i] for i in rows], settings, seeds=[seeds[i] for i in rows])
        return [g.token_ids for g in answers]

    everything = sample(list(range(len(chats))), batch_size=16)
    assert everything[0] != everything[-1]  # the same prompt, its own seed: another answer
    assert sample([3, 1], batch_size=1) == [everything[3], everything[1]]
    assert sample(list(range(len(chats)))[::-1], batch_size=3) == everything[::-1]
    with pytest.raises(ValueError, match="2 seeds for 1 conversations"):
        generate(model, tokenizer, chats[:1], GenerationSettings(temperature=1.0), seeds=[1, 2])


def test_bad_settings_are_reported_together(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(TunesmithError) as err:
        generate(model, tokenizer, _chats(["x"]), GenerationSettings(max_new_tokens=0, top_p=0.0, temperature=-1))
    message = str(err.value)
    assert "max_new_tokens" in message and "top_p" in message and "temperature" in message


def test_repeated_prompts_are_prefilled_once(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    # An RL group asks for several answers to one prompt: its prompt runs through the model once.
    model, tokenizer = tiny
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    prefilled: list[int] = []
    real = generate_module._Decoder.forward_padded

    def counting(self, rows, cache):
        prefilled.extend(len(r) for r in rows)
        return real(self, rows, cache)

    monkeypatch.setattr(generate_module._Decoder, "forward_padded", counting)
    ours = generate(model, tokenizer, _chats(prompts), GenerationSettings(max_new_tokens=8, batch_size=6))
    assert sorted(prefilled) == sorted(len(ids) for ids in prompt_ids(tokenizer, _chats(sorted(set(prompts)))))
    assert [g.token_ids for g in ours] == _hf_one_at_a_time(model, tokenizer, prompts, 8)


def test_sampling_draws_from_the_filtered_distribution() -> None:
    # The inverse-CDF draw of `pick`: frequencies follow softmax(logits / T) after top-k and top-p.
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0])
    logits = probs.log().expand(40_000, -1)  # (rows, vocab): -inf for the two impossible tokens

    def frequencies(**kw) -> torch.Tensor:
        decoder = object.__new__(generate_module._Decoder)
        decoder.settings = GenerationSettings(temperature=1.0, **kw)
        decoder.sampler = torch.Generator().manual_seed(0)
        tokens = decoder.pick(logits.clone())
        return torch.bincount(tokens, minlength=len(probs)).float() / len(tokens)

    torch.testing.assert_close(frequencies(), probs, atol=0.01, rtol=0)  # 4 sigma is about 0.01 at 40k draws
    torch.testing.assert_close(frequencies(top_k=2), torch.tensor([2 / 3, 1 / 3, 0, 0, 0, 0]), atol=0.01, rtol=0)
    # top_p 0.6: 0.5 alone falls short, 0.5 + 0.25 reaches it; the rest is cut
    torch.testing.assert_close(frequencies(top_p=0.6), torch.tensor([2 / 3, 1 / 3, 0, 0, 0, 0]), atol=0.01, rtol=0)
    assert frequencies(top_k=3)[3:].sum() == 0  # filtered tokens are never drawn, not merely rare


def test_lora_decodes_packed_and_merged_and_leaves_the_model_as_it_was(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rollouts decode with the adapter folded into (oneDNN-packed, on CPU) weights: the same tokens as the
    # adapter's own forward, and afterwards every parameter is bit for bit what it was.
    import copy
    from contextlib import contextmanager

    from tunesmith.config import LoraConfig
    from tunesmith.model import decoding
    from tunesmith.model.lora import apply_lora, mergeable_lora_layers, merged_lora, merged_weight

    base, tokenizer = tiny
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer, active in mergeable_lora_layers(model):
        expected = layer.get_base_layer().weight + layer.get_delta_weight(active[0])
        torch.testing.assert_close(merged_weight(layer, active), expected, atol=1e-6, rtol=1e-6)
    with merged_lora(model) as merged:
        assert merged
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all("base_layer" in n for n in changed)  # the merged weights are in place
    with torch.no_grad(), decoding.decoding_weights(model) as mode:
        assert mode == "packed"  # CPU float32 with this PyTorch: the packed path is the one tested below
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)

    def tokens(m) -> list[list[int]]:
        return [g.token_ids for g in generate(m, tokenizer, _chats(PROMPTS), settings)]

    packed = tokens(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert not any(hasattr(m, "_tunesmith_packed_weight") or "forward" in vars(m) for m in model.modules())
    monkeypatch.setattr(decoding, "_packable", lambda _model, _lora: False)  # CUDA / bf16: merged plain weights
    assert tokens(model) == packed

    @contextmanager
    def adapters_as_they_are(_model):
        yield "plain"

    monkeypatch.setattr(generate_module, "decoding_weights", adapters_as_they_are)
    assert tokens(model) == packed  # the adapter's own forward: base + B(A(x)) at every step
    assert packed != tokens(base)  # the adapter acts
    with merged_lora(copy.deepcopy(model).to(torch.bfloat16)) as merged:
        assert not merged  # bf16 would round a small adapter away: it keeps its own forward


def test_roomy_cache_layer_holds_what_a_growing_layer_holds() -> None:
    # The decode loop's KV layer writes into spare room instead of concatenating; it must hold the same keys
    # and values as transformers' DynamicLayer through prefill, steps, rows leaving, and running out of room.
    from transformers.cache_utils import DynamicLayer

    gen = torch.Generator().manual_seed(0)

    def kv(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, 2, length, 4, generator=gen), torch.randn(rows, 2, length, 4, generator=gen)

    plain = DynamicLayer()
    plain.update(*kv(5, 7))
    roomy = generate_module.RoomyLayer(plain, room=3)
    for step in range(6):  # three steps fill the room; the fourth grows the buffers
        if step == 2:
            keep = torch.tensor([0, 2, 4])
            plain.batch_select_indices(keep)
            roomy.batch_select_indices(keep)
        new = kv(plain.keys.shape[0], 1)
        expected, got = plain.update(*new), roomy.update(*new)
        for a, b in zip(expected, got):
            assert torch.equal(a, b)
        assert roomy.get_seq_length() == plain.get_seq_length() == 8 + step


def test_lora_over_conv1d_keeps_its_adapter_while_decoding() -> None:
    # GPT-2's Conv1D (weights stored (in, out)) under LoRA: decoding weights must carry the adapter too.
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.model.decoding import decoding_weights

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64)).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                      fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        x = torch.randint(0, 97, (2, 7))
        adapted = model(input_ids=x).logits
        with decoding_weights(model) as mode:
            inside = model(input_ids=x).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=x).logits, adapted, atol=1e-3)  # the adapter matters
    assert mode == "merged"  # a Conv1D base is not packed; its merged weight is swapped in instead
    torch.testing.assert_close(inside, adapted, atol=1e-5, rtol=1e-5)
