"""The config reference, built from the dataclasses in `tunesmith.config`: every key with its type, default and doc.

`python -m tunesmith.config_docs > docs/config.md` regenerates docs/config.md; `tunesmith config [SECTION]`
prints the same reference in the terminal.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from tunesmith.config import Config, type_name
from tunesmith.errors import TunesmithError

TOP = "top"  # the section of the keys that sit at the top level of a config (method, model, output_dir)
REGENERATE = "python -m tunesmith.config_docs > docs/config.md"


@dataclass
class KeyDoc:
    """One config key: its dotted name, type, default and description."""

    key: str
    type: str
    default: str
    doc: str


@dataclass
class SectionDoc:
    """One section of the config (or its top level) and its keys."""

    name: str
    doc: str
    keys: list[KeyDoc]


def _section_class(tp: Any) -> type | None:
    """The dataclass a field holds (also when it may be null), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def value_text(value: Any) -> str:
    """A default as it would be written in YAML: null, true, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _keys(cls: type, prefix: str) -> list[KeyDoc]:
    hints = typing.get_type_hints(cls)
    return [
        KeyDoc(f"{prefix}{f.name}", type_name(hints[f.name], quote=False), value_text(_default(f)), f.metadata.get("doc", ""))
        for f in dataclasses.fields(cls)
        if _section_class(hints[f.name]) is None
    ]


def sections() -> list[SectionDoc]:
    """Every section of `Config` in declaration order, the top-level keys first (as section `top`)."""
    out = [SectionDoc(TOP, "Keys at the top level of a config.", _keys(Config, ""))]
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        cls = _section_class(hints[f.name])
        if cls is not None:
            out.append(SectionDoc(f.name, (cls.__doc__ or "").strip(), _keys(cls, f"{f.name}.")))
    return out


def section_names() -> list[str]:
    """Names `tunesmith config SECTION` accepts."""
    return [s.name for s in sections()]


def _pick(section: str | None) -> list[SectionDoc]:
    found = sections()
    if section is None:
        return found
    for s in found:
        if s.name == section:
            return [s]
    raise TunesmithError(f"unknown config section {section!r}; the sections are: {', '.join(s.name for s in found)}")


# ---------------------------------------------------------------- markdown


def _escape(text: str) -> str:
    """Escape what a markdown table cell would misread (| and *), leaving `code spans` as they are."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("*", "\\*")
    return "`".join(parts)


def _heading(s: SectionDoc) -> str:
    return "Top level" if s.name == TOP else f"`{s.name}`"


def _anchor(s: SectionDoc) -> str:
    return "top-level" if s.name == TOP else s.name


def reference_markdown(section: str | None = None) -> str:
    """The config reference as markdown: all sections (docs/config.md), or one."""
    chosen = _pick(section)
    lines: list[str] = []
    if section is None:
        lines += [
            "# Config reference",
            "",
            f"<!-- Generated from the dataclasses in tunesmith/config.py; do not edit. Regenerate: {REGENERATE} -->",
            "",
            "A run is configured by an optional YAML file plus `dotted.key=value` overrides",
            "(`tunesmith train [config.yaml] key=value ...`), or by a mapping in Python (`tunesmith.train({...})`).",
            "Every key has the default below except `data.train`, which must be given (`grpo` and `ppo` also need",
            "`rl.rewards` or `rl.reward_model`). `lora: null` trains all weights instead of a LoRA adapter.",
            "`tunesmith config [SECTION]` prints this reference in the terminal.",
            "",
            "Sections: " + ", ".join(f"[{_heading(s)}](#{_anchor(s)})" for s in chosen) + ".",
            "",
        ]
    for s in chosen:
        lines += [f"## {_heading(s)}", "", _escape(s.doc), "", "| key | type | default | description |",
                  "|---|---|---|---|"]
        for k in s.keys:
            lines.append(f"| `{k.key}` | {_escape(k.type)} | `{k.default}` | {_escape(k.doc)} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- terminal


def reference_text(section: str | None = None, width: int = 100) -> str:
    """The config reference as plain text for a terminal: all sections, or one."""
    out: list[str] = []
    for s in _pick(section):
        out += [f"{s.name}: {s.doc}", ""]
        for k in s.keys:
            out.append(f"  {k.key}: {k.type} = {k.default}")
            out += textwrap.wrap(k.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        out.append("")
    return "\n".join(out)


def main() -> None:
    """Write docs/config.md's text to stdout."""
    sys.stdout.write(reference_markdown())


if __name__ == "__main__":
    main()
