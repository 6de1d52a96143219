"""The package layout rules: components never import recipes, the CLI, the trainer or the report."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "alignguard"
COMPONENTS = [
    "fisher.py",
    "accumulator.py",
    "model_pass.py",
    "factor_checks.py",
    "label_sampling.py",
    "fingerprint.py",
    "subspace.py",
    "regularizers.py",
    "projection.py",
    "sketch.py",
    "targets.py",
    "data.py",
    "config_values.py",
    "drift_budget.py",
    "gradient_surgery.py",
    "self_screen.py",
]
FORBIDDEN = ("alignguard.recipes", "alignguard.cli", "alignguard.trainer", "alignguard.report")


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by `path` (relative imports resolved against the package)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _component_files():
    files = [PKG / f for f in COMPONENTS] + sorted((PKG / "driftcheck").glob("*.py"))
    return [pytest.param(f, id=str(f.relative_to(PKG))) for f in files]


@pytest.mark.parametrize("path", _component_files())
def test_components_import_no_recipe_cli_trainer_or_report(path):
    bad = sorted(m for m in _imports(path) if m.startswith(FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_import_checker_sees_relative_imports(tmp_path):
    # The checker itself must resolve `from ..recipes import x` inside a subpackage, or the test above is empty.
    mods = _imports(PKG / "driftcheck" / "run.py")
    assert any(m.startswith("alignguard.") for m in mods)


@pytest.mark.parametrize("path", [pytest.param(f, id=f.name) for f in sorted((PKG / "recipes").glob("*.py"))])
def test_recipes_import_no_cli(path):
    # The CLI calls recipes; a recipe importing the CLI would make the library depend on argparse wiring.
    bad = sorted(m for m in _imports(path) if m.startswith("alignguard.cli"))
    assert not bad, f"recipes/{path.name} imports {bad}"
