"""Documents packed in one row never see each other: their logits equal the logits of each run alone."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data import collate
from tunesmith.data.packing import make_document, pack_rows
from tunesmith.model import attention

ATOL = 1e-5


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # "sdpa" as tunesmith loads it: under the name of its own per-document SDPA
    name = attention.register() if request.param == "sdpa" else request.param
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=name)
    return model.eval()


def _documents(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def _alone(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # (n, vocab)


@torch.no_grad()
def _batched(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None, use_cache=False
    ).logits  # (batch, T, vocab)


def test_packed_row_matches_documents_alone(model):
    docs = _documents([17, 5, 30, 1, 9], model.config.vocab_size, seed=0)
    (row,) = pack_rows([make_document(d, d) for d in docs], max_length=64)
    assert len(_bounds(row.position_ids)) == 5  # really one row holding all five documents
    batch = collate([row], pad_id=0)
    logits = _batched(model, batch)[0]
    start = 0
    for ids in (row.input_ids[a:b] for a, b in _bounds(row.position_ids)):
        torch.testing.assert_close(logits[start : start + len(ids)], _alone(model, ids), atol=ATOL, rtol=0)
        start += len(ids)
    assert start == len(row.input_ids)


def test_padded_batch_matches_documents_alone(model):
    docs = _documents([12, 31, 4], model.config.vocab_size, seed=1)
    packed = pack_rows([make_document(d, d) for d in _documents([6, 10, 3], model.config.vocab_size, seed=2)], 64)
    rows = [make_document(d, d) for d in docs] + packed  # rows of different lengths: padding in all but one
    batch = collate(rows, pad_id=0)
    logits = _batched(model, batch)
    for b, row in enumerate(rows):
        for a, e in _bounds(row.position_ids):
            torch.testing.assert_close(logits[b, a:e], _alone(model, row.input_ids[a:e]), atol=ATOL, rtol=0)


def test_without_restarting_positions_documents_would_leak(model):
    # The equality above is not vacuous: with plain positions the second document sees the first.
    docs = _documents([10, 10], model.config.vocab_size, seed=3)
    ids = docs[0] + docs[1]
    logits = _alone(model, ids)
    assert not torch.allclose(logits[10:], _alone(model, docs[1]), atol=1e-3)


def _bounds(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [t for t, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def test_per_document_attention_equals_the_masked_path_in_value_and_gradient(tiny_model_dir, monkeypatch):
    # Training losses run the decoder inside document_attention: each document its own causal SDPA call.
    from transformers import AutoModelForCausalLM

    from tunesmith.model import attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention.register())
    vocab = model.config.vocab_size
    packed = pack_rows([make_document(d, d) for d in _documents([17, 5, 30, 1, 9], vocab, seed=4)], max_length=64)
    rows = packed + [make_document(d, d) for d in _documents([12, 3], vocab, seed=5)]  # padded rows too
    batch = collate(rows, pad_id=0)
    calls = []
    real_sdpa = attention.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real_sdpa(*args, **kwargs)

    def run(per_document: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with attention.document_attention(batch["position_ids"]) if per_document else torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                           use_cache=False).logits
        (logits.square().mean()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    masked_logits, masked_grads = run(False)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    doc_logits, doc_grads = run(True)
    spans = attention.document_spans(batch["position_ids"])
    assert calls == [True] * (sum(len(s) for s in spans) * model.config.num_hidden_layers)  # really per document
    torch.testing.assert_close(doc_logits, masked_logits, atol=ATOL, rtol=0)
    for a, b in zip(doc_grads, masked_grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_document_spans_follow_position_restarts():
    from tunesmith.model.attention import document_spans, row_spans

    assert document_spans(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])) == [
        [(0, 3, 0, 0), (3, 5, 3, 3), (5, 6, 5, 5)], [(0, 6, 0, 0)]]
    # A tree: prefix of 3 (positions 0-2), branches restarting at 3, then a plain document and padding.
    assert row_spans([0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5, 0, 1, 2, 0, 1]) == [
        (0, 3, 0, 0), (3, 6, 0, 3), (6, 8, 0, 3), (8, 11, 0, 3), (11, 14, 11, 11), (14, 16, 14, 14)]
    assert row_spans([5, 6, 7, 0, 1]) == [(0, 3, 0, 0), (3, 5, 3, 3)]  # a row that opens mid-document
    # Jumps that do not return to the prefix's end split nothing, as before trees existed.
    assert row_spans([0, 1, 2, 3, 2, 3, 1]) == [(0, 2, 0, 0), (2, 4, 0, 2), (4, 7, 0, 2)]
    assert row_spans([0, 1, 2, 7, 8]) == [(0, 5, 0, 0)]


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_trees_equal_each_answer_alone(tiny_model_dir, lora: bool):
    # Answers of one prompt trained as a tree (prompt once, branches restarting after it) give the same
    # log-probs and gradients as one document per answer.
    from transformers import AutoModelForCausalLM

    from tunesmith.core.next_token import labelled_states
    from tunesmith.model.parts import decoder_and_head
    from tunesmith.ops.losses import chunked_token_logps
    from tunesmith.rollout.sequences import Completion, collate_sequences, pack_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention.register())
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(6))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (7, 11, 1)]
    seqs = [Completion(prompts[i // 3], torch.randint(3, vocab, (2 + i,), generator=gen).tolist(), i) for i in range(9)]
    decoder, head = decoder_and_head(model)
    out = {}
    for share in (False, True):
        model.zero_grad()
        rows = pack_sequences(seqs, 28, share_prompts=share)
        batch = collate_sequences(rows, pad_id=0)
        selected, targets, _ = labelled_states(decoder, batch["input_ids"], batch["labels"], batch["position_ids"])
        logps = chunked_token_logps(selected, targets, head)
        weights = torch.empty_like(logps)  # one weight per (completion, token), whichever layout holds it
        weights[_labelled_order(batch)] = torch.linspace(-1, 1, logps.numel())
        (logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[share] = (logps.detach(), grads, batch, rows)
    (logps, grads, batch, rows), (plain_logps, plain_grads, plain_batch, _) = out[True], out[False]
    # Really shared: each prompt appears once per tree (a 1-token prompt has nothing to share).
    # Completions are 2..10 tokens. Prompt of 7: one tree of 6 + 3 + 4 + 5. Prompt of 11: 28-token rows cut it into
    # a tree of 10 + 6 + 7 and a lone document of 11 + 7. Prompt of 1: three documents of 9, 10 and 11.
    assert sum(len(r.input_ids) for r in rows) == 18 + 23 + 18 + 30
    assert sorted(batch["completion_index"].tolist()) == list(range(9))
    assert int((batch["seq_index"] == -1).sum()) > int((plain_batch["seq_index"] == -1).sum())  # shared prompts
    assert torch.equal(batch["labels"][batch["labels"] != -100].sort().values,
                       plain_batch["labels"][plain_batch["labels"] != -100].sort().values)
    order = _labelled_order(batch), _labelled_order(plain_batch)
    torch.testing.assert_close(logps[order[0]], plain_logps[order[1]], atol=ATOL, rtol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=1e-4)


def _labelled_order(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Permutation that sorts the labelled tokens by (completion, place in it)."""
    from tunesmith.core.next_token import token_owner
    from tunesmith.ops.losses import shift_targets

    positions, _ = shift_targets(batch["labels"])
    owner = batch["completion_index"][token_owner(batch["seq_index"], positions)]
    key = owner * 10_000 + torch.arange(len(positions))  # stable within a completion: row order is token order
    return key.argsort()


def test_trees_refuse_attention_that_cannot_hold_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.core.next_token import labelled_states
    from tunesmith.errors import TunesmithError
    from tunesmith.model.parts import decoder_and_head
    from tunesmith.rollout.sequences import Completion, collate_sequences, pack_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    seqs = [Completion([5, 6, 7, 8], [9, 10, 11], i) for i in range(3)]
    batch = collate_sequences(pack_sequences(seqs, 64, share_prompts=True), pad_id=0)
    decoder, _ = decoder_and_head(model)
    with pytest.raises(TunesmithError, match="'eager'.*rl.share_prompts: false"):
        labelled_states(decoder, batch["input_ids"], batch["labels"], batch["position_ids"])


@pytest.mark.parametrize("trees", [False, True])
def test_activation_checkpointing_recomputes_under_the_same_layout(tiny_model_dir, trees: bool):
    # With train.gradient_checkpointing, each layer is recomputed in backward, outside the forward's
    # document_attention block: it must still attend per document (and per tree), or the gradients change.
    from transformers import AutoModelForCausalLM

    from tunesmith.core.next_token import labelled_states
    from tunesmith.model.attention import checkpoint_context
    from tunesmith.model.parts import decoder_and_head
    from tunesmith.ops.losses import chunked_token_logps
    from tunesmith.rollout.sequences import Completion, collate_sequences, pack_sequences

    gen = torch.Generator().manual_seed(8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention.register())
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 9)]
    seqs = [Completion(prompts[i // 3], torch.randint(3, vocab, (3 + i,), generator=gen).tolist(), i) for i in range(6)]
    batch = collate_sequences(pack_sequences(seqs, 64, share_prompts=trees), pad_id=0)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
        model.zero_grad()
        decoder, head = decoder_and_head(model)
        selected, targets, _ = labelled_states(decoder, batch["input_ids"], batch["labels"], batch["position_ids"])
        chunked_token_logps(selected, targets, head).sum().backward()
        model.gradient_checkpointing_disable()
        return [p.grad.clone() for p in model.parameters()]

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_trees_are_only_used_where_every_layer_can_hold_them():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    from tunesmith.model.attention import trees_fit

    def config(cls, implementation=attention.ATTENTION, **kw):
        c = cls(**kw)
        c._attn_implementation = implementation
        return c

    assert trees_fit(config(LlamaConfig), 4096)
    assert not trees_fit(config(LlamaConfig, "eager"), 4096)
    assert not trees_fit(config(LlamaConfig, "sdpa"), 4096)  # transformers' own SDPA: no per-document calls
    assert not trees_fit(config(Gemma2Config), 512)  # logit softcapping in attention
    assert trees_fit(config(MistralConfig, sliding_window=4096), 2048)  # the window holds a whole row
    assert not trees_fit(config(MistralConfig, sliding_window=1024), 2048)
