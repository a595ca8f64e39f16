"""Read held-out rows (for evaluation, and the prompts of RL): a prompt conversation and, where the data has
one, the reference answer.

Every training format works (prompt/completion or prompt/answer, messages, alpaca, sharegpt),
read and normalised by `tunesmith.data` exactly as for training; the last assistant turn is the
reference and everything before it the prompt. Rows may also hold a prompt only: a `prompt`
field alone, or `messages`/`conversations` ending in a user turn; their reference is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.formats import (
    COMPLETION_FIELDS,
    EXPECTED_FIELDS,
    SHAREGPT_ROLES,
    bad_value,
    fitting_formats,
    normalise_records,
)
from tunesmith.data.readers import is_text, load_records
from tunesmith.errors import TunesmithError


@dataclass
class EvalExample:
    """One evaluation row: the conversation up to the answer, and the reference answer if any."""

    index: int  # position in the data file (0-based)
    location: str  # "test.jsonl line 4": where the row came from, for error messages
    messages: list[dict[str, str]]  # the prompt conversation, ending in a user turn
    reference: str | None  # the expected answer (last assistant turn, completion or answer field)
    prompt: str  # the prompt shown in reports: the last user message
    fields: dict[str, Any] = field(default_factory=dict)  # other fields of the record, for user metrics


PROMPT_ONLY = "prompt"  # rows with a `prompt` field and no answer field
# The fields each format reads; everything else in a record goes to EvalExample.fields.
_CONSUMED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", *COMPLETION_FIELDS),
    PROMPT_ONLY: ("prompt",),
}
# Conversations that do not end in an assistant turn get this placeholder answer so the training normaliser
# (which insists on an assistant turn) checks them too; it is removed again at once.
_PLACEHOLDER = {"role": "assistant", "content": "(placeholder answer)"}
_FAMILY = {"prompt_completion": PROMPT_ONLY}  # prompt-only and prompt+answer rows may share a file
_MAX_LISTED_PROBLEMS = 10


def load_eval_examples(source: str, split: str = "train") -> list[EvalExample]:
    """Every row of `source` as an EvalExample (prompt conversation, reference or None, other fields)."""
    records = load_records(source, split)
    shapes = [_shape(record, where) for record, where in records]
    _check_one_family(records, shapes, source)

    examples: list[EvalExample] = []
    problems: list[str] = []
    for index, ((record, where), shape) in enumerate(zip(records, shapes)):
        try:
            messages = _normalised_messages(record, where, shape, source)
        except TunesmithError as exc:  # one record's problems; collect them all before raising
            problems += exc.problems or [str(exc)]
            continue
        reference = None
        if messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
        problem = _prompt_problem(messages, where)
        if problem:
            problems.append(problem)
            continue
        fields = {k: v for k, v in record.items() if k not in _CONSUMED[shape]}
        prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        examples.append(EvalExample(index=index, location=where, messages=messages, reference=reference,
                                    prompt=prompt, fields=fields))
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise TunesmithError(f"{len(problems)} rows of {source} cannot be evaluated:", problems=shown)
    return examples


def _shape(record: dict, where: str) -> str:
    fits = [f for f in fitting_formats(record) if f != "text"]
    if fits:
        return fits[0]  # the most structured format the record fits, as training would pick
    if "prompt" in record:
        return PROMPT_ONLY
    if "text" in record:
        raise TunesmithError(
            f"{where}: plain text (field 'text') has no prompt to answer; evaluation needs prompts: "
            f"{_expected()}"
        )
    raise TunesmithError(f"{where}: fields {{{', '.join(map(str, record))}}} hold no prompt; evaluation needs {_expected()}")


def _check_one_family(records: list, shapes: list[str], source: str) -> None:
    first_family = _FAMILY.get(shapes[0], shapes[0])
    for (_, where), shape in zip(records, shapes):
        if _FAMILY.get(shape, shape) != first_family:
            raise TunesmithError(
                f"{source} mixes data formats: {records[0][1]} is {shapes[0]} data but {where} is {shape} data; "
                f"every row must use one format ({_expected()})"
            )


def _normalised_messages(record: dict, where: str, shape: str, source: str) -> list[dict]:
    if shape == PROMPT_ONLY:
        prompt = record["prompt"]
        if not is_text(prompt):
            raise TunesmithError(f"{where}: field 'prompt' must be a string, got {bad_value(prompt)}")
        return [{"role": "user", "content": prompt}]
    open_ended = _lacks_final_answer(record, shape)
    if open_ended:
        key = "messages" if shape == "messages" else "conversations"
        placeholder = _PLACEHOLDER if shape == "messages" else {"from": "gpt", "value": _PLACEHOLDER["content"]}
        record = {**record, key: [*record[key], placeholder]}
    ((normalised, _),) = normalise_records([(record, where)], shape, source)
    messages = normalised["messages"]
    return messages[:-1] if open_ended else messages


def _lacks_final_answer(record: dict, shape: str) -> bool:
    """A conversation whose last turn is not the assistant's: a prompt without a reference."""
    turns = record.get("messages" if shape == "messages" else "conversations")
    if shape not in ("messages", "sharegpt") or not isinstance(turns, list) or not turns:
        return False
    last = turns[-1]
    if not isinstance(last, dict):
        return False
    speaker = last.get("role") if shape == "messages" else SHAREGPT_ROLES.get(str(last.get("from")))
    return speaker != "assistant"


def _prompt_problem(messages: list[dict], where: str) -> str | None:
    if not messages or messages[-1]["role"] != "user":
        last = messages[-1]["role"] if messages else "nothing"
        return (
            f"{where}: the prompt conversation (the turns before the reference answer) ends with {last}, not a "
            "user turn; an evaluation row is a conversation ending in the user's question, optionally followed "
            "by the expected assistant answer"
        )
    return None


def _expected() -> str:
    return (
        f"prompt_completion: {EXPECTED_FIELDS['prompt_completion']}; messages: {{messages}} ending in the "
        f"reference assistant turn or a user turn; alpaca: {EXPECTED_FIELDS['alpaca']}; sharegpt: "
        "{conversations}; or {prompt} alone"
    )
