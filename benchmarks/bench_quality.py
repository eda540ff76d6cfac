"""Quality of our model against the peers a user would pick instead, over several seeds.

Every model gets the same data, the same patient split (``GROUP_REGEX="auto"``, a held-out test
split of 15 % of the patients, then 80/20 training/validation, all with split seed 42), image size,
augmentation, loss and training loop (``kidneyseg_utils.train_model``). Two protocols:

- ``time``: the same minutes of training per model (the peers differ in speed per epoch);
- ``epochs``: the same number of epochs per model (learning per epoch, whatever it costs).

Each (protocol, model, seed) run is scored on the held-out **test split** at the original image
sizes with the best checkpoint by validation loss (pooled Dice, mean Dice, mean Dice per patient,
HD95). The seed changes the initial weights, the augmentation draws and the batch order, never the
split. Writes ``quality_runs.csv`` (every run), ``quality_summary.csv`` (mean and standard deviation
over seeds, and the paired difference of ours to each peer) and ``quality_per_source.csv``.

    python benchmarks/bench_quality.py --help
    python benchmarks/bench_quality.py --protocol both --budget-minutes 5 --epochs 12   # README
    python benchmarks/bench_quality.py --quick                                            # tests

Peers (random initialisation; no weights can be downloaded here): segmentation-models-pytorch
``Unet`` with a resnet34 encoder, and MONAI ``BasicUNet`` at our base width. A missing package is
reported, not fatal (``pip install -r benchmarks/requirements.txt``).
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
import kidneyseg_studies as ks  # noqa: E402
import kidneyseg_utils as ku  # noqa: E402

SPLIT_SEED = 42


def make_model(name: str, config: ku.Config, quick: bool) -> torch.nn.Module | None:
    """The model called ``name`` with one input and one output channel (the peers registered by
    ``kidneyseg_studies.register_peers``), or None if its package is not importable here."""
    torch.manual_seed(config.seed)
    if name == "ours":
        return ku.build_model(config)
    if name not in ks.PEERS:
        raise ValueError(f"unknown model {name!r}")
    try:
        return ku.build_model(config, name)
    except Exception as exc:  # missing, or broken (a torchvision built for another torch)
        print(f"# {name}: not importable ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def train_and_score(
    name: str, config: ku.Config, data: ku.PreparedData, test: ku.EvaluationSet, out: Path, args
) -> tuple[dict, pd.DataFrame] | None:
    """One run: train ``name`` with ``config`` (its seed), score the best checkpoint on the test split."""
    model = make_model(name, config, args.quick)
    if model is None:
        return None
    device = ku.get_device(args.device)
    train_ds, val_ds = ku.make_datasets(data.train, data.val, config)
    tic = time.monotonic()
    result = ku.train_model(
        model, train_ds, val_ds, config, out, device, overwrite=True, progress=False, log=False
    )
    minutes = (time.monotonic() - tic) / 60
    model.load_state_dict(ku.load_checkpoint(result.files["best_model"])["model_state"])
    model.to(device).eval()
    scores, summary, _ = ku.evaluate_model(model, test, device, config.inference_threshold)
    row = {
        "model": name,
        "seed": config.seed,
        "params_M": ku.count_parameters(model) / 1e6,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "train_minutes": minutes,
        "seconds_per_epoch": result.history["seconds"].mean(),
        "val_dice_best_epoch": float(result.best_row["val_dice"]),
        **{
            k: summary[k]
            for k in ("pooled_dice", "mean_dice", "mean_case_dice", "mean_hd95", "n_images", "n_cases")
        },
    }
    return row, scores


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every protocol, model and seed; returns (one row per run, pooled test Dice per source and run)."""
    base = ku.Config(
        image_size=args.image_size,
        base_channels=args.base_channels,
        batch_size=args.batch,
        group_regex=args.group_regex,
        test_fraction=0.15,
        seed=SPLIT_SEED,
        max_images=args.max_images,
        max_train_minutes=None,
    )
    data = ku.prepare_data(base, args.data)
    base = data.config
    test = ku.load_evaluation_set(data.test, base)
    print(
        f"{len(data.train)} training, {len(data.val)} validation, {len(data.test)} test images\n", flush=True
    )
    protocols = ["time", "epochs"] if args.protocol == "both" else [args.protocol]
    rows, per_source = [], []
    for protocol in protocols:
        if protocol == "time":
            budget = dict(
                NUM_EPOCHS=args.max_epochs, PATIENCE=args.max_epochs, MAX_TRAIN_MINUTES=args.budget_minutes
            )
        else:
            budget = dict(NUM_EPOCHS=args.epochs, PATIENCE=args.epochs, MAX_TRAIN_MINUTES=None)
        for seed in args.seeds:
            for name in args.models:
                config = base.with_parameters(SEED=seed, **budget)
                done = train_and_score(
                    name, config, data, test, Path(args.out) / protocol / f"{name}-{seed}", args
                )
                if done is None:
                    rows.append(
                        {"protocol": protocol, "model": name, "seed": seed, "status": "not installed"}
                    )
                    continue
                row, scores = done
                rows.append({"protocol": protocol, "status": "ok", **row})
                print(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True
                )
                for source, c in scores.groupby("source")[["tp", "fp", "fn"]].sum().iterrows():
                    per_source.append(
                        {
                            "protocol": protocol,
                            "model": name,
                            "seed": seed,
                            "source": source,
                            "pooled_dice": ku.metrics_from_counts(c.tp, c.fp, c.fn)["dice"],
                        }
                    )
    return pd.DataFrame(rows), pd.DataFrame(per_source)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per protocol and model, and the paired difference of
    ours to each model (same seeds), with its standard deviation."""
    ok = runs[runs["status"] == "ok"]
    metrics = ["pooled_dice", "mean_dice", "mean_case_dice", "mean_hd95", "epochs", "train_minutes"]
    rows = []
    for (protocol, model), part in ok.groupby(["protocol", "model"], sort=False):
        row = {"protocol": protocol, "model": model, "seeds": len(part), "params_M": part["params_M"].iloc[0]}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = part[m].mean(), part[m].std(ddof=1) if len(part) > 1 else 0.0
        ours = ok[(ok["protocol"] == protocol) & (ok["model"] == "ours")].set_index("seed")["pooled_dice"]
        paired = (ours - part.set_index("seed")["pooled_dice"]).dropna()
        row["ours_minus_this_mean"] = paired.mean()
        row["ours_minus_this_std"] = paired.std(ddof=1) if len(paired) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ks.register_peers()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    parser.add_argument("--group-regex", default="auto", help='patient id in file names ("auto": inferred)')
    parser.add_argument("--protocol", choices=["time", "epochs", "both"], default="both")
    parser.add_argument("--budget-minutes", type=float, default=5.0, help="protocol 'time': minutes per run")
    parser.add_argument("--epochs", type=int, default=12, help="protocol 'epochs': epochs per run")
    parser.add_argument("--max-epochs", type=int, default=1000, help="protocol 'time': upper bound on epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--image-size", type=int, default=160, help="as the CPU preset")
    parser.add_argument("--base-channels", type=int, default=16, help="width of ours and of BasicUNet")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--models", nargs="+", default=["ours", "smp-unet-resnet34", "monai-basicunet"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_runs"))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.max_images = 32, 4, 8, 60
        args.budget_minutes, args.max_epochs, args.epochs, args.seeds = 0.02, 1, 1, args.seeds[:2]
    from bench_speed import machine

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# Quality over seeds {args.seeds}, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(
        f"# protocol {args.protocol}: {args.budget_minutes:g} training minutes or {args.epochs} epochs "
        f"per run, {args.image_size}px, batch {args.batch}, {torch.get_num_threads()} torch "
        f"thread(s), split seed {SPLIT_SEED}, scored on "
        "the test split\n",
        flush=True,
    )
    runs, sources = run(args)
    out = Path(args.out).parent
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    runs.to_csv(out / "quality_runs.csv", index=False)
    summary.to_csv(out / "quality_summary.csv", index=False)
    if len(sources):
        sources = (
            sources.groupby(["protocol", "source", "model"])["pooled_dice"]
            .mean()
            .unstack("model")
            .reset_index()
        )
    sources.to_csv(out / "quality_per_source.csv", index=False)
    print(summary.round(3).to_string(index=False), "\n")
    print("Pooled test Dice per source, mean over seeds")
    print(sources.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
