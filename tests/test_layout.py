"""The module's layout: part I (the pipeline) never uses part II (the studies), and the table of
contents in the module docstring lists the sections that are there, in their order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kidneyseg_utils as ku

SOURCE = Path(ku.__file__).read_text(encoding="utf-8")
PART_TWO = "# PART II."


def _top_level_names(nodes: list[ast.stmt]) -> dict[str, ast.stmt]:
    names = {}
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: node for t in targets if isinstance(t, ast.Name)})
    return names


def _parts() -> tuple[dict[str, ast.stmt], dict[str, ast.stmt]]:
    boundary = next(i for i, line in enumerate(SOURCE.splitlines(), 1) if line.startswith(PART_TWO))
    body = ast.parse(SOURCE).body
    return (
        _top_level_names([n for n in body if n.lineno < boundary]),
        _top_level_names([n for n in body if n.lineno > boundary]),
    )


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def test_the_pipeline_never_uses_the_studies():
    pipeline, studies = _parts()
    assert len(pipeline) > 100 and len(studies) > 40, "the PART II marker moved or vanished"
    backwards = {
        name: sorted(_used_names(node) & set(studies))
        for name, node in pipeline.items()
        if _used_names(node) & set(studies)
    }
    assert backwards == {}, f"pipeline definitions that use study definitions: {backwards}"


def test_the_check_catches_a_backward_call():
    """The check above is not vacuous: a pipeline function calling a study function is found."""
    pipeline, studies = _parts()
    probe = ast.parse("def train_model():\n    return plot_cases()\n").body[0]
    assert _used_names(probe) & set(studies) == {"plot_cases"}
    assert "train_model" in pipeline and "plot_cases" in studies


def test_table_of_contents_lists_the_sections_in_order():
    headers = re.findall(r"^# (\d+)\. (.+)$", SOURCE, flags=re.M)
    assert [int(n) for n, _ in headers] == list(range(1, len(headers) + 1))
    contents = ku.__doc__
    listed = re.findall(r"^\s+(\d+)\. (.+?)\s+--", contents, flags=re.M)
    assert [(n, t.strip()) for n, t in listed] == [(n, t.split(":")[0].strip()) for n, t in headers]
    part_two_at = SOURCE.index(PART_TWO)
    first_study = min(int(n) for n, _ in re.findall(r"^# (\d+)\. (.+)$", SOURCE[part_two_at:], flags=re.M))
    assert "Part II" in contents and f"{first_study}." in contents.split("Part II")[1]


def test_every_public_name_exists_and_the_notebooks_need_no_private_one():
    missing = [name for name in ku.__all__ if not hasattr(ku, name)]
    assert missing == []
    notebooks = Path(ku.__file__).parent / "notebooks"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(notebooks.glob("*.ipynb")))
    used = set(re.findall(r"ku\.(\w+)", text))
    assert used, "no ku.<name> found in the notebooks"
    assert sorted(used - set(ku.__all__)) == []
