"""tunesmith: fine-tune pretrained causal language models for one use, and prove it worked."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError

# peft imports bitsandbytes whenever it is installed (the `quant` extra), and on CPUs with AVX512-BF16 bitsandbytes
# then warns that it could not fetch an optional inference kernel from the hub (`pip install kernels`). tunesmith
# never uses that kernel (model.loading keeps 4-bit layers off it) and downloads nothing at run time.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
