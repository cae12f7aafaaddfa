"""Benchmark: scoring region crops with the CNN base tagger, the way verify and embed do, three ways
in the same run on the same crops:

* ``model_size``: every crop resized to the model's 64 px input, the training form of the network
  (what the stages did before);
* ``model_size_fast``: the same crops through ``CnnTagger.for_inference()`` (BatchNorm folded,
  channels-last);
* ``native_fast``: crops at the scale the whole image is seen at (``crop_size: native``, sides rounded
  up to multiples of 8 px, batched by size) through the inference form;
* ``view_fast``: one region view as verify makes it for pseudo candidates (``verify.views``: a window of
  0.75 x the image around the box, at the model's 64 px input) through the inference form. The run's
  default takes two views per candidate.

    python bench/crops.py [--images 300] [--batch 128] [--smoke]

Crops are the boxes of real scene-world objects (128 px images, seed 0). Single-threaded, as one
Ray worker of the run is. The last lines are the ratios against ``model_size`` (and, for a view,
against ``native_fast``: what a view costs next to the crop score every region gets). ``--smoke``: 4
images, one round; it checks the script (tests/test_bench_smoke.py), its figures mean nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    from model.registry import create_model
    from stages.vision.geometry import view_crop
    from stages.vision.tagger import BaseTagger
    from stages.vision.geometry import crop, native_crop
    from stages.world.generate import make_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/out/crops.json"))
    ap.add_argument("--smoke", action="store_true", help="4 images, one round: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.rounds = 4, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("cnn_tagger_tiny", num_classes=60, image_size=64, pool="lse").eval()
    items = []
    for i in range(args.images):
        w = make_image(0, i, 128)
        img = Image.open(io.BytesIO(w.png)).convert("RGB")
        items += [(img, o.box, k % 60) for k, o in enumerate(w.objects)]
    plain = BaseTagger(model, np.arange(60), np.full(60, 0.5, np.float32), "cpu", args.batch)
    fast = BaseTagger(model.for_inference(), np.arange(60), np.full(60, 0.5, np.float32), "cpu", args.batch)
    tags = [t for _, _, t in items]

    def model_size(tagger):
        return tagger.crop_scores([crop(im, b, 0.1) for im, b, _ in items], tags)

    def native(tagger):
        return tagger.crop_scores([native_crop(im, b, 0.1, 64) for im, b, _ in items], tags, native=True)

    def view(tagger):
        return tagger.crop_scores([view_crop(im, b, 0.75, False, 64) for im, b, _ in items], tags, native=True)

    runs = {"model_size": lambda: model_size(plain), "model_size_fast": lambda: model_size(fast),
            "native_fast": lambda: native(fast), "view_fast": lambda: view(fast)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    for _ in range(args.rounds):
        for k, f in runs.items():
            start = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    agree = float(np.max(np.abs(out["model_size"] - out["model_size_fast"])))
    result = {"crops": len(items), "seconds": med, "crops_per_second": {k: len(items) / v for k, v in med.items()},
              "max_abs_diff_fast_vs_plain": agree, "rounds": times}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in med.items():
        print(f"{k:16s} {len(items) / v:8.0f} crops/s")
    print(f"max |score difference|, inference form vs training form: {agree:.1e}")
    print(f"crops_inference_form_speedup: {med['model_size'] / med['model_size_fast']:.2f}")
    print(f"crops_native_speedup: {med['model_size'] / med['native_fast']:.2f}")
    print(f"view_cost_vs_native_crop: {med['view_fast'] / med['native_fast']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
