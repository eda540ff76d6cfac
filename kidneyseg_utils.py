"""kidneyseg_utils: the pipeline shared by the kidneyseg notebooks (attention U-Net segmentation of
kidneys in grayscale 2D CT, MRI and ultrasound slices), in the order data flows:
    1. Config             -- every setting of a run, validated before any work.
    2. Reading data       -- image/mask pairs, the reading rules, patient ids, splits and folds.
    3. Datasets           -- decoded arrays in memory and the torch Datasets of a run.
    4. Intensity          -- how model inputs are made: x / 255, or a study's registered mapping.
    5. Augmentation       -- the Albumentations 2.x training pipelines.
    6. Model              -- the attention U-Net.
    7. Losses and metrics -- focal + Dice loss; metrics from tp/fp/fn counts.
    8. Training           -- AdamW, early stopping, AMP, atomic checkpoints, resume (exact on a CPU).
    9. Inference and evaluation -- checkpoints, TTA, per-image/patient/pooled scores, folder prediction.
   10. Runtime            -- Kaggle or not, headless or not; finding attached data, models and runs.
   11. The default dataset -- synthetic kidney phantoms and ``DATA_DIR`` resolution.

The studies of notebooks 01, 02, 04 and 05 live in ``kidneyseg_studies.py``, which imports this module.
Names without a leading underscore are public: what the notebooks call, and the parts of a custom cell.
Importing has no side effects; run as a script in a Kaggle session it copies itself into
``/kaggle/working`` (:func:`export_for_kaggle`).
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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

# The release: kidneyseg_studies.py refuses to run beside a kidneyseg_utils.py of another release.
__version__ = "0.3.0"


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

# Settings a checkpoint fixes: the network's shape and how its inputs are made. A checkpoint only
# loads (or resumes) with equal values.
CHECKPOINT_FIELDS = ("base_channels", "depth", "dropout", "image_size", "input_mapping")
# Settings of releases up to 0.2.0 that now make up Config.input_mapping, with their defaults.
LEGACY_INPUT_FIELDS = (("preprocessing", "none"), ("normalization", "minmax"))
# Settings a resumed run may change: how long it trains and on what hardware. Every other setting
# changes what the run computes, so a run resumes only with equal values (see train_model).
RESUME_FREE_FIELDS = ("num_epochs", "patience", "max_train_minutes", "num_workers", "multi_gpu")


# The spellings of a yes/no parameter (papermill's -p passes "false", "no" or "0" as strings).
FLAG_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _as_flag(value: Any) -> Any:
    """``value`` as a bool when it is a spelling of one (:data:`FLAG_WORDS`, 1, 0), else unchanged."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return FLAG_WORDS.get(value.strip().lower(), value)
    return value


def parse_flags(**flags: Any) -> list[bool]:
    """The yes/no notebook parameters given, in order, as bools: ``True``/``False``, ``1``/``0`` or
    (any case) ``"true"``/``"false"``, ``"yes"``/``"no"``, ``"1"``/``"0"``. Anything else, such as
    ``"maybe"`` or ``""``, is a ``ValueError`` naming the parameter: a string is never taken as true.

    Example: ``RESUME, OVERWRITE = ku.parse_flags(RESUME=RESUME, OVERWRITE=OVERWRITE)``.
    """
    parsed = []
    for name, value in flags.items():
        flag = _as_flag(value)
        if not isinstance(flag, bool):
            raise ValueError(
                f"{name} must be True or False (or true/false, yes/no, 1/0 in any case); got {value!r}."
            )
        parsed.append(flag)
    return parsed


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class Config:
    """Every setting of a run, each described once, here; the defaults are the kidneyseg design's.

    The notebook parameters are the upper-case field names (``IMAGE_SIZE`` is ``image_size``, see
    :data:`NOTEBOOK_PARAMETERS`). ``"auto"`` values are made concrete when the config is built, so the
    copy stored in every checkpoint (plain JSON: :meth:`to_dict`, :meth:`from_dict`) says what ran.
    """

    image_size: int = 256  # side of the square network input, a multiple of 2**depth
    batch_size: int = 16  # images per optimisation step
    learning_rate: float = 1e-3  # AdamW
    weight_decay: float = 1e-4  # AdamW
    num_epochs: int = 150  # upper bound on epochs; early stopping usually ends sooner
    patience: int = 20  # epochs without a lower validation loss before training stops
    grad_clip_norm: float = 1.0  # maximum global gradient norm
    focal_alpha: float = 0.25  # focal-loss weight of kidney pixels (background: 1 - focal_alpha)
    focal_gamma: float = 2.0  # focal-loss focusing exponent
    focal_weight: float = 0.6  # weight of the focal term in the loss
    dice_weight: float = 0.4  # weight of the soft-Dice term in the loss
    dropout: float = 0.2  # dropout probability inside every residual block
    base_channels: int = 64  # width of the first encoder block (it doubles per block)
    depth: int = 4  # number of encoder blocks
    val_fraction: float = 0.2  # share of the patients outside the test split that validates
    # share of the patients held out first as a test split that chooses nothing; 0: no test split
    test_fraction: float = 0.15
    folds: int = 5  # cross-validation folds of the patients outside the test split, used with fold
    # None: the val_fraction split; k: fold k of cross_validation_folds validates, the others train,
    # in OUTPUT_DIR/fold_k (run_output_dir); notebook 04 averages the folds (FoldEnsemble)
    fold: int | None = None
    inference_threshold: float = 0.5  # probability from which a pixel is kidney
    seed: int = 42  # seed of the split, the initial weights, the shuffling and the augmentation
    # patient id in file names (its first group, or the whole match): "auto" takes the part before the
    # first underscore where a source's names allow it (infer_group_regex), {source: pattern or None}
    # sets one per source, None splits by image
    group_regex: str | dict[str, str | None] | None = "auto"
    # masks with several values (binarize_mask): None is an error naming the file, "nonzero" reads
    # every non-zero label as kidney, a list such as [1] reads exactly those values as kidney
    mask_labels: str | list[int] | None = None
    # how model inputs are made from resized slices: "minmax" (x / 255), or the name of a study's
    # mapping in INPUT_MAPPINGS (set through kidneyseg_studies.input_mapping_name)
    input_mapping: str = "minmax"
    lr_factor: float = 0.5  # ReduceLROnPlateau on the validation loss: factor
    lr_patience: int = 5  # ReduceLROnPlateau: epochs without a lower validation loss
    min_lr: float = 1e-6  # ReduceLROnPlateau: floor
    max_images: int | None = None  # at most this many pairs (a seeded random subset); None: all
    # stop before an epoch that, at the mean epoch time so far, would end past this many minutes of
    # training (in a Kaggle session, of the session); "auto": KAGGLE_TRAIN_MINUTES on Kaggle, else None
    max_train_minutes: float | str | None = "auto"
    num_workers: int | None = None  # data-loader workers; None: 0 on a CPU, up to 4 on a GPU
    # mixed precision (autocast_dtype): "cuda": fp16 with a GradScaler below compute capability 8 (a
    # T4), bf16 from 8.0, fp32 on a CPU; True: also bf16 on a CPU with native bf16; False: fp32
    amp: bool | str = "cuda"
    multi_gpu: bool | str = "auto"  # every visible GPU (nn.DataParallel); "auto": yes on Kaggle

    def __post_init__(self) -> None:
        self.max_train_minutes = resolve_auto(self.max_train_minutes, KAGGLE_TRAIN_MINUTES, None)
        self.multi_gpu = _as_flag(resolve_auto(self.multi_gpu, True, False))
        self.amp = "cuda" if isinstance(self.amp, str) and self.amp.lower() == "cuda" else _as_flag(self.amp)
        if isinstance(self.mask_labels, tuple):
            self.mask_labels = list(self.mask_labels)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter and the allowed values for any invalid field."""

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"{name.upper()} (Config.{name}) must be {allowed}; got {value!r}.")

        def number(
            name: str, low: float, high: float = math.inf, *, above: bool = False, below: bool = False
        ) -> bool:
            v = getattr(self, name)  # within [low, high]; ``above``/``below``: the end excluded
            return _is_num(v) and (low < v if above else low <= v) and (v < high if below else v <= high)

        for name in ("depth", "base_channels", "batch_size", "num_epochs", "patience"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(_is_int(self.lr_patience) and self.lr_patience >= 0, "lr_patience", "an integer >= 0")
        for name in ("learning_rate", "grad_clip_norm"):
            need(number(name, 0, above=True), name, "a number > 0")
        for name in ("weight_decay", "focal_gamma", "focal_weight", "dice_weight", "min_lr"):
            need(number(name, 0), name, "a number >= 0")
        for name in ("focal_alpha", "inference_threshold"):
            need(number(name, 0, 1), name, "a number in [0, 1]")
        need(number("dropout", 0, 1, below=True), "dropout", "a number in [0, 1)")
        between = "a number strictly between 0 and 1"
        need(number("val_fraction", 0, 1, above=True, below=True), "val_fraction", f"{between}, e.g. 0.2")
        need(number("lr_factor", 0, 1, above=True, below=True), "lr_factor", between)
        test = "a number in [0, 1), e.g. 0.15 (0: no test split)"
        need(number("test_fraction", 0, 1, below=True), "test_fraction", test)
        need(_is_int(self.seed), "seed", "an integer")
        mapping = isinstance(self.input_mapping, str) and bool(self.input_mapping)
        need(mapping, "input_mapping", '"minmax" or the name of a mapping in INPUT_MAPPINGS')
        regex = self.group_regex
        patterns = list(regex.values()) if isinstance(regex, dict) else [regex]
        per_source = isinstance(regex, dict) and all(p is None or isinstance(p, str) for p in patterns)
        allowed = '"auto", a regular expression string, {source: pattern or None} or None'
        need(regex is None or (isinstance(regex, str) and bool(regex)) or per_source, "group_regex", allowed)
        labels = self.mask_labels
        listed = (
            isinstance(labels, (list, tuple)) and bool(labels) and all(_is_int(x) and x > 0 for x in labels)
        )
        allowed = 'None, "nonzero" or a list of label values > 0, e.g. [1] or [1, 2]'
        need(labels in (None, "nonzero") or listed, "mask_labels", allowed)
        images = self.max_images is None or (_is_int(self.max_images) and self.max_images >= 2)
        need(images, "max_images", "None or an integer >= 2")
        minutes = self.max_train_minutes is None or number("max_train_minutes", 0, above=True)
        need(minutes, "max_train_minutes", '"auto", None or a number of minutes > 0')
        workers = self.num_workers is None or (_is_int(self.num_workers) and self.num_workers >= 0)
        need(workers, "num_workers", "None (automatic) or an integer >= 0")
        need(isinstance(self.amp, bool) or self.amp == "cuda", "amp", 'True, False or "cuda"')
        need(_is_int(self.folds) and self.folds >= 2, "folds", "an integer >= 2, e.g. 5")
        fold = self.fold is None or (_is_int(self.fold) and 0 <= self.fold < self.folds)
        need(fold, "fold", f"None or an integer from 0 to {self.folds - 1} (FOLDS={self.folds})")
        need(isinstance(self.multi_gpu, bool), "multi_gpu", '"auto", True or False')
        multiple = 2**self.depth
        size_ok = _is_int(self.image_size) and self.image_size >= multiple and self.image_size % multiple == 0
        need(size_ok, "image_size", f"a positive multiple of {multiple} (2**depth), e.g. 128 or 256")
        weights = "> 0 when focal_weight is 0 (the loss needs a positive weight)"
        need(self.focal_weight + self.dice_weight > 0, "dice_weight", weights)
        for pattern in (p for p in patterns if p not in (None, AUTO)):
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
        """Build a config from :meth:`to_dict` output; unknown keys are an error naming them."""
        values = dict(values)
        # Releases up to 0.2.0 stored preprocessing, normalisation and augmentation as settings; the
        # first two now name the run's input mapping as kidneyseg_studies names it.
        old = [v for k, d in LEGACY_INPUT_FIELDS if (v := values.pop(k, d)) != d]
        values.pop("augmentation", None)
        values.setdefault("input_mapping", "/".join(old) or "minmax")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_parameters(cls, **parameters: Any) -> Config:
        """Build a config from notebook parameters (``IMAGE_SIZE=128, ...``); unknown names are an error."""
        return cls().with_parameters(**parameters)

    def with_parameters(self, **parameters: Any) -> Config:
        """A copy with some notebook parameters changed; unknown names or invalid values are an error."""
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
    """Choose the compute device once: ``"auto"``/None picks CUDA when available, else CPU; or
    an explicit name such as ``"cpu"`` or ``"cuda:0"``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={device!r} asks for CUDA, but no CUDA GPU is visible; use 'auto'.")
    return chosen


def _atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Any], None]) -> Path:
    """Write text, bytes or ``data(handle)`` to ``path`` through a temporary file, fsync and rename,
    so a kill leaves the old or the new file, never a broken one. Every file this module writes goes here."""
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
    """One image and its mask."""

    image: Path  # the image file
    mask: Path  # the mask file
    source: str  # the dataset folder (holding images/ and masks/) relative to the data root
    name: str  # the shared file stem
    case: str  # patient id from ``group_regex`` (the stem when no regex is given)
    mask_labels: tuple[int, ...] | str | None = None  # how the mask is read (``Config.mask_labels``)

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
    """The pairs found under a data root, and what could not be paired."""

    root: Path  # the data root that was searched
    pairs: list[SamplePair]  # matched pairs, sorted by source and name
    orphan_images: list[Path] = field(default_factory=list)  # images without a mask
    orphan_masks: list[Path] = field(default_factory=list)  # masks without an image
    # the patient-id pattern of the cases (None: each image its own case; a dict: one per source)
    group_regex: str | dict[str, str | None] | None = None

    def summary(self) -> pd.DataFrame:
        """One row per source: pairs, cases and orphans."""
        pairs = pd.DataFrame([(p.source, p.case) for p in self.pairs], columns=["source", "case"])
        table = pairs.groupby("source").agg(pairs=("case", "size"), cases=("case", "nunique")).reset_index()
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


def find_below(root: str | os.PathLike, name: str, max_depth: int | None = 6) -> list[Path]:
    """Every file or folder called ``name`` at most ``max_depth`` folders below ``root`` (None: any
    depth), sorted; hidden folders and the insides of images/ and masks/ are not searched."""
    root = Path(root)
    if not root.is_dir():
        return []
    hits = []
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(current)
        if name in filenames or name in dirnames:
            hits.append(here / name)
        deep = max_depth is not None and len(here.relative_to(root).parts) >= max_depth
        keep = [] if deep else dirnames
        dirnames[:] = sorted(d for d in keep if not d.startswith(".") and d not in ("images", "masks"))
    return sorted(hits)


def find_dataset_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder under ``root`` (itself included) with images/ and masks/ subfolders, sorted."""
    found = find_below(root, "images", max_depth=None)
    return [hit.parent for hit in found if hit.is_dir() and (hit.parent / "masks").is_dir()]


def _image_files(folder: Path) -> dict[str, Path]:
    """Map stem -> file for the image files in ``folder``; two files with one stem is an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
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


# GROUP_REGEX="auto": the patient id is the part of a file name before its first underscore.
AUTO_GROUP_REGEX = r"^([^_]+)_"
MIN_AUTO_GROUPS = 3


def infer_group_regex(
    stems_by_source: Mapping[str, Sequence[str]],
) -> tuple[str | dict[str, str | None] | None, str]:
    """The ``GROUP_REGEX="auto"`` rule for these file stems, and a sentence saying what it found.

    A source whose every stem has an underscore with a digit after it (``case7_012``) takes
    :data:`AUTO_GROUP_REGEX` (patient ``case7``); any other source is split by image. With no source
    taking it, or fewer than :data:`MIN_AUTO_GROUPS` patients in all, everything is split by image
    (``None``). Returns one pattern, or ``{source: pattern or None}`` when sources differ.
    """
    stems = {source: list(names) for source, names in stems_by_source.items() if names}
    fits = {source: all(re.match(r"[^_]+_\D*\d", n) for n in names) for source, names in stems.items()}
    groups = {(s, n.split("_")[0] if fits[s] else n) for s, names in stems.items() for n in names}
    count = f"{len(groups)} patients in {sum(map(len, stems.values()))} images"
    without = sorted(source for source, fit in fits.items() if not fit)
    if len(without) == len(fits) or len(groups) < MIN_AUTO_GROUPS:
        found = f"only {len(groups)} patient(s)" if len(without) < len(fits) else "no source fits"
        return None, (
            f'GROUP_REGEX="auto" found no usable patient id ({found}; the id is the part of a file name '
            "before its first underscore, with a slice number after it), so the data are split by "
            "image: slices of one patient can sit on both sides of the split, which flatters validation "
            "and test scores. Rename the files (case7_012.png) or set GROUP_REGEX to a pattern whose "
            "first group is the patient id."
        )
    rule = 'GROUP_REGEX="auto": patient id = the part before the first underscore'
    if not without:
        return AUTO_GROUP_REGEX, f"{rule} ({AUTO_GROUP_REGEX!r}): {count}. Set GROUP_REGEX if that is wrong."
    return {s: None if s in without else AUTO_GROUP_REGEX for s in stems}, (
        f"{rule} ({count}), except in {', '.join(without)}, whose file names carry no such id: their "
        "images are split one by one, so one patient's slices can sit on both sides of the split. Rename "
        "those files (case7_012.png) or set GROUP_REGEX to a pattern, or to {source: pattern}."
    )


def index_dataset(
    data_dir: str | os.PathLike,
    group_regex: str | Mapping[str, str | None] | None = None,
    mask_labels: str | Sequence[int] | None = None,
    parameter: str = "DATA_DIR",
) -> DatasetIndex:
    """Find all image/mask pairs under ``data_dir``, matched by file stem within each folder.

    ``data_dir`` is one folder with images/ and masks/ or a root holding several at any depth;
    ``group_regex`` and ``mask_labels`` as in :class:`Config` (the rule used is stored in the index);
    ``parameter`` is the notebook parameter that gave ``data_dir``, named in the errors.
    Raises ``FileNotFoundError`` for a missing or empty root, ``ValueError`` for no pair at all (listing
    the orphans) or an ambiguous file name.
    """
    root = Path(data_dir).expanduser()
    name = f"{parameter} {str(root)!r}"
    if not root.exists():
        raise FileNotFoundError(f"{name} does not exist. {_LAYOUT_HELP}")
    if not root.is_dir():
        raise NotADirectoryError(f"{name} is a file, not a folder. {_LAYOUT_HELP}")
    folders = find_dataset_folders(root)
    if not folders:
        hint = " Images without masks belong in PREDICT_DIR." if parameter != "DATA_DIR" else ""
        raise FileNotFoundError(f"No images/ + masks/ folders under {name}. {_LAYOUT_HELP}{hint}")
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
            f"No image/mask pairs under {name}: {len(orphan_images)} images and "
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
    if image.shape[2] <= 2:  # gray, or gray + alpha
        return image[:, :, 0]
    color = image[:, :, :3]
    if reduce == "max":
        return color.max(axis=2)
    if color.dtype in (np.uint8, np.uint16, np.float32):
        return cv2.cvtColor(np.ascontiguousarray(color), cv2.COLOR_BGR2GRAY)
    weights = np.array([0.114, 0.587, 0.299])  # B, G, R (ITU-R BT.601)
    return (color.astype(np.float64) * weights).sum(axis=2)


def to_grayscale_uint8(image: np.ndarray) -> np.ndarray:
    """A decoded image as 2D uint8: alpha dropped, colour (BGR) to BT.601 luma, gray+alpha to gray;
    8-bit kept as it is; other depths stretched from their own min..max to 0..255 (constant: zeros)."""
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
    """Whether a mask holds a label besides background and its top value: an intermediate value
    (1/16 of the range from both ends) with :data:`LABEL_SHARE` of the labelled pixels, or, in a ``noisy``
    mask, a band of 1/16 of the range with :data:`NOISY_LABEL_SHARE` of them."""
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

    Alpha is dropped, colour channels reduced by their maximum, NaN is background. With ``labels`` None:
    at most one non-zero value, every non-zero pixel is kidney; float masks in [0, 1], ``>= 0.5``; values
    around one level (soft edges, JPEG noise; see :func:`_several_labels`), ``>= max / 2``; several
    labels (0/1/2, KiTS's 0/1/2/3) raise a ``ValueError`` naming the file, its values and the fix.
    ``labels`` ``"nonzero"``: every non-zero value is kidney; a list of values: exactly those.
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
    """Read one pair at its original size; a decoding error or a size mismatch names the files."""
    image = read_image(pair.image)
    mask = read_mask(pair.mask, pair.mask_labels)
    if image.shape != mask.shape:
        raise ValueError(
            f"Image and mask differ in size: {pair.image} is {image.shape[1]}x{image.shape[0]} "
            f"but {pair.mask} is {mask.shape[1]}x{mask.shape[0]} (width x height). Re-export the "
            "mask at the image's size."
        )
    return image, mask


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    mask_f = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return (mask_f >= 0.5).astype(np.uint8)


def _resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.copy()
    return cv2.resize(
        image, (size, size), interpolation=cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    )


@dataclass
class CachedArrays:
    """Decoded, resized pairs held in memory."""

    images: np.ndarray  # ``(N, S, S)`` uint8 images, prepared by the input mapping (model_input)
    masks: np.ndarray  # ``(N, S, S)`` uint8 masks of 0 and 1
    pairs: list[SamplePair]  # the pairs in the same order
    original_sizes: list[tuple[int, int]]  # ``(height, width)`` of each original image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ``(path, reason)`` of unreadable files

    def __len__(self) -> int:
        return len(self.pairs)


def _readable_pairs(
    pairs: Iterable[SamplePair], skip_bad_files: bool, skipped: list[tuple[str, str]]
) -> Iterator[tuple[SamplePair, np.ndarray, np.ndarray]]:
    """``(pair, image, mask)`` of each readable pair; with ``skip_bad_files`` an unreadable one is
    listed in ``skipped`` as ``(path, reason)`` instead of raising."""
    for pair in pairs:
        try:
            image, mask = load_pair(pair)
        except ImageReadError as exc:
            if not skip_bad_files:
                raise
            skipped.append((str(pair.image), str(exc)))
            continue
        yield pair, image, mask


def load_arrays(
    pairs: Sequence[SamplePair],
    image_size: int,
    input_mapping: str = "minmax",
    skip_bad_files: bool = False,
    progress: bool = False,
) -> CachedArrays:
    """Decode and resize every pair once, as the model's input mapping prepares it (:func:`model_input`);
    with ``skip_bad_files`` unreadable files are listed in ``skipped`` instead of raising."""
    images, masks, kept, sizes, skipped = [], [], [], [], []
    shown = _progress_bar(pairs, progress, desc="loading", unit="img", leave=False)
    for pair, image, mask in _readable_pairs(shown, skip_bad_files, skipped):
        sizes.append(image.shape[:2])
        images.append(model_input(image, image_size, input_mapping))
        masks.append(_resize_mask(mask, image_size))
        kept.append(pair)
    if not kept:
        raise ValueError(f"None of the {len(pairs)} pairs could be read; see the skipped files.")
    return CachedArrays(np.stack(images), np.stack(masks), kept, sizes, skipped)


def split_pairs(
    pairs: Sequence[SamplePair], val_fraction: float = 0.2, seed: int = 42, grouped: bool = True
) -> tuple[list[SamplePair], list[SamplePair]]:
    """Split pairs into training and validation reproducibly: by patient (``GroupShuffleSplit`` on
    :attr:`SamplePair.group`, ``val_fraction`` of the patients) when ``grouped``, else by image."""
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
    splitter = (GroupShuffleSplit if grouped else ShuffleSplit)(1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.arange(len(pairs)), groups=groups if grouped else None))
    return [pairs[i] for i in sorted(train_idx)], [pairs[i] for i in sorted(val_idx)]


def cross_validation_folds(
    pairs: Sequence[SamplePair], folds: int = 5, seed: int = 42, grouped: bool = True
) -> list[list[SamplePair]]:
    """Divide pairs into ``folds`` patient-disjoint folds, seeded and balanced by source: source by
    source, shuffled patients each go to the fold with the fewest images of that source (ties: fewest in
    all, then the lowest fold). Each fold keeps the input order."""
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
    """Hold out ``test_fraction`` of the patients first (seed ``seed + 1``), then split the rest by
    :func:`split_pairs`, or with ``fold`` set by :func:`cross_validation_folds`. Fewer than three
    patients: no test split, with a warning."""
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
    """Shuffles ``n`` indices anew each epoch from ``(seed, epoch)`` and yields ``epoch * n + i``, so
    each item's augmentation is seeded from ``(seed, epoch, i)`` whatever the workers, and a resume on a
    CPU is exact (on a GPU, cuDNN's autotuned kernels are not deterministic)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        base = self.epoch * self.n
        return iter([base + i for i in order])

    def __len__(self) -> int:
        return self.n


class KidneyDataset(Dataset):
    """``(image, mask)`` float tensors ``(1, S, S)`` over cached uint8 arrays: the seeded augmentation,
    then the input mapping's normalisation, with the constants of the un-augmented image."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        transform: A.Compose | None = None,
        seed: int = 0,
        input_mapping: str = "minmax",
    ) -> None:
        if images.shape != masks.shape or images.ndim != 3:
            raise ValueError(f"images {images.shape} and masks {masks.shape} must be equal (N, H, W).")
        self.images, self.masks, self.transform, self.seed = images, masks, transform, seed
        normalizer = input_mapping_of(input_mapping).normalizer
        self.normalizers = None if normalizer is None else [normalizer(image) for image in images]

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
        scaled = _unit_scale(image) if self.normalizers is None else self.normalizers[i](image)
        image_t = torch.from_numpy(scaled)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask > 0, dtype=np.float32))
        return image_t.unsqueeze(0), mask_t.unsqueeze(0)


@dataclass
class PreparedData:
    """Everything notebook 03 needs about the data of a run."""

    data_dir: Path  # the data root
    index: DatasetIndex  # all pairs found, with orphans
    train: CachedArrays  # cached training arrays
    val: CachedArrays  # cached validation arrays
    train_dataset: KidneyDataset  # augmented training dataset
    val_dataset: KidneyDataset  # validation dataset (resize only)
    test: list[SamplePair] = field(default_factory=list)  # held out, never loaded here (04 scores it)
    config: Config | None = None  # the run's config, ``GROUP_REGEX="auto"`` made concrete: train with it

    def summary(self) -> pd.DataFrame:
        """Per source: pairs, cases, orphans, and how many images went to each side of the split."""
        table = self.index.summary()
        for name, part in (("train", self.train.pairs), ("val", self.val.pairs), ("test", self.test)):
            counts = pd.Series([p.source for p in part]).value_counts()
            table[name] = [int(counts.get(s, 0)) for s in table["source"]]
        loaded = zip(self.train.pairs + self.val.pairs, [*self.train.masks, *self.val.masks])
        with_kidney = pd.Series([p.source for p, m in loaded if m.any()]).value_counts()
        table["with_kidney"] = [int(with_kidney.get(s, 0)) for s in table["source"]]
        return table

    def split_record(self) -> dict[str, list[str]]:
        """The split as plain lists of ``source/name`` keys (stored in checkpoints)."""
        parts = {"train": self.train.pairs, "val": self.val.pairs, "test": self.test}
        return {name: [p.key for p in part] for name, part in parts.items()}


def prepare_data(
    config: Config, data_dir: str | os.PathLike, skip_bad_files: bool = False, progress: bool = False
) -> PreparedData:
    """Index, subsample, split, decode and wrap the data of a run, as the config says.

    Orphans are left out with a warning; the test split is held out first and never loaded here. The
    returned ``config`` has ``GROUP_REGEX="auto"`` made concrete: train with it.
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
    train, val = (
        load_arrays(part, config.image_size, config.input_mapping, skip_bad_files, progress)
        for part in (train_pairs, val_pairs)
    )
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
    return PreparedData(Path(data_dir), index, train, val, train_ds, val_ds, test_pairs, config)


def make_datasets(
    train: CachedArrays, val: CachedArrays, config: Config, transform: A.Compose | None = None
) -> tuple[KidneyDataset, KidneyDataset]:
    """The augmented training dataset and the plain validation dataset of a run, as configured;
    ``transform`` replaces :func:`build_train_transform` (a study's augmentation)."""
    augment = build_train_transform() if transform is None else transform
    return (
        KidneyDataset(train.images, train.masks, augment, config.seed, config.input_mapping),
        KidneyDataset(val.images, val.masks, None, config.seed, config.input_mapping),
    )


# =================================================================================================
# 4. Intensity
# =================================================================================================


@dataclass(frozen=True)
class InputMapping:
    """How a network's inputs are made from uint8 slices at its size. ``prepare`` maps a slice to the
    uint8 array that is cached and augmented (None: unchanged); ``normalizer(array)`` returns the
    function that turns that array, after augmentation, into float32 input, built from the
    un-augmented array so that training and inference use the same constants (None: ``x / 255``)."""

    prepare: Callable[[np.ndarray], np.ndarray] | None = None
    normalizer: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None


# The input mappings by name (Config.input_mapping): "minmax", the default, is the only one here; a
# study registers others (kidneyseg_studies.register_input_mappings: preprocessing, normalisations).
INPUT_MAPPINGS: dict[str, InputMapping] = {"minmax": InputMapping()}


def input_mapping_of(name: str) -> InputMapping:
    """The registered :class:`InputMapping` called ``name``; an unknown name is an error saying what
    to attach."""
    if name not in INPUT_MAPPINGS:
        raise ValueError(
            f"The input mapping {name!r} (Config.input_mapping) is not registered here (registered: "
            f"{sorted(INPUT_MAPPINGS)}). A study trained with it: attach kidneyseg_studies.py and call "
            "kidneyseg_studies.register_input_mappings() first."
        )
    return INPUT_MAPPINGS[name]


def model_input(image: np.ndarray, image_size: int, input_mapping: str = "minmax") -> np.ndarray:
    """The uint8 array a model's input comes from: the slice resized whole, then prepared."""
    prepare = input_mapping_of(input_mapping).prepare
    resized = _resize_gray(image, image_size)
    return resized if prepare is None else prepare(resized)


def _unit_scale(image: np.ndarray) -> np.ndarray:
    """8-bit 0..255 to [0, 1]; another depth from its own minimum and maximum (a flat image: zeros)."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    values = array.astype(np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def normalize_intensity(image: np.ndarray, input_mapping: str = "minmax") -> np.ndarray:
    """Scale a prepared uint8 image (:func:`model_input`) to float32 model input as ``input_mapping``
    does, with the image's own constants."""
    normalizer = input_mapping_of(input_mapping).normalizer
    return _unit_scale(image) if normalizer is None else normalizer(image)(image)


# =================================================================================================
# 5. Augmentation
# =================================================================================================


def _albumentations() -> Any:
    """Import Albumentations without its online update check (Kaggle sessions run offline)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def build_train_transform() -> A.Compose:
    """The training augmentation (Albumentations 2.x) on uint8 images and 0/1 masks, which are at
    the model's size already (:func:`load_arrays`); :class:`KidneyDataset` normalises afterwards:
    horizontal and vertical flips (p 0.7 each); shift up to 6.25 %, scale 0.9-1.1, rotation up to
    45 degrees (p 0.5), moving image and mask together (zero padding, nearest-neighbour masks);
    brightness and contrast +-0.2 (p 0.5, the image only)."""
    A = _albumentations()
    return A.Compose(
        _geometry(flip_p=0.7, shift=0.0625, scale=(0.9, 1.1), rotate=45, p=0.5)
        + [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)]
    )


def _geometry(flip_p: float, shift: float, scale: tuple[float, float], rotate: float, p: float) -> list[Any]:
    """Both flips and an affine (zero padding, nearest-neighbour masks)."""
    A = _albumentations()
    return [
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
    """Seed a pipeline from one shared generator: Albumentations' ``set_random_seed`` gives every
    transform the same seed, so equal-probability flips would always coincide."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


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
    """The enhanced U-Net: residual blocks, and spatial attention on the bridge.

    ``depth`` encoder blocks (``base``, ``2 base``, ... channels) with max-pooling, a bridge of
    ``base * 2**depth`` channels followed by spatial attention, ``depth`` decoder blocks (2x2 transposed
    convolution, concatenation with the skip connection, residual block) and a 1x1 head. Returns logits;
    height and width must be multiples of ``2**depth``. On a CPU the input goes to channels-last
    (:attr:`cpu_channels_last`: the same numbers, faster; docs/performance.md).
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


DEFAULT_ARCHITECTURE = "AttentionUNet"
# Other networks that train_model can train and load_model can rebuild: name -> (the class's
# "module.QualName", build(config) -> module). kidneyseg_studies registers the benchmark's peers.
ARCHITECTURES: dict[str, tuple[str, Callable[[Config], nn.Module]]] = {}


def register_architecture(name: str, class_name: str, build: Callable[[Config], nn.Module]) -> None:
    """Make another network a first-class model: ``build(config)`` makes it (one input channel, one
    output logit map); checkpoints of a module of class ``class_name`` (``"package.module.Class"``)
    record ``name``, and :func:`load_model` rebuilds it with ``build``."""
    ARCHITECTURES[name] = (class_name, build)


def architecture_of(model: nn.Module) -> str:
    """The registered name of ``model``'s network (what its checkpoints record)."""
    base = _unwrap(model)
    if type(base) is AttentionUNet:
        return DEFAULT_ARCHITECTURE
    class_name = f"{type(base).__module__}.{type(base).__qualname__}"
    for name, (registered, _) in ARCHITECTURES.items():
        if registered == class_name:
            return name
    raise ValueError(
        f"{class_name} is not a registered architecture, so notebook 04 could not rebuild it from a "
        "checkpoint: register it first with kidneyseg_utils.register_architecture(name, class_name, build)."
    )


def build_model(config: Config, architecture: str = DEFAULT_ARCHITECTURE) -> nn.Module:
    """The model a config describes (the attention U-Net, or a registered ``architecture``); its
    initial weights come from ``config.seed`` alone."""
    if architecture != DEFAULT_ARCHITECTURE and architecture not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {architecture!r}: this session knows "
            f"{[DEFAULT_ARCHITECTURE, *ARCHITECTURES]}. Register it first "
            "(kidneyseg_studies.register_peers() registers the peers of docs/peers.md)."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if architecture == DEFAULT_ARCHITECTURE:
            return AttentionUNet(1, 1, config.base_channels, config.depth, config.dropout)
        return ARCHITECTURES[architecture][1](config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# =================================================================================================
# 7. Losses and metrics
# =================================================================================================


def focal_loss_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels: ``-alpha_t (1 - p_t)**gamma log p_t``,
    ``alpha_t = alpha`` on kidney, computed in float32 from logits."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t).pow(gamma) * bce).mean()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` pooled over the batch, ``p = sigmoid(logits)``."""
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
    """tp/fp/fn/tn between two binary masks of equal shape, summed over all pixels (and the batch)."""
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

    Empty-mask rule: a ratio with denominator 0 scores 1.0 (nothing to find, nothing found); precision
    with nothing predicted is 1.0 only if ``fn == 0``, recall with no kidney only if ``fp == 0``.
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
    """What :func:`train_model` did and wrote."""

    history: pd.DataFrame  # one row per epoch (epoch, lr, seconds, train_* and val_* metrics)
    best_epoch: int  # epoch (1-based) with the lowest validation loss
    best_val_loss: float  # that loss
    stop_reason: str  # ``"early_stopping"``, ``"num_epochs"`` or ``"time_budget"``
    output_dir: Path  # where the run's files (:attr:`files`) are
    precision: str = "fp32"  # ``"fp32"``, ``"fp16"`` or ``"bf16"`` (see :func:`autocast_dtype`)

    @property
    def best_row(self) -> pd.Series:
        """The history row of the best epoch."""
        return self.history.set_index("epoch").loc[self.best_epoch]

    @property
    def files(self) -> dict[str, Path]:
        """The artefacts of the run by role."""
        names = dict(
            best_model=BEST_MODEL_NAME, last_checkpoint=LAST_CHECKPOINT_NAME, metrics_csv=METRICS_CSV_NAME
        )
        names.update(metrics_png=METRICS_PNG_NAME, config_json=CONFIG_JSON_NAME)
        return {role: self.output_dir / name for role, name in names.items()}


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save with ``torch.save``, atomically (see :func:`_atomic_write`)."""
    return _atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kidneyseg checkpoint with ``weights_only=True`` (no pickled code ever runs); a missing,
    unsafe, damaged, foreign or newer file is an error that says so."""
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
    """The torch generators (CPU, and CUDA where present), the only global ones the pipeline draws from."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`_rng_state` (as CPU uint8 tensors, wherever they were loaded): the CPU generator
    always, the CUDA ones when this machine has as many GPUs as the one that saved them (nothing in the
    pipeline draws on the GPU)."""
    torch.set_rng_state(state["torch"].detach().to(device="cpu", dtype=torch.uint8))
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available() and torch.cuda.device_count() == len(saved):
        torch.cuda.set_rng_state_all([t.detach().to(device="cpu", dtype=torch.uint8) for t in saved])


def _grad_scaler(
    device_type: str, enabled: bool, state: dict[str, Any] | None = None
) -> torch.amp.GradScaler:
    """A GradScaler for fp16 training, with a saved (non-empty) state restored when it is enabled."""
    scaler = torch.amp.GradScaler(device_type, enabled=enabled)
    if enabled and state:
        scaler.load_state_dict(state)
    return scaler


def _config_differences(a: dict[str, Any], b: dict[str, Any], fields: Sequence[str]) -> list[str]:
    return [
        f"{name.upper()}: {a.get(name)!r} vs {b.get(name)!r}" for name in fields if a.get(name) != b.get(name)
    ]


def _check_resume(state: dict[str, Any], config: Config, extra: dict[str, Any], path: Path) -> None:
    """Refuse to resume ``path`` with settings that change what the run computes (every field but
    :data:`RESUME_FREE_FIELDS`) or with another split than the one it started with."""
    fields = [f.name for f in dataclasses.fields(Config) if f.name not in RESUME_FREE_FIELDS]
    if diffs := _config_differences(Config.from_dict(state["config"]).to_dict(), config.to_dict(), fields):
        raise ValueError(
            f"Cannot resume {path}: the settings differ ({'; '.join(diffs)}). Resume with the settings "
            "the run started with (they are in its run_config.json), or start a new run with "
            "OVERWRITE=True or another OUTPUT_DIR."
        )
    stored, now = state.get("split"), extra.get("split")
    if stored is None or now is None or stored == now:
        return
    moved = []
    for part in sorted(set(stored) | set(now)):
        before, after = set(stored.get(part, [])), set(now.get(part, []))
        if before != after:
            moved.append(f"{part}: {len(after - before)} images added, {len(before - after)} gone")
    moved = moved or ["the same images in another order"]
    raise ValueError(
        f"Cannot resume {path}: the data split differs from the one the run started with "
        f"({'; '.join(moved)}), so held-out test images could land in training. Resume with the "
        "DATA_DIR contents and MAX_IMAGES the run started with, or start a new run with "
        "OVERWRITE=True or another OUTPUT_DIR."
    )


def _auto_workers(config: Config, device: torch.device) -> int:
    auto = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    return auto if config.num_workers is None else config.num_workers


# A transform of whole training batches: f(images, epoch, step) -> images (see train_model).
BatchTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


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
    batch_transform: BatchTransform | None = None,
) -> dict[str, float]:
    """One pass over ``loader``, training when an optimizer is given: mean loss and pooled metrics."""
    training = optimizer is not None
    model.train(training)
    counts = ConfusionCounts()
    total_loss, total_n = 0.0, 0
    context = torch.enable_grad() if training else torch.inference_mode()
    with context:
        for step, (images, masks) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if training and batch_transform is not None:
                images = batch_transform(images, epoch, step)
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
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is slower than fp32."""
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check() for check in checks if check is not None)


def autocast_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype for ``Config.amp`` on ``device`` (None: full precision): on CUDA
    :func:`amp_dtype` unless ``amp`` is False; on a CPU bf16 when ``amp`` is True and native, else None."""
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
    """bf16 from compute capability 8.0, fp16 below (a T4: with a GradScaler); None without CUDA."""
    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


class _Autocast(nn.Module):
    """``module`` run under autocast of ``dtype`` (None: full precision) in whichever thread calls it:
    ``nn.DataParallel`` runs each replica in a thread of its own, which inherits whether autocast is
    on but not its dtype (it would fall back to fp16)."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *inputs: Any) -> Any:
        enabled = self.dtype is not None
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=enabled):
            return self.module(*inputs)


def wrap_for_devices(
    model: nn.Module, device: torch.device, multi_gpu: bool, amp: torch.dtype | None = None
) -> nn.Module:
    """``model`` (on ``device``) in ``nn.DataParallel`` over every visible GPU when ``multi_gpu`` and
    several are visible, else unchanged. ``device`` comes first (DataParallel keeps the weights and
    gathers outputs there), and each replica computes in the run's autocast dtype ``amp``."""
    count = torch.cuda.device_count()
    if not (multi_gpu and device.type == "cuda" and count > 1):
        return model
    first = device.index if device.index is not None else torch.cuda.current_device()
    ids = [first] + [i for i in range(count) if i != first]
    return nn.DataParallel(_Autocast(model, "cuda", amp), device_ids=ids, output_device=first)


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
    batch_transform: BatchTransform | None = None,
    sampler: Sampler[int] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    lr_schedule: Callable[[torch.optim.Optimizer, Config], Any] | None = None,
) -> TrainingResult:
    """Train ``model`` (in place) and write the run's artefacts to ``output_dir``.

    AdamW, ReduceLROnPlateau on the validation loss, early stopping, gradient clipping, AMP and
    several GPUs as the config says. After each epoch the best model (by validation loss), a
    resumable last checkpoint and ``training_metrics.csv``; at the end ``training_metrics.png``.

    Args:
        device: Compute device; :func:`get_device` when None.
        resume: Continue from ``last_checkpoint.pth`` in ``output_dir``.
        overwrite: Allow replacing an earlier run's best model in ``output_dir``.
        extra_state: Plain-typed extras stored in both checkpoints (e.g. the split).
        progress: Live progress bars in an interactive front end (never in headless runs).
        log: One plain line per epoch, which headless runs record.
        batch_transform: ``f(images, epoch, step) -> images`` on every normalised training batch on
            the device, after the per-image augmentation (the studies' intensity randomisation); it
            should draw from ``(epoch, step)`` alone, so that a resumed run repeats an uninterrupted one.
        sampler: The order of training items each epoch, with a ``set_epoch(epoch)`` method and
            yielding ``epoch * len(train_dataset) + i`` (see :class:`EpochShuffleSampler`, the
            default); drawing from ``(seed, epoch)`` alone keeps resume exact.
        loss_fn: ``f(logits, masks) -> loss`` instead of the config's :class:`FocalDiceLoss`, for
            a study of another loss (it should compute in float32, as FocalDiceLoss does).
        lr_schedule: ``f(optimizer, config) -> scheduler`` instead of ReduceLROnPlateau; the
            scheduler's ``step(val_loss)`` runs after every epoch and its ``state_dict`` is saved
            for resume (the studies' poly schedule is one).

    Raises:
        FileExistsError: a best model exists and neither ``resume`` nor ``overwrite``.
        ValueError: ``batch_size`` exceeds the training set, or the resume checkpoint does not match.
        TrainingDivergedError: the loss became NaN or infinite.
        RuntimeError: CUDA ran out of memory (the message names the levers).
    """
    out, device, extra = Path(output_dir), device or get_device(), extra_state or {}
    _check_start(train_dataset, config, out, resume, overwrite)
    run = _setup_run(model, config, device, out, resume, extra, loss_fn, lr_schedule, log)
    sampler = sampler if sampler is not None else EpochShuffleSampler(len(train_dataset), config.seed)
    train_loader, val_loader = _loaders(train_dataset, val_dataset, config, device, sampler)

    started, stop_reason = time.monotonic(), "num_epochs"
    before = process_seconds() if on_kaggle() else 0.0  # on Kaggle the budget counts from the session's start
    budget = math.inf if config.max_train_minutes is None else config.max_train_minutes * 60
    shown = dict(desc="epochs", unit="epoch", initial=run.start_epoch - 1, total=config.num_epochs)
    epoch_bar = _progress_bar(range(run.start_epoch, config.num_epochs + 1), progress, **shown)
    step = dict(loss_fn=run.loss_fn, device=device, threshold=config.inference_threshold, amp=run.amp)
    fit = dict(optimizer=run.optimizer, scaler=run.scaler, grad_clip_norm=config.grad_clip_norm)
    try:
        for epoch in epoch_bar:
            tic = time.monotonic()
            sampler.set_epoch(epoch)
            steps = len(train_loader) + len(val_loader)
            bar = _progress_bar(None, progress, total=steps, desc=f"epoch {epoch}", leave=False)
            now = dict(epoch=epoch, bar=bar, **step)
            train_m = _run_epoch(run.runner, train_loader, batch_transform=batch_transform, **fit, **now)
            val_m = _run_epoch(run.runner, val_loader, **now)
            bar.close()
            lr = run.optimizer.param_groups[0]["lr"]
            run.scheduler.step(val_m["loss"])
            row = {"epoch": epoch, "lr": lr, "seconds": time.monotonic() - tic}
            row.update({f"train_{k}": v for k, v in train_m.items()})
            row.update({f"val_{k}": v for k, v in val_m.items()})
            run.history.append(row)
            improved = val_m["loss"] < run.best_loss
            if improved:
                run.best_loss, run.best_epoch, run.stale = val_m["loss"], epoch, 0
            else:
                run.stale += 1
            _save_epoch(run, config, out, epoch, extra, improved)
            epoch_bar.set_postfix(
                val_loss=f"{val_m['loss']:.4f}", val_dice=f"{val_m['dice']:.3f}", best=run.best_epoch
            )
            if log:
                print(_epoch_line(row, config.num_epochs, run.best_epoch, improved), flush=True)
            if run.stale >= config.patience:
                stop_reason = "early_stopping"
                break
            elapsed = time.monotonic() - started
            next_end = before + elapsed + elapsed / (epoch - run.start_epoch + 1)  # at the mean epoch time
            if next_end > budget and epoch < config.num_epochs:
                stop_reason = "time_budget"
                break
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError(
            f"CUDA ran out of memory with BATCH_SIZE={config.batch_size}, IMAGE_SIZE={config.image_size} "
            f"and BASE_CHANNELS={config.base_channels}. Lower BATCH_SIZE first (e.g. "
            f"{max(1, config.batch_size // 2)}), then IMAGE_SIZE or BASE_CHANNELS, and restart the kernel."
        ) from None
    finally:
        epoch_bar.close()
    return _finish_run(run, config, out, stop_reason)


@dataclass
class _Run:
    """What a training run carries from epoch to epoch (see :func:`train_model`)."""

    base: nn.Module  # the network, unwrapped: what checkpoints store
    runner: nn.Module  # the network as it computes (on several GPUs, DataParallel)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # ReduceLROnPlateau, or what the lr_schedule hook built: step(val_loss), state_dict()
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    amp: torch.dtype | None  # the autocast dtype (None: full precision)
    scaler: torch.amp.GradScaler | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    start_epoch: int = 1


def _check_start(train_dataset: Dataset, config: Config, out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a batch larger than the training set and an earlier run's model without RESUME or
    OVERWRITE; remove the temporary files of a process killed while saving."""
    out.mkdir(parents=True, exist_ok=True)
    if len(train_dataset) < config.batch_size:
        raise ValueError(
            f"BATCH_SIZE={config.batch_size} exceeds the {len(train_dataset)} training images; "
            f"use a BATCH_SIZE of at most {len(train_dataset)}."
        )
    if not resume and (out / BEST_MODEL_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{out / BEST_MODEL_NAME} exists from an earlier run. Set RESUME=True to continue it, "
            "OVERWRITE=True to replace it, or choose another OUTPUT_DIR."
        )
    for stale_tmp in out.glob(".*.pth.tmp-*"):
        stale_tmp.unlink(missing_ok=True)


def _setup_run(
    model: nn.Module,
    config: Config,
    device: torch.device,
    out: Path,
    resume: bool,
    extra: dict[str, Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    lr_schedule: Callable[[torch.optim.Optimizer, Config], Any] | None,
    log: bool,
) -> _Run:
    """Seed, place and wrap the model; AdamW, ReduceLROnPlateau, the loss and the GradScaler; with
    ``resume``, everything restored from the last checkpoint. Writes the run's config."""
    seed_everything(config.seed)
    base = _unwrap(model)
    architecture = architecture_of(base)  # a network notebook 04 could not rebuild stops here
    base.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = autocast_dtype(device, config.amp)
    if log:
        print(f"training on {device} in {precision_name(amp)} (AMP={config.amp!r})", flush=True)
    runner = wrap_for_devices(base, device, config.multi_gpu, amp)
    optimizer = torch.optim.AdamW(
        base.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if lr_schedule is not None:
        scheduler = lr_schedule(optimizer, config)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
        )
    loss_fn = FocalDiceLoss.from_config(config) if loss_fn is None else loss_fn
    run = _Run(base, runner, optimizer, scheduler, loss_fn, amp)
    state = _restore_run(run, config, out / LAST_CHECKPOINT_NAME, extra, architecture) if resume else {}
    run.scaler = _grad_scaler(device.type, amp == torch.float16, state.get("scaler_state"))
    config.to_json(out / CONFIG_JSON_NAME)
    return run


def _restore_run(
    run: _Run, config: Config, last_path: Path, extra: dict[str, Any], architecture: str
) -> dict:
    """Load ``last_path`` into ``run`` (weights, optimizer, scheduler, history, early-stopping state,
    generators) after checking it may resume with these settings; returns the checkpoint."""
    if not last_path.exists():
        raise FileNotFoundError(
            f"RESUME=True but there is no {LAST_CHECKPOINT_NAME} in {last_path.parent}; set RESUME=False "
            "to start a new run."
        )
    state = load_checkpoint(last_path, map_location="cpu")  # the optimizer moves its own tensors
    _check_resume(state, config, extra, last_path)
    if (stored := state.get("architecture", DEFAULT_ARCHITECTURE)) != architecture:
        raise ValueError(f"Cannot resume {last_path}: it trained the network {stored}, not {architecture}.")
    run.base.load_state_dict(state["model_state"])
    run.optimizer.load_state_dict(state["optimizer_state"])
    run.scheduler.load_state_dict(state["scheduler_state"])
    run.history = [dict(row) for row in state["history"]]
    run.best_loss, run.best_epoch, run.stale = (
        state["best_val_loss"],
        state["best_epoch"],
        state["stale_epochs"],
    )
    run.start_epoch = state["epoch"] + 1
    _set_rng_state(state["rng_state"])
    print(f"resuming {last_path} after epoch {state['epoch']} (best epoch {run.best_epoch})")
    return state


def _loaders(
    train_dataset: Dataset, val_dataset: Dataset, config: Config, device: torch.device, sampler: Sampler[int]
) -> tuple[DataLoader, DataLoader]:
    """The training loader (``sampler``'s order, whole batches) and the validation loader."""
    workers = _auto_workers(config, device)
    loader_kw: dict[str, Any] = dict(batch_size=config.batch_size, num_workers=workers)
    loader_kw.update(pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    loader_kw.update(worker_init_fn=_worker_init if workers else None)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_dataset, sampler=sampler, drop_last=True, generator=generator, **loader_kw
    )
    return train_loader, DataLoader(val_dataset, shuffle=False, **loader_kw)


def _save_epoch(
    run: _Run, config: Config, out: Path, epoch: int, extra: dict[str, Any], improved: bool
) -> None:
    """After an epoch: the best model when it improved, the resumable last checkpoint, the metrics CSV."""
    if improved:
        save_checkpoint(_checkpoint_payload("best", run, config, epoch, extra), out / BEST_MODEL_NAME)
    last = _checkpoint_payload("last", run, config, epoch, extra)
    last.update(
        optimizer_state=run.optimizer.state_dict(),
        scheduler_state=run.scheduler.state_dict(),
        scaler_state=run.scaler.state_dict(),
        best_val_loss=run.best_loss,
        best_epoch=run.best_epoch,
        stale_epochs=run.stale,
        rng_state=_rng_state(),
    )
    save_checkpoint(last, out / LAST_CHECKPOINT_NAME)
    _atomic_write(out / METRICS_CSV_NAME, pd.DataFrame(run.history).to_csv(index=False))


def _finish_run(run: _Run, config: Config, out: Path, stop_reason: str) -> TrainingResult:
    """The six-panel figure of the whole history, and the result."""
    if not run.history:
        raise ValueError(f"Nothing to train: the checkpoint already reached NUM_EPOCHS={config.num_epochs}.")
    frame = pd.DataFrame(run.history)
    fig = plot_training_history(frame, best_epoch=run.best_epoch)
    _atomic_write(out / METRICS_PNG_NAME, lambda h: fig.savefig(h, format="png", dpi=110))
    plt.close(fig)
    return TrainingResult(frame, run.best_epoch, run.best_loss, stop_reason, out, precision_name(run.amp))


def _checkpoint_payload(
    kind: str, run: _Run, config: Config, epoch: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """What both checkpoints hold: format, network, config, CPU weights, epoch, history, precision and
    ``extra``."""
    payload = dict(format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_VERSION, kind=kind)
    payload.update(architecture=architecture_of(run.base), config=config.to_dict())
    payload.update(model_state={k: v.detach().cpu() for k, v in run.base.state_dict().items()}, epoch=epoch)
    payload.update(history=[dict(row) for row in run.history], torch_version=str(torch.__version__))
    return {**payload, "precision": precision_name(run.amp), **extra}


def _epoch_line(row: dict[str, float], num_epochs: int, best_epoch: int, improved: bool) -> str:
    """One plain log line for an epoch."""
    return (
        f"epoch {int(row['epoch']):>3}/{num_epochs}  train loss {row['train_loss']:.4f} dice "
        f"{row['train_dice']:.3f} | val loss {row['val_loss']:.4f} dice {row['val_dice']:.3f} | "
        f"lr {row['lr']:.2e}  {row['seconds']:.1f} s  best {best_epoch}{'  *' if improved else ''}"
    )


def plot_training_history(history: pd.DataFrame, best_epoch: int | None = None) -> Any:
    """The six-panel figure (loss, Dice, IoU, precision, recall, F1; train and validation)."""
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


def plot_samples(
    dataset: Dataset, n: int = 8, seed: int = 0, epoch: int = 0, title: str | None = None
) -> Any:
    """A grid of ``n`` dataset items as the model sees them (augmentation included) with the mask
    overlaid; returns the Figure."""
    count = min(n, len(dataset))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=count, replace=False)
    rows = math.ceil(count / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
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


# =================================================================================================
# 9. Inference and evaluation
# =================================================================================================


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", expected: Config | None = None
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (the network it records, :func:`build_model`), in eval mode:
    ``(model, config, checkpoint)``. With ``expected``, its architecture fields must equal the stored
    ones (the error names the field). A study's input mapping must be registered (the error says so)."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    config = Config.from_dict(checkpoint["config"])
    input_mapping_of(config.input_mapping)
    if expected is not None:
        diffs = _config_differences(config.to_dict(), expected.to_dict(), CHECKPOINT_FIELDS)
        if diffs:
            raise ValueError(f"{path} was trained with other settings: {'; '.join(diffs)}.")
    model = build_model(config, checkpoint.get("architecture", DEFAULT_ARCHITECTURE))
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the stored architecture ({str(exc)[:300]}).") from None
    return model.to(device).eval(), config, checkpoint


class FoldEnsemble(nn.Module):
    """The fold models as one network whose logits are those of the mean of their probabilities, so
    TTA, evaluation and folder prediction average the folds."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(probs, eps=1e-6)


MODEL_SET_FIELDS = CHECKPOINT_FIELDS + ("seed", "group_regex", "test_fraction", "folds")


def load_models(
    paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu"
) -> tuple[list[nn.Module], Config, list[dict[str, Any]]]:
    """Load one checkpoint, or the fold runs of one cross-validation, in eval mode, folds in order:
    ``(models, config of the first, checkpoints)``. Several checkpoints must share architecture,
    input mapping, split seed, test split and fold count, each fold once; else the error says what differs."""
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
            networks = [c.get("architecture", DEFAULT_ARCHITECTURE) for c in (first_checkpoint, checkpoint)]
            if networks[0] != networks[1]:
                diffs.append(f"the network ({networks[0]} vs {networks[1]})")
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
    input_mapping: str = "minmax",
    amp: torch.dtype | None | bool | str = "cuda",
) -> np.ndarray:
    """Kidney probability maps ``(N, S, S)`` float32 for uint8 model inputs (:func:`model_input`).

    ``tta`` averages the image and its three flips, each flipped back; ``input_mapping`` is the
    model's (:func:`normalize_intensity`, per image as in training); ``amp`` an autocast dtype, None,
    or a ``Config.amp`` value.
    """
    model.eval()
    device = torch.device(device)
    if isinstance(amp, (bool, str)):
        amp = autocast_dtype(device, amp)
    flips = _TTA_FLIPS if tta else ((),)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.from_numpy(np.stack([normalize_intensity(im, input_mapping) for im in chunk]))
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
    """Drop components smaller than ``min_fraction`` of the image, keep at most the ``max_components``
    largest (two kidneys); 8-connectivity, uint8 0/1."""
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
    """95th-percentile symmetric Hausdorff distance between mask outlines, in pixels. Both empty: 0;
    one empty: the image diagonal, so it is never NaN."""
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
    """Images at the model's size and masks at their original size, for honest scoring."""

    pairs: list[SamplePair]  # the pairs, in order
    images: np.ndarray  # ``(N, S, S)`` uint8 model inputs (resized and prepared as in training)
    masks: list[np.ndarray | None]  # original-size 0/1 masks (None: a folder predicted without masks)
    originals: list[np.ndarray]  # original-size uint8 images (for pictures)
    input_mapping: str = "minmax"  # the model's, normalising ``images`` at prediction time
    amp: bool | str = "cuda"  # the model's ``Config.amp``, the precision of its forward passes

    def __len__(self) -> int:
        return len(self.pairs)


def load_evaluation_set(
    pairs: Sequence[SamplePair], config: Config, skip_bad_files: bool = False
) -> EvaluationSet:
    """Read pairs for evaluation: model inputs as in training, masks at their original size."""
    kept, images, masks, originals = [], [], [], []
    for pair, image, mask in _readable_pairs(pairs, skip_bad_files, []):
        kept.append(pair)
        originals.append(image)
        masks.append(mask)
        images.append(model_input(image, config.image_size, config.input_mapping))
    if not kept:
        raise ValueError("No readable pairs to evaluate.")
    return EvaluationSet(kept, np.stack(images), masks, originals, config.input_mapping, config.amp)


SPLIT_PARTS = ("train", "val", "test")


def checkpoint_split(
    checkpoint: dict[str, Any], config: Config, part: str = "test", data_dir: str | os.PathLike | None = None
) -> list[SamplePair]:
    """The pairs of one part (``"test"``, ``"val"``: optimistic, ``"train"``) of a run's split, from
    the keys in its checkpoint, under ``data_dir`` or the recorded root; empty for no test split."""
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


def training_data_problem(
    checkpoint: dict[str, Any], config: Config, data_dir: str | os.PathLike | None = None
) -> str | None:
    """Why the training run's split cannot be read here, or None when it can be tried: the checkpoint
    records no split, or the data folder recorded at training time is missing and ``data_dir`` is
    ``"auto"``/None. An explicit ``data_dir`` is never skipped: its problems are errors
    (:func:`checkpoint_split`)."""
    if data_dir not in (None, "", AUTO):
        return None
    root = checkpoint.get("data_dir")
    if not checkpoint.get("split"):
        return "The checkpoint records no split."
    if not root or not Path(root).exists():
        return (
            f"The data folder recorded at training time, {root}, does not exist here; set DATA_DIR to "
            "where the same data is now (on Kaggle: attach the dataset the model was trained on)."
        )
    return None


def _timed_probabilities(
    model: nn.Module, data: EvaluationSet, device: torch.device | str, tta: bool
) -> tuple[list[np.ndarray], float]:
    """Probabilities resized back to each original size, and milliseconds per slice."""
    tic = time.perf_counter()
    probs = predict_probabilities(
        model, data.images, device, tta=tta, input_mapping=data.input_mapping, amp=data.amp
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
    """Per-image metrics at the original size: Dice, IoU, precision, recall, F1, HD95, areas, counts."""
    rows = []
    for pair, prob, mask in zip(data.pairs, probs, data.masks):
        pred = binarize_prediction(prob, threshold, postprocess)
        counts = confusion_counts(pred, mask)
        row = dict(
            source=pair.source, case=pair.case, name=pair.name, height=mask.shape[0], width=mask.shape[1]
        )
        row.update(counts.metrics(), hd95=hausdorff95(pred, mask), pred_area=int(pred.sum()))
        rows.append({**row, "true_area": int(mask.sum()), "tp": counts.tp, "fp": counts.fp, "fn": counts.fn})
    return pd.DataFrame(rows)


def case_scores(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (``source/case``): Dice pooled over its slices, with slice and kidney
    counts; empty-mask rule as in :func:`metrics_from_counts`."""
    keys = per_image["source"].astype(str) + "/" + per_image["case"].astype(str)
    rows = []
    for key, part in per_image.groupby(keys, sort=True):
        tp, fp, fn = (int(part[c].sum()) for c in ("tp", "fp", "fn"))
        with_kidney = int((part["true_area"] > 0).sum())
        rows.append(
            (key, part["source"].iloc[0], len(part), with_kidney, metrics_from_counts(tp, fp, fn)["dice"])
        )
    return pd.DataFrame(rows, columns=["patient", "source", "slices", "slices_with_kidney", "dice"])


def summarize_scores(per_image: pd.DataFrame) -> dict[str, float]:
    """Pooled, mean-per-image and mean-per-patient metrics (``mean_case_dice`` over ``n_cases``:
    what 2D-on-volume tables report)."""
    tp, fp, fn = (int(per_image[c].sum()) for c in ("tp", "fp", "fn"))
    summary: dict[str, float] = {
        "n_images": len(per_image),
        "n_with_kidney": int((per_image["true_area"] > 0).sum()),
    }
    summary.update({f"pooled_{k}": v for k, v in metrics_from_counts(tp, fp, fn).items()})
    for name in ("dice", "iou", "precision", "recall", "f1", "hd95"):
        summary[f"mean_{name}"] = float(per_image[name].mean())
    with_kidney = per_image[per_image["true_area"] > 0]
    for name in ("dice", "hd95"):
        summary[f"mean_{name}_with_kidney"] = (
            float(with_kidney[name].mean()) if len(with_kidney) else math.nan
        )
    summary["median_hd95"] = float(per_image["hd95"].median())
    cases = case_scores(per_image)["dice"]
    summary.update(
        n_cases=len(cases), mean_case_dice=float(cases.mean()), std_case_dice=float(cases.std(ddof=0))
    )
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
    """One part of a run's split, scored: what :func:`evaluate_split` returns."""

    part: str  # ``"test"``, ``"val"`` or ``"oof"`` (out of fold)
    label: str  # what the numbers mean (:data:`SPLIT_LABELS`)
    data: EvaluationSet  # the images and masks
    scores: pd.DataFrame  # per-image metrics (:func:`score_predictions`)
    summary: dict[str, Any]  # pooled, per-image and per-patient summary, with the settings
    probs: list[np.ndarray]  # probability maps at each image's original size
    files: dict[str, Path]  # the CSV and JSON written

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
    (``evaluation_test_split`` for the test part); None when the run held out no such part. The summary
    says in ``evaluated_on`` what the numbers are (the validation split chose the model: optimistic)."""
    pairs = checkpoint_split(checkpoint, config, part, data_dir)
    if not pairs:
        return None
    data = load_evaluation_set(pairs, config)
    scores, summary, probs = evaluate_model(model, data, device, threshold, tta=tta, postprocess=postprocess)
    summary.update(dict(settings or {}), evaluated_on=SPLIT_LABELS[part])
    folder = "evaluation_test_split" if part == "test" else f"evaluation_{part}"
    files = write_evaluation(scores, summary, Path(output_dir) / folder)
    return SplitEvaluation(part, SPLIT_LABELS[part], data, scores, summary, probs, files)


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
    """Score every fold's validation patients with that fold's model and write
    ``output_dir/evaluation_out_of_fold``: pooled figures, the spread over patients and over folds."""
    parts, per_fold = [], []
    for model, checkpoint in zip(models, checkpoints):
        fold = Config.from_dict(checkpoint["config"]).fold
        data = load_evaluation_set(checkpoint_split(checkpoint, config, "val", data_dir), config)
        scores, summary, probs = evaluate_model(model, data, device, threshold, tta, postprocess)
        parts.append((data, scores.assign(fold=fold), probs))
        per_fold.append(summary["pooled_dice"])
    keys = [p.key for data, _, _ in parts for p in data.pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(
            "The folds' validation splits overlap: these are not the folds of one cross-validation."
        )
    sets = [d for d, _, _ in parts]
    pairs, masks, originals = (
        [x for d in sets for x in getattr(d, a)] for a in ("pairs", "masks", "originals")
    )
    images = np.concatenate([d.images for d in sets])
    data = EvaluationSet(pairs, images, masks, originals, config.input_mapping, config.amp)
    scores = pd.concat([s for _, s, _ in parts], ignore_index=True)
    probs = [p for _, _, pr in parts for p in pr]
    summary = summarize_scores(scores)
    summary.update(threshold=threshold, tta=tta, postprocess=postprocess, models=1, folds=len(models))
    spread = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0
    summary.update(folds_planned=config.folds, fold_pooled_dice_mean=float(np.mean(per_fold)))
    summary["fold_pooled_dice_std"] = spread
    summary.update(dict(settings or {}), evaluated_on=SPLIT_LABELS["oof"])
    files = write_evaluation(scores, summary, Path(output_dir) / "evaluation_out_of_fold")
    return SplitEvaluation("oof", SPLIT_LABELS["oof"], data, scores, summary, probs, files)


def evaluate_validation(
    models: Sequence[nn.Module], checkpoints: Sequence[dict[str, Any]], config: Config, **evaluate: Any
) -> SplitEvaluation | None:
    """The validation figures of one run (:func:`evaluate_split` on ``"val"``), or out of fold for
    several fold models (:func:`evaluate_out_of_fold`)."""
    if len(models) == 1:
        return evaluate_split(models[0], checkpoints[0], config, "val", **evaluate)
    return evaluate_out_of_fold(models, checkpoints, config, **evaluate)


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (255, 40, 40),
    alpha: float = 0.45,
    contour: bool = True,
) -> np.ndarray:
    """An RGB uint8 picture of an image with the mask blended in ``color``, outlined."""
    rgb = (image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)).astype(np.float32)
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
    annotate: Callable[[np.ndarray], pd.DataFrame | None] | None = None,
    skip_bad_files: bool = False,
) -> pd.DataFrame:
    """Predict every image in a folder (or its images/ subfolder), subfolders included, and write the
    results.

    Writes ``masks/<stem>.png`` (0/255, original size) and ``overlays/<stem>.png``, keeping the
    subfolder layout (``a/b.jpg`` gives ``masks/a/b.png``), and ``predictions.csv`` (returned: name
    relative to the input folder, size, kidney area, and the columns ``annotate`` returns for each
    batch of model inputs). A ``masks/`` folder beside an ``images/`` folder holds masks, not images:
    it is left out and named. Refuses to write into the input folder, to overwrite without
    ``overwrite``, and two images of one name in one folder; with ``skip_bad_files`` unreadable images
    are listed (``problem``) instead of raising.
    """
    src, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"PREDICT_DIR {str(src)!r} is not a folder of images.")
    if out == src or src in out.parents:
        raise ValueError(
            f"Refusing to write predictions into the input folder {src}; choose an OUTPUT_DIR outside it."
        )
    found, left_out = _prediction_inputs(src)
    if left_out:
        print(f"left out, as masks rather than images: {', '.join(left_out)}")
    if not found:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {src} or its subfolders.")
    files = [path for _, path in found]
    stems = {path: stem for stem, path in found}
    threshold = config.inference_threshold if threshold is None else threshold
    table_path = out / "predictions.csv"
    targets = [out / kind / f"{stems[f]}.png" for f in files for kind in ("masks", "overlays")] + [table_path]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} result files exist already (first: {existing[0]}); "
            "set OVERWRITE=True or choose another OUTPUT_DIR."
        )
    rows, skipped = [], []
    for start in range(0, len(files), batch_size):
        chunk, originals = [], []
        for f in files[start : start + batch_size]:
            try:
                originals.append(read_image(f))
                chunk.append(f)
            except ImageReadError as exc:
                if not skip_bad_files:
                    raise
                skipped.append({"name": _shown_name(stems[f], f), "problem": str(exc)})
        if not chunk:
            continue
        inputs = np.stack([model_input(o, config.image_size, config.input_mapping) for o in originals])
        probs = predict_probabilities(
            model, inputs, device, batch_size, tta, config.input_mapping, config.amp
        )
        flags = annotate(inputs) if annotate is not None else None
        for i, (f, original, prob) in enumerate(zip(chunk, originals, probs)):
            h, w = original.shape
            mask = binarize_prediction(
                cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR), threshold, postprocess
            )
            mask_path = _write_png(out / "masks" / f"{stems[f]}.png", mask * 255)
            _write_png(
                out / "overlays" / f"{stems[f]}.png",
                cv2.cvtColor(overlay_mask(original, mask), cv2.COLOR_RGB2BGR),
            )
            row = dict(name=_shown_name(stems[f], f), height=h, width=w, kidney_pixels=int(mask.sum()))
            row.update(kidney_fraction=mask.mean())
            extra = flags.iloc[i].to_dict() if flags is not None else {}
            rows.append({**row, **extra, "mask": str(mask_path), "problem": ""})
    if skipped:
        print(f"{len(skipped)} unreadable images skipped: " + ", ".join(row["name"] for row in skipped))
    if not rows:
        raise ValueError(f"None of the {len(files)} images in {src} could be read; see the skipped files.")
    table = pd.DataFrame(rows + skipped)
    _atomic_write(table_path, table.to_csv(index=False))
    return table


def _prediction_inputs(src: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The images below ``src`` (its images/ folder when it has one) at any depth, as ``(stem relative
    to that folder, path)`` in a stable order, and the ``masks/`` folders left out beside ``images/``."""
    base = src / "images" if (src / "images").is_dir() else src
    found, left_out, seen = [], [], set()
    for top, dirs, _ in os.walk(base, followlinks=True):
        folder = Path(top)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder.resolve() in seen:  # a symbolic link back up the tree
            dirs[:] = []
            continue
        seen.add(folder.resolve())
        if "images" in dirs and "masks" in dirs:
            dirs.remove("masks")
            left_out.append(str(folder / "masks"))
        for stem, path in _image_files(folder).items():
            found.append(((folder / stem).relative_to(base).as_posix(), path))
    return found, left_out


def _shown_name(stem: str, path: Path) -> str:
    """An input's name relative to the prediction folder (``a/b.jpg``; ``b.jpg`` at the top)."""
    return str(Path(stem).parent / path.name) if "/" in stem else path.name


def _write_png(path: Path, array: np.ndarray) -> Path:
    """Encode ``array`` (gray or BGR) as PNG and write it atomically."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"Could not encode {path}")
    return _atomic_write(path, data.tobytes())


# =================================================================================================
# 10. Runtime: Kaggle or not, a person watching or not, and where attached files are
# =================================================================================================

KAGGLE_ROOT_ENV = "KIDNEYSEG_KAGGLE_ROOT"
INTERACTIVE_ENV = "KIDNEYSEG_INTERACTIVE"

# Kaggle stops a GPU session after 12 hours; the "auto" training budget stops an hour before, leaving
# time for the curves, the checkpoints and the rest of the notebook.
KAGGLE_TRAIN_MINUTES = 660


def kaggle_root() -> Path:
    """Kaggle's root folder: ``/kaggle``, or ``$KIDNEYSEG_KAGGLE_ROOT``."""
    return Path(os.environ.get(KAGGLE_ROOT_ENV, "/kaggle"))


MODULE_FILE_NAME = "kidneyseg_utils.py"


def export_for_kaggle() -> Path | None:
    """In a Kaggle session, copy this module to ``/kaggle/working`` (an attached kernel not marked as a
    utility script brings only its output, which the notebooks' finder searches); else None."""
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


def process_seconds() -> float:
    """Seconds since this Python process started (0 where that is unknown); a Kaggle session's
    kernel starts with the session."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # psutil missing or the process table unreadable
        return 0.0


def interactive_frontend() -> bool:
    """True when a person works in a front end that can show widgets; False in headless runs
    (papermill, nbclient, Kaggle's "Save & Run All"), where a widget can hang the run (jupyter/nbclient#312).
    ``$KIDNEYSEG_INTERACTIVE`` decides when set; Kaggle batch runs are headless; else a front end that
    accepts ``input()`` counts as interactive.
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
    """A tqdm bar: a widget in an interactive front end, disabled in headless runs or when not ``enabled``."""
    if enabled and interactive_frontend():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

        options["disable"] = True
    return tqdm(iterable, **options)


# Where Kaggle mounts things under /kaggle/input in its current layout; other folders there are the
# older, flat layout (input/<slug>).
_KAGGLE_INPUT_KINDS = ("datasets", "notebooks", "competitions", "models")


def choose_candidate(
    candidates: Sequence[Path], what: str, parameter: str, prefer: str = "notebooks"
) -> Path:
    """Pick one of several found paths and print which and why: outside Kaggle's input first, then
    ``input/<prefer>``, then the rest of Kaggle's current layout, then its older one; then the
    shortest path, then by name."""
    if not candidates:
        raise ValueError(f"no {what} to choose from")
    input_root = kaggle_root() / "input"
    places = ("outside Kaggle's input", f"input/{prefer}", "Kaggle's current layout", "Kaggle's older layout")

    def rank(path: Path) -> tuple[int, int, str]:
        top = path.relative_to(input_root).parts[:1] if path.is_relative_to(input_root) else None
        place = 0 if top is None else 1 if top == (prefer,) else 2 if top[0] in _KAGGLE_INPUT_KINDS else 3
        return place, len(path.parts), str(path)

    chosen, *others = sorted(candidates, key=rank)
    if others:
        print(
            f"Found {len(others) + 1} {what}; using {chosen} ({places[rank(chosen)[0]]}; rule: "
            f"{', then '.join(places)}, then the shortest path). Others: {', '.join(map(str, others))}. "
            f"Set {parameter} to choose another."
        )
    return chosen


def kaggle_output_candidates(filename: str) -> list[Path]:
    """Files called ``filename`` in attached notebooks' outputs, at most six folders below Kaggle's input."""
    return [p for p in find_below(kaggle_root() / "input", filename) if p.is_file()]


def resolve_auto(value: Any, kaggle: Any, elsewhere: Any) -> Any:
    """A parameter's ``"auto"`` made concrete: ``kaggle`` in a Kaggle session, else ``elsewhere``."""
    if isinstance(value, str) and value == "auto":
        return kaggle if on_kaggle() else elsewhere
    return value


def kaggle_dataset_candidates() -> list[Path]:
    """Attached datasets with images/ and masks/: ``input/datasets/<owner>/<slug>``,
    ``input/competitions/<slug>`` and ``input/<slug>``; never the outputs of notebooks."""
    root = kaggle_root() / "input"
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


def resolve_output_dir(output_dir: str | os.PathLike | None = "auto") -> Path:
    """The output folder, created: the parameter, else ``/kaggle/working/kidneyseg`` on Kaggle,
    else ``outputs``."""
    working = kaggle_root() / "working"
    if output_dir not in (None, "", "auto"):
        path = Path(output_dir).expanduser()
    else:
        path = working / "kidneyseg" if working.is_dir() else Path("outputs")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"OUTPUT_DIR {str(path)!r} is a file, not a folder: set OUTPUT_DIR to a folder (it is created "
            "if missing), or move the file away."
        )
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
    """The model, or the fold models, to evaluate.

    ``MODEL_PATH`` is a checkpoint, or a folder with one or with the ``fold_k`` runs of notebook 03.
    ``"auto"``: the best model in ``output_dir``, else its ``fold_k`` runs, else those in the output of
    an attached notebook. Raises ``FileNotFoundError`` naming every place searched.
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
    """Before ``RESUME=True`` in a new Kaggle session, copy the previous run's checkpoints, metrics
    and config from an attached notebook output into ``output_dir`` (never overwriting). Returns the
    folder copied from, or None."""
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


# =================================================================================================
# 11. The default dataset: synthetic kidney phantoms
# =================================================================================================

_PHANTOM_MARKER = "PHANTOM.json"
# A phantom kidney's random draws, in order: centre, radii, tilt, centre and half-height along the
# slices, cortex and medulla levels.
_KIDNEY_RANGES = dict(cy=(0.18, 0.3), cx=(0.3, 0.4), ry=(0.13, 0.17), rx=(0.09, 0.12), angle=(0.2, 0.5))
_KIDNEY_RANGES.update(zc=(0.4, 0.6), zr=(0.3, 0.45), cortex=(0.72, 0.82), medulla=(0.58, 0.66))


def _render_phantom_slice(
    rng: np.random.Generator, anatomy: dict[str, Any], z: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like axial slice at height ``z`` in [0, 1] as uint8, and its 0/255 kidney mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1  # [-1, 1]

    def ellipse(cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = xx - cx, yy - cy
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    img = np.full((size, size), 0.02, np.float32)  # air
    img[ellipse(0.0, 0.0, anatomy["body_ry"], anatomy["body_rx"])] = 0.30  # subcutaneous fat
    inner = ellipse(0.0, 0.0, anatomy["body_ry"] - 0.05, anatomy["body_rx"] - 0.05)
    img[inner] = 0.48  # soft tissue
    img[ellipse(-0.05, -0.35, 0.35, 0.3) & inner & (z > 0.45)] = 0.56  # liver
    for by, bx, br in anatomy["bowel"]:
        img[ellipse(by, bx, br, br * 1.3) & inner] = 0.62
    img[ellipse(0.42, 0.0, 0.12, 0.11)] = 0.95  # spine
    img[ellipse(0.40, 0.0, 0.035, 0.03)] = 0.35  # spinal canal
    mask = np.zeros((size, size), bool)
    for k in anatomy["kidneys"]:
        t = (z - k["zc"]) / k["zr"]  # the section shrinks to nothing at |t| = 1
        ry, rx = (k[r] * math.sqrt(max(0.0, 1.0 - t * t)) for r in ("ry", "rx"))
        if min(ry, rx) < 0.012:
            continue
        cy, cx, angle = k["cy"], k["cx"], k["angle"]
        side = -1.0 if cx > 0 else 1.0  # the hilum faces the spine
        hilum = ellipse(cy, cx + side * rx * 0.95, ry * 0.35, rx * 0.45, angle)
        kidney = ellipse(cy, cx, ry, rx, angle) & ~hilum
        img[kidney] = k["cortex"]
        img[ellipse(cy, cx + side * rx * 0.1, ry * 0.55, rx * 0.5, angle) & kidney] = k["medulla"]
        mask |= kidney
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
    """Write seeded CT-like kidney phantoms in the images/ + masks/ layout; return ``out_dir``.

    Each case is a synthetic patient (body, liver, bowel, spine, two bean-shaped kidneys whose section
    grows and shrinks along the slices), named ``phantom-CCC_SSS.png``. ``window`` is the display window
    of the stored values, as CT series exported with other windows. A folder written with the same
    arguments is reused; any other non-empty folder is refused (``FileExistsError``).
    """
    out, marker, windowed = Path(out_dir), Path(out_dir) / _PHANTOM_MARKER, tuple(window) != (0.0, 1.0)
    settings: dict[str, Any] = dict(n_cases=n_cases, slices_per_case=slices_per_case, image_size=image_size)
    settings.update(seed=seed, **({"window": [float(w) for w in window]} if windowed else {}))
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out
    if out.exists() and any(out.iterdir()):
        found = f"phantoms made with {marker.read_text().strip()}" if marker.exists() else "other files"
        raise FileExistsError(
            f"{out} is not empty (it holds {found}), so phantoms of other settings ({settings}) are not "
            "written there; choose another folder."
        )
    if image_size < 32 or n_cases < 1 or slices_per_case < 1 or not 0.0 <= window[0] < window[1]:
        raise ValueError(
            "make_synthetic_dataset needs image_size >= 32, n_cases >= 1, slices_per_case >= 1 and a window "
            f"(low, high) with 0 <= low < high; got {image_size}, {n_cases}, {slices_per_case}, {window}."
        )
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        anatomy: dict[str, Any] = dict(body_ry=rng.uniform(0.62, 0.72), body_rx=rng.uniform(0.82, 0.92))
        loops = range(rng.integers(2, 5))
        anatomy["bowel"] = [
            (rng.uniform(-0.4, 0.0), rng.uniform(-0.3, 0.4), rng.uniform(0.05, 0.1)) for _ in loops
        ]
        anatomy["kidneys"] = []
        for side in (-1.0, 1.0):
            kidney = {key: rng.uniform(*bounds) for key, bounds in _KIDNEY_RANGES.items()}
            kidney["cx"], kidney["angle"] = side * kidney["cx"], side * kidney["angle"]
            anatomy["kidneys"].append(kidney)
        for s in range(slices_per_case):
            image, mask = _render_phantom_slice(rng, anatomy, (s + 0.5) / slices_per_case, image_size)
            if windowed:
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
    """One phantom set per :data:`SYNTHETIC_SOURCES` entry under ``out_dir``: sources for notebook 05."""
    out = Path(out_dir)
    for seed, (name, window) in enumerate(SYNTHETIC_SOURCES.items(), start=1):
        make_synthetic_dataset(out / name, n_cases, slices_per_case, seed=seed, window=window)
    return out


SYNTHETIC = "synthetic"


def resolve_data_dir(
    data_dir: str | os.PathLike | None = "auto",
    *,
    synthetic_dir: str | os.PathLike | None = None,
    synthetic_sources: bool = False,
) -> Path:
    """Find the data root: the parameter, else Kaggle's input, else ``$KIDNEYSEG_DATA_DIR``.

    ``data_dir`` ``"synthetic"`` writes phantoms to ``synthetic_dir`` on purpose (several sources with
    ``synthetic_sources``). Finding nothing writes and uses them off Kaggle, with a warning; on Kaggle,
    or with no ``synthetic_dir``, it is a ``FileNotFoundError`` naming every place searched.
    """
    make_phantoms = make_synthetic_sources if synthetic_sources else make_synthetic_dataset
    if data_dir == SYNTHETIC:
        if synthetic_dir is None:
            raise ValueError('DATA_DIR="synthetic" needs a folder for the phantoms (synthetic_dir).')
        return make_phantoms(synthetic_dir)
    if data_dir not in (None, "", "auto"):
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"DATA_DIR {str(path)!r} does not exist. {_LAYOUT_HELP}")
        return path
    kaggle_input = kaggle_root() / "input"
    searched = [f"{kaggle_input}/datasets/*/*, {kaggle_input}/competitions/*, {kaggle_input}/*"]
    if candidates := kaggle_dataset_candidates():
        return choose_candidate(
            candidates, "attached datasets with images/ and masks/", "DATA_DIR", "datasets"
        )
    env_value = os.environ.get(DATA_DIR_ENV)
    searched.append(f"${DATA_DIR_ENV}" + (f"={env_value}" if env_value else " (unset)"))
    if env_value:
        path = Path(env_value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"${DATA_DIR_ENV} points to {str(path)!r}, which does not exist.")
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
    return make_phantoms(synthetic_dir)


if __name__ == "__main__":
    export_for_kaggle()
