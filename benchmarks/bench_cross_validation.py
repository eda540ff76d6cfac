"""Cross-validation by patient on ../shared/data, each fold trained until early stopping ends it.

nnU-Net's protocol as notebooks 03 and 04 run it: the test split (15 % of the patients) is held out
first; the other patients are divided into ``--folds`` patient-disjoint folds balanced by source;
each fold trains (``FOLD=k``) until early stopping, its best checkpoint chosen on its own validation
fold. Then every non-test patient is scored once by the fold model that did not train on it
(out-of-fold), and the test split by the ensemble of the fold models and by each fold alone.

Resumable across sessions: a fold that stopped early (or reached ``--epochs``) is kept; a fold
stopped by ``--max-minutes`` (the clock of this invocation) or killed continues from its last
checkpoint under ``--runs`` next time, with the same curve as an uninterrupted run (``--runs`` is
ignored by git, so an unfinished fold continues only on a machine that kept it). A finished fold's
best checkpoint is copied to ``--out`` as ``fold_k_model.pth``, which git keeps: folds trained in
different sessions, on different machines, are scored together once all have finished. ``--only``
trains some folds and stops, so that two processes can share a machine's cores. Writes under
``--out``: ``fold_k_training_metrics.csv``, ``fold_k.json`` (epochs, minutes, best epoch, stop
reason, precision) and ``fold_k_model.pth`` per fold, then ``oof_per_image.csv``,
``oof_per_patient.csv``, ``test_per_image.csv`` (ensemble), ``test_per_patient.csv``,
``test_folds.csv`` (each fold, their mean and the ensemble) and ``cv_summary.json``.
``--score-finished`` trains nothing and writes the same tables for the folds finished so far under
``--out/partial/``, with ``partial_summary.json`` (its ``folds`` says how many; the out-of-fold
figures then cover those folds' validation patients only). ``--set NAME=VALUE`` changes one notebook
parameter (a JSON value, e.g. ``--set FOCAL_ALPHA=0.75``) for a variant trained on the same folds;
give it its own ``--out`` and ``--runs``. The change is recorded in every ``fold_k.json`` and the
summary (``changes``). ``--compare BASELINE_OUT`` trains nothing: it pairs the variant's scored folds
with the baseline's, fold by fold, into ``paired_folds.csv`` and ``paired_summary.json`` (the mean
and spread of the gains, and the baseline's spread over folds to weigh them against), and patient by
patient, out of fold, into ``paired_patients.csv``; ``--paired-name`` names those files for a second
baseline (``NAME_folds.csv``, ...). ``--small-kidney-weight W`` trains with the studies'
``KidneySizeSampler`` (slices in the smallest quarter of kidney area drawn W times as often),
through ``train_model``'s ``sampler`` hook; it is recorded in ``changes`` as ``sampler``. ``--poly``
anneals the learning rate to zero over the epochs (the studies' ``PolySchedule``, nnU-Net's poly)
instead of halving it on plateaus. ``--architecture monai-basicunet`` trains a peer network
(``kidneyseg_studies.PEERS``) on the same folds with the same loss, augmentation and early stopping;
its checkpoints record it, so notebook 04 scores them like ours. ``--error-views`` trains nothing:
it writes notebook 04's error views of the scored folds (``error_views_oof.csv``,
``error_views_test.csv``: Dice by kidney size and by slice position, the false kidney on kidney-free
slices).

    python benchmarks/bench_cross_validation.py --help
    python benchmarks/bench_cross_validation.py --threads 1                      # docs/cross_validation.md
    python benchmarks/bench_cross_validation.py --score-finished                 # the folds so far
    python benchmarks/bench_cross_validation.py --quick                          # tests
    python benchmarks/bench_cross_validation.py --threads 1 --only 0 --set FOCAL_ALPHA=0.75 \
        --out benchmarks/results/cross_validation_alpha075 \
        --runs benchmarks/results/cross_validation_runs_alpha075
    python benchmarks/bench_cross_validation.py --compare benchmarks/results/cross_validation \
        --out benchmarks/results/cross_validation_alpha075
    python benchmarks/bench_cross_validation.py --compare benchmarks/results/cross_validation_alpha075 \
        --out benchmarks/results/cross_validation_dice08 --paired-name paired_with_alpha075
    python benchmarks/bench_cross_validation.py --threads 1 --set FOCAL_ALPHA=0.75 --small-kidney-weight 3 \
        --out benchmarks/results/cross_validation_alpha075_small3 \
        --runs benchmarks/results/cross_validation_runs_alpha075_small3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_studies as ks  # noqa: E402
import kidneyseg_utils as ku  # noqa: E402

FINISHED = ("early_stopping", "num_epochs")


def fold_model_name(fold: int) -> str:
    """The finished fold's best checkpoint under ``--out``, kept (and committed) so that scoring can
    happen in a later session than the training."""
    return f"fold_{fold}_model.pth"


def train_fold(
    config: ku.Config,
    data_dir: Path,
    runs: Path,
    out: Path,
    deadline: float,
    changes: dict | None = None,
    small_kidney_weight: float | None = None,
    architecture: str = ku.DEFAULT_ARCHITECTURE,
    poly: bool = False,
) -> dict | None:
    """Train (or continue) one fold; return its record once finished, None if the clock stopped it.
    ``changes`` (notebook parameters that differ from the benchmark's defaults, and the sampling
    candidate) is recorded. ``small_kidney_weight``: train with the studies' ``KidneySizeSampler``;
    ``architecture``: the network (a peer registered by ``kidneyseg_studies.register_peers``);
    ``poly``: the studies' ``PolySchedule`` over ``NUM_EPOCHS`` instead of plateau halving."""
    record_path = out / f"fold_{config.fold}.json"
    model_path = out / fold_model_name(config.fold)
    if record_path.exists() and model_path.exists():
        return json.loads(record_path.read_text())
    if record_path.exists():
        print(f"fold {config.fold}: {record_path.name} exists but {model_path} does not; training it again")
    run_dir = ku.run_output_dir(runs, config)
    remaining = (deadline - time.monotonic()) / 60
    if remaining < 1:
        return None
    resume = (run_dir / ku.LAST_CHECKPOINT_NAME).exists()
    data = ku.prepare_data(config, data_dir)
    config = data.config  # GROUP_REGEX="auto" made concrete, as notebook 03 stores it
    sampler = None
    if small_kidney_weight is not None:
        sampler = ks.KidneySizeSampler(data.train.masks, config.seed, small_weight=small_kidney_weight)
    torch.manual_seed(config.seed)
    result = ku.train_model(
        ku.build_model(config, architecture),
        data.train_dataset,
        data.val_dataset,
        config.with_parameters(MAX_TRAIN_MINUTES=remaining),
        run_dir,
        torch.device("cpu"),
        resume=resume,
        overwrite=not resume,
        extra_state={"split": data.split_record(), "data_dir": str(data_dir)},
        progress=False,
        sampler=sampler,
        lr_schedule=ks.PolySchedule if poly else None,
    )
    shutil.copy2(run_dir / ku.METRICS_CSV_NAME, out / f"fold_{config.fold}_training_metrics.csv")
    if result.stop_reason not in FINISHED:
        print(f"fold {config.fold}: stopped by the clock after epoch {len(result.history)}; run again")
        return None
    partial = model_path.with_name(model_path.name + ".partial")
    shutil.copy2(run_dir / ku.BEST_MODEL_NAME, partial)
    partial.replace(model_path)
    record = {
        "fold": config.fold,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "minutes": float(result.history["seconds"].sum() / 60),
        "precision": result.precision,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "val_dice_best_epoch": float(result.best_row["val_dice"]),
        "changes": changes or {},
    }
    ku._atomic_write(record_path, json.dumps(record, indent=2) + "\n")
    return record


def score(out: Path, records: list[dict], dest: Path | None = None) -> dict:
    """Out-of-fold and test-split figures of the finished folds (checkpoints in ``out``); writes the
    tables and the summary to ``dest`` (``out`` itself when every fold is there)."""
    dest = out if dest is None else dest
    paths = [out / fold_model_name(r["fold"]) for r in records]
    models, config, checkpoints = ku.load_models(paths)
    oof = ku.evaluate_out_of_fold(models, checkpoints, config, dest / "evaluation")
    test = ku.evaluate_split(ku.FoldEnsemble(models), checkpoints[0], config, "test", dest / "evaluation")
    folds = ks.fold_comparison(models, test.data, fold_ids=[r["fold"] for r in records])
    for name, table in (
        ("oof_per_image.csv", oof.scores),
        ("oof_per_patient.csv", ku.case_scores(oof.scores)),
        ("test_per_image.csv", test.scores),
        ("test_per_patient.csv", ku.case_scores(test.scores)),
        ("test_folds.csv", folds),
    ):
        ku._atomic_write(dest / name, table.to_csv(index=False))
    single = folds[folds["model"].str.startswith("fold ")]
    summary = {
        "oof_pooled_dice": oof.summary["pooled_dice"],
        "oof_pooled_iou": oof.summary["pooled_iou"],
        "oof_mean_case_dice": oof.summary["mean_case_dice"],
        "oof_std_case_dice": oof.summary["std_case_dice"],
        "oof_fold_pooled_dice_mean": oof.summary["fold_pooled_dice_mean"],
        "oof_fold_pooled_dice_std": oof.summary["fold_pooled_dice_std"],
        "test_ensemble_pooled_dice": test.summary["pooled_dice"],
        "test_ensemble_pooled_iou": test.summary["pooled_iou"],
        "test_ensemble_mean_case_dice": test.summary["mean_case_dice"],
        "test_single_fold_pooled_dice": float(single["pooled_dice"].mean()),
        "test_single_fold_pooled_dice_std": float(single["pooled_dice"].std(ddof=1))
        if len(single) > 1
        else 0.0,
        "test_single_fold_pooled_iou": float(single["pooled_iou"].mean()),
        "n_oof_images": oof.summary["n_images"],
        "n_oof_patients": oof.summary["n_cases"],
        "n_test_images": test.summary["n_images"],
        "n_test_patients": test.summary["n_cases"],
        "folds": len(records),
        "epochs": [r["epochs"] for r in records],
        "best_epochs": [r["best_epoch"] for r in records],
        "minutes": [round(r["minutes"], 2) for r in records],
        "image_size": config.image_size,
        "base_channels": config.base_channels,
        "precision": sorted({r["precision"] for r in records}),
        "changes": records[0].get("changes") or {},
        "patience": config.patience,
        "threshold": config.inference_threshold,
        "torch": str(torch.__version__),
        "date": time.strftime("%Y-%m-%d"),
    }
    name = "cv_summary.json" if dest == out else "partial_summary.json"
    ku._atomic_write(dest / name, json.dumps(summary, indent=2) + "\n")
    return summary


def _scored(out: Path) -> Path:
    """The folder holding ``out``'s scored tables: ``out`` once all folds are scored, else ``partial/``."""
    for folder in (out, out / "partial"):
        if (folder / "test_folds.csv").is_file() and (folder / "oof_per_image.csv").is_file():
            return folder
    raise FileNotFoundError(f"{out} holds no scored folds; run with --score-finished (or to the end) first.")


def write_error_views(out: Path) -> dict[str, pd.DataFrame]:
    """Notebook 04's error views (``kidneyseg_studies.error_views``) of the scored folds: out of fold
    and on the test split (the ensemble), each as ``error_views_<part>.csv`` under the scored folder
    (one row per kidney-size quarter, per slice-position fifth, and the false kidney on kidney-free
    slices, told apart by ``view``)."""
    folder = _scored(out)
    tables = {}
    for part, name in (("oof", "oof_per_image.csv"), ("test", "test_per_image.csv")):
        views = ks.error_views(pd.read_csv(folder / name))
        frames = [
            views["by_size"].assign(view="kidney size"),
            pd.DataFrame([views["false_kidney"]]).assign(view="false kidney"),
        ]
        if views["by_position"] is not None:
            frames.insert(1, views["by_position"].assign(view="slice position"))
        table = pd.concat(frames, ignore_index=True)
        table = table[["view", *[c for c in table.columns if c != "view"]]]
        ku._atomic_write(folder / f"error_views_{part}.csv", table.to_csv(index=False))
        tables[part] = table
    return tables


def fold_figures(out: Path) -> pd.DataFrame:
    """Per scored fold: its model alone on the test split (pooled Dice and IoU) and on its own
    validation patients (out of fold: pooled Dice, precision, recall), with epochs and precision."""
    folder = _scored(out)
    test = pd.read_csv(folder / "test_folds.csv")
    test = test[test["model"].str.startswith("fold ")]
    test = test.assign(fold=test["model"].str[5:].astype(int)).set_index("fold")
    oof = pd.read_csv(folder / "oof_per_image.csv")
    rows = []
    for fold, part in oof.groupby("fold"):
        counts = ku.metrics_from_counts(*(int(part[c].sum()) for c in ("tp", "fp", "fn")))
        record = json.loads((out / f"fold_{fold}.json").read_text())
        single = test.loc[fold]
        rows.append(
            {
                "fold": int(fold),
                "test_pooled_dice": single["pooled_dice"],
                "test_pooled_iou": single["pooled_iou"],
                "oof_pooled_dice": counts["dice"],
                "oof_precision": counts["precision"],
                "oof_recall": counts["recall"],
                "epochs": record["epochs"],
                "precision": record["precision"],
            }
        )
    return pd.DataFrame(rows)


# Compared once both runs have every fold (cv_summary.json): one figure each, not a spread.
ENSEMBLE_FIGURES = (
    "test_ensemble_pooled_dice",
    "test_ensemble_pooled_iou",
    "oof_pooled_dice",
    "oof_pooled_iou",
)


def compare(baseline: Path, variant: Path, prefix: str = "paired") -> dict:
    """The variant against the baseline on the folds both have scored, fold by fold (paired: same
    split, same initial weights); writes ``{prefix}_folds.csv`` and ``{prefix}_summary.json`` to the
    variant's folder. The fold spread is the baseline's standard deviation over all its folds. Once
    both have every fold, the summary also holds both ensembles and pooled out-of-fold figures
    (:data:`ENSEMBLE_FIGURES`, ``_baseline``, ``_variant`` and ``_gain``)."""
    base, var = fold_figures(baseline), fold_figures(variant)
    paired = base.merge(var, on="fold", suffixes=("_baseline", "_variant"))
    if paired.empty:
        raise ValueError(f"{baseline} and {variant} have no scored fold in common.")
    figures = ("test_pooled_dice", "test_pooled_iou", "oof_pooled_dice", "oof_precision", "oof_recall")
    for name in figures:
        paired[f"{name}_gain"] = paired[f"{name}_variant"] - paired[f"{name}_baseline"]
    summary = {"baseline": str(baseline), "variant": str(variant), "folds": paired["fold"].tolist()}
    for name in figures:
        gain = paired[f"{name}_gain"]
        summary[f"{name}_gain_mean"] = float(gain.mean())
        summary[f"{name}_gain_std"] = float(gain.std(ddof=1)) if len(gain) > 1 else None
        summary[f"{name}_folds_improved"] = int((gain > 0).sum())
    for name in ("test_pooled_dice", "oof_pooled_dice"):
        summary[f"{name}_baseline_fold_std"] = float(base[name].std(ddof=1))
    whole = [folder / "cv_summary.json" for folder in (baseline, variant)]
    if all(path.is_file() for path in whole):  # every fold of both: the ensembles and the pooled OOF
        cv_base, cv_var = (json.loads(path.read_text()) for path in whole)
        for name in ENSEMBLE_FIGURES:
            summary[f"{name}_baseline"], summary[f"{name}_variant"] = cv_base[name], cv_var[name]
            summary[f"{name}_gain"] = cv_var[name] - cv_base[name]
    summary["changes"] = json.loads((variant / f"fold_{int(paired['fold'].iloc[0])}.json").read_text())[
        "changes"
    ]
    patients = patient_pairs(baseline, variant, paired["fold"].tolist())
    summary["oof_patients"] = len(patients)
    summary["oof_patient_dice_gain_mean"] = float(patients["dice_gain"].mean())
    summary["oof_patients_improved"] = int((patients["dice_gain"] > 0).sum())
    summary["oof_patients_worse"] = int((patients["dice_gain"] < 0).sum())
    ku._atomic_write(variant / f"{prefix}_folds.csv", paired.to_csv(index=False))
    ku._atomic_write(variant / f"{prefix}_patients.csv", patients.to_csv(index=False))
    ku._atomic_write(variant / f"{prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def patient_pairs(baseline: Path, variant: Path, folds: list[int]) -> pd.DataFrame:
    """Out of fold, patient by patient, side by side: each validation patient of ``folds`` with its
    Dice (pooled over its slices) under the baseline and the variant, and the gain."""
    tables = []
    for folder in (baseline, variant):
        per_image = pd.read_csv(_scored(folder) / "oof_per_image.csv")
        per_image = per_image[per_image["fold"].isin(folds)]
        cases = ku.case_scores(per_image).set_index("patient")
        cases["fold"] = per_image.groupby(per_image["source"] + "/" + per_image["case"].astype(str))[
            "fold"
        ].first()
        tables.append(cases)
    both = tables[0].join(tables[1][["dice"]], rsuffix="_variant").rename(columns={"dice": "dice_baseline"})
    both["dice_gain"] = both["dice_variant"] - both["dice_baseline"]
    return both.reset_index()[
        [
            "patient",
            "source",
            "fold",
            "slices",
            "slices_with_kidney",
            "dice_baseline",
            "dice_variant",
            "dice_gain",
        ]
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--only",
        type=int,
        nargs="+",
        default=None,
        metavar="FOLD",
        help="train only these folds and stop before scoring (run folds side by side)",
    )
    parser.add_argument(
        "--score-finished",
        action="store_true",
        help="train nothing; score the folds finished so far into --out/partial (partial_summary.json)",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=300, help="upper bound; early stopping ends each fold")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--amp", default="true", choices=["true", "cuda", "false"], help="Config.amp")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop this invocation after this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a notebook parameter for a variant (JSON value), e.g. --set FOCAL_ALPHA=0.75",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="BASELINE_OUT",
        help="train nothing; compare --out's scored folds with the baseline's, fold by fold",
    )
    parser.add_argument(
        "--paired-name",
        default="paired",
        metavar="NAME",
        help="with --compare: write NAME_folds.csv and NAME_summary.json (default: paired)",
    )
    parser.add_argument(
        "--small-kidney-weight",
        type=float,
        default=None,
        metavar="W",
        help="sample slices in the smallest quarter of kidney area W times as often (KidneySizeSampler)",
    )
    parser.add_argument(
        "--architecture",
        default=ku.DEFAULT_ARCHITECTURE,
        help="the network: AttentionUNet (ours) or a peer of kidneyseg_studies.PEERS, e.g. monai-basicunet",
    )
    parser.add_argument(
        "--poly",
        action="store_true",
        help="nnU-Net's poly schedule over --epochs (or --set NUM_EPOCHS=N) instead of plateau halving",
    )
    parser.add_argument(
        "--error-views",
        action="store_true",
        help="train nothing; write notebook 04's error views of --out's scored folds (error_views_*.csv)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "results" / "cross_validation_runs"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cross_validation"))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.max_images = 32, 4, 8, 60
        args.folds, args.epochs, args.patience = 2, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = {"true": True, "cuda": "cuda", "false": False}[args.amp]
    config = ku.Config(
        image_size=args.image_size,
        base_channels=args.base_channels,
        batch_size=args.batch,
        num_epochs=args.epochs,
        patience=args.patience,
        folds=args.folds,
        max_images=args.max_images,
        max_train_minutes=None,
        amp=amp,
    )
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: write NAME=VALUE, e.g. --set FOCAL_ALPHA=0.75")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    try:
        config = config.with_parameters(**changes)
    except ValueError as exc:
        parser.error(f"--set: {exc}")
    ks.register_peers()
    if args.architecture != ku.DEFAULT_ARCHITECTURE:
        if args.architecture not in ks.PEERS:
            parser.error(
                f"--architecture {args.architecture!r}: choose AttentionUNet or one of {list(ks.PEERS)}"
            )
        changes["architecture"] = args.architecture
    if args.poly:
        changes["lr_schedule"] = f"PolySchedule over {config.num_epochs} epochs"
    if args.small_kidney_weight is not None:
        if not args.small_kidney_weight > 0:
            parser.error(f"--small-kidney-weight must be > 0; got {args.small_kidney_weight}")
        changes["sampler"] = f"KidneySizeSampler(small_weight={args.small_kidney_weight:g})"
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * (args.max_minutes if args.max_minutes else 1e9)
    from bench_speed import machine

    print(f"# cross-validation, {args.folds} folds, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(
        f"# {args.image_size}px, width {args.base_channels}, AMP={amp!r}, {torch.get_num_threads()} thread(s)"
        + (f", changed: {changes}" if changes else "")
    )
    if args.compare:
        if not args.paired_name or Path(args.paired_name).name != args.paired_name:
            parser.error(
                f"--paired-name {args.paired_name!r}: give a file name stem, e.g. paired_with_alpha075"
            )
        try:
            print(json.dumps(compare(Path(args.compare), out, args.paired_name), indent=2))
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--compare: {exc}")
        return 0
    if args.error_views:
        try:
            tables = write_error_views(out)
        except FileNotFoundError as exc:
            parser.error(f"--error-views: {exc}")
        for part, table in tables.items():
            print(f"\n{part}:\n{table.round(3).to_string(index=False)}")
        return 0
    if args.score_finished:
        finished = [
            json.loads((out / f"fold_{k}.json").read_text())
            for k in range(args.folds)
            if (out / f"fold_{k}.json").is_file() and (out / fold_model_name(k)).is_file()
        ]
        if not finished:
            parser.error(f"--score-finished: no finished fold in {out} yet")
        print(json.dumps(score(out, finished, out / "partial"), indent=2))
        return 0
    records = []
    for fold in args.only if args.only is not None else range(args.folds):
        if not 0 <= fold < args.folds:
            parser.error(f"--only {fold}: a fold is 0 to {args.folds - 1} (--folds {args.folds})")
        record = train_fold(
            config.with_parameters(FOLD=fold),
            Path(args.data),
            runs,
            out,
            deadline,
            changes,
            args.small_kidney_weight,
            args.architecture,
            args.poly,
        )
        if record is None:
            return 0
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.only is not None:
        print(f"# folds {args.only} finished; run without --only to train the rest and score")
        return 0
    summary = score(out, records)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
