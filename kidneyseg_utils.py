"""kidneyseg_utils: the one module behind the kidneyseg notebooks.

Kidney segmentation in grayscale 2D medical images (CT, MRI, ultrasound) with an attention U-Net.
Every notebook cell calls a named function of this module and shows the result; the logic lives here,
where it is unit-tested. One file, because Kaggle shares code between notebooks as one utility script.

Part I, the pipeline: what a run needs, in the order data flows. Read only this part to learn how
training and prediction work.
    1. Config             -- one dataclass holding every setting, validated before any work.
    2. Reading data       -- finding image/mask pairs, reading any PNG/JPEG/TIFF/BMP by documented
                             rules, the patient id in file names, patient-grouped splits.
    3. Datasets           -- decoded arrays in memory, torch Datasets, the prepared three-way split.
    4. Intensity          -- optional preprocessing (CLAHE, white balance, unsharp mask) and the
                             scaling of model inputs, identical in training and inference.
    5. Augmentation       -- the Albumentations 2.x pipelines.
    6. Model              -- the attention U-Net (residual blocks, spatial attention).
    7. Losses and metrics -- focal + Dice loss on logits; metrics from tp/fp/fn counts.
    8. Training           -- AdamW, ReduceLROnPlateau, early stopping, AMP on CUDA, atomic
                             checkpoints, exact resume, the training curves.
    9. Inference and evaluation -- loading checkpoints safely, probabilities (with TTA), scores per
                             image, per patient and pooled, evaluation of a split, folder prediction.
   10. Runtime            -- Kaggle or not, a person watching or not; bounded searches for attached
                             data, models and interrupted runs.

Part II, the studies: what the notebooks show besides a run. Uses part I, never the other way round.
   11. Phantoms and the default dataset -- synthetic kidney phantoms and ``DATA_DIR`` resolution.
   12. Exploring a dataset -- notebook 01's inventory, warnings and figures.
   13. Preprocessing and normalisation -- notebook 02's measurements, ablation and figures.
   14. Figures of a training run and its evaluation -- notebooks 03 and 04.
   15. Leave-one-source-out -- notebook 05's folds, table and figure.

Staging for Kaggle (kernel-metadata.json, push order) lives outside this module, in
``tools/kaggle_stage.py``. Running this file as a script (as Kaggle does when it saves the utility
script) does nothing, except in a Kaggle session, where it copies itself into ``/kaggle/working``
(:func:`export_for_kaggle`): a notebook that attaches the script then finds the module in the
script's output even if Kaggle did not mark it as a utility script.

Importing the module has no side effects: no seeding, no plotting settings, no device probing.
Albumentations is imported on first use, with its network update check switched off
(``NO_ALBUMENTATIONS_UPDATE=1`` unless already set): Kaggle sessions run without internet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    import albumentations as A

# The public names, by section: what the notebooks call, and the building blocks of a custom cell.
# fmt: off
__all__ = [
    # 1. Config
    "Config", "NOTEBOOK_PARAMETERS", "PREPROCESSING_OPTIONS", "NORMALIZATION_OPTIONS",
    "AUGMENTATION_OPTIONS", "BEST_MODEL_NAME", "LAST_CHECKPOINT_NAME", "METRICS_CSV_NAME",
    "METRICS_PNG_NAME", "CONFIG_JSON_NAME", "seed_everything", "get_device",
    # 2. Reading data
    "ImageReadError", "SamplePair", "DatasetIndex", "index_dataset", "infer_group_regex", "read_image",
    "read_mask", "load_pair", "load_arrays", "split_train_val_test",
    # 3. Datasets
    "KidneyDataset", "PreparedData", "prepare_data", "make_datasets",
    # 4. Intensity
    "white_balance", "clahe", "unsharp_mask", "apply_preprocessing", "normalize_intensity",
    # 5. Augmentation
    "build_train_transform", "build_eval_transform", "BatchIntensityAugmentation", "gin_augment",
    "random_intensity_curves",
    # 6. Model
    "AttentionUNet", "build_model", "count_parameters",
    # 7. Losses and metrics
    "FocalDiceLoss", "metrics_from_counts",
    # 8. Training
    "TrainingResult", "TrainingDivergedError", "train_model", "autocast_dtype", "cpu_has_native_bf16",
    "load_checkpoint", "plot_training_history",
    # 9. Inference and evaluation
    "load_model", "load_models", "FoldEnsemble", "predict_probabilities", "hausdorff95", "EvaluationSet",
    "load_evaluation_set", "evaluate_model", "evaluate_validation", "evaluate_out_of_fold", "fold_comparison",
    "case_scores",
    "write_evaluation", "evaluate_split", "summary_table",
    "overlay_mask", "predict_folder", "familiarity_reference", "familiarity", "image_features",
    # 10. Runtime
    "on_kaggle", "interactive_frontend", "resolve_output_dir", "resolve_model_paths", "run_output_dir",
    "restore_run_for_resume",
    # 11. Phantoms and the default dataset
    "make_synthetic_dataset", "resolve_data_dir",
    # 12. Exploring a dataset
    "inventory", "inventory_summary", "write_inventory", "dataset_warnings", "mask_heatmap",
    "plot_image_statistics", "plot_intensity_histograms", "plot_gallery", "plot_mask_statistics",
    "show_slice_browser",
    # 13. Preprocessing and normalisation
    "preprocessing_effects", "normalization_consistency", "recommend_preprocessing",
    "preprocessing_ablation", "sample_slices_with_kidney", "write_preprocessing_results",
    "plot_preprocessing_gallery", "plot_preprocessing_effects",
    "show_preprocessing_sliders", "plot_normalization_consistency", "plot_normalization_gallery",
    # 14. Figures of a training run and its evaluation
    "plot_samples", "inference_options_table", "threshold_sweep", "plot_cases", "plot_dice_distribution",
    "plot_case_dice", "plot_threshold_sweep", "show_threshold_viewer", "plot_prediction_overlays",
    "familiarity_report", "unfamiliar_note",
    # 15. Leave-one-source-out
    "LOSO_CSV_NAME", "plot_intensity_draws", "source_folds", "fold_examples", "fold_table",
    "leave_one_source_out", "leave_one_source_out_files", "summarize_leave_one_source_out",
    "plot_leave_one_source_out",
]
# fmt: on


# #################################################################################################
# PART I. THE PIPELINE: what a run needs, from a setting to a prediction (sections 1-10).
# #################################################################################################


# =================================================================================================
# 1. Config
# =================================================================================================

AUTO = "auto"
BEST_MODEL_NAME = "best_kidney_segmentation_model.pth"
LAST_CHECKPOINT_NAME = "last_checkpoint.pth"
METRICS_CSV_NAME = "training_metrics.csv"
METRICS_PNG_NAME = "training_metrics.png"
CONFIG_JSON_NAME = "run_config.json"
CHECKPOINT_FORMAT = "kidneyseg-checkpoint"
CHECKPOINT_VERSION = 2

# Intensity preprocessing: a base method, or base methods joined by "+" applied left to right.
PREPROCESSING_METHODS = ("white_balance", "clahe", "unsharp")
PREPROCESSING_OPTIONS = ("none", "white_balance", "clahe", "unsharp", "white_balance+clahe", "clahe+unsharp")

# How model inputs are scaled (see :func:`normalize_intensity`) and which training augmentation runs
# (see :func:`build_train_transform`); the first of each is the default.
NORMALIZATION_OPTIONS = ("minmax", "percentile", "zscore", "histeq")
AUGMENTATION_OPTIONS = ("standard", "strong", "gin", "curves", "strong+gin")
# Config fields that were removed and are ignored when a stored config holds them.
RETIRED_FIELDS = ("channels_last",)
# Older names still accepted (stored checkpoints and forked notebooks use them): old -> current.
AUGMENTATION_ALIASES = {"spec": "standard"}

# Settings a checkpoint fixes: the network's shape and how its inputs are made. A checkpoint only
# loads (or resumes) with equal values.
CHECKPOINT_FIELDS = ("base_channels", "depth", "dropout", "image_size", "preprocessing", "normalization")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _rule(check: Callable[[Any], bool], allowed: str, optional: bool = False) -> tuple:
    """A field rule: ``check`` must hold (or the value is None, when ``optional``)."""
    return (lambda v: (optional and v is None) or check(v)), allowed


_INT_FROM_1 = _rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_POSITIVE = _rule(lambda v: _is_num(v) and v > 0, "a number > 0")
_NON_NEGATIVE = _rule(lambda v: _is_num(v) and v >= 0, "a number >= 0")
_UNIT_INTERVAL = _rule(lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
_BOOLEAN = _rule(lambda v: isinstance(v, bool), "True or False")


def _one_of(options: Sequence[str]) -> tuple:
    return _rule(lambda v: isinstance(v, str) and v in options, f"one of {', '.join(map(repr, options))}")


# What each Config field accepts, as (check, allowed values in words); Config.validate applies them,
# then the rules that involve two fields (image_size and depth; the two loss weights).
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("depth", "base_channels", "batch_size", "num_epochs", "patience"), _INT_FROM_1),
    "lr_patience": _rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    **dict.fromkeys(("learning_rate", "grad_clip_norm"), _POSITIVE),
    **dict.fromkeys(("weight_decay", "focal_gamma", "focal_weight", "dice_weight", "min_lr"), _NON_NEGATIVE),
    **dict.fromkeys(("focal_alpha", "inference_threshold"), _UNIT_INTERVAL),
    "dropout": _rule(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "val_fraction": _rule(lambda v: _is_num(v) and 0 < v < 1, "a number strictly between 0 and 1, e.g. 0.2"),
    "test_fraction": _rule(
        lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1), e.g. 0.15 (0: no test split)"
    ),
    "lr_factor": _rule(lambda v: _is_num(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "seed": _rule(_is_int, "an integer"),
    "preprocessing": _rule(
        lambda v: _is_preprocessing(v),
        f"one of {', '.join(map(repr, PREPROCESSING_OPTIONS))} (or methods of {PREPROCESSING_METHODS} "
        "joined by '+')",
    ),
    "normalization": _one_of(NORMALIZATION_OPTIONS),
    "augmentation": _one_of(AUGMENTATION_OPTIONS),
    "group_regex": _rule(
        lambda v: (
            (isinstance(v, str) and bool(v))
            or (isinstance(v, dict) and all(isinstance(p, (str, type(None))) for p in v.values()))
        ),
        '"auto", a regular expression string, {source: pattern or None} or None',
        optional=True,
    ),
    "mask_labels": _rule(
        lambda v: (
            v == "nonzero"
            or (isinstance(v, (list, tuple)) and bool(v) and all(_is_int(x) and x > 0 for x in v))
        ),
        'None, "nonzero" or a list of label values > 0, e.g. [1] or [1, 2]',
        optional=True,
    ),
    "max_images": _rule(lambda v: _is_int(v) and v >= 2, "None or an integer >= 2", optional=True),
    "max_train_minutes": _rule(
        lambda v: _is_num(v) and v > 0, '"auto", None or a number of minutes > 0', optional=True
    ),
    "num_workers": _rule(
        lambda v: _is_int(v) and v >= 0, "None (automatic) or an integer >= 0", optional=True
    ),
    "amp": _rule(lambda v: isinstance(v, bool) or v == "cuda", 'True, False or "cuda"'),
    "folds": _rule(lambda v: _is_int(v) and v >= 2, "an integer >= 2, e.g. 5"),
    "fold": _rule(lambda v: _is_int(v) and v >= 0, "None or an integer from 0 to FOLDS - 1", optional=True),
    "multi_gpu": _rule(lambda v: isinstance(v, bool), '"auto", True or False'),
}


@dataclass
class Config:
    """Every setting of a run; the defaults are the reference recipe of the kidneyseg design.

    The notebook parameters are the upper-case field names (``IMAGE_SIZE`` is ``image_size``), see
    :data:`NOTEBOOK_PARAMETERS`. The config round-trips to plain JSON (:meth:`to_dict`,
    :meth:`from_dict`) and is stored in every checkpoint.

    Attributes:
        image_size: Side of the square network input; a multiple of ``2**depth``.
        batch_size: Images per optimisation step.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        num_epochs: Upper bound on epochs; early stopping usually ends sooner.
        patience: Epochs without a lower validation loss before training stops.
        grad_clip_norm: Maximum global gradient norm.
        focal_alpha: Focal-loss weight of the kidney class.
        focal_gamma: Focal-loss focusing exponent.
        focal_weight: Weight of the focal term in the total loss.
        dice_weight: Weight of the soft-Dice term in the total loss.
        dropout: Dropout probability inside every residual block.
        base_channels: Width of the first encoder block.
        depth: Number of encoder blocks.
        val_fraction: Share of images (or of patients, with ``group_regex``) used for validation,
            after the test split is held out.
        test_fraction: Share of patients (or images) held out first as a test split that never
            chooses anything: not the learning rate, not the stopping epoch, not the best checkpoint.
            0 gives the plain train/validation split.
        folds: Number of cross-validation folds (nnU-Net's protocol), used when ``fold`` is set.
        fold: ``None``: the ``val_fraction`` split. ``k`` (0 to ``folds - 1``): the patients outside
            the test split are divided into ``folds`` patient-disjoint folds, seeded and balanced by
            source (:func:`cross_validation_folds`); fold ``k`` validates, the others train. Each
            fold is one run with its own output folder (``fold_k``, :func:`run_output_dir`), and
            notebook 04 averages the fold models (:class:`FoldEnsemble`).
        inference_threshold: Probability above which a pixel is kidney.
        seed: Seed of the split, the initial weights, the shuffling and the augmentation.
        group_regex: Regular expression whose first group (or whole match) is the patient id of a
            file name; slices of one patient never straddle the split. ``"auto"`` infers it from the
            file names source by source (:func:`infer_group_regex`); a source whose names carry no
            consistent patient id is split by image, with a warning naming it. ``{source: pattern}``
            gives each source its own pattern (``None`` or a missing source: split by image).
            ``None`` splits every source by image.
        mask_labels: How masks with several label values are read (see :func:`binarize_mask`).
            ``None``: binary masks only (0/1, 0/255, lossy noise around them); a mask with several
            labels is an error naming the file and its values. ``"nonzero"``: every non-zero value
            is kidney (e.g. KiTS kidney + tumour + cyst). A list of values, e.g. ``[1]``: exactly
            those values are kidney, the rest background.
        preprocessing: Intensity preprocessing, one of :data:`PREPROCESSING_OPTIONS`.
        normalization: How each model input is scaled, one of :data:`NORMALIZATION_OPTIONS`:
            ``"minmax"`` (0..255 to [0, 1]), ``"percentile"`` (per image, clip
            to the 0.5-99.5th percentiles and stretch to [0, 1]), ``"zscore"`` (the same clip,
            then zero mean and unit variance; nnU-Net's rule for non-CT images) or ``"histeq"``
            (global histogram equalisation, blind to another window or gamma). Stored in the
            checkpoint and applied identically in training, evaluation and inference.
        augmentation: Training augmentation, one of :data:`AUGMENTATION_OPTIONS`: ``"standard"``
            (flips, small shifts, scales and rotations, brightness and contrast; ``"spec"`` is its
            older name), ``"strong"`` (nnU-Net-like 2D: wider scale and rotation, gamma, noise, blur,
            low-resolution simulation), ``"gin"`` or ``"curves"`` (``"standard"`` plus random
            intensity networks or random intensity curves on each batch, for unseen scanners) or
            ``"strong+gin"`` (``"strong"`` plus either of the two). See
            :class:`BatchIntensityAugmentation`.
        lr_factor: ReduceLROnPlateau factor.
        lr_patience: ReduceLROnPlateau patience in epochs.
        min_lr: ReduceLROnPlateau floor.
        max_images: Use at most this many pairs (a seeded random subset); ``None`` uses all.
        max_train_minutes: Stop cleanly after the epoch that would cross this budget. ``"auto"``:
            :data:`KAGGLE_TRAIN_MINUTES` in a Kaggle session (whose GPU sessions end after 12 hours),
            no limit elsewhere.
        num_workers: DataLoader workers; ``None`` picks 0 on a CPU and up to 4 on a GPU.
        amp: Mixed precision in training, evaluation and inference (see :func:`autocast_dtype`).
            ``"cuda"``: on CUDA only, fp16 with a GradScaler below compute capability 8 (a T4) and
            bf16 from 8.0 on; full precision on a CPU. ``True``: the same on CUDA, and bf16 autocast
            on a CPU with native bf16 (AVX-512 BF16 or AMX), fp32 on other CPUs. ``False``: full
            precision everywhere. The loss is always computed in float32.
        multi_gpu: Train on every visible GPU with ``nn.DataParallel``. ``"auto"``: yes in a Kaggle
            session (its GPU is "GPU T4 x2"), one GPU elsewhere.

    ``"auto"`` values are made concrete when the config is built, so a run's stored config says what
    ran.
    """

    image_size: int = 256
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    num_epochs: int = 150
    patience: int = 20
    grad_clip_norm: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    focal_weight: float = 0.6
    dice_weight: float = 0.4
    dropout: float = 0.2
    base_channels: int = 64
    depth: int = 4
    val_fraction: float = 0.2
    test_fraction: float = 0.15
    folds: int = 5
    fold: int | None = None
    inference_threshold: float = 0.5
    seed: int = 42
    group_regex: str | dict[str, str | None] | None = "auto"
    mask_labels: str | list[int] | None = None
    preprocessing: str = "none"
    normalization: str = "minmax"
    augmentation: str = "standard"
    lr_factor: float = 0.5
    lr_patience: int = 5
    min_lr: float = 1e-6
    max_images: int | None = None
    max_train_minutes: float | str | None = "auto"
    num_workers: int | None = None
    amp: bool | str = "cuda"
    multi_gpu: bool | str = "auto"

    def __post_init__(self) -> None:
        self.max_train_minutes = resolve_auto(self.max_train_minutes, KAGGLE_TRAIN_MINUTES, None)
        self.multi_gpu = resolve_auto(self.multi_gpu, True, False)
        if isinstance(self.mask_labels, tuple):
            self.mask_labels = list(self.mask_labels)
        if isinstance(self.augmentation, str):
            self.augmentation = AUGMENTATION_ALIASES.get(self.augmentation, self.augmentation)
        self.validate()

    def validate(self) -> None:
        """Check every field against :data:`_FIELD_RULES`; raise ``ValueError`` naming the parameter
        and the allowed values."""

        def fail(name: str, allowed: str) -> None:
            value = getattr(self, name)
            raise ValueError(f"{name.upper()} (Config.{name}) must be {allowed}; got {value!r}.")

        for name, (ok, allowed) in _FIELD_RULES.items():
            if not ok(getattr(self, name)):
                fail(name, allowed)
        multiple = 2**self.depth
        if not _is_int(self.image_size) or self.image_size < multiple or self.image_size % multiple:
            fail("image_size", f"a positive multiple of {multiple} (2**depth), e.g. 128 or 256")
        if self.focal_weight + self.dice_weight <= 0:
            fail("dice_weight", "> 0 when focal_weight is 0 (the loss needs a positive weight)")
        if self.fold is not None and self.fold >= self.folds:
            fail("fold", f"None or an integer from 0 to {self.folds - 1} (FOLDS={self.folds})")
        patterns = self.group_regex.values() if isinstance(self.group_regex, dict) else [self.group_regex]
        for pattern in patterns:
            if pattern in (None, AUTO):
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"GROUP_REGEX (Config.group_regex) is not a valid regular expression: "
                    f"{pattern!r} ({exc}). Example: '^([^_]+)_'."
                ) from None

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a dict of plain JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build a config from :meth:`to_dict` output; unknown keys are an error naming them, except
        fields that were removed (:data:`RETIRED_FIELDS`), which stored checkpoints still hold."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_parameters(cls, **parameters: Any) -> Config:
        """Build a config from notebook parameters (``IMAGE_SIZE=128, ...``).

        Raises:
            ValueError: for a name that is not a config parameter.
        """
        return cls().with_parameters(**parameters)

    def with_parameters(self, **parameters: Any) -> Config:
        """A copy with some notebook parameters changed (``NORMALIZATION="zscore"``, ...).

        Raises:
            ValueError: for a name that is not a config parameter, or an invalid value.
        """
        known = {f.name.upper(): f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            raise ValueError(f"Unknown parameters {unknown}; known ones are {sorted(known)}.")
        return type(self)(**{**self.to_dict(), **{known[k]: v for k, v in parameters.items()}})

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the config as indented JSON (atomically) and return the path."""
        path = Path(path)
        _atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Config:
        """Read a config written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


NOTEBOOK_PARAMETERS = tuple(f.name.upper() for f in dataclasses.fields(Config))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (call it once, in setup)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (user code in notebooks may use it)
    torch.manual_seed(seed)


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Choose the compute device once: CUDA when available, else CPU.

    Args:
        device: ``"auto"`` (or ``None``) to pick, or an explicit name such as ``"cpu"``, ``"cuda:0"``.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={device!r} asks for CUDA, but no CUDA GPU is visible; use 'auto'.")
    return chosen


def _atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Any], None]) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or a function that writes to a binary file handle) to
    ``path`` through a temporary file, fsync, then rename over ``path``: a kill at any moment leaves
    either the old or the new file, never a broken one. Every file this module writes goes here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        if callable(data):
            data(handle)
        else:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


# =================================================================================================
# 2. Reading data
# =================================================================================================

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LAYOUT_HELP = (
    "Expected a folder with images/ and masks/ subfolders (same file names, e.g. images/a.png and "
    "masks/a.png), or a root folder holding several such folders at any depth."
)
DATA_DIR_ENV = "KIDNEYSEG_DATA_DIR"


class ImageReadError(ValueError):
    """A file could not be decoded as an image; the message names the file."""


@dataclass(frozen=True)
class SamplePair:
    """One image and its mask.

    Attributes:
        image: Path of the image file.
        mask: Path of the mask file.
        source: The dataset folder (holding images/ and masks/) relative to the data root.
        name: The shared file stem.
        case: Patient id from ``group_regex`` (the stem when no regex is given).
        mask_labels: How the mask is read (``Config.mask_labels``).
    """

    image: Path
    mask: Path
    source: str
    name: str
    case: str
    mask_labels: tuple[int, ...] | str | None = None

    @property
    def key(self) -> str:
        """Unique id of the pair within a data root: ``source/name``."""
        return f"{self.source}/{self.name}"

    @property
    def group(self) -> str:
        """Split group: the case within its source (two sources never share a patient)."""
        return f"{self.source}/{self.case}"


@dataclass
class DatasetIndex:
    """The pairs found under a data root, and what could not be paired.

    Attributes:
        root: The data root that was searched.
        pairs: Matched pairs, sorted by source and name.
        orphan_images: Images without a mask.
        orphan_masks: Masks without an image.
        group_regex: The patient-id pattern the cases come from (``None``: each image its own case;
            a dict: one pattern or ``None`` per source).
    """

    root: Path
    pairs: list[SamplePair]
    orphan_images: list[Path] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)
    group_regex: str | dict[str, str | None] | None = None

    def summary(self) -> pd.DataFrame:
        """One row per source: pairs, cases and orphans."""
        rows: dict[str, dict[str, Any]] = {}
        for pair in self.pairs:
            row = rows.setdefault(pair.source, {"pairs": 0, "cases": set()})
            row["pairs"] += 1
            row["cases"].add(pair.case)
        table = pd.DataFrame(
            [{"source": s, "pairs": r["pairs"], "cases": len(r["cases"])} for s, r in sorted(rows.items())],
            columns=["source", "pairs", "cases"],
        )
        orphans = [self._source_of(p) for p in self.orphan_images + self.orphan_masks]
        table["orphans"] = [orphans.count(s) for s in table["source"]]
        return table

    def _source_of(self, path: Path) -> str:
        return _relative_source(path.parent.parent, self.root)

    def orphan_report(self) -> str:
        """A readable list of orphans by name ('' when there are none)."""
        lines = [f"image without mask: {p}" for p in self.orphan_images]
        lines += [f"mask without image: {p}" for p in self.orphan_masks]
        return "\n".join(lines)


def _relative_source(folder: Path, root: Path) -> str:
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        return folder.name
    return rel.as_posix() if str(rel) != "." else root.name


def find_dataset_folders(root: str | os.PathLike) -> list[Path]:
    """Return every folder under ``root`` (itself included) that has images/ and masks/ subfolders.

    Hidden folders and the images/ and masks/ folders themselves are not searched. Sorted by path.
    """
    root = Path(root)
    found = []
    for current, dirnames, _ in os.walk(root, followlinks=True):
        if "images" in dirnames and "masks" in dirnames:
            found.append(Path(current))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("images", "masks"))
    return sorted(found)


def _image_files(folder: Path) -> dict[str, Path]:
    """Map stem -> file for the image files in ``folder``; two files with one stem is an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.is_file():
            continue
        if path.stem in files:
            raise ValueError(
                f"Two files share the name {path.stem!r} in {folder}: {files[path.stem].name} and "
                f"{path.name}. Keep one, so that the image-mask pairing is unambiguous."
            )
        files[path.stem] = path
    return files


def _case_of(name: str, pattern: re.Pattern[str] | None, path: Path) -> str:
    if pattern is None:
        return name
    match = pattern.search(name)
    if match is None:
        raise ValueError(
            f"GROUP_REGEX {pattern.pattern!r} does not match the file name {name!r} ({path}). "
            "Every file name must contain the patient id, or set GROUP_REGEX=None."
        )
    return match.group(1) if pattern.groups else match.group(0)


# Patient-id rules tried by GROUP_REGEX="auto", in order: (pattern, what it means).
GROUP_RULES = (
    (r"^([^_]+)_", "the part before the first underscore"),
    (r"^(.*?)[_\-. ]?\d+$", "the name without its trailing slice number"),
)
MIN_AUTO_GROUPS = 3


def _shape(text: str) -> str:
    """A name's shape: runs of letters become ``a``, runs of digits ``9`` (``case7`` -> ``a9``)."""
    return re.sub(r"[A-Za-z]+", "a", re.sub(r"\d+", "9", text))


def _source_rule(names: Sequence[str]) -> tuple[str | None, str]:
    """The first rule of :data:`GROUP_RULES` that yields patient ids for every name of one source:
    ``(pattern, meaning)``, or ``(None, why none does)``."""
    reasons = []
    for pattern, meaning in GROUP_RULES:
        regex = re.compile(pattern)
        matches = [regex.search(name) for name in names]
        if not all(matches):
            miss = next(name for name, m in zip(names, matches) if not m)
            reasons.append(f"{meaning}: {miss!r} has none")
            continue
        if not all(re.search(r"\d", name[m.end(1) :]) for name, m in zip(names, matches)):
            miss = next(name for name, m in zip(names, matches) if not re.search(r"\d", name[m.end(1) :]))
            reasons.append(f"{meaning}: {miss!r} has no slice number after it")
            continue
        ids = {m.group(1) for m in matches}
        if len({_shape(i) for i in ids}) > 1:
            reasons.append(f"{meaning}: patient ids of mixed shapes")
            continue
        if len(ids) == 1 and len(names) > 1 and not re.search(r"\d", next(iter(ids))):
            only = next(iter(ids))
            reasons.append(f"{meaning}: one id {only!r} for all {len(names)} images, a name prefix")
            continue
        if len(ids) == len(names) > 1:
            reasons.append(f"{meaning}: every image would be its own patient")
            continue
        return pattern, meaning
    return None, "; ".join(reasons)


def infer_group_regex(
    stems_by_source: Mapping[str, Sequence[str]],
) -> tuple[str | dict[str, str | None] | None, str]:
    """Infer the patient id of file names, source by source, or refuse to invent one.

    For each source (folder) the first rule of :data:`GROUP_RULES` is taken that, for every file of
    the source: matches, and leaves a slice number after the patient id; gives patient ids of one
    shape (``case7`` and ``case12`` do, ``case7`` and ``scan`` do not: mixed naming schemes are not
    trusted); gives more than one id, unless the one id holds a digit (``case7``: a one-patient
    source; ``img`` in ``img_0001`` is a name prefix); and does not make every image its own patient
    (then the rule would only rename images). A source where no rule holds is split by image. At
    least :data:`MIN_AUTO_GROUPS` patients are needed in all.

    Args:
        stems_by_source: File stems (names without extension) per source folder.

    Returns:
        ``(rule, sentence)``: one pattern when every source follows it; ``{source: pattern or None}``
        when sources differ (``None``: split by image), with the sentence naming the sources without
        patient ids; ``(None, reason)`` when no source has them, so that the caller splits by image
        and says why.
    """
    found = {source: _source_rule(list(names)) for source, names in stems_by_source.items() if names}
    rules = {source: pattern for source, (pattern, _) in found.items()}
    n_images = sum(len(names) for names in stems_by_source.values())
    groups = {
        (source, re.search(pattern, name).group(1) if pattern else name)
        for source, pattern in rules.items()
        for name in stems_by_source[source]
    }
    without = sorted(source for source, pattern in rules.items() if pattern is None)
    if len(without) == len(rules) or len(groups) < MIN_AUTO_GROUPS:
        reasons = "; ".join(f"{source}: {why}" for source, (_, why) in found.items() if why) or "too few"
        if len(without) < len(rules):
            reasons = f"only {len(groups)} patient(s)"
        return None, (
            'GROUP_REGEX="auto" found no consistent patient id in the file names ('
            + reasons
            + "), so the data are split by image: slices of one patient can sit on both sides of the "
            "split, which flatters validation and test scores. Set GROUP_REGEX to a pattern whose first "
            "group is the patient id, e.g. '^([^_]+)_'."
        )
    patterns = set(rules.values())
    if len(patterns) == 1:
        pattern = patterns.pop()
        meaning = next(meaning for p, meaning in GROUP_RULES if p == pattern)
        return pattern, (
            f'GROUP_REGEX="auto": patient id = {meaning} ({pattern!r}): {len(groups)} patients in '
            f"{n_images} images. Set GROUP_REGEX to another pattern if that is wrong."
        )
    lines = [
        f"  {source}: " + (f"{meaning} ({rule!r})" if rule else f"NO patient id ({meaning}), split by image")
        for source, (rule, meaning) in found.items()
    ]
    return rules, (
        f'GROUP_REGEX="auto": patient ids differ by source ({len(groups)} patients in {n_images} images):\n'
        + "\n".join(lines)
        + f"\nThe images of {', '.join(without) or 'no source'} are split one by one, so one patient's "
        "slices can sit on both sides of the split there. Rename those files to carry the patient id, "
        "or set GROUP_REGEX to a pattern (or to {source: pattern})."
    )


def index_dataset(
    data_dir: str | os.PathLike,
    group_regex: str | Mapping[str, str | None] | None = None,
    mask_labels: str | Sequence[int] | None = None,
) -> DatasetIndex:
    """Find all image/mask pairs under ``data_dir``, matched by file stem within each folder.

    Args:
        data_dir: One folder with images/ and masks/, or a root holding several at any depth.
        group_regex: Optional patient-id pattern (see :class:`Config`); ``"auto"`` infers one from
            the file names (:func:`infer_group_regex`) and says what it found; a mapping gives each
            source its own pattern (a source it does not name is split by image). The rule used is
            :attr:`DatasetIndex.group_regex`.
        mask_labels: How masks with several labels are read (``Config.mask_labels``).

    Raises:
        FileNotFoundError: ``data_dir`` is missing or holds no images/ + masks/ folder.
        ValueError: no pair at all (the message lists the orphans), or an ambiguous file name.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"DATA_DIR {str(root)!r} does not exist. {_LAYOUT_HELP}")
    if not root.is_dir():
        raise NotADirectoryError(f"DATA_DIR {str(root)!r} is a file, not a folder. {_LAYOUT_HELP}")
    folders = find_dataset_folders(root)
    if not folders:
        raise FileNotFoundError(f"No images/ + masks/ folders under DATA_DIR {str(root)!r}. {_LAYOUT_HELP}")
    labels = tuple(mask_labels) if isinstance(mask_labels, (list, tuple)) else mask_labels
    if group_regex == AUTO:
        stems = {
            _relative_source(folder, root): sorted(
                _image_files(folder / "images").keys() & _image_files(folder / "masks").keys()
            )
            for folder in folders
        }
        group_regex, rule = infer_group_regex(stems)
        if group_regex is None or isinstance(group_regex, dict):
            warnings.warn(rule, UserWarning, stacklevel=2)
        else:
            print(rule)
    pairs: list[SamplePair] = []
    orphan_images: list[Path] = []
    orphan_masks: list[Path] = []
    for folder in folders:
        images = _image_files(folder / "images")
        masks = _image_files(folder / "masks")
        source = _relative_source(folder, root)
        rule = group_regex.get(source) if isinstance(group_regex, dict) else group_regex
        pattern = re.compile(rule) if rule else None
        for stem in sorted(images.keys() & masks.keys()):
            case = _case_of(stem, pattern, images[stem])
            pairs.append(SamplePair(images[stem], masks[stem], source, stem, case, labels))
        orphan_images += [images[s] for s in sorted(images.keys() - masks.keys())]
        orphan_masks += [masks[s] for s in sorted(masks.keys() - images.keys())]
    index = DatasetIndex(root, pairs, orphan_images, orphan_masks, group_regex)
    if not pairs:
        raise ValueError(
            f"No image/mask pairs under DATA_DIR {str(root)!r}: {len(orphan_images)} images and "
            f"{len(orphan_masks)} masks have no partner of the same name. {_LAYOUT_HELP}\n"
            + index.orphan_report()[:2000]
        )
    return index


def _decode(path: Path) -> np.ndarray:
    """Decode any supported file with all its channels and bit depth, or raise ImageReadError."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"Cannot read {path}: {exc}") from None
    if data.size == 0:
        raise ImageReadError(f"{path} is empty (0 bytes); replace or remove it.")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(
            f"{path} could not be decoded as an image: it is corrupt, truncated or not an image "
            "despite its extension. Replace or remove it (or set SKIP_BAD_FILES=True)."
        )
    return image


def _drop_alpha_and_reduce(image: np.ndarray, reduce: str) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ValueError(f"unsupported array shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 2:  # gray + alpha
        return image[:, :, 0]
    color = image[:, :, :3]
    if reduce == "max":
        return color.max(axis=2)
    if color.dtype == np.uint8 or color.dtype == np.uint16 or color.dtype == np.float32:
        return cv2.cvtColor(np.ascontiguousarray(color), cv2.COLOR_BGR2GRAY)
    weights = np.array([0.114, 0.587, 0.299])  # B, G, R (ITU-R BT.601)
    return (color.astype(np.float64) * weights).sum(axis=2)


def to_grayscale_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a decoded image to a 2D uint8 array by the documented rule.

    Rule: an alpha channel is dropped; colour (BGR, as OpenCV decodes) becomes luma with the ITU-R
    BT.601 weights; gray+alpha keeps the gray channel. 8-bit values are kept as they are. Any other
    depth (16-bit, signed, float) is stretched linearly from the image's own minimum and maximum to
    0..255, because medical 16-bit files rarely use the full 0..65535 range; a constant image
    becomes all zeros. Booleans become 0/255.
    """
    gray = _drop_alpha_and_reduce(np.asarray(image), reduce="luma")
    if gray.dtype == np.uint8:
        return np.ascontiguousarray(gray)
    if gray.dtype == np.bool_:
        return gray.astype(np.uint8) * 255
    values = gray.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(gray.shape, np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    if hi <= lo:
        return np.zeros(gray.shape, np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


LOSSY_EXTENSIONS = (".jpg", ".jpeg")
NOISY_VALUES = 16  # more non-zero values than this: noise or soft edges around labels, not labels
LABEL_SHARE = 0.01  # an intermediate value holding this share of the labelled pixels is a label
NOISY_LABEL_SHARE = 0.2  # the same within a band, in a noisy mask (noise spreads edges)


def _several_labels(found: np.ndarray, counts: np.ndarray, noisy: bool) -> bool:
    """Whether a mask holds a label besides background and its largest value, from its distinct
    values ``found`` (sorted) and their pixel ``counts``: a value more than 1/16 of the range from
    both ends holding a plateau of pixels (:data:`LABEL_SHARE` of the labelled ones); in a ``noisy``
    mask (a JPEG, or more than :data:`NOISY_VALUES` values), a band of 1/16 of the range holding
    :data:`NOISY_LABEL_SHARE` of them. Soft edges and compression noise sit next to the two levels
    or spread over many values, and hold no such plateau."""
    found = found.astype(np.float64)
    top = found[-1]
    middle = (found > top / 16) & (found < top - top / 16)
    upper = counts[found > top / 16].sum()
    if not noisy:
        return bool((counts[middle] >= LABEL_SHARE * upper).any())
    return any(
        counts[middle & (np.abs(found - value) <= top / 32)].sum() >= NOISY_LABEL_SHARE * upper
        for value in found[middle]
    )


def binarize_mask(
    mask: np.ndarray, path: str | os.PathLike = "<array>", labels: str | Sequence[int] | None = None
) -> np.ndarray:
    """Turn a decoded mask into a 2D uint8 array of 0 (background) and 1 (kidney).

    Rule: an alpha channel is dropped and colour channels are reduced by their maximum (so white and
    coloured annotations both count); NaN is background. Then, with ``labels`` None (the default):

    * one non-zero value at most (0/1, 0/255, 0/65535, booleans, any single label): every non-zero
      pixel is kidney;
    * float masks with values in [0, 1] (probability maps): pixels ``>= 0.5`` are kidney;
    * several non-zero values around one level, from soft edges or JPEG noise (no intermediate
      value holds a plateau of pixels, see :func:`_several_labels`): pixels ``>= max / 2`` are
      kidney;
    * several labels (0/1/2, 0/100/200, KiTS's 0/1/2/3): an error naming the file and its values,
      never a silent choice.

    ``labels="nonzero"`` reads every non-zero value as kidney; a list of values reads exactly those
    as kidney. Label values are matched exactly: keep label maps in a lossless format (PNG, TIFF).

    Raises:
        ValueError: a mask with several labels and no ``labels``, naming the file, the values and
            the fix.
    """
    values = _drop_alpha_and_reduce(np.asarray(mask), reduce="max")
    if values.dtype == np.bool_:
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        values = np.nan_to_num(values, nan=0.0)
    if labels == "nonzero":
        return (values > 0).astype(np.uint8)
    if labels is not None:
        return np.isin(values, list(labels)).astype(np.uint8)
    found, counts = np.unique(values, return_counts=True)
    if (found > 0).sum() <= 1:
        return (values > 0).astype(np.uint8)
    top = found[-1]
    if np.issubdtype(values.dtype, np.floating) and top <= 1:
        return (values >= 0.5).astype(np.uint8)
    lossy = str(path).lower().endswith(LOSSY_EXTENSIONS)
    if _several_labels(found, counts, noisy=lossy or (found > 0).sum() > NOISY_VALUES):
        shown = ", ".join(f"{v:g}: {c} px" for v, c in zip(found[:10].tolist(), counts[:10].tolist()))
        raise ValueError(
            f"Mask {path} has several label values ({shown}{', ...' if found.size > 10 else ''}), not "
            "one kidney label. Set MASK_LABELS='nonzero' to read every non-zero label as kidney, "
            "MASK_LABELS=[values] to name the kidney labels (e.g. [1]), or save the mask as 0/255"
            + (" in PNG (a JPEG blurs label values)" if lossy else "")
            + "."
        )
    return (values >= top / 2).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as 2D uint8 (see :func:`to_grayscale_uint8` for the rule)."""
    return to_grayscale_uint8(_decode(Path(path)))


def read_mask(path: str | os.PathLike, labels: str | Sequence[int] | None = None) -> np.ndarray:
    """Read a mask file as 2D uint8 0/1 (see :func:`binarize_mask` for the rule and ``labels``)."""
    return binarize_mask(_decode(Path(path)), path, labels)


def load_pair(pair: SamplePair) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair at its original size.

    Raises:
        ImageReadError: a file cannot be decoded (the message names it).
        ValueError: image and mask differ in size (the message names both files).
    """
    image = read_image(pair.image)
    mask = read_mask(pair.mask, pair.mask_labels)
    if image.shape != mask.shape:
        raise ValueError(
            f"Image and mask differ in size: {pair.image} is {image.shape[1]}x{image.shape[0]} "
            f"but {pair.mask} is {mask.shape[1]}x{mask.shape[0]} (width x height). Re-export the "
            "mask at the image's size."
        )
    return image, mask


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (area or linear interpolation) and its 0/1 mask (linear, then >= 0.5).

    The whole field of view is kept: a non-square image is stretched, never cropped.
    """
    return _resize_gray(image, size), _resize_mask(mask, size)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    mask_f = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return (mask_f >= 0.5).astype(np.uint8)


def _resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.copy()
    shrink = size < h or size < w
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=mode)


@dataclass
class CachedArrays:
    """Decoded, resized pairs held in memory.

    Attributes:
        images: ``(N, S, S)`` uint8 images (after the configured preprocessing).
        masks: ``(N, S, S)`` uint8 masks of 0 and 1.
        pairs: The pairs in the same order.
        original_sizes: ``(height, width)`` of each original image.
        skipped: ``(path, reason)`` of files skipped because they could not be read.
    """

    images: np.ndarray
    masks: np.ndarray
    pairs: list[SamplePair]
    original_sizes: list[tuple[int, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


def load_arrays(
    pairs: Sequence[SamplePair],
    image_size: int,
    preprocessing: str = "none",
    skip_bad_files: bool = False,
    progress: bool = False,
) -> CachedArrays:
    """Decode, preprocess and resize every pair once.

    Args:
        pairs: The pairs to load.
        image_size: Side of the square arrays.
        preprocessing: One of :data:`PREPROCESSING_OPTIONS`, applied after resizing.
        skip_bad_files: Skip (and list in ``skipped``) unreadable files instead of raising.
        progress: Show a progress bar.
    """
    images, masks, kept, sizes, skipped = [], [], [], [], []
    for pair in _progress_bar(pairs, progress, desc="loading", unit="img", leave=False):
        try:
            image, mask = load_pair(pair)
        except ImageReadError as exc:
            if not skip_bad_files:
                raise
            skipped.append((str(pair.image), str(exc)))
            continue
        sizes.append(image.shape[:2])
        images.append(model_input(image, image_size, preprocessing))
        masks.append(_resize_mask(mask, image_size))
        kept.append(pair)
    if not kept:
        raise ValueError(f"None of the {len(pairs)} pairs could be read; see the skipped files.")
    return CachedArrays(np.stack(images), np.stack(masks), kept, sizes, skipped)


def split_pairs(
    pairs: Sequence[SamplePair], val_fraction: float = 0.2, seed: int = 42, grouped: bool = True
) -> tuple[list[SamplePair], list[SamplePair]]:
    """Split pairs into training and validation, reproducibly.

    With ``grouped`` and more than one case, scikit-learn's ``GroupShuffleSplit`` keeps every slice of
    a case (see :attr:`SamplePair.group`) on one side, and ``val_fraction`` is the share of cases.
    Otherwise ``ShuffleSplit`` splits images. Both sides are sorted as the input was.

    Raises:
        ValueError: fewer than two images, or fewer than two groups when grouping.
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

    pairs = list(pairs)
    if len(pairs) < 2:
        raise ValueError(f"Need at least 2 image/mask pairs to split; found {len(pairs)}.")
    groups = [p.group for p in pairs]
    if grouped and len(set(groups)) < 2:
        raise ValueError(
            f"GROUP_REGEX puts all {len(pairs)} images into one case ({groups[0]!r}), so no "
            "patient-level split is possible. Check the pattern or set GROUP_REGEX=None."
        )
    index = np.arange(len(pairs))
    if grouped:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train_idx, val_idx = next(splitter.split(index, groups=groups))
    else:
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train_idx, val_idx = next(splitter.split(index))
    return [pairs[i] for i in sorted(train_idx)], [pairs[i] for i in sorted(val_idx)]


def cross_validation_folds(
    pairs: Sequence[SamplePair], folds: int = 5, seed: int = 42, grouped: bool = True
) -> list[list[SamplePair]]:
    """Divide pairs into ``folds`` patient-disjoint folds, seeded and balanced by source.

    Source by source, the patients (or images, without grouping) are shuffled with ``seed`` and each
    goes to the fold that holds the fewest images of that source so far (ties: the fewest images in
    all, then the lowest fold), so every fold gets a share of every source as far as its patients
    allow. Each fold keeps the input order.

    Raises:
        ValueError: fewer patients (images) than folds.
    """
    pairs = list(pairs)
    unit = (lambda p: p.group) if grouped else (lambda p: p.key)
    units: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        units.setdefault(unit(pair), []).append(i)
    if len(units) < folds:
        raise ValueError(
            f"FOLDS={folds} needs at least {folds} {'patients' if grouped else 'images'} outside the test "
            f"split; there are {len(units)}. Lower FOLDS or add data."
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    totals = [0] * folds
    for source in sorted({p.source for p in pairs}):
        names = sorted(u for u, members in units.items() if pairs[members[0]].source == source)
        per_source = [0] * folds
        for name in (names[i] for i in rng.permutation(len(names))):
            k = min(range(folds), key=lambda f: (per_source[f], totals[f], f))
            fold_of[name] = k
            per_source[k] += len(units[name])
            totals[k] += len(units[name])
    return [[p for p in pairs if fold_of[unit(p)] == k] for k in range(folds)]


def split_train_val_test(
    pairs: Sequence[SamplePair],
    val_fraction: float = 0.2,
    test_fraction: float = 0.15,
    seed: int = 42,
    grouped: bool = True,
    folds: int = 5,
    fold: int | None = None,
) -> tuple[list[SamplePair], list[SamplePair], list[SamplePair]]:
    """Hold out a test split first, then split the rest into training and validation.

    ``test_fraction`` of the patients (or images, without grouping) go to the test split, drawn with
    seed ``seed + 1`` so that it does not mirror the validation draw; the rest is split by
    :func:`split_pairs` with ``seed`` (``val_fraction`` of what is left), or, with ``fold`` set, by
    :func:`cross_validation_folds` into ``folds`` folds of which ``fold`` validates. With
    ``test_fraction`` 0, or fewer than three patients (images), there is no test split, and the
    second case says so with a warning.
    """
    pairs = list(pairs)
    units = len({p.group for p in pairs}) if grouped else len(pairs)
    if test_fraction > 0 and units < 3:
        warnings.warn(
            f"Only {units} {'patients' if grouped else 'images'}: too few for training, validation and "
            "test parts, so there is NO test split; the validation split both chooses the model and "
            "scores it, which is optimistic. Add data, or set TEST_FRACTION=0 to silence this.",
            UserWarning,
            stacklevel=2,
        )
        test_fraction = 0.0
    test: list[SamplePair] = []
    if test_fraction > 0:
        pairs, test = split_pairs(pairs, test_fraction, seed + 1, grouped)
    if fold is None:
        train, val = split_pairs(pairs, val_fraction, seed, grouped)
        return train, val, test
    val = cross_validation_folds(pairs, folds, seed, grouped)[fold]
    chosen = {p.key for p in val}
    return [p for p in pairs if p.key not in chosen], val, test


# =================================================================================================
# 3. Datasets
# =================================================================================================


def _worker_init(_: int) -> None:
    cv2.setNumThreads(0)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``n`` indices anew each epoch from ``(seed, epoch)`` alone.

    It yields ``epoch * n + i`` so that the dataset, even inside persistent workers, knows the epoch
    and can seed each sample's augmentation from ``(seed, epoch, i)``: a run is reproducible whatever
    the number of workers, and a resumed run repeats the epochs it would have run.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = range(self.n)
        base = self.epoch * self.n
        return iter([base + i for i in order])

    def __len__(self) -> int:
        return self.n


class KidneyDataset(Dataset):
    """A torch Dataset over cached uint8 arrays, with a seeded Albumentations pipeline.

    Items are ``(image, mask)`` float tensors of shape ``(1, S, S)``: the image normalised by
    :func:`normalize_intensity` (with the constants of the un-augmented image, applied after
    augmentation), the mask of 0 and 1. Index ``epoch * n + i`` (from :class:`EpochShuffleSampler`)
    means sample ``i``; its augmentation is seeded from ``(seed, epoch, i)``.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        transform: A.Compose | None = None,
        seed: int = 0,
        normalization: str = "minmax",
    ) -> None:
        if images.shape != masks.shape or images.ndim != 3:
            raise ValueError(f"images {images.shape} and masks {masks.shape} must be equal (N, H, W).")
        self.images, self.masks, self.transform, self.seed = images, masks, transform, seed
        self.normalization = normalization
        self.stats = [normalization_stats(image, normalization) for image in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(int(index), len(self.images))
        image, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            state = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]
            seed_transform(self.transform, int(state))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t = torch.from_numpy(normalize_intensity(image, self.normalization, self.stats[i]))
        mask_t = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))
        return image_t.unsqueeze(0), mask_t.unsqueeze(0)


@dataclass
class PreparedData:
    """Everything notebook 03 needs about the data of a run.

    Attributes:
        data_dir: The data root.
        index: All pairs found, with orphans.
        train: Cached training arrays.
        val: Cached validation arrays.
        train_dataset: Augmented training dataset.
        val_dataset: Validation dataset (resize only).
        test: The held-out test pairs (never loaded for training; notebook 04 scores them).
        config: The run's config with ``GROUP_REGEX="auto"`` made concrete (train with this one).
    """

    data_dir: Path
    index: DatasetIndex
    train: CachedArrays
    val: CachedArrays
    train_dataset: KidneyDataset
    val_dataset: KidneyDataset
    test: list[SamplePair] = field(default_factory=list)
    config: Config | None = None

    def summary(self) -> pd.DataFrame:
        """Per source: pairs, cases, orphans, and how many images went to each side of the split."""
        table = self.index.summary()
        for name, part in (("train", self.train.pairs), ("val", self.val.pairs), ("test", self.test)):
            counts = pd.Series([p.source for p in part]).value_counts()
            table[name] = [int(counts.get(s, 0)) for s in table["source"]]
        with_kidney = pd.Series(
            [
                p.source
                for p, m in zip(
                    self.train.pairs + self.val.pairs, list(self.train.masks) + list(self.val.masks)
                )
                if m.any()
            ]
        ).value_counts()
        table["with_kidney"] = [int(with_kidney.get(s, 0)) for s in table["source"]]
        return table

    def split_record(self) -> dict[str, list[str]]:
        """The split as plain lists of ``source/name`` keys (stored in checkpoints)."""
        return {
            "train": [p.key for p in self.train.pairs],
            "val": [p.key for p in self.val.pairs],
            "test": [p.key for p in self.test],
        }


def prepare_data(
    config: Config, data_dir: str | os.PathLike, skip_bad_files: bool = False, progress: bool = False
) -> PreparedData:
    """Index, subsample, split, decode and wrap the data of a run, as the config says.

    Orphans are reported with a warning and left out; training goes on with the pairs. The test
    split (``config.test_fraction`` of the patients) is held out first and never loaded here.
    """
    index = index_dataset(data_dir, config.group_regex, config.mask_labels)
    config = config.with_parameters(GROUP_REGEX=index.group_regex)
    if index.orphan_images or index.orphan_masks:
        n = len(index.orphan_images) + len(index.orphan_masks)
        warnings.warn(
            f"{n} files have no partner and are left out:\n{index.orphan_report()}", UserWarning, stacklevel=2
        )
    pairs = index.pairs
    if config.max_images is not None and config.max_images < len(pairs):
        rng = np.random.default_rng(config.seed)
        keep = sorted(rng.choice(len(pairs), size=config.max_images, replace=False))
        pairs = [pairs[i] for i in keep]
    train_pairs, val_pairs, test_pairs = split_train_val_test(
        pairs,
        config.val_fraction,
        config.test_fraction,
        config.seed,
        grouped=config.group_regex is not None,
        folds=config.folds,
        fold=config.fold,
    )
    load = dict(
        image_size=config.image_size,
        preprocessing=config.preprocessing,
        skip_bad_files=skip_bad_files,
        progress=progress,
    )
    train = load_arrays(train_pairs, **load)
    val = load_arrays(val_pairs, **load)
    has_kidney = np.concatenate([train.masks.any(axis=(1, 2)), val.masks.any(axis=(1, 2))])
    if not has_kidney.any():
        warnings.warn(
            "No mask contains kidney: the model can only learn to predict background. By the "
            "empty-mask rule an empty prediction of an empty mask scores Dice 1.0 and any false "
            "kidney 0.0, so the metrics say nothing about kidney segmentation.",
            UserWarning,
            stacklevel=2,
        )
    elif has_kidney.all():
        warnings.warn(
            "Every mask contains kidney: the model never sees a kidney-free slice and may predict "
            "kidney on one. Add slices without kidney if the model will meet them.",
            UserWarning,
            stacklevel=2,
        )
    train_ds, val_ds = make_datasets(train, val, config)
    return PreparedData(
        data_dir=Path(data_dir),
        index=index,
        train=train,
        val=val,
        train_dataset=train_ds,
        val_dataset=val_ds,
        test=test_pairs,
        config=config,
    )


def make_datasets(
    train: CachedArrays, val: CachedArrays, config: Config
) -> tuple[KidneyDataset, KidneyDataset]:
    """The augmented training dataset and the plain validation dataset of a run, as configured."""
    train_ds = KidneyDataset(
        train.images,
        train.masks,
        build_train_transform(config.image_size, config.augmentation),
        seed=config.seed,
        normalization=config.normalization,
    )
    val_ds = KidneyDataset(
        val.images,
        val.masks,
        build_eval_transform(config.image_size),
        seed=config.seed,
        normalization=config.normalization,
    )
    return train_ds, val_ds


# =================================================================================================
# 4. Intensity
# =================================================================================================


def _is_preprocessing(method: Any) -> bool:
    if not isinstance(method, str):
        return False
    return method == "none" or all(part in PREPROCESSING_METHODS for part in method.split("+"))


def white_balance(
    image: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0
) -> np.ndarray:
    """Percentile intensity stretch: the one-channel meaning of white balance.

    Colour white balance equalises the channels' gains; a grayscale slice has one channel, so the
    meaningful version is to map the ``low_percentile`` value to 0 and the ``high_percentile`` value
    to 255, clipping outside (the "auto levels" of photo editors). Shape and dtype are kept; an
    image whose two percentiles are equal (e.g. constant) is returned unchanged.
    """
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
    """Contrast-limited adaptive histogram equalisation (OpenCV) on a 2D uint8 image.

    Args:
        image: 2D uint8 image.
        clip_limit: Contrast limit per tile (higher equalises more strongly).
        tile_grid: Tiles per side.
    """
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


_PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "white_balance": white_balance,
    "clahe": clahe,
    "unsharp": unsharp_mask,
}


def apply_preprocessing(image: np.ndarray, method: str = "none") -> np.ndarray:
    """Apply the named intensity preprocessing to a 2D uint8 image (shape and dtype kept).

    The same call runs in training, evaluation and inference, after resizing, with each method's
    default parameters.

    Args:
        image: 2D uint8 image.
        method: ``"none"``, a method of :data:`PREPROCESSING_METHODS`, or several joined by ``"+"``
            (applied left to right), e.g. ``"white_balance+clahe"``.
    """
    if not _is_preprocessing(method):
        raise ValueError(
            f"PREPROCESSING must be one of {', '.join(map(repr, PREPROCESSING_OPTIONS))} (or methods "
            f"of {PREPROCESSING_METHODS} joined by '+'); got {method!r}."
        )
    if method == "none":
        return image
    for part in method.split("+"):
        image = _PREPROCESSORS[part](image)
    return image


def model_input(image: np.ndarray, image_size: int, preprocessing: str = "none") -> np.ndarray:
    """The uint8 array a model sees before normalisation: resized whole, then preprocessed.

    Training (:func:`load_arrays`), evaluation and folder prediction all call this one function.
    """
    return apply_preprocessing(_resize_gray(image, image_size), preprocessing)


# Percentiles of the "percentile" and "zscore" clip (nnU-Net uses 0.5 and 99.5).
NORMALIZATION_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityMap:
    """A monotone piecewise-linear intensity map: ``np.interp(x, xp, fp)``, constant beyond the ends.

    Every normalisation is one (see :func:`normalization_stats`): two points for the linear rules
    (the ends clip), one point per grey level for histogram equalisation.
    """

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


def normalization_stats(image: np.ndarray, method: str = "minmax") -> IntensityMap:
    """The normalisation of one image, as an :class:`IntensityMap` computed from its intensities.

    Training computes it from each cached (un-augmented) image and applies it after augmentation,
    so brightness, contrast and gamma augmentation survive the normalisation; evaluation and
    inference compute it from the image itself (:func:`normalize_intensity`).

    Rules:
        * ``"minmax"``: 8-bit images map 0..255 to [0, 1]; any other depth is
          stretched from its own minimum and maximum (the reader's rule for 16-bit files).
        * ``"percentile"``: clip to the image's 0.5th and 99.5th percentiles, stretch to [0, 1].
        * ``"zscore"``: the same clip, then subtract the clipped image's mean and divide by its
          standard deviation (nnU-Net's rule for non-CT images).
        * ``"histeq"``: global histogram equalisation to [0, 1]: each value maps to the share of
          pixels at or below it (as OpenCV's ``equalizeHist``). It is unchanged by any increasing
          remapping of the intensities, such as another CT window or gamma.

    A constant image normalises to zeros (never a division by zero), except that an 8-bit one under
    ``"minmax"`` keeps the fixed scale; non-finite values are ignored.

    Raises:
        ValueError: an unknown method (the message lists the options).
    """
    if method not in NORMALIZATION_OPTIONS:
        raise ValueError(
            f"NORMALIZATION must be one of {', '.join(map(repr, NORMALIZATION_OPTIONS))}; got {method!r}."
        )
    array = np.asarray(image)
    if method == "minmax" and array.dtype == np.uint8:
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
    """Scale an image (any depth, any shape) to float32 model input by :func:`normalization_stats`.

    Args:
        image: The image, e.g. a uint8 model input or a 16-bit slice.
        method: One of :data:`NORMALIZATION_OPTIONS`.
        stats: The map computed elsewhere (training passes that of the un-augmented image); by
            default it is computed from ``image``.
    """
    return (normalization_stats(image, method) if stats is None else stats)(image)


# =================================================================================================
# 5. Augmentation
# =================================================================================================


def _albumentations() -> Any:
    """Import Albumentations without its update check: 2.0.x asks the internet for a newer version on
    import unless ``NO_ALBUMENTATIONS_UPDATE`` is set, and Kaggle sessions run offline."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def build_train_transform(image_size: int = 256, augmentation: str = "standard") -> A.Compose:
    """The training augmentation (Albumentations 2.x API), on uint8 images and 0/1 masks.

    ``"standard"`` (older name ``"spec"``): resize to ``image_size``; horizontal and vertical flips (p 0.7
    each); shift up to 6.25 %, scale 0.9-1.1 and rotation up to 45 degrees (p 0.5, zero padding,
    nearest-neighbour masks so they stay binary); random brightness and contrast (+-0.2, p 0.5).

    ``"strong"``, in the spirit of nnU-Net's 2D defaults: flips (p 0.5 each); scale 0.7-1.4, rotation
    up to 180 degrees and shift up to 10 % (p 0.6); Gaussian noise (std up to 8 % of the range, p 0.15);
    Gaussian blur (sigma 0.5-1, p 0.2); brightness and contrast (+-0.25, p 0.3); low-resolution
    simulation (down to 0.5x and back, p 0.25); gamma 0.7-1.5 (p 0.3). Geometry is applied to image
    and mask together; intensity changes touch the image only.

    ``"gin"`` and ``"curves"`` use the ``"standard"`` pipeline here and ``"strong+gin"`` the
    ``"strong"`` one; their intensity randomisation runs later, on the batch
    (:class:`BatchIntensityAugmentation`). Intensities are normalised by :class:`KidneyDataset`.

    Raises:
        ValueError: an unknown ``augmentation`` (the message lists the options).
    """
    augmentation = AUGMENTATION_ALIASES.get(augmentation, augmentation)
    if augmentation not in AUGMENTATION_OPTIONS:
        raise ValueError(
            f"AUGMENTATION must be one of {', '.join(map(repr, AUGMENTATION_OPTIONS))}; got {augmentation!r}."
        )
    A = _albumentations()
    if augmentation.startswith("strong"):
        return A.Compose(
            _geometry(image_size, flip_p=0.5, shift=0.1, scale=(0.7, 1.4), rotate=180, p=0.6)
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
    return A.Compose(
        _geometry(image_size, flip_p=0.7, shift=0.0625, scale=(0.9, 1.1), rotate=45, p=0.5)
        + [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)]
    )


def _geometry(
    image_size: int, flip_p: float, shift: float, scale: tuple[float, float], rotate: float, p: float
) -> list[Any]:
    """Resize, both flips and an affine (zero padding, nearest-neighbour masks so they stay binary)."""
    A = _albumentations()
    return [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA),
        A.HorizontalFlip(p=flip_p),
        A.VerticalFlip(p=flip_p),
        A.Affine(
            translate_percent=(-shift, shift),
            scale=scale,
            rotate=(-rotate, rotate),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=p,
        ),
    ]


def seed_transform(transform: A.Compose, seed: int) -> A.Compose:
    """Seed a pipeline so that its transforms draw one after another from a single generator.

    Albumentations' own ``Compose.set_random_seed`` gives every transform a generator with the same
    seed, so their draws coincide: with equal probabilities, horizontal and vertical flips always
    come together and never alone. One shared generator keeps them independent and reproducible.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


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
    """The batch-level intensity randomisation of ``AUGMENTATION`` ``"gin"``, ``"curves"`` and
    ``"strong+gin"``, applied in torch to normalised training batches on the training device.

    ``"gin"``: :func:`gin_augment` on every image (its random blend weight keeps some close to the
    original). ``"curves"``: :func:`random_intensity_curves` on each image with probability 0.5.
    ``"strong+gin"``: each image gets one of the two, at random. Draws come from ``(seed, epoch,
    step)`` alone, so a run (and a resumed run) is reproducible on any device and worker count.
    """

    def __init__(self, augmentation: str, seed: int) -> None:
        if augmentation not in ("gin", "curves", "strong+gin"):
            raise ValueError(f"no batch intensity augmentation for AUGMENTATION={augmentation!r}")
        self.augmentation, self.seed = augmentation, seed

    @staticmethod
    def for_config(config: Config) -> BatchIntensityAugmentation | None:
        """The batch augmentation a config asks for, or None (``"standard"``, ``"strong"``)."""
        if config.augmentation in ("gin", "curves", "strong+gin"):
            return BatchIntensityAugmentation(config.augmentation, config.seed)
        return None

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


def build_eval_transform(image_size: int = 256) -> A.Compose:
    """Validation and inference transform: resize only."""
    A = _albumentations()
    return A.Compose([A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)])


# =================================================================================================
# 6. Model
# =================================================================================================


class ResidualConvBlock(nn.Module):
    """Conv3x3-BN-ReLU-Dropout-Conv3x3-BN-ReLU plus a residual connection (1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: ``(B, in, H, W) -> (B, out, H, W)``."""
        return self.body(x) + self.shortcut(x)


class SpatialAttention(nn.Module):
    """Spatial attention (CBAM style): a 7x7 convolution over the channel-wise mean and maximum gives
    a sigmoid map in (0, 1) that reweights every position."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: ``(B, C, H, W) -> (B, C, H, W)``."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class AttentionUNet(nn.Module):
    """The enhanced U-Net: residual blocks and spatial attention on the bridge.

    Encoder of ``depth`` residual blocks (``base``, ``2 base``, ... channels) with max-pooling between
    them; a bridge of ``base * 2**depth`` channels followed by spatial attention; a decoder of
    ``depth`` blocks, each a 2x2 transposed-convolution upsampling, concatenation with the skip
    connection and a residual block; a 1x1 convolution to one channel. The defaults (64, depth 4)
    give 64-128-256-512 and a 1024-channel bridge.

    Returns logits; ``torch.sigmoid`` of them is the kidney probability map. Input height and width
    must be multiples of ``2**depth``. On a CPU the input is put in channels-last memory format
    (:attr:`cpu_channels_last`): the same numbers, about 1.3x faster per training step there
    (``benchmarks/bench_speed.py``); on CUDA the layout is left as it is until measured there.
    """

    cpu_channels_last: bool = True

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 4,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.depth = depth
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(ResidualConvBlock(previous, width, dropout))
            previous = width
        self.pool = nn.MaxPool2d(2)
        bridge = base_channels * 2**depth
        self.bridge = ResidualConvBlock(previous, bridge, dropout)
        self.attention = SpatialAttention()
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        previous = bridge
        for width in reversed(widths):
            self.upsamplers.append(nn.ConvTranspose2d(previous, width, 2, stride=2))
            self.decoders.append(ResidualConvBlock(2 * width, width, dropout))
            previous = width
        self.head = nn.Conv2d(previous, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: ``(B, in, H, W) -> (B, out, H, W)`` logits."""
        multiple = 2**self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} must be a multiple of {multiple} (2**depth).")
        if self.cpu_channels_last and x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.attention(self.bridge(x))
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def build_model(config: Config) -> AttentionUNet:
    """The model a config describes (one input channel, one output channel).

    The initial weights come from ``config.seed`` alone (the global generators are left as they
    were), so one seed always gives one model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AttentionUNet(1, 1, config.base_channels, config.depth, config.dropout)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# =================================================================================================
# 7. Losses and metrics
# =================================================================================================


def focal_loss_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over all pixels.

    ``FL = -alpha_t (1 - p_t)**gamma log(p_t)``, with ``alpha_t = alpha`` on kidney pixels and
    ``1 - alpha`` elsewhere. Computed in float32 from logits through
    ``binary_cross_entropy_with_logits``, so it stays finite for any fp16 logit.

    Shape: logits and targets ``(B, 1, H, W)``; targets 0/1.
    """
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t).pow(gamma) * bce).mean()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` over the whole batch, ``p = sigmoid(logits)``.

    Pooling over the batch keeps the loss defined for slices without kidney: an empty target and an
    all-background prediction give a loss near 0.
    """
    probs = torch.sigmoid(logits.float())
    targets = targets.float()
    intersection = (probs * targets).sum()
    return 1 - (2 * intersection + smooth) / (probs.sum() + targets.sum() + smooth)


class FocalDiceLoss(nn.Module):
    """``focal_weight * focal + dice_weight * soft Dice`` (0.6 and 0.4 by default)."""

    def __init__(
        self, focal_weight: float = 0.6, dice_weight: float = 0.4, alpha: float = 0.25, gamma: float = 2.0
    ) -> None:
        super().__init__()
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.alpha, self.gamma = alpha, gamma

    @classmethod
    def from_config(cls, config: Config) -> FocalDiceLoss:
        """The loss a config describes."""
        return cls(config.focal_weight, config.dice_weight, config.focal_alpha, config.focal_gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss; see :func:`focal_loss_with_logits` and :func:`soft_dice_loss`."""
        return self.focal_weight * focal_loss_with_logits(
            logits, targets, self.alpha, self.gamma
        ) + self.dice_weight * soft_dice_loss(logits, targets)


@dataclass
class ConfusionCounts:
    """Pixel counts of true positives, false positives, false negatives and true negatives."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def metrics(self) -> dict[str, float]:
        """Dice, IoU, precision, recall and F1 of these counts (see :func:`metrics_from_counts`)."""
        return metrics_from_counts(self.tp, self.fp, self.fn)


def confusion_counts(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> ConfusionCounts:
    """Count tp/fp/fn/tn between two binary masks (bool or 0/1) of equal shape, summed over all
    pixels (and over the batch, so an epoch's counts pool all its images)."""
    if isinstance(pred, torch.Tensor):
        p, t = pred.bool(), torch.as_tensor(target, device=pred.device).bool()
        tp = int((p & t).sum())
        fp = int((p & ~t).sum())
        fn = int((~p & t).sum())
    else:
        p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p & ~t))
        fn = int(np.count_nonzero(~p & t))
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from target {tuple(t.shape)}")
    return ConfusionCounts(tp, fp, fn, int(np.prod(p.shape)) - tp - fp - fn)


def metrics_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU, precision, recall and F1 from pixel counts; the one definition used everywhere.

    ``dice = 2tp / (2tp + fp + fn)``, ``iou = tp / (tp + fp + fn)``, ``precision = tp / (tp + fp)``,
    ``recall = tp / (tp + fn)``, ``f1 = 2 P R / (P + R)`` (for pixel counts it equals Dice).

    Empty-mask rule: a ratio whose denominator is 0 means there was nothing to find and nothing was
    found, and scores 1.0 (an empty prediction of an empty mask is perfect). Precision with nothing
    predicted is 1.0 only when nothing was missed (``fn == 0``), else 0.0; recall with no kidney
    present is 1.0 only when nothing was falsely predicted (``fp == 0``), else 0.0. So every value
    lies in [0, 1] and none is NaN.
    """
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be >= 0; got tp={tp}, fp={fp}, fn={fn}")
    dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    iou = 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"dice": dice, "iou": iou, "precision": precision, "recall": recall, "f1": f1}


# =================================================================================================
# 8. Training
# =================================================================================================

METRIC_NAMES = ("loss", "dice", "iou", "precision", "recall", "f1")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch."""


@dataclass
class TrainingResult:
    """What :func:`train_model` did and wrote.

    Attributes:
        history: One row per epoch (epoch, lr, seconds, train_* and val_* metrics).
        best_epoch: Epoch (1-based) with the lowest validation loss.
        best_val_loss: That loss.
        stop_reason: ``"early_stopping"``, ``"num_epochs"`` or ``"time_budget"``.
        output_dir: Where the files below were written.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (see :func:`autocast_dtype`).
    """

    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    stop_reason: str
    output_dir: Path
    precision: str = "fp32"

    @property
    def best_row(self) -> pd.Series:
        """The history row of the best epoch."""
        return self.history.set_index("epoch").loc[self.best_epoch]

    @property
    def files(self) -> dict[str, Path]:
        """The artefacts of the run by role."""
        names = {
            "best_model": BEST_MODEL_NAME,
            "last_checkpoint": LAST_CHECKPOINT_NAME,
            "metrics_csv": METRICS_CSV_NAME,
            "metrics_png": METRICS_PNG_NAME,
            "config_json": CONFIG_JSON_NAME,
        }
        return {role: self.output_dir / name for role, name in names.items()}


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save with ``torch.save``, atomically (see :func:`_atomic_write`)."""
    return _atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kidneyseg checkpoint with ``weights_only=True`` (no pickled code ever runs).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds pickled objects or code, is damaged, or is not a kidneyseg
            checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Train one with notebook 03 or set MODEL_PATH.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for code, RuntimeError for damaged zips
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        raise ValueError(
            f"Refused to load {path}: it is not a plain-tensor kidneyseg checkpoint (weights-only "
            f"loading failed: {reason[:300]}). Only load checkpoints you trust, written by this "
            "module."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kidneyseg checkpoint (no '{CHECKPOINT_FORMAT}' marker).")
    if payload.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} was written by a newer kidneyseg (format "
            f"{payload['format_version']}); update kidneyseg_utils.py."
        )
    return payload


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    )


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(state: torch.Tensor) -> torch.Tensor:
    """A generator state as the CPU ``uint8`` tensor that ``set_rng_state`` accepts, wherever it was
    loaded to (a checkpoint loaded with ``map_location="cuda"`` puts it on the GPU)."""
    return state.detach().to(device="cpu", dtype=torch.uint8)


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`_rng_state`, on any device.

    The CPU, NumPy and Python generators always come back. The CUDA generators come back only when
    this machine has exactly as many GPUs as the one that saved them; otherwise (a CPU run resumed
    on a GPU, or the reverse) the GPUs keep their seeded state, and only GPU-side randomness (none in
    this pipeline: augmentation and shuffling draw on the CPU) differs from an uninterrupted run.
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))  # noqa: NPY002
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available() and torch.cuda.device_count() == len(saved):
        torch.cuda.set_rng_state_all([_cpu_bytes(t) for t in saved])


def _grad_scaler(
    device_type: str, enabled: bool, state: dict[str, Any] | None = None
) -> torch.amp.GradScaler:
    """A GradScaler for fp16 training, with a saved state restored when there is one to restore.

    A checkpoint written where the scaler was off (on a CPU, or with bf16) holds an empty state, and a
    checkpoint from before scalers were saved holds none: both start the scaler afresh instead of
    failing in ``load_state_dict``. A saved state is ignored when the scaler is off here.
    """
    scaler = torch.amp.GradScaler(device_type, enabled=enabled)
    if enabled and state:
        scaler.load_state_dict(state)
    return scaler


def _config_differences(a: dict[str, Any], b: dict[str, Any], fields: Sequence[str]) -> list[str]:
    return [
        f"{name.upper()}: {a.get(name)!r} vs {b.get(name)!r}" for name in fields if a.get(name) != b.get(name)
    ]


def _auto_workers(config: Config, device: torch.device) -> int:
    if config.num_workers is not None:
        return config.num_workers
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    threshold: float,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: torch.dtype | None = None,
    grad_clip_norm: float = 1.0,
    epoch: int = 0,
    bar: Any = None,
    intensity: BatchIntensityAugmentation | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: trains when an optimizer is given, else evaluates.

    Args:
        amp: Autocast dtype (float16 or bfloat16), or None for full precision.
        intensity: Batch intensity randomisation of training batches, if the config asks for it.

    Returns the mean loss and the pooled metrics of the epoch.
    """
    training = optimizer is not None
    model.train(training)
    counts = ConfusionCounts()
    total_loss, total_n = 0.0, 0
    context = torch.enable_grad() if training else torch.inference_mode()
    with context:
        for step, (images, masks) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if training and intensity is not None:
                images = intensity(images, epoch, step)
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(images)
            loss = loss_fn(logits, masks)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"The {'training' if training else 'validation'} loss became {loss.item()} in "
                    f"epoch {epoch}. Lower LEARNING_RATE, check the data for NaN, or set AMP=False. "
                    f"The best checkpoint so far is intact."
                )
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
            n = images.shape[0]
            total_loss += loss.item() * n
            total_n += n
            counts = counts + confusion_counts(
                torch.sigmoid(logits.detach().float()) > threshold, masks > 0.5
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / total_n:.4f}", dice=f"{counts.metrics()['dice']:.3f}")
    if total_n == 0:
        raise ValueError("The data loader yielded no batch.")
    return {"loss": total_loss / total_n, **counts.metrics()}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles); bf16 autocast on a CPU
    without it is emulated and slower than fp32."""
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check() for check in checks if check is not None)


def autocast_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype a run uses on ``device`` for ``Config.amp`` (None: full precision).

    CUDA: :func:`amp_dtype` of the device unless ``amp`` is False. CPU: bf16 when ``amp`` is True and
    :func:`cpu_has_native_bf16`, else None.
    """
    if amp is False:
        return None
    if device.type == "cuda":
        return amp_dtype(torch.cuda.get_device_capability(device))
    if device.type == "cpu" and amp is True and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"``: how a run's forward passes were computed."""
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def amp_dtype(capability: tuple[int, int] | None) -> torch.dtype | None:
    """The autocast dtype for a CUDA device of compute ``capability`` (None: no CUDA, no autocast).

    bf16 needs compute capability 8.0 (Ampere) or newer; a T4 (7.5) gets fp16, which needs a
    GradScaler; never bf16 below 8.0.
    """
    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def wrap_for_devices(
    model: nn.Module, device: torch.device, multi_gpu: bool, device_count: int | None = None
) -> nn.Module:
    """Wrap ``model`` in ``nn.DataParallel`` when ``multi_gpu`` is set and more than one CUDA device is
    visible (``device_count`` overrides the count, for tests); otherwise return it unchanged.
    Checkpoints always store the unwrapped model, so they load anywhere."""
    count = torch.cuda.device_count() if device_count is None else device_count
    if multi_gpu and device.type == "cuda" and count > 1:
        return nn.DataParallel(model, device_ids=list(range(count)))
    return model


def _oom_message(config: Config) -> str:
    return (
        f"CUDA ran out of memory with BATCH_SIZE={config.batch_size}, IMAGE_SIZE={config.image_size} "
        f"and BASE_CHANNELS={config.base_channels}. Lower BATCH_SIZE first (e.g. "
        f"{max(1, config.batch_size // 2)}), then IMAGE_SIZE or BASE_CHANNELS, and restart the kernel."
    )


def train_model(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    config: Config,
    output_dir: str | os.PathLike,
    device: torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
    log: bool = True,
) -> TrainingResult:
    """Train ``model`` and write the run's artefacts to ``output_dir``.

    AdamW; ReduceLROnPlateau on the validation loss; early stopping after ``patience`` epochs
    without a lower validation loss; gradient clipping; on CUDA, mixed precision (fp16 with a
    GradScaler on a T4, bf16 from compute capability 8.0), optionally on several GPUs.
    After each epoch: the best model (by validation loss) as ``best_kidney_segmentation_model.pth``,
    a resumable ``last_checkpoint.pth``, ``training_metrics.csv``; at the end the six-panel
    ``training_metrics.png``. Every write is atomic.

    Args:
        model: The network (its weights are trained in place).
        train_dataset: Training items (a :class:`KidneyDataset`).
        val_dataset: Validation items.
        config: The run's settings.
        output_dir: Folder for the artefacts.
        device: Compute device; chosen by :func:`get_device` when ``None``.
        resume: Continue from ``last_checkpoint.pth`` in ``output_dir``.
        overwrite: Allow replacing an earlier run's best model in ``output_dir``.
        extra_state: Plain-typed extras stored in both checkpoints (e.g. the split).
        progress: Show live progress bars (loss and Dice) in an interactive front end; headless
            runs never get widget bars (see :func:`interactive_frontend`).
        log: Print one plain line per epoch, which headless runs ("Save & Run All", papermill)
            record while widget bars stay blank there.

    Raises:
        FileExistsError: ``output_dir`` holds a best model and neither ``resume`` nor ``overwrite``.
        ValueError: ``batch_size`` exceeds the training set, or the resume checkpoint does not match.
        TrainingDivergedError: the loss became NaN or infinite.
        RuntimeError: CUDA ran out of memory (the message names the levers).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out / BEST_MODEL_NAME, out / LAST_CHECKPOINT_NAME
    device = device or get_device()
    if len(train_dataset) < config.batch_size:
        raise ValueError(
            f"BATCH_SIZE={config.batch_size} exceeds the {len(train_dataset)} training images; "
            f"use a BATCH_SIZE of at most {len(train_dataset)}."
        )
    if not resume and best_path.exists() and not overwrite:
        raise FileExistsError(
            f"{best_path} exists from an earlier run. Set RESUME=True to continue it, "
            "OVERWRITE=True to replace it, or choose another OUTPUT_DIR."
        )
    for stale_tmp in out.glob(".*.pth.tmp-*"):  # left by a process killed while saving
        stale_tmp.unlink(missing_ok=True)
    seed_everything(config.seed)
    base = _unwrap(model)
    base.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = autocast_dtype(device, config.amp)
    if log:
        print(f"training on {device} in {precision_name(amp)} (AMP={config.amp!r})", flush=True)
    runner = wrap_for_devices(base, device, config.multi_gpu)
    optimizer = torch.optim.AdamW(
        base.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
    )
    loss_fn = FocalDiceLoss.from_config(config)
    history: list[dict[str, float]] = []
    best_loss, best_epoch, stale, start_epoch = math.inf, 0, 0, 1
    state = None
    if resume:
        # Loaded to the CPU whatever the device: the optimizer moves its tensors to the parameters'
        # device itself, and generator states must stay CPU byte tensors.
        state = load_checkpoint(last_path, map_location="cpu") if last_path.exists() else None
        if state is None:
            raise FileNotFoundError(
                f"RESUME=True but there is no {LAST_CHECKPOINT_NAME} in {out}; set RESUME=False to "
                "start a new run."
            )
        diffs = _config_differences(
            state["config"],
            config.to_dict(),
            CHECKPOINT_FIELDS
            + ("augmentation", "seed", "group_regex", "val_fraction", "test_fraction", "folds", "fold"),
        )
        if diffs:
            raise ValueError(f"Cannot resume {last_path}: the settings differ ({'; '.join(diffs)}).")
        base.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        history = [dict(row) for row in state["history"]]
        best_loss, best_epoch, stale = state["best_val_loss"], state["best_epoch"], state["stale_epochs"]
        start_epoch = state["epoch"] + 1
        _set_rng_state(state["rng_state"])
        print(f"resuming {last_path} after epoch {state['epoch']} (best epoch {best_epoch})")
    scaler = _grad_scaler(device.type, amp == torch.float16, state.get("scaler_state") if state else None)
    config.to_json(out / CONFIG_JSON_NAME)

    workers = _auto_workers(config, device)
    pin = device.type == "cuda"
    loader_kw: dict[str, Any] = dict(
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers > 0,
    )
    sampler = EpochShuffleSampler(len(train_dataset), config.seed)
    train_loader = DataLoader(
        train_dataset,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.seed),
        **loader_kw,
    )
    val_loader = DataLoader(val_dataset, shuffle=False, **loader_kw)

    started = time.monotonic()
    stop_reason = "num_epochs"
    epoch_bar = _progress_bar(
        range(start_epoch, config.num_epochs + 1),
        progress,
        desc="epochs",
        unit="epoch",
        initial=start_epoch - 1,
        total=config.num_epochs,
    )
    extra = extra_state or {}
    try:
        for epoch in epoch_bar:
            tic = time.monotonic()
            sampler.set_epoch(epoch)
            bar = _progress_bar(
                None, progress, total=len(train_loader) + len(val_loader), desc=f"epoch {epoch}", leave=False
            )
            common = dict(
                loss_fn=loss_fn,
                device=device,
                threshold=config.inference_threshold,
                amp=amp,
                epoch=epoch,
                bar=bar,
            )
            train_m = _run_epoch(
                runner,
                train_loader,
                intensity=BatchIntensityAugmentation.for_config(config),
                optimizer=optimizer,
                scaler=scaler,
                grad_clip_norm=config.grad_clip_norm,
                **common,
            )
            val_m = _run_epoch(runner, val_loader, **common)
            bar.close()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step(val_m["loss"])
            row = {"epoch": epoch, "lr": lr, "seconds": time.monotonic() - tic}
            row.update({f"train_{k}": v for k, v in train_m.items()})
            row.update({f"val_{k}": v for k, v in val_m.items()})
            history.append(row)
            improved = val_m["loss"] < best_loss
            payload = dict(
                model=base, config=config, epoch=epoch, history=history, extra=extra, precision=amp
            )
            if improved:
                best_loss, best_epoch, stale = val_m["loss"], epoch, 0
                save_checkpoint(_checkpoint_payload("best", **payload), best_path)
            else:
                stale += 1
            last = _checkpoint_payload("last", **payload)
            last.update(
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                scaler_state=scaler.state_dict(),
                best_val_loss=best_loss,
                best_epoch=best_epoch,
                stale_epochs=stale,
                rng_state=_rng_state(),
            )
            save_checkpoint(last, last_path)
            _write_history_csv(history, out / METRICS_CSV_NAME)
            epoch_bar.set_postfix(
                val_loss=f"{val_m['loss']:.4f}", val_dice=f"{val_m['dice']:.3f}", best=best_epoch
            )
            if log:
                print(_epoch_line(row, config.num_epochs, best_epoch, improved), flush=True)
            if stale >= config.patience:
                stop_reason = "early_stopping"
                break
            if config.max_train_minutes is not None:
                elapsed = time.monotonic() - started
                per_epoch = elapsed / (epoch - start_epoch + 1)
                if elapsed + per_epoch > config.max_train_minutes * 60 and epoch < config.num_epochs:
                    stop_reason = "time_budget"
                    break
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError(_oom_message(config)) from None
    finally:
        epoch_bar.close()
    if not history:
        raise ValueError(f"Nothing to train: the checkpoint already reached NUM_EPOCHS={config.num_epochs}.")
    frame = pd.DataFrame(history)
    fig = plot_training_history(frame, best_epoch=best_epoch)
    _atomic_write(
        out / METRICS_PNG_NAME, lambda h: fig.savefig(h, format="png", dpi=110, bbox_inches="tight")
    )
    plt.close(fig)
    return TrainingResult(frame, best_epoch, best_loss, stop_reason, out, precision_name(amp))


def _checkpoint_payload(
    kind: str,
    model: nn.Module,
    config: Config,
    epoch: int,
    history: list[dict[str, float]],
    extra: dict[str, Any],
    precision: torch.dtype | None = None,
) -> dict[str, Any]:
    """What both checkpoints hold: format marker, config, CPU weights, epoch, history, the precision
    the run computed in and ``extra`` (the split); ``kind`` is "best" or "last", and the last one adds
    the optimizer and RNG states."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "history": [dict(row) for row in history],
        "torch_version": str(torch.__version__),
        "precision": precision_name(precision),
        **extra,
    }


def _epoch_line(row: dict[str, float], num_epochs: int, best_epoch: int, improved: bool) -> str:
    """One plain log line for an epoch: losses, Dice, learning rate, seconds, and the best epoch."""
    return (
        f"epoch {int(row['epoch']):>3}/{num_epochs}  train loss {row['train_loss']:.4f} dice "
        f"{row['train_dice']:.3f} | val loss {row['val_loss']:.4f} dice {row['val_dice']:.3f} | "
        f"lr {row['lr']:.2e}  {row['seconds']:.1f} s  best {best_epoch}{'  *' if improved else ''}"
    )


def _write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    _atomic_write(path, pd.DataFrame(history).to_csv(index=False))


def plot_training_history(history: pd.DataFrame, best_epoch: int | None = None) -> Any:
    """The six-panel figure: loss, Dice, IoU, precision, recall, F1, train and validation per panel.

    Args:
        history: Rows as written to ``training_metrics.csv``.
        best_epoch: Marked with a dashed line when given.
    """
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, name in zip(axes.flat, METRIC_NAMES):
        ax.plot(history["epoch"], history[f"train_{name}"], label="train", marker=".")
        ax.plot(history["epoch"], history[f"val_{name}"], label="validation", marker=".")
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best ({best_epoch})")
        ax.set_title(
            "Dice" if name == "dice" else name.upper() if name in ("iou", "f1") else name.capitalize()
        )
        ax.set_xlabel("epoch")
        if name != "loss":
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training metrics (validation metrics pooled over all validation pixels)")
    fig.tight_layout()
    return fig


# =================================================================================================
# 9. Inference and evaluation
# =================================================================================================


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", expected: Config | None = None
) -> tuple[AttentionUNet, Config, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint, in eval mode.

    Args:
        path: A checkpoint written by :func:`train_model`.
        device: Where to put the model.
        expected: If given, a config whose architecture fields must equal the stored ones.

    Returns:
        ``(model, config, checkpoint)``.

    Raises:
        ValueError: unsafe or foreign file, or a config that differs (the message says which field).
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    config = Config.from_dict(checkpoint["config"])
    if expected is not None:
        diffs = _config_differences(checkpoint["config"], expected.to_dict(), CHECKPOINT_FIELDS)
        if diffs:
            raise ValueError(f"{path} was trained with other settings: {'; '.join(diffs)}.")
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the stored architecture ({str(exc)[:300]}).") from None
    return model.to(device).eval(), config, checkpoint


class FoldEnsemble(nn.Module):
    """The cross-validation fold models as one network: its logits are those of the mean of the
    models' probabilities, so every function that takes a model (TTA, evaluation, folder prediction)
    averages the folds' probabilities."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(probs, eps=1e-6)


MODEL_SET_FIELDS = CHECKPOINT_FIELDS + ("seed", "group_regex", "test_fraction", "folds")


def load_models(
    paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu"
) -> tuple[list[AttentionUNet], Config, list[dict[str, Any]]]:
    """Load one checkpoint, or the fold runs of one cross-validation, in eval mode.

    Several checkpoints must be folds of one run: the same architecture, preprocessing, split seed,
    test split and number of folds, and each fold once.

    Returns:
        ``(models, config of the first, checkpoints)``, folds in order.

    Raises:
        ValueError: checkpoints that are not folds of one run, naming the file and what differs.
    """
    loaded = sorted(
        ((Path(path), *load_model(path, device)) for path in paths),
        key=lambda item: -1 if item[2].fold is None else item[2].fold,
    )
    first_path, _, first, first_checkpoint = loaded[0]
    if len(loaded) > 1:
        folds = [config.fold for _, _, config, _ in loaded]
        if None in folds or len(set(folds)) != len(folds):
            raise ValueError(
                f"MODEL_PATH holds {len(loaded)} models, but their FOLD values are {folds}: an ensemble "
                "takes the fold runs of one cross-validation (FOLD=0, 1, ...), each once."
            )
        for path, _, config, checkpoint in loaded[1:]:
            diffs = _config_differences(first.to_dict(), config.to_dict(), MODEL_SET_FIELDS)
            if checkpoint.get("split", {}).get("test") != first_checkpoint.get("split", {}).get("test"):
                diffs.append("the held-out test split")
            if diffs:
                raise ValueError(
                    f"Fold FOLD={config.fold} ({path}) differs from fold FOLD={first.fold} ({first_path}): "
                    f"{'; '.join(diffs)}. Ensemble only the folds of one cross-validation."
                )
    return [item[1] for item in loaded], first, [item[3] for item in loaded]


_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    tta: bool = False,
    normalization: str = "minmax",
    amp: torch.dtype | None | bool | str = "cuda",
) -> np.ndarray:
    """Kidney probability maps for ``(N, S, S)`` uint8 images already at the model's size.

    Args:
        model: The network (put in eval mode here).
        images: Preprocessed uint8 images at the model's input size (see :func:`model_input`).
        device: Where the model is.
        batch_size: Images per forward pass.
        tta: Test-time augmentation: average the probabilities of the image and of its horizontal,
            vertical and double flips, each flipped back.
        normalization: The model's ``Config.normalization``; each image is normalised by
            :func:`normalize_intensity` with its own constants, as in training.
        amp: Autocast dtype for the forward passes (TTA included), None for full precision, or a
            ``Config.amp`` value (True, False, ``"cuda"``) resolved by :func:`autocast_dtype` as in
            training. Probabilities are always returned in fp32.

    Returns:
        ``(N, S, S)`` float32 probabilities in [0, 1].
    """
    model.eval()
    device = torch.device(device)
    if isinstance(amp, (bool, str)):
        amp = autocast_dtype(device, amp)
    flips = _TTA_FLIPS if tta else ((),)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.from_numpy(np.stack([normalize_intensity(im, normalization) for im in chunk]))
        x = batch.unsqueeze(1).to(device)
        probs = torch.zeros_like(x)
        for dims in flips:
            xf = torch.flip(x, dims) if dims else x
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(xf)
            p = torch.sigmoid(logits.float())
            probs += torch.flip(p, dims) if dims else p
        out.append((probs / len(flips)).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def postprocess_mask(mask: np.ndarray, min_fraction: float = 0.0005, max_components: int = 2) -> np.ndarray:
    """Drop connected components smaller than ``min_fraction`` of the image, then keep at most the
    ``max_components`` largest (two kidneys). 8-connectivity; returns uint8 0/1."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return binary
    areas = stats[1:, cv2.CC_STAT_AREA]
    min_area = min_fraction * binary.size
    order = np.argsort(-areas, kind="stable")[:max_components]
    keep = [int(i) + 1 for i in order if areas[i] >= min_area]
    return np.isin(labels, keep).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    eroded = cv2.erode(
        mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    return mask & ~eroded.astype(bool)


def hausdorff95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between mask outlines, in pixels.

    The larger of the two directed 95th percentiles (prediction outline to target outline and
    back), with exact Euclidean distance transforms. Empty-mask rule: both empty gives 0.0; exactly
    one empty (a missed or a false kidney) gives the worst distance, the image diagonal, so the
    value is never NaN and never drops out of a mean.
    """
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target {t.shape}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(math.hypot(*p.shape))
    bp, bt = _boundary(p), _boundary(t)
    to_t = cv2.distanceTransform((~bt).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    to_p = cv2.distanceTransform((~bp).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(max(np.percentile(to_t[bp], 95), np.percentile(to_p[bt], 95)))


@dataclass
class EvaluationSet:
    """Images at the model's size and masks at their original size, for honest scoring.

    Attributes:
        pairs: The pairs, in order.
        images: ``(N, S, S)`` uint8 model inputs (resized and preprocessed as in training).
        masks: Original-size 0/1 masks (``None`` entries when predicting a folder without masks).
        originals: Original-size uint8 images (for pictures).
        normalization: The model's normalisation, applied to ``images`` at prediction time.
        amp: The model's ``Config.amp``, the precision of its forward passes.
    """

    pairs: list[SamplePair]
    images: np.ndarray
    masks: list[np.ndarray | None]
    originals: list[np.ndarray]
    normalization: str = "minmax"
    amp: bool | str = "cuda"

    def __len__(self) -> int:
        return len(self.pairs)


def load_evaluation_set(
    pairs: Sequence[SamplePair], config: Config, skip_bad_files: bool = False
) -> EvaluationSet:
    """Read pairs for evaluation: model inputs as in training, masks kept at their original size."""
    kept, images, masks, originals = [], [], [], []
    for pair in pairs:
        try:
            image, mask = load_pair(pair)
        except ImageReadError:
            if skip_bad_files:
                continue
            raise
        kept.append(pair)
        originals.append(image)
        masks.append(mask)
        images.append(model_input(image, config.image_size, config.preprocessing))
    if not kept:
        raise ValueError("No readable pairs to evaluate.")
    return EvaluationSet(kept, np.stack(images), masks, originals, config.normalization, config.amp)


SPLIT_PARTS = ("train", "val", "test")


def checkpoint_split(
    checkpoint: dict[str, Any], config: Config, part: str = "test", data_dir: str | os.PathLike | None = None
) -> list[SamplePair]:
    """Reproduce one part of a training run's split exactly, from the keys stored in its checkpoint.

    Args:
        checkpoint: As returned by :func:`load_model`.
        config: The run's config (for ``group_regex``).
        part: ``"test"`` (held out, never used to choose anything), ``"val"`` (chose the learning-rate
            steps, the stopping epoch and the best checkpoint: scores on it are optimistic) or
            ``"train"``.
        data_dir: The data root; by default the one recorded at training time.

    Returns:
        The pairs, in the stored order; empty for a test split the run did not hold out.

    Raises:
        ValueError: the checkpoint has no split, or files of the split are missing under the root.
    """
    if part not in SPLIT_PARTS:
        raise ValueError(f"part must be one of {SPLIT_PARTS}; got {part!r}.")
    split = checkpoint.get("split")
    if not split:
        raise ValueError("This checkpoint records no split; evaluate a TEST_DIR instead.")
    keys = split.get(part, [])
    if not keys:
        return []
    root = data_dir if data_dir not in (None, "", "auto") else checkpoint.get("data_dir")
    if not root:
        raise ValueError("The checkpoint does not record its data folder; set DATA_DIR.")
    if not Path(root).exists():
        raise FileNotFoundError(
            f"The data folder recorded at training time, {root}, does not exist here. Set DATA_DIR to "
            "where the same data is now (on Kaggle: attach the dataset the model was trained on)."
        )
    by_key = {p.key: p for p in index_dataset(root, config.group_regex, config.mask_labels).pairs}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(
            f"{len(missing)} {part} files of the training run are not under {root} "
            f"(first: {missing[0]}). Point DATA_DIR at the data the model was trained on."
        )
    return [by_key[k] for k in keys]


def _timed_probabilities(
    model: nn.Module, data: EvaluationSet, device: torch.device | str, tta: bool, batch_size: int = 16
) -> tuple[list[np.ndarray], float]:
    """Probabilities resized back to each original size, and milliseconds per slice."""
    tic = time.perf_counter()
    probs = predict_probabilities(
        model,
        data.images,
        device,
        batch_size=batch_size,
        tta=tta,
        normalization=data.normalization,
        amp=data.amp,
    )
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - tic) * 1000 / max(1, len(data))
    resized = []
    for prob, original in zip(probs, data.originals):
        h, w = original.shape
        resized.append(cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR))
    return resized, elapsed


def binarize_prediction(prob: np.ndarray, threshold: float, postprocess: bool = False) -> np.ndarray:
    """Threshold a probability map (``> threshold``), optionally followed by :func:`postprocess_mask`."""
    mask = (prob > threshold).astype(np.uint8)
    return postprocess_mask(mask) if postprocess else mask


def score_predictions(
    data: EvaluationSet, probs: Sequence[np.ndarray], threshold: float = 0.5, postprocess: bool = False
) -> pd.DataFrame:
    """Per-image metrics at the original size: Dice, IoU, precision, recall, F1, HD95 and areas.

    Metrics follow :func:`metrics_from_counts` and :func:`hausdorff95` (their empty-mask rules).
    """
    rows = []
    for pair, prob, mask in zip(data.pairs, probs, data.masks):
        pred = binarize_prediction(prob, threshold, postprocess)
        counts = confusion_counts(pred, mask)
        rows.append(
            {
                "source": pair.source,
                "case": pair.case,
                "name": pair.name,
                "height": mask.shape[0],
                "width": mask.shape[1],
                **counts.metrics(),
                "hd95": hausdorff95(pred, mask),
                "pred_area": int(pred.sum()),
                "true_area": int(mask.sum()),
                "tp": counts.tp,
                "fp": counts.fp,
                "fn": counts.fn,
            }
        )
    return pd.DataFrame(rows)


def case_scores(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: Dice pooled over the patient's slices, with slice and kidney counts.

    A patient is ``source/case`` (two sources never share a patient). Pooling follows
    :func:`metrics_from_counts`, so a patient without kidney and without any predicted kidney scores
    1.0, and one without kidney but with a false kidney 0.0.
    """
    keys = per_image["source"].astype(str) + "/" + per_image["case"].astype(str)
    rows = []
    for key, part in per_image.groupby(keys, sort=True):
        tp, fp, fn = (int(part[c].sum()) for c in ("tp", "fp", "fn"))
        rows.append(
            {
                "patient": key,
                "source": part["source"].iloc[0],
                "slices": len(part),
                "slices_with_kidney": int((part["true_area"] > 0).sum()),
                "dice": metrics_from_counts(tp, fp, fn)["dice"],
            }
        )
    return pd.DataFrame(rows, columns=["patient", "source", "slices", "slices_with_kidney", "dice"])


def summarize_scores(per_image: pd.DataFrame) -> dict[str, float]:
    """Pooled (global counts), mean-per-image and mean-per-patient metrics.

    ``mean_case_dice`` (with ``std_case_dice`` over ``n_cases`` patients) averages each patient's
    Dice pooled over its slices (:func:`case_scores`): the figure that 2D-on-volume tables report
    (Synapse multi-organ, CHAOS).
    """
    tp, fp, fn = (int(per_image[c].sum()) for c in ("tp", "fp", "fn"))
    summary: dict[str, float] = {
        "n_images": len(per_image),
        "n_with_kidney": int((per_image["true_area"] > 0).sum()),
    }
    summary.update({f"pooled_{k}": v for k, v in metrics_from_counts(tp, fp, fn).items()})
    for name in ("dice", "iou", "precision", "recall", "f1", "hd95"):
        summary[f"mean_{name}"] = float(per_image[name].mean())
    with_kidney = per_image[per_image["true_area"] > 0]
    summary["mean_dice_with_kidney"] = float(with_kidney["dice"].mean()) if len(with_kidney) else float("nan")
    summary["mean_hd95_with_kidney"] = float(with_kidney["hd95"].mean()) if len(with_kidney) else float("nan")
    summary["median_hd95"] = float(per_image["hd95"].median())
    cases = case_scores(per_image)
    summary["n_cases"] = len(cases)
    summary["mean_case_dice"] = float(cases["dice"].mean())
    summary["std_case_dice"] = float(cases["dice"].std(ddof=0))
    return summary


def evaluate_model(
    model: nn.Module,
    data: EvaluationSet,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    tta: bool = False,
    postprocess: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any], list[np.ndarray]]:
    """Predict, resize back, score. Returns ``(per_image, summary, probabilities)``."""
    probs, ms = _timed_probabilities(model, data, device, tta)
    per_image = score_predictions(data, probs, threshold, postprocess)
    summary = summarize_scores(per_image)
    models = len(model.members) if isinstance(model, FoldEnsemble) else 1
    summary.update(threshold=threshold, tta=tta, postprocess=postprocess, ms_per_slice=ms, models=models)
    return per_image, summary, probs


def write_evaluation(
    per_image: pd.DataFrame, summary: dict[str, Any], output_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``evaluation_per_image.csv`` and ``evaluation_summary.json`` (flat keys)."""
    out = Path(output_dir)
    csv_path, json_path = out / "evaluation_per_image.csv", out / "evaluation_summary.json"
    _atomic_write(csv_path, per_image.to_csv(index=False))
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in summary.items()}
    _atomic_write(json_path, json.dumps(plain, indent=2, default=str) + "\n")
    return {"per_image_csv": csv_path, "summary_json": json_path}


SPLIT_LABELS = {
    "test": "held-out test split (chose nothing: report these)",
    "val": "validation split, used for model selection (optimistic)",
    "oof": "out-of-fold validation: each patient scored by the fold model that did not train on it "
    "(chose each fold's stopping epoch: optimistic)",
}
SPLIT_TITLES = {
    "test": "held-out test split",
    "val": "validation split (optimistic)",
    "oof": "out-of-fold validation (optimistic)",
}


@dataclass
class SplitEvaluation:
    """One part of a run's split, scored: what :func:`evaluate_split` returns.

    Attributes:
        part: ``"test"`` or ``"val"``.
        label: What the numbers mean (:data:`SPLIT_LABELS`).
        data: The images and masks.
        scores: Per-image metrics (:func:`score_predictions`).
        summary: Pooled, per-image and per-patient summary, with the settings.
        probs: Probability maps at each image's original size.
        files: The CSV and JSON written.
    """

    part: str
    label: str
    data: EvaluationSet
    scores: pd.DataFrame
    summary: dict[str, Any]
    probs: list[np.ndarray]
    files: dict[str, Path]

    @property
    def title(self) -> str:
        """A short name for figures (:data:`SPLIT_TITLES`)."""
        return SPLIT_TITLES[self.part]


def evaluate_split(
    model: nn.Module,
    checkpoint: dict[str, Any],
    config: Config,
    part: str,
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    tta: bool = False,
    postprocess: bool = False,
    data_dir: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SplitEvaluation | None:
    """Score one part of the training run's split and write it to ``output_dir/evaluation_<part>``
    (``evaluation_test_split`` for the test part). Returns None when the run held out no such part.

    The summary says what the numbers are (``evaluated_on``): the test split chose nothing; the
    validation split chose the learning-rate steps, the stopping epoch and the best checkpoint, so
    its scores are optimistic.
    """
    pairs = checkpoint_split(checkpoint, config, part, data_dir)
    if not pairs:
        return None
    data = load_evaluation_set(pairs, config)
    scores, summary, probs = evaluate_model(model, data, device, threshold, tta=tta, postprocess=postprocess)
    summary.update(dict(settings or {}), evaluated_on=SPLIT_LABELS[part])
    folder = "evaluation_test_split" if part == "test" else f"evaluation_{part}"
    files = write_evaluation(scores, summary, Path(output_dir) / folder)
    return SplitEvaluation(
        part=part,
        label=SPLIT_LABELS[part],
        data=data,
        scores=scores,
        summary=summary,
        probs=probs,
        files=files,
    )


def evaluate_out_of_fold(
    models: Sequence[nn.Module],
    checkpoints: Sequence[dict[str, Any]],
    config: Config,
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    tta: bool = False,
    postprocess: bool = False,
    data_dir: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SplitEvaluation:
    """Score every fold's validation patients with that fold's model: out-of-fold predictions,
    every patient outside the test split scored once by a model that did not train on it. Writes
    ``output_dir/evaluation_out_of_fold``; per-image scores carry their ``fold``.

    The summary holds the pooled figures over all folds, the mean and spread over patients
    (``mean_case_dice``, ``std_case_dice``) and over folds (``fold_pooled_dice_mean`` and ``_std``),
    and ``folds`` (how many of ``config.folds`` were there).
    """
    parts, per_fold = [], []
    for model, checkpoint in zip(models, checkpoints):
        fold = Config.from_dict(checkpoint["config"]).fold
        data = load_evaluation_set(checkpoint_split(checkpoint, config, "val", data_dir), config)
        scores, summary, probs = evaluate_model(
            model, data, device, threshold, tta=tta, postprocess=postprocess
        )
        parts.append((data, scores.assign(fold=fold), probs))
        per_fold.append(summary["pooled_dice"])
    keys = [p.key for data, _, _ in parts for p in data.pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(
            "The folds' validation splits overlap: these are not the folds of one cross-validation."
        )
    data = EvaluationSet(
        [p for d, _, _ in parts for p in d.pairs],
        np.concatenate([d.images for d, _, _ in parts]),
        [m for d, _, _ in parts for m in d.masks],
        [o for d, _, _ in parts for o in d.originals],
        config.normalization,
        config.amp,
    )
    scores = pd.concat([s for _, s, _ in parts], ignore_index=True)
    probs = [p for _, _, pr in parts for p in pr]
    summary = summarize_scores(scores)
    summary.update(
        threshold=threshold,
        tta=tta,
        postprocess=postprocess,
        models=1,
        folds=len(models),
        folds_planned=config.folds,
        fold_pooled_dice_mean=float(np.mean(per_fold)),
        fold_pooled_dice_std=float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
    )
    summary.update(dict(settings or {}), evaluated_on=SPLIT_LABELS["oof"])
    files = write_evaluation(scores, summary, Path(output_dir) / "evaluation_out_of_fold")
    return SplitEvaluation("oof", SPLIT_LABELS["oof"], data, scores, summary, probs, files)


def evaluate_validation(
    models: Sequence[nn.Module], checkpoints: Sequence[dict[str, Any]], config: Config, **evaluate: Any
) -> SplitEvaluation | None:
    """The validation figures of one run (:func:`evaluate_split` on ``"val"``) or, for the fold
    models of a cross-validation, the out-of-fold ones (:func:`evaluate_out_of_fold`). ``evaluate``:
    the keyword arguments of those two."""
    if len(models) == 1:
        return evaluate_split(models[0], checkpoints[0], config, "val", **evaluate)
    return evaluate_out_of_fold(models, checkpoints, config, **evaluate)


def fold_comparison(
    models: Sequence[nn.Module],
    data: EvaluationSet,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    tta: bool = False,
    postprocess: bool = False,
    fold_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Each fold model alone on ``data`` (the test split), their mean, and their ensemble
    (:class:`FoldEnsemble`): pooled Dice and IoU and the mean Dice per patient. ``fold_ids`` names
    the folds (default 0, 1, ...)."""
    keys = ("pooled_dice", "pooled_iou", "mean_case_dice")
    rows = []
    for k, model in enumerate([*models, FoldEnsemble(models)]):
        _, summary, _ = evaluate_model(model, data, device, threshold, tta=tta, postprocess=postprocess)
        name = f"fold {(fold_ids or range(len(models)))[k]}" if k < len(models) else "ensemble"
        rows.append({"model": name, **{key: summary[key] for key in keys}})
    table = pd.DataFrame(rows)
    mean = {"model": "mean single fold", **table.iloc[: len(models)][list(keys)].mean().to_dict()}
    return pd.concat([table.iloc[:-1], pd.DataFrame([mean]), table.iloc[-1:]], ignore_index=True)


REPORTED_KEYS = (
    "n_images",
    "n_cases",
    "pooled_dice",
    "mean_dice",
    "mean_case_dice",
    "std_case_dice",
    "pooled_iou",
    "mean_hd95",
    "median_hd95",
    "ms_per_slice",
)


def summary_table(evaluations: Mapping[str, dict[str, Any] | None]) -> pd.DataFrame:
    """The key figures of several summaries side by side, one column per labelled summary."""
    columns = {
        name: {k: summary.get(k) for k in REPORTED_KEYS} for name, summary in evaluations.items() if summary
    }
    return pd.DataFrame(columns)


# ----- familiarity: does a new image look like anything the model was trained on? -------------------

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
    return np.array(
        [
            *np.percentile(x, (1, 5, 25, 50, 75, 95, 99)),
            x.mean(),
            x.std(),
            (x < 10).mean() * 100,
            (x > 245).mean() * 100,
            np.hypot(gx, gy).mean(),
            cv2.Laplacian(x, cv2.CV_32F).std(),
        ],
        np.float32,
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
    to the others). Plain types, for the checkpoint.

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
    return {
        "features": list(FAMILIARITY_FEATURES),
        "center": center.tolist(),
        "scale": scale.tolist(),
        "reference": z.round(4).tolist(),
        "threshold": float(FAMILIARITY_MARGIN * np.percentile(own, 99)),
    }


def familiarity(images: np.ndarray, reference: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """Flag images unlike anything the model was trained on, before trusting their predictions.

    Args:
        images: ``(N, S, S)`` uint8 model inputs (resized and preprocessed as in training).
        reference: ``checkpoint["familiarity"]`` (:func:`familiarity_reference`); None for a
            checkpoint that stores none, which returns None.

    Returns:
        One row per image: ``novelty`` (its distance over the threshold: above 1 is farther from
        the training images than almost any training image is from the others) and ``unfamiliar``.
    """
    if not reference:
        return None
    if list(reference["features"]) != list(FAMILIARITY_FEATURES):
        raise ValueError("This checkpoint's familiarity statistics come from another kidneyseg version.")
    z = (np.stack([image_features(im) for im in images]) - np.asarray(reference["center"])) / np.asarray(
        reference["scale"]
    )
    novelty = _neighbour_distance(z, np.asarray(reference["reference"], np.float32)) / reference["threshold"]
    return pd.DataFrame({"novelty": novelty, "unfamiliar": novelty > 1.0})


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.45,
    contour: bool = True,
) -> np.ndarray:
    """An RGB uint8 picture of a gray image with the mask blended in ``color`` (and its outline)."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    m = mask.astype(bool)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    if contour and m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, 1)
    return out


def predict_folder(
    model: nn.Module,
    config: Config,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    threshold: float | None = None,
    tta: bool = False,
    postprocess: bool = False,
    overwrite: bool = False,
    batch_size: int = 16,
    reference: Mapping[str, Any] | None = None,
    skip_bad_files: bool = False,
) -> pd.DataFrame:
    """Predict every image in a folder (or its images/ subfolder) and write the results.

    Writes ``output_dir/masks/<stem>.png`` (0/255, each input's original size),
    ``output_dir/overlays/<stem>.png`` and ``output_dir/predictions.csv``, the table it returns: one
    row per image with its size and kidney area,
    and, given the checkpoint's familiarity ``reference``, its ``novelty`` and ``unfamiliar`` flag
    (:func:`familiarity`). Images are listed as training lists them: two files of one name
    (``a.png`` and ``a.jpg``) are an error, since both would write ``masks/a.png``. With
    ``skip_bad_files`` an unreadable image is skipped and listed in the table (``problem``).

    Raises:
        ValueError: ``output_dir`` is the input folder or inside it, or two images share a name.
        FileExistsError: a result file exists and ``overwrite`` is False.
        FileNotFoundError: no images in ``input_dir``.
        ImageReadError: an unreadable image, unless ``skip_bad_files``.
    """
    src, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"PREDICT_DIR {str(src)!r} is not a folder of images.")
    if out == src or src in out.parents:
        raise ValueError(
            f"Refusing to write predictions into the input folder {src}; choose an OUTPUT_DIR outside it."
        )
    files = list(_image_files(src / "images" if (src / "images").is_dir() else src).values())
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {src}.")
    threshold = config.inference_threshold if threshold is None else threshold
    targets = [(out / "masks" / f"{f.stem}.png", out / "overlays" / f"{f.stem}.png") for f in files]
    table_path = out / "predictions.csv"
    existing = [str(p) for pair in targets for p in pair if p.exists()] + [
        str(p) for p in [table_path] if p.exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} result files exist already (first: {existing[0]}); "
            "set OVERWRITE=True or choose another OUTPUT_DIR."
        )
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for start in range(0, len(files), batch_size):
        chunk, originals = [], []
        for f in files[start : start + batch_size]:
            try:
                originals.append(read_image(f))
            except ImageReadError as exc:
                if not skip_bad_files:
                    raise
                skipped.append({"name": f.name, "problem": str(exc)})
                continue
            chunk.append(f)
        if not chunk:
            continue
        inputs = np.stack([model_input(o, config.image_size, config.preprocessing) for o in originals])
        probs = predict_probabilities(
            model,
            inputs,
            device,
            batch_size=batch_size,
            tta=tta,
            normalization=config.normalization,
            amp=config.amp,
        )
        flags = familiarity(inputs, reference)
        for i, (f, original, prob) in enumerate(zip(chunk, originals, probs)):
            mask_path, overlay_path = out / "masks" / f"{f.stem}.png", out / "overlays" / f"{f.stem}.png"
            h, w = original.shape
            mask = binarize_prediction(
                cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR), threshold, postprocess
            )
            _write_png(mask_path, mask * 255)
            _write_png(overlay_path, cv2.cvtColor(overlay_mask(original, mask), cv2.COLOR_RGB2BGR))
            rows.append(
                {
                    "name": f.name,
                    "height": h,
                    "width": w,
                    "kidney_pixels": int(mask.sum()),
                    "kidney_fraction": float(mask.mean()),
                    **(flags.iloc[i].to_dict() if flags is not None else {}),
                    "mask": str(mask_path),
                    "problem": "",
                }
            )
    if skipped:
        print(f"{len(skipped)} unreadable images skipped: " + ", ".join(row["name"] for row in skipped))
    if not rows:
        raise ValueError(f"None of the {len(files)} images in {src} could be read; see the skipped files.")
    table = pd.DataFrame(rows + skipped)
    _atomic_write(table_path, table.to_csv(index=False))
    return table


def _write_png(path: Path, array: np.ndarray) -> None:
    """Encode ``array`` (gray, or BGR as OpenCV orders colours) as PNG and write it atomically."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"Could not encode {path}")
    _atomic_write(path, data.tobytes())


# =================================================================================================
# 10. Runtime: Kaggle or not, a person watching or not, and where attached files are
# =================================================================================================

KAGGLE_ROOT_ENV = "KIDNEYSEG_KAGGLE_ROOT"
INTERACTIVE_ENV = "KIDNEYSEG_INTERACTIVE"

# Kaggle stops a GPU session after 12 hours; the "auto" training budget stops an hour before, leaving
# time for the curves, the checkpoints and the rest of the notebook.
KAGGLE_TRAIN_MINUTES = 660


def kaggle_root() -> Path:
    """Kaggle's root folder: ``/kaggle``, or ``$KIDNEYSEG_KAGGLE_ROOT`` (tests point it elsewhere)."""
    return Path(os.environ.get(KAGGLE_ROOT_ENV, "/kaggle"))


MODULE_FILE_NAME = "kidneyseg_utils.py"


def export_for_kaggle() -> Path | None:
    """In a Kaggle session, write a copy of this module to ``/kaggle/working/kidneyseg_utils.py``.

    Kaggle runs a script kernel when it is saved; an attached *utility script* is mounted under
    ``/kaggle/usr/lib``, but an attached kernel that Kaggle did not mark as one brings only its output
    (``/kaggle/input/.../<slug>/``), which the notebooks' finder also searches. Off Kaggle, or
    without a ``working`` folder, nothing is written. Returns the copy's path, or None.
    """
    working = kaggle_root() / "working"
    if not on_kaggle() or not working.is_dir():
        return None
    target = working / MODULE_FILE_NAME
    source = Path(__file__).resolve()
    if target.resolve() != source:
        _atomic_write(target, source.read_bytes())
    return target


def on_kaggle() -> bool:
    """True inside a Kaggle notebook session (Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE`` there)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def interactive_frontend() -> bool:
    """True when a person works in a notebook front end that can show widgets; False in headless runs.

    Headless runs (papermill, nbclient, nbval, Kaggle's "Save & Run All") must never create a widget:
    a known race between ipywidgets and nbclient can leave the run waiting for ever
    (jupyter/nbclient#312, nteract/papermill#723). The rule, in order: ``$KIDNEYSEG_INTERACTIVE``
    (``1`` or ``0``) decides when set; Kaggle's batch runs (``KAGGLE_KERNEL_RUN_TYPE=Batch``) are
    headless; otherwise a front end counts as interactive when it accepts ``input()`` for the running
    cell. JupyterLab, Notebook, VS Code and Kaggle's editor do; papermill, nbclient and nbval send every
    cell with ``allow_stdin=False``, and plain Python has no kernel at all.
    """
    forced = os.environ.get(INTERACTIVE_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() == "batch":
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


def _progress_bar(iterable: Any = None, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar: a live widget in an interactive front end, nothing in a headless run (whose
    record gets plain log lines instead) or when ``enabled`` is False."""
    if enabled and interactive_frontend():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

        options["disable"] = True
    return tqdm(iterable, **options)


def find_below(root: str | os.PathLike, name: str, max_depth: int = 6) -> list[Path]:
    """Every file or folder called ``name`` at most ``max_depth`` folders below ``root``, sorted.

    The search is bounded so that a large attached dataset cannot make it slow: hidden folders and
    the insides of ``images/`` and ``masks/`` folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    hits = []
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(current)
        if name in filenames or name in dirnames:
            hits.append(here / name)
        depth = len(here.relative_to(root).parts)
        keep = [] if depth >= max_depth else dirnames
        dirnames[:] = sorted(d for d in keep if not d.startswith(".") and d not in ("images", "masks"))
    return sorted(hits)


# Where Kaggle mounts things under /kaggle/input: the current layout first, the old flat one last.
_KAGGLE_INPUT_KINDS = ("datasets", "notebooks", "competitions", "models")


def _kaggle_layout(path: Path, input_root: Path) -> tuple[int, str]:
    """The rank of ``path`` under Kaggle's input (current layout first) and a description of it."""
    parts = path.relative_to(input_root).parts
    top = parts[0] if parts else ""
    if top in _KAGGLE_INPUT_KINDS:
        return _KAGGLE_INPUT_KINDS.index(top), f"input/{top}/... (Kaggle's current layout)"
    return len(_KAGGLE_INPUT_KINDS), "input/<slug>/... (Kaggle's older layout)"


def choose_candidate(
    candidates: Sequence[Path], what: str, parameter: str, prefer: str = "notebooks"
) -> Path:
    """Pick one of several found paths and say which and why.

    The rule: under Kaggle's input, the kind of mount named by ``prefer`` first (``datasets`` for
    data, ``notebooks`` for the outputs of another notebook), then the rest of the current layout,
    then the older flat layout; within a rank, the shortest path, then alphabetical order.
    """
    if not candidates:
        raise ValueError(f"no {what} to choose from")
    input_root = kaggle_root() / "input"

    def rank(path: Path) -> tuple[int, int, str]:
        try:
            order, _ = _kaggle_layout(path, input_root)
            parts = path.relative_to(input_root).parts
            order = -1 if parts and parts[0] == prefer else order
        except ValueError:
            order = -2  # outside Kaggle's input: given or local, always first
        return order, len(path.parts), str(path)

    ordered = sorted(candidates, key=rank)
    chosen = ordered[0]
    if len(ordered) > 1:
        try:
            reason = _kaggle_layout(chosen, input_root)[1]
        except ValueError:
            reason = "outside Kaggle's input"
        others = ", ".join(str(p) for p in ordered[1:])
        print(
            f"Found {len(ordered)} {what}; using {chosen} ({reason}; rule: input/{prefer} first, then "
            f"the current layout, then the older one, then the shortest path). Others: {others}. "
            f"Set {parameter} to choose another."
        )
    return chosen


def kaggle_output_candidates(filename: str, input_root: str | os.PathLike | None = None) -> list[Path]:
    """Files called ``filename`` in the outputs of notebooks attached to this one: under Kaggle's
    input at most six folders deep (``input/notebooks/<owner>/<slug>/kidneyseg/<file>`` today,
    ``input/<slug>/kidneyseg/<file>`` in older notebooks)."""
    root = Path(input_root) if input_root is not None else kaggle_root() / "input"
    return [p for p in find_below(root, filename) if p.is_file()]


def resolve_auto(value: Any, kaggle: Any, elsewhere: Any) -> Any:
    """A parameter's ``"auto"`` made concrete: ``kaggle`` in a Kaggle session, else ``elsewhere``."""
    if isinstance(value, str) and value == "auto":
        return kaggle if on_kaggle() else elsewhere
    return value


def kaggle_dataset_candidates(input_root: str | os.PathLike | None = None) -> list[Path]:
    """The attached datasets under Kaggle's input that hold images/ and masks/ folders.

    One candidate per mount: ``input/datasets/<owner>/<slug>`` and ``input/competitions/<slug>``
    (Kaggle's current layout) and ``input/<slug>`` (the older one). The outputs of other notebooks
    (``input/notebooks/...``) are never data: notebook 03's output can hold synthetic phantoms.
    """
    root = Path(input_root) if input_root is not None else kaggle_root() / "input"
    if not root.is_dir():
        return []
    mounts: list[Path] = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if top.name == "datasets":
            mounts += sorted(
                s for owner in top.iterdir() if owner.is_dir() for s in owner.iterdir() if s.is_dir()
            )
        elif top.name == "competitions":
            mounts += sorted(s for s in top.iterdir() if s.is_dir())
        elif top.name not in _KAGGLE_INPUT_KINDS:
            mounts.append(top)
    return [m for m in mounts if find_dataset_folders(m)]


def resolve_output_dir(
    output_dir: str | os.PathLike | None = "auto",
    *,
    kaggle_working: str | os.PathLike | None = None,
    default: str | os.PathLike = "outputs",
) -> Path:
    """Return the output folder: the parameter, else ``/kaggle/working/kidneyseg`` on Kaggle, else
    ``default`` (relative to the working directory). The folder is created."""
    if output_dir not in (None, "", "auto"):
        path = Path(output_dir).expanduser()
    elif (
        working := Path(kaggle_working) if kaggle_working is not None else kaggle_root() / "working"
    ).is_dir():
        path = working / "kidneyseg"
    else:
        path = Path(default)
    path.mkdir(parents=True, exist_ok=True)
    return path


FOLD_DIR_PREFIX = "fold_"


def run_output_dir(output_dir: str | os.PathLike, config: Config) -> Path:
    """Where a run writes: ``output_dir``, or ``output_dir/fold_k`` for cross-validation fold ``k``."""
    out = Path(output_dir)
    return out if config.fold is None else out / f"{FOLD_DIR_PREFIX}{config.fold}"


def _fold_models(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{FOLD_DIR_PREFIX}*/{BEST_MODEL_NAME}"))


def resolve_model_paths(model_path: str | os.PathLike | None, output_dir: str | os.PathLike) -> list[Path]:
    """The model (or the fold models of a cross-validation) to evaluate.

    ``MODEL_PATH`` may be a checkpoint, or a folder holding one or the ``fold_k`` runs of notebook
    03 (a Kaggle input too). ``"auto"``: the best model in ``output_dir``, else its ``fold_k`` runs,
    else one in the output of a notebook attached to this one (notebook 03's output attached to
    notebook 04, found by :func:`kaggle_output_candidates`), else that output's ``fold_k`` runs.

    Raises:
        FileNotFoundError: naming every place searched.
    """
    if model_path not in (None, "", "auto"):
        path = Path(model_path).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            found = [path / BEST_MODEL_NAME] if (path / BEST_MODEL_NAME).is_file() else _fold_models(path)
            if found:
                return found
            raise FileNotFoundError(
                f"MODEL_PATH {str(path)!r} holds neither {BEST_MODEL_NAME} nor {FOLD_DIR_PREFIX}*/"
                f"{BEST_MODEL_NAME} (the fold runs of notebook 03)."
            )
        raise FileNotFoundError(f"MODEL_PATH {str(path)!r} does not exist.")
    out = Path(output_dir)
    if (out / BEST_MODEL_NAME).is_file():
        return [out / BEST_MODEL_NAME]
    if _fold_models(out):
        return _fold_models(out)
    found = kaggle_output_candidates(BEST_MODEL_NAME)
    folds = [p for p in found if p.parent.name.startswith(FOLD_DIR_PREFIX)]
    if found and len(folds) == len(found):
        return sorted(folds, key=lambda p: p.parent.name)
    if found:
        return [choose_candidate(found, f"attached {BEST_MODEL_NAME} files", "MODEL_PATH")]
    raise FileNotFoundError(
        f"No {BEST_MODEL_NAME} in {output_dir} (or its {FOLD_DIR_PREFIX}* folders) or under "
        f"{kaggle_root() / 'input'} (searched six folders deep). Run notebook 03 first (on Kaggle: "
        "'Add Input', then its notebook output), or set MODEL_PATH."
    )


def restore_run_for_resume(output_dir: str | os.PathLike) -> Path | None:
    """Before ``RESUME=True`` in a new Kaggle session: copy the previous run's checkpoints, metrics and
    config from an attached notebook output into ``output_dir`` (nothing is overwritten).

    Returns:
        The folder copied from, or None when ``output_dir`` already holds a last checkpoint or no
        previous run is attached.
    """
    import shutil

    out = Path(output_dir)
    if (out / LAST_CHECKPOINT_NAME).exists():
        return None
    found = kaggle_output_candidates(LAST_CHECKPOINT_NAME)
    if not found:
        return None
    if out.name.startswith(FOLD_DIR_PREFIX):  # a fold resumes from the same fold's run
        found = [p for p in found if p.parent.name == out.name]
        if not found:
            return None
    source = choose_candidate(found, f"attached {LAST_CHECKPOINT_NAME} files", "OUTPUT_DIR").parent
    out.mkdir(parents=True, exist_ok=True)
    for name in (LAST_CHECKPOINT_NAME, BEST_MODEL_NAME, METRICS_CSV_NAME, CONFIG_JSON_NAME):
        if (source / name).exists() and not (out / name).exists():
            shutil.copy2(source / name, out / name)
    return source


# #################################################################################################
# PART II. THE STUDIES behind notebooks 01, 02, 04's figures and 05, and the phantoms (sections 11-15).
# Nothing in part I uses anything defined here (tests/test_layout.py checks it).
# #################################################################################################


# =================================================================================================
# 11. Phantoms and the default dataset
# =================================================================================================

_PHANTOM_MARKER = "PHANTOM.json"


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _render_phantom_slice(
    rng: np.random.Generator, anatomy: dict[str, Any], z: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one CT-like axial slice at height ``z`` in [0, 1] and its kidney mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1  # [-1, 1]
    img = np.full((size, size), 0.02, np.float32)  # air
    body = _ellipse(yy, xx, 0.0, 0.0, anatomy["body_ry"], anatomy["body_rx"])
    inner = _ellipse(yy, xx, 0.0, 0.0, anatomy["body_ry"] - 0.05, anatomy["body_rx"] - 0.05)
    img[body] = 0.30  # subcutaneous fat
    img[inner] = 0.48  # soft tissue
    liver = _ellipse(yy, xx, -0.05, -0.35, 0.35, 0.3) & inner
    img[liver & (z > 0.45)] = 0.56
    for by, bx, br in anatomy["bowel"]:
        loop = _ellipse(yy, xx, by, bx, br, br * 1.3) & inner
        img[loop] = 0.62
    spine = _ellipse(yy, xx, 0.42, 0.0, 0.12, 0.11)
    img[spine] = 0.95
    img[_ellipse(yy, xx, 0.40, 0.0, 0.035, 0.03)] = 0.35  # spinal canal
    mask = np.zeros((size, size), bool)
    for kidney in anatomy["kidneys"]:
        t = (z - kidney["zc"]) / kidney["zr"]
        if abs(t) >= 1.0:
            continue
        scale = math.sqrt(1.0 - t * t)
        ry, rx = kidney["ry"] * scale, kidney["rx"] * scale
        if min(ry, rx) < 0.012:
            continue
        cy, cx, ang = kidney["cy"], kidney["cx"], kidney["angle"]
        outer = _ellipse(yy, xx, cy, cx, ry, rx, ang)
        side = -1.0 if cx > 0 else 1.0  # hilum faces the spine
        notch = _ellipse(yy, xx, cy, cx + side * rx * 0.95, ry * 0.35, rx * 0.45, ang)
        kid = outer & ~notch
        medulla = _ellipse(yy, xx, cy, cx + side * rx * 0.1, ry * 0.55, rx * 0.5, ang) & kid
        img[kid] = kidney["cortex"]
        img[medulla] = kidney["medulla"]
        mask |= kid
    img += rng.normal(0.0, 0.035, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.6, size / 400))
    img += rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 12,
    slices_per_case: int = 10,
    image_size: int = 256,
    seed: int = 0,
    window: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Write seeded CT-like kidney phantoms in the images/ + masks/ layout and return ``out_dir``.

    Each case is one synthetic patient: a body with fat and soft tissue, liver, bowel loops, the spine,
    and two bean-shaped kidneys (bright cortex, darker medulla, hilum notch facing the spine) whose
    cross-section grows and shrinks along the slices, so a slice holds zero, one or two kidneys. Files
    are named ``phantom-CCC_SSS.png`` so ``GROUP_REGEX='^([^_]+)_'`` groups them by case.

    ``window`` is the display window of the stored 8-bit values, in units of the phantom's intensity
    scale: ``(0, 1)`` stores the whole scale, ``(0.3, 0.9)`` a narrower, brighter window, as CT
    series exported with different windows are.

    A folder written earlier with the same arguments is reused as it is. A non-empty folder that is
    not such a phantom set is never touched.

    Raises:
        FileExistsError: ``out_dir`` holds other files, or phantoms made with other arguments.
    """
    out = Path(out_dir)
    settings = {
        "n_cases": n_cases,
        "slices_per_case": slices_per_case,
        "image_size": image_size,
        "seed": seed,
    }
    if tuple(window) != (0.0, 1.0):
        settings["window"] = [float(window[0]), float(window[1])]
    marker = out / _PHANTOM_MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == settings:
            return out
        raise FileExistsError(
            f"{out} holds phantoms made with other settings ({marker.read_text().strip()}); "
            "choose another folder or delete it."
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; phantoms are only written to a new folder.")
    if image_size < 32 or n_cases < 1 or slices_per_case < 1:
        raise ValueError("make_synthetic_dataset needs image_size >= 32, n_cases >= 1, slices >= 1.")
    if not 0.0 <= window[0] < window[1]:
        raise ValueError(
            f"make_synthetic_dataset needs a window (low, high) with 0 <= low < high; got {window}."
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        anatomy = {
            "body_ry": rng.uniform(0.62, 0.72),
            "body_rx": rng.uniform(0.82, 0.92),
            "bowel": [
                (rng.uniform(-0.4, 0.0), rng.uniform(-0.3, 0.4), rng.uniform(0.05, 0.1))
                for _ in range(rng.integers(2, 5))
            ],
            "kidneys": [
                {
                    "cy": rng.uniform(0.18, 0.3),
                    "cx": side * rng.uniform(0.3, 0.4),
                    "ry": rng.uniform(0.13, 0.17),
                    "rx": rng.uniform(0.09, 0.12),
                    "angle": side * rng.uniform(0.2, 0.5),
                    "zc": rng.uniform(0.4, 0.6),
                    "zr": rng.uniform(0.3, 0.45),
                    "cortex": rng.uniform(0.72, 0.82),
                    "medulla": rng.uniform(0.58, 0.66),
                }
                for side in (-1.0, 1.0)
            ],
        }
        for s in range(slices_per_case):
            z = (s + 0.5) / slices_per_case
            image, mask = _render_phantom_slice(rng, anatomy, z, image_size)
            if tuple(window) != (0.0, 1.0):
                scaled = (image.astype(np.float32) / 255.0 - window[0]) / (window[1] - window[0])
                image = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
            name = f"phantom-{case:03d}_{s:03d}.png"
            _write_png(out / "images" / name, image)
            _write_png(out / "masks" / name, mask)
    _atomic_write(marker, json.dumps(settings) + "\n")
    return out


# Two phantom "scanners" for leave-one-source-out without data: same anatomy model, other windows.
SYNTHETIC_SOURCES = {"phantom-site-a": (0.0, 1.0), "phantom-site-b": (0.3, 0.9)}


def make_synthetic_sources(out_dir: str | os.PathLike, n_cases: int = 8, slices_per_case: int = 8) -> Path:
    """Write one phantom set per :data:`SYNTHETIC_SOURCES` entry under ``out_dir`` (other seeds and
    intensity windows) and return ``out_dir``: a multi-source layout for notebook 05 without data."""
    out = Path(out_dir)
    for seed, (name, window) in enumerate(SYNTHETIC_SOURCES.items(), start=1):
        make_synthetic_dataset(out / name, n_cases, slices_per_case, seed=seed, window=window)
    return out


SYNTHETIC = "synthetic"


def resolve_data_dir(
    data_dir: str | os.PathLike | None = "auto",
    *,
    kaggle_input: str | os.PathLike | None = None,
    env_var: str = DATA_DIR_ENV,
    synthetic_dir: str | os.PathLike | None = None,
    synthetic_sources: bool = False,
) -> Path:
    """Find the data root: the explicit parameter, then Kaggle's input, then an environment variable.

    Args:
        data_dir: A path; ``"auto"``/``None`` to search; ``"synthetic"`` for phantoms on purpose.
        kaggle_input: Where Kaggle mounts attached datasets; ``None`` means ``kaggle_root()/input``.
            When several attached datasets hold images, :func:`choose_candidate` picks one and says so.
        env_var: Environment variable consulted after Kaggle's input.
        synthetic_dir: Where phantoms are written. Off Kaggle, finding nothing writes synthetic
            phantoms here and uses them, with a warning; on Kaggle it is an error that says how to
            attach a dataset (a GPU session spent on phantoms wastes quota). ``None`` makes "nothing
            found" an error everywhere.
        synthetic_sources: Write several phantom sources (:func:`make_synthetic_sources`) instead
            of one set, for leave-one-source-out validation.

    Raises:
        FileNotFoundError: an explicit path that does not exist, or nothing found (see above); the
            message names every place searched.
    """
    if data_dir == SYNTHETIC:
        if synthetic_dir is None:
            raise ValueError('DATA_DIR="synthetic" needs a folder for the phantoms (synthetic_dir).')
        return (
            make_synthetic_sources(synthetic_dir)
            if synthetic_sources
            else make_synthetic_dataset(synthetic_dir)
        )
    if data_dir not in (None, "", "auto"):
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"DATA_DIR {str(path)!r} does not exist. {_LAYOUT_HELP}")
        return path
    kaggle_input = Path(kaggle_input) if kaggle_input is not None else kaggle_root() / "input"
    searched = [f"{kaggle_input}/datasets/*/*, {kaggle_input}/competitions/*, {kaggle_input}/*"]
    candidates = kaggle_dataset_candidates(kaggle_input)
    if candidates:
        return choose_candidate(
            candidates, "attached datasets with images/ and masks/", "DATA_DIR", "datasets"
        )
    env_value = os.environ.get(env_var)
    searched.append(f"${env_var}" + (f"={env_value}" if env_value else " (unset)"))
    if env_value:
        path = Path(env_value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"${env_var} points to {str(path)!r}, which does not exist.")
        return path
    if on_kaggle():
        raise FileNotFoundError(
            f"No dataset with images/ and masks/ folders is attached to this notebook (searched "
            f"{'; '.join(searched)}). In the notebook editor use 'Add Input' and pick your dataset "
            '(with "kaggle kernels push", list it in dataset_sources), then run again; or set DATA_DIR '
            'to its folder. To try the pipeline on synthetic phantoms instead, set DATA_DIR="synthetic".'
        )
    if synthetic_dir is None:
        raise FileNotFoundError(
            f"No data found (searched {'; '.join(searched)}). Set DATA_DIR to a folder. {_LAYOUT_HELP}"
        )
    warnings.warn(
        f"No data found (searched {'; '.join(searched)}): using SYNTHETIC kidney phantoms in "
        f"{synthetic_dir}. Set DATA_DIR to train on real images.",
        UserWarning,
        stacklevel=2,
    )
    return (
        make_synthetic_sources(synthetic_dir) if synthetic_sources else make_synthetic_dataset(synthetic_dir)
    )


# =================================================================================================
# 12. Exploring a dataset: notebook 01
# =================================================================================================


def _static_then_widget(draw: Callable[..., None], controls: Callable[[Any], dict[str, Any]]) -> None:
    """Draw once with the defaults (so every run records a static picture), then, only in an
    interactive front end (:func:`interactive_frontend`), offer ipywidgets controls built by
    ``controls(ipywidgets)``. Headless runs never create a widget: one can hang them for ever."""
    draw()
    if not interactive_frontend():
        print(
            "(Sliders appear when this notebook runs in Jupyter or Kaggle's editor; a headless run "
            f"keeps the static figure. Set {INTERACTIVE_ENV}=1 to force them.)"
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
    values = _drop_alpha_and_reduce(raw, reduce="max")
    found = np.unique(values)
    prefix = "colour " if colour else ""
    if found.size <= 2:
        return prefix + "/".join(str(v.item()) for v in found)
    return f"{prefix}{found.size} values {found.min().item()}..{found.max().item()}"


def inventory(
    data_dir: str | os.PathLike,
    group_regex: str | Mapping[str, str | None] | None = None,
    progress: bool = False,
    mask_labels: str | Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per pair or orphan under ``data_dir``, with what was found before any conversion.

    Columns: source, case, name, status (``ok``, ``orphan_image``, ``orphan_mask``, ``unreadable``,
    ``bad_mask``, ``size_mismatch``), problem, image, mask, width, height, dtype, channels,
    mask_values (raw values, e.g. ``0/255``, ``0/1`` or ``37 values 0..255`` for a noisy mask),
    kidney_fraction, components, pixel_hash and duplicate_of (the first pair with identical pixels).
    """
    import hashlib

    index = index_dataset(data_dir, group_regex, mask_labels)
    rows: list[dict[str, Any]] = []
    for pair in _progress_bar(index.pairs, progress, desc="inventory", unit="pair", leave=False):
        row: dict[str, Any] = {
            "source": pair.source,
            "case": pair.case,
            "name": pair.name,
            "status": "ok",
            "problem": "",
            "image": str(pair.image),
            "mask": str(pair.mask),
            "mask_labels": pair.mask_labels,
        }
        try:
            raw_image = _decode(pair.image)
            raw_mask = _decode(pair.mask)
        except ImageReadError as exc:
            rows.append({**row, "status": "unreadable", "problem": str(exc)})
            continue
        image = to_grayscale_uint8(raw_image)
        row.update(
            height=image.shape[0],
            width=image.shape[1],
            dtype=str(raw_image.dtype),
            channels=1 if raw_image.ndim == 2 else raw_image.shape[2],
            mask_values=_describe_mask_values(raw_mask),
            pixel_hash=hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest(),
        )
        try:
            mask = binarize_mask(raw_mask, pair.mask, pair.mask_labels)
        except ValueError as exc:
            rows.append({**row, "status": "bad_mask", "problem": str(exc)})
            continue
        if mask.shape != image.shape:
            rows.append(
                {
                    **row,
                    "status": "size_mismatch",
                    "problem": f"mask is {mask.shape[1]}x{mask.shape[0]}, "
                    f"image {image.shape[1]}x{image.shape[0]}",
                }
            )
            continue
        count = cv2.connectedComponents(mask, connectivity=8)[0] - 1
        rows.append({**row, "kidney_fraction": float(mask.mean()), "components": int(count)})
    for path in index.orphan_images:
        rows.append(
            {
                "source": index._source_of(path),
                "name": path.stem,
                "status": "orphan_image",
                "problem": "image without mask",
                "image": str(path),
            }
        )
    for path in index.orphan_masks:
        rows.append(
            {
                "source": index._source_of(path),
                "name": path.stem,
                "status": "orphan_mask",
                "problem": "mask without image",
                "mask": str(path),
            }
        )
    columns = [
        "source",
        "case",
        "name",
        "status",
        "problem",
        "image",
        "mask",
        "width",
        "height",
        "dtype",
        "channels",
        "mask_values",
        "kidney_fraction",
        "components",
        "pixel_hash",
        "mask_labels",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns)
    first = {}
    duplicate_of = []
    for key, digest in zip(table["source"] + "/" + table["name"], table["pixel_hash"]):
        if isinstance(digest, str) and digest in first:
            duplicate_of.append(first[digest])
        else:
            if isinstance(digest, str):
                first[digest] = key
            duplicate_of.append("")
    table["duplicate_of"] = duplicate_of
    return table


def inventory_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per source: pairs, cases, orphans, unreadable and other problems, duplicates, distinct sizes,
    share of slices with kidney and the median kidney fraction of those."""
    rows = []
    for source, part in table.groupby("source", sort=True):
        ok = part[part["status"] == "ok"]
        kidney = ok["kidney_fraction"] > 0
        rows.append(
            {
                "source": source,
                "pairs": len(ok),
                "cases": ok["case"].nunique(),
                "orphans": int(part["status"].str.startswith("orphan").sum()),
                "problems": int((~part["status"].isin(["ok", "orphan_image", "orphan_mask"])).sum()),
                "duplicates": int((part["duplicate_of"] != "").sum()),
                "sizes": ok[["width", "height"]].drop_duplicates().shape[0],
                "with_kidney": f"{kidney.mean():.0%}" if len(ok) else "-",
                "median_kidney_fraction": float(ok.loc[kidney, "kidney_fraction"].median())
                if kidney.any()
                else 0.0,
            }
        )
    return pd.DataFrame(rows)


def write_inventory(
    table: pd.DataFrame, output_dir: str | os.PathLike, warnings_found: Sequence[str] = ()
) -> dict[str, Path]:
    """Write ``data_inventory.csv`` (one row per file) and ``data_report.json`` (summary, warnings)."""
    out = Path(output_dir)
    csv_path, json_path = out / "data_inventory.csv", out / "data_report.json"
    _atomic_write(csv_path, table.to_csv(index=False))
    report = {
        "summary": inventory_summary(table).to_dict(orient="records"),
        "warnings": list(warnings_found),
        "problems": table.loc[table["status"] != "ok", ["source", "name", "status", "problem"]].to_dict(
            orient="records"
        ),
    }
    _atomic_write(json_path, json.dumps(report, indent=2, default=str) + "\n")
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


def mask_heatmap(table: pd.DataFrame, size: int = 64) -> np.ndarray:
    """Share of masks covering each position of the normalised (resized) image, ``size`` x ``size``."""
    ok = table[table["status"] == "ok"]
    total = np.zeros((size, size), np.float64)
    for path, labels in zip(ok["mask"], ok["mask_labels"]):
        mask = read_mask(path, _labels_of(labels)).astype(np.float32)
        total += cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return total / max(1, len(ok))


def plot_image_statistics(table: pd.DataFrame) -> Any:
    """Image sizes per source (width against height) and the aspect-ratio distribution."""
    ok = table[table["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for source, part in ok.groupby("source"):
        counts = part.groupby(["width", "height"]).size().reset_index(name="n")
        axes[0].scatter(counts["width"], counts["height"], s=20 + 6 * counts["n"], alpha=0.6, label=source)
    axes[0].set_xlabel("width (px)")
    axes[0].set_ylabel("height (px)")
    axes[0].set_title("Image sizes (marker area ~ number of images)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    aspect = ok["width"] / ok["height"]
    axes[1].hist(
        [aspect[ok["source"] == s] for s in sorted(ok["source"].unique())],
        bins=20,
        stacked=True,
        label=sorted(ok["source"].unique()),
    )
    axes[1].set_xlabel("aspect ratio (width / height)")
    axes[1].set_ylabel("images")
    axes[1].set_title("Aspect ratios")
    fig.tight_layout()
    return fig


def plot_intensity_histograms(table: pd.DataFrame, per_source: int = 12, seed: int = 0) -> Any:
    """Gray-level histograms (after conversion to uint8): all sources together and one per source,
    from up to ``per_source`` random images each."""
    ok = table[table["status"] == "ok"]
    sources = sorted(ok["source"].unique())
    rng = np.random.default_rng(seed)
    hists = {}
    for source in sources:
        paths = ok.loc[ok["source"] == source, "image"].to_numpy()
        picks = rng.choice(paths, size=min(per_source, len(paths)), replace=False)
        hist = np.zeros(256)
        for path in picks:
            hist += np.bincount(read_image(path).ravel(), minlength=256)
        hists[source] = hist / hist.sum()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    axes[0].plot(np.mean(list(hists.values()), axis=0), color="black")
    axes[0].set_title("All sources (mean of per-source histograms)")
    for source, hist in hists.items():
        axes[1].plot(hist, label=source, alpha=0.8)
    axes[1].set_title("Per source")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("gray level")
        ax.set_ylabel("share of pixels")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gallery(
    table: pd.DataFrame,
    n: int = 12,
    seed: int = 0,
    columns: int = 6,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Any:
    """Random slices at their original size with the mask overlaid, titled by source and name."""
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    picks = np.random.default_rng(seed).choice(len(ok), size=min(n, len(ok)), replace=False)
    rows = math.ceil(len(picks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        row = ok.loc[int(i)]
        image = read_image(row["image"])
        if transform is not None:
            image = transform(image)
        ax.imshow(overlay_mask(image, read_mask(row["mask"], _labels_of(row["mask_labels"]))))
        ax.set_title(f"{row['source']}\n{row['name'][:26]}", fontsize=7)
    fig.tight_layout()
    return fig


def plot_mask_statistics(table: pd.DataFrame, heatmap: np.ndarray) -> Any:
    """Kidney area distribution, connected components per mask, and where kidneys lie."""
    ok = table[table["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    kidney = ok[ok["kidney_fraction"] > 0]
    sources = sorted(kidney["source"].unique())
    axes[0].hist(
        [100 * kidney.loc[kidney["source"] == s, "kidney_fraction"] for s in sources],
        bins=25,
        stacked=True,
        label=sources,
    )
    axes[0].set_xlabel("kidney area (% of image)")
    axes[0].set_ylabel("masks")
    empty = (ok["kidney_fraction"] == 0).mean()
    axes[0].set_title(f"Kidney area ({empty:.0%} of masks are empty)")
    axes[0].legend(fontsize=7)
    components = ok["components"].astype(int).value_counts().sort_index()
    axes[1].bar(components.index.astype(str), components.to_numpy())
    axes[1].set_xlabel("connected components per mask")
    axes[1].set_ylabel("masks")
    axes[1].set_title("Components (two kidneys usually give 2)")
    shown = axes[2].imshow(heatmap, cmap="magma", vmin=0)
    axes[2].set_title("Where kidneys lie (share of masks)")
    axes[2].axis("off")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    return fig


def show_slice_browser(table: pd.DataFrame) -> None:
    """An ipywidgets browser over the pairs: slice slider, overlay on/off, opacity.

    The first slice is always drawn as a static figure, so headless runs record a picture; the
    widget follows only in an interactive front end.
    """
    ok = table[table["status"] == "ok"].reset_index(drop=True)

    def draw(index: int = 0, overlay: bool = True, opacity: float = 0.45) -> None:
        row = ok.loc[index]
        image = read_image(row["image"])
        mask = read_mask(row["mask"], _labels_of(row["mask_labels"]))
        shown = overlay_mask(image, mask, alpha=opacity) if overlay else image
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
# 13. Preprocessing and normalisation: notebook 02
# =================================================================================================


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
    edge = float(np.hypot(gx, gy)[_boundary(m)].mean())
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
            cnr, edge = contrast_metrics(fn(image), mask)
            rows.append(
                {
                    "method": method,
                    "params": ", ".join(f"{k}={v:g}" for k, v in params.items()) or "-",
                    "source": source,
                    "cnr": cnr,
                    "edge": edge,
                }
            )
    table = pd.DataFrame(rows).groupby(["method", "params", "source"], sort=False).mean().reset_index()
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
    pairs = index_dataset(data_dir, mask_labels=mask_labels).pairs
    cache = load_arrays(pairs, image_size, preprocessing)
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


def sample_slices_with_kidney(pairs: Sequence[SamplePair], per_source: int, seed: int) -> list[SamplePair]:
    """Up to ``per_source`` pairs whose mask holds kidney from every source, drawn at random with
    ``seed`` (the same draw every run), in source and file order."""
    rng = np.random.default_rng(seed)
    sample: list[SamplePair] = []
    for source in sorted({p.source for p in pairs}):
        candidates = [p for p in pairs if p.source == source and load_pair(p)[1].any()]
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
        "ablation_csv": _atomic_write(out / "preprocessing_results.csv", ablation.to_csv(index=False)),
        "effects_csv": _atomic_write(out / "preprocessing_effects.csv", effects.to_csv(index=False)),
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
                "keep PREPROCESSING='none'."
            )
        return (
            best,
            f"'{best}' beats no preprocessing by {gain:+.3f} validation Dice; set PREPROCESSING='{best}'.",
        )
    return best, f"'{best}' has the best validation Dice ({table.loc[best, 'val_dice']:.3f})."


def preprocessing_ablation(
    config: Config,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: Sequence[str] = ("none", "white_balance", "clahe", "unsharp", "white_balance+clahe"),
    device: torch.device | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Train one model per preprocessing option at an equal budget and compare validation Dice.

    Every option uses the same config (seed, split, epochs, augmentation) except ``preprocessing``;
    each run goes to ``output_dir/<option>`` (replaced if present: these are scratch runs).

    Returns:
        One row per option: best validation loss and its epoch, pooled validation Dice and IoU at
        that epoch, the best Dice of any epoch, and the seconds spent.
    """
    rows = []
    for option in options:
        run_config = Config(**{**config.to_dict(), "preprocessing": option})
        data = prepare_data(run_config, data_dir)
        run_config = data.config
        tic = time.monotonic()
        result = train_model(
            build_model(run_config),
            data.train_dataset,
            data.val_dataset,
            run_config,
            Path(output_dir) / option.replace("+", "_"),
            device,
            overwrite=True,
            progress=progress,
        )
        best = result.best_row
        rows.append(
            {
                "preprocessing": option,
                "best_epoch": result.best_epoch,
                "val_loss": result.best_val_loss,
                "val_dice": best["val_dice"],
                "val_iou": best["val_iou"],
                "max_val_dice": float(result.history["val_dice"].max()),
                "epochs": len(result.history),
                "seconds": time.monotonic() - tic,
            }
        )
    return pd.DataFrame(rows)


def plot_preprocessing_gallery(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    titles: Sequence[str],
    methods: Sequence[str] = ("none", "white_balance", "clahe", "unsharp"),
) -> Any:
    """One row per slice, one column per method, with the kidney outline, and a histogram row."""
    n = len(images)
    fig, axes = plt.subplots(
        2 * n,
        len(methods),
        figsize=(3.1 * len(methods), 5.2 * n),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.2] * n},
    )
    for r, (image, mask, title) in enumerate(zip(images, masks, titles)):
        for c, method in enumerate(methods):
            out = apply_preprocessing(image, method)
            ax = axes[2 * r, c]
            ax.imshow(overlay_mask(out, mask, alpha=0.0))
            ax.set_title(f"{title}\n{method}" if c == 0 else method, fontsize=8)
            ax.axis("off")
            hist_ax = axes[2 * r + 1, c]
            hist_ax.hist(out.ravel(), bins=64, range=(0, 255), color="gray")
            hist_ax.set_yscale("log")  # the dark background would hide everything else
            hist_ax.set_yticks([])
            hist_ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_preprocessing_effects(effects: pd.DataFrame) -> Any:
    """CNR gain and edge-strength gain per method and parameters, averaged over sources."""
    mean = effects.groupby(["method", "params"], sort=False)[["cnr_gain", "edge_gain"]].mean().reset_index()
    labels = [f"{m}\n{p}" for m, p in zip(mean["method"], mean["params"])]
    x = np.arange(len(mean))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(mean)), 4.5))
    ax.bar(x - 0.2, mean["cnr_gain"], width=0.4, label="CNR kidney vs surrounding ring")
    ax.bar(x + 0.2, mean["edge_gain"], width=0.4, label="edge strength on the kidney outline")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ratio to no preprocessing")
    ax.set_title("Measured effect (mean over sources, slices with kidney)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def show_preprocessing_sliders(image: np.ndarray, mask: np.ndarray) -> None:
    """ipywidgets sliders to tune CLAHE, the percentile stretch and unsharp masking on one slice.

    A static figure with the default settings is drawn first (headless runs keep it)."""

    def draw(
        clip_limit: float = 2.0,
        tile_grid: int = 8,
        low: float = 1.0,
        high: float = 99.0,
        sigma: float = 1.0,
        amount: float = 1.0,
    ) -> None:
        outs = {
            "original": image,
            "white balance": white_balance(image, low, high),
            "CLAHE": clahe(image, clip_limit, tile_grid),
            "unsharp": unsharp_mask(image, sigma, amount),
        }
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


def plot_normalization_consistency(per_source: pd.DataFrame) -> Any:
    """Kidney and surroundings level per source under each normalisation (from
    :func:`normalization_consistency`): a consistent normalisation keeps each source's kidney level
    close to the others' on the scale of the contrast the network has to find."""
    methods = list(dict.fromkeys(per_source["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = per_source[per_source["method"] == method]
        y = np.arange(len(part))
        for yi, (_, row) in zip(y, part.iterrows()):
            ax.plot([row["surroundings"], row["kidney"]], [yi, yi], color="0.6", linewidth=1)
        ax.scatter(part["surroundings"], y, color="0.3", s=20, label="surroundings (5 px ring)")
        ax.scatter(part["kidney"], y, color="tab:red", s=28, label="kidney")
        ax.set_yticks(y, part["source"] if ax is axes[0, 0] else [""] * len(part), fontsize=8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("normalised intensity (median)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_normalization_gallery(
    images: Sequence[np.ndarray], titles: Sequence[str], methods: Sequence[str] = NORMALIZATION_OPTIONS
) -> Any:
    """One row per slice (e.g. one per source), one column per normalisation, all on one grey scale
    per column so that differences between sources stay visible."""
    outs = {m: [normalize_intensity(image, m) for image in images] for m in methods}
    fig, axes = plt.subplots(
        len(images), len(methods), figsize=(2.6 * len(methods), 2.6 * len(images)), squeeze=False
    )
    for c, method in enumerate(methods):
        low, high = np.percentile(np.concatenate([o.ravel() for o in outs[method]]), [0.5, 99.5])
        for r, (out, title) in enumerate(zip(outs[method], titles)):
            ax = axes[r, c]
            ax.imshow(out, cmap="gray", vmin=low, vmax=high)
            ax.set_title(f"{title}\n{method}" if c == 0 else method, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig


# =================================================================================================
# 14. Figures of a training run and its evaluation: notebooks 03 and 04
# =================================================================================================


def plot_samples(
    dataset: Dataset, n: int = 8, seed: int = 0, epoch: int = 0, title: str | None = None, columns: int = 4
) -> Any:
    """A grid of ``n`` dataset items (as the model sees them, augmentation included) with the mask
    overlaid. Returns the matplotlib Figure."""
    count = min(n, len(dataset))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=count, replace=False)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        image, mask = dataset[epoch * len(dataset) + int(i)]
        x = image[0].numpy()
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:  # z-scored input: stretch its own range for display
            x = (x - lo) / max(hi - lo, 1e-6)
        img8 = (x * 255).round().astype(np.uint8)
        ax.imshow(overlay_mask(img8, mask[0].numpy() > 0.5))
        ax.set_title(f"#{i}  kidney {100 * float(mask.mean()):.1f}%  [{lo:.1f}, {hi:.1f}]", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _out_of_fold_probabilities(
    models: Sequence[nn.Module], val: SplitEvaluation, device: torch.device | str, tta: bool
) -> tuple[list[np.ndarray], float]:
    """Each out-of-fold image's probabilities from its own fold's model (in ``val``'s order)."""
    probs: list[np.ndarray] = [np.empty(0)] * len(val.data)
    total_ms = 0.0
    for model, fold in zip(models, dict.fromkeys(val.scores["fold"])):  # folds in models order
        rows = np.flatnonzero(val.scores["fold"].to_numpy() == fold)
        part = dataclasses.replace(
            val.data,
            pairs=[val.data.pairs[i] for i in rows],
            images=val.data.images[rows],
            masks=[val.data.masks[i] for i in rows],
            originals=[val.data.originals[i] for i in rows],
        )
        fold_probs, ms = _timed_probabilities(model, part, device, tta)
        for i, prob in zip(rows, fold_probs):
            probs[i] = prob
        total_ms += ms * len(rows)
    return probs, total_ms / max(1, len(val.data))


def inference_options_table(
    model: nn.Module | Sequence[nn.Module],
    data: EvaluationSet | SplitEvaluation,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Pooled and mean Dice, mean HD95 and milliseconds per slice with and without TTA and
    postprocessing, so what each option buys and costs is visible side by side. Given the fold
    models and the out-of-fold evaluation (:func:`evaluate_validation`), each image is predicted by
    its own fold's model, never by one that trained on it."""
    folds = isinstance(data, SplitEvaluation) and data.part == "oof"
    images = data.data if isinstance(data, SplitEvaluation) else data
    rows = []
    for tta in (False, True):
        if folds:
            probs, ms = _out_of_fold_probabilities(model, data, device, tta)
        else:
            single = model if isinstance(model, nn.Module) else model[0]
            probs, ms = _timed_probabilities(single, images, device, tta)
        for post in (False, True):
            tic = time.perf_counter()
            summary = summarize_scores(score_predictions(images, probs, threshold, post))
            post_ms = (time.perf_counter() - tic) * 1000 / max(1, len(images)) if post else 0.0
            rows.append(
                {
                    "tta": tta,
                    "postprocess": post,
                    "pooled_dice": summary["pooled_dice"],
                    "mean_dice": summary["mean_dice"],
                    "mean_hd95": summary["mean_hd95"],
                    "ms_per_slice": ms + post_ms,
                }
            )
    return pd.DataFrame(rows)


def threshold_sweep(
    data: EvaluationSet,
    probs: Sequence[np.ndarray],
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
) -> pd.DataFrame:
    """Pooled Dice and mean Dice against the threshold (no postprocessing); the best row is marked.

    Run it on the validation split only: a threshold chosen on the test images would flatter them.
    """
    rows = []
    for threshold in thresholds:
        total = ConfusionCounts()
        dices = []
        for prob, mask in zip(probs, data.masks):
            counts = confusion_counts(prob > threshold, mask)
            total = total + counts
            dices.append(counts.metrics()["dice"])
        rows.append(
            {
                "threshold": float(threshold),
                "pooled_dice": total.metrics()["dice"],
                "mean_dice": float(np.mean(dices)),
            }
        )
    table = pd.DataFrame(rows)
    table["best"] = table["pooled_dice"] == table["pooled_dice"].max()
    return table


ERROR_COLORS = {"tp": (40, 200, 60), "fp": (230, 40, 40), "fn": (40, 110, 255)}


def error_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB picture of a gray image with true positives green, false positives red, false negatives
    blue (:data:`ERROR_COLORS`)."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    p, t = pred.astype(bool), target.astype(bool)
    for region, key in ((p & t, "tp"), (p & ~t, "fp"), (~p & t, "fn")):
        rgb[region] = (1 - alpha) * rgb[region] + alpha * np.asarray(ERROR_COLORS[key], np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def plot_cases(
    data: EvaluationSet,
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
            pred = binarize_prediction(probs[i], threshold, postprocess)
            ax.imshow(error_overlay(data.originals[i], pred, data.masks[i]))
            r = per_image.loc[i]
            ax.set_title(
                f"{label}: {r['name'][:28]}\nDice {r['dice']:.3f}  HD95 {r['hd95']:.1f}px", fontsize=8
            )
    handles = [Patch(color=np.asarray(c) / 255, label=k.upper()) for k, c in ERROR_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def familiarity_report(
    per_image: pd.DataFrame, images: np.ndarray, reference: Mapping[str, Any] | None
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per-image scores with the familiarity flag beside them, and Dice by flag, so a user sees
    whether the flag predicts failure. None (with a printed reason) for a checkpoint without
    familiarity statistics.

    Args:
        per_image: :func:`score_predictions` of ``images``, in the same order.
        images: The model inputs that were scored (``EvaluationSet.images``).
        reference: ``checkpoint.get("familiarity")``.
    """
    flags = familiarity(images, reference)
    if flags is None:
        print(
            "This model's checkpoint stores no training statistics (trained before the familiarity "
            "check): retrain with notebook 03 to get the flag."
        )
        return None
    table = pd.concat([per_image.reset_index(drop=True), flags], axis=1)
    by_flag = table.groupby("unfamiliar").agg(
        images=("dice", "size"), mean_dice=("dice", "mean"), median_novelty=("novelty", "median")
    )
    for flag, part in table.groupby("unfamiliar"):
        by_flag.loc[flag, "pooled_dice"] = metrics_from_counts(part.tp.sum(), part.fp.sum(), part.fn.sum())[
            "dice"
        ]
    return table, by_flag.reset_index()


def unfamiliar_note(table: pd.DataFrame, name_column: str = "name") -> str:
    """One sentence on how many images :func:`familiarity` flagged, naming the first few."""
    if "unfamiliar" not in table:
        return "No familiarity check: this model's checkpoint stores no training statistics."
    checked = table[table["unfamiliar"].notna()]
    flagged = checked.loc[checked["unfamiliar"].eq(True), name_column].astype(str).tolist()
    if not flagged:
        return f"None of the {len(checked)} images looks unlike the training images."
    names = ", ".join(flagged[:5]) + (", ..." if len(flagged) > 5 else "")
    return (
        f"{len(flagged)} of {len(checked)} images look unlike anything the model was trained on "
        f"(novelty > 1): {names}. Check their masks before using them."
    )


def plot_prediction_overlays(folder: str | os.PathLike, n: int = 4) -> Any:
    """The first ``n`` overlays that :func:`predict_folder` wrote to ``folder/overlays``, in a row."""
    overlays = sorted((Path(folder) / "overlays").glob("*.png"))[:n]
    if not overlays:
        raise FileNotFoundError(f"No overlays in {Path(folder) / 'overlays'}; run predict_folder first.")
    fig, axes = plt.subplots(1, len(overlays), figsize=(4 * len(overlays), 4), squeeze=False)
    for ax, path in zip(axes.flat, overlays):
        ax.imshow(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
        ax.set_title(path.name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_dice_distribution(per_image: pd.DataFrame, by: str = "source") -> Any:
    """Histogram of per-image Dice and, when the data has several groups, Dice per ``by`` group."""
    groups = per_image[by].nunique() if by in per_image else 1
    fig, axes = plt.subplots(1, 2 if groups > 1 else 1, figsize=(13 if groups > 1 else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.hist(per_image["dice"], bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.set_xlabel("Dice per image")
    ax.set_ylabel("images")
    ax.set_title(f"Dice distribution (n={len(per_image)}, mean {per_image['dice'].mean():.3f})")
    if groups > 1:
        ax = axes[0, 1]
        names = sorted(per_image[by].unique())
        ax.boxplot([per_image.loc[per_image[by] == n, "dice"] for n in names], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice per image")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Dice per {by}")
    fig.tight_layout()
    return fig


def plot_case_dice(per_image: pd.DataFrame, title: str = "") -> Any:
    """Dice per patient (pooled over the patient's slices), sorted, coloured by source."""
    cases = case_scores(per_image).sort_values("dice").reset_index(drop=True)
    sources = sorted(cases["source"].unique())
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(sources)}
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(cases) + 2), 4))
    ax.bar(range(len(cases)), cases["dice"], color=[colors[s] for s in cases["source"]])
    ax.axhline(cases["dice"].mean(), color="black", lw=1, ls="--", label=f"mean {cases['dice'].mean():.3f}")
    ax.set_xticks(range(len(cases)), cases["patient"].str.split("/").str[-1], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Dice pooled over the patient's slices")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in sources]
    ax.legend(
        [*handles, ax.lines[0]],
        [*sources, ax.lines[0].get_label()],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    ax.set_title(title or f"Dice per patient (n={len(cases)})")
    fig.tight_layout()
    return fig


def plot_threshold_sweep(sweep: pd.DataFrame, chosen: float | None = None) -> Any:
    """Pooled and mean Dice against the threshold, the best threshold marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(sweep["threshold"], sweep["pooled_dice"], marker=".", label="pooled Dice")
    ax.plot(sweep["threshold"], sweep["mean_dice"], marker=".", label="mean Dice per image")
    best = sweep.loc[sweep["pooled_dice"].idxmax()]
    ax.axvline(
        best["threshold"],
        color="tab:green",
        linestyle="--",
        label=f"best {best['threshold']:.2f} (pooled {best['pooled_dice']:.3f})",
    )
    if chosen is not None:
        ax.axvline(chosen, color="gray", linestyle=":", label=f"used {chosen:.2f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel("Dice")
    ax.set_title("Threshold sweep on the validation split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_threshold_viewer(
    data: EvaluationSet, probs: Sequence[np.ndarray], threshold: float = 0.5, label: str = ""
) -> None:
    """An ipywidgets viewer (slice and threshold sliders) over TP/FP/FN overlays; ``label`` names the
    split in every title (thresholds are chosen on validation, never on test).

    A static figure of the first slice at ``threshold`` is always drawn first, so a headless run
    (papermill, nbval) records a picture; the widget follows only in an interactive front end.
    """

    def draw(index: int = 0, thr: float = threshold) -> None:
        pred = binarize_prediction(probs[index], thr)
        counts = confusion_counts(pred, data.masks[index])
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
# 15. Leave-one-source-out: notebook 05
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
    train: list[SamplePair]
    test: list[SamplePair]


def source_folds(
    pairs: Sequence[SamplePair], sources: Sequence[str] | None = None, strict: bool = True
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


def _fold_settings(config: Config, fold: SourceFold) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "train": [p.key for p in fold.train],
        "test": [p.key for p in fold.test],
    }


def _extendable_fold(stored: Mapping[str, Any], settings: Mapping[str, Any], out: Path) -> bool:
    """Whether a finished fold differs from ``settings`` only by a larger ``num_epochs``, with an
    epoch budget alone (no time limit, which would make the stopping epoch depend on the machine)
    and its resumable last checkpoint at hand, short of the new budget (an interrupted longer run may
    have gone past it): training it on reproduces the longer run exactly."""
    old = stored.get("settings") or {}
    if not old or not (out / LAST_CHECKPOINT_NAME).is_file():
        return False
    a, b = dict(old["config"]), dict(settings["config"])
    if a.get("max_train_minutes") is not None or b.get("max_train_minutes") is not None:
        return False
    budget = int(b.pop("num_epochs", 0))
    if int(a.pop("num_epochs", 0)) >= budget:
        return False
    if not (a == b and old["train"] == settings["train"] and old["test"] == settings["test"]):
        return False
    try:
        return int(load_checkpoint(out / LAST_CHECKPOINT_NAME, map_location="cpu")["epoch"]) < budget
    except ValueError:  # damaged: the fold is trained anew
        return False


def _subset(cache: CachedArrays, pairs: Sequence[SamplePair]) -> CachedArrays:
    position = {p.key: i for i, p in enumerate(cache.pairs)}
    keep = [position[p.key] for p in pairs if p.key in position]
    return CachedArrays(
        cache.images[keep],
        cache.masks[keep],
        [cache.pairs[i] for i in keep],
        [cache.original_sizes[i] for i in keep],
    )


def run_source_fold(
    config: Config,
    fold: SourceFold,
    cache: CachedArrays,
    output_dir: str | os.PathLike,
    device: torch.device | None = None,
    progress: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one fold on ``fold.train`` (patient-split again for early stopping) and score the best
    model on the held-out source at each image's original size (no TTA, no postprocessing).

    A fold whose ``fold_result.json`` in ``output_dir`` records the same settings and files is not
    retrained: its stored result is returned (``"reused": True``), so an interrupted notebook goes on
    where it stopped. A fold that differs only by a larger ``num_epochs`` (and has no time limit)
    is trained on from its last checkpoint, which gives exactly the longer run, or, if it had
    stopped early, is kept as it is. Anything else in ``output_dir`` is a scratch run of this fold
    and is replaced.

    Args:
        config: The fold's settings (``max_train_minutes`` and ``num_epochs`` are its budget).
        fold: The fold.
        cache: Decoded arrays of (at least) every training pair, at ``config.image_size`` with
            ``config.preprocessing``.
        output_dir: The fold's folder.
        device: Compute device; chosen by :func:`get_device` when ``None``.
        progress: Show progress bars.
        data_dir: The data root, recorded in the checkpoints (so notebook 04 can reopen a fold).

    Returns:
        The fold's row: sizes, pooled and mean test metrics, epochs and minutes.
    """
    out = Path(output_dir)
    settings = _fold_settings(config, fold)
    result_path = out / LOSO_FOLD_RESULT_NAME
    stored = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if stored.get("settings") == settings:
        return {**stored["row"], "reused": True}
    extend = _extendable_fold(stored, settings, out)
    if extend and stored["row"]["stop_reason"] == "early_stopping":
        # A longer budget would have stopped at the same epoch: the stored result is the answer.
        _atomic_write(result_path, json.dumps({"settings": settings, "row": stored["row"]}, indent=1) + "\n")
        return {**stored["row"], "reused": True}
    train_pairs, val_pairs = split_pairs(
        fold.train, config.val_fraction, config.seed, grouped=config.group_regex is not None
    )
    train, val = _subset(cache, train_pairs), _subset(cache, val_pairs)
    train_ds, val_ds = make_datasets(train, val, config)
    device = device or get_device()
    tic = time.monotonic()
    result = train_model(
        build_model(config),
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
            "familiarity": familiarity_reference(train.images),
        },
        progress=progress,
    )
    minutes = (time.monotonic() - tic) / 60 + (stored["row"]["train_minutes"] if extend else 0.0)
    model, _, _ = load_model(out / BEST_MODEL_NAME, device)
    test = load_evaluation_set(fold.test, config)
    per_image, summary, _ = evaluate_model(model, test, device, config.inference_threshold)
    write_evaluation(per_image, summary, out)
    row = {
        "held_out": fold.held_out,
        "normalization": config.normalization,
        "augmentation": config.augmentation,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "n_test_cases": len({p.case for p in fold.test}),
        "n_with_kidney": summary["n_with_kidney"],
        "pooled_dice": summary["pooled_dice"],
        "pooled_iou": summary["pooled_iou"],
        "mean_dice": summary["mean_dice"],
        "mean_dice_with_kidney": summary["mean_dice_with_kidney"],
        "mean_hd95": summary["mean_hd95"],
        "median_hd95": summary["median_hd95"],
        "val_dice": float(result.best_row["val_dice"]),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "stop_reason": result.stop_reason,
        "train_minutes": minutes,
    }
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
    _atomic_write(result_path, json.dumps({"settings": settings, "row": plain}, indent=1) + "\n")
    return {**plain, "reused": False}


def leave_one_source_out(
    config: Config,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    sources: Sequence[str] | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
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
        variants: Name -> notebook parameters that differ from ``config``, e.g.
            ``{"standard": {}, "zscore+strong": {"NORMALIZATION": "zscore", "AUGMENTATION": "strong"}}``.
            ``None`` runs ``config`` alone as ``"config"``.
        device: Compute device; chosen by :func:`get_device` when ``None``.
        progress: Show progress bars.

    Returns:
        One row per (variant, held-out source): see :func:`run_source_fold`.

    Raises:
        ValueError: fewer than two sources, an unknown source or parameter (the message names it).
    """
    variants = {"config": {}} if variants is None else dict(variants)
    if not variants:
        raise ValueError("VARIANTS is empty; give at least one, e.g. {'spec': {}}.")
    configs = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"Variant name {name!r} must be a plain folder name (letters, digits, _ . + -).")
        try:
            configs[name] = config.with_parameters(**dict(overrides))
        except ValueError as exc:
            raise ValueError(f"VARIANTS[{name!r}]: {exc}") from None
    index = index_dataset(data_dir, config.group_regex, config.mask_labels)
    configs = {name: c.with_parameters(GROUP_REGEX=index.group_regex) for name, c in configs.items()}
    folds = source_folds(index.pairs, sources)
    out = Path(output_dir)
    device = device or get_device()
    caches: dict[tuple[int, str], CachedArrays] = {}
    rows = []
    for name, run_config in configs.items():
        key = (run_config.image_size, run_config.preprocessing)
        if key not in caches:
            caches[key] = load_arrays(index.pairs, *key, progress=progress)
        for fold in folds:
            row = run_source_fold(
                run_config,
                fold,
                caches[key],
                out / name / fold.held_out,
                device=device,
                progress=progress,
                data_dir=data_dir,
            )
            rows.append({"variant": name, **row})
            _atomic_write(out / LOSO_CSV_NAME, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


def plot_intensity_draws(image: np.ndarray, augmentation: str = "gin", n: int = 12, seed: int = 0) -> Any:
    """One uint8 slice under ``n`` draws of a batch intensity augmentation (``"gin"``, ``"curves"``
    or ``"strong+gin"``), as the network sees it after ``"minmax"`` scaling; the first panel is the
    slice itself. Returns the matplotlib Figure."""
    batch = torch.from_numpy(normalize_intensity(image, "minmax"))[None, None].repeat(n, 1, 1, 1)
    augment = BatchIntensityAugmentation(augmentation, seed)
    draws = [batch[0, 0].numpy()] + [augment(batch[i : i + 1], 1, i)[0, 0].numpy() for i in range(n - 1)]
    columns = min(6, n)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows), squeeze=False)
    for k, (ax, x) in enumerate(zip(axes.flat, draws)):
        ax.imshow(x, cmap="gray")
        ax.set_title("original" if k == 0 else f"draw {k}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"AUGMENTATION={augmentation!r}: one slice, {n - 1} draws")
    fig.tight_layout()
    return fig


def fold_examples(folds: Sequence[SourceFold]) -> list[SamplePair]:
    """One slice per held-out source for pictures: its first slice with kidney, or its first slice
    when none has kidney (named in a printed note)."""
    examples, without = [], []
    for fold in folds:
        with_kidney = next((p for p in fold.test if load_pair(p)[1].any()), None)
        if with_kidney is None:
            without.append(fold.held_out)
        examples.append(with_kidney or fold.test[0])
    if without:
        print(f"No slice with kidney in {', '.join(without)}: its first slice is shown instead.")
    return examples


def fold_table(folds: Sequence[SourceFold]) -> pd.DataFrame:
    """One row per fold: the held-out source, its test images and patients, and what trains."""
    return pd.DataFrame(
        [
            {
                "held_out": f.held_out,
                "train_images": len(f.train),
                "train_sources": len({p.source for p in f.train}),
                "test_images": len(f.test),
                "test_cases": len({p.case for p in f.test}),
            }
            for f in folds
        ]
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
    for fold in folds:
        for variant in variants:
            fold_dir = out / variant / fold.held_out
            files += [fold_dir / n for n in (BEST_MODEL_NAME, METRICS_PNG_NAME, "evaluation_per_image.csv")]
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


def plot_leave_one_source_out(table: pd.DataFrame) -> Any:
    """Pooled Dice, mean Dice and mean HD95 per held-out source, one bar per variant."""
    sources = list(dict.fromkeys(table["held_out"]))
    variants = list(dict.fromkeys(table["variant"]))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(sources) * 3), 4.2))
    panels = (("pooled_dice", "pooled Dice", (0, 1)), ("mean_dice", "mean Dice per slice", (0, 1)))
    panels += (("mean_hd95", "mean HD95 (px, lower is better)", None),)
    x = np.arange(len(sources))
    for ax, (column, label, limits) in zip(axes, panels):
        for k, variant in enumerate(variants):
            part = table[table["variant"] == variant].set_index("held_out").reindex(sources)
            bars = ax.bar(x + (k - (len(variants) - 1) / 2) * width, part[column], width, label=variant)
            if column != "mean_hd95":
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(x, sources, rotation=20, fontsize=8)
        ax.set_title(label, fontsize=10)
        if limits:
            ax.set_ylim(*limits)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, title="variant", title_fontsize=7)
    fig.suptitle("Leave-one-source-out: trained on the other sources, tested on this one", fontsize=11)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    export_for_kaggle()
