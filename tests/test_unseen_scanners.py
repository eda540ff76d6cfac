"""Unseen scanners: the batch intensity augmentations (GIN, random curves) and the familiarity check
that flags new images unlike the training images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny, train_tiny

import kidneyseg_studies as ks
import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]


def _batch(n: int = 6, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=gen)


@pytest.mark.parametrize("kind", ["gin", "curves", "strong+gin"])
def test_batch_augmentation_is_seeded_by_seed_epoch_and_step(kind):
    x = _batch()
    augment = ks.BatchIntensityAugmentation(kind, seed=5)
    first = augment(x, epoch=2, step=3)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, ks.BatchIntensityAugmentation(kind, seed=5)(x, epoch=2, step=3))
    assert not torch.equal(first, augment(x, epoch=2, step=4))
    assert not torch.equal(first, augment(x, epoch=3, step=3))
    assert not torch.equal(first, ks.BatchIntensityAugmentation(kind, seed=6)(x, epoch=2, step=3))
    assert not torch.equal(first, x)


def test_random_curves_stay_in_range_and_include_inversions():
    x = _batch(n=64)
    y = ks.random_intensity_curves(x, torch.Generator().manual_seed(1))
    low, high = x.flatten(1).amin(1), x.flatten(1).amax(1)
    assert (y.flatten(1).amin(1) >= low - 1e-6).all() and (y.flatten(1).amax(1) <= high + 1e-6).all()
    # Correlation with the input: +1 for a rising curve, -1 for an inverted one, between otherwise.
    xc, yc = (
        x.flatten(1) - x.flatten(1).mean(1, keepdim=True),
        y.flatten(1) - y.flatten(1).mean(1, keepdim=True),
    )
    corr = (xc * yc).sum(1) / (xc.norm(dim=1) * yc.norm(dim=1))
    assert (corr > 0.9).sum() >= 10 and (corr < -0.9).sum() >= 10


def test_gin_keeps_each_images_mean_and_changes_its_contrast():
    x = _batch(n=16)
    y = ks.gin_augment(x, torch.Generator().manual_seed(2))
    # Rescaled to the image's mean and spread, then blended with it: the mean is kept exactly.
    torch.testing.assert_close(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5, rtol=0)
    changed = (y - x).abs().flatten(1).mean(1)
    assert (changed > 0.01).sum() >= 12  # a random blend weight near 0 leaves a few close to x


def test_intensity_variants_are_study_options_not_config_options():
    for name in ks.INTENSITY_VARIANTS:
        with pytest.raises(ValueError, match="AUGMENTATION"):
            ks.train_transform(name)
        assert ks.BatchIntensityAugmentation(name, 0).augmentation == name
    with pytest.raises(ValueError, match="choose one of"):
        ks.BatchIntensityAugmentation("gin+curves", 0)


@pytest.mark.slow  # three training runs end to end
def test_training_with_gin_through_the_batch_hook_is_reproducible(tmp_path, phantom_data):
    config = tiny(num_epochs=1)

    def train(name: str, transform: ks.BatchIntensityAugmentation | None) -> pd.DataFrame:
        _, result = train_tiny(config, phantom_data, tmp_path / name, batch_transform=transform)
        return result.history.drop(columns=["seconds"])

    first = train("a", ks.BatchIntensityAugmentation("gin", config.seed))
    pd.testing.assert_frame_equal(first, train("b", ks.BatchIntensityAugmentation("gin", config.seed)))
    plain = train("plain", None)
    assert plain["train_loss"].iloc[0] != first["train_loss"].iloc[0]  # the batches really changed


@pytest.fixture(scope="module")
def familiar(shared_data):
    """A reference fitted on 40 slices of every source with more than 43, and three more slices of
    each of those sources that the reference never saw."""
    index = ku.index_dataset(shared_data, "^([^_]+)_")
    rng = np.random.default_rng(0)
    train, held = [], []
    for source in sorted({p.source for p in index.pairs}):
        pairs = [p for p in index.pairs if p.source == source]
        order = rng.permutation(len(pairs))
        train += [pairs[i] for i in order[:40]]
        held += [pairs[i] for i in order[40:43]]
    reference = ks.familiarity_reference(ku.load_arrays(train, 64).images)
    return reference, ku.load_arrays(held, 64).images


def test_slices_of_training_sources_are_familiar(familiar):
    reference, held = familiar
    assert len(held) >= 6
    flags = ks.familiarity(held, reference)
    assert list(flags.columns) == ["novelty", "unfamiliar"] and len(flags) == len(held)
    assert not flags["unfamiliar"].any(), flags["novelty"].round(2).tolist()


def test_inverted_and_rewindowed_slices_are_flagged(familiar):
    reference, held = familiar
    assert ks.familiarity(255 - held, reference)["unfamiliar"].all()
    # Exported with a wide window: every tissue lands in a narrow band of mid greys.
    wide_window = (96 + 0.25 * held).astype(np.uint8)
    assert ks.familiarity(wide_window, reference)["unfamiliar"].all()


def test_familiarity_reference_is_plain_and_checked(familiar):
    reference, held = familiar
    assert set(reference) == {"features", "center", "scale", "reference", "threshold"}
    assert all(isinstance(v, (list, float)) for v in reference.values())  # loads with weights_only
    assert ks.familiarity(held, None) is None
    with pytest.raises(ValueError, match="another kidneyseg version"):
        ks.familiarity(held, {**reference, "features": ["mean"]})
    with pytest.raises(ValueError, match="two training images"):
        ks.familiarity_reference(held[:1])


def test_neighbour_distance_by_hand():
    # Three training images on one feature axis at 0, 3 and 4 (the other features 0).
    reference = np.zeros((3, len(ks.FAMILIARITY_FEATURES)))
    reference[:, 0] = [0, 3, 4]
    # Each to the two others (k = n - 1 = 2): (3 + 4) / 2, (3 + 1) / 2, (4 + 1) / 2.
    own = ks._neighbour_distance(reference, reference, leave_one_out=True)
    np.testing.assert_allclose(own, [3.5, 2.0, 2.5])
    query = np.zeros((1, len(ks.FAMILIARITY_FEATURES)))
    query[0, 0] = 10  # k = min(5, 3) = 3: (10 + 7 + 6) / 3
    np.testing.assert_allclose(ks._neighbour_distance(query, reference), [23 / 3])
    twins = np.zeros((3, len(ks.FAMILIARITY_FEATURES)))  # a duplicate is a neighbour, itself is not
    twins[:, 0] = [1, 1, 5]
    np.testing.assert_allclose(ks._neighbour_distance(twins, twins, leave_one_out=True), [2.0, 2.0, 4.0])


@pytest.mark.slow  # a fresh process, 20,000 rows
def test_familiarity_memory_is_bounded_at_20000_slices():
    """The dense N x M x 13 array took 0.83 GiB at 4,000 slices and about 21 GiB at 20,000."""
    probe = (
        "import resource, numpy as np, kidneyseg_studies as ks, sklearn.neighbors\n"
        "z = np.random.default_rng(0).normal(size=(20000, len(ks.FAMILIARITY_FEATURES)))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "own = ks._neighbour_distance(z, z, leave_one_out=True)\n"
        "novelty = ks._neighbour_distance(z[:5000] + 1.0, z)\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(grown, own.shape, novelty.shape)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    grown_mib, *shapes = proc.stdout.strip().split(maxsplit=1)
    assert float(grown_mib) < 256, proc.stdout  # about 10 MiB measured; the dense array: ~21 GiB
    assert shapes == ["(20000,) (5000,)"]


def test_report_and_note_put_the_flag_beside_the_dice(familiar):
    reference, held = familiar
    images = np.concatenate([held, 255 - held[:2]])
    per_image = pd.DataFrame(
        {
            "name": [f"s{i}.png" for i in range(len(images))],
            "dice": [0.9] * len(held) + [0.1, 0.2],
            "tp": [90] * len(held) + [1, 2],
            "fp": [10] * len(held) + [9, 8],
            "fn": [10] * len(held) + [9, 8],
        }
    )
    table, by_flag = ks.familiarity_report(per_image, images, reference)
    assert table["unfamiliar"].tolist() == [False] * len(held) + [True, True]
    flagged = by_flag.set_index("unfamiliar")
    assert flagged.loc[True, "images"] == 2 and flagged.loc[True, "mean_dice"] == pytest.approx(0.15)
    assert flagged.loc[False, "pooled_dice"] == pytest.approx(0.9)  # 2*90 / (2*90 + 10 + 10)
    note = ks.unfamiliar_note(table)
    assert note.startswith(f"2 of {len(images)} images") and f"s{len(held)}.png" in note
    assert ks.familiarity_report(per_image, images, None) is None
    assert "None of the" in ks.unfamiliar_note(table[~table["unfamiliar"]])


def test_predict_folder_flags_unfamiliar_images(tmp_path, phantom_dir, tiny_config):
    data = ku.prepare_data(tiny_config, phantom_dir)
    reference = ks.familiarity_reference(data.train.images)
    folder = tmp_path / "new"
    (folder / "images").mkdir(parents=True)
    pair = data.val.pairs[0]
    image = ku.read_image(pair.image)
    ku._write_png(folder / "images" / "same.png", image)
    ku._write_png(folder / "images" / "inverted.png", 255 - image)
    table = ku.predict_folder(
        ku.build_model(tiny_config),
        tiny_config,
        folder,
        tmp_path / "out",
        annotate=lambda inputs: ks.familiarity(inputs, reference),
    )
    assert table.set_index("name")["unfamiliar"].to_dict() == {"inverted.png": True, "same.png": False}
    assert "1 of 2 images" in ks.unfamiliar_note(table)
    plain = ku.predict_folder(ku.build_model(tiny_config), tiny_config, folder, tmp_path / "out2")
    assert "novelty" not in plain


def test_picture_of_a_dozen_draws(shared_data):
    index = ku.index_dataset(shared_data / "kits19-ct", None)
    image = ku.load_arrays(index.pairs[:1], 64).images[0]
    fig = ks.plot_intensity_draws(image, "gin", n=12, seed=1)
    shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(shown) == 12
    assert np.allclose(shown[0], image / 255.0)
    assert all(not np.allclose(shown[0], s) for s in shown[1:])
