"""Reward functions: built-ins, weights, and clear errors for faulty user functions."""

from __future__ import annotations

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.rollout.rewards import RewardSet, resolve_reward


def _score(specs, completions, weights=None, answer=None):
    answers = answer if answer is not None else ["42"] * len(completions)
    return RewardSet(specs, weights).score(["q"] * len(completions), [[]] * len(completions), completions,
                                            {"answer": answers})


def test_builtins_and_weights() -> None:
    scored = _score(["exact_match", "regex:^\\d+$", "length_penalty:4"], [" 42 ", "forty-two", "123456"],
                    weights=[2.0, 1.0, 1.0])
    assert scored.parts["exact_match"] == [1.0, 0.0, 0.0]
    assert scored.parts["regex:^\\d+$"] == [0.0, 0.0, 1.0]
    assert scored.parts["length_penalty:4"] == [0.0, -1.25, -0.5]
    assert scored.total == pytest.approx([2.0 + 0.0 + 0.0, 0.0 + 0.0 - 1.25, 0.0 + 1.0 - 0.5])


def bad_length(prompts, completions, **_):
    return [1.0]


def raises(prompts, completions, **_):
    raise ValueError("boom")


def not_a_number(prompts, completions, **_):
    return ["x"] * len(completions)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bad_length", "returned 1 values for 2 completions"), ("raises", "raised ValueError: boom"),
     ("not_a_number", "returned 'x' for completion 0")],
)
def test_faulty_reward_functions_are_named(name: str, expected: str) -> None:
    spec = f"tests.unit.test_rewards:{name}"
    with pytest.raises(TunesmithError) as info:
        _score([spec], ["a", "b"])
    assert spec in str(info.value) and expected in str(info.value) and "checkpoint is intact" in str(info.value)


def test_unknown_and_bad_specs() -> None:
    with pytest.raises(TunesmithError, match="built-in rewards are exact_match"):
        resolve_reward("nope")
    with pytest.raises(TunesmithError, match="not a valid regular expression"):
        resolve_reward("regex:(")
    with pytest.raises(TunesmithError, match="positive number of characters"):
        resolve_reward("length_penalty:x")
    with pytest.raises(TunesmithError, match="has no function 'missing'"):
        resolve_reward("tests.unit.test_rewards:missing")
