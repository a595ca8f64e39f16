"""Imports run one way: config/ops -> data/model -> core -> methods/rollout -> eval -> the commands on top.

A module may import its own layer and the layers below it, never one above, and never another module's
private (underscore) names. Lazy imports inside functions and imports for type hints count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunesmith

PACKAGE = Path(tunesmith.__file__).parent

# Lowest first. A module's layer is that of the longest prefix listed; anything unlisted is a top-level command.
LAYERS: list[tuple[str, ...]] = [
    ("tunesmith.errors", "tunesmith.config", "tunesmith.scoring", "tunesmith.ops"),
    ("tunesmith.data", "tunesmith.model"),
    ("tunesmith.core",),
    ("tunesmith.methods", "tunesmith.rollout"),
    ("tunesmith.eval",),
]
TOP = len(LAYERS)


def layer_of(module: str) -> int:
    """The layer of a dotted module name (TOP for the commands: cli, run, demo and the package itself)."""
    best, depth = TOP, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = level, prefix.count(".")
    return best


def module_name(path: Path) -> str:
    """tunesmith/model/parts.py -> tunesmith.model.parts; a package's __init__ is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, imported tunesmith module, names taken from it) of every import in a file, at any depth."""
    found = []
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("tunesmith")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("tunesmith"):
                found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def test_layers_are_known() -> None:
    assert layer_of("tunesmith.model.parts") == 1 and layer_of("tunesmith.core.loop") == 2
    assert layer_of("tunesmith.eval.report") == 4 and layer_of("tunesmith.cli") == TOP
    assert layer_of("tunesmith.configuration") == TOP  # a prefix must end at a dot


def test_no_module_imports_a_higher_layer_or_a_private_name() -> None:
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        here = module_name(path)
        for line, target, names in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if layer_of(target) > layer_of(here):
                problems.append(f"{where}: {here} (layer {layer_of(here)}) imports {target} (layer {layer_of(target)})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != here:
                problems.append(f"{where}: {here} imports private {', '.join(private)} from {target}")
    assert not problems, "imports that run the wrong way:\n" + "\n".join(problems)


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = PACKAGE / "ops" / "losses.py"  # layer 0
    tree = imports(bad)
    assert all(layer_of(t) == 0 for _, t, _ in tree)
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from tunesmith.eval.report import write_report\n    from ..data.packing import _p\n")
    (line, target, names), (_, target2, names2) = imports(fake, package="tunesmith.ops")
    assert (line, target, names) == (2, "tunesmith.eval.report", ["write_report"])
    assert (target2, names2) == ("tunesmith.data.packing", ["_p"])
    assert layer_of(target) > layer_of("tunesmith.ops.x")
