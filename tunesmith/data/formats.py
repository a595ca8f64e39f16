"""Detect the data format from record fields and normalise records to text or chat messages.

A normalised record is either {"text": str} or {"messages": [{"role": str, "content": str}, ...]}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tunesmith.data.readers import JsonLiteral, is_text
from tunesmith.errors import TunesmithError

FORMATS = ("text", "prompt_completion", "messages", "alpaca", "sharegpt")
COMPLETION_FIELDS = ("completion", "response", "answer")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
EXPECTED_FIELDS = {
    "text": "{text}",
    "prompt_completion": "{prompt, completion} (or response / answer instead of completion)",
    "messages": "{messages}",
    "alpaca": "{instruction, output} (input optional)",
    "sharegpt": "{conversations}",
}
# When every record fits several formats (e.g. both `messages` and a pre-rendered `text`),
# the most structured one wins: it carries the loss mask.
_PRIORITY = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
_MAX_LISTED_PROBLEMS = 10


class _RecordProblem(Exception):
    """One record does not fit its format; collected so all problems are reported together."""


def fitting_formats(record: dict) -> list[str]:
    """The formats whose required fields this record has, most structured first."""
    keys = record.keys()
    fits = []
    if "messages" in keys:
        fits.append("messages")
    if "conversations" in keys:
        fits.append("sharegpt")
    if "instruction" in keys and "output" in keys:
        fits.append("alpaca")
    if "prompt" in keys and any(f in keys for f in COMPLETION_FIELDS):
        fits.append("prompt_completion")
    if "text" in keys:
        fits.append("text")
    return fits


def candidate_formats(records: Iterable, source: str) -> set[str]:
    """Formats that every record fits; errors name a record that fits none or the two that disagree."""
    candidates = set(FORMATS)
    narrowed_by: tuple[dict, str] | None = None  # the record that last narrowed `candidates`
    for record, where in _pairs(records, source):
        fits = fitting_formats(record)
        if not fits:
            if "chosen" in record and "rejected" in record:
                raise TunesmithError(
                    f"{where}: fields {_fields(record)} are preference data (chosen / rejected answers); train on "
                    "them with method: dpo or method: reward, or give sft data (expected one of: "
                    f"{_expected_text()})"
                )
            raise TunesmithError(
                f"{where}: fields {_fields(record)} fit no data format; expected one of: {_expected_text()}"
            )
        narrowed = candidates & set(fits)
        if not narrowed:
            assert narrowed_by is not None  # the first record always leaves some candidates
            prev_record, prev_where = narrowed_by
            raise TunesmithError(
                f"{source} mixes data formats: {prev_where} has fields {_fields(prev_record)} "
                f"({' / '.join(fitting_formats(prev_record))}) but {where} has fields {_fields(record)} "
                f"({' / '.join(fits)}); every record must use one format (expected one of: {_expected_text()})"
            )
        if narrowed_by is None or narrowed != candidates:
            narrowed_by = (record, where)
        candidates = narrowed
    if narrowed_by is None:
        raise TunesmithError(f"{source}: the dataset is empty (no records); give at least one record")
    return candidates


def detect_format(records: Iterable, source: str) -> str:
    """The one format all records share: text, prompt_completion, messages, alpaca or sharegpt."""
    candidates = candidate_formats(records, source)
    return next(f for f in _PRIORITY if f in candidates)


def normalise_records(records: Iterable, fmt: str, source: str) -> list[tuple[dict, str]]:
    """Convert (record, location) pairs of format `fmt` to {"text"} or {"messages"} records; all problems at once."""
    if fmt not in _CONVERTERS:
        raise TunesmithError(f"data.format: expected auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    convert = _CONVERTERS[fmt]
    out: list[tuple[dict, str]] = []
    problems: list[str] = []
    for record, where in _pairs(records, source):
        try:
            out.append((convert(record, where), where))
        except _RecordProblem as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        noun = "record does" if len(problems) == 1 else "records do"
        raise TunesmithError(
            f"{len(problems)} {noun} not fit the {fmt} format in {source} ({fmt} data needs fields "
            f"{EXPECTED_FIELDS[fmt]}):",
            problems=shown,
        )
    return out


# ---------------------------------------------------------------- one converter per format


def _text(record: dict, where: str) -> dict:
    return {"text": _string(record, "text", where, "text")}


def _prompt_completion(record: dict, where: str) -> dict:
    prompt = _string(record, "prompt", where, "prompt_completion")
    name = next((f for f in COMPLETION_FIELDS if f in record), "completion")
    completion = _string(record, name, where, "prompt_completion")
    if not completion.strip():
        raise _RecordProblem(f"{where}: field {name!r} is empty; every sample needs a response to learn")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def _messages(record: dict, where: str) -> dict:
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _RecordProblem(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, got {_show(raw)}")
    messages = []
    for j, message in enumerate(raw):
        field = f"messages[{j}]"
        if not isinstance(message, dict):
            raise _RecordProblem(f"{where}: {field} must be an object with role and content, got {_show(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _RecordProblem(f"{where}: {field}.role is {_show(role)}; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _content_text(message.get("content"), f"{field}.content", where)})
    _check_conversation(messages, where, "messages")
    return {"messages": messages}


def _alpaca(record: dict, where: str) -> dict:
    instruction = _string(record, "instruction", where, "alpaca")
    extra = record.get("input")
    if extra is not None and not is_text(extra):
        raise _RecordProblem(f"{where}: field 'input' must be a string, got {_show(extra)}{_quote_hint(extra)}")
    output = _string(record, "output", where, "alpaca")
    if not output.strip():
        raise _RecordProblem(f"{where}: field 'output' is empty; every sample needs a response to learn")
    user = instruction + "\n\n" + extra if extra else instruction
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _sharegpt(record: dict, where: str) -> dict:
    raw = record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise _RecordProblem(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects, got {_show(raw)}")
    messages = []
    for j, turn in enumerate(raw):
        field = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise _RecordProblem(f"{where}: {field} must be an object with from and value, got {_show(turn)}")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise _RecordProblem(f"{where}: {field}.from is {_show(speaker)}; expected one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if not is_text(value):
            raise _RecordProblem(f"{where}: {field}.value must be a string, got {_show(value)}{_quote_hint(value)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    _check_conversation(messages, where, "conversations")
    return {"messages": messages}


_CONVERTERS: dict[str, Callable[[dict, str], dict]] = {
    "text": _text,
    "prompt_completion": _prompt_completion,
    "messages": _messages,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
}


# ---------------------------------------------------------------- helpers


def _string(record: dict, name: str, where: str, fmt: str) -> str:
    if name not in record:
        raise _RecordProblem(f"{where}: field {name!r} is missing (fields seen: {_fields(record)}; {fmt} data needs {EXPECTED_FIELDS[fmt]})")
    value = record[name]
    if not is_text(value):
        raise _RecordProblem(f"{where}: field {name!r} must be a string, got {_show(value)}"
                             f"{_quote_hint(value) or '; store it as text'}")
    return value


def _content_text(content: object, field: str, where: str) -> str:
    if is_text(content):
        assert isinstance(content, str)
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), JsonLiteral):
                raise _RecordProblem(f"{where}: {field}[{k}].text must be a string, got {_show(part['text'])}"
                                     f"{_quote_hint(part['text'])}")
            if not (isinstance(part, dict) and part.get("type") == "text" and is_text(part.get("text"))):
                raise _RecordProblem(
                    f"{where}: {field}[{k}] is {_show(part)}; only text parts {{\"type\": \"text\", \"text\": ...}} are supported"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _RecordProblem(f"{where}: {field} must be a string or a list of text parts, got {_show(content)}"
                         f"{_quote_hint(content)}")


def _check_conversation(messages: list[dict], where: str, field: str) -> None:
    assistant_turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise _RecordProblem(f"{where}: the conversation in {field!r} has no assistant turn; there is nothing to learn")
    if assistant_turns[0] == 0:
        # Nothing precedes it to render as the prompt, so its span cannot be told from the template's header.
        raise _RecordProblem(f"{where}: {field}[0] is an assistant turn; a conversation must start with a user or system message")
    for j in assistant_turns:
        if not messages[j]["content"].strip():
            raise _RecordProblem(f"{where}: {field}[{j}] (assistant) has empty content; every assistant turn needs text to learn")


def bad_value(value: object) -> str:
    """How an error shows a value that should have been text: `null`, `dict {...}`, or `number 42; if it is meant
    as text, write it in quotes: "42"`."""
    return _show(value) + _quote_hint(value)


def _quote_hint(value: object) -> str:
    if isinstance(value, JsonLiteral):
        return f"; if it is meant as text, write it in quotes: \"{value}\""
    return ""


def _pairs(records: Iterable, source: str) -> Iterable[tuple[dict, str]]:
    for i, item in enumerate(records, 1):
        if isinstance(item, tuple):
            yield item
        else:
            yield item, f"{source} record {i}"


def _fields(record: dict) -> str:
    return "{" + ", ".join(str(k) for k in record) + "}"


def _expected_text() -> str:
    return "; ".join(f"{fmt}: {fields}" for fmt, fields in EXPECTED_FIELDS.items())


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, JsonLiteral):
        return f"{value.kind()} {value}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text
