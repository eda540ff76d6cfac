"""The notebooks as files: committed clean, one plain ``parameters`` cell, presets that fit them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def test_notebooks_are_clean_and_tagged():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), path.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        source = "".join(tagged[0]["source"])
        for line in source.splitlines():  # plain literals only: NAME = value  # comment
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                assert name.strip().isupper(), line
                compile(value.split("#")[0].strip() or "None", "<parameter>", "eval")


@pytest.mark.parametrize(
    ("preset", "notebook"),
    [
        ("cpu_quick.yaml", "03_train_model.ipynb"),
        ("t4_full.yaml", "03_train_model.ipynb"),
        ("loso_cpu.yaml", "05_leave_one_source_out.ipynb"),
    ],
)
def test_presets_only_set_parameters_of_their_notebook(preset, notebook):
    import yaml

    values = yaml.safe_load((REPO / "presets" / preset).read_text())
    nb = json.loads((NOTEBOOKS / notebook).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}
    assert set(values) <= names, set(values) - names
    for overrides in values.get("VARIANTS", {}).values():
        ku.Config().with_parameters(**overrides)  # every variant is valid
    assert sorted(REPO.joinpath("presets").glob("*.yaml")) == sorted(
        REPO / "presets" / p for p in ("cpu_quick.yaml", "t4_full.yaml", "loso_cpu.yaml")
    )
