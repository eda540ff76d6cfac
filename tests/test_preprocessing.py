"""Preprocessing: shape, dtype and range kept, constant images safe, and each method's known effect."""

from __future__ import annotations

import numpy as np
import pytest

import kidneyseg_studies as ks


def low_contrast_phantom(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128]
    image = 100 + 12 * ((yy // 16 + xx // 16) % 2) + rng.normal(0, 2, (128, 128))
    return np.clip(image, 0, 255).astype(np.uint8)


METHODS = [ks.white_balance, ks.clahe, ks.unsharp_mask]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0, 77, 255])
def test_constant_image_stays_constant(method, value):
    image = np.full((20, 30), value, np.uint8)
    out = method(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert len(np.unique(out)) == 1  # no pattern invented from nothing
    if method is not ks.clahe:  # CLAHE may shift a constant level; the others keep it
        assert (out == value).all()


@pytest.mark.parametrize("method", METHODS)
def test_shape_dtype_kept_and_contrast_raised(method):
    image = low_contrast_phantom()[:, :100]
    out = method(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.astype(float).std() > 1.05 * image.astype(float).std()  # each step adds contrast


def test_white_balance_maps_percentiles_to_the_range_ends():
    image = np.arange(100, dtype=np.uint8).reshape(10, 10) + 50  # values 50..149
    out = ks.white_balance(image, 10, 90)
    lo, hi = np.percentile(image, [10, 90])
    assert out[image <= lo].max() == 0 and out[image >= hi].min() == 255
    mid = image == 100
    assert out[mid][0] == round((100 - lo) * 255 / (hi - lo))
    with pytest.raises(ValueError):
        ks.white_balance(image, 90, 10)


def local_contrast(image: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels."""
    f = image.astype(float)
    return float(np.abs(np.diff(f, axis=0)).mean() + np.abs(np.diff(f, axis=1)).mean())


def test_clahe_raises_local_contrast_of_a_low_contrast_phantom():
    image = low_contrast_phantom()
    assert local_contrast(ks.clahe(image, clip_limit=3.0)) > 1.5 * local_contrast(image)
    assert local_contrast(ks.clahe(image, clip_limit=4.0)) > local_contrast(ks.clahe(image, clip_limit=1.0))


def test_unsharp_raises_the_gradient_at_an_edge():
    image = np.full((32, 32), 80, np.uint8)
    image[:, 16:] = 160
    assert np.array_equal(ks.unsharp_mask(image, sigma=2.0, amount=0.0), image)  # amount 0: no change
    out = ks.unsharp_mask(image, sigma=2.0, amount=1.5)
    assert abs(int(out[10, 16]) - int(out[10, 15])) > abs(int(image[10, 16]) - int(image[10, 15]))
    assert out[10, 15] < 80 and out[10, 16] > 160  # overshoot on both sides of the edge


def test_apply_preprocessing_chains_and_validates():
    image = low_contrast_phantom()
    assert ks.apply_preprocessing(image, "none") is image
    chained = ks.apply_preprocessing(image, "white_balance+clahe")
    assert np.array_equal(chained, ks.clahe(ks.white_balance(image)))
    for option in ks.PREPROCESSING_OPTIONS:
        assert ks.apply_preprocessing(image, option).shape == image.shape
        ks.input_mapping_name(option)
    with pytest.raises(ValueError, match="PREPROCESSING"):
        ks.apply_preprocessing(image, "sharpen")
    with pytest.raises(ValueError, match="PREPROCESSING"):
        ks.input_mapping_name("clahe+magic")


def test_contrast_metrics_by_hand():
    image = np.full((40, 40), 50, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 1
    image[mask > 0] = 150
    cnr, edge = ks.contrast_metrics(image, mask)
    assert cnr > 1e4  # a contrast of 100 grey levels over no noise at all
    # Sobel/8 across a 100-level step is 50 grey levels per pixel on the straight sides of the
    # outline; the four corners give 53 (gx = gy = 37.5).
    assert edge == pytest.approx(50, abs=1.0)
    noisy = image.astype(float) + np.random.default_rng(0).normal(0, 10, image.shape)
    cnr_noisy, _ = ks.contrast_metrics(np.clip(noisy, 0, 255).astype(np.uint8), mask)
    assert 7 < cnr_noisy < 13  # about 100 / 10
    assert all(np.isnan(ks.contrast_metrics(image, np.zeros_like(mask))))


def test_preprocessing_effects_table():
    image = low_contrast_phantom()
    mask = np.zeros_like(image)
    mask[40:80, 40:80] = 1
    effects = ks.preprocessing_effects([image, image], [mask, mask], ["a", "b"])
    none = effects[effects["method"] == "none"]
    assert (none["cnr_gain"] == 1.0).all() and set(effects["source"]) == {"a", "b"}
    assert len(effects) == 2 * len(ks.PREPROCESSING_SWEEP)


def test_preprocessing_gains_are_ratios_to_no_preprocessing():
    """A linear stretch of [90, 120] to [0, 255] (white balance at the 0th and 100th percentiles)
    multiplies every grey-level difference by 8.5: edge strength gains 8.5x, the contrast-to-noise
    ratio (a ratio of differences) stays 1 up to rounding. CLAHE changes both: its gains are the ratio
    of its measurements to the unprocessed image's."""
    rng = np.random.default_rng(1)
    image = np.full((96, 96), 100, np.uint8)
    image[32:64, 32:64] = 110
    image = (image + rng.integers(-10, 11, image.shape) // 2).clip(90, 120).astype(np.uint8)
    image[0, 0], image[0, 1] = 90, 120  # the stretch's ends
    mask = np.zeros_like(image)
    mask[32:64, 32:64] = 1
    sweep = [("none", {}), ("white_balance", {"low_percentile": 0.0, "high_percentile": 100.0})]
    sweep.append(("clahe", {"clip_limit": 2.0, "tile_grid": 8}))
    table = ks.preprocessing_effects([image], [mask], ["a"], sweep=sweep).set_index("method")
    assert table.loc["white_balance", "edge_gain"] == pytest.approx(8.5, rel=0.02)
    assert table.loc["white_balance", "cnr_gain"] == pytest.approx(1.0, rel=0.02)
    cnr, edge = ks.contrast_metrics(image, mask)
    cnr_clahe, edge_clahe = ks.contrast_metrics(ks.clahe(image, 2.0, 8), mask)
    assert table.loc["clahe", "cnr_gain"] == pytest.approx(cnr_clahe / cnr)
    assert table.loc["clahe", "edge_gain"] == pytest.approx(edge_clahe / edge)
    assert abs(table.loc["clahe", "edge_gain"] - 1) > 0.1  # CLAHE does change the image


def test_recommendation_prefers_simple_within_noise():
    import pandas as pd

    table = pd.DataFrame({"preprocessing": ["none", "clahe", "unsharp"], "val_dice": [0.80, 0.805, 0.79]})
    assert ks.recommend_preprocessing(table)[0] == "none"
    table.loc[1, "val_dice"] = 0.85
    choice, reason = ks.recommend_preprocessing(table)
    assert choice == "clahe" and "+0.050" in reason
