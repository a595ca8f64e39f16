"""The new-run form: generated from the config dataclasses, checked by the same code as `tunesmith train`.

The page sends each field as the text a person would type after `key=` on the command line. `overrides` turns the
fields that differ from their defaults into exactly those `key=value` overrides, so the checks, their messages,
the CLI command and the YAML the page shows are the command line's own.
"""

from __future__ import annotations

import dataclasses
import shlex
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.config import Config, apply_overrides, load_config
from tunesmith.config_docs import TOP, sections
from tunesmith.errors import TunesmithError

# Sections that only some methods read; every other section applies to every method.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "dpo": ("dpo",),
    "reward": ("reward",),
    "rl": ("grpo", "ppo"),
    "grpo": ("grpo",),
    "ppo": ("ppo",),
    "eval": ("sft", "pretrain", "dpo", "grpo", "ppo"),  # a reward model writes no answers to compare
}
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "data.test": ("sft", "pretrain", "dpo", "grpo", "ppo"),
}
LORA_KEY = "lora"  # the form's choice between a LoRA adapter and full fine-tuning (`lora=null`)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _field_types() -> dict[str, Any]:
    """Each dotted key's Python type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        cls = next((a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)
        if cls is None:
            out[f.name] = tp
            continue
        for name, sub in typing.get_type_hints(cls).items():
            out[f"{f.name}.{name}"] = sub
    return out


def _widget(tp: Any) -> tuple[str, list[str]]:
    """(kind of input, choices) for a type: bool and Literal fields are choices, the rest text."""
    args = typing.get_args(tp)
    if tp is bool:
        return "choice", ["true", "false"]
    if typing.get_origin(tp) is Literal:
        return "choice", [str(a) for a in args]
    literal = [a for a in args if typing.get_origin(a) is Literal]
    if literal and type(None) in args:
        return "choice", [str(a) for a in typing.get_args(literal[0])] + ["null"]
    return "text", []


def schema() -> dict[str, Any]:
    """The form: sections in declaration order, each key with its type, default, documentation and the methods
    it applies to (all when absent)."""
    types = _field_types()
    methods = list(typing.get_args(types["method"]))
    out = []
    for s in sections():
        keys = []
        for k in s.keys:
            kind, choices = _widget(types[k.key])
            keys.append({"key": k.key, "type": k.type, "default": k.default, "doc": k.doc, "widget": kind,
                         "choices": choices, "methods": list(METHOD_KEYS.get(k.key, ()))})
        if s.name == TOP:
            keys.append({"key": LORA_KEY, "type": "LoRA adapter or full fine-tuning", "default": "adapter",
                         "doc": "train a LoRA adapter (the lora section), or all weights (lora: null)",
                         "widget": "choice", "choices": ["adapter", "null"], "methods": []})
        out.append({"name": s.name, "doc": s.doc, "keys": keys, "methods": list(METHOD_SECTIONS.get(s.name, ()))})
    return {"sections": out, "methods": methods}


def applies(key: str, method: str) -> bool:
    """Whether a key is read by `method` (the form hides it otherwise)."""
    section = key.split(".", 1)[0] if "." in key else None
    if section in METHOD_SECTIONS and method not in METHOD_SECTIONS[section]:
        return False
    return key not in METHOD_KEYS or method in METHOD_KEYS[key]


def overrides(values: dict[str, str]) -> list[str]:
    """The `key=value` overrides of the fields that differ from their defaults (and apply to the method)."""
    defaults = {k.key: k.default for s in sections() for k in s.keys}
    method = values.get("method") or defaults["method"]
    full = (values.get(LORA_KEY) or "adapter") == "null"
    out = []
    for key, default in defaults.items():
        text = values.get(key)
        if text is None or not applies(key, method) or (full and key.startswith("lora.")):
            continue
        text = text.strip()
        if text != default and not (text == "" and default in ("null", "''")):
            out.append(f"{key}={text}")
    if full:
        out.append("lora=null")
    return out


def field_of(problem: str, keys: list[str]) -> str | None:
    """The form field a message of the config checks is about (its text starts with the dotted key)."""
    head = problem.split(":", 1)[0].split(" / ")[0].split("[")[0].strip()
    if head in keys:
        return head
    for key in sorted(keys, key=len, reverse=True):
        if head.startswith(key + "."):
            return key
    return None


def check(values: dict[str, str], runs: Path) -> dict[str, Any]:
    """Check the form as `tunesmith train` would: {ok, problems: [{field, message}], overrides, cli, yaml}.

    An output_dir given as a bare name is that folder of `runs`."""
    name = (values.get("output_dir") or "").strip()
    if name and "/" not in name and name not in (".", ".."):
        values = {**values, "output_dir": str(runs.resolve() / name)}
    items = overrides(values)
    keys = [k.key for s in sections() for k in s.keys] + [LORA_KEY]
    problems: list[dict[str, Any]] = []
    cfg = None
    try:
        cfg = load_config({}, items)  # each override parsed in order, as `tunesmith train` parses them
    except TunesmithError as exc:
        messages = exc.problems or [str(exc)]
        problems = [{"field": field_of(m, keys), "message": m} for m in messages]
    if cfg is not None:
        problems += _check_paths(cfg, runs)
    raw = apply_overrides({}, items)
    return {
        "ok": not problems,
        "problems": problems,
        "overrides": items,
        "cli": "tunesmith train " + " ".join(shlex.quote(i) for i in items),
        "yaml": yaml.safe_dump(raw, sort_keys=False) if raw else "{}\n",
        "output_dir": str(Path(cfg.output_dir).resolve()) if cfg is not None else None,
    }


def _check_paths(cfg: Config, runs: Path) -> list[dict[str, Any]]:
    """What the command line would refuse about the folder and the data before training, said the same way."""
    out = []
    run_dir = Path(cfg.output_dir).resolve()
    root = runs.resolve()
    if run_dir.parent != root:
        out.append({"field": "output_dir", "message": f"output_dir: the dashboard starts runs in its runs folder "
                    f"{root}; give a folder name there, e.g. {root / 'my-run'} (got {cfg.output_dir!r})"})
    else:
        from tunesmith.run import check_run_dir

        try:
            check_run_dir(cfg)
        except TunesmithError as exc:
            out.append({"field": "output_dir", "message": str(exc)})
    for key in ("data.train", "data.eval", "data.test"):
        source = _get(cfg, key)
        path = Path(source).expanduser() if source else None
        if path is None or path.exists() or not (path.is_absolute() or path.suffix.lower() in DATA_SUFFIXES):
            continue
        from tunesmith.data.readers import load_records

        try:
            load_records(source)
        except TunesmithError as exc:
            out.append({"field": key, "message": f"{key}: {exc}"})
    return out


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def default_values() -> dict[str, str]:
    """Every field's default as form text."""
    values = {k.key: k.default for s in sections() for k in s.keys}
    values[LORA_KEY] = "adapter"
    return values

