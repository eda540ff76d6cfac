"""The notebooks as files: committed clean, one plain ``parameters`` cell, presets that fit them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kidneyseg_studies as ks
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
    if "VARIANTS" in values:  # every variant is valid, as notebook 05 reads it
        ks.variant_settings(ku.Config(), values["VARIANTS"])


# What README's preset table quotes for each preset, as (parameter values, README phrases).
QUOTED_PRESETS = {
    "t4_full.yaml": (
        dict(IMAGE_SIZE=256, BASE_CHANNELS=64, BATCH_SIZE=16, NUM_EPOCHS=150, PATIENCE=20),
        ["256 px", "width 64", "batch 16", "up to 150 epochs", "patience 20"],
    ),
    "cpu_quick.yaml": (
        dict(IMAGE_SIZE=160, BASE_CHANNELS=16, BATCH_SIZE=16, PATIENCE=30, AMP=True, MAX_TRAIN_MINUTES=18),
        ["160 px", "width 16", "batch 16", "patience 30", "`AMP=True`", "after 18 minutes"],
    ),
    "cv_kidney_weighted.yaml": (
        dict(IMAGE_SIZE=128, BASE_CHANNELS=16, PATIENCE=10, FOCAL_ALPHA=0.75, AMP=True),
        ["128 px", "width 16", "patience 10", "`FOCAL_ALPHA` 0.75", "`AMP=True`"],
    ),
}


@pytest.mark.parametrize("preset", sorted(QUOTED_PRESETS))
def test_presets_hold_what_readme_quotes(preset):
    """The preset files and README's table agree, and both say what the specification's run is."""
    import yaml

    values = yaml.safe_load((REPO / "presets" / preset).read_text())
    expected, phrases = QUOTED_PRESETS[preset]
    assert {name: values.get(name) for name in expected} == expected
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if f"`{preset}`" in line)
    assert [p for p in phrases if p not in row] == [], row
