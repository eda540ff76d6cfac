"""Speed benchmarks: data pipeline, training step, inference and peak memory, side by side.

Prints each table and writes it as CSV. Every figure of one table is measured in the same run, so
the ratios are comparable; absolute times depend on the machine named in the header.

    python benchmarks/bench_speed.py --help
    python benchmarks/bench_speed.py                      # this machine, default sizes
    python benchmarks/bench_speed.py --quick              # tiny settings (used by the tests)

Peers (segmentation-models-pytorch Unet/resnet34 and MONAI BasicUNet, random initialisation) are
measured when they are installed (``pip install -r benchmarks/requirements.txt``), else listed as
missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kidneyseg_utils as ku  # noqa: E402


class NaiveDataset(Dataset):
    """The baseline a user would write first: read and decode the PNGs at every step."""

    def __init__(self, pairs, image_size, transform):
        self.pairs, self.size, self.transform = pairs, image_size, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, mask = ku.load_pair(self.pairs[index])
        image, mask = ku._resize_gray(image, self.size), ku._resize_mask(mask, self.size)
        out = self.transform(image=image, mask=mask)
        return (
            torch.from_numpy(out["image"].astype(np.float32) / 255)[None],
            torch.from_numpy(out["mask"].astype(np.float32))[None],
        )


def machine() -> str:
    """A one-line description of the machine and device."""
    cpu = platform.processor() or platform.machine()
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def data_pipeline(data_dir: str, images: int, epochs: int, image_size: int) -> pd.DataFrame:
    """Images per second of the cached dataset against the naive one, 0 and 2 workers."""
    pairs = ku.index_dataset(data_dir).pairs[:images]
    tic = time.perf_counter()
    cached = ku.load_arrays(pairs, image_size)
    cache_seconds = time.perf_counter() - tic
    rows = []
    for workers in (0, 2):
        for name, dataset in (
            (
                "cached (ours)",
                ku.KidneyDataset(cached.images, cached.masks, ku.build_train_transform()),
            ),
            (
                "naive: decode every step",
                NaiveDataset(pairs, image_size, ku.build_train_transform()),
            ),
        ):
            loader = DataLoader(
                dataset,
                batch_size=16,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                worker_init_fn=ku._worker_init if workers else None,
            )
            next(iter(loader))  # start the workers
            tic = time.perf_counter()
            seen = sum(len(batch[0]) for _ in range(epochs) for batch in loader)
            rows.append(
                {"dataset": name, "workers": workers, "images_per_s": seen / (time.perf_counter() - tic)}
            )
    table = pd.DataFrame(rows)
    for workers in (0, 2):
        part = table[table["workers"] == workers].set_index("dataset")["images_per_s"]
        table.loc[table["workers"] == workers, "ratio_to_naive"] = (
            table.loc[table["workers"] == workers, "images_per_s"] / part["naive: decode every step"]
        )
    table.attrs["cache_seconds"] = cache_seconds
    return table


def build(name: str, quick: bool):
    """A model by name, or None when its package is missing."""
    if name == "ours (SPEC, width 64)":
        return ku.build_model(ku.Config(base_channels=8 if quick else 64))
    if name == "ours (CPU preset, width 16)":
        return ku.build_model(ku.Config(base_channels=4 if quick else 16))
    if name == "smp Unet resnet34":
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            return None
        return smp.Unet("resnet18" if quick else "resnet34", encoder_weights=None, in_channels=1, classes=1)
    if name == "MONAI BasicUNet":
        try:
            from monai.networks.nets import BasicUNet
        except ImportError:
            return None
        features = (8, 8, 16, 32, 64, 8) if quick else (64, 64, 128, 256, 512, 64)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=features)
    raise ValueError(name)


MODELS = ("ours (SPEC, width 64)", "ours (CPU preset, width 16)", "smp Unet resnet34", "MONAI BasicUNet")


def train_step(name: str, size: int, batch: int, steps: int, mode: str, quick: bool) -> dict:
    """Images per second of forward, loss, backward and AdamW step (run in a child process)."""
    device = ku.get_device()
    model = build(name, quick)
    if model is None:
        return {"model": name, "mode": mode, "status": "not installed"}
    model.to(device).train()
    amp = None
    if mode != "fp32":
        amp = ku.amp_dtype(torch.cuda.get_device_capability(device))
    if mode == "amp+channels_last":
        model.to(memory_format=torch.channels_last)
    loss_fn = ku.FocalDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x = torch.rand(batch, 1, size, size, device=device)
    if mode == "amp+channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.9).float()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    return {
        "model": name,
        "mode": mode,
        "params_M": ku.count_parameters(model) / 1e6,
        "size": size,
        "batch": batch,
        "images_per_s": batch * steps / seconds,
        **_peak(device),
    }


def inference(size: int, batch: int, tta: bool, repeats: int, quick: bool) -> dict:
    """Milliseconds per slice of our SPEC model (run in a child process)."""
    device = ku.get_device()
    model = build(MODELS[0], quick).to(device).eval()
    images = np.random.default_rng(0).integers(0, 255, (batch, size, size), dtype=np.uint8)
    ku.predict_probabilities(model, images, device, batch, tta)  # warm-up
    tic = time.perf_counter()
    for _ in range(repeats):
        ku.predict_probabilities(model, images, device, batch, tta)
    ms = (time.perf_counter() - tic) * 1000 / (repeats * batch)
    return {"model": MODELS[0], "size": size, "batch": batch, "tta": tta, "ms_per_slice": ms, **_peak(device)}


def _peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_MB": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(function: str, **kwargs) -> dict:
    """Run one measurement in a fresh process, so that its peak memory is its own."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import bench_speed as b; "
        f"print(json.dumps(b.{function}(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode:
        return {
            "model": kwargs.get("name", ""),
            "status": "failed: " + proc.stderr.strip().splitlines()[-1][:120],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"), help="data root (images/ + masks/)"
    )
    parser.add_argument("--images", type=int, default=64, help="pairs for the data-pipeline benchmark")
    parser.add_argument("--epochs", type=int, default=2, help="passes over them")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes (for tests)")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="folder for the CSV tables"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = 64 if args.quick else 256
    print(f"# kidneyseg speed benchmarks, {time.strftime('%Y-%m-%d')}, {machine()}\n")

    pipeline = data_pipeline(args.data, args.images, args.epochs, size)
    print(
        f"## Data pipeline ({args.images} images at {size}px, full augmentation, batch 16; "
        f"building the cache took {pipeline.attrs['cache_seconds']:.1f} s once)"
    )
    print(pipeline.round(2).to_string(index=False), "\n")
    pipeline.to_csv(out / "speed_data_pipeline.csv", index=False)

    modes = ["fp32"] + (["amp", "amp+channels_last"] if torch.cuda.is_available() else [])
    rows = []
    for name in MODELS:
        model_size = size // 2 if "CPU preset" in name else size
        for mode in modes:
            rows.append(
                in_child(
                    "train_step",
                    name=name,
                    size=model_size,
                    batch=args.batch,
                    steps=args.steps,
                    mode=mode,
                    quick=args.quick,
                )
            )
    training = pd.DataFrame(rows)
    print(f"## Training step (forward, focal+Dice loss, backward, AdamW; batch {args.batch})")
    print(training.round(2).to_string(index=False), "\n")
    training.to_csv(out / "speed_training_step.csv", index=False)

    rows = [
        in_child("inference", size=size, batch=b, tta=t, repeats=2 if args.quick else 5, quick=args.quick)
        for b in (1, 16)
        for t in (False, True)
    ]
    infer = pd.DataFrame(rows)
    print(f"## Inference ({MODELS[0]}, {size}x{size} slices)")
    print(infer.round(2).to_string(index=False))
    infer.to_csv(out / "speed_inference.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
