"""Unseen scanners: leave-one-source-out over several seeds, every variant on paired folds.

For each seed, each held-out source and each variant (a set of notebook parameters), one model is
trained on every other source (patient-split again for early stopping) and scored on the held-out
source at its original image sizes (``kidneyseg_utils.leave_one_source_out``). Folds are paired: for
one seed every variant gets the same split and the same initial weights, so the difference between
two variants on a fold is not split or initialisation luck; the seed changes the split inside the
training sources, the initial weights, the augmentation draws and the batch order.

Writes to ``--out`` (default ``benchmarks/results/unseen_scanners``):
``unseen_runs.csv`` (one row per seed, variant and held-out source), ``unseen_summary.csv`` (per
variant and held-out group: mean over seeds of the mean pooled Dice over the group's sources, its
standard deviation over seeds, and the paired difference to the baseline variant with its standard
deviation), ``unseen_per_source.csv`` (per variant and source, mean and standard deviation over
seeds) and both tables as Markdown in ``unseen_tables.md``. The trained folds go to ``--runs``
(git-ignored); a rerun reuses finished folds, and a larger ``--epochs`` trains them on from their
last checkpoint (which gives exactly the longer run) instead of starting again.

    python benchmarks/bench_unseen.py --help
    python benchmarks/bench_unseen.py --quick            # the tests
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

CT_SOURCES = ["curvas-ct", "kidneycyst-ct", "kits19-ct"]


def extendable(stored: dict, settings: dict, out: Path) -> bool:
    """Whether a finished fold differs from ``settings`` only by a smaller ``num_epochs``, with an
    epoch budget alone (no time limit, which would make the stopping epoch depend on the machine)
    and its resumable last checkpoint at hand, short of the new budget (an interrupted longer run may
    have gone past it): training it on reproduces the longer run exactly."""
    old = stored.get("settings") or {}
    if not old or not (out / ku.LAST_CHECKPOINT_NAME).is_file():
        return False
    # Configs of releases up to 0.2.0 held the preprocessing, normalisation and augmentation.
    a, b = (ku.Config.from_dict(x["config"]).to_dict() for x in (old, settings))
    if old.get("augmentation", old["config"].get("augmentation", "standard")) != settings["augmentation"]:
        return False
    if a.get("max_train_minutes") is not None or b.get("max_train_minutes") is not None:
        return False
    budget = int(b.pop("num_epochs", 0))
    if int(a.pop("num_epochs", 0)) >= budget:
        return False
    if not (a == b and old["train"] == settings["train"] and old["test"] == settings["test"]):
        return False
    try:
        return int(ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME, map_location="cpu")["epoch"]) < budget
    except ValueError:  # damaged: the fold is trained anew
        return False


def parse_variants(items: list[str]) -> dict[str, dict[str, str]]:
    """``name`` or ``name=PARAM:value,PARAM:value``; a bare name is an AUGMENTATION value."""
    variants = {}
    for item in items:
        name, _, spec = item.partition("=")
        if not spec:
            variants[name] = {"AUGMENTATION": name}
            continue
        variants[name] = dict(pair.split(":", 1) for pair in spec.split(","))
    return variants


def summarize(runs: pd.DataFrame, groups: dict[str, list[str]], baseline: str) -> pd.DataFrame:
    """Per variant and group: mean over seeds of the group's mean pooled Dice, its spread over seeds,
    and the paired difference to ``baseline`` (same seed, same folds) with its spread."""
    rows = []
    for group, sources in groups.items():
        part = runs[runs["held_out"].isin(sources)]
        per_seed = part.groupby(["variant", "seed"])["pooled_dice"].mean().unstack("seed")
        if per_seed.empty:
            continue
        base = per_seed.loc[baseline] if baseline in per_seed.index else None
        for variant, values in per_seed.iterrows():
            diff = values - base if base is not None else values * float("nan")
            rows.append(
                {
                    "group": group,
                    "sources": len(sources),
                    "variant": variant,
                    "seeds": int(values.notna().sum()),
                    "pooled_dice_mean": values.mean(),
                    "pooled_dice_std": values.std(ddof=1),
                    "minus_baseline_mean": diff.mean(),
                    "minus_baseline_std": diff.std(ddof=1),
                    "folds": len(folds := part[part["variant"] == variant]),
                    "best_epoch_mean": folds["best_epoch"].mean(),
                    "epochs_run_mean": folds["epochs"].mean(),
                    "stopped_early": int((folds["stop_reason"] == "early_stopping").sum()),
                }
            )
    return pd.DataFrame(rows)


def markdown_tables(summary: pd.DataFrame, per_source: pd.DataFrame, budget: int, baseline: str) -> str:
    """The summary and the per-source table as Markdown, for README."""

    def pm(mean: float, std: float) -> str:
        return "—" if pd.isna(mean) else f"{mean:.3f} ± {std:.3f}"

    lines = [
        "| held out | variant | seeds | pooled Dice, mean ± SD over seeds | "
        f"minus `{baseline}`, paired, mean ± SD | best epoch (mean) | epochs run (mean) of {budget} | "
        "folds stopped early |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        diff = "—" if r.variant == baseline else pm(r.minus_baseline_mean, r.minus_baseline_std)
        lines.append(
            f"| {r.group} ({r.sources} source{'s' if r.sources > 1 else ''}) | `{r.variant}` | {r.seeds} | "
            f"{pm(r.pooled_dice_mean, r.pooled_dice_std)} | {diff} | {r.best_epoch_mean:.1f} | "
            f"{r.epochs_run_mean:.1f} | {r.stopped_early} of {r.folds} |"
        )
    wide = per_source.assign(cell=[pm(m, s) for m, s in zip(per_source["mean"], per_source["std"])])
    wide = wide.pivot(index="held_out", columns="variant", values="cell")
    lines += ["", "| held out | " + " | ".join(f"`{v}`" for v in wide.columns) + " |"]
    lines.append("|---" * (len(wide.columns) + 1) + "|")
    lines += [f"| {source} | " + " | ".join(row) + " |" for source, row in wide.iterrows()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    parser.add_argument(
        "--sources", nargs="+", default=[*CT_SOURCES, "chaos-t2-mri"], help="held out in turn"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["standard", "gin", "strong+gin"],
        help="AUGMENTATION values, or name=PARAM:value,PARAM:value; the first is the baseline",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per fold (no time limit)")
    parser.add_argument("--patience", type=int, default=8, help="early stopping on the training sources")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "unseen_scanners"))
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "results" / "unseen_runs"))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.epochs = 32, 4, 8, 1
        args.seeds, args.sources, args.variants = args.seeds[:2], args.sources[:2], args.variants[:2]
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = parse_variants(args.variants)
    baseline = next(iter(variants))
    from bench_speed import machine

    print(f"# Unseen scanners, {time.strftime('%Y-%m-%d')}, {machine()}, {torch.get_num_threads()} thread(s)")
    print(
        f"# variants {list(variants)} (baseline {baseline!r}), held out {args.sources}, seeds {args.seeds}, "
        f"{args.image_size}px, width {args.base_channels}, batch {args.batch}, {args.epochs} epochs, "
        f"patience {args.patience}\n",
        flush=True,
    )
    device = ku.get_device(args.device)
    tables = []
    for seed in args.seeds:
        config = ku.Config(
            image_size=args.image_size,
            base_channels=args.base_channels,
            batch_size=args.batch,
            num_epochs=args.epochs,
            patience=args.patience,
            max_train_minutes=None,
            group_regex="auto",
            test_fraction=0.0,
            seed=seed,
            max_images=60 if args.quick else None,
        )
        tic = time.monotonic()
        table = ks.leave_one_source_out(
            config,
            args.data,
            Path(args.runs) / f"seed{seed}",
            args.sources,
            variants,
            device,
            extendable=extendable,
        )
        tables.append(table.assign(seed=seed))
        print(f"seed {seed}: {(time.monotonic() - tic) / 60:.1f} min", flush=True)
        print(table[["variant", "held_out", "pooled_dice", "best_epoch", "epochs", "train_minutes"]].round(3))
    runs = pd.concat(tables, ignore_index=True)
    groups = {"CT": [s for s in args.sources if s in CT_SOURCES]}
    groups.update({s: [s] for s in args.sources if s not in CT_SOURCES})
    summary = summarize(runs, {g: s for g, s in groups.items() if s}, baseline)
    per_source = (
        runs.groupby(["variant", "held_out"])["pooled_dice"].agg(["mean", "std", "count"]).reset_index()
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "unseen_runs.csv", index=False)
    summary.to_csv(out / "unseen_summary.csv", index=False)
    per_source.to_csv(out / "unseen_per_source.csv", index=False)
    tables = markdown_tables(summary, per_source, args.epochs, baseline)
    (out / "unseen_tables.md").write_text(tables)
    print("\n" + tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
