"""tunesmith: fine-tune pretrained causal language models for one use, and prove it worked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tunesmith.config import Config
    from tunesmith.core.loop import LoopCallback
    from tunesmith.run import RunResult

__all__ = ["TunesmithError", "train", "__version__"]
__version__ = "0.1.0"


def train(config: Config | dict[str, Any] | str, overrides: list[str] | None = None, *,
          callbacks: Sequence[LoopCallback] = ()) -> RunResult:
    """Run one fine-tuning job from a Config, a dict, or a YAML path (plus `key=value` overrides)."""
    from tunesmith.run import train as _train

    return _train(config, overrides, callbacks=callbacks)
