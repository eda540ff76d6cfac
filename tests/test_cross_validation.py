"""Cross-validation by patient (FOLD, FOLDS) and the fold ensemble: folds, out-of-fold scores, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kidneyseg_studies as ks
import kidneyseg_utils as ku


def _pairs(sources: dict[str, dict[str, int]]) -> list[ku.SamplePair]:
    """Pairs of ``{source: {patient: slices}}``, named ``patient_NNN``."""
    return [
        ku.SamplePair(Path(f"{s}/{c}_{i:03d}.png"), Path(f"m/{c}_{i:03d}.png"), s, f"{c}_{i:03d}", c)
        for s, cases in sources.items()
        for c, n in cases.items()
        for i in range(n)
    ]


SOURCES = {
    "ct": {f"ct{i}": 3 for i in range(10)},  # 10 patients of 3 slices
    "mri": {f"mr{i}": 2 for i in range(5)},  # 5 patients of 2 slices
    "us": {"u1": 1, "u2": 4},  # 2 patients: fewer than the folds
}


def test_folds_are_patient_disjoint_complete_and_balanced_by_source():
    pairs = _pairs(SOURCES)
    folds = ku.cross_validation_folds(pairs, folds=5, seed=0)
    assert sorted(p.key for f in folds for p in f) == sorted(p.key for p in pairs)
    groups = [{p.group for p in f} for f in folds]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    for fold in folds:  # 10 CT patients of 3 slices: two each; 5 MRI patients: one each
        assert sum(p.source == "ct" for p in fold) == 6 and sum(p.source == "mri" for p in fold) == 2
    assert sum(any(p.source == "us" for p in f) for f in folds) == 2  # as far as the patients allow
    assert [[p.key for p in f] for f in ku.cross_validation_folds(pairs, 5, seed=0)] == [
        [p.key for p in f] for f in folds
    ]
    assert [[p.key for p in f] for f in ku.cross_validation_folds(pairs, 5, seed=1)] != [
        [p.key for p in f] for f in folds
    ]
    with pytest.raises(ValueError, match="FOLDS=20 needs at least 20 patients"):
        ku.cross_validation_folds(pairs, folds=20)


def test_fold_split_keeps_the_test_split_and_validates_one_fold():
    pairs = _pairs(SOURCES)
    _, _, test = ku.split_train_val_test(pairs, 0.2, 0.15, seed=4)
    rest = [p for p in pairs if p not in test]
    folds = ku.cross_validation_folds(rest, 5, seed=4)
    for k in range(5):
        train, val, test_k = ku.split_train_val_test(pairs, 0.2, 0.15, seed=4, folds=5, fold=k)
        assert test_k == test and val == folds[k]
        assert {p.key for p in train} == {p.key for p in rest} - {p.key for p in val}
    with pytest.raises(ValueError, match=r"FOLD \(Config.fold\) must be None or an integer from 0 to 4"):
        ku.Config(fold=5)
    with pytest.raises(ValueError, match="FOLDS"):
        ku.Config(folds=1)


@pytest.fixture(scope="module")
def fold_runs(tmp_path_factory, phantom_dir):
    """Two tiny folds of one cross-validation, trained as notebook 03 trains them."""
    out = tmp_path_factory.mktemp("cv")
    base = ku.Config(
        image_size=32, base_channels=4, depth=2, batch_size=4, num_epochs=1, folds=2, test_fraction=0.2
    )
    base = base.with_parameters(GROUP_REGEX="^([^_]+)_", SEED=5)
    for fold in (0, 1):
        config = base.with_parameters(FOLD=fold)
        data = ku.prepare_data(config, phantom_dir)
        torch.manual_seed(fold)
        ku.train_model(
            ku.build_model(config),
            data.train_dataset,
            data.val_dataset,
            config,
            ku.run_output_dir(out, config),
            torch.device("cpu"),
            extra_state={"split": data.split_record(), "data_dir": str(phantom_dir)},
            progress=False,
            log=False,
        )
    return out


def test_fold_runs_are_found_and_ensembled(fold_runs, phantom_dir):
    paths = ku.resolve_model_paths("auto", fold_runs)
    assert paths == [fold_runs / "fold_0" / ku.BEST_MODEL_NAME, fold_runs / "fold_1" / ku.BEST_MODEL_NAME]
    assert ku.resolve_model_paths(str(fold_runs), "/nowhere") == paths
    models, config, checkpoints = ku.load_models(paths[::-1])  # folds come back in order
    assert [c["config"]["fold"] for c in checkpoints] == [0, 1] and config.fold == 0
    assert checkpoints[0]["split"]["test"] == checkpoints[1]["split"]["test"]
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    single = [ku.predict_probabilities(m, images) for m in models]
    ensemble = ku.predict_probabilities(ku.FoldEnsemble(models), images)
    np.testing.assert_allclose(ensemble, (single[0] + single[1]) / 2, atol=1e-5)


def test_out_of_fold_scores_every_other_patient_once(fold_runs, tmp_path):
    models, config, checkpoints = ku.load_models(ku.resolve_model_paths("auto", fold_runs))
    oof = ku.evaluate_validation(models, checkpoints, config, output_dir=tmp_path)
    split = checkpoints[0]["split"]
    outside_test = set(split["train"]) | set(split["val"])
    scored = list(oof.scores["source"] + "/" + oof.scores["name"])
    assert sorted(scored) == sorted(outside_test) and len(scored) == len(set(scored))
    for fold, checkpoint in zip((0, 1), checkpoints):  # each scored by the model that did not train on it
        mine = oof.scores[oof.scores["fold"] == fold]
        mine = set(mine["source"] + "/" + mine["name"])
        assert mine == set(checkpoint["split"]["val"]) and not mine & set(checkpoint["split"]["train"])
    summary = oof.summary
    assert (summary["folds"], summary["folds_planned"], summary["models"]) == (2, 2, 1)
    assert summary["evaluated_on"] == ku.SPLIT_LABELS["oof"]
    assert oof.title == "out-of-fold validation (optimistic)"
    assert (tmp_path / "evaluation_out_of_fold" / "evaluation_summary.json").is_file()
    test = ku.evaluate_split(ku.FoldEnsemble(models), checkpoints[0], config, "test", tmp_path)
    assert test.summary["models"] == 2
    table = ks.fold_comparison(models, test.data, fold_ids=[0, 1])
    assert table["model"].tolist() == ["fold 0", "fold 1", "mean single fold", "ensemble"]
    assert table.loc[2, "pooled_dice"] == pytest.approx(table.loc[:1, "pooled_dice"].mean())
    assert table.loc[3, "pooled_dice"] == pytest.approx(test.summary["pooled_dice"])
    options = ks.inference_options_table(models, oof)
    assert len(options) == 4 and options.loc[0, "pooled_dice"] == pytest.approx(summary["pooled_dice"])


def test_mismatched_folds_are_refused(fold_runs, tmp_path, phantom_dir):
    paths = ku.resolve_model_paths("auto", fold_runs)
    with pytest.raises(ValueError, match=r"FOLD values are \[0, 0\]"):
        ku.load_models([paths[0], paths[0]])
    other = ku.load_checkpoint(paths[1])
    other["config"]["base_channels"] = 8
    wider = ku.build_model(ku.Config.from_dict(other["config"]))
    other["model_state"] = dict(wider.state_dict())
    ku.save_checkpoint(other, tmp_path / "wider.pth")
    with pytest.raises(ValueError, match=r"FOLD=1 .*wider.pth.*BASE_CHANNELS: 4 vs 8"):
        ku.load_models([paths[0], tmp_path / "wider.pth"])
    moved = ku.load_checkpoint(paths[1])
    moved["split"]["test"] = moved["split"]["test"][1:]
    ku.save_checkpoint(moved, tmp_path / "moved.pth")
    with pytest.raises(ValueError, match="the held-out test split"):
        ku.load_models([paths[0], tmp_path / "moved.pth"])
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        ku.resolve_model_paths(str(tmp_path / "empty-dir"), tmp_path)


def test_kidney_size_sampler_favours_small_kidneys_and_is_seeded_by_epoch():
    """Eight slices: two kidney-free, six with kidney areas 1..6 px. The quarter quantile of the
    areas is 2.25, so the slices of 1 and 2 px weigh 3 and the other six 1: out of 12 weight units,
    6 are small kidneys, so half the draws are expected to be those two slices."""
    masks = np.zeros((8, 4, 4), np.uint8)
    for i, area in enumerate(range(1, 7), start=2):
        masks[i].flat[:area] = 1
    sampler = ks.KidneySizeSampler(masks, seed=5)
    assert sampler.weights.tolist() == [1, 1, 3, 3, 1, 1, 1, 1]
    sampler.set_epoch(3)
    first = list(sampler)
    assert len(first) == len(sampler) == 8 and all(24 <= i < 32 for i in first)  # epoch * n + i
    assert list(sampler) == first  # drawn from (seed, epoch) alone: a resume repeats it
    sampler.set_epoch(4)
    assert list(sampler) != first
    draws = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        draws += [i % 8 for i in sampler]
    share = np.isin(draws, [2, 3]).mean()
    assert share == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="small_weight"):
        ks.KidneySizeSampler(masks, seed=0, small_weight=0)
