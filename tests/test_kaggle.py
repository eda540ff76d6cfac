"""Kaggle: staging checked by the Kaggle CLI itself, the runtime rules (paths, defaults, headless
runs), the notebooks' finder in the current and the older folder layout, and simulated Kaggle
sessions in the current one."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import papermill
import pytest
import torch

import kidneyseg_studies as ks
import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
UTILITIES = ["kidneyseg-utils", "kidneyseg-studies"]
SLUGS = ["kidneyseg-01-explore-data", "kidneyseg-02-preprocessing-experiments", "kidneyseg-03-train-model"]
LATER = ["kidneyseg-04-evaluate-model", "kidneyseg-05-leave-one-source-out"]


def _load_stage_tool():
    spec = importlib.util.spec_from_file_location("kaggle_stage", REPO / "tools" / "kaggle_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stage_tool = _load_stage_tool()


# ----- the module is what Kaggle runs as the utility script -----------------------------------------


@pytest.mark.slow  # a fresh Python process imports torch
def test_running_the_modules_as_scripts_does_nothing(tmp_path):
    """Kaggle saves a utility script by running it: it must import cleanly, print nothing, exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    for name in ("kidneyseg_utils.py", "kidneyseg_studies.py"):
        proc = subprocess.run(
            [sys.executable, str(REPO / name)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), name
    assert list(tmp_path.iterdir()) == []  # wrote nothing
    probe = (
        "import os, sys, kidneyseg_utils as ku\n"
        "assert 'albumentations' not in sys.modules\n"
        "ku.build_train_transform()\n"
        "print(os.environ['NO_ALBUMENTATIONS_UPDATE'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr  # no update check offline


# ----- staging, checked by the Kaggle CLI's own push code --------------------------------------------


@pytest.fixture()
def kaggle_cli(monkeypatch):
    """The Kaggle CLI's ``KaggleApi`` with its network client replaced by a recorder.

    ``kernels_push`` validates the folder and builds the request exactly as on a real push; only the
    final call to Kaggle's server is caught. Importing the package wants credentials: a dummy legacy
    key (an access token would be checked with Kaggle's server by kaggle 2.0, Kaggle's own version).
    """
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "offline-test")
    monkeypatch.setenv("KAGGLE_KEY", "offline-test-key")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as exc:  # pragma: no cover - the requirements install it
        if os.environ.get("CI"):
            pytest.fail(f"the kaggle package is missing: {exc}")
        pytest.skip(f"the kaggle package is not installed: {exc}")
    api = KaggleApi()
    sent: list = []

    class Recorder:
        def __enter__(self):
            client = types.SimpleNamespace(save_kernel=lambda request: sent.append(request) or request)
            return types.SimpleNamespace(kernels=types.SimpleNamespace(kernels_api_client=client))

        def __exit__(self, *exc):
            return False

    api.build_kaggle_client = Recorder
    api.sent = sent
    return api


def test_staged_series_is_pushed_as_the_kaggle_cli_would(tmp_path, kaggle_cli):
    stages = stage_tool.stage_kaggle(tmp_path / "stage", owner="alice", dataset="alice/kidneys")
    assert [[f.name for f in stage] for stage in stages] == [UTILITIES, SLUGS, LATER]
    for folder in [f for stage in stages for f in stage]:
        kaggle_cli.kernels_push(str(folder))
    sent = {request.slug.split("/")[1]: request for request in kaggle_cli.sent}
    for slug in UTILITIES:
        utility = sent[slug]
        assert utility.kernel_type == "script" and utility.category_ids == ["util-script"]
        assert utility.enable_gpu is False and utility.docker_image_pinning_type == "original"
        assert utility.text == (REPO / f"{slug.replace('-', '_')}.py").read_text()
    for slug in SLUGS + LATER:
        request = sent[slug]
        assert request.kernel_type == "notebook" and request.enable_internet is False
        assert request.dataset_data_sources == ["alice/kidneys"]
        assert "alice/kidneyseg-utils" in request.kernel_data_sources
        studies = "alice/kidneyseg-studies" in request.kernel_data_sources
        assert studies == (slug != "kidneyseg-03-train-model")  # 03 needs only the pipeline
        assert request.docker_image_pinning_type == "original"
        assert request.machine_shape == ("" if slug.endswith("01-explore-data") else "NvidiaTeslaT4")
        assert json.loads(request.text)["cells"]  # the notebook itself travels
    assert "alice/kidneyseg-03-train-model" in sent["kidneyseg-04-evaluate-model"].kernel_data_sources


def test_series_rules_and_staging_folder(tmp_path):
    series = json.loads((REPO / "kaggle-metadata.json").read_text())
    assert stage_tool.series_problems(series) == []
    broken = json.loads(json.dumps(series))
    broken["utility_scripts"][0]["keywords"] = []
    broken["utility_scripts"][0]["slug"] = "kidneyseg-helpers"
    broken["notebooks"][0]["kernel_sources"] = []
    broken["notebooks"][1]["kernel_sources"] = ["{owner}/kidneyseg-utils"]
    broken["notebooks"][2]["title"] = "Train it"
    broken["notebooks"][3]["machine_shape"] = "NvidiaTeslaP100"
    problems = stage_tool.series_problems(broken)
    assert any("util-script" in p for p in problems)
    assert any("'kidneyseg-helpers' must give its file name kidneyseg_utils.py" in p for p in problems)
    assert any(p.startswith("kidneyseg-01-explore-data does not list") for p in problems)
    assert (
        "kidneyseg-02-preprocessing-experiments does not list the utility script of kidneyseg_studies.py"
        in " ".join(problems)
    )
    assert any("gives the slug 'train-it'" in p for p in problems)
    assert any("no Pascal kernels" in p for p in problems)
    assert {n["code_file"] for n in series["notebooks"]} == {
        p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb")
    }
    out = tmp_path / "stage"
    first = stage_tool.stage_kaggle(out)
    assert stage_tool.stage_kaggle(out) == first  # staging again replaces its own folders
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a kidneyseg staging folder"):
        stage_tool.stage_kaggle(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_stage_command_prints_the_push_order(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "kaggle_stage.py"),
            "stage",
            str(tmp_path / "s"),
            "--owner",
            "bob",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    pushes = [
        line.split("/")[-1] for line in proc.stdout.splitlines() if line.startswith("kaggle kernels push")
    ]
    assert pushes == [*UTILITIES, *SLUGS, *LATER]
    assert "once notebook 03 has finished" in proc.stdout and "bob/kidneyseg-03-train-model" in proc.stdout
    lines = proc.stdout.splitlines()
    wait = next(i for i, line in enumerate(lines) if "kaggle kernels status bob/kidneyseg-utils" in line)
    first_notebook = next(i for i, line in enumerate(lines) if line.endswith("kidneyseg-01-explore-data"))
    utility = next(i for i, line in enumerate(lines) if line.endswith("/kidneyseg-studies"))
    assert utility < wait < first_notebook  # wait for the utility scripts' runs before the notebooks


def test_staging_leaves_05_out_when_the_data_have_one_source(tmp_path, phantom_dir, capsys):
    stages = stage_tool.stage_kaggle(tmp_path / "one", owner="alice", data_dir=phantom_dir)
    assert [f.name for f in stages[-1]] == ["kidneyseg-04-evaluate-model"]
    assert "kidneyseg-05-leave-one-source-out left out" in capsys.readouterr().err
    two = ku.make_synthetic_sources(tmp_path / "two", n_cases=3, slices_per_case=2)
    stages = stage_tool.stage_kaggle(tmp_path / "both", owner="alice", data_dir=two)
    assert [f.name for f in stages[-1]] == LATER
    with pytest.raises(FileNotFoundError, match="no folder with images/ and masks/"):
        stage_tool.stage_kaggle(tmp_path / "none", owner="alice", data_dir=tmp_path / "empty-nowhere")


@pytest.mark.slow  # a fresh Python process imports torch
@pytest.mark.parametrize("name", ["kidneyseg_utils.py", "kidneyseg_studies.py"])
def test_run_as_a_script_on_kaggle_each_module_copies_itself_to_working(tmp_path, name):
    """The fallback for a utility script Kaggle did not mark: its output holds the module. The
    studies' script runs in a session where the pipeline is not attached (nothing on the path)."""
    kaggle = tmp_path / "kaggle"
    (kaggle / "working").mkdir(parents=True)
    script = _touch(tmp_path / "src" / "script.py", (REPO / name).read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle), KAGGLE_KERNEL_RUN_TYPE="Batch")
    run = dict(cwd=kaggle / "working", env=env, capture_output=True, text=True, timeout=120)
    proc = subprocess.run([sys.executable, "-I", str(script)], **run)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    assert sorted(p.name for p in (kaggle / "working").iterdir()) == [name]
    assert (kaggle / "working" / name).read_bytes() == script.read_bytes()


# ----- runtime rules: where things are, what "auto" means, headless or not ------------------------


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_outputs_are_found_five_levels_down_in_either_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path))
    old = _touch(tmp_path / "input" / "kidneyseg-03-train-model" / "kidneyseg" / ku.BEST_MODEL_NAME)
    assert ku.resolve_model_paths("auto", tmp_path / "empty") == [old]
    new = _touch(tmp_path / "input/notebooks/alice/kidneyseg-03-train-model/kidneyseg" / ku.BEST_MODEL_NAME)
    assert ku.resolve_model_paths("auto", tmp_path / "empty") == [new]
    message = capsys.readouterr().out
    assert (
        "Found 2" in message
        and "current layout" in message
        and str(old) in message
        and "MODEL_PATH" in message
    )
    _touch(tmp_path / "input/a/b/c/d/e/f/g" / ku.BEST_MODEL_NAME)  # seven folders down: out of bounds
    assert len(ku.kaggle_output_candidates(ku.BEST_MODEL_NAME)) == 2
    local = _touch(tmp_path / "working" / "kidneyseg" / ku.BEST_MODEL_NAME)
    assert ku.resolve_model_paths("auto", local.parent) == [local]  # this session's own model first
    with pytest.raises(FileNotFoundError, match="MODEL_PATH"):
        monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path / "nowhere"))
        ku.resolve_model_paths("auto", tmp_path / "empty")


def test_find_below_skips_hidden_and_image_folders(tmp_path):
    _touch(tmp_path / "a" / "target")
    _touch(tmp_path / ".hidden" / "target")
    _touch(tmp_path / "data" / "images" / "target")
    _touch(tmp_path / "b" / "c" / "target")
    assert ku.find_below(tmp_path, "target") == [tmp_path / "a" / "target", tmp_path / "b" / "c" / "target"]
    assert ku.find_below(tmp_path, "target", max_depth=1) == [tmp_path / "a" / "target"]
    assert ku.find_below(tmp_path / "missing", "target") == []


def _dataset(root: Path, name: str = "a") -> Path:
    from PIL import Image

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(root / sub / f"{name}.png")
    return root


def test_data_on_kaggle_current_and_old_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.delenv(ku.DATA_DIR_ENV, raising=False)
    # notebook 03's output holds phantoms; it is never taken for data
    _dataset(tmp_path / "input/notebooks/alice/kidneyseg-03-train-model/kidneyseg/synthetic_data")
    with pytest.raises(FileNotFoundError, match="Add Input") as caught:
        ku.resolve_data_dir("auto", synthetic_dir=tmp_path / "working" / "syn")
    assert 'DATA_DIR="synthetic"' in str(caught.value) and not (tmp_path / "working" / "syn").exists()
    synthetic = ku.resolve_data_dir("synthetic", synthetic_dir=tmp_path / "working" / "syn")
    assert len(ku.index_dataset(synthetic).pairs) > 0
    old = _dataset(tmp_path / "input" / "kidneys" / "train").parent
    assert ku.resolve_data_dir("auto") == old
    new = _dataset(tmp_path / "input" / "datasets" / "alice" / "kidneys" / "ct").parent
    assert ku.kaggle_dataset_candidates() == [new, old]
    assert ku.resolve_data_dir("auto") == new
    assert "Found 2 attached datasets" in capsys.readouterr().out


def test_auto_defaults_follow_kaggle(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert (ku.Config().multi_gpu, ku.Config().max_train_minutes) == (False, None)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    config = ku.Config.from_parameters(MULTI_GPU="auto", MAX_TRAIN_MINUTES="auto")
    assert (config.multi_gpu, config.max_train_minutes) == (True, ku.KAGGLE_TRAIN_MINUTES)
    assert ku.KAGGLE_TRAIN_MINUTES < 12 * 60
    assert ku.Config(multi_gpu=False, max_train_minutes=None).to_dict()["multi_gpu"] is False
    with pytest.raises(ValueError, match="MULTI_GPU"):
        ku.Config(multi_gpu="both")


def test_interactive_frontend_rules(monkeypatch):
    monkeypatch.delenv(ku.INTERACTIVE_ENV, raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert ku.interactive_frontend() is False  # plain Python: no kernel
    fake = types.SimpleNamespace(kernel=types.SimpleNamespace(_allow_stdin=True))
    monkeypatch.setattr("IPython.get_ipython", lambda: fake)
    assert ku.interactive_frontend() is True  # a front end that answers input(): a person
    fake.kernel._allow_stdin = False
    assert ku.interactive_frontend() is False  # papermill, nbclient, nbval
    fake.kernel._allow_stdin = True
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert ku.interactive_frontend() is False  # Kaggle's "Save & Run All"
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "1")
    assert ku.interactive_frontend() is True
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "0")
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    assert ku.interactive_frontend() is False


def test_headless_runs_create_no_widget(monkeypatch, capsys):
    import IPython.display
    import ipywidgets

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    drawn = []
    controls = lambda widgets: {"x": widgets.IntSlider(0, 0, 3)}  # noqa: E731
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "0")
    ks._static_then_widget(lambda x=0: drawn.append(x), controls)
    assert drawn == [0] and shown == [] and "Sliders appear" in capsys.readouterr().out
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "1")
    ks._static_then_widget(lambda x=0: drawn.append(x), controls)
    assert len(shown) == 1 and isinstance(shown[0], ipywidgets.Widget)
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "0")
    bar = ku._progress_bar(range(3), True)
    assert bar.disable and list(bar) == [0, 1, 2]


def test_one_plain_line_per_epoch(tmp_path, phantom_dir, tiny_config, capsys, monkeypatch):
    monkeypatch.setenv(ku.INTERACTIVE_ENV, "0")
    data = ku.prepare_data(tiny_config, phantom_dir)
    ku.train_model(
        ku.build_model(tiny_config),
        data.train_dataset,
        data.val_dataset,
        tiny_config,
        tmp_path,
        torch.device("cpu"),
    )
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("val loss" in line and "dice" in line and "best" in line for line in lines)
    assert "\r" not in captured.err  # no progress bar drawn in a headless run


# ----- a simulated Kaggle session: staged folders, Kaggle's mounts, three sessions -------------------

LAYOUTS = {
    "current": {
        "utility": "usr/lib/notebooks/alice/kidneyseg-utils",
        "dataset": "input/datasets/alice/kidneys",
        "output_of_03": "input/notebooks/alice/kidneyseg-03-train-model",
        "output_of_utility": "input/notebooks/alice/kidneyseg-utils",
        "studies": "usr/lib/notebooks/alice/kidneyseg-studies",
        "output_of_studies": "input/notebooks/alice/kidneyseg-studies",
    },
    "old": {
        "utility": "usr/lib/kidneyseg_utils",
        "dataset": "input/kidneys",
        "output_of_03": "input/kidneyseg-03-train-model",
        "output_of_utility": "input/kidneyseg-utils",
        "studies": "usr/lib/kidneyseg_studies",
        "output_of_studies": "input/kidneyseg-studies",
    },
}


def _kaggle_session(kaggle: Path, folder: Path, parameters: dict, previous_output: Path | None) -> Path:
    """One Kaggle session: a fresh /kaggle/working, the earlier output attached, the staged notebook
    run headless (nbval) with ``KAGGLE_KERNEL_RUN_TYPE=Batch``. Returns this session's output."""
    working, layout = kaggle / "working", kaggle.name
    shutil.rmtree(working, ignore_errors=True)
    working.mkdir()
    attached = kaggle / LAYOUTS[layout]["output_of_03"]
    shutil.rmtree(attached, ignore_errors=True)
    if previous_output is not None:
        shutil.copytree(previous_output, attached)  # Kaggle mounts the whole /kaggle/working of a run
    notebook = next(folder.glob("*.ipynb"))
    prepared = kaggle / "run" / notebook.name
    prepared.parent.mkdir(exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(prepared), prepare_only=True, parameters=parameters, kernel_name="python3"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", ku.DATA_DIR_ENV, ku.INTERACTIVE_ENV, "NO_ALBUMENTATIONS_UPDATE")
    }
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle), KAGGLE_KERNEL_RUN_TYPE="Batch", MPLBACKEND="Agg")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-cell-timeout=300",
            str(prepared),
        ],
        cwd=working,  # Kaggle runs notebooks in /kaggle/working
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    snapshot = kaggle / "outputs" / f"{notebook.stem}-{len(list((kaggle / 'outputs').glob('*')))}"
    shutil.copytree(working, snapshot)
    return snapshot


@pytest.mark.parametrize("layout", ["current", "old"])
@pytest.mark.parametrize("marked", [True, False])
def test_the_notebooks_find_both_utility_scripts_in_either_layout(tmp_path, layout, marked):
    """Every notebook's first code cell puts the attached scripts on ``sys.path``: mounted as utility
    scripts under /kaggle/usr/lib, or (a script Kaggle did not mark) as the output of its run."""
    kaggle = tmp_path / layout
    mounts = {}
    for name, role in (("kidneyseg_utils", "utility"), ("kidneyseg_studies", "studies")):
        mounts[name] = kaggle / LAYOUTS[layout][role if marked else f"output_of_{role}"]
        mounts[name].mkdir(parents=True)
        shutil.copy(REPO / f"{name}.py", mounts[name])
    (kaggle / "working").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle))
    finders = {}  # one run per distinct finder cell
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        finders.setdefault("".join(next(c for c in cells if c["cell_type"] == "code")["source"]), notebook)
    assert len(finders) >= 2  # 03's finder looks for the pipeline alone
    for finder, notebook in finders.items():
        wanted = [name for name in mounts if name in finder]
        probe = f"\nimport importlib.util as u\nprint(*[u.find_spec(n).origin for n in {wanted}])"
        run = dict(cwd=kaggle / "working", env=env, capture_output=True, text=True, timeout=60)
        proc = subprocess.run([sys.executable, "-I", "-c", finder + probe], **run)
        assert proc.returncode == 0, notebook.name + proc.stderr[-2000:]
        assert [Path(p).parent for p in proc.stdout.split()] == [mounts[n] for n in wanted], notebook.name
        assert wanted[0] == "kidneyseg_utils"


def test_the_finders_name_the_script_to_attach(tmp_path):
    """With a script missing, each notebook's first cell stops with the name of what to attach."""
    kaggle = tmp_path / "kaggle"
    (kaggle / "working").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle))
    run = dict(cwd=kaggle / "working", env=env, capture_output=True, text=True, timeout=60)
    finders = {}
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        finders.setdefault("".join(next(c for c in cells if c["cell_type"] == "code")["source"]), notebook)
    for finder, notebook in finders.items():
        proc = subprocess.run([sys.executable, "-I", "-c", finder], **run)
        assert proc.returncode != 0, notebook.name
        assert "ModuleNotFoundError: kidneyseg_utils.py not found" in proc.stderr, notebook.name
        assert "the kidneyseg-utils utility script" in proc.stderr
    mount = kaggle / LAYOUTS["current"]["utility"]
    mount.mkdir(parents=True)
    shutil.copy(REPO / "kidneyseg_utils.py", mount)  # the pipeline attached, the studies not
    for finder, notebook in finders.items():
        proc = subprocess.run([sys.executable, "-I", "-c", finder], **run)
        if "kidneyseg_studies" in finder:
            assert "ModuleNotFoundError: kidneyseg_studies.py not found" in proc.stderr, notebook.name
            assert "the kidneyseg-studies utility script" in proc.stderr
        else:
            assert proc.returncode == 0, notebook.name + proc.stderr[-2000:]


def test_model_path_auto_finds_attached_fold_runs(tmp_path, monkeypatch):
    """Notebook 04 with the output of notebook 03's fold runs attached evaluates them as one ensemble."""
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path))
    output = tmp_path / "input/notebooks/alice/kidneyseg-03-train-model/kidneyseg"
    folds = [_touch(output / f"fold_{k}" / ku.BEST_MODEL_NAME) for k in (1, 0, 2)]
    assert ku.resolve_model_paths("auto", tmp_path / "working" / "kidneyseg") == sorted(folds)
    single = _touch(tmp_path / "input/notebooks/alice/other-run/kidneyseg" / ku.BEST_MODEL_NAME)
    # A single model beside fold runs: one is chosen by the stated rule (shortest path) and named.
    assert ku.resolve_model_paths("auto", tmp_path / "working" / "kidneyseg") == [single]


def test_restore_run_for_resume_takes_the_same_fold_and_overwrites_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ku.KAGGLE_ROOT_ENV, str(tmp_path))
    previous = tmp_path / "input/notebooks/alice/kidneyseg-03-train-model/kidneyseg"
    names = (ku.LAST_CHECKPOINT_NAME, ku.BEST_MODEL_NAME, ku.METRICS_CSV_NAME, ku.CONFIG_JSON_NAME)
    for fold in ("fold_0", "fold_1"):
        for name in names:
            _touch(previous / fold / name, f"{fold} {name}")
    working = tmp_path / "working" / "kidneyseg"
    _touch(working / "fold_1" / ku.METRICS_CSV_NAME, "the user's own file")
    assert ku.restore_run_for_resume(working / "fold_1") == previous / "fold_1"
    copied = {name: (working / "fold_1" / name).read_text() for name in names}
    assert copied[ku.LAST_CHECKPOINT_NAME] == f"fold_1 {ku.LAST_CHECKPOINT_NAME}"
    assert copied[ku.METRICS_CSV_NAME] == "the user's own file"  # never overwritten
    assert ku.restore_run_for_resume(working / "fold_2") is None  # no run of that fold attached
    assert not (working / "fold_2").exists()
    assert ku.restore_run_for_resume(working / "fold_1") is None  # it has its own checkpoint now


@pytest.mark.slow
def test_simulated_kaggle_sessions(tmp_path, phantom_dir):
    """Notebook 03 trains with only the pipeline's utility script attached; 04 (both scripts)
    evaluates 03's attached output with MODEL_PATH="auto"; 03 runs again in a new session with
    RESUME=True and its previous output attached, continuing the history."""
    stage = stage_tool.stage_kaggle(tmp_path / "stage", owner="alice", dataset="alice/kidneys")
    folders = {f.name: f for group in stage for f in group}
    layout = "current"
    kaggle = tmp_path / layout
    (kaggle / "outputs").mkdir(parents=True)
    shutil.copytree(folders["kidneyseg-utils"], kaggle / LAYOUTS[layout]["utility"])
    shutil.copytree(phantom_dir, kaggle / LAYOUTS[layout]["dataset"] / "ct")
    tiny = dict(IMAGE_SIZE=32, BASE_CHANNELS=4, BATCH_SIZE=8, GROUP_REGEX="^([^_]+)_")

    first = _kaggle_session(kaggle, folders["kidneyseg-03-train-model"], {**tiny, "NUM_EPOCHS": 1}, None)
    shutil.copytree(folders["kidneyseg-studies"], kaggle / LAYOUTS[layout]["studies"])
    run = first / "kidneyseg"
    checkpoint = ku.load_checkpoint(run / ku.BEST_MODEL_NAME)
    assert checkpoint["data_dir"] == str(kaggle / LAYOUTS[layout]["dataset"])
    assert checkpoint["config"]["multi_gpu"] is True  # "auto" on Kaggle: every GPU
    assert checkpoint["config"]["max_train_minutes"] == ku.KAGGLE_TRAIN_MINUTES

    evaluated = _kaggle_session(kaggle, folders["kidneyseg-04-evaluate-model"], {}, first)
    summary = json.loads((evaluated / "kidneyseg" / "evaluation_val" / "evaluation_summary.json").read_text())
    assert summary["model_path"].startswith(str(kaggle / LAYOUTS[layout]["output_of_03"]))
    assert summary["n_images"] == len(checkpoint["split"]["val"])

    resumed = _kaggle_session(
        kaggle, folders["kidneyseg-03-train-model"], {**tiny, "NUM_EPOCHS": 2, "RESUME": True}, first
    )
    history = pd.read_csv(resumed / "kidneyseg" / ku.METRICS_CSV_NAME)
    assert history["epoch"].tolist() == [1, 2]
    assert history.iloc[0].equals(pd.read_csv(run / ku.METRICS_CSV_NAME).iloc[0])  # continued, not redone
    assert ku.load_checkpoint(resumed / "kidneyseg" / ku.LAST_CHECKPOINT_NAME)["epoch"] == 2


@pytest.mark.slow
def test_simulated_kaggle_session_with_an_unmarked_utility_script(tmp_path, phantom_dir):
    """Kaggle did not mark the script as a utility script: nothing under /kaggle/usr/lib, only the
    scripts' outputs attached as inputs. Their runs wrote the modules there, and notebook 01 finds
    both."""
    stage = stage_tool.stage_kaggle(tmp_path / "stage", owner="alice", dataset="alice/kidneys")
    folders = {f.name: f for group in stage for f in group}
    layout = "current"
    kaggle = tmp_path / layout
    (kaggle / "outputs").mkdir(parents=True)
    (kaggle / "working").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KIDNEYSEG_KAGGLE_ROOT=str(kaggle), KAGGLE_KERNEL_RUN_TYPE="Batch")
    for slug, output in (
        ("kidneyseg-utils", "output_of_utility"),
        ("kidneyseg-studies", "output_of_studies"),
    ):
        script = folders[slug] / f"{slug.replace('-', '_')}.py"
        run = dict(cwd=kaggle / "working", env=env, check=True, timeout=120)
        subprocess.run([sys.executable, "-I", str(script)], **run)
        shutil.move(kaggle / "working", kaggle / LAYOUTS[layout][output])
        (kaggle / "working").mkdir()
    assert not (kaggle / "usr").exists()
    shutil.copytree(phantom_dir, kaggle / LAYOUTS[layout]["dataset"] / "ct")
    explored = _kaggle_session(kaggle, folders["kidneyseg-01-explore-data"], {"GALLERY_SIZE": 4}, None)
    inventory = pd.read_csv(explored / "kidneyseg" / "exploration" / "data_inventory.csv")
    assert (inventory["status"] == "ok").sum() == len(ku.index_dataset(phantom_dir).pairs)
