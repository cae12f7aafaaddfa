"""Benchmark: planning and reading a RAM training json far larger than memory would allow whole.

    python bench/readers.py [--gb 3.5] [--dir /tmp] [--out bench/out/readers.json] [--keep] [--smoke]

Writes a RAM-format json (``image_path, caption, union_label_id, parse_label_id``) of ``--gb`` GB from
the real captions in ../shared/data/captions (replicated with unique paths; label ids drawn from
4,585 tags), then times ``source.ram_json.v1``'s ``plan()`` over it (the streamed element index, one
pass), reads its first, middle and last shards, and measures the peak Python memory (tracemalloc)
and the process's peak RSS growth. ``json.loads`` of one 20,000-record block gives what loading the
whole file would hold per byte, for comparison. The last line is ``whole_load_vs_plan_peak: X``
(the memory a whole-file load would need over the plan's measured peak).
Not a test: the numbers vary with the machine and what else runs on it. ``--smoke``: a file of about 2 MB
from blocks of 1,000 records, in ranges of 100; it checks the script (tests/test_bench_smoke.py), its
figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))


def real_captions() -> list[str]:
    data = json.loads((SHARED / "data/captions/flickr30k_karpathy_test.json").read_text())
    caps = [c for item in data for c in item["captions"]]
    with open(SHARED / "data/captions/cc3m_val.tsv", encoding="utf-8") as f:
        caps += [line.split("\t")[0] for line in f]
    return caps


def block(caps: list[str], n: int, seed: int) -> bytes:
    """``n`` records, their paths marked ``@@`` where each copy of the block puts its own prefix."""
    rnd = random.Random(seed)
    recs = []
    for i in range(n):
        cs = [rnd.choice(caps) for _ in range(rnd.randint(1, 3))]
        per = [sorted(rnd.sample(range(4585), rnd.randint(1, 6))) for _ in cs]
        recs.append({"image_path": f"@@/{i:07d}.jpg", "caption": cs,
                     "union_label_id": sorted({t for p in per for t in p}), "parse_label_id": per})
    return ",\n".join(json.dumps(r) for r in recs).encode()


def write_file(path: Path, target: int, blk: bytes) -> int:
    copies = max(1, -(-target // len(blk)))
    with open(path, "wb") as f:
        f.write(b"[\n")
        for c in range(copies):
            f.write(blk.replace(b'"@@/', f'"part{c:05d}/'.encode()))
            f.write(b",\n" if c < copies - 1 else b"\n]\n")
    return copies


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--shard-rows", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "bench/out/readers.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--smoke", action="store_true", help="a ~2 MB file: checks the script")
    args = ap.parse_args()
    per_block = 20_000
    if args.smoke:
        args.gb, args.shard_rows, per_block = 0.002, 100, 1_000

    from pipeline.stage import StageContext
    from stages.readers.sources_json import RamJson

    caps = real_captions()
    blk = block(caps, per_block, seed=0)
    path = Path(args.dir) / f"ram_train_bench_{args.gb:g}gb.json"
    t0 = time.perf_counter()
    copies = write_file(path, int(args.gb * 1e9), blk)
    size = path.stat().st_size
    rows = copies * per_block
    print(f"wrote {path}: {size / 1e9:.2f} GB, {rows:,} records in {time.perf_counter() - t0:.1f}s", flush=True)

    # the whole-file baseline, on one block (small enough to load)
    tracemalloc.start()
    whole = json.loads(b"[" + blk + b"]")
    _, whole_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole_per_byte = whole_peak / len(blk)
    del whole

    stage = RamJson(RamJson.Config(path=str(path), image_dir="/data", shard_rows=args.shard_rows),
                    StageContext(args.dir, "input"))
    rss0 = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    specs = stage.plan()
    plan_s = time.perf_counter() - t0
    _, plan_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    plan_rss = rss_mb() - rss0
    print(f"plan: {len(specs):,} ranges in {plan_s:.1f}s = {size / 1e6 / plan_s:.0f} MB/s, "
          f"peak {plan_peak / 1e6:.1f} MB (tracemalloc; the specs themselves included), process peak RSS "
          f"{rss_mb():.0f} MB (grew {plan_rss:.1f} MB while planning)", flush=True)

    reads = []
    for i in (0, len(specs) // 2, len(specs) - 1):
        tracemalloc.start()
        t0 = time.perf_counter()
        res = stage.read_shard(specs[i])
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        reads.append({"shard": i, "rows": res.table.num_rows, "rejects": len(res.rejects), "seconds": round(dt, 3),
                      "peak_mb": round(peak / 1e6, 2)})
        print(f"read shard {i}: {res.table.num_rows} rows, {len(res.rejects)} rejects, {dt:.2f}s, "
              f"peak {peak / 1e6:.1f} MB", flush=True)
    expected_ranges = -(-rows // args.shard_rows)
    out = {"file_bytes": size, "records": rows, "ranges": len(specs), "expected_ranges": expected_ranges,
           "plan_seconds": round(plan_s, 2), "plan_mb_per_s": round(size / 1e6 / plan_s, 1),
           "plan_peak_mb": round(plan_peak / 1e6, 2), "plan_rss_growth_mb": round(plan_rss, 1),
           "process_peak_rss_mb": round(rss_mb(), 1), "reads": reads,
           "whole_file_json_load_bytes_per_file_byte": round(whole_per_byte, 2),
           "whole_file_json_load_estimate_gb": round(whole_per_byte * size / 1e9, 1)}
    print(f"a whole-file json.load holds {whole_per_byte:.1f} bytes per file byte: "
          f"~{whole_per_byte * size / 1e9:.0f} GB for this file", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if not args.keep:
        path.unlink()
    assert len(specs) == expected_ranges and all(r["rows"] for r in reads)
    print(f"whole_load_vs_plan_peak: {whole_per_byte * size / plan_peak:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
