"""Benchmark: the four vision steps (pseudolabel, ground with attention, embed, verify with views) on
real photos, before and after ``evidence.v1`` (one decode per image, shared forwards, decode workers).

    python bench/vision.py [--rows 400] [--baseline 8d1bc67] [--workers 2] [--out bench/out/vision.json] [--smoke]

* Photos: ../shared/data/coco20 (20 COCO JPEGs, ~640x480, ~150 KB) replicated to ``--rows`` rows with
  unique ids, inline bytes; each row's parse tags are its COCO categories that RAM's tag list names.
* Model: RAM at 384 px with RAM's 4,585 classes, reduced width so a CPU runs it in minutes
  (``BENCH_RAM``: Swin embed 16, depths 2-2-2-2, tagging head 64 wide; random init, seed 0: speed does
  not depend on the weights). The same weights and config before and after.
* Configs: clean.yaml's (floor, top_k, the two region views); ground takes each image's parse tags and
  its best pseudo tags up to ``max_candidates`` 6 (random weights give no meaningful threshold).

Reported (JSON lines, then the last line ``vision_steps_speedup: X.XX``):
- ``decodes_per_image``: open_image calls per row, counted, for the four steps (before) and evidence.v1;
- ``decode_img_per_s``: decode + resize to 384 px (uint8) alone, 1 and ``--workers`` threads, and the ratio;
- ``model_img_per_s``: the whole-image forward alone (all classes), pixels already decoded;
- ``end_to_end``: seconds and images/s of the four steps through each path, setup (model load) excluded;
- ``gpu_standin`` (SIMULATION): a stand-in for a GPU that takes a fixed time per batch of 32 and
  releases the CPU while it waits (``time.sleep``), fed by the real decode path with 1 and ``--workers``
  threads; the share of wall time it is busy. Its per-batch time is set so it computes 1.5x faster
  than one decode thread decodes, i.e. a GPU that one thread cannot feed;
- ``bf16_vs_fp32_cpu_autocast``: thresholded tags of golden set A's official tiny RAM and RAM++ on the 20
  coco20 photos, bf16 CPU autocast against fp32: the share of (photo, tag) pairs that agree;
- ``vision_steps_speedup``: end-to-end seconds of the four steps in the baseline commit's code (its files
  extracted by ``git archive``, same data, same weights) / evidence.v1's, both measured in this run. The
  four steps exist only in a baseline from before the one evidence path (``stages/vision/``).

``--smoke``: 8 rows, the model at 64 px (``SMOKE_RAM``) over RAM's first 200 names and the COCO ones,
4 photos for the precision check, one torch thread; it checks the script (tests/test_bench_smoke.py),
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))
BENCH_RAM = {"image_size": 384, "window_size": 12, "embed_dim": 16, "depths": [2, 2, 2, 2],
             "num_heads": [1, 2, 4, 8], "head_hidden": 64, "head_heads": 4, "head_intermediate": 256}
# --smoke: the same model at 64 px (three Swin stages) over fewer classes, so a check of the script
# takes seconds, not minutes
SMOKE_RAM = {**BENCH_RAM, "image_size": 64, "window_size": 4, "depths": [2, 2, 2], "num_heads": [1, 2, 4]}
SMOKE_TAGS = 200
VIEWS = [{"window": 1.0, "mirror": True}, {"window": 0.75}]
PSEUDO = {"floor": 1.0, "top_k": 10}
GROUND = {"candidate_score": 0.0, "max_candidates": 6}
STAGE_BATCH, MODEL_BATCH = 64, 16
LINES: list[dict] = []


def emit(obj: dict) -> None:
    """One result line on stdout, kept for the JSON file (``--out``)."""
    LINES.append(obj)
    print(json.dumps(obj), flush=True)


# -- data (this tree's code only) ----------------------------------------------------------------------

def make_data(root: Path, rows: int, ram_args: dict, max_tags: int | None = None) -> None:
    """batch.parquet (rows), vocab/tagset.parquet (RAM's 4,585 names, or the first ``max_tags`` and every
    COCO category RAM names), tagger/ (model.json + model.pth)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from model.registry import create_model
    from tagset.tagset import Tag, TagSet

    coco = SHARED / "data" / "coco20"
    names = [n.strip() for n in (SHARED / "ref" / "ram" / "ram_tag_list.txt").read_text().splitlines() if n.strip()]
    inst = json.loads((coco / "instances_train2017.json").read_text())
    cat = {c["id"]: c["name"] for c in inst["categories"]}
    if max_tags:
        names = [n for i, n in enumerate(names) if i < max_tags or n in set(cat.values())]
    index = {n: i for i, n in enumerate(names)}
    tags: dict[int, set[int]] = {}
    for a in inst["annotations"]:
        if cat[a["category_id"]] in index:
            tags.setdefault(a["image_id"], set()).add(index[cat[a["category_id"]]])
    photos = [(im["id"], (coco / "images" / im["file_name"]).read_bytes()) for im in inst["images"]]
    recs = [{"image_id": f"r{i:05d}", "image": None, "image_bytes": photos[i % len(photos)][1],
             "union_label_id": sorted(tags.get(photos[i % len(photos)][0], set()))} for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(recs), root / "batch.parquet")
    (root / "vocab").mkdir()
    pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(names)]).to_table(), root / "vocab" / "tagset.parquet")
    torch.manual_seed(0)
    model = create_model("ram_swin_l_384", num_classes=len(names), **ram_args)
    (root / "tagger").mkdir()
    torch.save({"model": model.state_dict()}, root / "tagger" / "model.pth")
    (root / "tagger" / "model.json").write_text(json.dumps(
        {"entrypoint": "ram_swin_l_384", "model_args": {"num_classes": len(names), **ram_args},
         "checkpoint": "model.pth"}))


# -- one path over the data (runs in this tree or, for the baseline, in a copy of another commit) -------

def run_path(mode: str, root: Path, workers: int, threads: int) -> dict:
    """The four separate steps (``separate``: a baseline commit's code, before there was one evidence
    path) or evidence.v1 (``fused``) over batch.parquet; seconds exclude setup."""
    import importlib

    import pyarrow.parquet as pq
    import torch

    from pipeline.stage import StageContext

    torch.set_num_threads(threads)
    counts = {"n": 0}
    mods = []  # older code calls the copy its module imported; newer, common.images'
    for name in ("stages.vision", "stages.pseudolabel", "common.images"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    for mod in mods:
        if hasattr(mod, "open_image"):
            real = mod.open_image

            def counted(row, *a, _real=real):
                counts["n"] += 1
                return _real(row, *a)

            mod.open_image = counted
    batch = pq.read_table(root / "batch.parquet")
    ctx = StageContext(str(root), "bench", 0, {"tagset": str(root / "vocab"), "tagger": str(root / "tagger")})
    tagger = {"batch_size": MODEL_BATCH}
    slices = [batch.slice(o, STAGE_BATCH) for o in range(0, batch.num_rows, STAGE_BATCH)]
    if mode == "fused":
        from pipeline.stage import Resources

        try:
            from stages.vision.evidence import EvidenceConfig, EvidenceStage
        except ImportError:  # a baseline from before stages/vision/
            from stages.evidence import EvidenceConfig, EvidenceStage

        st = EvidenceStage(EvidenceConfig(**tagger, pseudolabel=PSEUDO, ground=GROUND, verify={"views": VIEWS}), ctx)
        st.resources = Resources(decode_workers=workers)
        st.setup()
        t0 = time.perf_counter()
        regions = sum(sum(len(r) for r in st(b).table.column("regions").to_pylist()) for b in slices)
    else:
        import stages.pseudolabel as pl_mod
        from stages.regions import CropConfig, EmbedStage, VerifyConfig, VerifyStage

        steps = [pl_mod.PseudoLabelStage(pl_mod.PseudoLabelConfig(**tagger, **PSEUDO), ctx),
                 pl_mod.GroundStage(pl_mod.GroundConfig(**tagger, **GROUND), ctx),
                 EmbedStage(CropConfig(**tagger), ctx), VerifyStage(VerifyConfig(**tagger, views=VIEWS), ctx)]
        for s in steps:
            s.setup()
        t0 = time.perf_counter()
        regions = 0
        for b in slices:  # step by step over every row, as the engine runs them
            g = steps[1](steps[0](b).table).table
            steps[2](g)
            steps[3](g)
            regions += sum(len(r) for r in g.column("regions").to_pylist())
    secs = time.perf_counter() - t0
    return {"mode": mode, "decode_workers": workers if mode == "fused" else 1, "rows": batch.num_rows, "seconds": round(secs, 2), "img_per_s": round(batch.num_rows / secs, 2),
            "regions": regions, "decodes_per_image": round(counts["n"] / batch.num_rows, 3)}


def _run_in(code: Path, mode: str, root: Path, workers: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, __file__, "--path", mode, "--data", str(root), "--code", str(code),
                          "--workers", str(workers), "--threads", str(threads)],
                         env=env, capture_output=True, text=True, cwd=str(code))
    if out.returncode:
        raise SystemExit(f"bench/vision.py: the {mode} path in {code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_code(commit: str, dest: Path) -> None:
    """The baseline commit's files in ``dest``, extracted from git's objects: no worktree is registered,
    so the repository is left as it was, also when the benchmark is killed."""
    got = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True)
    if got.returncode:
        raise SystemExit(f"bench/vision.py: cannot read baseline {commit} from {REPO}: "
                         f"{got.stderr.decode(errors='replace').strip()}")
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=got.stdout, check=True)


# -- decode, model, stand-in (this tree) --------------------------------------------------------------

def decode_rate(rows: list[dict], workers: int, prepare) -> float:
    from common.images import ImageLimits
    from stages.vision.decode import Decoder

    dec = Decoder(workers, None, ImageLimits())
    t0 = time.perf_counter()
    n = sum(1 for _, img, _, _ in dec.decode(rows, prepare) if img is not None)
    dec.close()
    return n / (time.perf_counter() - t0)


def standin_busy(rows: list[dict], workers: int, prepare, per_batch: float) -> float:
    """SIMULATION: the share of wall time a stand-in GPU (sleep ``per_batch`` s per batch) is busy when
    the real decode path feeds it; batches go to it as soon as they are decoded, in order."""
    from common.images import ImageLimits
    from stages.vision.decode import Decoder

    dec = Decoder(workers, None, ImageLimits(), ahead=2 * MODEL_BATCH)
    busy = 0.0
    t0 = time.perf_counter()
    for _ in dec.batches(rows, MODEL_BATCH, prepare):  # evidence.v1's loop: a batch as soon as it is decoded
        s = time.perf_counter()
        time.sleep(per_batch)  # the "GPU" computes; the CPU is free for the decode threads
        busy += time.perf_counter() - s
    dec.close()
    return busy / (time.perf_counter() - t0)


def model_rate(root: Path, rows: list[dict], threads: int) -> float:
    import torch

    from common.images import ImageLimits
    from stages.vision.decode import Decoder
    from stages.vision.tagger import BaseTagger, TaggerConfig
    from tagset.tagset import TagSet

    torch.set_num_threads(threads)
    names = TagSet.load(root / "vocab").names
    tagger = BaseTagger.load(TaggerConfig(batch_size=MODEL_BATCH), {"tagger": str(root / "tagger")}, names)
    pixels = [x for _, _, _, x in Decoder(1, None, ImageLimits()).decode(rows[:2 * MODEL_BATCH], tagger.prepare)]
    tagger.scores(pixels[:MODEL_BATCH])  # warm-up
    t0 = time.perf_counter()
    tagger.scores(pixels)
    return len(pixels) / (time.perf_counter() - t0)


def precision_agreement(max_photos: int | None = None) -> dict:
    """bf16 autocast vs fp32 on the CPU with golden set A's official tiny RAM and RAM++ (224 px, 50 classes,
    its threshold file): the share of (photo, tag) pairs of the 20 coco20 photos (or the first
    ``max_photos``) whose thresholded tag (score >= the tag's threshold) is the same, and the largest score
    difference."""
    import numpy as np

    from model.registry import create_model
    from common.images import ImageLimits
    from stages.vision.decode import Decoder
    from stages.vision.tagger import BaseTagger

    g = SHARED / "ref" / "ram" / "golden"
    thresholds = [float(x) for x in (g / "ram_tag_list_threshold.txt").read_text().split()]
    photos = [{"image_id": p.stem, "image_bytes": p.read_bytes()}
              for p in sorted((SHARED / "data" / "coco20" / "images").glob("*.jpg"))[:max_photos]]
    out = {}
    for name, ckpt in (("ram_test", "tiny_ram.pth"), ("ram_plus_test", "tiny_ram_plus.pth")):
        model = create_model(name, pretrained=str(g / ckpt)).eval()
        names = [str(i) for i in range(model.cfg.num_classes)]
        got = {}
        for precision in ("fp32", "bf16"):
            tagger = BaseTagger.from_model(model, names, None, thresholds, precision=precision)
            pixels = [x for _, _, _, x in Decoder(1, None, ImageLimits()).decode(photos, tagger.prepare)]
            got[precision] = tagger.scores(pixels)
        th = np.asarray(thresholds, np.float32)
        same = (got["fp32"] >= th) == (got["bf16"] >= th)
        out[name] = {"pairs": int(same.size), "agree": round(float(same.mean()), 4),
                     "tags_fp32": int((got["fp32"] >= th).sum()),
                     "max_abs_score_diff": round(float(np.abs(got["fp32"] - got["bf16"]).max()), 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--baseline", default="8d1bc67", help="the commit whose four steps are 'before' (default: the "
                    "code the GPU-path issue was filed against)")
    ap.add_argument("--baseline-rows", type=int, default=None, help="rows the baseline runs on (default --rows; "
                    "fewer when it is slow: the speedup is then per image, and says so)")
    ap.add_argument("--workers", type=int, default=2, help="decode workers")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the model")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "vision.json"))
    ap.add_argument("--path", choices=["separate", "fused"], help=argparse.SUPPRESS)  # one path, in a subprocess
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="8 rows, the model at 64 px: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:  # one thread: a busy machine's other work stalls two threads that wait on each other
        args.rows, args.baseline_rows, args.threads = 8, None, 1
    if args.path:
        sys.path.insert(0, args.code)
        print(json.dumps(run_path(args.path, Path(args.data), args.workers, args.threads)))
        return 0
    sys.path.insert(0, str(REPO))
    if not (SHARED / "data" / "coco20").exists():
        print(f"bench/vision.py needs ../shared/data/coco20 (set RAM_SHARED_DIR); not found at {SHARED}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root, bcode, broot = Path(tmp) / "data", Path(tmp) / "baseline", Path(tmp) / "baseline_data"
        root.mkdir()
        ram_args = SMOKE_RAM if args.smoke else BENCH_RAM
        make_data(root, args.rows, ram_args, SMOKE_TAGS if args.smoke else None)
        broot.mkdir()
        if args.baseline_rows and args.baseline_rows < args.rows:  # the same photos, weights and tagset, fewer rows
            import pyarrow.parquet as pq

            for d in ("vocab", "tagger"):
                (broot / d).symlink_to(root / d)
            pq.write_table(pq.read_table(root / "batch.parquet").slice(0, args.baseline_rows), broot / "batch.parquet")
        else:
            broot = root
        baseline_code(args.baseline, bcode)
        import pyarrow.parquet as pq

        from model.preprocess import to_uint8
        from model.ram import RamConfig

        emit({"bf16_vs_fp32_cpu_autocast": precision_agreement(4 if args.smoke else None),
              "how": "golden set A tiny RAM / RAM++, 20 coco20 photos, tags thresholded by the golden threshold file"})
        rows = pq.read_table(root / "batch.parquet").to_pylist()
        cfg = RamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ram_args.items()})
        prepare = lambda im: to_uint8(im, cfg)  # noqa: E731
        rounds: dict[int, list[float]] = {1: [], args.workers: []}
        for _ in range(3):  # alternating, so both see the same machine; the median of each
            for w in rounds:
                rounds[w].append(decode_rate(rows, w, prepare))
        d1, dn = (statistics.median(rounds[w]) for w in (1, args.workers))
        emit({"decode_img_per_s": {"1": round(d1, 1), str(args.workers): round(dn, 1)},
              "decode_scaling": round(dn / d1, 2), "rounds": {str(w): [round(r, 1) for r in v] for w, v in rounds.items()},
              "image": f"coco20 JPEG -> {cfg.image_size} px uint8, {len(rows)} rows"})
        rows = rows[:160]
        per_batch = MODEL_BATCH / (1.5 * d1)
        busy = {str(w): round(standin_busy(rows, w, prepare, per_batch), 3) for w in sorted({1, args.workers})}
        emit({"gpu_standin": "SIMULATION: sleep per batch, no GPU", "per_batch_s": round(per_batch, 4),
              "standin_img_per_s": round(MODEL_BATCH / per_batch, 1), "busy_share": busy})
        classes = pq.read_metadata(root / "vocab" / "tagset.parquet").num_rows
        emit({"model_img_per_s": round(model_rate(root, rows, args.threads), 2),
              "model": f"RAM {cfg.image_size} px, {classes:,} classes, reduced width "
                       f"({'SMOKE_RAM' if args.smoke else 'BENCH_RAM'}), fp32, {args.threads} threads",
              "batch": MODEL_BATCH})
        before = _run_in(bcode, "separate", broot, args.workers, args.threads)
        emit({"end_to_end": before, "code": f"baseline {args.baseline}"})
        fused = _run_in(REPO, "fused", root, args.workers, args.threads)
        emit({"end_to_end": fused, "code": f"this tree, evidence.v1, {args.workers} decode workers"})
        if args.workers != 1:  # on a CPU the decode threads share the cores with the model's
            one = _run_in(REPO, "fused", root, 1, args.threads)
            emit({"end_to_end": one, "code": "this tree, evidence.v1, 1 decode worker"})
    emit({"decodes_per_image": {"before": before["decodes_per_image"], "after": fused["decodes_per_image"]}})
    per_image = before["rows"] != fused["rows"]
    speedup = (before["seconds"] / before["rows"]) / (fused["seconds"] / fused["rows"])
    if per_image:
        emit({"note": f"the baseline ran {before['rows']} rows, evidence.v1 {fused['rows']}: the speedup "
                      f"compares seconds per image"})
    emit({"vision_steps_speedup": round(speedup, 2)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(LINES, indent=1) + "\n")
    print(f"vision_steps_speedup: {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
