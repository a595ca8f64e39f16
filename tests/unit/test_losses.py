"""Chunked cross-entropy equals the full cross-entropy, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.ops.losses import (
    chunked_cross_entropy_sum,
    chunked_token_logps,
    chunked_token_logps_entropy,
    shift_targets,
)


def _full_and_chunked(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float, wrt: list):
    full = F.cross_entropy(head(hidden), targets, reduction="sum")
    chunked = chunked_cross_entropy_sum(hidden, targets, head, chunk_size=8)
    return full, chunked, torch.autograd.grad(full * scale, wrt), torch.autograd.grad(chunked * scale, wrt)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_chunked_equals_full_value_and_gradient(scale: float) -> None:
    # a plain linear head takes the fused path (gradients computed in forward, scaled in backward)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full, chunked, (g_hidden, g_weight), (c_hidden, c_weight) = _full_and_chunked(
        head, hidden, targets, scale, [hidden, head.weight])
    assert chunked.grad_fn is not None and "LinearCrossEntropy" in type(chunked.grad_fn).__name__
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(c_hidden, g_hidden, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c_weight, g_weight, atol=1e-6, rtol=1e-5)


def test_fused_path_with_a_frozen_head_gives_the_hidden_gradient_only() -> None:
    # LoRA: the head is frozen, only the hidden states (from the adapted layers) need a gradient
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(20, 16, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    full, chunked, (g_hidden,), (c_hidden,) = _full_and_chunked(head, hidden, targets, 2.0, [hidden])
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(c_hidden, g_hidden, atol=1e-6, rtol=1e-5)


def test_other_heads_recompute_their_logits_and_agree() -> None:
    # a head with a bias (or any non-plain module) takes the checkpointed path
    torch.manual_seed(2)
    head = nn.Linear(16, 50, bias=True)
    hidden = torch.randn(21, 16, requires_grad=True)
    targets = torch.randint(0, 50, (21,))
    full, chunked, grads, c_grads = _full_and_chunked(head, hidden, targets, 1.0, [hidden, head.weight, head.bias])
    assert "LinearCrossEntropy" not in type(chunked.grad_fn).__name__
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
    for c, g in zip(c_grads, grads):
        torch.testing.assert_close(c, g, atol=1e-6, rtol=1e-5)


def test_no_grad_gives_the_same_value_without_a_graph() -> None:
    torch.manual_seed(3)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(19, 16)
    targets = torch.randint(0, 50, (19,))
    with torch.no_grad():
        out = chunked_cross_entropy_sum(hidden, targets, head, chunk_size=8)
        full = F.cross_entropy(head(hidden), targets, reduction="sum")
    assert out.grad_fn is None
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-6)


def test_shift_targets_skips_ignored() -> None:
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    positions, targets = shift_targets(labels)
    # hidden at flat position p predicts the label at p+1 within the same row
    assert positions.tolist() == [0, 1, 5, 6]
    assert targets.tolist() == [5, 6, 7, 8]


def test_empty_selection_gives_zero_with_graph() -> None:
    head = nn.Linear(4, 10)
    hidden = torch.randn(0, 4, requires_grad=True)
    out = chunked_cross_entropy_sum(hidden, torch.zeros(0, dtype=torch.long), head)
    assert out.item() == 0.0 and out.requires_grad


def test_token_logps_with_a_frozen_head_match_log_softmax_in_value_and_gradient() -> None:
    # the fused per-token path (LoRA DPO and RL): any upstream gradient per token, head frozen
    torch.manual_seed(4)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    upstream = torch.randn(23)
    full = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    fused = chunked_token_logps(hidden, targets, head, chunk_size=8)
    assert "LinearTokenLogps" in type(fused.grad_fn).__name__
    torch.testing.assert_close(fused, full, atol=1e-5, rtol=1e-6)
    (g_full,) = torch.autograd.grad((full * upstream).sum(), [hidden])
    (g_fused,) = torch.autograd.grad((fused * upstream).sum(), [hidden])
    torch.testing.assert_close(g_fused, g_full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_token_logps_and_entropy_match_log_softmax(frozen: bool) -> None:
    # GRPO's one-update pass: log-probs with gradients, and the entropy of each row, from the same logits
    torch.manual_seed(6)
    head = nn.Linear(16, 50, bias=False).requires_grad_(not frozen)
    hidden = torch.randn(19, 16, requires_grad=True)
    targets = torch.randint(0, 50, (19,))
    upstream = torch.randn(19)
    log_probs = torch.log_softmax(head(hidden), -1)
    full = log_probs.gather(1, targets[:, None]).squeeze(1)
    logps, entropy = chunked_token_logps_entropy(hidden, targets, head, chunk_size=8)
    assert ("LinearTokenLogps" in type(logps.grad_fn).__name__) == frozen
    torch.testing.assert_close(logps, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad
    (g_full,) = torch.autograd.grad((full * upstream).sum(), [hidden])
    (g_fused,) = torch.autograd.grad((logps * upstream).sum(), [hidden])
    torch.testing.assert_close(g_fused, g_full, atol=1e-6, rtol=1e-5)
    assert torch.equal(logps.detach(), chunked_token_logps(hidden, targets, head, chunk_size=8).detach())


def test_token_logps_with_a_trained_head_take_the_checkpointed_path() -> None:
    torch.manual_seed(5)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    out = chunked_token_logps(hidden, targets, head, chunk_size=4)
    assert "LinearTokenLogps" not in type(out.grad_fn).__name__
    full = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    g = torch.autograd.grad(out.sum(), [hidden, head.weight])
    g_full = torch.autograd.grad(full.sum(), [hidden, head.weight])
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
