"""The config reference: docs/config.md is current, it covers every field, and `tunesmith config` prints it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from tunesmith import config as config_module
from tunesmith.cli import main
from tunesmith.config import Config
from tunesmith.config_docs import REGENERATE, reference_markdown, reference_text, section_names

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    found = {}
    for f in dataclasses.fields(Config):
        for tp in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                found[f.name] = tp
    return found


def _all_keys() -> list[tuple[str, dataclasses.Field]]:
    keys = [(f.name, f) for f in dataclasses.fields(Config) if f.name not in _sections()]
    for name, cls in _sections().items():
        keys += [(f"{name}.{f.name}", f) for f in dataclasses.fields(cls)]
    return keys


def test_docs_config_md_is_up_to_date() -> None:
    current = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else ""
    assert current == reference_markdown(), f"docs/config.md is out of date; regenerate it with: {REGENERATE}"


def test_every_field_has_a_row_with_its_default_and_doc() -> None:
    rows = {line.split("|")[1].strip(): line for line in reference_markdown().splitlines() if line.startswith("| `")}
    keys = _all_keys()
    assert len(keys) > 70 and set(rows) == {f"`{key}`" for key, _ in keys}
    for key, f in keys:
        doc = f.metadata["doc"]
        assert doc, f"{key} has no doc line in tunesmith/config.py"
        row = rows[f"`{key}`"]
        assert doc.replace("*", "\\*").split("`")[0] in row, key
    assert "| `train.lr` | float | `0.0002` |" in rows["`train.lr`"]
    assert "| `train.max_steps` | int or null | `null` |" in rows["`train.max_steps`"]
    assert "| `eval.metrics` | list of str | `[exact_match, contains]` |" in rows["`eval.metrics`"]
    assert "| `dpo.loss` | sigmoid \\| cdpo \\| ipo \\| simpo \\| orpo | `sigmoid` |" in rows["`dpo.loss`"]
    assert "| `rl.share_prompts` | bool | `true` |" in rows["`rl.share_prompts`"]


def test_a_new_field_shows_up(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(kw_only=True)
    class Extra(config_module.OutputConfig):
        """What the run writes at the end."""

        zip_it: bool = dataclasses.field(default=False, metadata={"doc": "also write run.zip"})

    monkeypatch.setattr(Config, "__annotations__", {**Config.__annotations__, "output": Extra})
    assert "| `output.zip_it` | bool | `false` | also write run.zip |" in reference_markdown()
    assert reference_markdown() != DOCS.read_text(encoding="utf-8")


def test_config_command_prints_one_section_or_all(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "lora"]) == 0
    out = capsys.readouterr().out
    assert out == reference_text("lora")
    assert out.startswith("lora: LoRA adapter settings")
    assert "  lora.r: int = 16\n      adapter rank\n" in out
    assert "train." not in out

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key, _ in _all_keys():
        assert f"  {key}: " in out, key

    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == DOCS.read_text(encoding="utf-8")


def test_unknown_section_names_the_sections(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "loar"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'loar'" in err
    assert "top, data, lora, train, load, dpo, reward, rl, grpo, ppo, eval, output" in err
    assert section_names() == ["top", *_sections()]
