"""Stage the kidneyseg series for Kaggle and print the order in which to push it.

One folder per kernel, each with its code file and a ``kernel-metadata.json`` made from the
repository's ``kaggle-metadata.json``, ready for ``kaggle kernels push -p FOLDER``. Every push also
runs the kernel, so the order matters: the two utility scripts first, then notebooks 01, 02 and 03,
and 04 and 05 only once 03's output exists.

Usage::

    python tools/kaggle_stage.py stage OUT [--owner NAME] [--dataset OWNER/SLUG] [--data LOCAL_COPY]

What the Kaggle CLI itself refuses in a ``kernel-metadata.json`` is left to the CLI (the tests push
the staged folders through its own code); this tool checks the rules of the series that the CLI
cannot know. It is tooling for the person who publishes the series; the notebooks never import it,
and Kaggle never sees it.
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
LOSO_SLUG = "kidneyseg-05-leave-one-source-out"
# Accelerators the CLI passes on unchecked, but that fail for this series. "NvidiaTeslaT4" is the
# editor's "GPU T4 x2" (a single T4 is not offered; kaggle-cli PR 1198).
MACHINE_SHAPE_CAVEATS = {
    "NvidiaTeslaP100": "the default image's cu128 PyTorch has no Pascal kernels, so CUDA fails at the "
    "first operation (kaggle-cli PR 1156); use NvidiaTeslaT4",
    "NvidiaTeslaT4Highmem": "an admin-only pool (kaggle-cli PR 1198); use NvidiaTeslaT4",
}
UTILITY_KEYWORD = "util-script"  # marks a script kernel as a utility script (Kaggle staff, kaggle-cli #225)
_STAGING_MARKER = ".kidneyseg-staging"


def _slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


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


def _imports_studies(code_file: Path) -> bool:
    """Whether a notebook's code imports kidneyseg_studies (so it needs that utility script)."""
    cells = json.loads(code_file.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return re.search(r"^\s*import kidneyseg_studies\b", code, flags=re.M) is not None


def series_problems(series: dict[str, Any]) -> list[str]:
    """Rules of the series beyond one kernel: each utility script is marked as one, and its slug gives
    its file name (Kaggle mounts it as ``<slug with underscores>.py``, the name the notebooks import);
    every notebook lists the dataset, the pipeline's script and, if it imports the studies, theirs; a
    title gives its slug (Kaggle makes the slug from the title); no accelerator known to fail."""
    problems = []
    utilities = series["utility_scripts"]
    for utility in utilities:
        slug, file_name = utility["slug"], Path(utility["code_file"]).name
        if UTILITY_KEYWORD not in utility.get("keywords", []):
            problems.append(
                f'the utility script {slug} needs "keywords": ["{UTILITY_KEYWORD}"] to become one'
            )
        if utility.get("kernel_type") != "script":
            problems.append(f"the utility script {slug} must have kernel_type 'script'")
        if slug.replace("-", "_") + ".py" != file_name:
            problems.append(f"the utility script's slug {slug!r} must give its file name {file_name}")
    by_file = {Path(u["code_file"]).name: "{owner}/" + u["slug"] for u in utilities}
    for entry in series["notebooks"]:
        needed = ["kidneyseg_utils.py"]
        if (REPO / entry["code_file"]).is_file() and _imports_studies(REPO / entry["code_file"]):
            needed.append("kidneyseg_studies.py")
        for file_name in needed:
            if by_file.get(file_name) not in entry.get("kernel_sources", []):
                problems.append(
                    f"{entry['slug']} does not list the utility script of {file_name} in kernel_sources"
                )
        if "{dataset}" not in entry.get("dataset_sources", []):
            problems.append(f"{entry['slug']} does not list the dataset in dataset_sources")
    for entry in [*utilities, *series["notebooks"]]:
        if _slugify(entry["title"]) != entry["slug"]:
            problems.append(
                f"{entry['slug']}: the title {entry['title']!r} gives the slug {_slugify(entry['title'])!r}"
            )
        shape = {**series["defaults"], **entry}.get("machine_shape")
        if {**series["defaults"], **entry}.get("enable_gpu") and shape in MACHINE_SHAPE_CAVEATS:
            problems.append(f"{entry['slug']}: machine_shape {shape!r}: {MACHINE_SHAPE_CAVEATS[shape]}")
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

    Stage 0 is the utility scripts; stage 1 the notebooks that need only the data (01, 02, 03);
    stage 2 the ones to push once notebook 03 has finished (04 reads its model; 05 would otherwise
    compete with 03 for the GPU quota). ``owner`` and ``dataset`` override ``kaggle-metadata.json``.
    ``data_dir``, a local copy of the dataset, is checked for notebook 05: with fewer than two
    sources it is left out (it would spend a GPU session to say that it cannot run).

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and was not made by this function.
        FileNotFoundError: ``data_dir`` holds no images/ + masks/ folder.
        ValueError: the series is not consistent (see :func:`series_problems`).
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
    entries = [*series["utility_scripts"], *series["notebooks"]]
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
        stages.setdefault(int(entry["push_stage"]), []).append(folder)
    return [stages[k] for k in sorted(stages)]


_STAGE_NOTES = (
    "the utility scripts first: the notebooks import them (each push also runs the kernel; these "
    "copy their module into their output and end)",
    "once both utility scripts have finished ('kaggle kernels status OWNER/kidneyseg-utils' and "
    "'OWNER/kidneyseg-studies' say complete; a notebook pushed earlier can attach a version whose "
    "run has not finished): the "
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
    args = parser.parse_args(argv)
    try:
        stages = stage_kaggle(args.out, owner=args.owner, dataset=args.dataset, data_dir=args.data)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(push_plan(stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
