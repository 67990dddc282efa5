"""The house's order, checked: commands on top, stages below, imports pointing one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_livseg"
COMMANDS = {"fit", "prepare", "predict", "evaluate", "export", "phantom", "compare"}
STAGES = ("data", "models", "training", "inference", "serving", "evaluation")
FOUNDATIONS = ("keras_livseg.data.atomic", "keras_livseg.data.errors", "keras_livseg.data.labels", "keras_livseg.data.cases", "keras_livseg.data.dicom")


def _imports(path: Path) -> set[str]:
    """Every keras_livseg module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("keras_livseg")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_livseg"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_top_level_holds_the_commands_only():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == COMMANDS | {"cli"}, modules - COMMANDS
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(STAGES)


def test_no_stage_imports_a_command():
    command_modules = {f"keras_livseg.{name}" for name in COMMANDS | {"cli"}}
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_imports(path) & command_modules)
        for stage in STAGES for path in (PACKAGE / stage).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_report_and_plots_do_not_import_each_other():
    # The report draws with plots; plots and the report both read pairs; nothing points back.
    evaluation = PACKAGE / "evaluation"
    assert "keras_livseg.evaluation.report" not in _imports(evaluation / "plots.py")
    assert "keras_livseg.evaluation.plots" not in _imports(evaluation / "pairs.py")
    assert "keras_livseg.evaluation.report" not in _imports(evaluation / "pairs.py")


def test_foundations_import_no_stage_above_them():
    below = {
        "data/atomic.py": set(), "data/cases.py": set(), "data/errors.py": set(), "data/labels.py": set(),
        "data/dicom.py": {"keras_livseg"},  # the package root, for its version only
        "models/saving.py": {"keras_livseg.models"},
    }
    for rel, allowed in below.items():
        imported = {name for name in _imports(PACKAGE / rel) if not name.startswith(FOUNDATIONS)}
        assert imported <= allowed, (rel, imported - allowed)
