"""Training: the loss goes down, early stopping, exact resume, checkpoints, refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny, train_tiny

import kidneyseg_utils as ku


def test_short_training_lowers_the_loss_and_writes_artefacts(phantom_data, tmp_path):
    _, result = train_tiny(tiny(num_epochs=8, learning_rate=3e-3), phantom_data, tmp_path)
    h = result.history
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_loss"].min() < h["val_loss"].iloc[0]
    assert list(h["epoch"]) == list(range(1, 9))
    expected_columns = {f"{s}_{m}" for s in ("train", "val") for m in ku.METRIC_NAMES}
    assert expected_columns | {"epoch", "lr", "seconds"} == set(h.columns)
    for path in result.files.values():
        assert path.is_file()
    csv = pd.read_csv(result.files["metrics_csv"])
    pd.testing.assert_frame_equal(csv, h, check_dtype=False)
    assert result.best_epoch == int(h.loc[h["val_loss"].idxmin(), "epoch"])
    assert ku.Config.from_json(result.files["config_json"]) == tiny(num_epochs=8, learning_rate=3e-3)


def test_early_stopping_triggers(phantom_data, tmp_path):
    _, result = train_tiny(tiny(num_epochs=40, patience=2, learning_rate=0.05), phantom_data, tmp_path)
    assert result.stop_reason == "early_stopping"
    assert len(result.history) == result.best_epoch + 2 < 40


def test_time_budget_stops_cleanly(phantom_data, tmp_path):
    _, result = train_tiny(tiny(num_epochs=50, max_train_minutes=1e-4), phantom_data, tmp_path)
    assert result.stop_reason == "time_budget" and len(result.history) == 1
    assert result.files["last_checkpoint"].is_file()


def test_time_budget_forecasts_the_next_epoch(phantom_data, tmp_path, epoch_clock):
    """A clock that advances 30 s per training pass and a 100 s budget: after epoch 3 (90 s) the next
    epoch, at the mean epoch time so far, would end at 120 s, past the budget, so training stops
    after 3 epochs; a rule that only looks at the time spent would start a 4th."""
    epoch_clock(30.0)
    _, result = train_tiny(tiny(num_epochs=50, max_train_minutes=100 / 60), phantom_data, tmp_path)
    assert result.stop_reason == "time_budget" and result.history["epoch"].tolist() == [1, 2, 3]


@pytest.mark.slow  # three training runs end to end
def test_resumed_run_equals_uninterrupted_run(phantom_data, tmp_path):
    full_model, full = train_tiny(tiny(num_epochs=4), phantom_data, tmp_path / "full")
    train_tiny(tiny(num_epochs=2), phantom_data, tmp_path / "split")
    torch.manual_seed(999)  # a fresh process would start from another state; resume must not care
    resumed_model, resumed = train_tiny(tiny(num_epochs=4), phantom_data, tmp_path / "split", resume=True)
    columns = [c for c in full.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(full.history[columns], resumed.history[columns])
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.best_epoch == full.best_epoch


@pytest.mark.slow  # two training runs, one with worker processes
def test_data_loader_workers_do_not_change_the_history(phantom_data, tmp_path):
    """The sampler's promise: augmentation is seeded from (seed, epoch, index), so the batches, and
    with them the whole history, are the same with worker processes as without."""
    _, inline = train_tiny(tiny(num_epochs=2, num_workers=0), phantom_data, tmp_path / "inline")
    _, workers = train_tiny(tiny(num_epochs=2, num_workers=2), phantom_data, tmp_path / "workers")
    columns = [c for c in inline.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(inline.history[columns], workers.history[columns])


def test_resume_refuses_other_architecture_and_missing_checkpoint(phantom_data, tmp_path):
    train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    with pytest.raises(ValueError, match="BASE_CHANNELS: 4 vs 8"):
        train_tiny(tiny(num_epochs=2, base_channels=8), phantom_data, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="RESUME=True"):
        train_tiny(tiny(num_epochs=2), phantom_data, tmp_path / "fresh", resume=True)


def test_second_run_never_overwrites_silently(phantom_data, tmp_path):
    train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    before = (tmp_path / ku.BEST_MODEL_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="OVERWRITE=True"):
        train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    assert (tmp_path / ku.BEST_MODEL_NAME).read_bytes() == before
    train_tiny(tiny(num_epochs=1, seed=4), phantom_data, tmp_path, overwrite=True)
    assert (tmp_path / ku.BEST_MODEL_NAME).read_bytes() != before


def test_batch_larger_than_training_set(phantom_data, tmp_path):
    with pytest.raises(ValueError, match="BATCH_SIZE=100"):
        train_tiny(tiny(batch_size=100), phantom_data, tmp_path)


def test_checkpoint_round_trip_with_weights_only(phantom_data, tmp_path):
    model, result = train_tiny(
        tiny(num_epochs=2), phantom_data, tmp_path, extra_state={"split": {"train": ["a/b"], "val": ["c/d"]}}
    )
    loaded, config, checkpoint = ku.load_model(result.files["best_model"], expected=tiny())
    assert config == tiny(num_epochs=2)
    assert checkpoint["split"]["val"] == ["c/d"] and checkpoint["epoch"] == result.best_epoch
    raw = torch.load(result.files["last_checkpoint"], weights_only=True)  # plain types only
    assert raw["kind"] == "last" and len(raw["history"]) == 2
    images = phantom_data.val.images[:3]
    direct = ku.load_model(result.files["last_checkpoint"])[0]
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(images[:, None] / 255.0).float())).squeeze(1)
    np.testing.assert_allclose(ku.predict_probabilities(direct, images), expected.numpy(), atol=1e-6)
    assert loaded.training is False


def test_load_model_names_the_differing_setting(phantom_data, tmp_path):
    _, result = train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    with pytest.raises(ValueError, match="BASE_CHANNELS: 4 vs 16"):
        ku.load_model(result.files["best_model"], expected=tiny(base_channels=16))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save(
            {"format": "kidneyseg-checkpoint", "x": _Payload(str(marker))}, handle, pickle_module=pickle
        )
    assert not marker.exists()
    with pytest.raises(ValueError, match="Refused to load .*evil.pth"):
        ku.load_checkpoint(path)
    assert not marker.exists()


def test_foreign_and_damaged_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a kidneyseg checkpoint"):
        ku.load_checkpoint(tmp_path / "foreign.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cut.pth"):
        ku.load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError):
        ku.load_checkpoint(tmp_path / "none.pth")


def test_nan_loss_stops_with_the_epoch_and_keeps_best(phantom_data, tmp_path):
    model, result = train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    best = (tmp_path / ku.BEST_MODEL_NAME).read_bytes()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(ku.TrainingDivergedError, match="epoch 1"):
        ku.train_model(
            model,
            phantom_data.train_dataset,
            phantom_data.val_dataset,
            tiny(num_epochs=2),
            tmp_path,
            torch.device("cpu"),
            overwrite=True,
            progress=False,
        )
    assert (tmp_path / ku.BEST_MODEL_NAME).read_bytes() == best


def test_infinite_loss_stops_like_nan(phantom_data, tmp_path):
    """README promises "NaN or inf": an infinite (not NaN) loss, given through train_model's loss_fn
    hook, stops the run in its epoch."""
    _, result = train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    best = (tmp_path / ku.BEST_MODEL_NAME).read_bytes()
    infinite = lambda logits, targets: (logits.abs().sum() + 1) * float("inf")  # noqa: E731
    with pytest.raises(ku.TrainingDivergedError, match="became inf in epoch 1"):
        train_tiny(tiny(num_epochs=2), phantom_data, tmp_path, overwrite=True, loss_fn=infinite)
    assert (tmp_path / ku.BEST_MODEL_NAME).read_bytes() == best


def test_out_of_memory_message_names_the_levers(phantom_data, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ku, "_run_epoch", boom)
    with pytest.raises(RuntimeError, match="BATCH_SIZE=4, IMAGE_SIZE=32"):
        train_tiny(tiny(), phantom_data, tmp_path)


def test_poly_schedule_hook_anneals_to_zero_and_resumes_exactly(phantom_data, tmp_path, epoch_clock):
    """The studies' PolySchedule through train_model's lr_schedule hook: over 4 epochs at 1e-3 the
    rate of epoch e is 1e-3 * (1 - (e - 1) / 4) ** 0.9; a run stopped after epoch 2 by its time
    budget and resumed repeats the uninterrupted one."""
    import kidneyseg_studies as ks

    config = tiny(num_epochs=4, learning_rate=1e-3)
    _, full = train_tiny(config, phantom_data, tmp_path / "full", lr_schedule=ks.PolySchedule)
    expected = [1e-3 * (1 - k / 4) ** 0.9 for k in range(4)]
    assert full.history["lr"].tolist() == pytest.approx(expected)
    epoch_clock(60.0)  # two epochs fit a 2.5-minute budget, a third would not
    _, first = train_tiny(
        config.with_parameters(MAX_TRAIN_MINUTES=2.5),
        phantom_data,
        tmp_path / "split",
        lr_schedule=ks.PolySchedule,
    )
    assert first.stop_reason == "time_budget" and len(first.history) == 2
    _, resumed = train_tiny(
        config, phantom_data, tmp_path / "split", resume=True, lr_schedule=ks.PolySchedule
    )
    columns = [c for c in full.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(full.history[columns], resumed.history[columns])
