"""Stage the kidneyseg series for Kaggle and print the order in which to push it.

One folder per kernel, each with its code file and a ``kernel-metadata.json`` made from the
repository's ``kaggle-metadata.json``, ready for ``kaggle kernels push -p FOLDER``. Every push also
runs the kernel, so the order matters: the utility script first, then notebooks 01, 02 and 03, and 04
and 05 only once 03's output exists.

Usage::

    python tools/kaggle_stage.py stage OUT [--owner NAME] [--dataset OWNER/SLUG] [--data LOCAL_COPY]
    python tools/kaggle_stage.py validate FOLDER [FOLDER ...]

The metadata rules below are the ones the Kaggle CLI applies in ``kaggle kernels push``
(``kaggle/api/kaggle_api_extended.py``, kaggle 2.2): every field it reads is accepted, and
what it would reject is an error. This file is tooling for the person who publishes the series; the
notebooks never import it, and Kaggle never sees it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODULE = "kidneyseg_utils.py"
LOSO_SLUG = "kidneyseg-05-leave-one-source-out"

# Every field `kaggle kernels push` reads from kernel-metadata.json.
KERNEL_METADATA_FIELDS = (
    "id",
    "id_no",
    "title",
    "code_file",
    "language",
    "kernel_type",
    "is_private",
    "enable_gpu",
    "enable_tpu",
    "enable_internet",
    "dataset_sources",
    "competition_sources",
    "kernel_sources",
    "model_sources",
    "keywords",
    "docker_image_pinning_type",
    "docker_image",
    "machine_shape",
)
LANGUAGES = ("python", "r", "rmarkdown")
KERNEL_TYPES = ("script", "notebook")
PINNING_TYPES = ("original", "latest")
BOOLEAN_FIELDS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
# Accelerators listed in the CLI's docs/kernels.md (Feb 2026). The CLI passes machine_shape on
# unchecked ("the allowed names are in an enum that is not currently included in kagglesdk"), so an
# unknown name is a warning here, not an error. "NvidiaTeslaT4" is the editor's "GPU T4 x2" (a single
# T4 is not offered; kaggle-cli PR 1198).
MACHINE_SHAPES = (
    "NvidiaTeslaT4",
    "NvidiaTeslaP100",
    "NvidiaTeslaT4Highmem",
    "NvidiaTeslaA100",
    "NvidiaL4",
    "NvidiaL4X1",
    "NvidiaH100",
    "NvidiaRtxPro6000",
    "TpuV38",
    "Tpu1VmV38",
    "TpuV5E8",
    "TpuV6E8",
)
MACHINE_SHAPE_CAVEATS = {
    "NvidiaTeslaP100": "the default image's cu128 PyTorch has no Pascal kernels, so CUDA fails at the "
    "first operation (kaggle-cli PR 1156); use NvidiaTeslaT4",
    "NvidiaTeslaT4Highmem": "an admin-only pool (kaggle-cli PR 1198); use NvidiaTeslaT4",
}
UTILITY_KEYWORD = "util-script"  # marks a script kernel as a utility script (Kaggle staff, kaggle-cli #225)
_STAGING_MARKER = ".kidneyseg-staging"


def _slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _is_bool(value: Any) -> bool:
    """The CLI's ``get_bool``: a JSON boolean, or the strings "true"/"false" in any case."""
    return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false"))


def _ref_problem(value: Any, field: str, min_parts: int, max_parts: int, form: str) -> str | None:
    parts = str(value).split("/")
    if not isinstance(value, str) or not min_parts <= len(parts) <= max_parts or not all(parts[:min_parts]):
        return f"{field} entry {value!r} is not {form}"
    return None


def validate_kernel_metadata(
    meta: dict[str, Any], folder: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """Check one ``kernel-metadata.json`` as ``kaggle kernels push`` would.

    Args:
        meta: The parsed metadata.
        folder: The kernel folder, to check that ``code_file`` exists in it.

    Returns:
        ``(errors, warnings)``: errors are what the CLI refuses; warnings are what it accepts but
        that does not do what one wants (an ignored field, a title that does not give the slug, an
        accelerator that fails, internet left on because ``enable_internet`` is missing).
    """
    errors: list[str] = []
    warnings: list[str] = [
        f"field {k!r} is not read by the Kaggle CLI and is ignored"
        for k in meta
        if k not in KERNEL_METADATA_FIELDS
    ]
    title = meta.get("title")
    if title is not None and (not isinstance(title, str) or len(title) < 5):
        errors.append(f"title {title!r} must be a string of at least five characters")
    code_file = meta.get("code_file")
    if not isinstance(code_file, str) or not code_file:
        errors.append("code_file is required")
    elif folder is not None and not (Path(folder) / code_file).is_file():
        errors.append(f"code_file {code_file!r} is not in {folder}")
    ref, id_no = meta.get("id"), meta.get("id_no")
    if not ref and not id_no:
        errors.append("id (owner/slug) or id_no is required")
    if ref:
        parts = str(ref).split("/")
        if len(parts) != 2 or not all(parts):
            errors.append(f"id {ref!r} must be 'owner/slug' (no version)")
        elif isinstance(title, str) and _slugify(title) != parts[1].lower():
            warnings.append(f"title {title!r} gives the slug {_slugify(title)!r}, not {parts[1]!r}")
    if meta.get("language") not in LANGUAGES:
        errors.append(f"language {meta.get('language')!r} is not one of {LANGUAGES}")
    if meta.get("kernel_type") not in KERNEL_TYPES:
        errors.append(f"kernel_type {meta.get('kernel_type')!r} is not one of {KERNEL_TYPES}")
    for key in BOOLEAN_FIELDS:
        if key in meta and not _is_bool(meta[key]):
            errors.append(f"{key} must be true or false; got {meta[key]!r}")
    if "enable_internet" not in meta:
        warnings.append("enable_internet is missing, and the CLI then turns internet ON")
    rules = {
        "dataset_sources": (2, 3, "'owner/dataset-slug' (or with '/version')"),
        "kernel_sources": (2, 3, "'owner/kernel-slug' (or with '/version')"),
        "model_sources": (5, 5, "'owner/model/framework/variation/version'"),
    }
    for key in (*rules, "competition_sources", "keywords"):
        values = meta.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            errors.append(f"{key} must be a list of strings")
        elif key in rules:
            errors += [p for v in values if (p := _ref_problem(v, key, *rules[key])) is not None]
    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in PINNING_TYPES:
        errors.append(f"docker_image_pinning_type {pinning!r} is not one of {PINNING_TYPES}")
    shape = meta.get("machine_shape")
    if shape:
        if shape not in MACHINE_SHAPES:
            warnings.append(f"machine_shape {shape!r} is not one Kaggle documents: {MACHINE_SHAPES}")
        elif shape in MACHINE_SHAPE_CAVEATS:
            warnings.append(f"machine_shape {shape!r}: {MACHINE_SHAPE_CAVEATS[shape]}")
    return errors, warnings


def kernel_metadata(series: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The ``kernel-metadata.json`` of one entry of ``kaggle-metadata.json``: defaults filled in,
    ``{owner}`` and ``{dataset}`` replaced, ``code_file`` reduced to the staged file name."""
    merged = {**series["defaults"], **entry}

    def fill(value: str) -> str:
        return value.replace("{owner}", series["owner"]).replace("{dataset}", series["dataset"])

    meta = {
        "id": f"{series['owner']}/{merged['slug']}",
        "title": merged["title"],
        "code_file": Path(merged["code_file"]).name,
        "language": merged["language"],
        "kernel_type": merged["kernel_type"],
        "is_private": merged["is_private"],
        "enable_gpu": merged["enable_gpu"],
        "enable_tpu": merged["enable_tpu"],
        "enable_internet": merged["enable_internet"],
        "dataset_sources": [fill(v) for v in merged.get("dataset_sources", [])],
        "competition_sources": [],
        "kernel_sources": [fill(v) for v in merged.get("kernel_sources", [])],
        "model_sources": [],
        "keywords": list(merged.get("keywords", [])),
        "docker_image_pinning_type": merged["docker_image_pinning_type"],
    }
    if meta["enable_gpu"]:
        meta["machine_shape"] = merged["machine_shape"]
    return meta


def series_problems(series: dict[str, Any]) -> list[str]:
    """Rules of the series beyond one kernel: the utility script must be marked as one, and its slug
    must give the module's file name (Kaggle mounts it as ``<slug with underscores>.py``, which the
    notebooks import as ``kidneyseg_utils``); every notebook lists it and the dataset."""
    utility = series["utility_script"]
    problems = []
    if UTILITY_KEYWORD not in utility.get("keywords", []):
        problems.append(f'the utility script needs "keywords": ["{UTILITY_KEYWORD}"] to become one')
    if utility.get("kernel_type") != "script":
        problems.append("the utility script must have kernel_type 'script'")
    if utility["slug"].replace("-", "_") + ".py" != MODULE:
        problems.append(f"the utility script's slug {utility['slug']!r} must be 'kidneyseg-utils' ({MODULE})")
    for entry in series["notebooks"]:
        if "{owner}/" + utility["slug"] not in entry.get("kernel_sources", []):
            problems.append(f"{entry['slug']} does not list the utility script in kernel_sources")
        if "{dataset}" not in entry.get("dataset_sources", []):
            problems.append(f"{entry['slug']} does not list the dataset in dataset_sources")
    return problems


def count_sources(data_dir: str | Path) -> list[str]:
    """The sources (folders with images/ and masks/) of a local copy of the dataset, as notebook 05
    sees them."""
    sys.path.insert(0, str(REPO))
    import kidneyseg_utils as ku

    root = Path(data_dir)
    return [ku._relative_source(folder, root) for folder in ku.find_dataset_folders(root)]


def stage_kaggle(
    out_dir: str | Path,
    metadata_path: str | Path | None = None,
    owner: str | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
) -> list[list[Path]]:
    """Stage one folder per kernel and return them in push order, as stages.

    Stage 0 is the utility script; stage 1 the notebooks that need only the data (01, 02, 03);
    stage 2 the ones to push once notebook 03 has finished (04 reads its model; 05 would otherwise
    compete with 03 for the GPU quota). ``owner`` and ``dataset`` override ``kaggle-metadata.json``.
    ``data_dir``, a local copy of the dataset, is checked for notebook 05: with fewer than two
    sources it is left out (it would spend a GPU session to say that it cannot run).

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and was not made by this function.
        FileNotFoundError: ``data_dir`` holds no images/ + masks/ folder.
        ValueError: a generated ``kernel-metadata.json`` breaks a rule of the CLI, or the series is
            not consistent (see :func:`series_problems`).
    """
    series = json.loads(Path(metadata_path or REPO / "kaggle-metadata.json").read_text())
    series["owner"] = owner or series["owner"]
    series["dataset"] = dataset or series["dataset"]
    problems = series_problems(series)
    if problems:
        raise ValueError("kaggle-metadata.json: " + "; ".join(problems))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / _STAGING_MARKER).exists():
        raise FileExistsError(f"{out} is not empty and is not a kidneyseg staging folder; choose another.")
    entries = [series["utility_script"], *series["notebooks"]]
    if data_dir is not None:
        sources = count_sources(data_dir)
        if not sources:
            raise FileNotFoundError(f"--data {data_dir}: no folder with images/ and masks/ in it")
        if len(sources) < 2:
            print(
                f"# {LOSO_SLUG} left out: {data_dir} has one source ({sources[0]}), and leave-one-"
                "source-out needs at least two folders with images/ and masks/",
                file=sys.stderr,
            )
            entries = [e for e in entries if e["slug"] != LOSO_SLUG]
    out.mkdir(parents=True, exist_ok=True)
    (out / _STAGING_MARKER).write_text("made by tools/kaggle_stage.py; safe to delete\n")
    stages: dict[int, list[Path]] = {}
    for entry in entries:
        meta = kernel_metadata(series, entry)
        folder = out / entry["slug"]
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        shutil.copy2(REPO / entry["code_file"], folder / meta["code_file"])
        (folder / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        errors, warnings = validate_kernel_metadata(meta, folder)
        if errors or warnings:
            raise ValueError(f"kernel {entry['slug']}: {'; '.join(errors + warnings)}")
        stages.setdefault(int(entry["push_stage"]), []).append(folder)
    return [stages[k] for k in sorted(stages)]


_STAGE_NOTES = (
    "the utility script first: every notebook imports it (each push also runs the kernel; this one "
    "copies the module into its output and ends)",
    "once the utility script has finished ('kaggle kernels status OWNER/kidneyseg-utils' says "
    "complete; a notebook pushed earlier can attach a version whose run has not finished): the "
    "notebooks that need only the dataset; they run at the same time, each GPU run on the weekly quota",
    "once notebook 03 has finished ('kaggle kernels status OWNER/kidneyseg-03-train-model' says "
    "complete): 04 evaluates 03's model, and 05 would otherwise share the GPU quota with 03. 05 "
    "needs at least two sources (folders with images/ and masks/) in the dataset; with one it only "
    "says so: leave it out (stage with --data LOCAL_COPY to check)",
)


def push_plan(stages: list[list[Path]]) -> str:
    """The push commands, stage by stage, with why each waits for the one before."""
    first = json.loads((stages[0][0] / "kernel-metadata.json").read_text())
    owner = first["id"].split("/")[0]
    lines = []
    for number, folders in enumerate(stages):
        note = _STAGE_NOTES[number] if number < len(_STAGE_NOTES) else "after the stage above"
        note = note.replace("OWNER/", f"{owner}/")
        lines.append(f"# {number + 1}. {note}")
        lines += [f"kaggle kernels push -p {folder}" for folder in folders]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/kaggle_stage.py", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stage = commands.add_parser("stage", help="stage one folder per Kaggle kernel and print the push order")
    stage.add_argument("out", help="folder to write the kernel folders into")
    stage.add_argument("--owner", help="your Kaggle user name (default: kaggle-metadata.json)")
    stage.add_argument("--dataset", help="your dataset as owner/slug (default: kaggle-metadata.json)")
    stage.add_argument(
        "--data", help="a local copy of the dataset: notebook 05 is left out if it has fewer than 2 sources"
    )
    check = commands.add_parser("validate", help="check kernel folders as 'kaggle kernels push' would")
    check.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "stage":
        try:
            stages = stage_kaggle(args.out, owner=args.owner, dataset=args.dataset, data_dir=args.data)
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(push_plan(stages))
        return 0
    failed = False
    for folder in args.folders:
        path = Path(folder) / "kernel-metadata.json"
        if not path.is_file():
            print(f"{folder}: error: no kernel-metadata.json (stage the series with the 'stage' command)")
            failed = True
            continue
        meta = json.loads(path.read_text())
        errors, warnings = validate_kernel_metadata(meta, folder)
        failed |= bool(errors)
        for kind, items in (("error", errors), ("warning", warnings)):
            for item in items:
                print(f"{folder}: {kind}: {item}")
        if not errors and not warnings:
            print(f"{folder}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
