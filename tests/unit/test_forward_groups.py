"""Splitting a micro-batch into forward passes that fit train.forward_tokens."""

from __future__ import annotations

from tunesmith.core.loop import forward_groups
from tunesmith.data import Row


def _rows(*lengths: int) -> list[Row]:
    return [Row(input_ids=[1] * n, labels=[1] * n, position_ids=list(range(n))) for n in lengths]


def _lengths(groups: list[list[Row]]) -> list[list[int]]:
    return [[len(r.input_ids) for r in g] for g in groups]


def test_groups_fit_the_limit_counting_padding_to_the_longest_row() -> None:
    # 3 + 5 -> 2 x 5 = 10 fits; adding 4 would make 3 x 5 = 15 > 12; 4 + 2 -> 2 x 4 = 8 fits
    assert _lengths(forward_groups(_rows(3, 5, 4, 2), 12)) == [[3, 5], [4, 2]]


def test_a_row_longer_than_the_limit_goes_alone_and_order_is_kept() -> None:
    assert _lengths(forward_groups(_rows(2, 20, 2, 2), 8)) == [[2], [20], [2, 2]]


def test_no_limit_is_one_pass_and_nothing_is_lost() -> None:
    rows = _rows(7, 1, 9)
    assert _lengths(forward_groups(rows, None)) == [[7, 1, 9]]
    assert forward_groups([], 16) == []
    assert sum(len(g) for g in forward_groups(rows, 9)) == 3
