"""The GPU code paths, forced on a CPU: checkpoints and generator states moved between devices, the
GradScaler state, the autocast dtype, autocast at inference (TTA included) and the two-GPU wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny, train_tiny
from torch import nn

import kidneyseg_utils as ku


def test_amp_dtype_never_bf16_below_compute_capability_8():
    assert ku.amp_dtype((7, 5)) == torch.float16  # T4
    assert ku.amp_dtype((6, 0)) == torch.float16  # P100
    assert ku.amp_dtype((8, 0)) == torch.bfloat16 and ku.amp_dtype((9, 0)) == torch.bfloat16
    assert ku.amp_dtype(None) is None


def test_resume_loads_to_the_cpu_and_restores_generators_as_cpu_bytes(phantom_data, tmp_path, monkeypatch):
    """A last checkpoint is loaded with map_location="cpu" whatever the device, and every generator
    state reaches set_rng_state as a CPU uint8 tensor, even when the file was loaded elsewhere."""
    train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    loads, states = [], []
    real_load, real_set = torch.load, torch.set_rng_state

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("map_location"))
        payload = real_load(*args, **kwargs)
        if isinstance(payload, dict) and "rng_state" in payload:  # as if loaded onto another device:
            rng = payload["rng_state"]
            rng["torch"] = rng["torch"].to(torch.int64)  # another dtype (a GPU copy would be another device)
        return payload

    def spy_set(state):
        states.append((state.device.type, state.dtype))
        real_set(state)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(torch, "set_rng_state", spy_set)
    _, resumed = train_tiny(tiny(num_epochs=2), phantom_data, tmp_path, resume=True)
    assert loads == ["cpu"] and states and set(states) == {("cpu", torch.uint8)}
    assert resumed.history["epoch"].tolist() == [1, 2]


def test_cuda_generator_states_restored_only_on_a_matching_machine(monkeypatch):
    """A checkpoint saved on two GPUs restores their generators on two GPUs, and neither a CPU run nor
    a one-GPU run tries to; a CPU checkpoint (no CUDA states) resumes on a GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    saved = {
        "torch": torch.get_rng_state(),
        "cuda": [torch.zeros(16, dtype=torch.int64), torch.ones(16, dtype=torch.int64)],
    }
    before = torch.get_rng_state()
    for available, count, expected in ((False, 0, 0), (True, 1, 0), (True, 2, 1)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        calls.clear()
        ku._set_rng_state(saved)
        assert len(calls) == expected
    assert all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in calls[0])
    ku._set_rng_state({k: v for k, v in saved.items() if k != "cuda"})  # a CPU checkpoint on "2 GPUs"
    ku._set_rng_state({**saved, "torch": before})


def test_grad_scaler_state_empty_missing_or_real():
    """fp16 on a GPU needs a GradScaler; a CPU checkpoint holds an empty state (the scaler was off)."""
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert off.state_dict() == {}  # what a CPU run saves
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict({})  # what failed before
    fresh = ku._grad_scaler("cpu", True, {})
    assert fresh.is_enabled() and fresh.get_scale() == 65536.0
    assert ku._grad_scaler("cpu", True, None).get_scale() == 65536.0
    used = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    restored = ku._grad_scaler("cpu", True, used.state_dict())
    assert restored.get_scale() == 256.0
    assert not ku._grad_scaler("cpu", False, used.state_dict()).is_enabled()


def test_cpu_checkpoint_without_scaler_state_resumes_with_a_scaler(phantom_data, tmp_path, monkeypatch):
    """A CPU run's last checkpoint (empty scaler state, or none at all) resumed where fp16 is on."""
    train_tiny(tiny(num_epochs=1), phantom_data, tmp_path)
    last = tmp_path / ku.LAST_CHECKPOINT_NAME
    payload = ku.load_checkpoint(last)
    assert payload["scaler_state"] == {}
    del payload["scaler_state"]
    ku.save_checkpoint(payload, last)
    built = []
    real = ku._grad_scaler

    def fp16_scaler(device_type, enabled, state=None):  # as on a T4: fp16, so the scaler is on
        scaler = real(device_type, True, state)
        built.append(scaler)
        return scaler

    monkeypatch.setattr(ku, "_grad_scaler", fp16_scaler)
    _, resumed = train_tiny(tiny(num_epochs=2), phantom_data, tmp_path, resume=True)
    assert resumed.history["epoch"].tolist() == [1, 2] and built[0].is_enabled()


def test_inference_under_autocast_matches_fp32(phantom_data):
    """The autocast branch of prediction (fp16 on a T4) runs, TTA included; on a CPU bf16 stands in."""
    torch.manual_seed(0)
    model = ku.build_model(tiny()).eval()
    images = phantom_data.train_dataset.images[:4]
    exact = ku.predict_probabilities(model, images, "cpu", tta=True, amp=None)
    assert np.array_equal(exact, ku.predict_probabilities(model, images, "cpu", tta=True))  # "auto" on a CPU
    for tta in (False, True):
        fast = ku.predict_probabilities(model, images, "cpu", tta=tta, amp=torch.bfloat16)
        reference = exact if tta else ku.predict_probabilities(model, images, "cpu", amp=None)
        assert fast.dtype == np.float32 and np.abs(fast - reference).max() < 0.05


def test_two_gpu_wrapper_and_unwrapped_checkpoint(tmp_path, phantom_data, monkeypatch):
    model = ku.AttentionUNet(base_channels=4, depth=2)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # "GPU T4 x2"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(ku.wrap_for_devices(model, cuda, True), nn.DataParallel)
    assert ku.wrap_for_devices(model, cuda, False) is model
    assert ku.wrap_for_devices(model, torch.device("cpu"), True) is model
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ku.wrap_for_devices(model, cuda, True) is model
    monkeypatch.undo()
    config = tiny(num_epochs=1)
    wrapped = nn.DataParallel(ku.build_model(config))
    result = ku.train_model(
        wrapped,
        phantom_data.train_dataset,
        phantom_data.val_dataset,
        config,
        tmp_path,
        torch.device("cpu"),
        progress=False,
    )
    state = ku.load_checkpoint(result.files["best_model"])["model_state"]
    assert not any(k.startswith("module.") for k in state)
    ku.load_model(result.files["best_model"])  # loads into a plain model


class _RecordedDataParallel(nn.Module):
    """Stands in for ``nn.DataParallel`` on a CPU: records what it was given."""

    def __init__(self, module, device_ids=None, output_device=None):
        super().__init__()
        self.module, self.device_ids, self.output_device = module, device_ids, output_device


def test_two_gpus_put_the_chosen_device_first(monkeypatch):
    """DEVICE="cuda:1" with MULTI_GPU: DataParallel needs the weights' GPU first in device_ids."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(nn, "DataParallel", _RecordedDataParallel)
    model = ku.AttentionUNet(base_channels=4, depth=2)
    second = ku.wrap_for_devices(model, torch.device("cuda:1"), True)
    assert (second.device_ids, second.output_device) == ([1, 0], 1)
    default = ku.wrap_for_devices(model, torch.device("cuda"), True)
    assert (default.device_ids, default.output_device) == ([0, 1], 0)


def test_each_replica_thread_computes_in_the_runs_autocast_dtype(monkeypatch):
    """DataParallel runs replicas in threads that inherit whether autocast is on but not its dtype
    (they would compute in fp16 on a bf16 run with the GradScaler off). The wrapped module sets the
    run's dtype itself; simulated on a CPU with DataParallel's own worker context."""
    import threading

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(nn, "DataParallel", _RecordedDataParallel)

    class Probe(nn.Module):
        seen: list = []

        def forward(self, x):
            self.seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
            return x

    for dtype, expected in ((torch.bfloat16, (True, torch.bfloat16)), (None, (False, torch.float16))):
        replica = ku.wrap_for_devices(Probe(), torch.device("cuda:0"), True, dtype).module

        def worker(replica=replica, enabled=dtype is not None):  # parallel_apply's _worker does this
            with torch.autocast("cuda", enabled=enabled):
                replica(torch.zeros(1))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert Probe.seen[-1][0] == expected[0]
        if expected[0]:
            assert Probe.seen[-1][1] == expected[1]


def test_kaggle_time_budget_counts_from_the_session_start(phantom_data, tmp_path, monkeypatch, epoch_clock):
    """On Kaggle the 660 minutes run from the session's start: a kernel 650 minutes old with epochs
    of 6 minutes stops after the first epoch (650 + 6 + 6 > 660); elsewhere only training counts."""
    epoch_clock(360.0)
    monkeypatch.setattr(ku, "process_seconds", lambda: 650 * 60.0)
    config = tiny(num_epochs=5, max_train_minutes=660)
    monkeypatch.setattr(ku, "on_kaggle", lambda: True)
    _, result = train_tiny(config, phantom_data, tmp_path / "kaggle")
    assert result.stop_reason == "time_budget" and len(result.history) == 1
    monkeypatch.setattr(ku, "on_kaggle", lambda: False)
    _, result = train_tiny(config, phantom_data, tmp_path / "local")
    assert result.stop_reason == "num_epochs" and len(result.history) == 5
