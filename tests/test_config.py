"""Config: the specification's defaults, JSON round trip, and a clear error for every bad value."""

from __future__ import annotations

import json

import pytest

import kidneyseg_utils as ku


def test_defaults_are_the_specification():
    c = ku.Config()
    assert (c.image_size, c.batch_size, c.learning_rate, c.weight_decay) == (256, 16, 1e-3, 1e-4)
    assert (c.num_epochs, c.patience, c.grad_clip_norm) == (150, 20, 1.0)
    assert (c.focal_alpha, c.focal_gamma, c.focal_weight, c.dice_weight) == (0.25, 2.0, 0.6, 0.4)
    assert (c.dropout, c.base_channels, c.depth, c.val_fraction) == (0.2, 64, 4, 0.2)
    assert c.inference_threshold == 0.5
    assert c.input_mapping == "minmax" and c.group_regex == "auto" and c.test_fraction == 0.15


def test_json_round_trip(tmp_path):
    c = ku.Config(image_size=128, group_regex="^([^_]+)_", max_train_minutes=2.5)
    path = c.to_json(tmp_path / "c.json")
    assert json.loads(path.read_text())["image_size"] == 128
    assert ku.Config.from_json(path) == c
    assert ku.Config.from_dict(c.to_dict()) == c


def test_notebook_parameter_names():
    for name in (
        "IMAGE_SIZE",
        "BATCH_SIZE",
        "LEARNING_RATE",
        "NUM_EPOCHS",
        "PATIENCE",
        "INFERENCE_THRESHOLD",
        "GROUP_REGEX",
        "BASE_CHANNELS",
        "SEED",
    ):
        assert name in ku.NOTEBOOK_PARAMETERS
    c = ku.Config.from_parameters(IMAGE_SIZE=64, BASE_CHANNELS=8)
    assert (c.image_size, c.base_channels) == (64, 8)
    with pytest.raises(ValueError, match="IMAGE_SIZ"):
        ku.Config.from_parameters(IMAGE_SIZ=64)
    with pytest.raises(ValueError, match="bogus"):
        ku.Config.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"num_epochs": 0}, "NUM_EPOCHS"),
        ({"num_epochs": 2.5}, "NUM_EPOCHS"),
        ({"batch_size": 0}, "BATCH_SIZE"),
        ({"image_size": 250}, "IMAGE_SIZE"),
        ({"image_size": 8}, "IMAGE_SIZE"),
        ({"image_size": 48, "depth": 5}, "IMAGE_SIZE"),
        ({"inference_threshold": 1.5}, "INFERENCE_THRESHOLD"),
        ({"inference_threshold": -0.1}, "INFERENCE_THRESHOLD"),
        ({"val_fraction": 0.0}, "VAL_FRACTION"),
        ({"val_fraction": 1.0}, "VAL_FRACTION"),
        ({"learning_rate": 0}, "LEARNING_RATE"),
        ({"dropout": 1.0}, "DROPOUT"),
        ({"input_mapping": ""}, "INPUT_MAPPING"),
        ({"group_regex": "(unclosed"}, "GROUP_REGEX"),
        ({"patience": 0}, "PATIENCE"),
        ({"max_train_minutes": 0}, "MAX_TRAIN_MINUTES"),
        ({"focal_weight": 0, "dice_weight": 0}, "DICE_WEIGHT"),
        ({"amp": "sometimes"}, "AMP"),
        ({"multi_gpu": "both"}, "MULTI_GPU"),
    ],
)
def test_invalid_values_name_the_parameter(values, name):
    with pytest.raises(ValueError, match=name):
        ku.Config(**values)


def test_get_device_cpu_and_bad_cuda(monkeypatch):
    assert ku.get_device("cpu").type == "cpu"
    monkeypatch.setattr(ku.torch.cuda, "is_available", lambda: False)
    assert ku.get_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA"):
        ku.get_device("cuda")


def test_stored_config_round_trips_and_unknown_keys_are_named():
    config = ku.Config(image_size=96, input_mapping="clahe/zscore")
    assert ku.Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"Unknown config keys \['chanels_last'\]"):
        ku.Config.from_dict({**ku.Config().to_dict(), "chanels_last": False})


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False)]
    + [("Yes", True), ("no", False), ("1", True), ("0", False), (" false ", False)],
)
def test_yes_no_parameters_accept_the_spellings_people_type(spelling, expected):
    assert ku.parse_flags(OVERWRITE=spelling) == [expected]
    assert ku.Config(amp=spelling).amp is expected and ku.Config(multi_gpu=spelling).multi_gpu is expected


@pytest.mark.parametrize("spelling", ["maybe", "", "y", 2, None, 0.5, "cuda"])
def test_other_yes_no_values_are_refused_never_taken_as_true(spelling):
    with pytest.raises(ValueError, match=r"RESUME must be True or False.*got"):
        ku.parse_flags(OVERWRITE=True, RESUME=spelling)


def test_amp_keeps_cuda_in_any_case():
    assert ku.Config(amp="CUDA").amp == "cuda" and ku.Config().amp == "cuda"
