"""Chunked cross-entropy equals the full cross-entropy, in value and in gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.ops.losses import chunked_cross_entropy_sum, shift_targets


def test_chunked_equals_full_value_and_gradient() -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    full = F.cross_entropy(head(hidden), targets, reduction="sum")
    g_hidden, g_weight = torch.autograd.grad(full, [hidden, head.weight])

    chunked = chunked_cross_entropy_sum(hidden, targets, head, chunk_size=8)
    c_hidden, c_weight = torch.autograd.grad(chunked, [hidden, head.weight])

    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(c_hidden, g_hidden, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c_weight, g_weight, atol=1e-6, rtol=1e-5)


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
