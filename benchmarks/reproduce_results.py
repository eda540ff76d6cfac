"""docs/results.md's single-split figures: the CPU preset trained on the shared data, scored on the
held-out test split (and on the validation split, labelled optimistic), with and without flip TTA.

The run uses ``presets/cpu_quick.yaml`` with its clock limit replaced by a fixed number of epochs
(how many epochs a clock limit buys changes from machine to machine, and Dice with it), the patient split
inferred by ``GROUP_REGEX="auto"`` and ``TEST_FRACTION=0.15``, through the same functions notebooks 03
and 04 call. It writes, under ``--out`` (default ``benchmarks/results/cpu_preset``):

- ``training_metrics.csv``: the per-epoch history (notebook 03's file);
- ``evaluation_<part>[_tta].json``: the summaries of the test and validation splits, without and with TTA;
- ``evaluation_<part>_per_image.csv`` and ``evaluation_<part>_per_patient.csv``: per-image scores and
  Dice per patient of the test and validation splits (without TTA);
- ``normalization_spread.csv``: notebook 05's measure of how alike each normalisation makes the sources;
- ``run.json``: the command, machine, date, epochs, minutes, best epoch and split sizes.

    python benchmarks/reproduce_results.py --help
    python benchmarks/reproduce_results.py                      # docs/results.md
    python benchmarks/reproduce_results.py --quick --out /tmp/x # tiny settings (the tests)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_studies as ks  # noqa: E402
import kidneyseg_utils as ku  # noqa: E402


def preset_config(epochs: int, seed: int, quick: bool) -> ku.Config:
    """The CPU preset with a fixed number of epochs instead of its clock limit."""
    values = yaml.safe_load((REPO / "presets" / "cpu_quick.yaml").read_text())
    values.update(NUM_EPOCHS=epochs, MAX_TRAIN_MINUTES=None, SEED=seed)
    if quick:
        values.update(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, MAX_IMAGES=60)
    return ku.Config.from_parameters(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="data root")
    parser.add_argument("--epochs", type=int, default=40, help="fixed number of training epochs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_preset")
    parser.add_argument(
        "--run-dir", type=Path, default=REPO / "runs" / "reproduce", help="checkpoints (not kept)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
    config = preset_config(args.epochs, args.seed, args.quick)
    device = ku.get_device(args.device)
    started = time.monotonic()
    data = ku.prepare_data(config, args.data)
    config = data.config
    print(f"{len(data.train)} training, {len(data.val)} validation, {len(data.test)} test images")
    if args.run_dir.exists():
        shutil.rmtree(args.run_dir)
    tic = time.monotonic()
    result = ku.train_model(
        ku.build_model(config),
        data.train_dataset,
        data.val_dataset,
        config,
        args.run_dir,
        device,
        progress=False,
        extra_state={"split": data.split_record(), "data_dir": str(args.data)},
    )
    train_minutes = (time.monotonic() - tic) / 60
    model, config, checkpoint = ku.load_model(result.files["best_model"], device)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(result.files["metrics_csv"], args.out / ku.METRICS_CSV_NAME)
    summaries = {}
    for part in ("test", "val"):
        for tta in (False, True):
            evaluation = ku.evaluate_split(
                model, checkpoint, config, part, args.run_dir / ("tta" if tta else "plain"), device, tta=tta
            )
            name = f"evaluation_{part}{'_tta' if tta else ''}"
            (args.out / f"{name}.json").write_text(
                json.dumps(evaluation.summary, indent=2, default=str) + "\n"
            )
            summaries[name] = evaluation.summary
            if not tta:
                evaluation.scores.to_csv(args.out / f"evaluation_{part}_per_image.csv", index=False)
                ku.case_scores(evaluation.scores).to_csv(
                    args.out / f"evaluation_{part}_per_patient.csv", index=False
                )
    per_source, spread = ks.normalization_consistency(args.data, image_size=128 if not args.quick else 32)
    spread.to_csv(args.out / "normalization_spread.csv", index=False)
    from bench_speed import machine

    run = {
        "command": "python benchmarks/reproduce_results.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "config": config.to_dict(),
        "epochs": len(result.history),
        "stop_reason": result.stop_reason,
        "best_epoch": result.best_epoch,
        "train_minutes": train_minutes,
        "total_minutes": (time.monotonic() - started) / 60,
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "patients": {
            "train": len({p.group for p in data.train.pairs}),
            "val": len({p.group for p in data.val.pairs}),
            "test": len({p.group for p in data.test}),
        },
    }
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    keys = ["n_images", "n_cases", "pooled_dice", "mean_dice", "mean_case_dice", "std_case_dice", "mean_hd95"]
    print(f"{run['epochs']} epochs in {train_minutes:.1f} min (best epoch {result.best_epoch})")
    for name, summary in summaries.items():
        print(name, {k: round(summary[k], 4) if isinstance(summary[k], float) else summary[k] for k in keys})
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
