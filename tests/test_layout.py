"""The run directory's file names have one owner, :mod:`rl_plasticity.layout` (checked statically with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

from rl_plasticity import layout

ROOT = Path(__file__).resolve().parents[1]
#: The names no other module may spell out (``latest`` is also an ordinary dict key, so it is left out).
NAMES = {
    layout.CONFIG_FILE,
    layout.PROVENANCE_FILE,
    layout.LOCK_FILE,
    layout.MODEL_FILE,
    layout.CHECKPOINTS_DIR,
    layout.SUMMARY_FILE,
    layout.PROBE_SETS_FILE,
    layout.FIRST_VISIT_FILE,
}


def spelled_out(source: str) -> list[str]:
    """The string constants of ``source`` that are layout names (docstrings, which only mention them, aside)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in NAMES and id(node) not in docstrings
    ]


def test_only_the_layout_module_names_run_directory_files() -> None:
    found = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "rl_plasticity").rglob("*.py"))
        if path.name != "layout.py" and (names := spelled_out(path.read_text()))
    }
    assert found == {}


def test_the_check_sees_a_spelled_out_name() -> None:
    assert spelled_out('"""Writes task_summary.csv."""\npath = run_dir / "task_summary.csv"\n') == ["task_summary.csv"]
