"""Training-step speed on a CPU in the default (contiguous) and in the channels-last memory format,
for our network and the peers of ``bench_quality.py``, side by side in one run.

Each step is forward, focal + Dice loss, backward and an AdamW step on a random batch; the two
formats alternate step by step so that both see the same machine load, and the median of the timed
steps is reported with the ratio. Our network converts its input to channels-last on a CPU by
itself (``AttentionUNet.cpu_channels_last``); here it is switched off for the contiguous rows.
Writes ``speed_memory_format.csv`` to ``--out``.

    python benchmarks/bench_memory_format.py --help
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_quality import make_model  # noqa: E402

import kidneyseg_utils as ku  # noqa: E402


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool) -> float:
    """Seconds for one training step with the given memory format."""
    loss_fn = ku.FocalDiceLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if isinstance(model, ku.AttentionUNet):
        model.cpu_channels_last = channels_last
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    tic = time.perf_counter()
    loss = loss_fn(model(inputs), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - tic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per format (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=["ours", "monai-basicunet", "smp-unet-resnet34"])
    parser.add_argument("--quick", action="store_true", help="tiny settings for the tests")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.base_channels, args.batch, args.steps = 32, 4, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_speed import machine

    print(
        f"# Memory format on the CPU, {time.strftime('%Y-%m-%d')}, {machine()}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    config = ku.Config(image_size=args.image_size, base_channels=args.base_channels)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.image_size, args.image_size, generator=gen)
    y = (torch.rand(x.shape, generator=gen) > 0.8).float()
    rows = []
    for name in args.models:
        model = make_model(name, config, args.quick)
        if model is None:
            rows.append({"model": name, "status": "not installed"})
            continue
        model.train()
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.steps + 1):
            for channels_last in (False, True):
                seconds = step_seconds(model, x, y, channels_last)
                if i:  # the first round warms up
                    times[channels_last].append(seconds)
        contiguous, last = statistics.median(times[False]), statistics.median(times[True])
        rows.append(
            {
                "model": name,
                "status": "ok",
                "params_M": ku.count_parameters(model) / 1e6,
                "size": args.image_size,
                "batch": args.batch,
                "contiguous_s_per_step": contiguous,
                "channels_last_s_per_step": last,
                "speed_up": contiguous / last,
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "speed_memory_format.csv", index=False)
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
