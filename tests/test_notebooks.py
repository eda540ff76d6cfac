"""Each notebook runs top to bottom under papermill's parameters with tiny settings, checked by nbval.

papermill injects the parameters (``prepare_only``), nbval executes the result in a fresh kernel
(``--nbval-lax``: every cell must run without error; outputs are not compared), and the test then
checks what the notebook wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import papermill

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY_TRAINING = dict(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, NUM_EPOCHS=2, MAX_IMAGES=48)


def execute(notebook: str, tmp_path: Path, parameters: dict) -> Path:
    """Inject ``parameters`` with papermill, run the notebook with nbval, return the prepared copy."""
    prepared = tmp_path / notebook
    papermill.execute_notebook(
        str(NOTEBOOKS / notebook),
        str(prepared),
        parameters=parameters,
        prepare_only=True,
        kernel_name="python3",
        progress_bar=False,
    )
    env = {k: v for k, v in os.environ.items() if k != ku.DATA_DIR_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-cell-timeout=600",
            str(prepared),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{notebook} failed under nbval:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    )
    return prepared


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


def test_03_trains_on_shared_data(tmp_path, shared_data):
    out = tmp_path / "run"
    execute(
        "03_train_model.ipynb",
        tmp_path,
        dict(DATA_DIR=str(shared_data), OUTPUT_DIR=str(out), GROUP_REGEX="^([^_]+)_", **TINY_TRAINING),
    )
    history = pd.read_csv(out / ku.METRICS_CSV_NAME)
    assert history["epoch"].tolist() == [1, 2]
    assert history.filter(like="dice").apply(lambda s: s.between(0, 1)).all().all()
    for name in (ku.BEST_MODEL_NAME, ku.LAST_CHECKPOINT_NAME, ku.METRICS_PNG_NAME, ku.CONFIG_JSON_NAME):
        assert (out / name).is_file(), name
    _, config, checkpoint = ku.load_model(out / ku.BEST_MODEL_NAME)
    assert (config.image_size, config.base_channels, config.group_regex) == (32, 4, "^([^_]+)_")
    split = checkpoint["split"]
    assert len(split["train"]) + len(split["val"]) == 48
    case = lambda key: key.split("/")[0] + "/" + key.split("/")[1].split("_")[0]  # noqa: E731
    assert not {case(k) for k in split["train"]} & {case(k) for k in split["val"]}


def test_03_falls_back_to_synthetic_phantoms(tmp_path):
    out = tmp_path / "run"
    execute("03_train_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), **TINY_TRAINING))
    assert (out / "synthetic_data" / "images").is_dir()
    assert len(pd.read_csv(out / ku.METRICS_CSV_NAME)) == 2
    assert (out / ku.BEST_MODEL_NAME).is_file()
