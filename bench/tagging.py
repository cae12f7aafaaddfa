"""Benchmark: batched tagging through the stages' own tagger (stages/vision/tagger.BaseTagger on
model/infer.Inference: what pseudolabel runs) vs an official-style one-image-at-a-time fp32 loop, same
run, same images.

    python bench/tagging.py [--model ram_swin_l_384] [--images 48] [--batch 16] [--precision auto] [--smoke]

Images are the 20 COCO photos beside the project (../shared/data/coco20), repeated; random weights
(speed does not depend on them). The last line is ``tagging_speedup_vs_per_image: X.XX``. ``--smoke``:
a tiny RAM (Swin 8 wide, 20 classes) at 64 px on 4 images; it checks the script (tests/test_bench_smoke.py),
its figure means nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))
SMOKE_RAM = {"num_classes": 20, "image_size": 64, "window_size": 4, "embed_dim": 8, "depths": [2, 2, 2],
             "num_heads": [1, 2, 4], "head_hidden": 32, "head_heads": 2, "head_intermediate": 64,
             "label_dim": 16}


def main() -> int:
    import torch
    from PIL import Image

    from model.preprocess import load_rgb, to_tensor
    from model.registry import create_model
    from stages.vision.tagger import BaseTagger

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ram_swin_l_384")
    ap.add_argument("--model-args", default='{"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], '
                                            '"window_size": 7, "image_size": 224}',
                    help="entrypoint overrides (default: a Swin-T sized RAM, CPU friendly)")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--out", default=str(REPO / "bench/out/tagging.json"))
    ap.add_argument("--smoke", action="store_true", help="a tiny RAM on 4 images: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.batch, args.model_args = 4, 2, json.dumps(SMOKE_RAM)
    photos = sorted((SHARED / "data/coco20/images").glob("*.jpg"))
    if not photos:
        print(f"needs photos in {SHARED}/data/coco20/images (set RAM_SHARED_DIR)", file=sys.stderr)
        return 2
    margs = json.loads(args.model_args)
    margs = {k: tuple(v) if isinstance(v, list) else v for k, v in margs.items()}
    torch.manual_seed(0)
    model = create_model(args.model, **margs).eval().to(args.device)
    paths = [photos[i % len(photos)] for i in range(args.images)]

    # official style: open, preprocess, generate_tag on a batch of one, fp32
    def per_image() -> float:
        t0 = time.perf_counter()
        for p in paths:
            x = to_tensor(Image.open(p).convert("RGB"), model.cfg).unsqueeze(0).to(args.device)
            with torch.no_grad():
                model.generate_tag(x)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    names = [str(i) for i in range(model.cfg.num_classes)]
    tagger = BaseTagger.from_model(model, names, batch_size=args.batch, device=args.device, precision=args.precision)

    def batched() -> float:
        t0 = time.perf_counter()
        scores = tagger.scores([load_rgb(str(p)) for p in paths])
        [(s > tagger.threshold_of_tag).nonzero() for s in scores]
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    per_image(), batched()  # warm-up
    t_single, t_batch = min(per_image() for _ in range(2)), min(batched() for _ in range(2))
    res = {"model": args.model, "model_args": margs, "device": args.device, "precision": args.precision,
           "images": len(paths),
           "batch": args.batch, "threads": torch.get_num_threads(),
           "per_image_img_per_s": round(len(paths) / t_single, 2), "batched_img_per_s": round(len(paths) / t_batch, 2),
           "tagging_speedup_vs_per_image": round(t_single / t_batch, 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=list) + "\n")
    for k, v in res.items():
        if k != "tagging_speedup_vs_per_image":
            print(f"{k}: {v}")
    print(f"tagging_speedup_vs_per_image: {res['tagging_speedup_vs_per_image']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
