"""kidneyseg_studies: what the kidneyseg notebooks show besides a run.

The second utility script of the series; it imports ``kidneyseg_utils`` (the pipeline), never the
other way round, and notebook 03 does not need it. Sections, by notebook:
    1. Exploring a dataset (01)      -- the inventory, data warnings, the mask heat map, the browser.
    2. Preprocessing (02)            -- the input mappings the pipeline leaves out (preprocessing,
                                        normalisations) and the strong augmentation; contrast
                                        measurements, the normalisation check, the ablation.
    3. Evaluation figures (04)       -- inference options, the threshold sweep, error overlays,
                                        the error views, the folds against their ensemble.
    4. Familiarity (04)              -- does a new image look like anything the model trained on?
    5. Training hooks (05, benchmarks) -- GIN and random intensity curves, reaching training through
                                        ``kidneyseg_utils.train_model``'s ``batch_transform``; a
                                        sampler that favours small kidneys (its ``sampler``); the
                                        poly schedule (``lr_schedule``); the peer networks
                                        (``register_peers``).
    6. Leave-one-source-out (05)     -- folds by source and the table.

Figures drawn once live in the cell of the notebook that draws them.

Importing it checks that ``kidneyseg_utils`` is of the same release (``__version__``) and says what
to re-attach if not. Running it as a script does nothing, except in a Kaggle session, where it copies
itself into ``/kaggle/working`` as ``kidneyseg_utils.export_for_kaggle`` does for the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Kaggle runs a utility script when it is saved. In a Kaggle session this file copies itself into
    # /kaggle/working (where a notebook that attaches a script Kaggle did not mark finds it) and
    # imports nothing else: kidneyseg_utils is not attached to this script's own session.
    import shutil

    _working = Path(os.environ.get("KIDNEYSEG_KAGGLE_ROOT", "/kaggle")) / "working"
    _target = _working / "kidneyseg_studies.py"
    if (
        os.environ.get("KAGGLE_KERNEL_RUN_TYPE")
        and _working.is_dir()
        and _target.resolve() != Path(__file__).resolve()
    ):
        shutil.copyfile(__file__, _target)
    raise SystemExit(0)

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import kidneyseg_utils as ku

__version__ = "0.3.0"
if getattr(ku, "__version__", None) != __version__:
    raise ImportError(
        f"kidneyseg_studies {__version__} needs kidneyseg_utils {__version__}, but the kidneyseg_utils "
        f"found ({getattr(ku, '__file__', '?')}) is {getattr(ku, '__version__', 'older than 0.3.0')}. "
        "Attach both utility scripts, kidneyseg-utils and kidneyseg-studies, of one version (on "
        "Kaggle: Add Input > Notebooks, the same version of each), or put both files of one checkout "
        "on sys.path."
    )


# =================================================================================================
# 1. Exploring a dataset: notebook 01
# =================================================================================================


def _static_then_widget(draw: Callable[..., None], controls: Callable[[Any], dict[str, Any]]) -> None:
    """Draw once with the defaults (so every run records a static picture), then, only in an
    interactive front end (:func:`interactive_frontend`), offer ipywidgets controls built by
    ``controls(ipywidgets)``. Headless runs never create a widget: one can hang them for ever."""
    draw()
    if not ku.interactive_frontend():
        print(
            "(Sliders appear when this notebook runs in Jupyter or Kaggle's editor; a headless run "
            f"keeps the static figure. Set {ku.INTERACTIVE_ENV}=1 to force them.)"
        )
        return
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return
    display(widgets.interactive(draw, **controls(widgets)))


def _describe_mask_values(raw: np.ndarray) -> str:
    colour = raw.ndim == 3 and raw.shape[2] >= 3
    values = ku._drop_alpha_and_reduce(raw, reduce="max")
    found = np.unique(values)
    prefix = "colour " if colour else ""
    if found.size <= 2:
        return prefix + "/".join(str(v.item()) for v in found)
    return f"{prefix}{found.size} values {found.min().item()}..{found.max().item()}"


INVENTORY_COLUMNS = (
    "source case name status problem image mask width height dtype channels mask_values kidney_fraction "
    "components pixel_hash mask_labels duplicate_of"
).split()


def inventory(
    data_dir: str | os.PathLike,
    group_regex: str | Mapping[str, str | None] | None = None,
    progress: bool = False,
    mask_labels: str | Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per pair or orphan under ``data_dir``, with what was found before any conversion.

    Columns (:data:`INVENTORY_COLUMNS`): source, case, name, status (``ok``, ``orphan_image``,
    ``orphan_mask``, ``unreadable``, ``bad_mask``, ``size_mismatch``), problem, image, mask, width,
    height, dtype, channels, mask_values (raw values, e.g. ``0/255``, ``0/1`` or ``37 values 0..255``
    for a noisy mask), kidney_fraction, components, pixel_hash, mask_labels and duplicate_of (the
    first pair with identical pixels).
    """
    import hashlib

    index = ku.index_dataset(data_dir, group_regex, mask_labels)
    rows: list[dict[str, Any]] = []
    for pair in ku._progress_bar(index.pairs, progress, desc="inventory", unit="pair", leave=False):
        row = dict(source=pair.source, case=pair.case, name=pair.name, status="ok", problem="")
        row.update(image=str(pair.image), mask=str(pair.mask), mask_labels=pair.mask_labels)
        try:
            raw_image, raw_mask = ku._decode(pair.image), ku._decode(pair.mask)
        except ku.ImageReadError as exc:
            rows.append({**row, "status": "unreadable", "problem": str(exc)})
            continue
        image = ku.to_grayscale_uint8(raw_image)
        row.update(height=image.shape[0], width=image.shape[1], dtype=str(raw_image.dtype))
        row.update(channels=1 if raw_image.ndim == 2 else raw_image.shape[2])
        row.update(mask_values=_describe_mask_values(raw_mask))
        row.update(pixel_hash=hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest())
        try:
            mask = ku.binarize_mask(raw_mask, pair.mask, pair.mask_labels)
        except ValueError as exc:
            rows.append({**row, "status": "bad_mask", "problem": str(exc)})
            continue
        if mask.shape != image.shape:
            (h, w), (mh, mw) = image.shape, mask.shape
            rows.append({**row, "status": "size_mismatch", "problem": f"mask is {mw}x{mh}, image {w}x{h}"})
            continue
        count = cv2.connectedComponents(mask, connectivity=8)[0] - 1
        rows.append({**row, "kidney_fraction": float(mask.mean()), "components": int(count)})
    for kind, paths in (("image", index.orphan_images), ("mask", index.orphan_masks)):
        other = "mask" if kind == "image" else "image"
        for path in paths:
            row = dict(source=index._source_of(path), name=path.stem, status=f"orphan_{kind}")
            rows.append({**row, "problem": f"{kind} without {other}", kind: str(path)})
    table = pd.DataFrame(rows).reindex(columns=INVENTORY_COLUMNS)
    keys = table["source"] + "/" + table["name"]
    first = keys.groupby(table["pixel_hash"]).transform("first")  # NaN where no hash
    table["duplicate_of"] = first.where(first != keys, "").fillna("")
    return table


def inventory_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per source: pairs, cases, orphans, unreadable and other problems, duplicates, distinct sizes,
    share of slices with kidney and the median kidney fraction of those."""
    rows = []
    for source, part in table.groupby("source", sort=True):
        ok = part[part["status"] == "ok"]
        kidney = ok["kidney_fraction"] > 0
        row = dict(source=source, pairs=len(ok), cases=ok["case"].nunique())
        row.update(orphans=int(part["status"].str.startswith("orphan").sum()))
        row.update(problems=int((~part["status"].isin(["ok", "orphan_image", "orphan_mask"])).sum()))
        row.update(duplicates=int((part["duplicate_of"] != "").sum()))
        row.update(sizes=ok[["width", "height"]].drop_duplicates().shape[0])
        row.update(with_kidney=f"{kidney.mean():.0%}" if len(ok) else "-")
        median = ok.loc[kidney, "kidney_fraction"].median() if kidney.any() else 0.0
        rows.append({**row, "median_kidney_fraction": float(median)})
    return pd.DataFrame(rows)


def write_inventory(
    table: pd.DataFrame, output_dir: str | os.PathLike, warnings_found: Sequence[str] = ()
) -> dict[str, Path]:
    """Write ``data_inventory.csv`` (one row per file) and ``data_report.json`` (summary, warnings)."""
    out = Path(output_dir)
    csv_path, json_path = out / "data_inventory.csv", out / "data_report.json"
    ku._atomic_write(csv_path, table.to_csv(index=False))
    problems = table.loc[table["status"] != "ok", ["source", "name", "status", "problem"]]
    report = dict(summary=inventory_summary(table).to_dict(orient="records"), warnings=list(warnings_found))
    report["problems"] = problems.to_dict(orient="records")
    ku._atomic_write(json_path, json.dumps(report, indent=2, default=str) + "\n")
    return {"inventory_csv": csv_path, "report_json": json_path}


def dataset_warnings(
    table: pd.DataFrame, group_regex: str | None = None, val_fraction: float = 0.2
) -> list[str]:
    """Plain sentences about what a user should act on before training."""
    found: list[str] = []
    ok = table[table["status"] == "ok"]
    problems = table[table["status"] != "ok"]
    for status, part in problems.groupby("status"):
        names = ", ".join(part["name"].astype(str).head(5))
        found.append(
            f"{len(part)} files with status '{status}' (e.g. {names}): see the inventory's "
            "'problem' column; they are left out of training."
        )
    duplicates = table[table["duplicate_of"] != ""]
    if len(duplicates):
        found.append(
            f"{len(duplicates)} images repeat the pixels of another (e.g. {duplicates['name'].iloc[0]} = "
            f"{duplicates['duplicate_of'].iloc[0]}); duplicates on both sides of the split inflate scores."
        )
    if group_regex is None and len(ok):
        prefixes = ok["name"].str.extract(r"^([^_]+)_", expand=False).dropna()
        if len(prefixes) > 0.9 * len(ok) and prefixes.nunique() < 0.8 * len(ok):
            found.append(
                f"File names share {prefixes.nunique()} prefixes before '_' (e.g. {prefixes.iloc[0]!r}); "
                "if they are patient ids, set GROUP_REGEX='^([^_]+)_' so that one patient's slices "
                "never sit on both sides of the split."
            )
    kidney = ok[ok["kidney_fraction"] > 0]
    tiny, huge = kidney[kidney["kidney_fraction"] < 0.001], ok[ok["kidney_fraction"] > 0.5]
    if len(tiny):
        found.append(
            f"{len(tiny)} masks cover less than 0.1 % of their image (e.g. {tiny['name'].iloc[0]}); "
            "at IMAGE_SIZE they may shrink to a few pixels."
        )
    if len(huge):
        found.append(
            f"{len(huge)} masks cover more than half of their image (e.g. {huge['name'].iloc[0]}): "
            "check that they are not inverted."
        )
    sizes = ok[["width", "height"]].drop_duplicates()
    if len(sizes) > 1:
        areas = (sizes["width"] * sizes["height"]).to_numpy()
        small, large = sizes.iloc[int(areas.argmin())], sizes.iloc[int(areas.argmax())]
        found.append(
            f"{len(sizes)} different image sizes, from {small['width']}x{small['height']} to "
            f"{large['width']}x{large['height']}: all are resized to IMAGE_SIZE (stretched, not cropped)."
        )
    n_groups = ok["case"].nunique() if group_regex else len(ok)
    if n_groups * val_fraction < 2 or len(ok) < 20:
        found.append(
            f"Only {len(ok)} pairs in {n_groups} {'cases' if group_regex else 'split units'}: a "
            f"{val_fraction:.0%} validation split holds about {max(1, round(n_groups * val_fraction))} of "
            "them, too few for a trustworthy score; the authors recommend at least 1,000 images."
        )
    if len(ok) and not (ok["kidney_fraction"] > 0).any():
        found.append("No mask contains kidney.")
    elif len(ok) and (ok["kidney_fraction"] > 0).all():
        found.append(
            "Every mask contains kidney: the model will not learn what a kidney-free slice looks like."
        )
    return found


def _labels_of(value: Any) -> str | tuple[int, ...] | None:
    """An inventory row's ``mask_labels`` (pandas stores a column of None as NaN)."""
    return value if isinstance(value, (str, tuple, list)) else None


def read_inventory_pair(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The image and the 0/1 mask of one inventory row, read as training reads them."""
    return ku.read_image(row["image"]), ku.read_mask(row["mask"], _labels_of(row["mask_labels"]))


def mask_heatmap(table: pd.DataFrame, size: int = 64) -> np.ndarray:
    """Share of masks covering each position of the normalised (resized) image, ``size`` x ``size``."""
    ok = table[table["status"] == "ok"]
    total = np.zeros((size, size), np.float64)
    for path, labels in zip(ok["mask"], ok["mask_labels"]):
        mask = ku.read_mask(path, _labels_of(labels)).astype(np.float32)
        total += cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return total / max(1, len(ok))


def intensity_histograms(table: pd.DataFrame, per_source: int = 12, seed: int = 0) -> pd.DataFrame:
    """Gray-level histograms after conversion to uint8, from up to ``per_source`` random images of
    each source: one column per source, one row per gray level, each column summing to 1."""
    ok = table[table["status"] == "ok"]
    rng = np.random.default_rng(seed)
    hists = {}
    for source, part in ok.groupby("source"):
        paths = part["image"].to_numpy()
        counts = np.zeros(256)
        for path in rng.choice(paths, size=min(per_source, len(paths)), replace=False):
            counts += np.bincount(ku.read_image(path).ravel(), minlength=256)
        hists[source] = counts / counts.sum()
    return pd.DataFrame(hists)


def show_slice_browser(table: pd.DataFrame) -> None:
    """An ipywidgets browser over the pairs: slice slider, overlay on/off, opacity.

    The first slice is always drawn as a static figure, so headless runs record a picture; the
    widget follows only in an interactive front end.
    """
    ok = table[table["status"] == "ok"].reset_index(drop=True)

    def draw(index: int = 0, overlay: bool = True, opacity: float = 0.45) -> None:
        row = ok.loc[index]
        image, mask = read_inventory_pair(row)
        shown = ku.overlay_mask(image, mask, alpha=opacity) if overlay else image
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(shown, cmap="gray")
        ax.set_title(f"{row['source']} / {row['name']}  ({row['width']}x{row['height']})", fontsize=9)
        ax.axis("off")
        plt.show()

    _static_then_widget(
        draw,
        lambda widgets: dict(
            index=widgets.IntSlider(0, 0, len(ok) - 1, description="slice"),
            overlay=widgets.Checkbox(True, description="overlay"),
            opacity=widgets.FloatSlider(value=0.45, min=0.0, max=1.0, step=0.05, description="opacity"),
        ),
    )


# =================================================================================================
# 2. Preprocessing and normalisation: notebook 02
# =================================================================================================


# ----- What the pipeline leaves out: preprocessing, other normalisations, strong augmentation ------
# Each measured no better than the pipeline's default (docs/preprocessing.md, docs/generalisation.md);
# they reach training through ``Config.input_mapping`` (:func:`input_mapping_name`) and
# ``make_datasets``' ``transform`` (:func:`train_transform`).

# Preprocessing: a base method, or base methods joined by "+" applied left to right.
PREPROCESSING_METHODS = ("white_balance", "clahe", "unsharp")
PREPROCESSING_OPTIONS = ("none", "white_balance", "clahe", "unsharp", "white_balance+clahe", "clahe+unsharp")
# Per-image normalisations (:func:`normalization_stats`); "minmax" is the pipeline's.
NORMALIZATION_OPTIONS = ("minmax", "percentile", "zscore", "histeq")
AUGMENTATION_OPTIONS = ("standard", "strong")  # see :func:`train_transform`


def white_balance(
    image: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0
) -> np.ndarray:
    """Percentile stretch, the one-channel meaning of white balance ("auto levels"): the
    ``low_percentile`` value to 0, the ``high_percentile`` value to 255, clipped; a flat image is kept."""
    if not 0 <= low_percentile < high_percentile <= 100:
        raise ValueError(
            f"white_balance needs 0 <= low < high <= 100; got {low_percentile}, {high_percentile}"
        )
    lo, hi = np.percentile(image, [low_percentile, high_percentile])
    if hi <= lo:
        return image.copy()
    scaled = (image.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a 2D uint8 image."""
    if clip_limit <= 0 or tile_grid < 1:
        raise ValueError(f"clahe needs clip_limit > 0 and tile_grid >= 1; got {clip_limit}, {tile_grid}")
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid),) * 2).apply(image)


def unsharp_mask(image: np.ndarray, sigma: float = 1.0, amount: float = 1.0) -> np.ndarray:
    """Sharpen: ``image + amount * (image - gaussian_blur(image, sigma))``, clipped to 0..255."""
    if sigma <= 0 or amount < 0:
        raise ValueError(f"unsharp_mask needs sigma > 0 and amount >= 0; got {sigma}, {amount}")
    img = image.astype(np.float32)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)
    return np.clip(np.rint(img + amount * (img - blurred)), 0, 255).astype(np.uint8)


_PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {
    "white_balance": white_balance,
    "clahe": clahe,
    "unsharp": unsharp_mask,
}


def _check_preprocessing(method: Any) -> str:
    parts = method.split("+") if isinstance(method, str) else [None]
    if method != "none" and not all(part in PREPROCESSING_METHODS for part in parts):
        raise ValueError(
            f"PREPROCESSING must be one of {', '.join(map(repr, PREPROCESSING_OPTIONS))} (or methods "
            f"of {PREPROCESSING_METHODS} joined by '+'); got {method!r}."
        )
    return method


def apply_preprocessing(image: np.ndarray, method: str = "none") -> np.ndarray:
    """Apply ``"none"``, a method of :data:`PREPROCESSING_METHODS` or several joined by ``"+"`` (left
    to right) to a 2D uint8 image, with each method's defaults."""
    if _check_preprocessing(method) == "none":
        return image
    for part in method.split("+"):
        image = _PREPROCESSORS[part](image)
    return image


# Percentiles of the "percentile" and "zscore" clip (nnU-Net clips CT at 0.5 and 99.5, dataset-wide).
NORMALIZATION_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityMap:
    """A monotone piecewise-linear intensity map, ``np.interp(x, xp, fp)``: every normalisation is one."""

    xp: np.ndarray
    fp: np.ndarray

    def __call__(self, image: np.ndarray) -> np.ndarray:
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            values = np.nan_to_num(values, nan=self.xp[0], posinf=self.xp[-1], neginf=self.xp[0])
        return np.interp(values, self.xp, self.fp).astype(np.float32)


def _linear_map(low: float, high: float, offset: float, scale: float) -> IntensityMap:
    """``(clip(x, low, high) - offset) / scale`` as an :class:`IntensityMap`."""
    ends = np.array([low, high], np.float64)
    return IntensityMap(ends, (ends - offset) / scale)


def _check_normalization(method: Any) -> str:
    if method not in NORMALIZATION_OPTIONS:
        raise ValueError(
            f"NORMALIZATION must be one of {', '.join(map(repr, NORMALIZATION_OPTIONS))}; got {method!r}."
        )
    return method


def normalization_stats(image: np.ndarray, method: str = "minmax") -> IntensityMap:
    """The normalisation ``method`` of one image as an :class:`IntensityMap`, from the image's own
    intensities (non-finite values ignored): ``"minmax"`` (8-bit 0..255 to [0, 1]; other depths from
    their own minimum and maximum), ``"percentile"`` (clip to the 0.5th-99.5th percentiles, stretch
    to [0, 1]), ``"zscore"`` (the same clip, then zero mean and unit variance) or ``"histeq"`` (each
    value to the share of pixels at or below it). A constant image gives zeros (an 8-bit one keeps the
    fixed ``"minmax"`` scale)."""
    array = np.asarray(image)
    if _check_normalization(method) == "minmax" and array.dtype == np.uint8:
        return _linear_map(0.0, 255.0, 0.0, 255.0)
    values = array.astype(np.float64, copy=False).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        level = float(values[0]) if values.size else 0.0
        return IntensityMap(np.array([level]), np.array([0.0]))
    if method == "minmax":
        low, high = float(values.min()), float(values.max())
        return _linear_map(low, high, low, high - low)
    if method == "histeq":
        levels, counts = np.unique(values, return_counts=True)
        cdf = np.cumsum(counts)
        return IntensityMap(levels, (cdf - cdf[0]) / (cdf[-1] - cdf[0]))
    low, high = (float(v) for v in np.percentile(values, NORMALIZATION_PERCENTILES))
    if method == "percentile":
        return _linear_map(low, high, low, high - low if high > low else 1.0)
    clipped = np.clip(values, low, high)
    std = float(clipped.std())
    return _linear_map(low, high, float(clipped.mean()), std if std > 1e-6 * max(1.0, abs(high)) else 1.0)


def normalize_intensity(
    image: np.ndarray, method: str = "minmax", stats: IntensityMap | None = None
) -> np.ndarray:
    """Scale an image (any depth, any shape) to float32 by ``method``, with ``stats`` computed
    elsewhere (training uses those of the un-augmented image) or from ``image``."""
    return (normalization_stats(image, method) if stats is None else stats)(image)


def input_mapping_name(preprocessing: str = "none", normalization: str = "minmax") -> str:
    """The ``Config.input_mapping`` that trains (and, in notebook 04, predicts) with ``preprocessing``
    and ``normalization``, registered in ``kidneyseg_utils.INPUT_MAPPINGS``: ``"minmax"`` for neither,
    else the one that differs from the default (``"clahe"``, ``"zscore"``) or both (``"clahe/zscore"``),
    the name checkpoints of releases up to 0.2.0 read as."""
    prepare, norm = _check_preprocessing(preprocessing), _check_normalization(normalization)
    name = "/".join(v for v, d in ((prepare, "none"), (norm, "minmax")) if v != d) or "minmax"
    if name not in ku.INPUT_MAPPINGS:
        ku.INPUT_MAPPINGS[name] = ku.InputMapping(
            None if prepare == "none" else lambda image: apply_preprocessing(image, prepare),
            None if norm == "minmax" else lambda image: normalization_stats(image, norm),
        )
    return name


def _mapping_parts(name: str) -> tuple[str, str]:
    """``(preprocessing, normalization)`` of an :func:`input_mapping_name`."""
    parts = [] if name == "minmax" else name.split("/")
    normalization = parts.pop() if parts and parts[-1] in NORMALIZATION_OPTIONS else "minmax"
    return (parts[0] if parts else "none"), normalization


def register_input_mappings() -> None:
    """Register every preprocessing and normalisation combination, so that the pipeline loads and
    applies checkpoints that these studies trained (notebook 04 calls it when this script is attached)."""
    for preprocessing in PREPROCESSING_OPTIONS:
        for normalization in NORMALIZATION_OPTIONS:
            input_mapping_name(preprocessing, normalization)


def train_transform(augmentation: str = "standard") -> Any:
    """The training augmentation ``"standard"`` (the pipeline's ``build_train_transform``) or
    ``"strong"``, in the spirit of nnU-Net's 2D defaults: flips (p 0.5 each); scale 0.7-1.4, rotation
    up to 180 degrees, shift up to 10 % (p 0.6); Gaussian noise (std up to 8 % of the range, p 0.15);
    blur (sigma 0.5-1, p 0.2); brightness and contrast +-0.25 (p 0.3); low resolution (down to 0.5x
    and back, p 0.25); gamma 0.7-1.5 (p 0.3). Intensity changes touch the image only."""
    if augmentation not in AUGMENTATION_OPTIONS:
        raise ValueError(
            f"AUGMENTATION must be one of {', '.join(map(repr, AUGMENTATION_OPTIONS))}; got {augmentation!r}."
        )
    if augmentation == "standard":
        return ku.build_train_transform()
    A = ku._albumentations()
    return A.Compose(
        ku._geometry(flip_p=0.5, shift=0.1, scale=(0.7, 1.4), rotate=180, p=0.6)
        + [
            A.GaussNoise(std_range=(0.0, 0.08), p=0.15),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.5, 1.0), p=0.2),
            A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.3),
            A.Downscale(
                scale_range=(0.5, 1.0),
                interpolation_pair={"downscale": cv2.INTER_NEAREST, "upscale": cv2.INTER_CUBIC},
                p=0.25,
            ),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
        ]
    )


# ----- Measurements ------------------------------------------------------------------------------


def contrast_metrics(image: np.ndarray, mask: np.ndarray, ring: int = 5) -> tuple[float, float]:
    """Contrast-to-noise ratio between kidney and a ring of surrounding tissue, and edge strength.

    ``cnr = |mean(kidney) - mean(ring)| / sqrt((var(kidney) + var(ring)) / 2)``, with the ring the
    ``ring``-pixel band just outside the mask; ``edge`` is the mean Sobel gradient magnitude on the
    mask's outline (grey levels per pixel). Both are NaN for a mask without kidney.
    """
    m = mask.astype(bool)
    if not m.any():
        return float("nan"), float("nan")
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
    band = cv2.dilate(m.astype(np.uint8), kernel).astype(bool) & ~m
    img = image.astype(np.float32)
    inside, around = img[m], img[band]
    if around.size == 0:
        return float("nan"), float("nan")
    noise = math.sqrt((inside.var() + around.var()) / 2) + 1e-6
    cnr = abs(float(inside.mean()) - float(around.mean())) / noise
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3) / 8
    edge = float(np.hypot(gx, gy)[ku._boundary(m)].mean())
    return cnr, edge


PREPROCESSING_SWEEP: tuple[tuple[str, dict[str, float]], ...] = (
    ("none", {}),
    ("white_balance", {"low_percentile": 1.0, "high_percentile": 99.0}),
    ("white_balance", {"low_percentile": 5.0, "high_percentile": 95.0}),
    ("clahe", {"clip_limit": 1.0, "tile_grid": 8}),
    ("clahe", {"clip_limit": 2.0, "tile_grid": 8}),
    ("clahe", {"clip_limit": 4.0, "tile_grid": 8}),
    ("clahe", {"clip_limit": 2.0, "tile_grid": 4}),
    ("unsharp", {"sigma": 1.0, "amount": 0.5}),
    ("unsharp", {"sigma": 1.0, "amount": 1.0}),
    ("unsharp", {"sigma": 2.0, "amount": 1.0}),
)


def partial_preprocessor(method: str, **params: float) -> Callable[[np.ndarray], np.ndarray]:
    """The base preprocessing ``method`` with ``params`` bound (for sweeps and sliders)."""
    if method not in _PREPROCESSORS:
        raise ValueError(f"unknown preprocessing method {method!r}; choose from {PREPROCESSING_METHODS}")
    fn = _PREPROCESSORS[method]
    return lambda image: fn(image, **params)


def preprocessing_effects(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    sources: Sequence[str],
    sweep: Sequence[tuple[str, dict[str, float]]] = PREPROCESSING_SWEEP,
) -> pd.DataFrame:
    """Mean CNR and edge strength (:func:`contrast_metrics`) per method, parameters and source, over
    slices that contain kidney; ``cnr_gain`` and ``edge_gain`` are ratios to no preprocessing."""
    rows = []
    for method, params in sweep:
        fn = (lambda x: x) if method == "none" else partial_preprocessor(method, **params)
        for image, mask, source in zip(images, masks, sources):
            if not mask.any():
                continue
            shown = ", ".join(f"{k}={v:g}" for k, v in params.items()) or "-"
            rows.append((method, shown, source, *contrast_metrics(fn(image), mask)))
    table = (
        pd.DataFrame(rows, columns=["method", "params", "source", "cnr", "edge"])
        .groupby(["method", "params", "source"], sort=False)
        .mean()
        .reset_index()
    )
    base = table[table["method"] == "none"].set_index("source")
    table["cnr_gain"] = table["cnr"] / table["source"].map(base["cnr"])
    table["edge_gain"] = table["edge"] / table["source"].map(base["edge"])
    return table


def normalization_consistency(
    data_dir: str | os.PathLike,
    methods: Sequence[str] = NORMALIZATION_OPTIONS,
    image_size: int = 128,
    preprocessing: str = "none",
    ring: int = 5,
    mask_labels: str | Sequence[int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How alike kidneys look across sources after each normalisation (no training needed).

    For every slice with kidney, the model input is normalised and the median intensity of the
    kidney and of a ``ring``-pixel band around it are taken; per source, the medians over its slices.
    A normalisation that makes sources alike keeps the kidney level steady across sources relative
    to the kidney-to-surroundings contrast the network has to find.

    Returns:
        ``(per_source, summary)``: per (method, source), the kidney and surroundings levels and their
        difference; per method, ``spread`` = standard deviation of the kidney level over sources
        divided by the mean absolute contrast (lower is more consistent), and the ``preprocessing``
        the inputs had (pass the run's, so that these are the inputs it trains on).
    """
    pairs = ku.index_dataset(data_dir, mask_labels=mask_labels).pairs
    cache = ku.load_arrays(pairs, image_size, input_mapping_name(preprocessing))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
    rows = []
    for pair, image, mask in zip(cache.pairs, cache.images, cache.masks):
        if not mask.any():
            continue
        band = cv2.dilate(mask, kernel).astype(bool) & ~mask.astype(bool)
        for method in methods:
            values = normalize_intensity(image, method)
            kidney, around = float(np.median(values[mask > 0])), float(np.median(values[band]))
            rows.append({"method": method, "source": pair.source, "kidney": kidney, "surroundings": around})
    per_source = pd.DataFrame(rows).groupby(["method", "source"], sort=False).median().reset_index()
    per_source["contrast"] = per_source["kidney"] - per_source["surroundings"]
    summary = per_source.groupby("method", sort=False).agg(
        kidney_sd=("kidney", "std"), mean_abs_contrast=("contrast", lambda c: float(np.abs(c).mean()))
    )
    summary["spread"] = summary["kidney_sd"] / summary["mean_abs_contrast"]
    summary["preprocessing"] = preprocessing
    return per_source, summary.reset_index()


def sample_slices_with_kidney(
    pairs: Sequence[ku.SamplePair], per_source: int, seed: int
) -> list[ku.SamplePair]:
    """Up to ``per_source`` pairs whose mask holds kidney from every source, drawn at random with
    ``seed`` (the same draw every run), in source and file order."""
    rng = np.random.default_rng(seed)
    sample: list[ku.SamplePair] = []
    for source in sorted({p.source for p in pairs}):
        candidates = [p for p in pairs if p.source == source and ku.load_pair(p)[1].any()]
        picks = rng.choice(len(candidates), size=min(per_source, len(candidates)), replace=False)
        sample += [candidates[i] for i in sorted(picks)]
    return sample


def write_preprocessing_results(
    ablation: pd.DataFrame, effects: pd.DataFrame, output_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write notebook 02's tables: ``preprocessing_results.csv`` (the training ablation) and
    ``preprocessing_effects.csv`` (the measured effects); returns their paths."""
    out = Path(output_dir)
    return {
        "ablation_csv": ku._atomic_write(out / "preprocessing_results.csv", ablation.to_csv(index=False)),
        "effects_csv": ku._atomic_write(out / "preprocessing_effects.csv", effects.to_csv(index=False)),
    }


def recommend_preprocessing(ablation: pd.DataFrame, margin: float = 0.01) -> tuple[str, str]:
    """The option to use and why: the best validation Dice, unless it beats ``"none"`` by less than
    ``margin`` (then the simpler ``"none"``, since the gain is within run-to-run noise)."""
    table = ablation.set_index("preprocessing")
    best = str(table["val_dice"].idxmax())
    if "none" in table.index and best != "none":
        gain = table.loc[best, "val_dice"] - table.loc["none", "val_dice"]
        if gain < margin:
            return "none", (
                f"'{best}' beats no preprocessing by only {gain:+.3f} validation Dice (< {margin}); "
                "keep none, the pipeline's input."
            )
        return (
            best,
            f"'{best}' beats no preprocessing by {gain:+.3f} validation Dice; train with "
            f"INPUT_MAPPING=ks.input_mapping_name({best!r}).",
        )
    return best, f"'{best}' has the best validation Dice ({table.loc[best, 'val_dice']:.3f})."


def preprocessing_ablation(
    config: ku.Config,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: Sequence[str] = ("none", "white_balance", "clahe", "unsharp", "white_balance+clahe"),
    device: torch.device | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Train one model per preprocessing option at an equal budget and compare validation Dice.

    Every option uses the same config (seed, split, epochs, augmentation) except the input mapping;
    each run goes to ``output_dir/<option>`` (replaced if present: these are scratch runs).

    Returns:
        One row per option: best validation loss and its epoch, pooled validation Dice and IoU at
        that epoch, the best Dice of any epoch, and the seconds spent.
    """
    rows = []
    for option in options:
        run_config = config.with_parameters(INPUT_MAPPING=input_mapping_name(option))
        data = ku.prepare_data(run_config, data_dir)
        run_config = data.config
        tic = time.monotonic()
        model, folder = ku.build_model(run_config), Path(output_dir) / option.replace("+", "_")
        datasets, fresh = (data.train_dataset, data.val_dataset), dict(overwrite=True, progress=progress)
        result = ku.train_model(model, *datasets, run_config, folder, device, **fresh)
        row = dict(preprocessing=option, best_epoch=result.best_epoch, val_loss=result.best_val_loss)
        row.update(val_dice=result.best_row["val_dice"], val_iou=result.best_row["val_iou"])
        row.update(max_val_dice=float(result.history["val_dice"].max()), epochs=len(result.history))
        rows.append({**row, "seconds": time.monotonic() - tic})
    return pd.DataFrame(rows)


def show_preprocessing_sliders(image: np.ndarray, mask: np.ndarray) -> None:
    """ipywidgets sliders to tune CLAHE, the percentile stretch and unsharp masking on one slice.

    A static figure with the default settings is drawn first (headless runs keep it)."""

    def draw(clip_limit=2.0, tile_grid=8, low=1.0, high=99.0, sigma=1.0, amount=1.0) -> None:
        outs = {"original": image, "white balance": white_balance(image, low, high)}
        outs.update(
            {"CLAHE": clahe(image, clip_limit, tile_grid), "unsharp": unsharp_mask(image, sigma, amount)}
        )
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
        for ax, (name, out) in zip(axes, outs.items()):
            cnr, edge = contrast_metrics(out, mask)
            ax.imshow(out, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}\nCNR {cnr:.2f}  edge {edge:.1f}", fontsize=9)
            ax.axis("off")
        plt.show()

    _static_then_widget(
        draw,
        lambda widgets: dict(
            clip_limit=widgets.FloatSlider(value=2.0, min=0.5, max=8.0, step=0.5),
            tile_grid=widgets.IntSlider(value=8, min=2, max=16),
            low=widgets.FloatSlider(value=1.0, min=0, max=20),
            high=widgets.FloatSlider(value=99.0, min=80, max=100),
            sigma=widgets.FloatSlider(value=1.0, min=0.5, max=5),
            amount=widgets.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.1),
        ),
    )


# =================================================================================================
# 3. Evaluation figures: notebook 04
# =================================================================================================


def _out_of_fold_probabilities(
    models: Sequence[nn.Module], val: ku.SplitEvaluation, device: torch.device | str, tta: bool
) -> tuple[list[np.ndarray], float]:
    """Each out-of-fold image's probabilities from its own fold's model (in ``val``'s order)."""
    probs: list[np.ndarray] = [np.empty(0)] * len(val.data)
    total_ms = 0.0
    for model, fold in zip(models, dict.fromkeys(val.scores["fold"])):  # folds in models order
        rows = np.flatnonzero(val.scores["fold"].to_numpy() == fold)
        picked = {
            name: [getattr(val.data, name)[i] for i in rows] for name in ("pairs", "masks", "originals")
        }
        part = dataclasses.replace(val.data, images=val.data.images[rows], **picked)
        fold_probs, ms = ku._timed_probabilities(model, part, device, tta)
        for i, prob in zip(rows, fold_probs):
            probs[i] = prob
        total_ms += ms * len(rows)
    return probs, total_ms / max(1, len(val.data))


def inference_options_table(
    model: nn.Module | Sequence[nn.Module],
    data: ku.EvaluationSet | ku.SplitEvaluation,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Pooled and mean Dice, mean HD95 and milliseconds per slice with and without TTA and
    postprocessing, so what each option buys and costs is visible side by side. Given the fold
    models and the out-of-fold evaluation (:func:`evaluate_validation`), each image is predicted by
    its own fold's model, never by one that trained on it."""
    folds = isinstance(data, ku.SplitEvaluation) and data.part == "oof"
    images = data.data if isinstance(data, ku.SplitEvaluation) else data
    rows = []
    for tta in (False, True):
        if folds:
            probs, ms = _out_of_fold_probabilities(model, data, device, tta)
        else:
            single = model if isinstance(model, nn.Module) else model[0]
            probs, ms = ku._timed_probabilities(single, images, device, tta)
        for post in (False, True):
            tic = time.perf_counter()
            summary = ku.summarize_scores(ku.score_predictions(images, probs, threshold, post))
            post_ms = (time.perf_counter() - tic) * 1000 / max(1, len(images)) if post else 0.0
            scores = {key: summary[key] for key in ("pooled_dice", "mean_dice", "mean_hd95")}
            rows.append({"tta": tta, "postprocess": post, **scores, "ms_per_slice": ms + post_ms})
    return pd.DataFrame(rows)


REPORTED_KEYS = tuple(
    "n_images n_cases pooled_dice mean_dice mean_case_dice std_case_dice pooled_iou mean_hd95 median_hd95 "
    "ms_per_slice".split()
)


def summary_table(evaluations: Mapping[str, dict[str, Any] | None]) -> pd.DataFrame:
    """The key figures of several summaries side by side, one column per labelled summary."""
    return pd.DataFrame({name: {k: s.get(k) for k in REPORTED_KEYS} for name, s in evaluations.items() if s})


def threshold_sweep(
    data: ku.EvaluationSet,
    probs: Sequence[np.ndarray],
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
) -> pd.DataFrame:
    """Pooled Dice and mean Dice against the threshold (no postprocessing); the best row is marked.

    Run it on the validation split only: a threshold chosen on the test images would flatter them.
    """
    rows = []
    for threshold in thresholds:
        counts = [ku.confusion_counts(prob > threshold, mask) for prob, mask in zip(probs, data.masks)]
        pooled = sum(counts, ku.ConfusionCounts()).metrics()["dice"]
        rows.append((float(threshold), pooled, float(np.mean([c.metrics()["dice"] for c in counts]))))
    table = pd.DataFrame(rows, columns=["threshold", "pooled_dice", "mean_dice"])
    table["best"] = table["pooled_dice"] == table["pooled_dice"].max()
    return table


def fold_comparison(
    models: Sequence[nn.Module],
    data: ku.EvaluationSet,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    tta: bool = False,
    postprocess: bool = False,
    fold_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Each fold model alone on ``data``, their mean and their ensemble (notebook 04 on the test
    split, and the cross-validation benchmark): pooled Dice and IoU and the mean Dice per patient."""
    keys = ("pooled_dice", "pooled_iou", "mean_case_dice")
    rows = []
    for k, model in enumerate([*models, ku.FoldEnsemble(models)]):
        _, summary, _ = ku.evaluate_model(model, data, device, threshold, tta=tta, postprocess=postprocess)
        name = f"fold {(fold_ids or range(len(models)))[k]}" if k < len(models) else "ensemble"
        rows.append({"model": name, **{key: summary[key] for key in keys}})
    table = pd.DataFrame(rows)
    mean = {"model": "mean single fold", **table.iloc[: len(models)][list(keys)].mean().to_dict()}
    return pd.concat([table.iloc[:-1], pd.DataFrame([mean]), table.iloc[-1:]], ignore_index=True)


def _pooled(part: pd.DataFrame) -> dict[str, Any]:
    """Slices, pooled Dice and IoU, and mean Dice of some rows of per-image scores."""
    metrics = ku.metrics_from_counts(*(int(part[c].sum()) for c in ("tp", "fp", "fn")))
    pooled = dict(pooled_dice=metrics["dice"], pooled_iou=metrics["iou"])
    return dict(slices=len(part), **pooled, mean_dice=part["dice"].mean())


def error_views(per_image: pd.DataFrame, size_bins: int = 4, position_bins: int = 5) -> dict[str, Any]:
    """Where a model's errors are, from per-image scores (``kidneyseg_utils.score_predictions``).

    Returns:
        ``by_size``: the slices with kidney in ``size_bins`` quantile bins of their true kidney area
        as a percentage of the image (comparable across sources of other resolutions; the poles are
        the small ones): the range, the median area in pixels, slices, pooled Dice and IoU, mean
        Dice. ``by_position``: every slice in ``position_bins`` equal bins of its relative
        position among its patient's slices (0: the first, 1: the last), read from a trailing slice
        number in the name (``case7_012``), with the slices with kidney; None when no patient has two
        numbered slices. ``false_kidney``: the false-positive pixels on kidney-free slices, their
        share of all false-positive pixels, and how many kidney-free slices got any kidney.
    """
    with_kidney = per_image[per_image["true_area"] > 0]
    share = 100 * with_kidney["true_area"] / (with_kidney["height"] * with_kidney["width"])
    bins = pd.qcut(share, q=size_bins, duplicates="drop") if len(with_kidney) else share
    by_size = pd.DataFrame(
        {"kidney_percent_of_image": f"{part.min():.2g}-{part.max():.2g}"}
        | {"median_area_px": float(with_kidney.loc[part.index, "true_area"].median())}
        | _pooled(with_kidney.loc[part.index])
        for _, part in share.groupby(bins, observed=True)
    )
    number = per_image["name"].astype(str).str.extract(r"(\d+)$")[0].astype(float)
    numbered = per_image.assign(number=number).dropna(subset=["number"])
    patient = numbered["source"].astype(str) + "/" + numbered["case"].astype(str)
    rank = numbered.groupby(patient)["number"].rank(method="first") - 1
    count = numbered.groupby(patient)["number"].transform("size")
    numbered = numbered.assign(position=rank / (count - 1).where(count > 1))
    numbered = numbered.dropna(subset=["position"])
    by_position = None
    if len(numbered):
        edges = np.linspace(0, 1, position_bins + 1)
        labels = [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:])]
        groups = pd.cut(numbered["position"], edges, labels=labels, include_lowest=True)
        by_position = pd.DataFrame(
            [
                {"position": label, "with_kidney": int((part["true_area"] > 0).sum()), **_pooled(part)}
                for label, part in numbered.groupby(groups, observed=True)
            ]
        )
    free, total_fp = per_image[per_image["true_area"] == 0], int(per_image["fp"].sum())
    false_kidney = dict(kidney_free_slices=len(free), with_false_kidney=int((free["fp"] > 0).sum()))
    false_kidney.update(false_positive_px=int(free["fp"].sum()))
    false_kidney.update(share_of_false_positive_px=float(free["fp"].sum() / total_fp) if total_fp else 0.0)
    return {"by_size": by_size, "by_position": by_position, "false_kidney": false_kidney}


ERROR_COLORS = {"tp": (40, 200, 60), "fp": (230, 40, 40), "fn": (40, 110, 255)}


def error_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB picture of a gray image with true positives green, false positives red, false negatives
    blue (:data:`ERROR_COLORS`)."""
    p, t = pred.astype(bool), target.astype(bool)
    out = image
    for region, key in ((p & t, "tp"), (p & ~t, "fp"), (~p & t, "fn")):  # disjoint: one blend each
        out = ku.overlay_mask(out, region, ERROR_COLORS[key], alpha, contour=False)
    return out


def plot_cases(
    data: ku.EvaluationSet,
    probs: Sequence[np.ndarray],
    per_image: pd.DataFrame,
    threshold: float = 0.5,
    postprocess: bool = False,
    per_group: int = 3,
) -> Any:
    """The worst cases by Dice, and the median and best among slices with kidney (``per_group`` of
    each), with TP/FP/FN colours."""
    from matplotlib.patches import Patch

    order = per_image.sort_values("dice", kind="stable").index.to_numpy()
    # median and best among slices with kidney (an empty slice predicted empty is trivially perfect)
    with_kidney = per_image[per_image["true_area"] > 0]
    ranked = with_kidney.sort_values("dice", kind="stable").index.to_numpy() if len(with_kidney) else order
    mid = len(ranked) // 2
    groups = {
        "worst": order[:per_group],
        "median": ranked[max(0, mid - per_group // 2) :][:per_group],
        "best": ranked[::-1][:per_group],
    }
    fig, axes = plt.subplots(3, per_group, figsize=(3.4 * per_group, 10.5), squeeze=False)
    for row, (label, picks) in enumerate(groups.items()):
        for col in range(per_group):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(picks):
                continue
            i = int(picks[col])
            pred = ku.binarize_prediction(probs[i], threshold, postprocess)
            ax.imshow(error_overlay(data.originals[i], pred, data.masks[i]))
            r = per_image.loc[i]
            ax.set_title(
                f"{label}: {r['name'][:28]}\nDice {r['dice']:.3f}  HD95 {r['hd95']:.1f}px", fontsize=8
            )
    handles = [Patch(color=np.asarray(c) / 255, label=k.upper()) for k, c in ERROR_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def show_threshold_viewer(
    data: ku.EvaluationSet, probs: Sequence[np.ndarray], threshold: float = 0.5, label: str = ""
) -> None:
    """An ipywidgets viewer (slice and threshold sliders) over TP/FP/FN overlays; ``label`` names the
    split in every title (thresholds are chosen on validation, never on test).

    A static figure of the first slice at ``threshold`` is always drawn first, so a headless run
    (papermill, nbval) records a picture; the widget follows only in an interactive front end.
    """

    def draw(index: int = 0, thr: float = threshold) -> None:
        pred = ku.binarize_prediction(probs[index], thr)
        counts = ku.confusion_counts(pred, data.masks[index])
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(error_overlay(data.originals[index], pred, data.masks[index]))
        ax.set_title(
            f"{label + ': ' if label else ''}{data.pairs[index].name}  threshold {thr:.2f}  "
            f"Dice {counts.metrics()['dice']:.3f}",
            fontsize=9,
        )
        ax.axis("off")
        plt.show()

    _static_then_widget(
        draw,
        lambda widgets: dict(
            index=widgets.IntSlider(0, 0, len(data) - 1, description="slice"),
            thr=widgets.FloatSlider(value=threshold, min=0.05, max=0.95, step=0.05, description="threshold"),
        ),
    )


# =================================================================================================
# 4. Familiarity: does a new image look like anything the model was trained on? (notebook 04)
# =================================================================================================

FAMILIARITY_FEATURES = (
    *(f"p{q:02d}" for q in (1, 5, 25, 50, 75, 95, 99)),
    *("mean", "std", "dark_share", "bright_share", "gradient", "laplacian_std"),
)
FAMILIARITY_NEIGHBOURS = 5
FAMILIARITY_MARGIN = 1.0  # x the 99th percentile: about 1 in 100 images like the training ones is flagged


def image_features(image: np.ndarray) -> np.ndarray:
    """Intensity and texture statistics of one uint8 model input (:data:`FAMILIARITY_FEATURES`):
    grey-level percentiles, mean and spread, the shares of near-black and near-white pixels, the mean
    gradient magnitude (edges) and the spread of the Laplacian (fine texture and noise)."""
    x = np.asarray(image, np.float32)
    gx, gy = cv2.Sobel(x, cv2.CV_32F, 1, 0), cv2.Sobel(x, cv2.CV_32F, 0, 1)
    shares = ((x < 10).mean() * 100, (x > 245).mean() * 100)
    texture = (np.hypot(gx, gy).mean(), cv2.Laplacian(x, cv2.CV_32F).std())
    return np.array(
        [*np.percentile(x, (1, 5, 25, 50, 75, 95, 99)), x.mean(), x.std(), *shares, *texture], np.float32
    )


FAMILIARITY_WORKING_MB = 64  # scikit-learn's working memory for the neighbour search (chunks)


def _neighbour_distance(z: np.ndarray, reference: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    """Mean Euclidean distance of each row of ``z`` to its nearest rows of ``reference``, searched in
    chunks of :data:`FAMILIARITY_WORKING_MB` (memory linear in the rows, not quadratic). With
    ``leave_one_out``, ``z`` is ``reference`` and no row is its own neighbour."""
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    k = min(FAMILIARITY_NEIGHBOURS, reference.shape[0] - int(leave_one_out))
    with sklearn.config_context(working_memory=FAMILIARITY_WORKING_MB):
        search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(np.asarray(reference, np.float64))
        distances, _ = search.kneighbors(None if leave_one_out else np.asarray(z, np.float64))
    return distances.mean(1)


def familiarity_reference(images: np.ndarray) -> dict[str, Any]:
    """What :func:`familiarity` compares new images with: the training images' statistics.

    Each feature is standardised over the training images (spread at least one unit); an image's
    distance is its mean distance to its five nearest training images in that space, so a training
    set of several scanners is several clusters, not one average. The threshold is
    :data:`FAMILIARITY_MARGIN` times the 99th percentile of the training images' own distances (each
    to the others). Plain types (JSON-ready).

    Args:
        images: ``(N, S, S)`` uint8 training inputs (``PreparedData.train.images``); N >= 2.
    """
    if len(images) < 2:
        raise ValueError("familiarity_reference needs at least two training images.")
    features = np.stack([image_features(im) for im in images])
    # Floor of one unit (a grey level, a percentage point): a feature that barely varies in training
    # must not turn a one-level difference into a large distance.
    center, scale = features.mean(0), np.maximum(features.std(0), 1.0)
    z = (features - center) / scale
    own = _neighbour_distance(z, z, leave_one_out=True)
    threshold = float(FAMILIARITY_MARGIN * np.percentile(own, 99))
    reference = dict(features=list(FAMILIARITY_FEATURES), center=center.tolist(), scale=scale.tolist())
    return {**reference, "reference": z.round(4).tolist(), "threshold": threshold}


def familiarity(images: np.ndarray, reference: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """Flag images unlike anything the model was trained on, before trusting their predictions.

    Args:
        images: ``(N, S, S)`` uint8 model inputs (resized and preprocessed as in training).
        reference: :func:`familiarity_reference` (or :func:`training_reference`) of the training
            images; None returns None.

    Returns:
        One row per image: ``novelty`` (its distance over the threshold: above 1 is farther from
        the training images than almost any training image is from the others) and ``unfamiliar``.
    """
    if not reference:
        return None
    if list(reference["features"]) != list(FAMILIARITY_FEATURES):
        raise ValueError("This familiarity reference comes from another kidneyseg version; compute it again.")
    features = np.stack([image_features(im) for im in images])
    z = (features - np.asarray(reference["center"])) / np.asarray(reference["scale"])
    novelty = _neighbour_distance(z, np.asarray(reference["reference"], np.float32)) / reference["threshold"]
    return pd.DataFrame({"novelty": novelty, "unfamiliar": novelty > 1.0})


def training_reference(
    checkpoints: Sequence[Mapping[str, Any]], config: ku.Config, data_dir: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """:func:`familiarity_reference` of the images the model (or the fold models) trained on, read
    again from the data root the checkpoints record (or ``data_dir``): the union of their training
    splits, as model inputs. None, with the reason printed, when those files are not readable here.

    Args:
        checkpoints: As returned by ``kidneyseg_utils.load_model`` / ``load_models``.
        config: The run's config (image size, input mapping, the patient-id rule).
        data_dir: The data root; by default the one recorded at training time.
    """
    pairs: dict[str, ku.SamplePair] = {}
    try:
        for checkpoint in checkpoints:
            pairs.update((p.key, p) for p in ku.checkpoint_split(dict(checkpoint), config, "train", data_dir))
    except (ValueError, FileNotFoundError) as exc:
        print(f"No familiarity check: the training images are not readable here. {exc}")
        return None
    if len(pairs) < 2:
        print("No familiarity check: the checkpoints record fewer than two training images.")
        return None
    cache = ku.load_arrays(list(pairs.values()), config.image_size, config.input_mapping, progress=False)
    return familiarity_reference(cache.images)


def familiarity_report(
    per_image: pd.DataFrame, images: np.ndarray, reference: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per-image scores with the familiarity flag beside them, and Dice by flag, so a user sees
    whether the flag predicts failure. None (with a printed reason) without a reference.

    Args:
        per_image: :func:`score_predictions` of ``images``, in the same order.
        images: The model inputs that were scored (``EvaluationSet.images``).
        reference: :func:`training_reference` of the model.
    """
    flags = familiarity(images, reference)
    if flags is None:
        print("No familiarity check: there are no training images to compare with.")
        return None
    table = pd.concat([per_image.reset_index(drop=True), flags], axis=1)
    by_flag = table.groupby("unfamiliar").agg(
        images=("dice", "size"), mean_dice=("dice", "mean"), median_novelty=("novelty", "median")
    )
    for flag, part in table.groupby("unfamiliar"):
        by_flag.loc[flag, "pooled_dice"] = ku.metrics_from_counts(
            part.tp.sum(), part.fp.sum(), part.fn.sum()
        )["dice"]
    return table, by_flag.reset_index()


def unfamiliar_note(table: pd.DataFrame, name_column: str = "name") -> str:
    """One sentence on how many images :func:`familiarity` flagged, naming the first few."""
    if "unfamiliar" not in table:
        return "No familiarity check: there are no training images to compare with."
    checked = table[table["unfamiliar"].notna()]
    flagged = checked.loc[checked["unfamiliar"].eq(True), name_column].astype(str).tolist()
    if not flagged:
        return f"None of the {len(checked)} images looks unlike the training images."
    names = ", ".join(flagged[:5]) + (", ..." if len(flagged) > 5 else "")
    return (
        f"{len(flagged)} of {len(checked)} images look unlike anything the model was trained on "
        f"(novelty > 1): {names}. Check their masks before using them."
    )


# =================================================================================================
# 5. Training hooks: intensity randomisation (notebook 05), sampling and the peer networks
# =================================================================================================

# AUGMENTATION values of notebook 05's variants that add a batch intensity randomisation to the
# pipeline's "standard" augmentation ("strong" for "strong+gin"); measured no better than "standard"
# on unseen sources (docs/generalisation.md), so they are study options, not Config options.
INTENSITY_VARIANTS = ("gin", "curves", "strong+gin")


def random_intensity_curves(
    images: torch.Tensor, generator: torch.Generator, points: int = 6
) -> torch.Tensor:
    """Pass each image through its own random look-up table, drawn as ``points`` control values
    joined linearly over the image's own intensity range: increasing (a new window or gamma),
    decreasing (an inverted contrast) or neither (a non-monotone mapping), a third each.

    Shape: ``(B, 1, H, W) -> (B, 1, H, W)``; values stay within each image's own minimum and maximum.
    """
    b = images.shape[0]
    flat = images.flatten(1).float()
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = (high - low).clamp_min(1e-6)
    control = torch.rand(b, points, generator=generator)
    kind = torch.randint(0, 3, (b, 1), generator=generator)
    rising = control.sort(1).values
    control = torch.where(kind == 0, rising, torch.where(kind == 1, rising.flip(1), control))
    control = control.to(images.device)
    position = (flat - low) / span * (points - 1)
    index = position.floor().long().clamp(0, points - 2)
    weight = position - index
    mapped = control.gather(1, index) * (1 - weight) + control.gather(1, index + 1) * weight
    return (low + mapped * span).view_as(images).to(images.dtype)


def gin_augment(
    images: torch.Tensor, generator: torch.Generator, channels: int = 2, layers: int = 4
) -> torch.Tensor:
    """Global intensity non-linear augmentation (GIN; Ouyang et al., IEEE TMI 2022).

    Every image passes through its own shallow network with freshly drawn weights (per layer a 1x1
    or 3x3 convolution, standard-normal weights and biases, leaky ReLU 0.2 between layers; a grouped
    convolution runs the whole batch at once), is rescaled to the image's own mean and standard
    deviation, and is blended with the image by a uniform random weight. Texture and shape survive;
    the mapping from tissue to grey level is new each time.

    Shape: ``(B, 1, H, W) -> (B, 1, H, W)``.
    """
    b, _, h, w = images.shape
    x = images.float().reshape(1, b, h, w)
    c_in = 1
    for layer in range(layers):
        c_out = 1 if layer == layers - 1 else channels
        k = int(torch.randint(0, 2, (1,), generator=generator)) * 2 + 1
        weight = torch.randn(b * c_out, c_in, k, k, generator=generator).to(x.device)
        bias = torch.randn(b * c_out, generator=generator).to(x.device)
        x = F.conv2d(x, weight, bias, padding=k // 2, groups=b)
        if layer < layers - 1:
            x = F.leaky_relu(x, 0.2)
        c_in = c_out
    out = x.reshape(b, 1, h, w)
    ref = images.float()
    dims = (1, 2, 3)
    out = (out - out.mean(dims, keepdim=True)) / out.std(dims, keepdim=True).clamp_min(1e-6)
    out = out * ref.std(dims, keepdim=True) + ref.mean(dims, keepdim=True)
    alpha = torch.rand(b, 1, 1, 1, generator=generator).to(x.device)
    return (alpha * out + (1 - alpha) * ref).to(images.dtype)


class BatchIntensityAugmentation:
    """The batch intensity randomisation of the variants ``"gin"``, ``"curves"`` and ``"strong+gin"``
    (:data:`INTENSITY_VARIANTS`), a ``batch_transform`` for ``kidneyseg_utils.train_model``: applied
    in torch to normalised training batches on the training device.

    ``"gin"``: :func:`gin_augment` on every image (its random blend weight keeps some close to the
    original). ``"curves"``: :func:`random_intensity_curves` on each image with probability 0.5.
    ``"strong+gin"``: each image gets one of the two, at random. Draws come from ``(seed, epoch,
    step)`` alone: the same draws on any device and worker count, so a resumed run on a CPU repeats
    an uninterrupted one.
    """

    def __init__(self, augmentation: str, seed: int) -> None:
        if augmentation not in INTENSITY_VARIANTS:
            raise ValueError(
                f"no batch intensity augmentation {augmentation!r}; choose one of {INTENSITY_VARIANTS}"
            )
        self.augmentation, self.seed = augmentation, seed

    def __call__(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Randomise the intensities of a ``(B, 1, H, W)`` batch (step ``step`` of ``epoch``)."""
        state = np.random.SeedSequence([self.seed, epoch, step, 0x61E]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        b = images.shape[0]
        if self.augmentation == "gin":
            return gin_augment(images, generator)
        curves = random_intensity_curves(images, generator)
        if self.augmentation == "curves":
            keep = (torch.rand(b, generator=generator) < 0.5).to(images.device)
            return torch.where(keep.view(b, 1, 1, 1), images, curves)
        gin = gin_augment(images, generator)
        use_gin = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        return torch.where(use_gin.view(b, 1, 1, 1), gin, curves)


class KidneySizeSampler(ku.EpochShuffleSampler):
    """A ``sampler`` for ``kidneyseg_utils.train_model`` that shows the small kidney cross-sections
    (the poles, where the model fails most) more often; a candidate of the cross-validation study.

    Each epoch draws ``len(masks)`` training items (masks as cached, ``(N, H, W)``) with replacement:
    a slice whose kidney area is at or below the ``small_quantile`` quantile of the areas of the slices
    with kidney weighs ``small_weight``, every other slice (kidney-free ones included) 1. As the
    ``kidneyseg_utils.EpochShuffleSampler`` it extends, it yields ``epoch * n + i`` and draws from
    ``(seed, epoch)`` alone, so each item's augmentation stays seeded and a resumed run repeats an
    uninterrupted one.
    """

    def __init__(
        self, masks: np.ndarray, seed: int, small_weight: float = 3.0, small_quantile: float = 0.25
    ) -> None:
        if not small_weight > 0 or not 0 < small_quantile <= 1:
            raise ValueError(
                f"small_weight must be > 0 and small_quantile in (0, 1]; got {small_weight}, {small_quantile}"
            )
        areas = np.asarray(masks).reshape(len(masks), -1).astype(bool).sum(axis=1)
        weights = np.ones(len(areas))
        kidney = areas > 0
        if kidney.any():
            weights[kidney & (areas <= np.quantile(areas[kidney], small_quantile))] = small_weight
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        super().__init__(len(areas), seed)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        picks = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        return iter((self.epoch * self.n + picks).tolist())


class PolySchedule(torch.optim.lr_scheduler.PolynomialLR):
    """nnU-Net's poly learning-rate schedule as an ``lr_schedule`` for ``kidneyseg_utils.train_model``
    (a candidate of the cross-validation study): torch's ``PolynomialLR`` over ``config.num_epochs``,
    ``lr = learning_rate * (1 - epoch / num_epochs) ** power``, stepped once per epoch whatever the
    validation loss, so it anneals to zero at the end of the budget."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: ku.Config, power: float = 0.9) -> None:
        super().__init__(optimizer, total_iters=config.num_epochs, power=power)

    def step(self, val_loss: float | None = None) -> None:
        """One epoch done (the validation loss plays no part)."""
        super().step()


def _monai_basic_unet(config: ku.Config) -> nn.Module:
    from monai.networks.nets import BasicUNet

    w = config.base_channels
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(w, w, 2 * w, 4 * w, 8 * w, w))


def _smp_unet_resnet34(config: ku.Config) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=1)


# The peers of docs/peers.md (random initialisation): name -> (class, build(config)).
PEERS = {
    "monai-basicunet": ("monai.networks.nets.basic_unet.BasicUNet", _monai_basic_unet),
    "smp-unet-resnet34": ("segmentation_models_pytorch.decoders.unet.model.Unet", _smp_unet_resnet34),
}


def register_peers() -> list[str]:
    """Register the peer networks with the pipeline (``kidneyseg_utils.register_architecture``), so
    that ``train_model`` trains them and notebook 04 loads their checkpoints; MONAI's ``BasicUNet``
    at the config's base width (features w, w, 2w, 4w, 8w, w) and smp's ``Unet`` with a resnet34
    encoder. Their packages are imported only when one is built. Returns the names."""
    for name, (class_name, build) in PEERS.items():
        ku.register_architecture(name, class_name, build)
    return list(PEERS)


# =================================================================================================
# 6. Leave-one-source-out: notebook 05
# =================================================================================================

LOSO_CSV_NAME = "leave_one_source_out.csv"
LOSO_FOLD_RESULT_NAME = "fold_result.json"


@dataclass
class SourceFold:
    """One fold of leave-one-source-out validation.

    Attributes:
        held_out: The source (folder under ``DATA_DIR``) that is tested and never trained on.
        train: Every pair of the other sources (split again into training and validation).
        test: Every pair of the held-out source.
    """

    held_out: str
    train: list[ku.SamplePair]
    test: list[ku.SamplePair]


def source_folds(
    pairs: Sequence[ku.SamplePair], sources: Sequence[str] | None = None, strict: bool = True
) -> list[SourceFold]:
    """One fold per source (or per listed source): train on all other sources, test on it.

    Args:
        pairs: Every pair of the data root.
        sources: The sources to hold out in turn (None: all).
        strict: With fewer than two sources, raise; if False, print why and return no fold, so that
            notebook 05 ends with that message instead of a traceback.

    Raises:
        ValueError: fewer than two sources (when ``strict``), or ``sources`` names one that is not
            there (the message lists the sources found) or names one twice.
    """
    pairs = list(pairs)
    available = sorted({p.source for p in pairs})
    if len(available) < 2:
        message = (
            f"Leave-one-source-out needs at least 2 sources (folders with images/ and masks/ under "
            f"DATA_DIR); found {available or 'none'}. Put each scanner or dataset in its own folder."
        )
        if strict:
            raise ValueError(message)
        print(message + " Nothing is trained.")
        return []
    chosen = available if sources is None else [str(s) for s in sources]
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ValueError(f"SOURCES names {unknown}, which are not sources of DATA_DIR; found {available}.")
    if len(set(chosen)) != len(chosen) or not chosen:
        raise ValueError(f"SOURCES must list distinct sources (or be None for all); got {chosen}.")
    return [
        SourceFold(s, [p for p in pairs if p.source != s], [p for p in pairs if p.source == s])
        for s in chosen
    ]


def _fold_settings(
    config: ku.Config, fold: SourceFold, intensity: str | None = None, augmentation: str = "standard"
) -> dict[str, Any]:
    settings = dict(config=config.to_dict(), augmentation=augmentation, intensity=intensity)
    return {**settings, "train": [p.key for p in fold.train], "test": [p.key for p in fold.test]}


def _subset(cache: ku.CachedArrays, pairs: Sequence[ku.SamplePair]) -> ku.CachedArrays:
    position = {p.key: i for i, p in enumerate(cache.pairs)}
    keep = [position[p.key] for p in pairs if p.key in position]
    pairs, sizes = [cache.pairs[i] for i in keep], [cache.original_sizes[i] for i in keep]
    return ku.CachedArrays(cache.images[keep], cache.masks[keep], pairs, sizes)


def run_source_fold(
    config: ku.Config,
    fold: SourceFold,
    cache: ku.CachedArrays,
    output_dir: str | os.PathLike,
    device: torch.device | None = None,
    progress: bool = False,
    data_dir: str | os.PathLike | None = None,
    intensity: str | None = None,
    extendable: Callable[[Mapping[str, Any], Mapping[str, Any], Path], bool] | None = None,
    augmentation: str = "standard",
) -> dict[str, Any]:
    """Train one fold on ``fold.train`` (patient-split again for early stopping) and score the best
    model on the held-out source at each image's original size (no TTA, no postprocessing).

    A fold whose ``fold_result.json`` in ``output_dir`` records the same settings and files is not
    retrained: its stored result is returned (``"reused": True``), so an interrupted notebook goes on
    where it stopped. Anything else in ``output_dir`` is a scratch run of this fold and is replaced,
    unless ``extendable(stored, settings, output_dir)`` says that the stored run is a shorter run of
    the same fold: then it is trained on from its last checkpoint, or kept if it stopped early.

    Args:
        config: The fold's settings (``max_train_minutes`` and ``num_epochs`` are its budget).
        fold: The fold.
        cache: Decoded arrays of (at least) every training pair, at ``config.image_size`` with
            ``config.input_mapping``.
        output_dir: The fold's folder.
        device: Compute device; chosen by :func:`get_device` when ``None``.
        progress: Show progress bars.
        data_dir: The data root, recorded in the checkpoints (so notebook 04 can reopen a fold).
        intensity: One of :data:`INTENSITY_VARIANTS` (:class:`BatchIntensityAugmentation` on the
            training batches), or None.
        extendable: The test above, given the stored ``fold_result.json``, the fold's settings and
            ``output_dir`` (``benchmarks/bench_unseen.py`` has one); None never trains a run on.
        augmentation: One of :data:`AUGMENTATION_OPTIONS` (:func:`train_transform`).

    Returns:
        The fold's row: sizes, pooled and mean test metrics, epochs and minutes.
    """
    out = Path(output_dir)
    settings = _fold_settings(config, fold, intensity, augmentation)
    result_path = out / LOSO_FOLD_RESULT_NAME
    stored = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if stored.get("settings") == settings:
        return {**stored["row"], "reused": True}
    extend = extendable is not None and extendable(stored, settings, out)
    if extend and stored["row"]["stop_reason"] == "early_stopping":
        # A longer budget would have stopped at the same epoch: the stored result is the answer.
        ku._atomic_write(
            result_path, json.dumps({"settings": settings, "row": stored["row"]}, indent=1) + "\n"
        )
        return {**stored["row"], "reused": True}
    train_pairs, val_pairs = ku.split_pairs(
        fold.train, config.val_fraction, config.seed, grouped=config.group_regex is not None
    )
    train, val = _subset(cache, train_pairs), _subset(cache, val_pairs)
    train_ds, val_ds = ku.make_datasets(train, val, config, train_transform(augmentation))
    device = device or ku.get_device()
    tic = time.monotonic()
    result = ku.train_model(
        ku.build_model(config),
        train_ds,
        val_ds,
        config,
        out,
        device,
        overwrite=True,
        resume=extend,
        extra_state={
            "split": {"train": [p.key for p in train.pairs], "val": [p.key for p in val.pairs]},
            "data_dir": "" if data_dir is None else str(data_dir),
            "held_out": fold.held_out,
            "test": settings["test"],
        },
        progress=progress,
        batch_transform=BatchIntensityAugmentation(intensity, config.seed) if intensity else None,
    )
    minutes = (time.monotonic() - tic) / 60 + (stored["row"]["train_minutes"] if extend else 0.0)
    model, _, _ = ku.load_model(out / ku.BEST_MODEL_NAME, device)
    test = ku.load_evaluation_set(fold.test, config)
    per_image, summary, _ = ku.evaluate_model(model, test, device, config.inference_threshold)
    ku.write_evaluation(per_image, summary, out)
    row = dict(held_out=fold.held_out, normalization=_mapping_parts(config.input_mapping)[1])
    row.update(augmentation=intensity or augmentation, n_train=len(train), n_val=len(val), n_test=len(test))
    row.update(n_test_cases=len({p.case for p in fold.test}), n_with_kidney=summary["n_with_kidney"])
    scores = ("pooled_dice", "pooled_iou", "mean_dice", "mean_dice_with_kidney", "mean_hd95", "median_hd95")
    row.update({name: summary[name] for name in scores})
    row.update(val_dice=float(result.best_row["val_dice"]), best_epoch=result.best_epoch)
    row.update(epochs=len(result.history), stop_reason=result.stop_reason, train_minutes=minutes)
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
    ku._atomic_write(result_path, json.dumps({"settings": settings, "row": plain}, indent=1) + "\n")
    return {**plain, "reused": False}


def variant_settings(
    config: ku.Config, variants: Mapping[str, Mapping[str, Any]]
) -> dict[str, tuple[ku.Config, str, str | None]]:
    """Each variant of notebook 05 as ``(config, augmentation, intensity)``: its notebook parameters
    applied to ``config``; ``PREPROCESSING`` and ``NORMALIZATION`` as its input mapping
    (:func:`input_mapping_name`, the others kept from ``config``); ``AUGMENTATION`` one of
    :data:`AUGMENTATION_OPTIONS` (:func:`train_transform`) or :data:`INTENSITY_VARIANTS` (a batch
    intensity randomisation on the standard augmentation, or the strong one for ``"strong+gin"``).
    A bad name or value is a ``ValueError`` that names the variant."""
    if not variants:
        raise ValueError("VARIANTS is empty; give at least one, e.g. {'standard': {}}.")
    settings = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"Variant name {name!r} must be a plain folder name (letters, digits, _ . + -).")
        overrides = dict(overrides)
        augmentation = overrides.pop("AUGMENTATION", "standard")
        intensity = augmentation if augmentation in INTENSITY_VARIANTS else None
        if intensity:
            augmentation = "strong" if intensity == "strong+gin" else "standard"
        defaults = zip(("PREPROCESSING", "NORMALIZATION"), _mapping_parts(config.input_mapping))
        parts = [overrides.pop(key, default) for key, default in defaults]
        try:
            train_transform(augmentation)
            mapping = input_mapping_name(*parts)
            overrides = {"INPUT_MAPPING": mapping, **overrides}  # a variant's own INPUT_MAPPING wins
            settings[name] = (config.with_parameters(**overrides), augmentation, intensity)
        except ValueError as exc:
            raise ValueError(f"VARIANTS[{name!r}]: {exc}") from None
    return settings


def leave_one_source_out(
    config: ku.Config,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    sources: Sequence[str] | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    extendable: Callable[[Mapping[str, Any], Mapping[str, Any], Path], bool] | None = None,
) -> pd.DataFrame:
    """Leave-one-source-out validation: for each variant and each source, train on all other sources
    and test on that one, at the same budget per fold.

    Args:
        config: Settings shared by every fold (``num_epochs`` and ``max_train_minutes`` are the
            budget per fold).
        data_dir: Data root with one folder per source.
        output_dir: Each fold runs in ``output_dir/<variant>/<source>``; the table is written to
            ``output_dir/leave_one_source_out.csv`` after every fold, so nothing is lost when a
            long run is interrupted (finished folds are reused on the next call, see
            :func:`run_source_fold`).
        sources: The sources to hold out, in order; ``None`` holds out each source in turn.
        variants: Name -> notebook parameters that differ from ``config``, with the study keys
            ``PREPROCESSING``, ``NORMALIZATION`` and ``AUGMENTATION`` (:func:`variant_settings`), e.g.
            ``{"standard": {}, "zscore+strong": {"NORMALIZATION": "zscore", "AUGMENTATION": "strong"}}``;
            ``None`` runs ``config`` alone as ``"config"``.
        device: Compute device; chosen by :func:`get_device` when ``None``.
        progress: Show progress bars.
        extendable: Passed to :func:`run_source_fold`.

    Returns:
        One row per (variant, held-out source): see :func:`run_source_fold`.

    Raises:
        ValueError: fewer than two sources, an unknown source or parameter (the message names it).
    """
    settings = variant_settings(config, {"config": {}} if variants is None else variants)
    index = ku.index_dataset(data_dir, config.group_regex, config.mask_labels)
    configs = {name: c.with_parameters(GROUP_REGEX=index.group_regex) for name, (c, _, _) in settings.items()}
    folds = source_folds(index.pairs, sources)
    out = Path(output_dir)
    device = device or ku.get_device()
    caches: dict[tuple[int, str], ku.CachedArrays] = {}
    rows = []
    for name, run_config in configs.items():
        key = (run_config.image_size, ku.input_mapping_of(run_config.input_mapping).prepare)
        if key not in caches:
            caches[key] = ku.load_arrays(
                index.pairs, run_config.image_size, run_config.input_mapping, progress=progress
            )
        for fold in folds:
            _, augmentation, intensity = settings[name]
            options = dict(data_dir=data_dir, intensity=intensity, augmentation=augmentation)
            folder = out / name / fold.held_out
            row = run_source_fold(
                run_config, fold, caches[key], folder, device, progress, extendable=extendable, **options
            )
            rows.append({"variant": name, **row})
            ku._atomic_write(out / LOSO_CSV_NAME, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def plot_intensity_draws(image: np.ndarray, augmentation: str = "gin", n: int = 12, seed: int = 0) -> Any:
    """One uint8 slice under ``n`` draws of a batch intensity augmentation (``"gin"``, ``"curves"``
    or ``"strong+gin"``), as the network sees it after ``"minmax"`` scaling; the first panel is the
    slice itself. Returns the matplotlib Figure."""
    batch = torch.from_numpy(ku.normalize_intensity(image, "minmax"))[None, None].repeat(n, 1, 1, 1)
    augment = BatchIntensityAugmentation(augmentation, seed)
    draws = [batch[0, 0].numpy()] + [augment(batch[i : i + 1], 1, i)[0, 0].numpy() for i in range(n - 1)]
    columns, rows = min(6, n), math.ceil(n / min(6, n))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows), squeeze=False)
    for k, (ax, x) in enumerate(zip(axes.flat, draws)):
        ax.imshow(x, cmap="gray")
        ax.set_title("original" if k == 0 else f"draw {k}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"AUGMENTATION={augmentation!r}: one slice, {n - 1} draws")
    fig.tight_layout()
    return fig


def fold_examples(folds: Sequence[SourceFold]) -> list[ku.SamplePair]:
    """One slice per held-out source for pictures: its first slice with kidney, or its first slice
    when none has kidney (named in a printed note)."""
    examples, without = [], []
    for fold in folds:
        with_kidney = next((p for p in fold.test if ku.load_pair(p)[1].any()), None)
        if with_kidney is None:
            without.append(fold.held_out)
        examples.append(with_kidney or fold.test[0])
    if without:
        print(f"No slice with kidney in {', '.join(without)}: its first slice is shown instead.")
    return examples


def fold_table(folds: Sequence[SourceFold]) -> pd.DataFrame:
    """One row per fold: the held-out source, its test images and patients, and what trains."""
    rows = [
        (
            f.held_out,
            len(f.train),
            len({p.source for p in f.train}),
            len(f.test),
            len({p.case for p in f.test}),
        )
        for f in folds
    ]
    return pd.DataFrame(
        rows, columns=["held_out", "train_images", "train_sources", "test_images", "test_cases"]
    )


def leave_one_source_out_files(
    output_dir: str | os.PathLike, folds: Sequence[SourceFold], variants: Mapping[str, Any]
) -> list[Path]:
    """What :func:`leave_one_source_out` wrote under ``output_dir``: the table, and per fold and
    variant the best model, its curves and the per-image test scores.

    Raises:
        FileNotFoundError: one of them is missing (the message names it).
    """
    out = Path(output_dir)
    files = [out / LOSO_CSV_NAME]
    names = (ku.BEST_MODEL_NAME, ku.METRICS_PNG_NAME, "evaluation_per_image.csv")
    files += [
        out / variant / fold.held_out / name for fold in folds for variant in variants for name in names
    ]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} expected files are missing, first {missing[0]}.")
    return files


def summarize_leave_one_source_out(
    table: pd.DataFrame, groups: Mapping[str, Sequence[str]] | None = None
) -> pd.DataFrame:
    """Per variant: the mean over held-out sources of pooled Dice, mean Dice and mean HD95, and the
    mean pooled Dice over each named group of sources (e.g. ``{"CT": [...]}``), best first."""
    summary = table.groupby("variant", sort=False).agg(
        folds=("held_out", "count"),
        pooled_dice=("pooled_dice", "mean"),
        mean_dice=("mean_dice", "mean"),
        mean_hd95=("mean_hd95", "mean"),
        worst_pooled_dice=("pooled_dice", "min"),
        train_minutes=("train_minutes", "sum"),
    )
    for group, members in (groups or {}).items():
        part = table[table["held_out"].isin(list(members))]
        summary[f"pooled_dice_{group}"] = part.groupby("variant", sort=False)["pooled_dice"].mean()
    return summary.sort_values("pooled_dice", ascending=False).reset_index()
