"""The benchmark scripts run with tiny settings and produce well-formed tables (figures are not
asserted: performance claims live in the benchmarks' output, not in unit tests)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_speed_tables(tmp_path, shared_data):
    out = run_script(
        "bench_speed.py",
        "--quick",
        "--data",
        str(shared_data),
        "--images",
        "16",
        "--epochs",
        "1",
        "--steps",
        "1",
        "--batch",
        "2",
        "--out",
        str(tmp_path),
    )
    assert "## Data pipeline" in out and "## Training step" in out and "## Inference" in out
    pipeline = pd.read_csv(tmp_path / "speed_data_pipeline.csv")
    assert set(pipeline["workers"]) == {0, 2} and (pipeline["images_per_s"] > 0).all()
    assert {"cached (ours)", "naive: decode every step"} == set(pipeline["dataset"])
    training = pd.read_csv(tmp_path / "speed_training_step.csv")
    ours = training[training["model"].str.startswith("ours")]
    assert len(ours) >= 2 and (ours["images_per_s"] > 0).all()
    assert set(training["model"]) >= {"smp Unet resnet34", "MONAI BasicUNet"}  # measured or "not installed"
    inference = pd.read_csv(tmp_path / "speed_inference.csv")
    assert sorted(zip(inference["batch"], inference["tta"])) == [
        (1, False),
        (1, True),
        (16, False),
        (16, True),
    ]
    assert (inference["ms_per_slice"] > 0).all()


def test_quality_tables(tmp_path, shared_data):
    out = run_script(
        "bench_quality.py",
        "--quick",
        "--data",
        str(shared_data),
        "--out",
        str(tmp_path / "runs"),
        "--seeds",
        "1",
        "2",
    )
    assert "Pooled test Dice per source" in out
    runs = pd.read_csv(tmp_path / "quality_runs.csv")
    models = ["ours", "smp-unet-resnet34", "monai-basicunet"]
    assert len(runs) == 2 * 2 * 3  # protocols x seeds x models
    ours = runs[(runs["model"] == "ours")]
    assert (ours["status"] == "ok").all() and ours["pooled_dice"].between(0, 1).all()
    assert sorted(ours["seed"]) == [1, 1, 2, 2] and (ours["epochs"] == 1).all()
    summary = pd.read_csv(tmp_path / "quality_summary.csv")
    assert set(summary["protocol"]) == {"time", "epochs"} and set(summary["model"]) <= set(models)
    row = summary.set_index(["protocol", "model"]).loc[("epochs", "ours")]
    assert row["seeds"] == 2 and row["ours_minus_this_mean"] == 0
    assert row["pooled_dice_mean"] == pytest.approx(ours[ours["protocol"] == "epochs"]["pooled_dice"].mean())
    per_source = pd.read_csv(tmp_path / "quality_per_source.csv")
    assert "ours" in per_source.columns and per_source["ours"].between(0, 1).all()


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    printed = run_script("gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out))
    report = json.loads(out.read_text())
    assert [row["setting"] for row in report["training"]] == ["defaults, one GPU", "fp32, one GPU"]
    assert all(row["images_per_second"] > 0 for row in report["training"])
    assert report["environment"]["workers_by_default"] == 0  # a CPU: no workers by default
    killed = report["kill_and_resume"]
    assert killed["continuous"] and killed["epochs_after_resume"][-1] == killed["killed_after_epoch"] + 1
    moved = report["cpu_checkpoint"]
    assert moved["saved_scaler_state"] == "empty" and moved["saved_cuda_generators"] == 0
    assert moved["epochs_after_resume"] == [1, 2]
    assert [row["tta"] for row in report["evaluation"]] == [False, True]
    assert report["not_checked"] == ["everything on a GPU: this run used the CPU"]
    assert set(report["step_seconds"]) == {
        "environment",
        "training",
        "kill_and_resume",
        "cpu_checkpoint",
        "evaluation",
    }
    assert "kill_and_resume" in printed and str(out) in printed


def test_gpu_check_keeps_the_earlier_figures_when_a_step_fails(tmp_path, monkeypatch):
    """A step that fails (say, out of memory on a small card) is recorded with its error; the figures
    measured before it are already on disk, and the steps after it still run."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    written = []
    real_step = gpu_check.step

    def spying_step(report, out, name, work):
        value = real_step(report, out, name, work)
        written.append((name, json.loads(out.read_text())))
        return value

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(gpu_check, "step", spying_step)
    monkeypatch.setattr(gpu_check, "kill_and_resume", out_of_memory)
    out = tmp_path / "gpu_check.json"
    report = gpu_check.run_checks(torch.device("cpu"), True, None, out)
    assert [name for name, _ in written] == [
        "environment",
        "training",
        "kill_and_resume",
        "cpu_checkpoint",
        "evaluation",
    ]
    on_disk = dict(written)["kill_and_resume"]  # the file as the failing step left it
    assert on_disk["training"][0]["images_per_second"] > 0
    assert on_disk["kill_and_resume"]["failed"].startswith("OutOfMemoryError: CUDA out of memory")
    assert report["evaluation"][0]["images"] > 0  # evaluated the training step's model instead
    assert json.loads(out.read_text())["cpu_checkpoint"]["epochs_after_resume"] == [1, 2]


def test_reproduce_results_writes_every_file_readme_quotes(tmp_path, shared_data):
    out = tmp_path / "results"
    run_script(
        "reproduce_results.py",
        "--quick",
        "--data",
        str(shared_data),
        "--out",
        str(out),
        "--run-dir",
        str(tmp_path / "run"),
    )
    names = {p.name for p in out.iterdir()}
    for part in ("test", "val"):
        assert {f"evaluation_{part}.json", f"evaluation_{part}_tta.json"} <= names
        assert {f"evaluation_{part}_per_image.csv", f"evaluation_{part}_per_patient.csv"} <= names
    assert {"training_metrics.csv", "normalization_spread.csv", "run.json"} <= names
    run = json.loads((out / "run.json").read_text())
    test = json.loads((out / "evaluation_test.json").read_text())
    assert run["epochs"] == 1 and run["images"]["test"] == test["n_images"] > 0
    assert test["evaluated_on"] == ku.SPLIT_LABELS["test"] and 0 <= test["mean_case_dice"] <= 1
    per_patient = pd.read_csv(out / "evaluation_test_per_patient.csv")
    assert len(per_patient) == test["n_cases"] == run["patients"]["test"]


def test_unseen_scanner_tables_and_the_familiarity_of_their_folds(tmp_path, shared_data):
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["--data", str(shared_data), "--runs", str(runs), "--out", str(out)]
    printed = run_script("bench_unseen.py", "--quick", *common)
    assert "baseline 'standard'" in printed
    table = pd.read_csv(out / "unseen_runs.csv")
    # --quick: two seeds, two held-out CT sources, two variants; folds paired by seed.
    assert len(table) == 8 and set(table["seed"]) == {1, 2} and set(table["variant"]) == {"standard", "gin"}
    summary = pd.read_csv(out / "unseen_summary.csv").set_index("variant")
    assert summary.loc["standard", "minus_baseline_mean"] == 0 and summary.loc["gin", "seeds"] == 2
    per_seed = table[table["variant"] == "gin"].groupby("seed")["pooled_dice"].mean()
    base = table[table["variant"] == "standard"].groupby("seed")["pooled_dice"].mean()
    assert summary.loc["gin", "minus_baseline_mean"] == pytest.approx((per_seed - base).mean())
    assert summary.loc["gin", "folds"] == 4 and summary.loc["gin", "epochs_run_mean"] == 1
    markdown = (out / "unseen_tables.md").read_text()
    assert "| CT (2 sources) | `gin` | 2 |" in markdown and "of 1 |" in markdown
    assert f"{summary.loc['gin', 'pooled_dice_mean']:.3f} ± " in markdown
    run_script("bench_unseen.py", "--quick", *common)
    assert pd.read_csv(out / "unseen_runs.csv")["reused"].all()  # finished folds are not retrained
    run_script("bench_familiarity.py", "--runs", str(runs), "--data", str(shared_data), "--out", str(out))
    folds = pd.read_csv(out / "familiarity_folds.csv")
    assert len(folds) == 2 and folds["test_flagged_share"].between(0, 1).all()
    assert (folds["val_inverted_flagged_share"] == 1).all()


def test_memory_format_table(tmp_path):
    run_script("bench_memory_format.py", "--quick", "--out", str(tmp_path))
    table = pd.read_csv(tmp_path / "speed_memory_format.csv").set_index("model")
    assert table.loc["ours", "status"] == "ok" and table.loc["ours", "speed_up"] > 0
    assert set(table.index) == {"ours", "monai-basicunet", "smp-unet-resnet34"}  # measured or "not installed"


def test_cross_validation_benchmark_writes_its_summary_and_keeps_finished_folds(tmp_path, shared_data):
    args = [
        "--quick",
        "--data",
        str(shared_data),
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "cv"),
    ]
    run_script("bench_cross_validation.py", *args)
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    for key in (
        "oof_pooled_dice",
        "oof_pooled_iou",
        "oof_mean_case_dice",
        "test_ensemble_pooled_dice",
        "test_ensemble_pooled_iou",
        "test_single_fold_pooled_dice",
        "epochs",
        "minutes",
        "image_size",
        "base_channels",
        "precision",
    ):
        assert key in summary, key
    assert summary["folds"] == 2 and len(summary["epochs"]) == 2 and summary["image_size"] == 32
    oof = pd.read_csv(tmp_path / "cv" / "oof_per_image.csv")
    test = pd.read_csv(tmp_path / "cv" / "test_per_image.csv")
    assert len(oof) == summary["n_oof_images"] and not set(oof["name"]) & set(test["name"])
    kept = tmp_path / "cv" / "fold_0_model.pth"
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "runs")  # a later session on another machine: only git's files remain
    run_script("bench_cross_validation.py", *args)  # finished folds are kept, not trained again
    assert kept.stat().st_mtime_ns == stamp and not (tmp_path / "runs").exists()
    (tmp_path / "cv" / "fold_1.json").unlink()  # as if fold 1 were still training
    run_script("bench_cross_validation.py", *args, "--score-finished")
    partial = json.loads((tmp_path / "cv" / "partial" / "partial_summary.json").read_text())
    assert partial["folds"] == 1 and partial["n_test_images"] == summary["n_test_images"]
    run_script("bench_cross_validation.py", *args, "--error-views")
    views = pd.read_csv(tmp_path / "cv" / "error_views_oof.csv")
    assert {"kidney size", "false kidney"} <= set(views["view"]) and views["slices"].notna().any()
    assert pd.read_csv(tmp_path / "cv" / "test_folds.csv")["model"].tolist()[-2:] == [
        "mean single fold",
        "ensemble",
    ]


def test_cross_validation_variant_records_its_change(tmp_path, shared_data):
    out = tmp_path / "alpha"
    common = ["--quick", "--data", str(shared_data), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    run_script("bench_cross_validation.py", *common, "--only", "0", "--set", "FOCAL_ALPHA=0.75")
    assert json.loads((out / "fold_0.json").read_text())["changes"] == {"FOCAL_ALPHA": 0.75}
    checkpoint = ku.load_checkpoint(out / "fold_0_model.pth")
    assert checkpoint["config"]["focal_alpha"] == 0.75
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_cross_validation.py"), *common, "--set", "ALPHA=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Unknown parameters ['ALPHA']" in proc.stderr
    # The sampling candidate reaches training through train_model's sampler hook and is recorded.
    sampled = ["--quick", "--data", str(shared_data), "--runs", str(tmp_path / "runs_small")]
    sampled += ["--out", str(tmp_path / "small"), "--only", "1", "--small-kidney-weight", "3", "--poly"]
    run_script("bench_cross_validation.py", *sampled)
    changes = json.loads((tmp_path / "small" / "fold_1.json").read_text())["changes"]
    assert changes == {
        "sampler": "KidneySizeSampler(small_weight=3)",
        "lr_schedule": "PolySchedule over 2 epochs",
    }
    lr = pd.read_csv(tmp_path / "small" / "fold_1_training_metrics.csv")["lr"].tolist()
    assert lr == pytest.approx([1e-3, 1e-3 * 0.5**0.9])  # annealed, not halved on a plateau
    # Paired with a baseline on the same fold: a baseline 0.1 lower on the test split gains 0.1.
    run_script("bench_cross_validation.py", *common, "--score-finished")
    baseline = tmp_path / "baseline"
    shutil.copytree(out, baseline)
    folds = pd.read_csv(baseline / "partial" / "test_folds.csv")
    folds.loc[folds["model"] == "fold 0", "pooled_dice"] -= 0.1
    folds.to_csv(baseline / "partial" / "test_folds.csv", index=False)
    run_script("bench_cross_validation.py", *common, "--compare", str(baseline))
    paired = json.loads((out / "paired_summary.json").read_text())
    assert paired["folds"] == [0] and paired["changes"] == {"FOCAL_ALPHA": 0.75}
    assert (
        paired["test_pooled_dice_gain_mean"] == pytest.approx(0.1)
        and paired["oof_pooled_dice_gain_mean"] == 0
    )
    assert len(pd.read_csv(out / "paired_folds.csv")) == 1
    patients = pd.read_csv(out / "paired_patients.csv")  # fold 0's validation patients, side by side
    oof = pd.read_csv(out / "partial" / "oof_per_image.csv")
    assert len(patients) == paired["oof_patients"] == (oof["source"] + "/" + oof["case"]).nunique()
    assert (patients["dice_gain"] == 0).all() and paired["oof_patients_improved"] == 0
    assert "test_ensemble_pooled_dice_gain" not in paired  # not every fold of both yet
    for folder, dice in ((baseline, 0.80), (out, 0.85)):  # as if every fold were scored
        figures = {"test_ensemble_pooled_dice": dice, "test_ensemble_pooled_iou": dice - 0.1}
        figures.update(oof_pooled_dice=0.7, oof_pooled_iou=0.6)
        (folder / "cv_summary.json").write_text(json.dumps(figures))
    run_script("bench_cross_validation.py", *common, "--compare", str(baseline))
    paired = json.loads((out / "paired_summary.json").read_text())
    assert paired["test_ensemble_pooled_dice_baseline"] == 0.80
    assert paired["test_ensemble_pooled_dice_gain"] == pytest.approx(0.05)
    assert paired["test_ensemble_pooled_iou_gain"] == pytest.approx(0.05)
    assert paired["oof_pooled_iou_gain"] == 0
    # A second baseline writes its own pair of files and leaves the first pair as it was.
    run_script(
        "bench_cross_validation.py", *common, "--compare", str(out), "--paired-name", "paired_with_self"
    )
    itself = json.loads((out / "paired_with_self_summary.json").read_text())
    assert itself["test_pooled_dice_gain_mean"] == 0 and itself["test_ensemble_pooled_dice_gain"] == 0
    assert len(pd.read_csv(out / "paired_with_self_folds.csv")) == 1
    assert json.loads((out / "paired_summary.json").read_text()) == paired
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_cross_validation.py"), *common]
        + ["--compare", str(baseline), "--paired-name", "../elsewhere"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--paired-name '../elsewhere'" in proc.stderr


def test_bf16_benchmark_tables(tmp_path, shared_data):
    run_script("bench_bf16.py", "--quick", "--data", str(shared_data), "--out", str(tmp_path))
    speed = pd.read_csv(tmp_path / "speed.csv")
    assert speed["precision"].tolist() == ["fp32", "bf16"] and (speed["train_images_per_s"] > 0).all()
    runs = pd.read_csv(tmp_path / "quality_runs.csv")
    assert sorted(runs["precision"]) == ["bf16", "bf16", "fp32", "fp32"] and runs["seed"].nunique() == 2
    expected = "bf16" if ku.cpu_has_native_bf16() else "fp32"  # AMP=True falls back to fp32 without it
    assert set(runs.loc[runs["precision"] == "bf16", "ran_in"]) == {expected}
    summary = pd.read_csv(tmp_path / "quality_summary.csv")
    assert summary.loc[summary["precision"] == "fp32", "minus_fp32_pooled_dice_mean"].item() == 0
    curves = pd.read_csv(tmp_path / "curves_summary.csv")
    assert curves["epoch"].tolist() == [1] and "val_dice_gap_in_fp32_sd" in curves
