"""The loop's contract with a method, written down.

A method is a module under `tunesmith/methods/` that satisfies `Method`: it builds its data, wraps the model
if it trains more than the LM, makes the `Objective` the loop trains, and saves its outputs. The loop
(`tunesmith.core.loop.train_loop`) calls nothing on an objective but the hooks named in `Objective`, and
calls every one of them: a method overrides what it does differently, and the defaults say what the
plain next-token and preference methods do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.core.distributed import DistInfo
    from tunesmith.data import TokenizedData


@dataclass
class StepOutcome:
    """What one training step did: its mean loss, gradient norm, statistic means, tokens seen (global), and
    what its loss was averaged over (tokens or pairs, summed over its updates and ranks)."""

    loss: float | None
    grad_norm: float
    stats: dict[str, float]
    tokens: int = 0
    count: float = 0.0


class StepTools(Protocol):
    """What the loop lends an objective's `train_step` and `evaluate_rows`."""

    run_dir: Path | None  # the run folder (None when training in memory only)
    info: DistInfo  # this process's rank among the job's (RL shares a step's prompts out by it)

    def update(self, micro: list[dict[str, torch.Tensor]], *, filler: dict[str, torch.Tensor] | None = None) -> StepOutcome:
        """One optimizer update from collated micro-batches, the loss normalised over all of them and every rank.

        A rank with no micro-batch in an update that other ranks train on passes `filler`, any batch the objective
        accepts: it runs forward and backward with its loss times zero, so the ranks' gradient all-reduce still meets,
        and counts for nothing."""
        ...

    def update_rows(self, rows: list) -> StepOutcome:
        """One optimizer update from this rank's rows of the step: collated into micro-batches that fit
        `train.forward_tokens`, then `update`; the outcome counts the step's tokens."""
        ...

    def eval_loss(self, rows: list) -> dict[str, float]:
        """Mean loss per counted item over held-out rows, sharded across ranks (and perplexity when reported)."""
        ...


class Objective(nn.Module):
    """What the loop trains: `forward(**batch)` is the method's loss on one collated batch.

    forward returns (sum of the losses of everything counted, that count, sums of statistics to log), so the
    loop can normalise over a whole global batch; `count(batch)` says the count before the forward runs.
    """

    reports_perplexity: bool = False  # the loss is a mean token NLL, so eval also logs exp(loss)

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss sum, count, statistic sums) of one batch."""
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What one batch's loss is averaged over (tokens, pairs, completions)."""
        raise NotImplementedError

    def train_step(self, rows: list, *, step: int, tools: StepTools) -> StepOutcome:
        """One training step on this rank's rows: by default, one optimizer update over them.

        RL methods roll out, score and make several updates here instead.
        """
        return tools.update_rows(rows)

    def evaluate_rows(self, rows: list, *, step: int, tools: StepTools) -> dict[str, float]:
        """Held-out metrics logged as `eval_*`: by default the mean eval loss (RL: the mean reward of greedy answers)."""
        return tools.eval_loss(rows)

    def method_state(self) -> dict[str, Any]:
        """What the method carries between steps, saved in every checkpoint (PPO: its adaptive KL coefficient)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore `method_state()` from a checkpoint; called on every start, with {} on a fresh run."""


@runtime_checkable
class Method(Protocol):
    """A training method: one module under `tunesmith/methods/`, named by `method:` in the config."""

    NAME: str
    GENERATES: bool  # the tuned model writes answers, so the base-vs-tuned report applies

    def build_data(self, cfg: Config, tokenizer: Any, source: str) -> TokenizedData:
        """Token rows of `source`, ready for `collate`."""
        ...

    def collate(self, rows: list, pad_id: int) -> dict[str, torch.Tensor]:
        """One batch of tensors from rows."""
        ...

    def wrap_model(self, model: nn.Module, cfg: Config) -> nn.Module:
        """What trains: the LM itself, or the LM with a head (reward, value)."""
        ...

    def loss_module(self, model: nn.Module, cfg: Config, tokenizer: Any) -> Objective:
        """The objective the loop trains."""
        ...

    def prepare(self, objective: Objective, data: TokenizedData, cfg: Config, info: DistInfo) -> None:
        """Work before the first step (DPO: the reference's log-probs, once)."""
        ...

    def save_outputs(self, model: nn.Module, tokenizer: Any, cfg: Config, run_dir: Path) -> dict[str, str]:
        """Write the run's outputs; returns {name: path}."""
        ...
