"""Benchmark: training steps of the base tagger (cnn_tagger_tiny) with channels-last vs contiguous
(NCHW) weights and batches, and channels-last under bf16 autocast on the CPU (``train.cpu_bf16``), same
run, same random batch, same optimiser.

    python bench/cnn_train.py [--steps 30] [--batch 32] [--size 64] [--classes 60] [--smoke]

Alternates the three in rounds so that all see the same machine state. The last lines are
``cnn_train_channels_last_speedup: X.XX`` (time per step, contiguous / channels-last) and
``cnn_train_cpu_bf16_speedup: X.XX`` (channels-last fp32 / channels-last bf16; under 1 on a CPU without
bf16 units). ``--smoke``: two steps of batch 4, one round; it checks the script (tests/test_bench_smoke.py),
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def step_time(channels_last: bool, steps: int, batch: int, size: int, classes: int, bf16: bool = False) -> float:
    import torch
    import torch.nn.functional as F

    from model.registry import create_model
    from model.train import TrainConfig, autocast

    torch.manual_seed(0)
    model = create_model("cnn_tagger_tiny", num_classes=classes, image_size=size)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, classes) < 0.1).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        with autocast(torch.device("cpu"), TrainConfig(cpu_bf16=bf16)):  # the training loop's own autocast
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--out", default=str(REPO / "bench/out/cnn_train.json"))
    ap.add_argument("--smoke", action="store_true", help="two steps of batch 4, one round: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.batch = 2, 1, 4
    times: dict[str, list[float]] = {"nchw": [], "channels_last": [], "channels_last_bf16": []}
    for _ in range(args.rounds):
        for name in times:
            times[name].append(step_time(name != "nchw", args.steps, args.batch, args.size, args.classes,
                                         bf16=name.endswith("bf16")))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
              "seconds_per_step": med, "images_per_second": {k: args.batch / v for k, v in med.items()},
              "rounds": times}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in med.items():
        print(f"{k:14s} {v * 1000:7.1f} ms/step  {args.batch / v:7.1f} img/s")
    print(f"cnn_train_channels_last_speedup: {med['nchw'] / med['channels_last']:.2f}")
    print(f"cnn_train_cpu_bf16_speedup: {med['channels_last'] / med['channels_last_bf16']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
