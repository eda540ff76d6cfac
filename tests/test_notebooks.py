"""Each notebook runs top to bottom, headless, under papermill's parameters with tiny settings.

papermill executes the notebook as a user's headless run does (a fresh kernel, ``allow_stdin``
off, a timeout per cell so that a hang fails instead of waiting for ever); the test then checks the
recorded outputs (no error, pictures drawn, no widget created) and what the notebook wrote. nbval runs
the notebooks as staged for Kaggle in ``test_kaggle.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_notebook, train_tiny

import kidneyseg_studies as ks
import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY_TRAINING = dict(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, NUM_EPOCHS=2, MAX_IMAGES=48)
TRAINED_THRESHOLD = 0.35  # notebook 04 must use the threshold stored with the model, not 0.5
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

pytestmark = pytest.mark.slow


def execute(notebook: str, tmp_path: Path, parameters: dict, pictures: bool = True) -> dict:
    """Run ``notebook`` headless with papermill and ``parameters``; return the executed notebook.

    Fails when a cell raises or outlasts the timeout, when the run created an ipywidgets widget
    (which can hang a headless run for ever), or when it drew no picture.
    """
    nb = run_notebook(notebook, tmp_path, parameters)
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if WIDGET_MIME in o.get("data", {})], f"{notebook} created a widget"
    drew = any("image/png" in o.get("data", {}) for o in outputs)
    assert drew or not pictures, f"{notebook} drew no picture"
    return nb


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data):
    """Notebook 03 with tiny parameters on the real slices as fold 0 of two, and fold 1 trained by
    the same functions from fold 0's stored config; returns the OUTPUT_DIR holding both folds."""
    tmp = tmp_path_factory.mktemp("nb03")
    out = tmp / "run"
    execute(
        "03_train_model.ipynb",
        tmp,
        dict(
            DATA_DIR=str(shared_data),
            OUTPUT_DIR=str(out),
            INFERENCE_THRESHOLD=TRAINED_THRESHOLD,
            FOLDS=2,
            FOLD=0,
            **TINY_TRAINING,
        ),  # GROUP_REGEX "auto"
    )
    _, config, _ = ku.load_model(out / "fold_0" / ku.BEST_MODEL_NAME)
    config = config.with_parameters(FOLD=1)
    data = ku.prepare_data(config, shared_data)
    extra = {"split": data.split_record(), "data_dir": str(shared_data)}
    train_tiny(config, data, ku.run_output_dir(out, config), extra_state=extra)
    return out


def test_03_trains_a_fold_on_shared_data(trained_run):
    out = trained_run / "fold_0"
    history = pd.read_csv(out / ku.METRICS_CSV_NAME)
    assert history["epoch"].tolist() == [1, 2]
    assert history.filter(like="dice").apply(lambda s: s.between(0, 1)).all().all()
    for name in (ku.BEST_MODEL_NAME, ku.LAST_CHECKPOINT_NAME, ku.METRICS_PNG_NAME, ku.CONFIG_JSON_NAME):
        assert (out / name).is_file(), name
    _, config, checkpoint = ku.load_model(out / ku.BEST_MODEL_NAME)
    assert (config.image_size, config.base_channels, config.group_regex) == (32, 4, "^([^_]+)_")
    assert (config.test_fraction, config.folds, config.fold) == (0.15, 2, 0)
    split = checkpoint["split"]
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 48 and split["test"]
    case = lambda key: key.split("/")[0] + "/" + key.split("/")[1].split("_")[0]  # noqa: E731
    cases = {part: {case(k) for k in keys} for part, keys in split.items()}
    assert not cases["train"] & cases["val"] and not (cases["train"] | cases["val"]) & cases["test"]


def test_04_ensembles_the_folds_evaluates_and_predicts(trained_run, shared_data, manifest, tmp_path):
    predict = shared_data / "abdominal-us"
    slices = manifest["source"].value_counts()
    nb = execute(
        "04_evaluate_model.ipynb",
        tmp_path,
        dict(
            OUTPUT_DIR=str(trained_run),
            TEST_DIR=str(shared_data / "kits19-ct"),
            PREDICT_DIR=str(predict),
            TTA=True,
            POSTPROCESS=True,
        ),
    )
    splits = [ku.load_model(trained_run / f"fold_{k}" / ku.BEST_MODEL_NAME)[2]["split"] for k in (0, 1)]
    assert splits[0]["test"] == splits[1]["test"]  # one test split, held out before the folds
    expected = {"test": splits[0]["test"], "out_of_fold": splits[0]["val"] + splits[1]["val"]}
    for folder, part in (("evaluation_test_split", "test"), ("evaluation_out_of_fold", "out_of_fold")):
        scores = pd.read_csv(trained_run / folder / "evaluation_per_image.csv")
        assert sorted(scores["source"] + "/" + scores["name"]) == sorted(expected[part])
        summary = json.loads((trained_run / folder / "evaluation_summary.json").read_text())
        assert (
            summary["n_images"] == len(scores) and summary["tta"] is True and summary["postprocess"] is True
        )
        assert summary["threshold"] == TRAINED_THRESHOLD
        assert summary["n_cases"] == (scores["source"] + scores["case"]).nunique()
        for key in ("pooled_dice", "mean_dice", "mean_dice_with_kidney", "pooled_iou", "mean_case_dice"):
            assert 0 <= summary[key] <= 1, key
        assert summary["mean_hd95"] >= 0
    test_split = json.loads((trained_run / "evaluation_test_split" / "evaluation_summary.json").read_text())
    oof = json.loads((trained_run / "evaluation_out_of_fold" / "evaluation_summary.json").read_text())
    assert (oof["folds"], oof["models"], test_split["models"]) == (2, 1, 2)
    assert test_split["evaluated_on"] == ku.SPLIT_LABELS["test"]
    compared = next(c for c in nb["cells"] if "ks.fold_comparison(" in "".join(c["source"]))
    shown = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in compared["outputs"])
    assert "mean single fold" in shown and "ensemble" in shown
    test = json.loads((trained_run / "evaluation_test" / "evaluation_summary.json").read_text())
    assert test["n_images"] == slices["kits19-ct"]
    masks = sorted((trained_run / "predictions" / "masks").glob("*.png"))
    assert len(masks) == slices["abdominal-us"]
    # The familiarity check: notebook 04 read both folds' training splits again, flagged (or
    # cleared) every TEST_DIR and PREDICT_DIR image and showed Dice by flag.
    table = pd.read_csv(trained_run / "predictions" / "predictions.csv")
    assert (
        len(table) == slices["abdominal-us"]
        and table["novelty"].ge(0).all()
        and table["unfamiliar"].dtype == bool
    )
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert printed.count("images look unlike") + printed.count("looks unlike the training") == 2
    assert "kidney-free slices got false kidney" in printed  # the error views of the fold ensemble
    views = next(c for c in nb["cells"] if "ks.error_views(" in "".join(c["source"]))
    assert any("image/png" in o.get("data", {}) for o in views["outputs"])
    viewer = next(c for c in nb["cells"] if "ks.show_threshold_viewer(" in "".join(c["source"]))
    assert "val.data, val.probs" in "".join(viewer["source"])  # chosen on validation, never on test
    assert any("image/png" in o.get("data", {}) for o in viewer["outputs"])
    first = ku.read_image(predict / "images" / masks[0].name)
    assert ku.read_image(masks[0]).shape == first.shape


def test_01_explores_the_real_slices(shared_data, manifest, tmp_path):
    out = tmp_path / "run"
    execute(
        "01_explore_data.ipynb",
        tmp_path,
        dict(DATA_DIR=str(shared_data), OUTPUT_DIR=str(out), GROUP_REGEX="^([^_]+)_", GALLERY_SIZE=6),
    )
    inventory = pd.read_csv(out / "exploration" / "data_inventory.csv")
    assert (inventory["status"] == "ok").sum() == len(manifest)
    assert set(inventory["source"]) == set(manifest["source"])
    report = json.loads((out / "exploration" / "data_report.json").read_text())
    assert len(report["summary"]) == manifest["source"].nunique() and report["warnings"]


def test_02_measures_and_ablates_tiny(shared_data, manifest, tmp_path):
    out = tmp_path / "run"
    execute(
        "02_preprocessing_experiments.ipynb",
        tmp_path,
        dict(
            DATA_DIR=str(shared_data),
            OUTPUT_DIR=str(out),
            GROUP_REGEX="^([^_]+)_",
            IMAGE_SIZE=32,
            SLICES_PER_SOURCE=2,
            ABLATION_OPTIONS=["none", "clahe"],
            ABLATION_EPOCHS=1,
            BASE_CHANNELS=4,
            BATCH_SIZE=8,
            MAX_IMAGES=40,
        ),
    )
    results = pd.read_csv(out / "preprocessing" / "preprocessing_results.csv")
    assert results["preprocessing"].tolist() == ["none", "clahe"] and results["recommended"].sum() == 1
    effects = pd.read_csv(out / "preprocessing" / "preprocessing_effects.csv")
    assert set(effects["source"]) == set(manifest["source"])


def test_05_leave_one_source_out_tiny(shared_data, manifest, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nb = execute(
        "05_leave_one_source_out.ipynb",
        tmp_path,
        dict(
            DATA_DIR=str(shared_data),
            OUTPUT_DIR=str(out),
            GROUP_REGEX="^([^_]+)_",
            SOURCES=["kits19-ct", "abdominal-us"],
            VARIANTS={
                "standard": {},
                "histeq+gin": {"NORMALIZATION": "histeq", "AUGMENTATION": "strong+gin"},
            },
            GROUPS={"CT": ["kits19-ct"]},
            IMAGE_SIZE=32,
            BASE_CHANNELS=4,
            BATCH_SIZE=16,
            NUM_EPOCHS=1,
            MAX_TRAIN_MINUTES=None,
            PREPROCESSING="clahe",
        ),
    )
    spread = next(c for c in nb["cells"] if "ks.normalization_consistency(" in "".join(c["source"]))
    shown = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in spread["outputs"])
    assert "preprocessing" in shown and "clahe" in shown  # the inputs the folds train on
    loso = out / "leave_one_source_out"
    table = pd.read_csv(loso / ks.LOSO_CSV_NAME)
    assert len(table) == 4 and set(table["held_out"]) == {"kits19-ct", "abdominal-us"}
    rows = table.set_index(["variant", "held_out"])
    assert rows.loc[("standard", "kits19-ct"), "n_test"] == (manifest["source"] == "kits19-ct").sum()
    assert rows.loc[("histeq+gin", "abdominal-us"), "augmentation"] == "strong+gin"
    assert (loso / "leave_one_source_out.png").is_file()
    fold = loso / "histeq+gin" / "abdominal-us"
    monkeypatch.setattr(ku, "INPUT_MAPPINGS", {"minmax": ku.InputMapping()})  # the studies not attached
    with pytest.raises(ValueError, match="'clahe/histeq' .* not registered"):  # a study's input mapping
        ku.load_model(fold / ku.BEST_MODEL_NAME)
    ks.register_input_mappings()
    _, config, _ = ku.load_model(fold / ku.BEST_MODEL_NAME)
    assert config.input_mapping == "clahe/histeq"  # the notebook's PREPROCESSING and the variant's
    settings = json.loads((fold / "fold_result.json").read_text())["settings"]
    assert (settings["augmentation"], settings["intensity"]) == (
        "strong",
        "strong+gin",
    )  # GIN: the batch hook


def test_05_with_one_source_ends_with_the_reason(phantom_dir, tmp_path):
    out = tmp_path / "run"
    nb = execute(
        "05_leave_one_source_out.ipynb",
        tmp_path,
        dict(DATA_DIR=str(phantom_dir), OUTPUT_DIR=str(out), IMAGE_SIZE=32, BASE_CHANNELS=4, NUM_EPOCHS=1),
        pictures=False,
    )
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "needs at least 2 sources" in printed and "Nothing is trained" in printed
    assert not (out / "leave_one_source_out" / ks.LOSO_CSV_NAME).exists()


def test_04_applies_the_input_mapping_a_study_trained_with(phantom_dir, tmp_path):
    """A checkpoint trained through the input-mapping hook (CLAHE, then z-score) is scored and
    predicts in notebook 04 exactly as the pipeline applies that mapping in this process."""
    mapping = ks.input_mapping_name("clahe", "zscore")
    config = ku.Config(**{**ku.Config().to_dict(), "input_mapping": mapping}).with_parameters(
        IMAGE_SIZE=32, BASE_CHANNELS=4, DEPTH=2, BATCH_SIZE=4, NUM_EPOCHS=1, MAX_TRAIN_MINUTES=None
    )
    data = ku.prepare_data(config, phantom_dir)
    out = tmp_path / "run"
    extra = {"split": data.split_record(), "data_dir": str(phantom_dir)}
    model, _ = train_tiny(data.config, data, out, extra_state=extra)
    predict = tmp_path / "new"
    predict.mkdir()
    for pair in data.test[:3]:
        (predict / pair.image.name).write_bytes(pair.image.read_bytes())
    nb = execute("04_evaluate_model.ipynb", tmp_path, dict(OUTPUT_DIR=str(out), PREDICT_DIR=str(predict)))
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert f"input mapping '{mapping}'" in printed
    here = ku.predict_folder(model.eval(), data.config, predict, tmp_path / "here")
    there = pd.read_csv(out / "predictions" / "predictions.csv")
    assert there["kidney_pixels"].tolist() == here["kidney_pixels"].tolist()
    plain = ku.predict_folder(
        model, data.config.with_parameters(INPUT_MAPPING="minmax"), predict, tmp_path / "x"
    )
    assert plain["kidney_pixels"].tolist() != here["kidney_pixels"].tolist()  # the mapping matters here
    summary = json.loads((out / "evaluation_test_split" / "evaluation_summary.json").read_text())
    assert summary["n_images"] == len(data.test)
