"""What a user types through papermill into notebooks 03 and 04, and what must never happen then: a
yes/no parameter written as a string, a resume on another split, a wrong folder, images in
subfolders, and a model evaluated where its training data are not.

Each test runs the notebooks headless with tiny parameters on synthetic phantoms, as a user would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import papermill
import pytest
from conftest import run_notebook, tiny, train_tiny

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY = dict(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, NUM_EPOCHS=1, GROUP_REGEX="^([^_]+)_")

pytestmark = pytest.mark.slow


def run(notebook: str, tmp_path: Path, parameters: dict) -> str:
    """Run ``notebook`` headless with ``parameters``; return everything its cells printed."""
    name = f"executed_{len(list(tmp_path.glob('executed_*')))}_{notebook}"
    nb = run_notebook(notebook, tmp_path, parameters, name)
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))


def refused(notebook: str, tmp_path: Path, parameters: dict) -> str:
    """Run ``notebook``, which must stop with an error; return the error's text."""
    with pytest.raises(papermill.PapermillExecutionError) as info:
        run(notebook, tmp_path, parameters)
    return f"{info.value.ename}: {info.value.evalue}"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Eight synthetic patients of six 64x64 slices (a data folder the tests may read, not change)."""
    root = tmp_path_factory.mktemp("user_data") / "data"
    return ku.make_synthetic_dataset(root, n_cases=8, slices_per_case=6, image_size=64, seed=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantoms) -> Path:
    """Notebook 03 run once with tiny parameters; returns its OUTPUT_DIR."""
    tmp = tmp_path_factory.mktemp("user_run")
    run("03_train_model.ipynb", tmp, dict(DATA_DIR=str(phantoms), OUTPUT_DIR=str(tmp / "run"), **TINY))
    return tmp / "run"


def test_string_false_never_overwrites_the_model(trained, phantoms, tmp_path):
    best = (trained / ku.BEST_MODEL_NAME).read_bytes()
    for spelling in ("false", "No", "0"):
        error = refused(
            "03_train_model.ipynb",
            tmp_path,
            dict(DATA_DIR=str(phantoms), OUTPUT_DIR=str(trained), OVERWRITE=spelling, **TINY),
        )
        assert "exists from an earlier run" in error, error
    error = refused(
        "03_train_model.ipynb",
        tmp_path,
        dict(DATA_DIR=str(phantoms), OUTPUT_DIR=str(trained), OVERWRITE="maybe", **TINY),
    )
    assert "OVERWRITE must be True or False" in error and "'maybe'" in error
    error = refused("03_train_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(trained), AMP="sometimes"))
    assert "AMP (Config.amp) must be" in error
    assert (trained / ku.BEST_MODEL_NAME).read_bytes() == best


def test_string_false_never_overwrites_a_corrected_prediction(trained, phantoms, tmp_path):
    predict = phantoms / "images"
    out = tmp_path / "eval"
    shutil.copytree(trained, out)
    printed = run(
        "04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), PREDICT_DIR=str(predict), TTA="yes")
    )
    assert "kidney-free slices got false kidney" in printed  # the error views of one model
    summary = json.loads((out / "evaluation_test_split" / "evaluation_summary.json").read_text())
    assert summary["tta"] is True  # "yes" is a yes
    corrected = sorted((out / "predictions" / "masks").glob("*.png"))[0]
    cv2.imwrite(str(corrected), np.full((64, 64), 255, np.uint8))  # the user's hand-corrected mask
    before = corrected.read_bytes()
    for spelling in ("false", "NO"):
        error = refused(
            "04_evaluate_model.ipynb",
            tmp_path,
            dict(OUTPUT_DIR=str(out), PREDICT_DIR=str(predict), OVERWRITE=spelling),
        )
        assert "result files exist already" in error, error
    error = refused(
        "04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), PREDICT_DIR=str(predict), TTA="sure")
    )
    assert "TTA must be True or False" in error
    assert corrected.read_bytes() == before


def test_resume_refuses_another_split_or_other_settings(phantoms, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(phantoms, data_dir)
    out = tmp_path / "run"
    first = dict(DATA_DIR=str(data_dir), OUTPUT_DIR=str(out), **{**TINY, "MAX_IMAGES": 30})
    run("03_train_model.ipynb", tmp_path, first)
    split = ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)["split"]
    resumed = {**first, "RESUME": "true", "NUM_EPOCHS": 2}
    error = refused("03_train_model.ipynb", tmp_path, {**resumed, "MAX_IMAGES": 36})
    assert "the settings differ (MAX_IMAGES: 30 vs 36)" in error, error
    error = refused("03_train_model.ipynb", tmp_path, {**resumed, "FOCAL_ALPHA": 0.5})
    assert "FOCAL_ALPHA: 0.25 vs 0.5" in error, error
    # Files added to DATA_DIR between the two halves of the run move images across the split.
    more = ku.make_synthetic_dataset(tmp_path / "more", n_cases=3, slices_per_case=6, image_size=64, seed=9)
    added = []
    for kind in ("images", "masks"):
        for path in sorted((more / kind).glob("*.png")):
            added.append(Path(shutil.copy(path, data_dir / kind / f"new{path.name}")))
    error = refused("03_train_model.ipynb", tmp_path, resumed)
    assert "the data split differs from the one the run started with" in error, error
    assert "images added" in error and "test" in error
    assert pd.read_csv(out / ku.METRICS_CSV_NAME)["epoch"].tolist() == [1]  # nothing trained
    for path in added:
        path.unlink()
    run("03_train_model.ipynb", tmp_path, resumed)  # the same settings and data: it continues
    assert pd.read_csv(out / ku.METRICS_CSV_NAME)["epoch"].tolist() == [1, 2]
    assert ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)["split"] == split


def test_test_dir_without_masks_names_test_dir_and_predict_dir(trained, phantoms, tmp_path):
    images_only = tmp_path / "new_patients"
    shutil.copytree(phantoms / "images", images_only / "images")
    out = tmp_path / "eval"
    shutil.copytree(trained, out)
    error = refused("04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), TEST_DIR=str(images_only)))
    assert f"No images/ + masks/ folders under TEST_DIR '{images_only}'" in error, error
    assert "belong in PREDICT_DIR" in error and "DATA_DIR" not in error


def test_output_dir_that_is_a_file_says_so(phantoms, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("the user's notes\n")
    error = refused("03_train_model.ipynb", tmp_path, dict(DATA_DIR=str(phantoms), OUTPUT_DIR=str(a_file)))
    assert f"OUTPUT_DIR '{a_file}' is a file, not a folder" in error, error
    assert a_file.read_text() == "the user's notes\n"


def test_predict_dir_subfolders_keep_their_layout(trained, phantoms, tmp_path):
    predict = tmp_path / "to_segment"
    names = sorted(p.name for p in (phantoms / "images").glob("*.png"))[:3]
    for folder, name in zip(("", "ward_a", "ward_b/day2"), names):
        (predict / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(phantoms / "images" / name, predict / folder / name)
    out = tmp_path / "eval"
    shutil.copytree(trained, out)
    run("04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), PREDICT_DIR=str(predict)))
    table = pd.read_csv(out / "predictions" / "predictions.csv")
    expected = [names[0], f"ward_a/{names[1]}", f"ward_b/day2/{names[2]}"]
    assert table["name"].tolist() == expected
    for name in expected:
        for kind in ("masks", "overlays"):
            assert (out / "predictions" / kind / name).with_suffix(".png").is_file(), (kind, name)


def test_04_predicts_a_folder_without_the_training_data(phantoms, tmp_path):
    """A model whose training data are gone (another machine, a detached dataset) still segments a
    PREDICT_DIR; notebook 04 says what it skips."""
    config = tiny(num_epochs=1, group_regex="^([^_]+)_")
    data = ku.prepare_data(config, phantoms)
    gone = tmp_path / "data_that_was_here"
    train_tiny(
        config, data, tmp_path / "run", extra_state={"split": data.split_record(), "data_dir": str(gone)}
    )
    printed = run(
        "04_evaluate_model.ipynb",
        tmp_path,
        dict(OUTPUT_DIR=str(tmp_path / "run"), PREDICT_DIR=str(phantoms / "images")),
    )
    assert "Skipped sections 1-5" in printed and "the training data are not readable here" in printed
    assert "No familiarity check" in printed and str(gone) in printed
    table = pd.read_csv(tmp_path / "run" / "predictions" / "predictions.csv")
    assert len(table) == len(list((phantoms / "images").glob("*.png")))
    assert not (tmp_path / "run" / "evaluation_test_split").exists()


def test_03_without_data_trains_on_phantoms_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "not_kaggle"))
    out = tmp_path / "run"
    # DROPOUT is no line of the parameters cell: every Config field injected by papermill reaches the run
    printed = run("03_train_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), DROPOUT=0.1, **TINY))
    assert "No data found" in printed and "SYNTHETIC kidney phantoms" in printed
    phantoms = out / "synthetic_data"
    checkpoint = ku.load_checkpoint(out / ku.BEST_MODEL_NAME)
    assert checkpoint["data_dir"] == str(phantoms) and checkpoint["config"]["dropout"] == 0.1
    assert len(ku.index_dataset(phantoms).pairs) > 0


def test_04_scores_a_peer_network_like_ours(phantoms, tmp_path):
    """A checkpoint of MONAI's BasicUNet (a peer of docs/peers.md) trained by the same train_model:
    notebook 04 rebuilds it from the record in the checkpoint and scores the test split."""
    import kidneyseg_studies as ks

    ks.register_peers()
    config = tiny(num_epochs=1, group_regex="^([^_]+)_")
    data = ku.prepare_data(config, phantoms)
    extra = {"split": data.split_record(), "data_dir": str(phantoms)}
    ku.train_model(
        ku.build_model(config, "monai-basicunet"),
        data.train_dataset,
        data.val_dataset,
        config,
        tmp_path / "peer",
        progress=False,
        log=False,
        extra_state=extra,
    )
    run("04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(tmp_path / "peer")))
    summary = json.loads(
        (tmp_path / "peer" / "evaluation_test_split" / "evaluation_summary.json").read_text()
    )
    assert summary["n_images"] == len(data.test) and 0 <= summary["pooled_dice"] <= 1
