"""Documents packed in one row never see each other: their logits equal the logits of each run alone."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data import collate
from tunesmith.data.packing import make_document, pack_rows

ATOL = 1e-5


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    )
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

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
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
    from tunesmith.model.attention import document_spans

    assert document_spans(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])) == [
        [(0, 3), (3, 5), (5, 6)], [(0, 6)]]
