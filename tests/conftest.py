"""Shared fixtures: the real slices in ../shared/data and small synthetic phantoms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import kidneyseg_utils as ku

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: a failure in CI when missing, a skip elsewhere."""
    if not (SHARED_DATA / "manifest.csv").is_file():
        message = f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def manifest(shared_data: Path) -> pd.DataFrame:
    """``../shared/data/manifest.csv``: the expected pairs, sources and cases (never hard-coded)."""
    return pd.read_csv(shared_data / "manifest.csv")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic patients of six 64x64 slices each."""
    return ku.make_synthetic_dataset(
        tmp_path_factory.mktemp("phantoms") / "data", n_cases=6, slices_per_case=6, image_size=64, seed=1
    )


# A model and run small enough for a unit test on a CPU: 32 px, width 4, depth 2, batch 4.
TINY = dict(
    image_size=32,
    base_channels=4,
    depth=2,
    batch_size=4,
    num_epochs=3,
    patience=20,
    group_regex="^([^_]+)_",
    seed=3,
)


def tiny(**changes: Any) -> ku.Config:
    """:data:`TINY` with ``changes`` (Config field names)."""
    return ku.Config(**{**TINY, **changes})


def train_tiny(
    config: ku.Config, data: ku.PreparedData, out: Path, model: torch.nn.Module | None = None, **kw: Any
) -> tuple[torch.nn.Module, ku.TrainingResult]:
    """Train ``model`` (by default a fresh one seeded by ``config.seed``) on the CPU, quietly; returns
    it and the result."""
    torch.manual_seed(config.seed)
    model = ku.build_model(config) if model is None else model
    result = ku.train_model(
        model,
        data.train_dataset,
        data.val_dataset,
        config,
        out,
        torch.device("cpu"),
        progress=False,
        log=kw.pop("log", False),
        **kw,
    )
    return model, result


@pytest.fixture()
def tiny_config() -> ku.Config:
    return tiny()


@pytest.fixture(scope="session")
def phantom_data(phantom_dir: Path) -> ku.PreparedData:
    """The phantoms prepared for :data:`TINY` (read-only: tests must not change them)."""
    return ku.prepare_data(tiny(), phantom_dir)


@pytest.fixture()
def epoch_clock(monkeypatch: pytest.MonkeyPatch):
    """``set(seconds)``: from then on the pipeline's clock advances ``seconds`` per training pass and
    stands still otherwise, so time budgets can be tested to the second."""
    clock, step = [0.0], [0.0]
    real_epoch = ku._run_epoch

    def timed_epoch(*args: Any, **kwargs: Any) -> dict[str, float]:
        if kwargs.get("optimizer") is not None:
            clock[0] += step[0]
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(ku, "_run_epoch", timed_epoch)
    monkeypatch.setattr(ku.time, "monotonic", lambda: clock[0])
    return lambda seconds: step.__setitem__(0, seconds)


def run_notebook(notebook: str, tmp_path: Path, parameters: dict, name: str | None = None) -> dict:
    """Execute ``notebooks/<notebook>`` headless with papermill and ``parameters`` (in a fresh kernel
    that sees the repository, not the caller's data or backend settings); return the executed notebook.
    A cell that raises raises ``papermill.PapermillExecutionError``."""
    import json
    from unittest import mock

    import papermill

    executed = tmp_path / (name or notebook)
    hidden = (ku.DATA_DIR_ENV, "MPLBACKEND", ku.INTERACTIVE_ENV)
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with mock.patch.dict(os.environ, env, clear=True):
        papermill.execute_notebook(
            str(REPO / "notebooks" / notebook),
            str(executed),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(tmp_path),
            progress_bar=False,
            execution_timeout=600,
            start_timeout=120,
        )
    return json.loads(executed.read_text())
