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


def _parameter_names(notebook: Path) -> set[str]:
    nb = json.loads(notebook.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "presets").glob("*.yaml")))
def test_every_preset_sets_only_parameters_of_one_notebook(preset):
    import yaml

    values = yaml.safe_load((REPO / "presets" / preset).read_text())
    assert values, f"{preset} is empty"
    fits = [nb.name for nb in sorted(NOTEBOOKS.glob("*.ipynb")) if set(values) <= _parameter_names(nb)]
    assert fits, f"{preset}: no notebook has all of {sorted(values)} as parameters"
    for overrides in values.get("VARIANTS", {}).values():
        ku.Config().with_parameters(**overrides)  # every variant is valid
