"""Does the familiarity flag (notebook 04) predict failure on a scanner the model never saw?

Reads the leave-one-source-out folds that ``bench_unseen.py`` trained (one seed, one variant). For
each fold it fits the familiarity reference on the fold's training images (the split stored in the
fold's checkpoint, at its image size and preprocessing), then reports:

- on the held-out source: the share of images flagged, and the mean and pooled Dice of flagged and
  of unflagged images (from the fold's ``evaluation_per_image.csv``);
- on the fold's validation images (patients of the training sources that the reference never saw):
  the share flagged, which should be near zero;
- on the same validation images inverted, and exported with a wide window (every tissue squeezed
  into mid greys): the share flagged, which should be near one.

Writes ``familiarity_folds.csv`` to ``--out``.

    python benchmarks/bench_familiarity.py --help
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_studies as ks  # noqa: E402
import kidneyseg_utils as ku  # noqa: E402


@functools.cache
def pairs_by_key(data_dir: Path, group_regex: str | None) -> dict[str, ku.SamplePair]:
    """Every pair under ``data_dir`` by ``source/name``, indexed once for all folds."""
    return {p.key: p for p in ku.index_dataset(data_dir, group_regex).pairs}


def fold_row(fold_dir: Path, data_dir: Path) -> dict:
    """The familiarity figures of one trained fold."""
    _, config, checkpoint = ku.load_model(fold_dir / ku.BEST_MODEL_NAME)
    by_key = pairs_by_key(data_dir, config.group_regex)
    load = lambda keys: ku.load_arrays([by_key[k] for k in keys], config.image_size, config.input_mapping)  # noqa: E731
    reference = ks.familiarity_reference(load(checkpoint["split"]["train"]).images)
    val = load(checkpoint["split"]["val"]).images
    scores = pd.read_csv(fold_dir / "evaluation_per_image.csv")
    held = load([f"{s}/{n}" for s, n in zip(scores["source"], scores["name"])]).images
    table, by_flag = ks.familiarity_report(scores, held, reference)
    flagged, unflagged = table[table["unfamiliar"]], table[~table["unfamiliar"]]

    def pooled(part: pd.DataFrame) -> float:
        if part.empty:
            return float("nan")
        return ku.metrics_from_counts(part.tp.sum(), part.fp.sum(), part.fn.sum())["dice"]

    share = lambda images: float(ks.familiarity(images, reference)["unfamiliar"].mean())  # noqa: E731
    settings = json.loads((fold_dir / ks.LOSO_FOLD_RESULT_NAME).read_text())["settings"]
    # Folds of releases up to 0.2.0 kept the augmentation in the config.
    augmentation = settings.get("augmentation", checkpoint["config"].get("augmentation", "standard"))
    return {
        "held_out": checkpoint["held_out"],
        "augmentation": augmentation,
        "n_test": len(table),
        "test_flagged_share": float(table["unfamiliar"].mean()),
        "test_median_novelty": float(table["novelty"].median()),
        "mean_dice_flagged": float(flagged["dice"].mean()) if len(flagged) else float("nan"),
        "mean_dice_unflagged": float(unflagged["dice"].mean()) if len(unflagged) else float("nan"),
        "pooled_dice_flagged": pooled(flagged),
        "pooled_dice_unflagged": pooled(unflagged),
        "n_val": len(val),
        "val_flagged_share": share(val),
        "val_inverted_flagged_share": share(255 - val),
        "val_wide_window_flagged_share": share((96 + 0.25 * val).astype(np.uint8)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "results" / "unseen_runs"))
    parser.add_argument("--seed", type=int, default=1, help="which seed's folds")
    parser.add_argument("--variant", default="standard", help="which variant's folds")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "unseen_scanners"))
    args = parser.parse_args(argv)
    folds = sorted((Path(args.runs) / f"seed{args.seed}" / args.variant).glob(f"*/{ku.BEST_MODEL_NAME}"))
    if not folds:
        raise SystemExit(
            f"No trained folds under {args.runs}/seed{args.seed}/{args.variant}; run bench_unseen.py."
        )
    rows = pd.DataFrame([fold_row(f.parent, Path(args.data)) for f in folds])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "familiarity_folds.csv", index=False)
    print(rows.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
