"""Benchmark: how the engine's cost grows from N to 4N shards of a fixed size, per step, driver apart from
the workers.

    python bench/scale.py [--shards 8] [--caption-shard-rows 1000] [--region-shard-rows 5000] [--smoke]

Two workloads run through the real runner (Ray, local, 2 CPUs), each at N and 4N shards, each size in its
own process (and so its own Ray job, with its own workers) so peak memories are that run's alone:

* captions: real captions (../shared/data/captions, CC3M + Flickr30k, replicated with unique ids) as
  a CC3M tsv -> parse -> vocab -> label -> export (workflow ``caption_labels``);
* regions: SIMULATED regions (``source.synthetic_regions.v1``: random float16 512-d embeddings, tag ids
  from a Zipf law over 4,585 tags, the evidence columns decide and report read) -> cluster -> decide
  -> report (workflow ``regions_simulated``). No image exists in this part.

The shard size stays fixed and the shard count grows, as a corpus does: what grows with the number of
shards (the driver's plans, stats and merges) shows in the driver's memory, and a worker, which holds
one shard at a time, should stay flat. Per step: wall seconds, the driver process's peak resident
memory while the step ran (sampled every 0.1 s), and the largest worker's peak RSS (each worker's
``getrusage`` peak at the end of each of its shards and calls, from the step's manifest; a Ray worker
that ran an earlier step's tasks carries that peak along). Not a test. The last lines are
``driver_rss_growth_4x: X.XX`` (the larger of the two workloads' driver peak RSS at 4N / at N, the
process's own ``getrusage`` peak), ``worker_rss_growth_4x: X.XX`` (the same for the largest worker) and
``time_ratio_4x: X.XX`` (total wall time of both workloads at 4N / at N; linear is 4.0). ``--smoke``:
shards of 50 rows, 1 and 4 of them; it checks the script (tests/test_bench_smoke.py), its figures mean
nothing.
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


def rss_kb() -> int:
    """This process's resident memory now (KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
input: {{images: {rows}, tags: 4585, dim: 512, shard_rows: {shard}, resources: {{pool_size: 2}}}}
cluster: {{fit_buckets: 16, resources: {{pool_size: 2}}}}
decide: {{resources: {{pool_size: 2}}}}
""",
}


def worker_peak_mb(step_dir: Path) -> float:
    """The largest worker peak RSS a step's manifest records: its shards' and its prepare calls'."""
    m = json.loads((step_dir / "_manifest.json").read_text())
    return max(m.get("worker_peak_rss_mb", 0.0), m.get("prepare_worker_peak_rss_mb", 0.0))


def child(kind: str, shards: int, shard_rows: int, work: Path) -> dict:
    """One run in this process: per-step seconds, peak driver RSS (sampled) and the largest worker's (MiB)."""
    from pipeline.config import load_run_config
    from pipeline.workflow import Runner

    work.mkdir(parents=True, exist_ok=True)
    rows = shards * shard_rows
    data = work / "captions.tsv"
    if kind == "captions":
        write_captions(data, rows)
    cfg_path = work / f"{kind}.yaml"
    cfg_path.write_text(CONFIGS[kind].format(data=data, rows=rows, shard=shard_rows))
    runner = Runner(load_run_config(cfg_path), work / "run")
    steps = [s.name for s in runner.cfg.steps]
    driver = {s: 0.0 for s in steps}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            cur = steps[min(len(runner.reports), len(steps) - 1)]
            driver[cur] = max(driver[cur], rss_kb() / 1024)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    base = rss_kb() / 1024
    t0 = time.perf_counter()
    t.start()
    reports = runner.run()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    per_step = {r.step: {"seconds": r.seconds, "rows": r.rows_out, "shards": r.extra.get("shards"),
                         "driver_mb": round(driver[r.step], 1),
                         "worker_mb": round(worker_peak_mb(runner.out_dir / r.step), 1)} for r in reports}
    return {"kind": kind, "shards": shards, "shard_rows": shard_rows, "rows": rows, "wall_s": round(wall, 2),
            "driver_base_mb": round(base, 1), "driver_peak_mb": round(peak_rss_mb(), 1),
            "worker_peak_mb": max(v["worker_mb"] for v in per_step.values()), "steps": per_step}


def run_sizes(kinds: list[tuple[str, int]], shards: int) -> list[dict]:
    """Each workload at ``shards`` and 4x ``shards``, each run in a fresh process (its own driver, and, as its
    own Ray job, its own workers) on one local Ray started here: the Ray start is paid once."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.executor import start_ray

    results = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        start_ray(RayConfig(num_cpus=2, progress=False), Path(tmp))
        address = ray.get_runtime_context().gcs_address
        try:
            for kind, shard_rows in kinds:
                for mult in (1, 4):
                    # the driver's and Ray's workers' imports; the child joins this Ray
                    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=address)
                    res = subprocess.run([sys.executable, __file__, "--child", kind, str(shards * mult),
                                          str(shard_rows), str(Path(tmp) / f"{kind}-{mult}")], env=env,
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        sys.exit(f"{kind} at {shards * mult} shards: failed\n{res.stderr[-4000:]}")
                    results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        finally:
            ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8, help="N: shards at the smaller size (4N at the larger)")
    ap.add_argument("--caption-shard-rows", type=int, default=1000, help="rows per shard, caption workload")
    ap.add_argument("--region-shard-rows", type=int, default=5000, help="images per shard, simulated regions")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "scale.json"))
    ap.add_argument("--smoke", action="store_true", help="shards of 50 rows, 1 and 4 of them: checks the script")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "SHARDS", "SHARD_ROWS", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), int(a.child[2]), Path(a.child[3]))))
        return
    if a.smoke:
        a.shards, a.caption_shard_rows, a.region_shard_rows = 1, 50, 50
    kinds = [("regions", a.region_shard_rows)]
    if (SHARED / "data" / "captions").is_dir():
        kinds.insert(0, ("captions", a.caption_shard_rows))
    else:
        print(f"(captions part skipped: {SHARED / 'data/captions'} not found)")
    results = run_sizes(kinds, a.shards)
    print("SIMULATION NOTE: the regions workload's embeddings are random (source.synthetic_regions.v1); "
          "nothing here measures tagging quality or GPU work.")
    print(f"{'workload':<9} {'shards':>6} {'rows':>7} {'step':<8} {'sec':>7} {'driver MB':>10} {'worker MB':>10}")
    for r in results:
        for s, v in r["steps"].items():
            print(f"{r['kind']:<9} {r['shards']:>6} {r['rows']:>7} {s:<8} {v['seconds']:>7.2f} {v['driver_mb']:>10.1f} "
                  f"{v['worker_mb']:>10.1f}")
        print(f"{r['kind']:<9} {r['shards']:>6} {r['rows']:>7} {'(peak)':<8} {r['wall_s']:>7.2f} "
              f"{r['driver_peak_mb']:>10.1f} {r['worker_peak_mb']:>10.1f}")
    by = {(r["kind"], r["shards"]): r for r in results}
    driver, worker, t1, t4 = [], [], 0.0, 0.0
    for kind, _ in kinds:
        small, big = by[(kind, a.shards)], by[(kind, 4 * a.shards)]
        driver.append(big["driver_peak_mb"] / small["driver_peak_mb"])
        worker.append(big["worker_peak_mb"] / small["worker_peak_mb"])
        t1 += small["wall_s"]
        t4 += big["wall_s"]
        print(f"{kind}: {a.shards} -> {4 * a.shards} shards of {small['shard_rows']} rows: driver peak "
              f"{small['driver_peak_mb']:.0f} -> {big['driver_peak_mb']:.0f} MB ({driver[-1]:.2f}x), largest worker "
              f"{small['worker_peak_mb']:.0f} -> {big['worker_peak_mb']:.0f} MB ({worker[-1]:.2f}x), time "
              f"{small['wall_s']:.1f} -> {big['wall_s']:.1f} s ({big['wall_s'] / small['wall_s']:.2f}x)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"simulated": "regions workload", "runs": results}, indent=1) + "\n")
    print(f"driver_rss_growth_4x: {max(driver):.2f}")
    print(f"worker_rss_growth_4x: {max(worker):.2f}")
    print(f"time_ratio_4x: {t4 / t1:.2f}")


if __name__ == "__main__":
    main()
