"""Benchmark: captions/s of the parse stage vs stock sng_parser, spaCy's nlp.pipe ceiling, Ray scaling.

    python bench/parse.py [--captions 6000] [--stock 800] [--rounds 3] [--out bench/out/parse.json] [--smoke]

All rates are measured in this run on the same real captions (COCO-style Flickr30k + CC3M from
../shared/data/captions). Not a test: numbers go to stdout and a JSON file; the last lines are
``parse_speedup_vs_stock_sng: X.XX`` and ``stage_vs_pipe_ceiling: X.XX`` (the parse step per core over
spaCy's ``nlp.pipe`` alone). ``--smoke`` runs the same code on 100 captions in 2 shards: it checks the
script (tests/test_bench_smoke.py), its figures mean nothing.
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
# Ray's workers import the engine from the driver's working directory, not from sys.path: this tree's
# code must be what they run wherever the script is started from.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))


def real_captions(n: int) -> list[str]:
    caps: list[str] = []
    data = json.loads((SHARED / "data/captions/flickr30k_karpathy_test.json").read_text())
    flickr = [c for item in data for c in item["captions"]]
    with open(SHARED / "data/captions/cc3m_val.tsv", encoding="utf-8") as f:
        cc3m = [line.split("\t")[0] for line in f]
    for a, b in zip(flickr, cc3m):  # interleave the two voices
        caps += [a, b]
    return caps[:n]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_stock(caps: list[str]) -> float:
    from tagset.sng import DEFAULT_MODEL, stock_backend_class

    stock = stock_backend_class()(model=DEFAULT_MODEL)
    stock.parse("warm up.")
    t0 = time.perf_counter()
    for c in caps:
        stock.parse(c)
    return rate(len(caps), time.perf_counter() - t0)


def bench_pipe(caps: list[str]) -> float:
    from tagset.sng import load_spacy

    nlp = load_spacy()
    list(nlp.pipe(caps[:64]))
    t0 = time.perf_counter()
    for _ in nlp.pipe(caps, batch_size=256):
        pass
    return rate(len(caps), time.perf_counter() - t0)


def rows_table(caps: list[str], per_row: int = 5):
    import pyarrow as pa

    from stages.columns import ROWS_SCHEMA

    rows = [{"image_id": f"b{i:06d}", "image": "x.jpg", "image_bytes": None, "captions": caps[i:i + per_row]}
            for i in range(0, len(caps), per_row)]
    return pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)


def bench_stage(caps: list[str]) -> float:
    from pipeline.stage import StageContext
    from stages.text.parse import ParseConfig, ParseStage

    stage = ParseStage(ParseConfig(), StageContext("/tmp", "parse"))
    stage.setup()
    table = rows_table(caps)
    stage(table.slice(0, 20))
    t0 = time.perf_counter()
    for o in range(0, table.num_rows, 512):
        stage(table.slice(o, 512))
    return rate(len(caps), time.perf_counter() - t0)


def bench_ray(caps: list[str], workers: int, tmp: Path, shards: int) -> dict:
    """The parse step through the engine's runner code (``run_shards``) over a run directory whose
    ``input`` step holds the rows: a map step reads its input as a view over earlier steps' shards
    (pipeline/view.py), so the input is laid out the way a source step would leave it."""
    from pipeline.config import RayConfig, Step
    from pipeline.executor import run_shards
    from pipeline.stage import Resources, StageContext
    from pipeline.store import StepDir, write_parquet_atomic
    from pipeline.view import View, shard_file
    from stages.text.parse import ParseConfig, ParseStage

    table = rows_table(caps)
    run = tmp / f"run{workers}"
    per = -(-table.num_rows // shards)
    for i in range(shards):
        write_parquet_atomic(table.slice(i * per, per), shard_file(run / "input", i))
    view = View(str(run)).after("input", "source", table.column_names)
    step = Step("parse", ParseStage, ParseConfig(), Resources(pool_size=workers, batch_size=512))
    sdir = StepDir(run / "parse")
    sdir.reset()
    t0 = time.perf_counter()
    stats = run_shards(step, StageContext(str(run), "parse", view=view.to_dict()),
                       [(i, {}) for i in view.shards()], sdir, f"bench{workers}", RayConfig(progress=False))
    wall = time.perf_counter() - t0
    work = sum(s["seconds"] for s in stats)
    return {"workers": workers, "wall_s": round(wall, 2), "captions_per_s_wall": round(rate(len(caps), wall), 1),
            "captions_per_s_in_shards": round(rate(len(caps), work / workers), 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=6000)
    ap.add_argument("--stock", type=int, default=800, help="captions for the (slow) stock baseline")
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="alternating nlp.pipe / stage rounds (median pair)")
    ap.add_argument("--out", default=str(REPO / "bench/out/parse.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny input (100 captions, 2 shards): checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.captions, args.stock, args.shards, args.rounds = 100, 20, 2, 1
    if not (SHARED / "data/captions").is_dir():
        print(f"bench/parse.py needs real captions in {SHARED}/data/captions (set RAM_SHARED_DIR)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    caps = real_captions(args.captions)
    res: dict = {"captions": len(caps), "cpu_count": os.cpu_count()}
    res["stock_sng_per_core"] = round(bench_stock(caps[: args.stock]), 1)
    # the ceiling's two rates, alternated over rounds so both see the same machine state; the median
    # round's pair is reported (one pass each swung the ratio by 0.15 on a 2-core machine)
    pairs = sorted(((bench_pipe(caps), bench_stage(caps)) for _ in range(args.rounds)), key=lambda p: p[1] / p[0])
    pipe, stage = pairs[len(pairs) // 2]
    res["ceiling_rounds"] = [round(s / p, 3) for p, s in pairs]
    res["nlp_pipe_per_core"] = round(pipe, 1)
    res["parse_stage_per_core"] = round(stage, 1)
    import ray

    from pipeline.executor import start_ray

    with tempfile.TemporaryDirectory(prefix="bench-parse-", dir="/tmp") as tmp:
        start_ray(RayConfigLocal(), Path(tmp))
        r1 = bench_ray(caps, 1, Path(tmp), args.shards)
        r2 = bench_ray(caps, 2, Path(tmp), args.shards)
        ray.shutdown()
    res["ray_1_worker"], res["ray_2_workers"] = r1, r2
    res["ray_scaling_efficiency_wall"] = round(r2["captions_per_s_wall"] / (2 * r1["captions_per_s_wall"]), 3)
    res["ray_scaling_efficiency_in_shards"] = round(
        r2["captions_per_s_in_shards"] / (2 * r1["captions_per_s_in_shards"]), 3)
    ratios = {"parse_speedup_vs_stock_sng": res["parse_stage_per_core"] / res["stock_sng_per_core"],
              "stage_vs_pipe_ceiling": res["parse_stage_per_core"] / res["nlp_pipe_per_core"]}
    res.update({k: round(v, 3) for k, v in ratios.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res.items():
        if k not in ratios:
            print(f"{k}: {v}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    return 0


def RayConfigLocal():
    from pipeline.config import RayConfig

    return RayConfig(num_cpus=2, progress=False)


if __name__ == "__main__":
    raise SystemExit(main())
