"""Benchmark: training samples/s with 1 and 2 Ray Train workers on CPU (DDP over gloo), same export,
same run (the main job's CNN base tagger at 64 px, batch 32 per worker, images decoded every epoch);
and the train step's driver peak memory at N and 4N export rows.

    python bench/train.py [--images 960] [--epochs 3] [--rounds 2] [--rss-images 600] [--smoke]

Each worker reserves one CPU, so Ray gives it one intra-op thread: the ratio measures data
parallelism, not threads. Samples/s counts the epochs after the first (warm-up) from the workers' own
epoch wall time (startup, evaluation and checkpoints excluded). Rounds alternate 1 and 2 workers so
both see the same machine state. The last line is ``train_scaling_2_workers: X.XX``.

Driver memory: the whole train step (``stages/train.TrainStage.run``, ``backend: ray_train``, one
worker, one epoch) on exports of N and 4N rows in shards of 200, each in a fresh process whose peak
RSS (``getrusage``: the driver alone; Ray's own processes, started once by the benchmark, and the
worker are others) is the figure.
Flat (~1.0x) is the target: the driver streams the image_id column and holds the bounded evaluation
sample (64 rows here), never a row list.

``--smoke``: 64 images, 2 epochs, one round, driver memory at 40 and 160 rows; it checks the script
(tests/test_bench_smoke.py), its figures mean nothing.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Ray's workers import the engine from the driver's working directory, not from sys.path: this tree's
# code must be what they run wherever the script is started from.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def write_export(root: Path, images: int, shard_rows: int | None = None) -> tuple[list[Path], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    rows, truth = to_tables(world_images(0, 0, images, 64, NoiseRates(0, 0, 0)))
    (root / "images").mkdir(parents=True)
    classes = sorted({o["cls"] for t in truth.to_pylist() for o in t["objects"]})
    recs = []
    for r, t in zip(rows.to_pylist(), truth.to_pylist()):
        (root / "images" / f"{r['image_id']}.png").write_bytes(r["image_bytes"])
        labels = sorted({classes.index(o["cls"]) for o in t["objects"]})
        recs.append({"image_id": r["image_id"], "image_path": f"images/{r['image_id']}.png",
                     "caption": r["captions"], "union_label_id": labels, "parse_label_id": []})
    step = shard_rows or len(recs)
    files = [root / f"part-{i // step:05d}.parquet" for i in range(0, len(recs), step)]
    for f, i in zip(files, range(0, len(recs), step)):
        pq.write_table(pa.Table.from_pylist(recs[i:i + step]), f)
    return files, len(classes)


def fit(files, classes: int, workers: int, epochs: int, root: Path, name: str) -> dict:
    import torch

    from model.distributed import JobSpec, train_loop_per_worker
    from model.registry import create_model
    from model.train import TrainConfig
    from pipeline.trainer import TrainJob, run_torch_job
    from stages.training.holdout import held_out

    torch.manual_seed(0)
    args = {"num_classes": classes, "image_size": 64, "pool": "lse"}
    init = root / "init.pth"
    torch.save({"model": create_model("cnn_tagger_tiny", **args).state_dict()}, init)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, warmup_steps=10, loss="bce", hflip=True,
                      channels_last=True)
    spec = JobSpec("cnn_tagger_tiny", args, str(init), True, files, classes, asdict(cfg),
                   functools.partial(held_out, fraction=0.05), frozenset(), [], [str(i) for i in range(classes)])
    res = run_torch_job(train_loop_per_worker, {"spec": spec},
                        TrainJob(workers=workers, storage_path=str(root / "storage"), name=name))
    hist = res.return_value["history"][2:]  # epochs after the first
    return {"workers": workers, "samples_per_s": sum(h["images"] for h in hist) / sum(h["seconds"] for h in hist),
            "loss_last_epoch": hist[-1]["loss"], "steps": res.return_value["steps"]}


def driver_child(export: Path, classes: int, address: str) -> int:
    """In a fresh process joined to the benchmark's Ray at ``address``: the train step's driver side on
    ``export``; prints its peak RSS (the driver's own: Ray's processes are the parent's)."""
    import resource

    import pyarrow.parquet as pq
    import ray

    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig
    from tagset.tagset import Tag, TagSet

    root = export.parent
    vocab = root / f"vocab-{export.name}"
    vocab.mkdir(exist_ok=True)
    pq.write_table(TagSet([Tag(i, f"class{i}") for i in range(classes)]).to_table(), vocab / "tagset.parquet")
    files = sorted(export.glob("part-*.parquet"))
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    cfg = TrainStageConfig(model="cnn_tagger_tiny", model_args={"image_size": 64, "pool": "lse"}, text_encoder="none",
                           loss="bce", epochs=1, batch_size=32, lr=3e-3, warmup_steps=10, val_fraction=0.05,
                           eval_max_images=64, backend="ray_train", workers=1)
    res = TrainStage(cfg, StageContext(str(root / f"run-{export.name}"), "train", seed=0,
                                       artifacts={"tagset": str(vocab)})).run(RowSource(files))
    ray.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rows": res.stats["rows_in"], "shards": len(files), "train_images": res.stats["train_images"],
                      "steps": res.stats["steps"], "driver_peak_rss_mib": round(peak, 1)}))
    return 0


def driver_memory(root: Path, n: int) -> list[dict]:
    """The driver's peak RSS at ``n`` and ``4n`` export rows, each in its own process joined to this
    process's Ray (one Ray start for the whole benchmark)."""
    import subprocess

    import ray

    address = ray.get_runtime_context().gcs_address
    out = []
    for rows in (n, 4 * n):
        export = root / f"export-{rows}"
        _, classes = write_export(export, rows, shard_rows=200)
        p = subprocess.run([sys.executable, __file__, "--driver-child", str(export), "--classes", str(classes),
                            "--address", address],
                           capture_output=True, text=True, check=True)
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> int:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rss-images", type=int, default=600, help="N of the driver memory runs (N and 4N rows)")
    ap.add_argument("--out", default=str(REPO / "bench/out/train.json"))
    ap.add_argument("--driver-child", help=argparse.SUPPRESS)
    ap.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="64 images, 2 epochs, one round: checks the script")
    args = ap.parse_args()
    if args.smoke:  # two epochs: the first is the warm-up the rate leaves out
        args.images, args.epochs, args.rounds, args.rss_images = 64, 2, 1, 40
    if args.driver_child:
        return driver_child(Path(args.driver_child), args.classes, args.address)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from pipeline.config import RayConfig
        from pipeline.executor import start_ray

        # the runner's own local Ray (its Ray Train poll included: rates come from the workers' own epoch
        # times, so that changes no figure, only the idle wait around each job)
        start_ray(RayConfig(num_cpus=2, progress=False), root)
        memory = driver_memory(root, args.rss_images)
        files, classes = write_export(root / "export", args.images)
        runs = []
        for r in range(args.rounds):
            for w in (1, 2):
                runs.append(fit(files, classes, w, args.epochs, root, f"r{r}w{w}"))
                print(json.dumps(runs[-1]), flush=True)
        ray.shutdown()
    rate = {w: statistics.median(x["samples_per_s"] for x in runs if x["workers"] == w) for w in (1, 2)}
    rss_ratio = memory[1]["driver_peak_rss_mib"] / memory[0]["driver_peak_rss_mib"]
    out = {"images": args.images, "epochs": args.epochs, "runs": runs, "samples_per_s_1": rate[1],
           "samples_per_s_2": rate[2], "driver_memory": memory, "driver_peak_rss_4x_rows": rss_ratio,
           "train_scaling_2_workers": rate[2] / rate[1]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"driver peak RSS: {memory[0]['rows']} rows {memory[0]['driver_peak_rss_mib']:.0f} MiB, "
          f"{memory[1]['rows']} rows {memory[1]['driver_peak_rss_mib']:.0f} MiB")
    print(f"driver_peak_rss_4x_rows: {rss_ratio:.2f}")
    print(f"samples/s: 1 worker {rate[1]:.1f}, 2 workers {rate[2]:.1f}")
    print(f"train_scaling_2_workers: {rate[2] / rate[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
