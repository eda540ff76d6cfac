"""GPU check: what a person with a GPU runs once (under five minutes) before trusting the series there.

On the specification's model (width 64, 256 px, batch 16) it measures, side by side in one run:

1. training throughput (images per second after a warm-up epoch) and peak GPU memory in fp32, with
   mixed precision (fp16 on a T4, bf16 from compute capability 8.0);
2. a training process killed (SIGKILL) after its first epoch, then resumed on the GPU;
3. a checkpoint written on the CPU, resumed on the GPU (the generator and scaler states move across);
4. evaluation of the trained model on its validation split, with and without flip TTA (autocast);
5. ``nn.DataParallel`` on every visible GPU, when more than one is visible (Kaggle's "GPU T4 x2").

It trains on synthetic phantoms unless ``--data`` names a folder. The figures are printed and written
as JSON (default ``benchmarks/results/gpu_check_<device>.json``)::

    python benchmarks/gpu_check.py                        # the GPU, full size
    python benchmarks/gpu_check.py --device cpu --tiny    # every step, tiny, on a CPU (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_utils as ku  # noqa: E402

GROUPS = "^([^_]+)_"


def settings(tiny: bool) -> dict[str, Any]:
    """Model and data sizes: the specification's, or tiny ones for a CPU."""
    if tiny:
        return dict(
            image_size=32, base_channels=4, batch_size=4, epochs=3, cases=4, slices=5, phantom_size=64
        )
    return dict(
        image_size=256, base_channels=64, batch_size=16, epochs=4, cases=16, slices=10, phantom_size=256
    )


def make_config(size: dict[str, Any], **changes: Any) -> ku.Config:
    values = dict(
        image_size=size["image_size"],
        base_channels=size["base_channels"],
        batch_size=size["batch_size"],
        num_epochs=size["epochs"],
        patience=100,
        group_regex=GROUPS,
        max_train_minutes=None,
        multi_gpu=False,
        num_workers=0,
    )
    return ku.Config(**{**values, **changes})


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train(config: ku.Config, data: ku.PreparedData, out: Path, device: torch.device, **kw: Any):
    torch.manual_seed(config.seed)
    model = ku.build_model(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = ku.train_model(
        model, data.train_dataset, data.val_dataset, config, out, device, progress=False, log=False, **kw
    )
    return model, result


def throughput(size: dict[str, Any], data: ku.PreparedData, work: Path, device: torch.device) -> list[dict]:
    """Training images per second after one warm-up epoch, and peak memory, per precision setting."""
    rows = []
    variants = {
        "fp32": dict(amp=False),
        "AMP": dict(amp=True),
    }
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        variants[f"AMP + DataParallel on {torch.cuda.device_count()} GPUs"] = dict(amp=True, multi_gpu=True)
    for name, changes in variants.items():
        config = make_config(size, **changes)
        _, result = train(config, data, work / re.sub(r"\W+", "_", name), device)
        seconds = result.history["seconds"].iloc[1:].sum()  # the first epoch warms up (cudnn, caches)
        images = len(data.train_dataset) // config.batch_size * config.batch_size * (len(result.history) - 1)
        rows.append(
            {
                "setting": name,
                "dtype": str(ku.amp_dtype(torch.cuda.get_device_capability(device)))
                if device.type == "cuda" and config.amp
                else "float32",
                "images_per_second": images / seconds,
                "peak_memory_mb": peak_memory_mb(device),
                "final_val_dice": float(result.history["val_dice"].iloc[-1]),
            }
        )
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        rows.append({"setting": "DataParallel", "skipped": "one GPU visible"})
    return rows


def kill_and_resume(
    size: dict[str, Any], data_dir: Path, data: ku.PreparedData, out: Path, device: torch.device
):
    """Train in a child process, SIGKILL it after its first epoch, resume here on ``device`` for two
    more epochs (the child is set to train far longer, so the kill always comes mid-run)."""
    endless = make_config(size, amp=True, num_epochs=1000)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            str(data_dir),
            str(out),
            json.dumps(endless.to_dict()),
            str(device),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / ku.METRICS_CSV_NAME
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(pd.read_csv(metrics)) >= 1):
        if child.poll() is not None:
            raise RuntimeError(
                f"the training child ended before it could be killed: {child.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError("the training child wrote no epoch within 10 minutes")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_after = int(ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)["epoch"])
    config = make_config(size, amp=True, num_epochs=killed_after + 2)
    _, result = train(config, data, out, device, resume=True)
    epochs = result.history["epoch"].tolist()
    return {
        "killed_after_epoch": killed_after,
        "epochs_after_resume": epochs,
        "continuous": epochs == list(range(1, config.num_epochs + 1)),
    }


def cpu_checkpoint_on_device(size: dict[str, Any], data: ku.PreparedData, out: Path, device: torch.device):
    """One epoch on the CPU (no scaler state, no CUDA generators), then resumed on ``device``."""
    config = make_config(size, num_epochs=1)
    train(config, data, out, torch.device("cpu"))
    cpu_state = ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)
    _, result = train(make_config(size, num_epochs=2), data, out, device, resume=True)
    return {
        "saved_scaler_state": "empty" if not cpu_state.get("scaler_state") else "present",
        "saved_cuda_generators": len(cpu_state["rng_state"].get("cuda", [])),
        "epochs_after_resume": result.history["epoch"].tolist(),
    }


def evaluation(checkpoint_dir: Path, data: ku.PreparedData, device: torch.device) -> list[dict]:
    """The best model of the resumed run on its validation split at original size, with and without
    flip TTA (under autocast on CUDA)."""
    model, config, _ = ku.load_model(checkpoint_dir / ku.BEST_MODEL_NAME, device)
    pairs = ku.load_evaluation_set(data.val.pairs, config)
    rows = []
    for tta in (False, True):
        _, summary, _ = ku.evaluate_model(model, pairs, device, tta=tta)
        rows.append(
            {
                "tta": tta,
                "images": summary["n_images"],
                "pooled_dice": summary["pooled_dice"],
                "ms_per_slice": summary["ms_per_slice"],
            }
        )
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"{count} x {torch.cuda.get_device_name(device)} (compute capability {capability})"
    return f"CPU ({os.cpu_count()} cores)"


def run_checks(device: torch.device, tiny: bool, data_dir: Path | None, out: Path) -> dict[str, Any]:
    size = settings(tiny)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if data_dir is None:
            data_dir = ku.make_synthetic_dataset(
                work / "phantoms",
                n_cases=size["cases"],
                slices_per_case=size["slices"],
                image_size=size["phantom_size"],
            )
        data = ku.prepare_data(make_config(size), data_dir)
        report: dict[str, Any] = {
            "device": describe(device),
            "torch": torch.__version__,
            "settings": {k: size[k] for k in ("image_size", "base_channels", "batch_size", "epochs")},
            "train_images": len(data.train_dataset),
            "val_images": len(data.val_dataset),
        }
        report["training"] = throughput(size, data, work / "speed", device)
        report["kill_and_resume"] = kill_and_resume(size, data_dir, data, work / "killed", device)
        report["cpu_checkpoint_resumed_here"] = cpu_checkpoint_on_device(
            size, data, work / "from_cpu", device
        )
        report["evaluation"] = evaluation(work / "killed", data, device)
    report["total_seconds"] = time.monotonic() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any], out: Path) -> None:
    print(f"device: {report['device']}, torch {report['torch']}, settings {report['settings']}")
    print(f"{report['train_images']} training and {report['val_images']} validation images\n")
    print(pd.DataFrame(report["training"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nkill and resume:", report["kill_and_resume"])
    print("CPU checkpoint resumed here:", report["cpu_checkpoint_resumed_here"])
    print()
    print(pd.DataFrame(report["evaluation"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\ntotal {report['total_seconds']:.0f} s; written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when visible), 'cuda:0', 'cpu'")
    parser.add_argument("--tiny", action="store_true", help="tiny model and data (for a CPU and the tests)")
    parser.add_argument("--data", type=Path, help="images/ + masks/ folder (default: synthetic phantoms)")
    parser.add_argument(
        "--out", type=Path, help="JSON to write (default: benchmarks/results/gpu_check_<device>.json)"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # the process that kill_and_resume kills
        data_dir, out, config_json, device = args.child
        config = ku.Config.from_dict(json.loads(config_json))
        data = ku.prepare_data(config, data_dir)
        train(config, data, Path(out), torch.device(device))
        return 0
    device = ku.get_device(args.device)
    if device.type == "cpu" and not args.tiny:
        print("No GPU visible: add --tiny to check every step on the CPU, or run this where a GPU is.")
        return 2
    name = re.sub(r"\W+", "_", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu").strip(
        "_"
    )
    out = (
        args.out
        or REPO / "benchmarks" / "results" / f"gpu_check_{name.lower()}{'_tiny' if args.tiny else ''}.json"
    )
    print_report(run_checks(device, args.tiny, args.data, out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
