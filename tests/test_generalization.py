"""Generalisation to unseen sources: intensity normalisation, strong augmentation, leave-one-source-out.

Expected values are worked out by hand on constructed arrays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import kidneyseg_studies as ks
import kidneyseg_utils as ku

RAMP = np.arange(1000, dtype=np.float64).reshape(10, 100)  # 0..999


# ----- normalisation ---------------------------------------------------------------------------


def test_minmax_is_the_specification_scaling_for_8_bit():
    image = np.array([[0, 51, 255], [102, 0, 0]], np.uint8)
    out = ku.normalize_intensity(image, "minmax")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0.2, 1], [0.4, 0, 0]], atol=1e-7)
    # Not stretched: an 8-bit image that stops at 102 stays at 0.4.
    assert ku.normalize_intensity(np.array([[0, 102]], np.uint8), "minmax").max() == pytest.approx(0.4)


def test_minmax_stretches_16_bit_from_its_own_range():
    image = np.array([[1000, 2000], [3000, 1500]], np.uint16)
    np.testing.assert_allclose(ku.normalize_intensity(image, "minmax"), [[0, 0.5], [1, 0.25]], atol=1e-7)


def test_percentile_clips_at_known_percentiles():
    # numpy's linear percentiles of 0..999: 0.5 % -> 4.995, 99.5 % -> 994.005.
    stats = ks.normalization_stats(RAMP, "percentile")
    np.testing.assert_allclose(stats.xp, [4.995, 994.005])
    out = ks.normalize_intensity(RAMP, "percentile")
    assert out.min() == 0 and out.max() == 1  # 0..4 and 995..999 are clipped
    assert out.flat[499] == pytest.approx((499 - 4.995) / (994.005 - 4.995), abs=1e-6)
    spiked = RAMP.copy()
    spiked.flat[-1] = 1e6  # an outlier (metal, a burnt-in label) does not squash the rest
    np.testing.assert_allclose(ks.normalize_intensity(spiked, "percentile")[:, :-1], out[:, :-1], atol=1e-6)


def test_zscore_has_zero_mean_unit_variance_after_the_clip():
    out = ks.normalize_intensity(RAMP, "zscore").astype(np.float64)
    assert out.mean() == pytest.approx(0.0, abs=1e-6)
    assert out.std() == pytest.approx(1.0, abs=1e-5)
    # By hand: the clipped ramp is symmetric about 499.5, so 499.5 maps to 0.
    assert ks.normalize_intensity(np.array([499.5]), "zscore", ks.normalization_stats(RAMP, "zscore"))[
        0
    ] == pytest.approx(0.0, abs=1e-6)


def test_histeq_matches_opencv_and_ignores_the_window():
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64)) ** 2 * 255).astype(np.uint8)
    np.testing.assert_allclose(
        ks.normalize_intensity(image, "histeq"), cv2.equalizeHist(image) / 255.0, atol=1 / 255
    )
    # An increasing remapping (another window and gamma) leaves the result unchanged.
    rewindowed = np.clip(((image / 255.0) ** 0.7) * 180 + 40, 0, 255).round().astype(np.uint8)
    same_order = np.argsort(image, axis=None, kind="stable")
    assert np.all(np.diff(rewindowed.ravel()[same_order].astype(int)) >= 0)  # it is increasing
    a, b = ks.normalize_intensity(image, "histeq"), ks.normalize_intensity(rewindowed, "histeq")
    assert np.abs(a - b).mean() < 0.02


@pytest.mark.parametrize("method", ks.NORMALIZATION_OPTIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_constant_image_normalises_to_zeros(method, dtype):
    out = ks.normalize_intensity(np.full((8, 8), 7, dtype), method)
    if method == "minmax" and dtype == np.uint8:  # the fixed 8-bit scale: 7 / 255
        np.testing.assert_allclose(out, 7 / 255)
    else:  # no range to stretch: zeros, never a division by zero
        assert np.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("method", ks.NORMALIZATION_OPTIONS)
def test_16_bit_equals_the_same_values_as_floats(method):
    image = (np.arange(4096, dtype=np.uint16).reshape(64, 64) * 13) % 60000
    np.testing.assert_allclose(
        ks.normalize_intensity(image, method),
        ks.normalize_intensity(image.astype(np.float64), method),
        atol=1e-6,
    )


def test_unknown_normalisation_and_input_mapping_are_named():
    with pytest.raises(ValueError, match="NORMALIZATION must be one of 'minmax'"):
        ks.normalize_intensity(RAMP, "unit")
    with pytest.raises(ValueError, match="NORMALIZATION"):
        ks.input_mapping_name(normalization="z-score")
    ks.input_mapping_name(normalization="zscore")
    with pytest.raises(ValueError, match="PREPROCESSING must be one of"):  # not the normalisation
        ks.input_mapping_name("zscore")
    with pytest.raises(ValueError, match=r"'robust' .* not registered .* attach kidneyseg_studies.py"):
        ku.normalize_intensity(RAMP, "robust")


def _brighten(image: np.ndarray, **_: object) -> np.ndarray:
    return (image + 40).astype(np.uint8)


def test_training_applies_the_unaugmented_images_map_after_augmentation():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 200, (2, 32, 32), dtype=np.uint8)
    masks = np.zeros_like(images)
    zscore = ks.input_mapping_name(normalization="zscore")
    plain = ku.KidneyDataset(images, masks, None, input_mapping=zscore)
    np.testing.assert_allclose(plain[1][0][0].numpy(), ks.normalize_intensity(images[1], "zscore"), atol=1e-6)
    brighten = A.Compose([A.Lambda(image=_brighten)])
    bright = ku.KidneyDataset(images, masks, brighten, input_mapping=zscore)
    # The map of the original is kept, so the brightening shows in the model input.
    shift = bright[1][0][0].numpy() - plain[1][0][0].numpy()
    assert shift.mean() > 0.5


class _Echo(nn.Module):
    """A 'model' whose logits are its input: its sigmoid shows exactly what it was fed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("method", ks.NORMALIZATION_OPTIONS)
def test_inference_normalises_as_training(method):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    mapping = ks.input_mapping_name(normalization=method)
    probs = ku.predict_probabilities(_Echo(), images, input_mapping=mapping)
    dataset = ku.KidneyDataset(images, np.zeros_like(images), None, input_mapping=mapping)
    for i in range(3):
        fed = torch.sigmoid(dataset[i][0][0]).numpy()
        np.testing.assert_allclose(probs[i], fed, atol=1e-6)


def test_checkpoint_records_the_input_mapping_and_old_checkpoints_load(tmp_path, tiny_config, monkeypatch):
    model = ku.build_model(tiny_config)
    old = {k: v for k, v in tiny_config.to_dict().items() if k != "input_mapping"}
    payload = {"format": "kidneyseg-checkpoint", "format_version": 1, "kind": "best"}
    payload.update(config=old, model_state=model.state_dict())
    ku.save_checkpoint(payload, tmp_path / "v1.pth")  # before NORMALIZATION existed
    assert ku.load_model(tmp_path / "v1.pth")[1].input_mapping == "minmax"
    payload.update(format_version=2, config={**old, "preprocessing": "clahe", "normalization": "histeq"})
    payload["config"]["augmentation"] = "strong"  # releases up to 0.2.0 stored these three
    ku.save_checkpoint(payload, tmp_path / "v2.pth")
    ks.register_input_mappings()
    assert ku.load_model(tmp_path / "v2.pth")[1].input_mapping == "clahe/histeq"
    config = tiny_config.with_parameters(INPUT_MAPPING=ks.input_mapping_name(normalization="histeq"))
    payload.update(config=config.to_dict())
    ku.save_checkpoint(payload, tmp_path / "v3.pth")
    assert ku.load_model(tmp_path / "v3.pth")[1].input_mapping == "histeq"
    with pytest.raises(ValueError, match="INPUT_MAPPING: 'histeq' vs 'minmax'"):
        ku.load_model(tmp_path / "v3.pth", expected=tiny_config)
    monkeypatch.setattr(ku, "INPUT_MAPPINGS", {"minmax": ku.InputMapping()})  # the studies not attached
    with pytest.raises(ValueError, match=r"'histeq' .* not registered .*register_input_mappings\(\)"):
        ku.load_model(tmp_path / "v3.pth")


# ----- augmentation ----------------------------------------------------------------------------


def _kidney_like(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 3, size // 2), (size // 6, size // 4), 20, 0, 360, 1, -1)
    return mask * 255, mask


def test_strong_pipeline_keeps_masks_binary_aligned_and_images_in_range():
    image, mask = _kidney_like()
    transform = ks.train_transform("strong")
    ious, changed = [], 0
    for seed in range(60):
        ku.seed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        img, msk = out["image"], out["mask"]
        assert img.dtype == np.uint8 and img.shape == (64, 64)
        assert set(np.unique(msk)) <= {0, 1}
        changed += int(not np.array_equal(msk, mask))
        if msk.sum() > 30:  # still visible after scaling and rotation
            seen = img > 127  # the 0/255 image survives noise, blur, gamma and contrast at 127
            ious.append((seen & (msk > 0)).sum() / (seen | (msk > 0)).sum())
    assert changed > 40  # the geometry really changes
    assert len(ious) > 40 and np.mean(ious) > 0.85 and np.min(ious) > 0.6


def test_strong_pipeline_varies_intensity_and_spec_is_unchanged():
    rng = np.random.default_rng(3)
    image = rng.integers(60, 200, (64, 64), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    strong = ks.train_transform("strong")
    stds = []
    for seed in range(40):
        ku.seed_transform(strong, seed)
        stds.append(float(strong(image=image, mask=mask)["image"].astype(float).std()))
    assert np.ptp(stds) > 5  # contrast, gamma, noise and blur change the spread of values
    names = [type(t).__name__ for t in ks.train_transform("standard").transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "Affine", "RandomBrightnessContrast"]
    assert repr(ks.train_transform("standard")) == repr(ku.build_train_transform())
    with pytest.raises(ValueError, match="AUGMENTATION must be one of 'standard', 'strong'"):
        ks.train_transform("nnunet")


# ----- leave-one-source-out --------------------------------------------------------------------


def test_folds_leave_each_source_out_once(shared_data, manifest):
    pairs = ku.index_dataset(shared_data, "^([^_]+)_").pairs
    folds = ks.source_folds(pairs)
    sources = sorted({p.source for p in pairs})
    assert [f.held_out for f in folds] == sources == sorted(manifest["source"].unique())
    for fold in folds:
        assert {p.source for p in fold.test} == {fold.held_out}
        assert fold.held_out not in {p.source for p in fold.train}
        assert len(fold.train) + len(fold.test) == len(pairs) == len(manifest)
    chosen = ks.source_folds(pairs, ["kits19-ct", "curvas-ct"])
    assert [f.held_out for f in chosen] == ["kits19-ct", "curvas-ct"]
    sizes = manifest["source"].value_counts()
    assert len(chosen[0].test) == sizes["kits19-ct"] and len(chosen[1].test) == sizes["curvas-ct"]


def test_fold_errors_name_the_problem(phantom_dir, shared_data):
    with pytest.raises(ValueError, match="at least 2 sources"):
        ks.source_folds(ku.index_dataset(phantom_dir).pairs)
    pairs = ku.index_dataset(shared_data).pairs
    with pytest.raises(ValueError, match=r"SOURCES names \['kits-ct'\].*kits19-ct"):
        ks.source_folds(pairs, ["kits-ct"])
    with pytest.raises(ValueError, match="distinct"):
        ks.source_folds(pairs, ["kits19-ct", "kits19-ct"])


def test_one_source_gives_no_fold_and_says_why(phantom_dir, capsys):
    assert ks.source_folds(ku.index_dataset(phantom_dir).pairs, strict=False) == []
    assert "needs at least 2 sources" in capsys.readouterr().out


def test_fold_examples_prefer_kidney_and_survive_a_source_without_any(two_sites, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(two_sites, root)
    for mask in (root / "phantom-site-b" / "masks").iterdir():  # site b: no kidney anywhere
        cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)))
    folds = ks.source_folds(ku.index_dataset(root).pairs)
    examples = ks.fold_examples(folds)  # used to raise a bare StopIteration in notebook 05
    assert [p.source for p in examples] == ["phantom-site-a", "phantom-site-b"]
    assert ku.load_pair(examples[0])[1].any() and examples[1] == folds[1].test[0]
    assert "No slice with kidney in phantom-site-b" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    return ku.make_synthetic_sources(tmp_path_factory.mktemp("sites") / "data", n_cases=3, slices_per_case=4)


def test_synthetic_sources_differ_in_window(two_sites):
    index = ku.index_dataset(two_sites)
    assert sorted({p.source for p in index.pairs}) == sorted(ku.SYNTHETIC_SOURCES)
    means = {
        s: np.mean([ku.read_image(p.image).mean() for p in index.pairs if p.source == s])
        for s in ku.SYNTHETIC_SOURCES
    }
    assert means["phantom-site-b"] < means["phantom-site-a"]  # window (0.3, 0.9) darkens soft tissue


@pytest.mark.slow  # trains four small models end to end
def test_leave_one_source_out_table_and_reuse(two_sites, tmp_path, monkeypatch):
    config = ku.Config(
        image_size=32, base_channels=4, depth=2, batch_size=4, num_epochs=1, group_regex="^([^_]+)_", seed=1
    )
    variants = {"spec": {}, "histeq+strong": {"NORMALIZATION": "histeq", "AUGMENTATION": "strong"}}
    out = tmp_path / "loso"
    table = ks.leave_one_source_out(config, two_sites, out, variants=variants)
    assert len(table) == 4 and table.groupby("variant")["held_out"].nunique().tolist() == [2, 2]
    assert set(table["held_out"]) == set(ku.SYNTHETIC_SOURCES)
    assert (table["n_test"] == 12).all() and (table["n_train"] + table["n_val"] == 12).all()
    assert table[["pooled_dice", "mean_dice"]].apply(lambda c: c.between(0, 1)).all().all()
    assert not table["reused"].any()
    pd.testing.assert_frame_equal(pd.read_csv(out / ks.LOSO_CSV_NAME), table, check_dtype=False)
    # The model of a fold never saw its held-out source.
    checkpoint = ku.load_checkpoint(out / "histeq+strong" / "phantom-site-a" / ku.BEST_MODEL_NAME)
    trained = checkpoint["split"]["train"] + checkpoint["split"]["val"]
    assert trained and not [k for k in trained if k.startswith("phantom-site-a/")]
    assert checkpoint["config"]["input_mapping"] == "histeq"
    settings = json.loads((out / "histeq+strong" / "phantom-site-a" / "fold_result.json").read_text())
    assert settings["settings"]["augmentation"] == "strong"
    # A second call reuses finished folds; other settings retrain.
    fold_b = out / "spec" / "phantom-site-b"
    best, result_path = fold_b / ku.BEST_MODEL_NAME, fold_b / "fold_result.json"

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_unseen  # its 20/40/60-epoch steps train finished folds on

    def fold_b_run(epochs: int, folder=out) -> pd.DataFrame:
        return ks.leave_one_source_out(
            config.with_parameters(NUM_EPOCHS=epochs),
            two_sites,
            folder,
            variants={"spec": {}},
            sources=["phantom-site-b"],
            extendable=bench_unseen.extendable,
        )

    stamp = best.stat().st_mtime_ns
    again = fold_b_run(1)
    assert again["reused"].all() and best.stat().st_mtime_ns == stamp
    assert again.iloc[0]["pooled_dice"] == pytest.approx(
        table.query("variant == 'spec'").iloc[1]["pooled_dice"]
    )
    first_epoch = pd.read_csv(fold_b / ku.METRICS_CSV_NAME).iloc[0]
    longer = fold_b_run(2)
    # A larger NUM_EPOCHS trains the finished fold on: exactly the run a 2-epoch budget gives.
    assert not longer["reused"].any() and longer.iloc[0]["epochs"] == 2
    fresh = fold_b_run(2, tmp_path / "fresh")
    extended_curve = pd.read_csv(fold_b / ku.METRICS_CSV_NAME)
    fresh_curve = pd.read_csv(tmp_path / "fresh" / "spec" / "phantom-site-b" / ku.METRICS_CSV_NAME)
    assert extended_curve["epoch"].tolist() == [1, 2]
    assert extended_curve.iloc[0]["seconds"] == first_epoch["seconds"]  # continued, not retrained
    for column in ("train_loss", "val_loss", "val_dice", "lr"):
        assert extended_curve[column].tolist() == pytest.approx(fresh_curve[column].tolist(), abs=1e-6)
    assert longer.iloc[0]["pooled_dice"] == pytest.approx(fresh.iloc[0]["pooled_dice"], abs=1e-6)
    # A last checkpoint already at or past the new budget (an interrupted longer run): trained anew.
    stored = json.loads(result_path.read_text())
    stored["settings"]["config"]["num_epochs"] = 1
    result_path.write_text(json.dumps(stored))
    anew = fold_b_run(2)
    curve = pd.read_csv(fold_b / ku.METRICS_CSV_NAME)
    assert not anew["reused"].any() and curve["epoch"].tolist() == [1, 2]
    assert curve.iloc[0]["seconds"] != first_epoch["seconds"]  # retrained from the start
    assert curve["val_loss"].tolist() == pytest.approx(fresh_curve["val_loss"].tolist(), abs=1e-6)
    # A fold that had stopped early would stop at the same epoch with more epochs: kept as it is.
    stored = json.loads(result_path.read_text())
    stored["row"]["stop_reason"] = "early_stopping"
    result_path.write_text(json.dumps(stored))
    stamp = best.stat().st_mtime_ns
    kept = fold_b_run(5)
    assert kept["reused"].all() and kept.iloc[0]["epochs"] == 2 and best.stat().st_mtime_ns == stamp
    assert json.loads(result_path.read_text())["settings"]["config"]["num_epochs"] == 5
    summary = ks.summarize_leave_one_source_out(table, groups={"A": ["phantom-site-a"]})
    assert summary["pooled_dice"].is_monotonic_decreasing and set(summary["variant"]) == set(variants)
    assert summary.loc[0, "folds"] == 2 and "pooled_dice_A" in summary
    result = json.loads((out / "spec" / "phantom-site-a" / "fold_result.json").read_text())
    assert result["row"]["held_out"] == "phantom-site-a"


def test_leave_one_source_out_rejects_bad_variants(two_sites, tmp_path, tiny_config):
    with pytest.raises(ValueError, match=r"VARIANTS\['x'\]: Unknown parameters \['NORMALISATION'\]"):
        ks.leave_one_source_out(tiny_config, two_sites, tmp_path, variants={"x": {"NORMALISATION": "zscore"}})
    with pytest.raises(ValueError, match="plain folder name"):
        ks.leave_one_source_out(tiny_config, two_sites, tmp_path, variants={"a/b": {}})
    with pytest.raises(ValueError, match="NORMALIZATION"):
        ks.leave_one_source_out(tiny_config, two_sites, tmp_path, variants={"x": {"NORMALIZATION": "robust"}})


@pytest.mark.slow  # decodes every real slice
def test_normalization_consistency_reports_every_source(shared_data, manifest):
    per_source, summary = ks.normalization_consistency(shared_data, image_size=64)
    assert set(per_source["source"]) == set(manifest["source"])
    assert list(summary["method"]) == list(ks.NORMALIZATION_OPTIONS)
    minmax = per_source[per_source["method"] == "minmax"]
    assert minmax["kidney"].between(0, 1).all()
    assert (summary["spread"] > 0).all()


def test_without_data_notebook_05_gets_two_phantom_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(ku.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "no-kaggle"))
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        root = ku.resolve_data_dir("auto", synthetic_dir=tmp_path / "syn", synthetic_sources=True)
    assert len(ks.source_folds(ku.index_dataset(root).pairs)) == len(ku.SYNTHETIC_SOURCES) == 2


def test_an_unregistered_input_mapping_stops_before_any_training(phantom_dir, monkeypatch):
    """``-p INPUT_MAPPING clahe`` on notebook 03, which does not attach the studies: a clear error."""
    monkeypatch.setattr(ku, "INPUT_MAPPINGS", {"minmax": ku.InputMapping()})
    config = ku.Config.from_parameters(INPUT_MAPPING="clahe", IMAGE_SIZE=32, DEPTH=2)
    with pytest.raises(ValueError, match=r"'clahe' .* not registered .* attach kidneyseg_studies.py"):
        ku.prepare_data(config, phantom_dir)
