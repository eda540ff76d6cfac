"""Inventory and mask statistics (notebook 01) on constructed folders and the real slices."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import kidneyseg_studies as ks


@pytest.fixture()
def messy(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    base = np.full((40, 40), 60, np.uint8)
    kidney = np.zeros((40, 40), np.uint8)
    kidney[10:20, 5:15] = 255
    kidney[10:20, 25:35] = 255  # two components
    cv2.imwrite(str(root / "images" / "p1_a.png"), base)
    cv2.imwrite(str(root / "masks" / "p1_a.png"), kidney)
    cv2.imwrite(str(root / "images" / "p1_b.png"), base)  # same pixels as p1_a
    cv2.imwrite(str(root / "masks" / "p1_b.png"), (kidney > 0).astype(np.uint8))  # a 0/1 mask
    cv2.imwrite(str(root / "images" / "p2_c.png"), base + 1)
    cv2.imwrite(str(root / "masks" / "p2_c.png"), np.zeros((40, 40), np.uint8))  # empty
    (root / "images" / "p2_d.png").write_bytes(b"garbage")  # corrupt
    cv2.imwrite(str(root / "masks" / "p2_d.png"), kidney)
    cv2.imwrite(str(root / "images" / "p3_e.png"), base)  # orphan image
    cv2.imwrite(str(root / "masks" / "p4_f.png"), kidney)  # orphan mask
    return root


def test_inventory_flags_each_problem(messy):
    table = ks.inventory(messy, "^([^_]+)_").set_index("name")
    assert table.loc["p1_a", "status"] == "ok" and table.loc["p1_a", "components"] == 2
    assert table.loc["p1_a", "mask_values"] == "0/255" and table.loc["p1_b", "mask_values"] == "0/1"
    assert table.loc["p1_a", "kidney_fraction"] == pytest.approx(200 / 1600)
    assert table.loc["p1_b", "duplicate_of"] == "d/p1_a"
    assert table.loc["p2_c", "kidney_fraction"] == 0 and table.loc["p2_c", "components"] == 0
    assert table.loc["p2_d", "status"] == "unreadable" and "p2_d.png" in table.loc["p2_d", "problem"]
    assert table.loc["p3_e", "status"] == "orphan_image" and table.loc["p4_f", "status"] == "orphan_mask"
    summary = ks.inventory_summary(table.reset_index()).iloc[0]
    assert (summary["pairs"], summary["orphans"], summary["problems"], summary["duplicates"]) == (3, 2, 1, 1)
    assert summary["cases"] == 2


def test_warnings_and_report(messy, tmp_path):
    table = ks.inventory(messy)
    found = ks.dataset_warnings(table, group_regex=None)
    text = "\n".join(found)
    assert "unreadable" in text and "orphan_image" in text and "repeat the pixels" in text
    assert "GROUP_REGEX" in text and "Only 3 pairs" in text
    files = ks.write_inventory(table, tmp_path / "out", found)
    report = json.loads(files["report_json"].read_text())
    assert report["warnings"] == found and len(report["problems"]) == 3
    assert len(files["inventory_csv"].read_text().splitlines()) == len(table) + 1


def test_mask_heatmap_locates_kidneys(messy):
    table = ks.inventory(messy)
    heat = ks.mask_heatmap(table, size=8)
    assert heat.shape == (8, 8) and heat.max() <= 1.0
    assert heat[3, 2] == pytest.approx(2 / 3)  # kidney in two of the three readable masks
    assert heat[7, 7] == 0.0


def test_intensity_histograms_and_pairs_of_inventory_rows(messy):
    table = ks.inventory(messy)
    hist = ks.intensity_histograms(table, per_source=12, seed=0)
    # one source; the readable images are 60, 60 and 61 everywhere
    assert list(hist.columns) == ["d"] and len(hist) == 256
    assert hist.loc[60, "d"] == pytest.approx(2 / 3) and hist.loc[61, "d"] == pytest.approx(1 / 3)
    assert hist["d"].sum() == pytest.approx(1.0)
    row = table[table["name"] == "p1_b"].iloc[0]
    image, mask = ks.read_inventory_pair(row)
    assert image.shape == mask.shape == (40, 40) and int(mask.sum()) == 200 and mask.max() == 1


@pytest.mark.slow  # reads every real slice
def test_inventory_of_the_real_slices(shared_data, manifest):
    table = ks.inventory(shared_data, "^([^_]+)_")
    assert (table["status"] == "ok").sum() == len(manifest)
    summary = ks.inventory_summary(table).set_index("source")
    assert summary.loc["kidneycyst-ct", "sizes"] > 1 and summary.loc["kits19-ct", "with_kidney"] == "100%"
    warnings = ks.dataset_warnings(table, "^([^_]+)_")
    assert any("different image sizes" in w for w in warnings)
