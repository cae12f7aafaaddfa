"""GPU check, for a person with one CUDA GPU (under 5 minutes): the vision steps' real code on real photos.

    python bench/gpu.py [--images 512] [--batch 32] [--gd-images 64] [--decode-workers 1,2,4,8]

* RAM at its real size (Swin-L 384, 4,585 classes; random init: speed does not depend on the weights)
  through the stages' own tagger (``stages/vision/tagger.BaseTagger`` on ``model/infer.Inference``), in bf16
  autocast and in fp32 (TF32 matmuls):
  - ``model_img_per_s``: pixel batches already on the GPU, the forward only (all classes);
  - ``decode_img_per_s``: one thread decoding the JPEG bytes and resizing to 384 px (``open_image`` +
    the model's preprocessing, uint8), no model;
  - ``decode_workers_N.with_decode_img_per_s``: what an evidence.v1 actor does with N decode threads
    (``resources.decode_workers``): each batch scored as soon as its images are decoded, while the
    threads decode the next;
  - ``decode_workers_N.gpu_busy_share``: the GPU's time inside the forwards (CUDA events around each)
    over the wall time of that run (an upper bound where kernel launches starve the GPU);
  - ``peak_gpu_mem_gib``: ``torch.cuda.max_memory_allocated`` during that precision's runs.
* Grounding DINO through the transformers backend (``stages/vision/detectors.HFGroundingDino``) with the default
  Swin-T config (random init), 16 COCO class names per image: ``pairs_per_s``, (image, prompt) pairs.
* ``--train`` (also run by ``--smoke``): RAM training at the official fine-tuning shape, Swin-L at 384 px
  (``ram_swin_l_384``, random init), batch 26, bf16 autocast, AdamW, label rows frozen, through the train
  step's own objective (``model/objective.Objective`` + ``BatchLoss``): ``train_bf16`` with
  ``img_per_s`` over ``--train-steps`` optimizer steps after one warm-up step, and
  ``peak_gpu_mem_gib`` (one process, one GPU: the per-GPU figure of a DDP run, less NCCL's buffers).

Photos: ../shared/data/coco20 (20 COCO JPEGs), replicated. One JSON line on stdout (also written to
``--out``). Without CUDA it prints one line saying it needs a GPU and exits with status 2; ``--smoke``
runs the same code with tiny models on the CPU (numbers meaningless) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))
TINY_RAM = {"num_classes": 20, "image_size": 64, "window_size": 4, "embed_dim": 8, "depths": (2, 2, 2),
            "num_heads": (1, 2, 4), "head_hidden": 32, "head_intermediate": 64, "label_dim": 16}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def ram_section(model, rows: list[dict], precision: str, batch: int, stage_batch: int, device: str,
                decode_workers: list[int]) -> dict:
    import torch

    from common.images import ImageLimits

    from stages.vision.tagger import BaseTagger
    from stages.vision.decode import Decoder

    limits = ImageLimits()
    names = [str(i) for i in range(model.cfg.num_classes)]
    tagger = BaseTagger.from_model(model, names, batch_size=batch, device=device, precision=precision)
    classes = tagger.class_of_tag
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pixels = [x for _, _, _, x in Decoder(1, None, limits).decode(rows, tagger.prepare)]  # one thread, no model
    decode_s = time.perf_counter() - t0
    pixels = [tagger._pixels(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    tagger.engine.scores(pixels[0], classes)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for x in pixels:
        out = tagger.engine.scores(x, classes)
    _sync(device)
    model_s = time.perf_counter() - t0
    del pixels, out
    n = len(rows)
    res = {"model_img_per_s": round(n / model_s, 1), "decode_img_per_s": round(n / decode_s, 1)}
    forward = tagger.engine.scores
    for workers in decode_workers:
        spans = []

        def timed(*a, **kw):  # CUDA events around each forward: the GPU's time inside it
            if device != "cuda":
                return forward(*a, **kw)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(*a, **kw)
            end.record()
            spans.append((start, end))
            return out

        tagger.engine.scores = timed
        dec = Decoder(workers, None, limits)
        t0 = time.perf_counter()
        for s in range(0, len(rows), stage_batch):  # evidence.v1's loop: each batch scored as soon as it is decoded
            for _, _, px, _ in dec.batches(rows[s:s + stage_batch], batch, tagger.prepare):
                tagger.scores(px)
        _sync(device)
        wall = time.perf_counter() - t0
        dec.close()
        busy = sum(a.elapsed_time(b) for a, b in spans) / 1000 / wall if spans else None
        res[f"decode_workers_{workers}"] = {"with_decode_img_per_s": round(n / wall, 1),
                                            "gpu_busy_share": None if busy is None else round(busy, 3)}
    tagger.engine.scores = forward
    res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None
    return res


def grounding_dino(path: Path, names: list[str], smoke: bool) -> Path:
    """A Grounding DINO directory in Hugging Face format with random weights: the default config
    (Swin-T backbone, BERT-base-sized text encoder over a vocabulary of the prompt words)."""
    from stages.vision.detectors import write_random_grounding_dino

    return write_random_grounding_dino(path, [w for n in names for w in n.split()], tiny=smoke, max_text_len=64)


def gd_section(path: Path, images: list, names: list[str], precision: str, device: str) -> dict:
    from stages.vision.detectors import HFGroundingDino

    gd = HFGroundingDino(str(path), device, precision=precision)
    per_image = [names] * len(images)
    pairs = sum(len(gd_prompts(gd, ns)) for ns in per_image)
    gd.detect(images[:8], per_image[:8], 0.3, 0.25, batch_size=8)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    gd.detect(images, per_image, 0.3, 0.25, batch_size=8)
    _sync(device)
    return {"pairs": pairs, "pairs_per_s": round(pairs / (time.perf_counter() - t0), 1)}


def gd_prompts(gd, names: list[str]):
    from stages.vision.detectors import build_prompts

    return build_prompts(names, gd._count, gd.limit)


# ---- --train: the training part (separate from the inference parts above) ----

def train_section(model, rows: list[dict], batch: int, steps: int, device: str) -> dict:
    """``steps`` optimizer steps on batches of the photos (decoded and resized once, outside the timing):
    what a training worker's GPU does per step, without its loader."""
    import torch

    from model.preprocess import to_tensor
    from model.objective import BatchLoss, Objective
    from model.train import TrainConfig, optimizer_step
    from common.images import ImageLimits, open_image

    cfg = TrainConfig(batch_size=batch, bf16=True, grad_clip=5.0)
    pixels = [to_tensor(open_image(r, None, ImageLimits())[0], model.cfg) for r in rows[:batch]]
    g = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    x = torch.stack([pixels[i % len(pixels)] for i in range(batch)]).to(dev)  # on the GPU already: no loader
    y = (torch.rand(batch, model.cfg.num_classes, generator=g) < 0.01).float().to(dev)
    model.label_embed.requires_grad_(False)  # the recipes' freeze_label_embed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    objective, batch_loss = Objective(model, cfg), BatchLoss(model, cfg)
    objective.train()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(objective, x, y, lambda: [], g, dev)
        loss.backward()
        optimizer_step(opt, sched, params, cfg)
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (kernels, allocator, AdamW state)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    wall = time.perf_counter() - t0
    return {"batch": batch, "image_size": model.cfg.image_size, "steps": steps,
            "img_per_s": round(batch * steps / wall, 2), "loss_last": round(float(loss), 3),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None}


def train_part(rows: list[dict], batch: int, steps: int, smoke: bool, device: str) -> dict:
    import torch

    from model.registry import create_model

    torch.manual_seed(0)
    with torch.device(device):
        model = create_model("ram_swin_l_384") if not smoke else create_model("ram_test", **TINY_RAM)
    try:
        return train_section(model, rows, batch if not smoke else 4, steps if not smoke else 2, device)
    except Exception as e:  # noqa: BLE001 - a check reports what broke and goes on
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

# ---- end of --train ----


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stage-batch", type=int, default=256, help="rows a vision actor gets per call (resources)")
    ap.add_argument("--gd-images", type=int, default=64)
    ap.add_argument("--decode-workers", default="1,2,4,8", help="decode threads per GPU to try (comma-separated)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    ap.add_argument("--train", action="store_true", help="also RAM training: Swin-L 384, bf16, --train-batch")
    ap.add_argument("--train-batch", type=int, default=26, help="images per GPU per step (official fine-tuning: 26)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench/out/gpu.json"))
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here): nothing measured",
              file=sys.stderr)
        return 2
    photos = sorted((SHARED / "data/coco20/images").glob("*.jpg"))
    if not photos:
        print(f"bench/gpu.py needs photos in {SHARED}/data/coco20/images (set RAM_SHARED_DIR)", file=sys.stderr)
        return 2
    from model.registry import create_model
    from common.images import ImageLimits, open_image

    device = "cpu" if args.smoke else "cuda"
    n = min(args.images, 24) if args.smoke else args.images
    data = [p.read_bytes() for p in photos]
    rows = [{"image_id": f"{i:05d}", "image_bytes": data[i % len(data)]} for i in range(n)]
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
                 "torch": torch.__version__, "images": n, "batch": args.batch, "stage_batch": args.stage_batch,
                 "model": "ram_swin_l_384 (random init)" if not args.smoke else "tiny ram (smoke)"}
    torch.manual_seed(0)
    with torch.device(device):
        model = create_model("ram_swin_l_384") if not args.smoke else create_model("ram_test", **TINY_RAM)
    failed = False
    for precision in ("bf16", "fp32"):
        try:
            res[f"ram_{precision}"] = ram_section(model, rows, precision, args.batch, args.stage_batch, device,
                                                  [int(w) for w in args.decode_workers.split(",")])
        except Exception as e:  # noqa: BLE001 - a check reports what broke and goes on
            res[f"ram_{precision}"], failed = {"error": f"{type(e).__name__}: {e}"[:500]}, True
    del model
    names = ["person", "bicycle", "car", "motorcycle", "bus", "truck", "boat", "traffic light", "bench", "bird",
             "cat", "dog", "horse", "umbrella", "cup", "chair"]
    images = [open_image(r, None, ImageLimits())[0] for r in rows[:min(args.gd_images, n)]]
    with tempfile.TemporaryDirectory() as tmp:
        path = grounding_dino(Path(tmp) / "gd", names, args.smoke)
        for precision in ("bf16", "fp32"):
            try:
                res[f"grounding_dino_{precision}"] = gd_section(path, images, names, precision, device)
            except Exception as e:  # noqa: BLE001
                res[f"grounding_dino_{precision}"], failed = {"error": f"{type(e).__name__}: {e}"[:500]}, True
    if args.train or args.smoke:
        res["train_bf16"] = train_part(rows, args.train_batch, args.train_steps, args.smoke, device)
        failed = failed or "error" in res["train_bf16"]
    line = json.dumps(res, sort_keys=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
