"""GPU check: what a person with a GPU runs once before trusting the series there (sized to end
within about 8 minutes on one T4; an estimate until a T4 has run it). It checks what notebook 03
really runs by default on Kaggle, and writes each figure as soon as it is measured, so a step that
fails or runs out of memory leaves the earlier ones on disk.

Steps, each sized to the card (the batch shrinks to fit 60 % of its memory, and says so), with the
GPU cache freed between them:

1. ``environment``: the GPUs, their memory, torch/CUDA/cuDNN versions, the precision and the number
   of data-loader workers the defaults choose.
2. ``training``: images per second after a warm-up epoch and peak GPU memory, with the defaults
   (``NUM_WORKERS=None``: workers and pinned memory; ``AMP="cuda"``), in fp32 beside it, and on
   every GPU with ``nn.DataParallel`` when there are several (``MULTI_GPU``, Kaggle's default),
   also with ``DEVICE="cuda:1"`` first.
3. ``kill_and_resume``: a training process with the defaults killed (SIGKILL) after its first epoch,
   then resumed here.
4. ``cpu_checkpoint``: a checkpoint written by a process that sees no GPU (no CUDA generator states,
   an empty GradScaler state) on a small subset, resumed here on the GPU.
5. ``evaluation``: the resumed model on its validation split at original size, without and with flip
   TTA, after an untimed pass that lets cuDNN choose its kernels.

Whatever could not be checked on this machine (two GPUs on one, fp16's GradScaler on a bf16 card) is
listed under ``not_checked``. It trains on synthetic phantoms unless ``--data`` names a folder::

    python benchmarks/gpu_check.py                        # the GPU, full size
    python benchmarks/gpu_check.py --device cpu --tiny    # every step, tiny, on a CPU (the tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_utils as ku  # noqa: E402

GROUPS = "^([^_]+)_"
# Activation memory of one 256 px image at width 64 in training, fp32 (measured on a CPU with
# saved-tensor hooks); mixed precision about halves it.
MB_PER_IMAGE_FP32 = 570.0


def settings(tiny: bool) -> dict[str, Any]:
    """Model and data sizes: the specification's, or tiny ones for a CPU."""
    if tiny:
        return dict(
            image_size=32, base_channels=4, batch_size=4, epochs=3, cases=4, slices=5, phantom_size=64
        )
    return dict(
        image_size=256, base_channels=64, batch_size=16, epochs=3, cases=14, slices=12, phantom_size=256
    )


def make_config(size: dict[str, Any], **changes: Any) -> ku.Config:
    """The defaults of notebook 03 (workers, AMP "cuda", MULTI_GPU on where several GPUs are, as on
    Kaggle) at ``size``."""
    values = dict(
        image_size=size["image_size"],
        base_channels=size["base_channels"],
        batch_size=size["batch_size"],
        num_epochs=size["epochs"],
        patience=100,
        group_regex=GROUPS,
        max_train_minutes=None,
        multi_gpu=torch.cuda.device_count() > 1,
    )
    return ku.Config(**{**values, **changes})


def fit_batch(size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``size`` with the batch lowered until the fp32 run fits 60 % of the card's memory."""
    if device.type != "cuda" or size["image_size"] < 256:
        return size
    total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
    per_image = MB_PER_IMAGE_FP32 * (size["image_size"] / 256) ** 2 * (size["base_channels"] / 64)
    batch = max(2, min(size["batch_size"], int(0.6 * total_mb // per_image)))
    return (
        {**size, "batch_size": batch, "batch_lowered_from": size["batch_size"]}
        if batch < size["batch_size"]
        else size
    )


def free(device: torch.device) -> None:
    """Give the GPU memory of the previous step back (the caching allocator keeps it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train(config: ku.Config, data: ku.PreparedData, out: Path, device: torch.device, **kw: Any):
    torch.manual_seed(config.seed)
    model = ku.build_model(config)
    extra = {"split": data.split_record()}
    result = ku.train_model(
        model,
        data.train_dataset,
        data.val_dataset,
        config,
        out,
        device,
        progress=False,
        log=False,
        extra_state=extra,
        **kw,
    )
    return model, result


def environment(size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    config = make_config(size)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "settings": {k: size[k] for k in ("image_size", "base_channels", "batch_size", "epochs")},
        "precision_by_default": ku.precision_name(ku.autocast_dtype(device, config.amp)),
        "workers_by_default": ku._auto_workers(config, device),
        "multi_gpu_by_default": config.multi_gpu,
    }
    if "batch_lowered_from" in size:
        info["batch_lowered_from"] = size["batch_lowered_from"]
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        info["cpu_cores"] = os.cpu_count()
    return info


def training(size: dict[str, Any], data: ku.PreparedData, work: Path, device: torch.device) -> list[dict]:
    """Training images per second after one warm-up epoch, and peak memory, per setting."""
    variants: dict[str, tuple[dict[str, Any], torch.device]] = {
        "defaults, one GPU": (dict(multi_gpu=False), device),
        "fp32, one GPU": (dict(multi_gpu=False, amp=False), device),
    }
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        variants[f"defaults, DataParallel on {torch.cuda.device_count()} GPUs"] = ({}, device)
        variants["defaults, DEVICE='cuda:1' first, all GPUs"] = ({}, torch.device("cuda:1"))
    rows = []
    for name, (changes, where) in variants.items():
        free(where)
        config = make_config(size, **changes)
        model, result = train(config, data, work / re.sub(r"\W+", "_", name), where)
        timed = result.history.iloc[1:]  # the first epoch warms up (cuDNN's choice, worker start)
        steps = len(data.train_dataset) // config.batch_size
        rows.append(
            {
                "setting": name,
                "precision": result.precision,
                "workers": ku._auto_workers(config, where),
                "images_per_second": steps * config.batch_size * len(timed) / timed["seconds"].sum(),
                "peak_memory_mb": peak_memory_mb(where),
                "final_val_dice": float(result.history["val_dice"].iloc[-1]),
            }
        )
        del model, result
    return rows


def kill_and_resume(
    size: dict[str, Any], data_dir: Path, data: ku.PreparedData, out: Path, device: torch.device
):
    """Train with the defaults in a child process, SIGKILL it after its first epoch, resume here for
    one more (the child is set to train far longer, so the kill always comes mid-run)."""
    endless = make_config(size, num_epochs=1000)
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
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(pd.read_csv(metrics)) >= 1):
        if child.poll() is not None:
            raise RuntimeError(
                f"the training child ended before it could be killed: {child.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError("the training child wrote no epoch within 5 minutes")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    free(device)
    killed_after = int(ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)["epoch"])
    config = make_config(size, num_epochs=killed_after + 1)
    _, result = train(config, data, out, device, resume=True)
    epochs = result.history["epoch"].tolist()
    return {
        "killed_after_epoch": killed_after,
        "epochs_after_resume": epochs,
        "continuous": epochs == list(range(1, config.num_epochs + 1)),
        "precision": result.precision,
    }


def cpu_checkpoint(size: dict[str, Any], data_dir: Path, out: Path, device: torch.device):
    """One epoch written by a process that sees no GPU, on a small subset at full width, then resumed
    on ``device`` for a second epoch."""
    small = make_config(size, batch_size=4, max_images=32, num_epochs=1, multi_gpu=False, num_workers=0)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(data_dir), str(out), json.dumps(small.to_dict()), "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode:
        raise RuntimeError(f"the CPU child failed: {proc.stderr[-2000:]}")
    saved = ku.load_checkpoint(out / ku.LAST_CHECKPOINT_NAME)
    config = small.with_parameters(NUM_EPOCHS=2)
    _, result = train(config, ku.prepare_data(config, data_dir), out, device, resume=True)
    return {
        "saved_scaler_state": "empty" if not saved.get("scaler_state") else "present",
        "saved_cuda_generators": len(saved["rng_state"].get("cuda", [])),
        "epochs_after_resume": result.history["epoch"].tolist(),
        "precision_after_resume": result.precision,
    }


def evaluation(run_dir: Path, data: ku.PreparedData, device: torch.device) -> list[dict]:
    """The run's best model on its validation split at original size, without and with flip TTA,
    each timed after an untimed pass (cuDNN's kernel choice)."""
    model, config, _ = ku.load_model(run_dir / ku.BEST_MODEL_NAME, device)
    pairs = ku.load_evaluation_set(data.val.pairs, config)
    rows = []
    for tta in (False, True):
        ku.evaluate_model(model, pairs, device, tta=tta)  # warm-up
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


def not_checked(device: torch.device) -> list[str]:
    """What this machine cannot show."""
    missing = []
    if device.type != "cuda":
        return ["everything on a GPU: this run used the CPU"]
    if torch.cuda.device_count() < 2:
        missing.append("two GPUs (DataParallel, DEVICE='cuda:1'): one GPU visible")
    if ku.amp_dtype(torch.cuda.get_device_capability(device)) != torch.float16:
        missing.append("fp16 with the GradScaler (a T4's precision): this card computes in bf16")
    return missing


def step(report: dict[str, Any], out: Path, name: str, work: Callable[[], Any]) -> Any:
    """Run one step, store its figures (or its error) in ``report`` and write the JSON at once."""
    tic = time.monotonic()
    try:
        value = work()
        report[name] = value
    except Exception as exc:  # recorded, so the steps after it still run
        value = None
        report[name] = {
            "failed": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        print(f"step {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    report.setdefault("step_seconds", {})[name] = round(time.monotonic() - tic, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    ku._atomic_write(out, json.dumps(report, indent=2, default=str) + "\n")
    return value


def run_checks(device: torch.device, tiny: bool, data_dir: Path | None, out: Path) -> dict[str, Any]:
    size = fit_batch(settings(tiny), device)
    started = time.monotonic()
    report: dict[str, Any] = {"device": describe(device), "date": time.strftime("%Y-%m-%d")}
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
        report.update(train_images=len(data.train_dataset), val_images=len(data.val_dataset))
        step(report, out, "environment", lambda: environment(size, device))
        step(report, out, "training", lambda: training(size, data, work / "speed", device))
        free(device)
        resumed = step(
            report,
            out,
            "kill_and_resume",
            lambda: kill_and_resume(size, data_dir, data, work / "killed", device),
        )
        free(device)
        step(report, out, "cpu_checkpoint", lambda: cpu_checkpoint(size, data_dir, work / "from_cpu", device))
        free(device)
        run_dir = work / "killed" if resumed else work / "speed" / "defaults_one_GPU"
        step(report, out, "evaluation", lambda: evaluation(run_dir, data, device))
        report["not_checked"] = not_checked(device)
        report["total_seconds"] = round(time.monotonic() - started, 1)
        ku._atomic_write(out, json.dumps(report, indent=2, default=str) + "\n")
    return report


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return f"{count} x {torch.cuda.get_device_name(device)} (compute capability {capability})"
    return f"CPU ({os.cpu_count()} cores)"


def print_report(report: dict[str, Any], out: Path) -> None:
    images = f"{report.get('train_images')} training, {report.get('val_images')} validation images"
    print(f"device: {report['device']}; {images}")
    for name in ("environment", "training", "kill_and_resume", "cpu_checkpoint", "evaluation"):
        value = report.get(name)
        print(f"\n{name} ({report['step_seconds'].get(name, 0):.0f} s):")
        if isinstance(value, list):
            print(pd.DataFrame(value).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        elif isinstance(value, dict) and "failed" in value:
            print("  FAILED:", value["failed"])
        else:
            print(" ", value)
    print("\nnot checked here:", "; ".join(report["not_checked"]) or "nothing")
    print(f"total {report['total_seconds']:.0f} s; written to {out}")


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
    if args.child:  # the processes that kill_and_resume kills and cpu_checkpoint runs without a GPU
        data_dir, out, config_json, device = args.child
        config = ku.Config.from_dict(json.loads(config_json))
        train(config, ku.prepare_data(config, data_dir), Path(out), torch.device(device))
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
    report = run_checks(device, args.tiny, args.data, out)
    print_report(report, out)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "failed" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
