"""Rewards of sampled completions: built-in functions, the user's `module:function`, and a reward model.

A reward function is called once per batch as `fn(prompts, completions, **fields) -> list[float]`:
`prompts` and `completions` are lists of strings (the last user message and the generated text), and
every other field of the prompt rows arrives as a list of the same length (the reference answer as
`answer`). Several rewards add up with their weights. A function that raises or returns anything
but one finite number per completion stops the run with a message that names it; checkpoints
already written stay as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunesmith.errors import TunesmithError
from tunesmith.scoring import exact_match as _exact
from tunesmith.scoring import import_module_of, normalise
from tunesmith.scoring import json_equal as _json_equal

RewardFn = Callable[..., Sequence[float]]


def exact_match(prompts: list[str], completions: list[str], answer: list[str | None], **_) -> list[float]:
    """1 when the completion equals the reference answer (whitespace-normalised), else 0."""
    return [0.0 if a is None else _exact("", c, a) for c, a in zip(completions, answer)]


def contains(prompts: list[str], completions: list[str], answer: list[str | None], **_) -> list[float]:
    """1 when the reference answer occurs in the completion (whitespace-normalised), else 0."""
    return [0.0 if a is None else float(normalise(a) in normalise(c)) for c, a in zip(completions, answer)]


def json_equal(prompts: list[str], completions: list[str], answer: list[str | None], **_) -> list[float]:
    """1 when completion and reference parse as equal JSON values, else 0."""
    return [0.0 if a is None else _json_equal("", c, a) for c, a in zip(completions, answer)]


def regex(pattern: str) -> RewardFn:
    """A format check: 1 when the completion matches `pattern` (re.search), else 0."""
    compiled = re.compile(pattern)

    def check(prompts: list[str], completions: list[str], **_) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    check.__qualname__ = f"regex:{pattern}"
    return check


def length_penalty(limit: int) -> RewardFn:
    """0 up to `limit` characters, then −(excess / limit): long answers lose reward in proportion."""

    def penalty(prompts: list[str], completions: list[str], **_) -> list[float]:
        return [-max(0, len(c) - limit) / limit for c in completions]

    penalty.__qualname__ = f"length_penalty:{limit}"
    return penalty


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "contains": contains, "json_equal": json_equal}
NEEDS_ANSWER = {"exact_match", "contains", "json_equal"}


def resolve_reward(spec: str) -> RewardFn:
    """The function a reward spec names: a built-in, regex:PATTERN, length_penalty:N, or module:function."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("regex:"):
        try:
            return regex(spec[len("regex:"):])
        except re.error as exc:
            raise TunesmithError(f"rl.rewards: {spec!r} is not a valid regular expression ({exc})") from None
    if spec.startswith("length_penalty:"):
        text = spec[len("length_penalty:"):]
        if not text.isdigit() or int(text) < 1:
            raise TunesmithError(f"rl.rewards: {spec!r}: length_penalty needs a positive number of characters, e.g. length_penalty:200")
        return length_penalty(int(text))
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        fn = getattr(import_module_of(module_name, spec, kind="reward"), attr, None)
        if not callable(fn):
            raise TunesmithError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
        return fn
    raise TunesmithError(
        f"rl.rewards: {spec!r} is unknown; built-in rewards are {', '.join(BUILTIN)}, regex:PATTERN and "
        "length_penalty:N; for your own give module:function(prompts, completions, **fields) -> list[float]"
    )


@dataclass
class Scored:
    """Total rewards of a batch of completions and each component's values, by name."""

    total: list[float]
    parts: dict[str, list[float]]


class RewardSet:
    """Every reward of a run, resolved once; `score` sums them with their weights."""

    def __init__(self, specs: list[str], weights: list[float] | None, reward_model: str | None = None,
                 reward_model_weight: float = 1.0) -> None:
        self.fns = [(spec, resolve_reward(spec)) for spec in specs]
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        self.reward_model_path = reward_model
        self.reward_model_weight = reward_model_weight
        self._rm = None
        if reward_model is not None:
            from tunesmith.model.reward_model import find_reward_model

            find_reward_model(reward_model)  # a wrong path fails before the model loads

    def check_answers(self, rows_have_answer: bool, source: str) -> None:
        """Built-ins that compare with the reference need prompt rows that carry one."""
        needing = [spec for spec, _ in self.fns if spec in NEEDS_ANSWER]
        if needing and not rows_have_answer:
            raise TunesmithError(
                f"{source}: rl.rewards {needing} compare completions with a reference answer, but these prompt rows "
                "have none; give prompt/completion (or prompt/answer) rows, or messages ending in an assistant turn"
            )

    def score(self, prompts: list[str], conversations: list[list[dict]], completions: list[str],
              fields: dict[str, list]) -> Scored:
        """Weighted sum of every reward for each completion; raises TunesmithError naming a faulty function."""
        n = len(completions)
        total = [0.0] * n
        parts: dict[str, list[float]] = {}
        if n == 0:  # a rank whose share of the prompts is empty: nothing to score, no call
            names = [spec for spec, _ in self.fns] + (["reward_model"] if self.reward_model_path is not None else [])
            return Scored(total=[], parts={name: [] for name in names})
        for (spec, fn), weight in zip(self.fns, self.weights):
            try:
                values = fn(list(prompts), list(completions), **fields)
            except Exception as exc:
                raise TunesmithError(
                    f"reward {spec!r} raised {type(exc).__name__}: {exc}; fix the function (it is called as "
                    "fn(prompts, completions, **fields) with lists); the last checkpoint is intact, so re-running "
                    "the command resumes from it"
                ) from exc
            values = _checked(spec, values, n)
            parts[spec] = values
            total = [t + weight * v for t, v in zip(total, values)]
        if self.reward_model_path is not None:
            values = self._reward_model_scores(conversations, completions)
            parts["reward_model"] = values
            total = [t + self.reward_model_weight * v for t, v in zip(total, values)]
        return Scored(total=total, parts=parts)

    def _reward_model_scores(self, conversations: list[list[dict]], completions: list[str]) -> list[float]:
        from tunesmith.model.reward_model import load_reward_model, score_conversations

        if self._rm is None:
            self._rm = load_reward_model(self.reward_model_path)
        model, tokenizer = self._rm
        full = [[*conv, {"role": "assistant", "content": c}] for conv, c in zip(conversations, completions)]
        return score_conversations(model, tokenizer, full, batch_size=16)


def _checked(spec: str, values: object, n: int) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
        raise TunesmithError(f"reward {spec!r} returned {type(values).__name__}; it must return a list of {n} numbers, "
                             "one per completion; the last checkpoint is intact")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != n:
        raise TunesmithError(f"reward {spec!r} returned {len(values)} values for {n} completions; it must return one "
                             "number per completion; the last checkpoint is intact")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TunesmithError(f"reward {spec!r} returned {v!r} for completion {i}; rewards must be numbers; the last "
                                 "checkpoint is intact") from None
        if not math.isfinite(f):
            raise TunesmithError(f"reward {spec!r} returned {f} for completion {i}; rewards must be finite; the last checkpoint "
                                 "is intact")
        out.append(f)
    return out
