"""Training methods: each file holds what is its own (data, loss module); the loop is shared."""

from __future__ import annotations

from types import ModuleType


def get_method(name: str) -> ModuleType:
    """The module implementing method `name`."""
    from tunesmith.methods import pretrain, sft

    return {"sft": sft, "pretrain": pretrain}[name]
