"""The layout: the pipeline (kidneyseg_utils) never imports the studies (kidneyseg_studies), notebook
03 needs only the pipeline, and the notebooks use public names only."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kidneyseg_studies as ks
import kidneyseg_utils as ku

REPO = Path(ku.__file__).parent
MODULES = {"ku": ku, "ks": ks}


def _imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_the_pipeline_never_imports_the_studies_and_03_needs_only_the_pipeline():
    assert "kidneyseg_studies" not in _imported_modules(Path(ku.__file__).read_text(encoding="utf-8"))
    assert "kidneyseg_utils" in _imported_modules(Path(ks.__file__).read_text(encoding="utf-8"))
    probe = "import kidneyseg_studies\n"
    assert "kidneyseg_studies" in _imported_modules(probe)  # the check above can fail
    train = _notebook_code(next((REPO / "notebooks").glob("03_*.ipynb")))
    assert "ks." not in train and "kidneyseg_studies" not in _imported_modules(train)


def test_the_notebooks_use_only_public_names_that_exist():
    notebooks = "\n".join(_notebook_code(p) for p in sorted((REPO / "notebooks").glob("*.ipynb")))
    for alias, module in MODULES.items():
        used = set(re.findall(rf"\b{alias}\.(\w+)", notebooks))
        assert used, f"no {alias}.<name> found in the notebooks"
        assert sorted(name for name in used if name.startswith("_") or not hasattr(module, name)) == []


def test_one_release_number_for_both_modules_and_the_project():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"', pyproject, flags=re.M).group(1) == ku.__version__
    assert ks.__version__ == ku.__version__


@pytest.mark.slow  # a fresh Python process imports torch
def test_the_studies_refuse_a_pipeline_of_another_release(tmp_path):
    """Beside a kidneyseg_utils.py of another release, importing the studies names both scripts."""
    (tmp_path / "kidneyseg_utils.py").write_text('__version__ = "0.0.0"\n')
    shutil.copy(ks.__file__, tmp_path / "kidneyseg_studies.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import kidneyseg_studies"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "ImportError" in proc.stderr
    assert "kidneyseg-utils and kidneyseg-studies" in proc.stderr and "is 0.0.0" in proc.stderr


def test_module_lines_counts_sections_and_kinds_by_hand():
    sys.path.insert(0, str(REPO / "tools"))
    import module_lines

    text = (  # lines: docstring, code, blank, 3 comments, 2 blank, code, 2 docstring, code
        '"""Doc."""\nimport os\n\n# ====\n# 1. One: first\n# ====\n\n\n'
        'def f():\n    """Two\n    lines."""\n    return 1  # code\n'
    )
    assert module_lines.sections(text) == {"header": 3, "1. One": 9}
    assert module_lines.kinds(text) == {"code": 3, "docstring": 3, "comment": 3, "blank": 3, "total": 12}
    for name in module_lines.MODULES:
        real = (REPO / name).read_text(encoding="utf-8")
        assert sum(module_lines.sections(real).values()) == module_lines.kinds(real)["total"]
