"""kaggle-metadata.json: valid JSON whose entries name real files and follow Kaggle's slug rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_metadata_describes_existing_files():
    meta = json.loads((REPO / "kaggle-metadata.json").read_text())
    assert meta["defaults"]["machine_shape"] == "NvidiaTeslaT4"
    assert meta["defaults"]["enable_gpu"] is True and meta["defaults"]["enable_internet"] is False
    entries = [meta["utility_script"], *meta["notebooks"]]
    for entry in entries:
        assert (REPO / entry["code_file"]).is_file(), entry["code_file"]
        # Kaggle: a kernel slug is its title lowercased with dashes for spaces
        assert entry["slug"] == re.sub(r"\s+", "-", entry["title"].strip().lower())
    notebooks = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(n["code_file"] for n in meta["notebooks"]) == notebooks
    for notebook in meta["notebooks"]:
        assert "{owner}/" + meta["utility_script"]["slug"] in notebook["kernel_sources"]
