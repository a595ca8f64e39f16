"""Every method satisfies the loop's written contract (tunesmith.core.contract)."""

from __future__ import annotations

import typing

import pytest

from tunesmith.config import Config
from tunesmith.core.contract import Method, Objective
from tunesmith.methods import get_method

NAMES = typing.get_args(typing.get_type_hints(Config)["method"])


def test_every_config_method_has_its_module() -> None:
    assert set(NAMES) == {"sft", "pretrain", "reward", "dpo", "grpo", "ppo"}
    assert [get_method(n).NAME for n in NAMES] == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_method_module_satisfies_the_protocol(name: str) -> None:
    module = get_method(name)
    assert isinstance(module, Method), f"methods/{name}.py lacks part of tunesmith.core.contract.Method"
    assert isinstance(module.GENERATES, bool)


def test_next_token_methods_say_which_tokens_carry_labels() -> None:
    assert get_method("sft").LABELS == "assistant"
    assert get_method("pretrain").LABELS == "all"


def test_objective_defaults_are_the_plain_step() -> None:
    calls = []

    class Tools:
        run_dir = None

        def update_rows(self, rows):
            calls.append(("update_rows", rows))
            return "outcome"

        def eval_loss(self, rows):
            calls.append(("eval_loss", rows))
            return {"eval_loss": 1.0}

    objective = Objective()
    assert objective.train_step([1, 2], step=0, tools=Tools()) == "outcome"
    assert objective.evaluate_rows([3], step=0, tools=Tools()) == {"eval_loss": 1.0}
    assert calls == [("update_rows", [1, 2]), ("eval_loss", [3])]
    assert objective.method_state() == {} and objective.load_method_state({}) is None
    assert objective.reports_perplexity is False
