"""Bad input, interruptions and untrusted files: one test (or more) for every row below.

| case | expected behaviour | tests |
|---|---|---|
| DATA_DIR missing, empty, or holding no pairs | error before any work, naming the path and the layout | test_data.py::test_missing_empty_and_pairless_roots |
| orphans | listed by name; training goes on with the pairs, or stops if none | test_data.py::test_pairs_by_stem_across_extensions_and_orphans, ::test_prepare_data_warns_about_orphans_and_subsamples |
| corrupt, truncated, zero-byte, non-image file | error naming the file; SKIP_BAD_FILES=True skips and lists it | test_data.py::test_unreadable_file_is_named, test_skip_bad_files_through_prepare_data |
| 16-bit, RGB, RGBA, palette images; 0/1, 0/255, RGB, JPEG-noisy masks | converted by the documented rules | test_data.py (reading rules), test_loader_properties |
| image and mask of different sizes | error naming both files | test_data.py::test_size_mismatch_names_both_files |
| tiny, huge, non-square images | handled, no crash, no silent crop | test_tiny_huge_and_non_square_images |
| only empty masks, or no empty masks | trains; metrics follow the empty rules; a warning explains | test_only_empty_or_no_empty_masks |
| invalid parameters | ValueError naming the parameter, before any data is read | test_config.py::test_invalid_values_name_the_parameter, test_training.py::test_batch_larger_than_training_set |
| loss becomes NaN or inf | stops naming the epoch; best checkpoint intact | test_training.py::test_nan_loss_stops_with_the_epoch_and_keeps_best |
| CUDA out of memory | message naming batch size and image size | test_training.py::test_out_of_memory_message_names_the_levers |
| SIGKILL mid-epoch and mid-checkpoint-write | last checkpoint loads; RESUME finishes; CSV without gap or duplicate | test_sigkill_mid_epoch_then_resume, test_sigkill_mid_checkpoint_write_then_resume |
| a second run into the same OUTPUT_DIR | refused unless RESUME or OVERWRITE | test_training.py::test_second_run_never_overwrites_silently |
| a yes/no parameter written "false", "no", "0" or "maybe" | read as False, or refused naming the parameter; nothing overwritten | test_user_paths.py::test_string_false_never_overwrites_the_model, ::test_string_false_never_overwrites_a_corrected_prediction |
| RESUME with other settings, MAX_IMAGES or files added to DATA_DIR | refused naming what differs; nothing trained | test_user_paths.py::test_resume_refuses_another_split_or_other_settings |
| OUTPUT_DIR an existing file; TEST_DIR without masks/ | error naming the parameter (and PREDICT_DIR for images alone) | test_user_paths.py::test_output_dir_that_is_a_file_says_so, ::test_test_dir_without_masks_names_test_dir_and_predict_dir |
| PREDICT_DIR with subfolders | every image segmented, the layout kept under predictions/ | test_user_paths.py::test_predict_dir_subfolders_keep_their_layout |
| notebook 04 where the training data are not | says what it skips, still segments PREDICT_DIR | test_user_paths.py::test_04_predicts_a_folder_without_the_training_data |
| a checkpoint carrying pickled code | refused by weights_only loading; the code never runs | test_training.py::test_pickled_code_is_refused_and_never_runs |
| a checkpoint of another architecture or width | error naming the differing setting | test_training.py::test_load_model_names_the_differing_setting |
| predicting into the input folder | refused | test_evaluation.py::test_predict_folder_refusals |
| the same seed twice on a CPU | identical metrics | test_same_seed_twice_gives_identical_metrics |
| leave-one-source-out with one source, an unknown source, a bad variant | error naming SOURCES or VARIANTS and what was found | test_generalization.py::test_fold_errors_name_the_problem, ::test_leave_one_source_out_rejects_bad_variants |
| an interrupted leave-one-source-out run | finished folds are reused, others retrained | test_generalization.py::test_leave_one_source_out_table_and_reuse |
| a checkpoint from before NORMALIZATION existed, or from a release that stored preprocessing and normalisation as settings | loads with the input mapping it was trained with ("minmax", "clahe/histeq"); one the studies trained loads only with `kidneyseg_studies` registered, else the error says what to attach | test_generalization.py::test_checkpoint_records_the_input_mapping_and_old_checkpoints_load |
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import tiny, train_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / f"{name}.png"), image)
    assert cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)


def test_tiny_huge_and_non_square_images(tmp_path):
    sizes = {"a_tiny": (20, 20), "b_huge": (3000, 4000), "c_wide": (60, 200), "d_tall": (300, 90)}
    for name, (h, w) in sizes.items():
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 255  # the middle ninth
        write_pair(tmp_path / "d", name, np.where(mask > 0, 200, 30).astype(np.uint8), mask)
    index = ku.index_dataset(tmp_path / "d")
    cached = ku.load_arrays(index.pairs, 32)
    assert cached.original_sizes == list(sizes.values())
    for mask in cached.masks:  # the whole field of view is kept: the kidney stays in the middle
        rows, cols = np.nonzero(mask)
        assert 8 <= rows.min() <= 12 and 19 <= rows.max() <= 23 and 8 <= cols.min() <= 12
    data = ku.load_evaluation_set(index.pairs, tiny())
    assert [m.shape for m in data.masks] == list(sizes.values())
    model = ku.build_model(tiny()).eval()
    per_image, _, probs = ku.evaluate_model(model, data)
    assert [p.shape for p in probs] == list(sizes.values()) and per_image["hd95"].notna().all()


def _uniform_folder(root: Path, n: int, with_kidney: bool) -> Path:
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        if with_kidney:
            mask[8:20, 10 + i % 5 : 20 + i % 5] = 255
        write_pair(root, f"p{i // 2}_{i}", np.where(mask > 0, 200, 40).astype(np.uint8) + np.uint8(i), mask)
    return root


@pytest.mark.parametrize(
    ("with_kidney", "message"), [(False, "No mask contains kidney"), (True, "Every mask contains kidney")]
)
def test_only_empty_or_no_empty_masks(tmp_path, with_kidney, message):
    root = _uniform_folder(tmp_path / "d", 16, with_kidney)
    with pytest.warns(UserWarning, match=message):
        data = ku.prepare_data(tiny(), root)
    _, result = train_tiny(tiny(), data, tmp_path / "out")
    h = result.history
    assert len(h) == 3 and h.filter(like="_dice").apply(lambda s: s.between(0, 1)).all().all()
    assert not h.isna().any().any()
    if not with_kidney:  # empty rule: precision/recall/Dice are 1 with no prediction, 0 with a false one
        assert set(h["val_recall"]) <= {0.0, 1.0}


def test_skip_bad_files_through_prepare_data(tmp_path):
    root = _uniform_folder(tmp_path / "d", 12, True)
    (root / "images" / "p0_0.png").write_bytes(b"")
    with pytest.raises(ku.ImageReadError, match="p0_0.png"):
        ku.prepare_data(tiny(), root)
    with pytest.warns(UserWarning):
        data = ku.prepare_data(tiny(), root, skip_bad_files=True)
    skipped = data.train.skipped + data.val.skipped
    assert len(skipped) == 1 and "p0_0.png" in skipped[0][0]
    assert len(data.train) + len(data.val) + len(data.test) == 11


@pytest.mark.slow  # two training runs end to end
def test_same_seed_twice_gives_identical_metrics(tmp_path, phantom_dir):
    data = ku.prepare_data(tiny(), phantom_dir)
    _, a = train_tiny(tiny(), data, tmp_path / "a")
    _, b = train_tiny(tiny(), ku.prepare_data(tiny(), phantom_dir), tmp_path / "b")
    columns = [c for c in a.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a.history[columns], b.history[columns])
    _, c = train_tiny(tiny(seed=99), ku.prepare_data(tiny(seed=99), phantom_dir), tmp_path / "c")
    assert not a.history[columns].equals(c.history[columns])


# ----- real SIGKILL of a training process ------------------------------------------------------------


def _start_child(phantom_dir: Path, out: Path, mode: str, config: ku.Config) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "kill_helper.py"),
            str(phantom_dir),
            str(out),
            mode,
            json.dumps(config.to_dict()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if child.poll() is not None:
            raise AssertionError(f"child ended early:\n{child.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def _csv_epochs(out: Path) -> list[int]:
    path = out / ku.METRICS_CSV_NAME
    return pd.read_csv(path)["epoch"].tolist() if path.exists() else []


def _resume_and_check(phantom_dir: Path, out: Path, config: ku.Config, killed_after: int) -> None:
    last = ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)  # loads: never half-written
    assert last["epoch"] == killed_after
    assert _csv_epochs(out) == list(range(1, killed_after + 1))
    _, result = train_tiny(config, ku.prepare_data(config, phantom_dir), out, resume=True)
    assert _csv_epochs(out) == list(range(1, config.num_epochs + 1))  # no gap, no duplicate
    assert result.history["epoch"].tolist() == list(range(1, config.num_epochs + 1))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path, phantom_dir):
    config = tiny(num_epochs=4)
    out = tmp_path / "run"
    child = _start_child(phantom_dir, out, "slow_epoch", config)
    _wait_for(lambda: _csv_epochs(out) == [1, 2], child)
    time.sleep(0.3)  # well inside epoch 3 (each epoch takes about a second here)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    _resume_and_check(phantom_dir, out, config, killed_after=2)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_resume(tmp_path, phantom_dir):
    config = tiny(num_epochs=4)
    out = tmp_path / "run"
    child = _start_child(phantom_dir, out, "slow_save", config)
    _wait_for(lambda: (out / "SAVING").exists(), child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert any(p.name.startswith(f".{ku.LAST_CHECKPOINT_NAME}.tmp") for p in out.iterdir())
    _resume_and_check(phantom_dir, out, config, killed_after=1)
    assert not any(".tmp-" in p.name for p in out.iterdir())  # the stale half-write was removed


# ----- property-based tests --------------------------------------------------------------------------

dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.bool_])
shapes = st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([0, 1, 2, 3, 4]))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), dtype=dtypes, shape=shapes)
def test_loader_properties(data, dtype, shape):
    h, w, c = shape
    full = (h, w) if c == 0 else (h, w, c)
    elements = st.floats(-1e4, 1e4, width=32) if dtype == np.float32 else None
    array = data.draw(arrays(dtype, full, elements=elements))
    gray = ku.to_grayscale_uint8(array)
    assert gray.shape == (h, w) and gray.dtype == np.uint8
    try:
        mask = ku.binarize_mask(array)
    except ValueError as exc:  # only the documented several-labels case may refuse
        assert "several label values" in str(exc) and np.count_nonzero(np.unique(array) > 0) >= 2
    else:
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16]),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**16),
)
def test_png_round_trip_properties(tmp_path_factory, dtype, h, w, c, seed):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    array = rng.integers(0, top, size=(h, w) if c == 1 else (h, w, c), endpoint=True).astype(dtype)
    path = tmp_path_factory.mktemp("png") / "x.png"
    assert cv2.imwrite(str(path), array)
    image = ku.read_image(path)
    assert image.shape == (h, w) and image.dtype == np.uint8
    binary = np.where(array > top // 2, top, 0).astype(dtype)
    assert cv2.imwrite(str(path), binary)
    expected = binary if c == 1 else binary[..., :3].max(axis=2)
    assert np.array_equal(ku.read_mask(path), (expected > 0).astype(np.uint8))


counts = st.integers(0, 10**6)


@settings(max_examples=200)
@given(tp=counts, fp=counts, fn=counts)
def test_metric_properties(tp, fp, fn):
    m = ku.metrics_from_counts(tp, fp, fn)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    swapped = ku.metrics_from_counts(tp, fn, fp)  # prediction and truth exchanged
    assert m["dice"] == pytest.approx(swapped["dice"]) and m["iou"] == pytest.approx(swapped["iou"])
    assert m["precision"] == pytest.approx(swapped["recall"])
    assert m["f1"] == pytest.approx(m["dice"])
    assert m["iou"] <= m["dice"] + 1e-12


@settings(max_examples=60, deadline=None)
@given(mask=arrays(np.bool_, st.tuples(st.integers(1, 16), st.integers(1, 16))))
def test_mask_with_itself_is_perfect(mask):
    c = ku.confusion_counts(mask, mask)
    assert c.metrics() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert ku.hausdorff95(mask, mask) == 0.0
    empty = np.zeros_like(mask)
    against_empty = ku.confusion_counts(mask, empty).metrics()["dice"]
    assert against_empty == (1.0 if not mask.any() else 0.0)
