"""Kaggle delivery: metadata rules, staged folders, the notebook bootstrap in a faked Kaggle layout,
and the GPU code paths forced on a CPU (AMP dtype guard, the two-GPU wrapper)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import papermill
import pytest
import torch
from torch import nn

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]


def test_series_metadata_gives_valid_kernel_metadata():
    series = json.loads((REPO / "kaggle-metadata.json").read_text())
    for entry in [series["utility_script"], *series["notebooks"]]:
        meta = ku.kernel_metadata(series, entry)
        assert ku.validate_kernel_metadata(meta) == [], entry["slug"]
        assert set(meta) <= set(ku.KERNEL_METADATA_FIELDS)
        assert (REPO / entry["code_file"]).is_file()
    notebooks = {n["code_file"] for n in series["notebooks"]}
    assert notebooks == {p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb")}
    utility = ku.kernel_metadata(series, series["utility_script"])
    assert utility["kernel_type"] == "script" and "machine_shape" not in utility
    train = ku.kernel_metadata(series, next(n for n in series["notebooks"] if "03" in n["code_file"]))
    assert train["enable_gpu"] is True and train["machine_shape"] == "NvidiaTeslaT4"
    assert (
        train["enable_internet"] is False and f"{series['owner']}/kidneyseg-utils" in train["kernel_sources"]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "no-owner"}, "owner/slug"),
        ({"title": "Something else"}, "does not give the slug"),
        ({"language": "julia"}, "language"),
        ({"kernel_type": "app"}, "kernel_type"),
        ({"enable_gpu": "true"}, "enable_gpu"),
        ({"dataset_sources": ["just-a-name"]}, "dataset_sources"),
        ({"machine_shape": "Tpu"}, "machine_shape"),
        ({"colour": "red"}, "unknown field"),
        ({"code_file": ""}, "code_file"),
    ],
)
def test_validation_catches_each_rule(change, message):
    good = {
        "id": "alice/kidneyseg-03-train-model",
        "title": "kidneyseg 03 train model",
        "code_file": "03_train_model.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": ["alice/kidneys"],
        "kernel_sources": [],
        "machine_shape": "NvidiaTeslaT4",
    }
    assert ku.validate_kernel_metadata(good) == []
    problems = ku.validate_kernel_metadata({**good, **change})
    assert any(message in p for p in problems), problems


def test_staging_writes_push_ready_folders(tmp_path):
    out = tmp_path / "stage"
    folders = ku.stage_kaggle(out, owner="alice", dataset="alice/kidneys")
    assert folders[0].name == "kidneyseg-utils" and len(folders) == 6  # the module and five notebooks
    for folder in folders:
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert ku.validate_kernel_metadata(meta) == []
        assert (folder / meta["code_file"]).is_file() and meta["id"].startswith("alice/")
    assert (folders[0] / "kidneyseg_utils.py").read_bytes() == (REPO / "kidneyseg_utils.py").read_bytes()
    assert ku.stage_kaggle(out) == [out / f.name for f in folders]  # staging again replaces
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a kidneyseg staging folder"):
        ku.stage_kaggle(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kidneyseg_utils", "stage-kaggle", str(tmp_path / "s"), "--owner", "bob"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kaggle kernels push -p" in proc.stdout
    assert json.loads((tmp_path / "s" / "kidneyseg-utils" / "kernel-metadata.json").read_text())["id"] == (
        "bob/kidneyseg-utils"
    )


def test_staged_notebook_runs_in_a_faked_kaggle_layout(tmp_path, phantom_dir):
    """The staged notebook finds the module as a utility script, the data under /kaggle/input and
    writes to /kaggle/working, with the Kaggle root pointed at a temporary folder."""
    stage = tmp_path / "stage"
    ku.stage_kaggle(stage, owner="alice", dataset="alice/kidneys")
    kaggle = tmp_path / "kaggle"
    shutil.copytree(stage / "kidneyseg-utils", kaggle / "usr" / "lib" / "kidneyseg-utils")
    shutil.copytree(phantom_dir, kaggle / "input" / "kidneys" / "train")
    (kaggle / "working").mkdir()
    folder = stage / "kidneyseg-03-train-model"
    prepared = folder / "run.ipynb"
    papermill.execute_notebook(
        str(folder / "03_train_model.ipynb"),
        str(prepared),
        prepare_only=True,
        parameters=dict(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, NUM_EPOCHS=1),
        kernel_name="python3",
        progress_bar=False,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ku.DATA_DIR_ENV)}
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", str(prepared)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    working = kaggle / "working" / "kidneyseg"
    assert len(pd.read_csv(working / ku.METRICS_CSV_NAME)) == 1
    checkpoint = ku.load_checkpoint(working / ku.BEST_MODEL_NAME)
    assert checkpoint["data_dir"] == str(kaggle / "input")


def test_kaggle_paths_follow_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "kaggle"))
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert ku.resolve_output_dir() == tmp_path / "kaggle" / "working" / "kidneyseg"
    previous = tmp_path / "kaggle" / "input" / "kidneyseg-03-train-model" / "kidneyseg"
    previous.mkdir(parents=True)
    for name in (ku.BEST_MODEL_NAME, ku.LAST_CHECKPOINT_NAME, ku.METRICS_CSV_NAME):
        (previous / name).write_text(name)
    assert ku.resolve_model_path("auto", tmp_path / "empty") == previous / ku.BEST_MODEL_NAME
    out = tmp_path / "kaggle" / "working" / "kidneyseg"
    assert ku.restore_run_for_resume(out) == previous
    assert (out / ku.LAST_CHECKPOINT_NAME).read_text() == ku.LAST_CHECKPOINT_NAME
    assert ku.restore_run_for_resume(out) is None  # already there: nothing is overwritten
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "nowhere"))
        ku.resolve_model_path("auto", tmp_path / "empty")


def test_amp_dtype_never_bf16_below_compute_capability_8():
    assert ku.amp_dtype((7, 5)) == torch.float16  # T4
    assert ku.amp_dtype((6, 0)) == torch.float16  # P100
    assert ku.amp_dtype((8, 0)) == torch.bfloat16 and ku.amp_dtype((9, 0)) == torch.bfloat16
    assert ku.amp_dtype(None) is None


def test_two_gpu_wrapper_and_unwrapped_checkpoint(tmp_path, phantom_dir):
    model = ku.AttentionUNet(base_channels=4, depth=2)
    cuda = torch.device("cuda")
    assert isinstance(ku.wrap_for_devices(model, cuda, True, device_count=2), nn.DataParallel)
    assert ku.wrap_for_devices(model, cuda, False, device_count=2) is model
    assert ku.wrap_for_devices(model, cuda, True, device_count=1) is model
    assert ku.wrap_for_devices(model, torch.device("cpu"), True, device_count=2) is model
    config = ku.Config(image_size=32, base_channels=4, depth=2, batch_size=4, num_epochs=1)
    data = ku.prepare_data(config, phantom_dir)
    wrapped = nn.DataParallel(ku.build_model(config))
    result = ku.train_model(
        wrapped, data.train_dataset, data.val_dataset, config, tmp_path, torch.device("cpu"), progress=False
    )
    state = ku.load_checkpoint(result.files["best_model"])["model_state"]
    assert not any(k.startswith("module.") for k in state)
    ku.load_model(result.files["best_model"])  # loads into a plain model
