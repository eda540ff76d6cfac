"""Quality at an equal wall-clock budget: our model against the peers a user would pick instead.

Every model gets the same data, patient-grouped split, seed, image size, augmentation, loss and
training loop (``kidneyseg_utils.train_model``) and the same minutes of training; each is then
scored by ``kidneyseg_utils.evaluate_model`` on the validation split at the original image sizes.

    python benchmarks/bench_quality.py --help
    python benchmarks/bench_quality.py --budget-minutes 15          # the figures in README
    python benchmarks/bench_quality.py --quick                      # tiny settings (tests)

Peers (random initialisation; no weights can be downloaded here): segmentation-models-pytorch
``Unet`` with a resnet34 encoder, and MONAI ``BasicUNet``. A missing package is reported, not fatal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_utils as ku  # noqa: E402


def make_model(name: str, config: ku.Config, quick: bool) -> torch.nn.Module | None:
    """The model called ``name`` with one input and one output channel, or None if not installed."""
    torch.manual_seed(config.seed)
    if name == "ours":
        return ku.build_model(config)
    if name == "smp-unet-resnet34":
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            return None
        encoder = "resnet18" if quick else "resnet34"
        return smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=1)
    if name == "monai-basicunet":
        try:
            from monai.networks.nets import BasicUNet
        except ImportError:
            return None
        width = config.base_channels
        features = (width, width, 2 * width, 4 * width, 8 * width, width)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=features)
    raise ValueError(f"unknown model {name!r}")


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and score every model; returns (summary, Dice per source)."""
    device = ku.get_device(args.device)
    config = ku.Config(
        image_size=args.image_size,
        base_channels=args.base_channels,
        batch_size=args.batch,
        num_epochs=args.max_epochs,
        patience=args.max_epochs,
        group_regex=args.group_regex,
        seed=args.seed,
        max_train_minutes=args.budget_minutes,
        max_images=args.max_images,
    )
    data = ku.prepare_data(config, args.data)
    val = ku.load_evaluation_set(data.val.pairs, config)
    rows, per_source = [], []
    for name in args.models:
        model = make_model(name, config, args.quick)
        if model is None:
            rows.append({"model": name, "status": "not installed"})
            continue
        tic = time.monotonic()
        result = ku.train_model(
            model,
            data.train_dataset,
            data.val_dataset,
            config,
            Path(args.out) / name,
            device,
            overwrite=True,
            progress=False,
        )
        minutes = (time.monotonic() - tic) / 60
        best = ku.load_checkpoint(result.files["best_model"])["model_state"]
        model.load_state_dict(best)
        model.to(device).eval()
        scores, summary, _ = ku.evaluate_model(model, val, device, config.inference_threshold)
        rows.append(
            {
                "model": name,
                "status": "ok",
                "params_M": ku.count_parameters(model) / 1e6,
                "epochs": len(result.history),
                "best_epoch": result.best_epoch,
                "train_minutes": minutes,
                "pooled_dice": summary["pooled_dice"],
                "mean_dice": summary["mean_dice"],
                "mean_dice_with_kidney": summary["mean_dice_with_kidney"],
                "mean_hd95": summary["mean_hd95"],
            }
        )
        by_source = scores.groupby("source")[["tp", "fp", "fn"]].sum()
        for source, c in by_source.iterrows():
            per_source.append(
                {
                    "model": name,
                    "source": source,
                    "pooled_dice": ku.metrics_from_counts(c.tp, c.fp, c.fn)["dice"],
                }
            )
    table = pd.DataFrame(rows)
    sources = pd.DataFrame(per_source)
    if len(sources):
        sources = sources.pivot(index="source", columns="model", values="pooled_dice").reset_index()
    return table, sources


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    parser.add_argument("--group-regex", default="^([^_]+)_", help="patient id in file names")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training minutes per model")
    parser.add_argument("--max-epochs", type=int, default=1000, help="upper bound; the budget ends training")
    parser.add_argument("--image-size", type=int, default=160, help="as the CPU preset")
    parser.add_argument("--base-channels", type=int, default=16, help="width of ours and of BasicUNet")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--models", nargs="+", default=["ours", "smp-unet-resnet34", "monai-basicunet"])
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_runs"))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.max_images = 32, 4, 8, 40
        args.budget_minutes, args.max_epochs = 0.05, 1
    from bench_speed import machine

    print(f"# Equal-budget quality, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(
        f"# {args.budget_minutes:g} training minutes per model, {args.image_size}px, batch {args.batch}, "
        f"seed {args.seed}, split by {args.group_regex!r}\n"
    )
    table, sources = run(args)
    out = Path(args.out).parent
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "quality_summary.csv", index=False)
    sources.to_csv(out / "quality_per_source.csv", index=False)
    print(table.round(3).to_string(index=False), "\n")
    print("Pooled validation Dice per source")
    print(sources.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
