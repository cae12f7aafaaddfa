"""Benchmark: how the engine's cost grows from N to 4N rows, per step, driver apart from the workers.

    python bench/scale.py [--captions 8000] [--images 40000] [--out bench/out/scale.json]

Two workloads run through the real runner (Ray, local, 2 CPUs), each at N and 4N, each size in its own
process so peak memories are that run's alone:

* captions: real captions (../shared/data/captions, CC3M + Flickr30k, replicated with unique ids) as
  a CC3M tsv -> parse -> vocab -> label -> export (workflow ``caption_labels``);
* regions: SIMULATED regions (``source.synthetic_regions.v1``: random float16 512-d embeddings, tag ids
  from a Zipf law over 4,585 tags, the evidence columns decide and report read) -> cluster -> decide
  -> report (workflow ``regions_simulated``). No image exists in this part.

Per step: wall seconds, the driver process's peak resident memory while the step ran, and the largest
Ray worker's (sampled from /proc every 0.1 s). Not a test. The last lines are
``driver_rss_growth_4x: X.XX`` (the larger of the two workloads' peak driver RSS at 4N / at N) and
``time_ratio_4x: X.XX`` (total wall time of both workloads at 4N / at N; linear is 4.0).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))


def rss_kb(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_workers() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::"):
                out.append(int(d.name))
    return out


def write_captions(path: Path, n: int) -> None:
    """n caption<TAB>url lines from the real captions, replicated with unique urls."""
    caps = []
    with open(SHARED / "data/captions/cc3m_val.tsv", encoding="utf-8") as f:
        caps += [line.split("\t")[0] for line in f if "\t" in line]
    data = json.loads((SHARED / "data/captions/flickr30k_karpathy_test.json").read_text())
    caps += [c for item in data for c in item["captions"]]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"{caps[i % len(caps)]}\thttps://example.invalid/{i:08d}.jpg\n")


CONFIGS = {
    "captions": """workflow: caption_labels
seed: 0
ray: {{num_cpus: 2, progress: false}}
input: {{path: {data}, shard_rows: {shard}}}
parse: {{resources: {{pool_size: 2, batch_size: 512}}}}
vocab: {{min_count: 2}}
""",
    "regions": """workflow: regions_simulated
seed: 0
ray: {{num_cpus: 2, progress: false}}
input: {{images: {n}, tags: 4585, dim: 512, shard_rows: {shard}, resources: {{pool_size: 2}}}}
cluster: {{fit_buckets: 16, resources: {{pool_size: 2}}}}
decide: {{resources: {{pool_size: 2}}}}
""",
}


def child(kind: str, n: int, work: Path) -> dict:
    """One run in this process: per-step seconds, peak driver RSS and peak worker RSS (MB)."""
    from pipeline.config import load_run_config
    from pipeline.workflow import Runner

    work.mkdir(parents=True, exist_ok=True)
    data = work / "captions.tsv"
    if kind == "captions":
        write_captions(data, n)
    shard = max(500, n // 8)
    cfg_path = work / f"{kind}.yaml"
    cfg_path.write_text(CONFIGS[kind].format(data=data, n=n, shard=shard))
    runner = Runner(load_run_config(cfg_path), work / "run")
    steps = [s.name for s in runner.cfg.steps]
    peaks = {s: {"driver_mb": 0.0, "worker_mb": 0.0} for s in steps}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            cur = steps[min(len(runner.reports), len(steps) - 1)]
            p = peaks[cur]
            p["driver_mb"] = max(p["driver_mb"], rss_kb() / 1024)
            for pid in ray_workers():
                p["worker_mb"] = max(p["worker_mb"], rss_kb(pid) / 1024)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    base = rss_kb() / 1024
    t0 = time.perf_counter()
    t.start()
    reports = runner.run()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    return {"kind": kind, "n": n, "wall_s": round(wall, 2), "driver_base_mb": round(base, 1),
            "driver_peak_mb": round(max(p["driver_mb"] for p in peaks.values()), 1),
            "steps": {r.step: {"seconds": r.seconds, "rows": r.rows_out, **{k: round(v, 1) for k, v in
                                                                            peaks[r.step].items()}} for r in reports}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=8000, help="N for the caption workload")
    ap.add_argument("--images", type=int, default=40000, help="N (images) for the simulated region workload")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "scale.json"))
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), Path(a.child[2]))))
        return
    kinds = [("regions", a.images)]
    if (SHARED / "data" / "captions").is_dir():
        kinds.insert(0, ("captions", a.captions))
    else:
        print(f"(captions part skipped: {SHARED / 'data/captions'} not found)")
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for kind, n in kinds:
            for mult in (1, 4):
                env = dict(os.environ, PYTHONPATH=str(REPO))
                res = subprocess.run([sys.executable, __file__, "--child", kind, str(n * mult),
                                      str(Path(tmp) / f"{kind}-{mult}")], env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"{kind} at {n * mult}: failed\n{res.stderr[-4000:]}")
                results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("SIMULATION NOTE: the regions workload's embeddings are random (source.synthetic_regions.v1); "
          "nothing here measures tagging quality or GPU work.")
    print(f"{'workload':<9} {'rows':>7} {'step':<8} {'sec':>7} {'driver MB':>10} {'worker MB':>10}")
    for r in results:
        for s, v in r["steps"].items():
            print(f"{r['kind']:<9} {r['n']:>7} {s:<8} {v['seconds']:>7.2f} {v['driver_mb']:>10.1f} "
                  f"{v['worker_mb']:>10.1f}")
        print(f"{r['kind']:<9} {r['n']:>7} {'(all)':<8} {r['wall_s']:>7.2f} {r['driver_peak_mb']:>10.1f}")
    by = {(r["kind"], r["n"]): r for r in results}
    growth, t1, t4 = [], 0.0, 0.0
    for kind, n in kinds:
        small, big = by[(kind, n)], by[(kind, 4 * n)]
        growth.append(big["driver_peak_mb"] / small["driver_peak_mb"])
        t1 += small["wall_s"]
        t4 += big["wall_s"]
        print(f"{kind}: driver peak {small['driver_peak_mb']:.0f} -> {big['driver_peak_mb']:.0f} MB "
              f"({growth[-1]:.2f}x), time {small['wall_s']:.1f} -> {big['wall_s']:.1f} s "
              f"({big['wall_s'] / small['wall_s']:.2f}x)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"simulated": "regions workload", "runs": results}, indent=1) + "\n")
    print(f"driver_rss_growth_4x: {max(growth):.2f}")
    print(f"time_ratio_4x: {t4 / t1:.2f}")


if __name__ == "__main__":
    main()
