"""bf16 autocast on a CPU against fp32: training-step speed side by side, and quality over seeds.

Two parts, both written under ``--out``:

- ``speed.csv``: images per second of a training step (forward, focal + Dice loss in float32,
  backward, AdamW) and milliseconds per slice of inference, fp32 and bf16 autocast measured
  alternately in one process, in the model's channels-last layout as ``train_model`` runs it.
- ``quality_runs.csv`` and ``quality_summary.csv``: for each seed, one run with ``AMP="cuda"``
  (fp32 on a CPU) and one with ``AMP=True`` (bf16 on a CPU with native bf16), the same epochs with
  no early stopping, scored on the held-out test split (pooled Dice, IoU, mean Dice per patient)
  with the best checkpoint by validation loss; the summary gives mean and standard deviation over
  seeds and the paired bf16 - fp32 difference. ``curves.csv`` holds every epoch of every run, and
  ``curves_summary.csv`` per epoch the mean and SD over seeds of each precision's training and
  validation loss and validation Dice, with the gap between the two means in units of fp32's SD.

Resumable: a finished (seed, precision) run keeps its ``result.json`` and is not trained again.

    python benchmarks/bench_bf16.py --help
    python benchmarks/bench_bf16.py --threads 1 --image-size 128 --epochs 10   # docs/precision.md
    python benchmarks/bench_bf16.py --quick                                      # tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_utils as ku  # noqa: E402

PRECISIONS = {"fp32": "cuda", "bf16": True}  # name -> Config.amp (on a CPU)


def step_speed(size: int, width: int, batch: int, steps: int, repeats: int) -> list[dict]:
    """Training images per second and inference ms per slice, fp32 and bf16 alternately."""
    torch.manual_seed(0)
    config = ku.Config(image_size=size, base_channels=width)
    model = ku.build_model(config).train()
    loss_fn = ku.FocalDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()
    images = np.random.default_rng(0).integers(0, 255, (batch, size, size), dtype=np.uint8)

    def train_steps(dtype: torch.dtype | None, n: int) -> float:
        tic = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - tic

    def infer(dtype: torch.dtype | None) -> float:
        tic = time.perf_counter()
        ku.predict_probabilities(model, images, "cpu", batch_size=batch, amp=dtype)
        model.train()
        return time.perf_counter() - tic

    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for dtype in dtypes.values():  # warm-up
        train_steps(dtype, 1)
        infer(dtype)
    seconds = {name: [0.0, 0.0] for name in dtypes}
    for _ in range(repeats):
        for name, dtype in dtypes.items():
            seconds[name][0] += train_steps(dtype, steps)
            seconds[name][1] += infer(dtype)
    rows = []
    for name in dtypes:
        train_s, infer_s = seconds[name]
        rows.append(
            {
                "size": size,
                "width": width,
                "batch": batch,
                "precision": name,
                "train_images_per_s": batch * steps * repeats / train_s,
                "inference_ms_per_slice": 1000 * infer_s / (batch * repeats),
            }
        )
    for key in ("train_images_per_s",):
        rows[1][f"{key}_vs_fp32"] = rows[1][key] / rows[0][key]
    rows[1]["inference_speedup_vs_fp32"] = (
        rows[0]["inference_ms_per_slice"] / rows[1]["inference_ms_per_slice"]
    )
    return rows


def quality_run(
    name: str, config: ku.Config, data: ku.PreparedData, test: ku.EvaluationSet, out: Path
) -> dict:
    """Train one (seed, precision) run, or read its finished result; score the best model on test."""
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.manual_seed(config.seed)
    model = ku.build_model(config)
    train_ds, val_ds = ku.make_datasets(data.train, data.val, config)
    tic = time.monotonic()
    result = ku.train_model(
        model, train_ds, val_ds, config, out, torch.device("cpu"),
        overwrite=True, progress=False, log=False,
    )  # fmt: skip
    minutes = (time.monotonic() - tic) / 60
    best, _, _ = ku.load_model(result.files["best_model"])
    eval_set = ku.EvaluationSet(
        test.pairs, test.images, test.masks, test.originals, test.input_mapping, config.amp
    )
    _, summary, _ = ku.evaluate_model(best, eval_set, torch.device("cpu"), config.inference_threshold)
    row = {
        "precision": name,
        "amp": config.amp,
        "ran_in": result.precision,
        "seed": config.seed,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "train_minutes": minutes,
        "seconds_per_epoch": float(result.history["seconds"].mean()),
        "val_dice_best_epoch": float(result.best_row["val_dice"]),
        "val_loss_best": result.best_val_loss,
        **{
            k: summary[k]
            for k in ("pooled_dice", "pooled_iou", "mean_dice", "mean_case_dice", "n_images", "n_cases")
        },
    }
    ku._atomic_write(done, json.dumps(row, indent=2) + "\n")
    return row


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over seeds per precision, and the paired bf16 - fp32 difference."""
    rows = []
    metrics = ["pooled_dice", "pooled_iou", "mean_case_dice", "val_dice_best_epoch", "seconds_per_epoch"]
    fp32 = runs[runs["precision"] == "fp32"].set_index("seed")
    for name, part in runs.groupby("precision", sort=False):
        row = {"precision": name, "seeds": len(part)}
        for m in metrics:
            row[f"{m}_mean"] = part[m].mean()
            row[f"{m}_std"] = part[m].std(ddof=1) if len(part) > 1 else 0.0
        paired = (part.set_index("seed")["pooled_dice"] - fp32["pooled_dice"]).dropna()
        row["minus_fp32_pooled_dice_mean"] = paired.mean()
        row["minus_fp32_pooled_dice_std"] = paired.std(ddof=1) if len(paired) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per epoch: mean and SD over seeds of each precision's curves, and bf16's gap to fp32."""
    metrics = ["train_loss", "val_loss", "val_dice"]
    stats = curves.groupby(["epoch", "precision"])[metrics].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    wide = stats.unstack("precision")
    wide.columns = [f"{name}_{precision}" for name, precision in wide.columns]
    for m in metrics:
        gap = wide[f"{m}_mean_bf16"] - wide[f"{m}_mean_fp32"]
        wide[f"{m}_gap_in_fp32_sd"] = gap / wide[f"{m}_std_fp32"]
    return wide.reset_index()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (no early stopping)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-speed", action="store_true", help="only the quality runs")
    parser.add_argument("--skip-quality", action="store_true", help="only the speed table")
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bf16"))
    args = parser.parse_args(argv)
    speed_sizes = [(160, 16, 16, 3, 3), (256, 64, 4, 2, 2)]
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.max_images = 32, 4, 8, 60
        args.epochs, args.seeds = 1, args.seeds[:2]
        speed_sizes = [(32, 4, 4, 1, 1)]
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_speed import machine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    native = ku.cpu_has_native_bf16()
    print(f"# bf16 autocast against fp32, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(f"# {torch.get_num_threads()} torch thread(s); native bf16 on this CPU: {native}\n", flush=True)
    if not args.skip_speed:
        speed = pd.DataFrame([row for s in speed_sizes for row in step_speed(*s)])
        ku._atomic_write(out / "speed.csv", speed.to_csv(index=False))
        print(speed.round(3).to_string(index=False), "\n", flush=True)
    if args.skip_quality:
        return 0
    base = ku.Config(
        image_size=args.image_size,
        base_channels=args.base_channels,
        batch_size=args.batch,
        num_epochs=args.epochs,
        patience=args.epochs,
        max_images=args.max_images,
        max_train_minutes=None,
        seed=42,
    )
    data = ku.prepare_data(base, args.data)
    test = ku.load_evaluation_set(data.test, data.config)
    print(f"{len(data.train)} training, {len(data.val)} validation, {len(data.test)} test images", flush=True)
    rows, curves = [], []
    for seed in args.seeds:
        for name, amp in PRECISIONS.items():
            # The split stays the one of seed 42; the seed changes weights, augmentation and order.
            config = data.config.with_parameters(AMP=amp, SEED=seed)
            run_dir = out / "runs" / f"{name}-seed{seed}"
            row = quality_run(name, config, data, test, run_dir)
            rows.append(row)
            curve = pd.read_csv(run_dir / ku.METRICS_CSV_NAME).assign(precision=name, seed=seed)
            curves.append(curve)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            runs = pd.DataFrame(rows)
            ku._atomic_write(out / "quality_runs.csv", runs.to_csv(index=False))
            ku._atomic_write(out / "curves.csv", pd.concat(curves).to_csv(index=False))
            ku._atomic_write(out / "quality_summary.csv", summarize(runs).to_csv(index=False))
    curves_summary = summarize_curves(pd.concat(curves))
    ku._atomic_write(out / "curves_summary.csv", curves_summary.to_csv(index=False))
    print("\n" + summarize(pd.DataFrame(rows)).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
