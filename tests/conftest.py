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
    config: ku.Config, data: ku.PreparedData, out: Path, **kw: Any
) -> tuple[torch.nn.Module, ku.TrainingResult]:
    """Train a fresh model (seeded by ``config.seed``) on the CPU, quietly; returns it and the result."""
    torch.manual_seed(config.seed)
    model = ku.build_model(config)
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
