"""Data rules: pairing, reading any file by the documented rules, splits, phantoms, augmentation."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

import kidneyseg_utils as ku


def write(path: Path, array: np.ndarray, params: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array, params or [])
    return path


def make_folder(root: Path, names: list[str], size: int = 32, masks: list[str] | None = None) -> Path:
    for name in names:
        write(root / "images" / f"{name}.png", np.full((size, size), 100, np.uint8))
    for name in names if masks is None else masks:
        m = np.zeros((size, size), np.uint8)
        m[8:16, 8:16] = 255
        write(root / "masks" / f"{name}.png", m)
    return root


# ----- reading rules ---------------------------------------------------------------------------


def test_gray_8bit_kept(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(ku.read_image(write(tmp_path / "a.png", a)), a)


def test_16bit_is_stretched_from_its_own_range(tmp_path):
    a = np.array([[1000, 2000], [3000, 1000]], np.uint16)
    out = ku.read_image(write(tmp_path / "a.png", a))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 128], [255, 0]]  # (2000-1000)/2000*255 = 127.5 -> 128


def test_constant_16bit_becomes_zeros():
    assert not ku.to_grayscale_uint8(np.full((4, 4), 7, np.uint16)).any()


def test_rgb_rgba_and_gray_alpha_use_luma(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 200  # pure red in OpenCV's BGR order
    expected = round(0.299 * 200)
    assert ku.read_image(write(tmp_path / "rgb.png", bgr)).max() == expected
    bgra = np.dstack([bgr, np.full((4, 4), 10, np.uint8)])  # alpha must not matter
    assert ku.read_image(write(tmp_path / "rgba.png", bgra)).max() == expected
    gray_alpha = np.dstack([np.full((4, 4), 77, np.uint8), np.zeros((4, 4), np.uint8)])
    assert ku.to_grayscale_uint8(gray_alpha).max() == 77


def test_palette_png(tmp_path):
    from PIL import Image

    img = Image.new("P", (6, 4))
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png")
    out = ku.read_image(tmp_path / "p.png")
    assert out.shape == (4, 6) and out[1, 1] == 255 and out[0, 0] == 0
    assert ku.read_mask(tmp_path / "p.png").sum() == 1


@pytest.mark.parametrize(
    ("mask", "ext"),
    [
        (np.array([[0, 1], [1, 0]], np.uint8), ".png"),
        (np.array([[0, 255], [255, 0]], np.uint8), ".png"),
        (np.array([[0, 65535], [65535, 0]], np.uint16), ".png"),
        (np.array([[0, 300], [300, 0]], np.uint16), ".png"),
    ],
)
def test_mask_values_become_0_1(tmp_path, mask, ext):
    out = ku.read_mask(write(tmp_path / f"m{ext}", mask))
    assert out.tolist() == [[0, 1], [1, 0]]


def test_coloured_rgb_mask_counts_any_colour(tmp_path):
    m = np.zeros((4, 4, 3), np.uint8)
    m[0, 0] = (0, 255, 255)  # yellow in BGR
    m[1, 1] = (255, 255, 255)
    assert ku.read_mask(write(tmp_path / "m.png", m)).sum() == 2


def test_jpeg_noisy_mask(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 20:40] = 255
    path = write(tmp_path / "m.jpg", m, [cv2.IMWRITE_JPEG_QUALITY, 60])
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert len(np.unique(raw)) > 2  # really noisy
    out = ku.read_mask(path)
    assert (out == (m > 0)).mean() > 0.995
    empty = write(tmp_path / "e.jpg", np.zeros((32, 32), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert not ku.read_mask(empty).any()
    resaved = write(tmp_path / "resaved.png", raw)  # the same noise, stored losslessly
    assert np.array_equal(ku.read_mask(resaved), out)


def test_dim_single_label_jpeg_keeps_its_kidney(tmp_path):
    # 0/20 saved as JPEG: the kidney label is dim, not noise; it used to be read as an empty mask.
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 20
    out = ku.read_mask(write(tmp_path / "dim.jpg", m, [cv2.IMWRITE_JPEG_QUALITY, 90]))
    assert (out == (m > 0)).mean() > 0.99


def _two_kidneys(left: int, right: int, dtype=np.uint8) -> np.ndarray:
    m = np.zeros((64, 64), dtype)
    m[10:30, 8:24] = left
    m[10:30, 40:56] = right
    return m


@pytest.mark.parametrize(
    ("name", "mask", "shown"),
    [
        ("two_kidneys.png", _two_kidneys(100, 200), "100: 320 px, 200: 320 px"),
        ("mid_label.png", _two_kidneys(127, 255), "127: 320 px, 255: 320 px"),
        ("labels012.png", _two_kidneys(1, 2), "1: 320 px, 2: 320 px"),
        ("two_kidneys.jpg", _two_kidneys(100, 200), "several label values"),
    ],
)
def test_mask_with_several_labels_is_an_error_naming_file_and_values(tmp_path, name, mask, shown):
    path = write(tmp_path / name, mask, [cv2.IMWRITE_JPEG_QUALITY, 90] if name.endswith(".jpg") else [])
    with pytest.raises(ValueError, match="several label values") as error:
        ku.read_mask(path)
    assert name in str(error.value) and shown in str(error.value) and "MASK_LABELS" in str(error.value)


def test_kits_label_map_needs_mask_labels(tmp_path):
    # KiTS21: 1 kidney, 2 tumour, 3 cyst (16-bit). Pixel counts worked out from the rectangles.
    m = np.zeros((40, 40), np.uint16)
    m[5:25, 5:25] = 1  # 400 px, 75 of them overwritten below; background 1600 - 400 - 50
    m[10:15, 10:25] = 2  # 75 px of tumour inside the kidney
    m[30:35, 30:40] = 3  # 50 px of cyst
    path = write(tmp_path / "kits.png", m)
    with pytest.raises(ValueError, match=r"kits.png has several label values \(0: 1150 px, 1: 325 px"):
        ku.read_mask(path)
    assert ku.read_mask(path, "nonzero").sum() == 325 + 75 + 50
    assert ku.read_mask(path, [1]).sum() == 325
    assert ku.read_mask(path, [1, 2]).sum() == 400


def test_soft_edged_png_mask_is_binary(tmp_path):
    m = np.zeros((128, 128), np.uint8)
    cv2.ellipse(m, (60, 60), (20, 30), 30, 0, 360, 255, -1, lineType=cv2.LINE_AA)
    assert len(np.unique(m)) > 20
    out = ku.read_mask(write(tmp_path / "aa.png", m))
    assert np.array_equal(out, (m >= 127.5).astype(np.uint8))


def test_mask_labels_reach_training_data(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:14, 4:12] = 1  # 80 px labelled 1
    mask[18:28, 16:28] = 2  # 120 px labelled 2
    for i in range(6):
        write(tmp_path / "images" / f"p{i}_{i:03d}.png", np.full((32, 32), 90, np.uint8))
        write(tmp_path / "masks" / f"p{i}_{i:03d}.png", mask)
    with pytest.raises(ValueError, match="several label values"):
        ku.prepare_data(ku.Config(image_size=32, depth=2, test_fraction=0), tmp_path)
    config = ku.Config(image_size=32, depth=2, test_fraction=0, mask_labels=[2])
    data = ku.prepare_data(config, tmp_path)
    assert data.train.masks.sum() + data.val.masks.sum() == 6 * 120
    assert ku.Config.from_dict(config.to_dict()).mask_labels == [2]


def test_float_mask_rule():
    assert ku.binarize_mask(np.array([[0.0, 0.4], [0.6, 1.0]], np.float32)).tolist() == [[0, 0], [1, 1]]


def test_size_mismatch_names_both_files(tmp_path):
    write(tmp_path / "d/images/a.png", np.zeros((32, 32), np.uint8))
    write(tmp_path / "d/masks/a.png", np.zeros((32, 40), np.uint8))
    pair = ku.index_dataset(tmp_path / "d").pairs[0]
    with pytest.raises(ValueError, match=r"images/a\.png.*32x32.*masks/a\.png.*40x32"):
        ku.load_pair(pair)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_file_is_named(tmp_path, content):
    root = make_folder(tmp_path / "d", ["a", "b"])
    bad = root / "images" / "a.png"
    if content == "truncated":
        content = bad.read_bytes()[:40]
    bad.write_bytes(content)
    index = ku.index_dataset(root)
    with pytest.raises(ku.ImageReadError, match=r"images/a\.png"):
        ku.load_arrays(index.pairs, 32)
    cached = ku.load_arrays(index.pairs, 32, skip_bad_files=True)
    assert [p.name for p in cached.pairs] == ["b"]
    assert "a.png" in cached.skipped[0][0]


# ----- pairing -----------------------------------------------------------------------------------


def test_pairs_by_stem_across_extensions_and_orphans(tmp_path):
    root = tmp_path / "d"
    write(root / "images/a.png", np.zeros((8, 8), np.uint8))
    write(root / "masks/a.bmp", np.zeros((8, 8), np.uint8))
    write(root / "images/b.jpg", np.zeros((8, 8), np.uint8))
    write(root / "masks/c.tif", np.zeros((8, 8), np.uint8))
    (root / "images/notes.txt").write_text("ignored")
    index = ku.index_dataset(root)
    assert [(p.image.name, p.mask.name) for p in index.pairs] == [("a.png", "a.bmp")]
    assert [p.name for p in index.orphan_images] == ["b.jpg"]
    assert [p.name for p in index.orphan_masks] == ["c.tif"]
    report = index.orphan_report()
    assert "b.jpg" in report and "c.tif" in report
    assert index.summary()["orphans"].tolist() == [2]


def test_nested_roots_are_found(tmp_path):
    make_folder(tmp_path / "root/ct/site1", ["x_1", "x_2"])
    make_folder(tmp_path / "root/mri", ["y_1"])
    index = ku.index_dataset(tmp_path / "root", group_regex="^([^_]+)_")
    assert sorted({p.source for p in index.pairs}) == ["ct/site1", "mri"]
    assert {p.group for p in index.pairs} == {"ct/site1/x", "mri/y"}


def test_duplicate_stem_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", ["a"])
    write(root / "images/a.jpg", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="a.jpg"):
        ku.index_dataset(root)


def test_missing_empty_and_pairless_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*images/ and masks/"):
        ku.index_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images/ \\+ masks/"):
        ku.index_dataset(tmp_path / "empty")
    make_folder(tmp_path / "orph", ["a"], masks=["b"])
    with pytest.raises(ValueError, match="No image/mask pairs"):
        ku.index_dataset(tmp_path / "orph")


def test_group_regex_must_match(tmp_path):
    make_folder(tmp_path / "d", ["nounderscore"])
    with pytest.raises(ValueError, match="nounderscore"):
        ku.index_dataset(tmp_path / "d", group_regex="^([^_]+)_")


# ----- resizing and caching ----------------------------------------------------------------------


def test_resize_keeps_field_of_view_and_binary_mask():
    image = np.zeros((40, 80), np.uint8)
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 60:] = 1  # right quarter
    image[:, 60:] = 200
    img, m = ku._resize_gray(image, 32), ku._resize_mask(mask, 32)
    assert img.shape == m.shape == (32, 32)
    assert set(np.unique(m)) <= {0, 1}
    assert m[:, 25:].all() and not m[:, :23].any()  # still the right quarter: stretched, not cropped


def test_load_arrays_on_real_slices(shared_data):
    index = ku.index_dataset(shared_data, group_regex="^([^_]+)_")
    pairs = [p for p in index.pairs if p.source == "kidneycyst-ct"][:6]
    cached = ku.load_arrays(pairs, 64)
    assert cached.images.shape == cached.masks.shape == (6, 64, 64)
    assert cached.images.dtype == np.uint8 and set(np.unique(cached.masks)) <= {0, 1}
    assert all(h > 64 for h, _ in cached.original_sizes)
    assert cached.masks.any(axis=(1, 2)).all()  # every kidneycyst slice has kidney


def test_shared_data_inventory(shared_data, manifest):
    index = ku.index_dataset(shared_data, group_regex="^([^_]+)_")
    assert len(index.pairs) == len(manifest) and not index.orphan_images and not index.orphan_masks
    summary = index.summary().set_index("source")
    expected = manifest.groupby("source").agg(pairs=("file", "size"), cases=("case", "nunique"))
    assert summary[["pairs", "cases"]].sort_index().equals(expected.sort_index())


# ----- splits ------------------------------------------------------------------------------------


def test_grouped_split_is_reproducible_and_keeps_patients_together(shared_data):
    pairs = ku.index_dataset(shared_data, group_regex="^([^_]+)_").pairs
    train, val = ku.split_pairs(pairs, 0.2, seed=7)
    again = ku.split_pairs(pairs, 0.2, seed=7)
    assert (train, val) == again
    assert not {p.group for p in train} & {p.group for p in val}
    assert len(train) + len(val) == len(pairs)
    n_groups = len({p.group for p in pairs})
    assert (
        len({p.group for p in val}) == round(0.2 * n_groups)
        or abs(len({p.group for p in val}) - 0.2 * n_groups) <= 1
    )
    other = ku.split_pairs(pairs, 0.2, seed=8)
    assert other[1] != val


def test_ungrouped_split_fraction(phantom_dir):
    pairs = ku.index_dataset(phantom_dir).pairs
    train, val = ku.split_pairs(pairs, 0.25, seed=0, grouped=False)
    assert len(val) == 9 and len(train) == 27


def test_split_errors(phantom_dir):
    pairs = ku.index_dataset(phantom_dir, group_regex="^(phantom)").pairs
    with pytest.raises(ValueError, match="one case"):
        ku.split_pairs(pairs, 0.2, 0)
    with pytest.raises(ValueError, match="at least 2"):
        ku.split_pairs(pairs[:1], 0.2, 0, grouped=False)


# ----- phantoms and data-root resolution -----------------------------------------------------


def test_phantoms_are_seeded_and_well_formed(tmp_path, phantom_dir):
    index = ku.index_dataset(phantom_dir, group_regex="^([^_]+)_")
    assert len(index.pairs) == 36 and len({p.case for p in index.pairs}) == 6
    masks = [ku.read_mask(p.mask) for p in index.pairs]
    kidney_share = [m.mean() for m in masks]
    assert min(kidney_share) == 0.0 and 0.01 < max(kidney_share) < 0.2  # empty and full slices
    again = ku.make_synthetic_dataset(tmp_path / "again", n_cases=6, slices_per_case=6, image_size=64, seed=1)
    first = sorted((phantom_dir / "images").iterdir())[7]
    assert (again / "images" / first.name).read_bytes() == first.read_bytes()
    image = ku.read_image(first)
    assert image.shape == (64, 64) and image.std() > 20


def test_phantoms_never_touch_foreign_folders(tmp_path, phantom_dir):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        ku.make_synthetic_dataset(tmp_path / "user")
    assert (tmp_path / "user" / "mine.txt").read_text() == "keep"
    with pytest.raises(FileExistsError, match="other settings"):
        ku.make_synthetic_dataset(phantom_dir, n_cases=2)
    assert (
        ku.make_synthetic_dataset(phantom_dir, n_cases=6, slices_per_case=6, image_size=64, seed=1)
        == phantom_dir
    )


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    kaggle = tmp_path / "kaggle" / "input"
    make_folder(kaggle / "my-dataset" / "train", ["a"])
    monkeypatch.delenv(ku.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "kaggle"))
    assert ku.resolve_data_dir(str(tmp_path)) == tmp_path
    assert ku.resolve_data_dir("auto") == kaggle / "my-dataset"  # the attached dataset
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "none"))
    monkeypatch.setenv(ku.DATA_DIR_ENV, str(tmp_path / "env"))
    make_folder(tmp_path / "env", ["b"])
    assert ku.resolve_data_dir("auto") == tmp_path / "env"
    monkeypatch.delenv(ku.DATA_DIR_ENV)
    with pytest.raises(FileNotFoundError, match="searched"):
        ku.resolve_data_dir("auto")
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        synthetic = ku.resolve_data_dir("auto", synthetic_dir=tmp_path / "syn")
    assert len(ku.index_dataset(synthetic).pairs) == 120
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ku.resolve_data_dir(tmp_path / "missing")


def test_resolve_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KIDNEYSEG_KAGGLE_ROOT", str(tmp_path / "kaggle"))
    assert ku.resolve_output_dir("auto") == Path("outputs") and Path("outputs").is_dir()
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert ku.resolve_output_dir("auto") == tmp_path / "kaggle" / "working" / "kidneyseg"
    assert ku.resolve_output_dir(tmp_path / "x").is_dir()


# ----- datasets and augmentation -----------------------------------------------------------------


def test_augmentation_keeps_masks_binary_and_aligned():
    rng = np.random.default_rng(0)
    masks = np.zeros((8, 64, 64), np.uint8)
    for k in range(8):
        y, x = rng.integers(10, 40, size=2)
        masks[k, y : y + 16, x : x + 20] = 1
    images = np.where(masks > 0, 220, 60).astype(np.uint8)
    ds = ku.KidneyDataset(images, masks, ku.build_train_transform(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in range(5 * len(ds)):  # five epochs of different augmentations
            image, mask = ds[index]
            assert image.shape == mask.shape == (1, 64, 64)
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert 0.0 <= image.min() and image.max() <= 1.0
            bright = image[0] > (image[0].max() + image[0][mask[0] == 0].median()) / 2 if mask.any() else None
            if bright is not None:
                agreement = (bright == (mask[0] > 0)).float().mean().item()
                assert agreement > 0.97


def test_augmentation_is_seeded_per_epoch_and_sample():
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    masks = (images > 128).astype(np.uint8)
    a = ku.KidneyDataset(images, masks, ku.build_train_transform(), seed=5)
    b = ku.KidneyDataset(images, masks, ku.build_train_transform(), seed=5)
    assert all(np.array_equal(a[i][0], b[i][0]) for i in range(9))
    differs = [not np.array_equal(a[i][0], a[i + 3][0]) for i in range(3)]
    assert any(differs)  # epoch 1 differs from epoch 0


def test_sampler_orders_are_reproducible():
    s = ku.EpochShuffleSampler(10, seed=2)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10, 20))
    s.set_epoch(0)
    assert list(s) == first


def test_prepare_data_on_phantoms(phantom_dir, tiny_config):
    data = ku.prepare_data(tiny_config, phantom_dir)
    summary = data.summary()
    assert summary[["train", "val", "test"]].sum(axis=1).tolist() == [36]
    record = data.split_record()
    cases = {part: {key.split("_")[0] for key in keys} for part, keys in record.items()}
    assert not cases["train"] & cases["val"] and not (cases["train"] | cases["val"]) & cases["test"]
    assert len(cases["test"]) == 1  # 15 % of the 6 phantom patients, rounded up by scikit-learn
    image, mask = data.train_dataset[0]
    assert image.shape == (1, 32, 32)


def test_prepare_data_warns_about_orphans_and_subsamples(tmp_path, phantom_dir, tiny_config):
    root = tmp_path / "copy"
    shutil.copytree(phantom_dir, root)
    (root / "masks" / "phantom-000_000.png").unlink()
    with pytest.warns(UserWarning, match="phantom-000_000.png"):
        data = ku.prepare_data(tiny_config, root)
    assert len(data.train) + len(data.val) + len(data.test) == 35
    small = ku.Config(**{**tiny_config.to_dict(), "max_images": 12})
    data = ku.prepare_data(small, phantom_dir)
    assert len(data.train) + len(data.val) + len(data.test) == 12


def test_seeded_augmentations_draw_independently():
    # Regression: Compose.set_random_seed seeds every transform alike, so flips came only in pairs.
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    dataset = ku.KidneyDataset(
        image[None],
        np.zeros((1, 4, 4), np.uint8),
        A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]),
    )
    corners = [int(round(float(dataset[epoch][0][0, 0, 0]) * 255)) for epoch in range(400)]
    counts = {c: corners.count(c) for c in (0, 3, 12, 15)}  # none, horizontal, vertical, both
    assert sum(counts.values()) == 400 and min(counts.values()) > 60, counts
    assert dataset[7][0].equal(dataset[7][0])  # still reproducible


# ----- GROUP_REGEX="auto" --------------------------------------------------------------------------


def test_auto_groups_find_the_shared_patients_exactly(shared_data, manifest, capsys):
    index = ku.index_dataset(shared_data, "auto")
    assert index.group_regex == "^([^_]+)_" and "part before the first underscore" in capsys.readouterr().out
    found = {(p.source, p.name): p.case for p in index.pairs}
    expected = {(r.source, r.file.rsplit(".", 1)[0]): r.case for r in manifest.itertuples()}
    assert found == expected
    assert (
        f"{manifest.groupby('source')['case'].nunique().sum()} patients"
        in ku.infer_group_regex(
            {s: [n for (src, n) in found if src == s] for s in manifest["source"].unique()}
        )[1]
    )


@pytest.mark.parametrize(
    ("stems", "pattern", "why"),
    [
        ({"d": ["case7_012", "case7_013", "case8_001", "case9_002"]}, "^([^_]+)_", None),
        ({"d": ["case1_001", "scan_7", "p3-slice12_1", "x_2"]}, "^([^_]+)_", None),  # any text before "_"
        ({"d": ["a1_1", "a2_1", "a3_1", "a4_1"]}, "^([^_]+)_", None),  # one slice per patient
        ({"d": ["case7-012", "case7-013", "case8-001", "case9-002"]}, None, "no source fits"),
        ({"d": [f"img_{i:04d}" for i in range(20)]}, None, "only 1 patient"),  # a name prefix
        ({"d": ["left_kidney", "right_kidney", "upper_pole", "lower_pole"]}, None, "no source fits"),
        ({"d": ["liver", "spleen", "kidney"]}, None, "no source fits"),
        ({"d": ["p1_1", "p1_2", "p2_1"]}, None, "only 2 patient"),
    ],
)
def test_auto_groups_refuse_to_invent_patients(stems, pattern, why):
    found, sentence = ku.infer_group_regex(stems)
    assert found == pattern
    if why is None:
        assert "patients in" in sentence
    else:
        assert why in sentence and "split by image" in sentence


def test_auto_groups_per_source_split_a_source_without_ids_by_image(tmp_path):
    ct = [f"case{p}_{s:03d}" for p in range(1, 7) for s in range(4)]  # 6 patients, 4 slices each
    us = [f"img{i:04d}" for i in range(12)]  # no underscore, so no patient id
    found, sentence = ku.infer_group_regex({"ct": ct, "us": us})
    assert found == {"ct": "^([^_]+)_", "us": None}
    assert "except in us, whose file names carry no such id" in sentence and "split one by one" in sentence
    for source, names in (("ct", ct), ("us", us)):
        for name in names:
            write(tmp_path / source / "images" / f"{name}.png", np.full((8, 8), 50, np.uint8))
            write(tmp_path / source / "masks" / f"{name}.png", np.zeros((8, 8), np.uint8))
    with pytest.warns(UserWarning, match="carry no such id"):
        index = ku.index_dataset(tmp_path, "auto")
    assert {p.case for p in index.pairs if p.source == "us"} == set(us)  # one image, one split unit
    assert {p.case for p in index.pairs if p.source == "ct"} == {f"case{p}" for p in range(1, 7)}
    assert index.group_regex == found
    train, val, test = ku.split_train_val_test(index.pairs, 0.25, 0.25, seed=0)
    for part in (train, val, test):  # the ultrasound images are spread, not all on one side
        assert any(p.source == "us" for p in part)
    cases_by_part = [{p.group for p in part if p.source == "ct"} for part in (train, val, test)]
    assert not (cases_by_part[0] & cases_by_part[1]) and not (cases_by_part[0] & cases_by_part[2])
    config = ku.Config(group_regex=found)
    assert ku.Config.from_dict(json.loads(json.dumps(config.to_dict()))).group_regex == found


def test_auto_groups_fall_back_to_images_with_a_warning(tmp_path):
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for i in range(6):
            Image.new("L", (8, 8)).save(tmp_path / sub / f"img_{i:04d}.png")
    with pytest.warns(UserWarning, match="split by image"):
        index = ku.index_dataset(tmp_path, "auto")
    assert index.group_regex is None and len({p.case for p in index.pairs}) == 6


def test_three_way_split_holds_out_patients_first(phantom_dir):
    pairs = ku.index_dataset(phantom_dir, "^([^_]+)_").pairs
    train, val, test = ku.split_train_val_test(pairs, 0.2, 0.15, seed=42)
    cases = [{p.case for p in part} for part in (train, val, test)]
    assert len(train) + len(val) + len(test) == len(pairs) and all(cases)
    assert not (cases[0] & cases[1]) and not (cases[0] | cases[1]) & cases[2]
    assert ku.split_train_val_test(pairs, 0.2, 0.15, seed=42) == (train, val, test)  # seeded
    assert ku.split_train_val_test(pairs, 0.2, 0.0, seed=42)[2] == []
    two = [p for p in pairs if p.case in sorted(cases[0])[:2]]
    with pytest.warns(UserWarning, match="NO test split"):
        assert ku.split_train_val_test(two, 0.5, 0.15)[2] == []


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        # signed 16-bit CT-like values: -1000 -> 0, 1000 -> 255, 0 -> 127.5 -> 128, 500 -> 191.25 -> 191
        ([[-1000, 0], [500, 1000]], np.int16, [[0, 128], [191, 255]]),
        # float values inside [0, 1] are stretched from their own range too: 0.25 -> 0, 1.0 -> 255
        ([[0.25, 0.5], [0.75, 1.0]], np.float32, [[0, 85], [170, 255]]),
    ],
)
def test_signed_and_float_images_stretch_from_their_own_range(tmp_path, values, dtype, expected):
    """README: 16-bit, signed and float images are stretched from their own minimum and maximum to
    0..255 (never clipped), read through the same path as a dataset's TIFF files."""
    path = tmp_path / "slice.tif"
    assert cv2.imwrite(str(path), np.array(values, dtype))
    assert ku.read_image(path).tolist() == expected
    assert ku.to_grayscale_uint8(np.array(values, dtype)).tolist() == expected
