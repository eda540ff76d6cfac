"""Evaluation and inference: metrics on hand-worked masks, TTA, postprocessing, resizing back,
folder prediction and its refusals, and the exact validation split."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny, train_tiny
from torch import nn

import kidneyseg_studies as ks
import kidneyseg_utils as ku


def square(shape, top, left, size):
    m = np.zeros(shape, np.uint8)
    m[top : top + size, left : left + size] = 1
    return m


# ----- HD95 --------------------------------------------------------------------------------------


def test_hd95_single_pixels():
    a, b = np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8)
    a[5, 5], b[5, 9] = 1, 1
    assert ku.hausdorff95(a, b) == pytest.approx(4.0)


def test_hd95_shifted_square_is_the_shift():
    target = square((30, 30), 5, 5, 10)
    pred = square((30, 30), 5, 7, 10)  # two columns to the right
    assert ku.hausdorff95(pred, target) == pytest.approx(2.0)
    assert ku.hausdorff95(target, target) == 0.0


def test_hd95_empty_rules():
    empty, one = np.zeros((10, 20), np.uint8), square((10, 20), 2, 2, 3)
    assert ku.hausdorff95(empty, empty) == 0.0
    assert ku.hausdorff95(empty, one) == pytest.approx(math.hypot(10, 20))  # missed kidney
    assert ku.hausdorff95(one, empty) == pytest.approx(math.hypot(10, 20))  # false kidney
    with pytest.raises(ValueError, match="shape"):
        ku.hausdorff95(one, one[:5])


# ----- postprocessing ----------------------------------------------------------------------------


def test_postprocess_drops_small_and_keeps_two_largest():
    m = np.zeros((100, 100), np.uint8)
    m[0:5, 0:10] = 1  # 50 px
    m[20:23, 20:30] = 1  # 30 px
    m[50:52, 50:60] = 1  # 20 px
    m[90, 90:92] = 1  # 2 px
    out = ku.postprocess_mask(m)  # min area 0.0005 * 10000 = 5 px
    assert out.sum() == 80 and out[0, 0] == 1 and out[20, 20] == 1 and out[50, 50] == 0
    assert ku.postprocess_mask(m, min_fraction=0.004).sum() == 50  # 40 px minimum
    assert ku.postprocess_mask(np.zeros((5, 5), np.uint8)).sum() == 0


# ----- TTA and prediction ------------------------------------------------------------------------


def identity_like_model() -> nn.Module:
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(8.0)
        conv.bias.fill_(-4.0)
    return conv.eval()


def test_tta_with_flip_equivariant_model_equals_direct():
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    model = identity_like_model()
    direct = ku.predict_probabilities(model, images)
    np.testing.assert_allclose(ku.predict_probabilities(model, images, tta=True), direct, atol=1e-6)
    expected = 1 / (1 + np.exp(-(8 * images.astype(np.float64) / 255.0 - 4)))
    np.testing.assert_allclose(direct, expected, atol=1e-5)


def test_tta_averages_flips_for_a_direction_sensitive_model():
    model = nn.Conv2d(1, 1, 3, padding=1).eval()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0, 1, 2] = 5.0  # looks at the right-hand neighbour only
        model.bias.zero_()
    image = np.zeros((1, 8, 8), np.uint8)
    image[0, 4, 4] = 255
    tta = ku.predict_probabilities(model, image, tta=True)[0]
    # direct output lights (4, 3); its horizontal flip lights (4, 5): both get half of the boost
    assert tta[4, 3] == pytest.approx(tta[4, 5]) and tta[4, 3] > 0.6 and tta[4, 4] == pytest.approx(0.5)


def make_eval_set(tmp_path, sizes):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
        image = np.where(mask > 0, 230, 40).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"c{i}_s.png"), image)
        cv2.imwrite(str(root / "masks" / f"c{i}_s.png"), mask)
    return root


def test_scores_are_at_original_size_and_perfect_for_a_perfect_model(tmp_path):
    sizes = [(40, 56), (64, 64), (100, 30)]
    root = make_eval_set(tmp_path, sizes)
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    data = ku.load_evaluation_set(ku.index_dataset(root).pairs, config)
    assert data.images.shape == (3, 32, 32)
    per_image, summary, probs = ku.evaluate_model(identity_like_model(), data, threshold=0.5)
    assert [p.shape for p in probs] == sizes
    assert list(zip(per_image["height"], per_image["width"])) == sizes
    assert per_image["dice"].min() > 0.9
    assert summary["n_images"] == 3 and summary["pooled_dice"] > 0.9
    assert set(summary) >= {
        "pooled_dice",
        "mean_dice",
        "mean_dice_with_kidney",
        "pooled_iou",
        "mean_hd95",
        "n_images",
        "threshold",
        "tta",
        "postprocess",
        "ms_per_slice",
    }
    files = ku.write_evaluation(per_image, summary, tmp_path / "ev")
    assert pd.read_csv(files["per_image_csv"]).shape[0] == 3
    assert '"pooled_dice"' in files["summary_json"].read_text()


def test_summary_pooled_versus_mean_by_hand():
    per_image = pd.DataFrame(
        {
            "dice": [1.0, 0.5, 1.0],
            "iou": [1.0, 1 / 3, 1.0],
            "precision": [1.0, 1.0, 1.0],
            "recall": [1.0, 1 / 3, 1.0],
            "f1": [1.0, 0.5, 1.0],
            "hd95": [0.0, 3.0, 0.0],
            "tp": [90, 1, 0],
            "fp": [0, 0, 0],
            "fn": [0, 2, 0],
            "true_area": [90, 3, 0],
            "source": ["s", "s", "s"],
            "case": ["a", "a", "b"],
        }
    )
    s = ku.summarize_scores(per_image)
    # patient a pools 91 tp and 2 fn: 182/184; patient b has no kidney and none predicted: 1.0
    assert s["n_cases"] == 2 and s["mean_case_dice"] == pytest.approx((182 / 184 + 1.0) / 2)
    assert s["std_case_dice"] == pytest.approx((1.0 - 182 / 184) / 2)
    assert s["pooled_dice"] == pytest.approx(182 / 184)  # 2*91 / (2*91 + 0 + 2)
    assert s["mean_dice"] == pytest.approx(2.5 / 3)
    assert s["mean_dice_with_kidney"] == pytest.approx(0.75)  # the empty slice is left out
    assert s["mean_hd95"] == pytest.approx(1.0) and s["n_with_kidney"] == 2


def test_threshold_sweep_marks_the_best(tmp_path):
    root = make_eval_set(tmp_path, [(32, 32)])
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    data = ku.load_evaluation_set(ku.index_dataset(root).pairs, config)
    probs = [data.masks[0] * 0.7 + 0.1]  # kidney 0.8, background 0.1
    sweep = ks.threshold_sweep(data, probs, thresholds=[0.05, 0.5, 0.9])
    assert sweep["pooled_dice"].round(6).tolist() == [pytest.approx(2 * 64 / (2 * 64 + 1024 - 64)), 1.0, 0.0]
    assert sweep["best"].tolist() == [False, True, False]


# ----- folder prediction -------------------------------------------------------------------------


def test_predict_folder_round_trip_with_mixed_sizes(tmp_path):
    sizes = [(40, 56), (64, 64), (100, 30)]
    root = make_eval_set(tmp_path, sizes)
    (root / "images" / "notes.txt").write_text("not an image")
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    table = ku.predict_folder(identity_like_model(), config, root, tmp_path / "pred")
    assert len(table) == 3
    for (h, w), name in zip(sizes, table["name"]):
        stem = name.rsplit(".", 1)[0]
        mask = cv2.imread(str(tmp_path / "pred" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        truth = cv2.imread(str(root / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert (mask == truth).mean() > 0.95
        overlay = cv2.imread(str(tmp_path / "pred" / "overlays" / f"{stem}.png"))
        assert overlay.shape == (h, w, 3)


def test_predict_folder_refusals(tmp_path):
    root = make_eval_set(tmp_path, [(32, 32)])
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    model = identity_like_model()
    before = sorted(p.name for p in (root / "images").iterdir())
    for target in (root, root / "images", root / "sub"):
        with pytest.raises(ValueError, match="input folder"):
            ku.predict_folder(model, config, root, target)
    assert sorted(p.name for p in (root / "images").iterdir()) == before
    ku.predict_folder(model, config, root, tmp_path / "out")
    with pytest.raises(FileExistsError, match="OVERWRITE=True"):
        ku.predict_folder(model, config, root, tmp_path / "out")
    ku.predict_folder(model, config, root, tmp_path / "out", overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        ku.predict_folder(model, config, tmp_path / "empty", tmp_path / "out2")


def test_predict_folder_refuses_two_images_of_one_name(tmp_path):
    # a.png and a.jpg would both write masks/a.png: the second used to replace the first silently.
    folder = tmp_path / "new"
    folder.mkdir()
    for ext in (".png", ".jpg"):
        assert cv2.imwrite(str(folder / f"a{ext}"), np.full((32, 32), 80, np.uint8))
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"Two files share the name 'a'.*a.jpg and a.png"):
        ku.predict_folder(identity_like_model(), config, folder, tmp_path / "out")
    assert not (tmp_path / "out" / "masks").exists()


def test_predict_folder_skips_and_lists_unreadable_images(tmp_path):
    root = make_eval_set(tmp_path, [(32, 32), (40, 40)])
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    config = ku.Config(image_size=32, base_channels=4, depth=2)
    with pytest.raises(ku.ImageReadError, match="broken.png"):
        ku.predict_folder(identity_like_model(), config, root, tmp_path / "out")
    table = ku.predict_folder(identity_like_model(), config, root, tmp_path / "out2", skip_bad_files=True)
    assert len(table) == 3 and table["problem"].fillna("").astype(bool).sum() == 1
    bad = table[table["name"] == "broken.png"].iloc[0]
    assert "could not be decoded" in bad["problem"]
    assert not (tmp_path / "out2" / "masks" / "broken.png").exists()
    assert len(list((tmp_path / "out2" / "masks").iterdir())) == 2
    assert pd.read_csv(tmp_path / "out2" / "predictions.csv")["name"].tolist() == table["name"].tolist()
    flagged = table.assign(unfamiliar=[False, True, np.nan])
    assert ks.unfamiliar_note(flagged).startswith("1 of 2 images")


# ----- the exact validation split ----------------------------------------------------------------


def test_validation_split_is_reproduced_from_the_checkpoint(tmp_path, phantom_dir):
    config = tiny(num_epochs=1)
    data = ku.prepare_data(config, phantom_dir)
    extra = {"split": data.split_record(), "data_dir": str(phantom_dir)}
    _, result = train_tiny(config, data, tmp_path / "run", extra_state=extra)
    _, loaded_config, checkpoint = ku.load_model(result.files["best_model"])
    pairs = ku.checkpoint_split(checkpoint, loaded_config, "val")
    assert [p.key for p in pairs] == [p.key for p in data.val.pairs]
    other = ku.make_synthetic_dataset(tmp_path / "other", n_cases=2, slices_per_case=2, image_size=32)
    with pytest.raises(ValueError, match="not under"):
        ku.checkpoint_split(checkpoint, loaded_config, "val", data_dir=other)
    with pytest.raises(ValueError, match="records no split"):
        ku.checkpoint_split({}, loaded_config, "val")
    test = ku.checkpoint_split(checkpoint, loaded_config, "test")
    assert [p.key for p in test] == [p.key for p in data.test] and test
    assert not {p.case for p in test} & {p.case for p in pairs}
    assert ku.checkpoint_split({"split": {"train": ["a"], "val": ["b"]}}, loaded_config, "test") == []


def test_preprocessing_is_applied_identically_in_training_evaluation_and_inference(tmp_path, phantom_dir):
    mapping = ks.input_mapping_name("white_balance+clahe")
    config = ku.Config(image_size=32, base_channels=4, depth=2, input_mapping=mapping)
    pairs = ku.index_dataset(phantom_dir).pairs[:4]
    training = ku.load_arrays(pairs, 32, config.input_mapping)
    evaluation = ku.load_evaluation_set(pairs, config)
    np.testing.assert_array_equal(training.images, evaluation.images)
    raw = ku.load_arrays(pairs, 32)
    assert not np.array_equal(raw.images, training.images)  # the option really changes the input

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return torch.zeros_like(x)

    folder = tmp_path / "in"
    folder.mkdir()
    for pair in pairs:
        (folder / pair.image.name).write_bytes(pair.image.read_bytes())
    recorder = Recorder()
    ku.predict_folder(recorder, config, folder, tmp_path / "out")
    fed = (recorder.seen[0][:, 0].numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(fed, training.images)


def test_error_views_by_size_position_and_false_kidney_by_hand():
    """Patient p: slices 10-14, patient q: slices 1-2 (tp, fp, fn chosen by hand)."""
    rows = [  # name, true area, tp, fp, fn
        ("p_010", 0, 0, 30, 0),
        ("p_011", 100, 40, 0, 60),
        ("p_012", 400, 380, 10, 20),
        ("p_013", 900, 880, 20, 20),
        ("p_014", 0, 0, 0, 0),
        ("q_001", 200, 150, 10, 50),
        ("q_002", 0, 0, 50, 0),
    ]
    table = pd.DataFrame(
        [
            dict(
                source="s",
                case=n.split("_")[0],
                name=n,
                height=100,
                width=100,
                true_area=a,
                tp=tp,
                fp=fp,
                fn=fn,
                dice=0.0,
            )
            for n, a, tp, fp, fn in rows
        ]
    )
    views = ks.error_views(table, size_bins=2, position_bins=2)
    small, large = views["by_size"].to_dict("records")
    # the two smaller kidneys (100 and 200 of 10,000 px): tp 190, fp 10, fn 110 -> Dice 380 / 500
    assert small["kidney_percent_of_image"] == "1-2" and small["pooled_dice"] == pytest.approx(0.76)
    assert large["kidney_percent_of_image"] == "4-9" and large["slices"] == 2
    assert (small["median_area_px"], large["median_area_px"]) == (150, 650)
    # positions: p at 0, .25, .5, .75, 1 and q at 0, 1; the first half holds p_010-p_012 and q_001:
    # tp 570, fp 50, fn 130 -> Dice 1140 / 1320
    first, second = views["by_position"].to_dict("records")
    assert (first["slices"], first["with_kidney"], second["slices"]) == (4, 3, 3)
    assert first["pooled_dice"] == pytest.approx(1140 / 1320)
    # false kidney: 30 + 50 of the 120 false-positive pixels lie on the three kidney-free slices
    assert views["false_kidney"] == {
        "kidney_free_slices": 3,
        "with_false_kidney": 2,
        "false_positive_px": 80,
        "share_of_false_positive_px": pytest.approx(80 / 120),
    }
    unnumbered = table.assign(name=["a", "b", "c", "d", "e", "f", "g"])
    assert ks.error_views(unnumbered)["by_position"] is None
