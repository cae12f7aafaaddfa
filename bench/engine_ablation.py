"""Benchmark: the paper's data-engine ablation, on the SIMULATED scene world (a generated world: the only
kind of data with a truth to judge by and to train a ceiling on).

    python bench/engine_ablation.py [--seeds 0,1,2] [--config stages/clean.yaml] [--runs runs/ablation]
                                    [--set KEY=VALUE ...] [--out bench/out/engine_ablation.json] [--smoke]

Per seed, one run: the main job's chain up to ``decide`` and its report, then one retrain step per arm,
each the base's recipe from scratch (the paper's retraining; ``--set retrain.start=base`` compares
the main job's short fine-tune instead) on another label set, all judged on the same held-out images (by
hash, never trained on) against the world's truth. From scratch, arm a is the base tagger itself (the
same recipe on the same labels); with ``start: base`` it is trained like the others, so what a fine-tune
adds over the base (more epochs) is not taken for what the labels add:

    a   parse labels
    b   parse + what the engine adds (generation only, nothing removed)
    c   the full engine, the default (combined) rule: decide's cleaned labels
    c'  the paper's rule (score-threshold pseudo-labels, cluster and crop cleaning)
    d   the world's truth (the ceiling)

Prints each arm's truth mAP per seed and their means, and last ``engine_gap_closed: X.XX``: the mean over
the seeds of (c - a) / (d - a), the share of the parse-to-truth gap the engine closes. Writes the figures
to ``--out`` (JSON). ``--smoke``: a tiny world and one short epoch, in-process (Ray off, the local
training loop: the same steps; its figures mean nothing), for the test that keeps this benchmark from rotting. A run directory per seed
resumes like any run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = {"a": "parse", "b": "generated", "c": "cleaned", "c'": "paper", "d": "truth"}
DEFAULT = ["retrain.start=scratch", "retrain.epochs=null", "retrain.warmup_steps=null"]  # the base's own
# --smoke checks this script's code path, not Ray's (tests/test_ray_*.py do): in-process, the local loop
SMOKE = ["input.images=240", "input.shard_rows=120", "train.epochs=1", "evidence.resources.batch_size=64",
         "ray.enabled=false", "train.backend=local"]


def ablation_config(config: Path, seed: int, overrides: list[str], arms: tuple[str, ...] = tuple(ARMS)) -> dict:
    """The main job's run config as a chain of its own: its workflow up to its report (the workflow's retrain
    step is arm c), then a retrain step for each other arm, each with the retrain section's recipe."""
    from pipeline.config import apply_overrides, load_workflows

    raw = apply_overrides(yaml.safe_load(config.read_text()), overrides, str(config))
    wf = load_workflows()[raw.pop("workflow")]
    steps = {name: use for name, use in wf["steps"].items() if name != "export"}
    raw.pop("export", None)
    recipe = {k: v for k, v in (raw.get("retrain") or {}).items() if v is not None}  # null: the base's value
    for arm, labels in ARMS.items():
        if arm == "c" or arm not in arms or (arm == "a" and recipe.get("start") == "scratch"):
            continue
        steps["retrain_" + labels] = "retrain.ram.v1"
        raw["retrain_" + labels] = {**recipe, "labels": labels}
    raw["retrain"] = {**recipe, "labels": "cleaned"}
    raw.pop("rounds", None)
    return {**raw, "steps": steps, "seed": seed,
            "description": "SIMULATED data-engine ablation (bench/engine_ablation.py)"}


def run_seed(config: Path, seed: int, out: Path, overrides: list[str], arms: tuple[str, ...]) -> dict:
    from pipeline.cli import main as cli

    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "ablation.yaml"
    cfg.write_text(yaml.safe_dump(ablation_config(config, seed, overrides, arms), sort_keys=False))
    t0 = time.perf_counter()
    code = cli(["run", str(cfg), "--out", str(out)])
    if code not in (0, None):
        raise SystemExit(f"seed {seed}: the run failed ({code}); see {out}")
    step = {arm: "retrain" if arm == "c" else "retrain_" + labels for arm, labels in ARMS.items()}
    outcome = {arm: json.loads((out / name / "outcome.json").read_text()) for arm, name in step.items()
               if (out / name / "outcome.json").exists()}
    mAP = {arm: o["retrained_truth_mAP"] for arm, o in outcome.items()}
    mAP.setdefault("a", outcome["c"]["base_truth_mAP"])  # from scratch, arm a is the base tagger
    mAP = {arm: mAP[arm] for arm in ARMS if arm in mAP}
    a, c, d = mAP["a"], mAP["c"], mAP.get("d")
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "truth_mAP": mAP, "base_truth_mAP": outcome["c"]["base_truth_mAP"],
            "gap_closed": round((c - a) / (d - a), 4) if d is not None and d != a else None,
            "main_job_gain_points": report["model_outcome"]["gain_points"],
            "targets_met": report.get("targets", {}).get("met"), "label_f1": report["quality"]["final"]["f1"],
            "eval_images": outcome["c"]["eval_images"], "start": outcome["c"]["start"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--config", default=str(REPO / "stages" / "clean.yaml"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "ablation"), help="run directories, one per seed")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="a tiny world, one epoch: checks the code path only")
    ap.add_argument("--arms", default=",".join(ARMS), help="which arms to train (a, c and d give the gap closed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "engine_ablation.json"), help="the figures (JSON)")
    args = ap.parse_args(argv)
    own_start = any(o.startswith("retrain.start=") for o in args.overrides)  # then the config's retrain recipe
    overrides = ([] if own_start else DEFAULT) + (SMOKE if args.smoke else []) + args.overrides
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if not {"a", "c"} <= set(arms) or set(arms) - set(ARMS):
        ap.error(f"--arms: a subset of {', '.join(ARMS)} that holds a and c, got {args.arms!r}")
    print("SIMULATED data: the generated scene world (its truth judges every arm and is arm d's labels)", flush=True)
    results = []
    for seed in seeds:
        r = run_seed(Path(args.config), seed, Path(args.runs) / f"seed-{seed}", overrides, arms)
        results.append(r)
        print(f"seed {seed}: base {r['base_truth_mAP']:.4f}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in r["truth_mAP"].items()) +
              f"  gap closed {r['gap_closed']}  main job gain {r['main_job_gain_points']:+.2f}  "
              f"targets met {r['targets_met']}  ({r['seconds']:.0f} s)", flush=True)
    means = {k: round(statistics.fmean(r["truth_mAP"][k] for r in results), 4) for k in arms}
    closed = [r["gap_closed"] for r in results if r["gap_closed"] is not None]
    summary = {"simulated": True, "smoke": args.smoke, "seeds": seeds, "arms": {a: ARMS[a] for a in arms},
               "overrides": overrides, "runs": results,
               "mean_truth_mAP": means, "engine_gap_closed": round(statistics.fmean(closed), 4) if closed else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print("mean truth mAP: " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
    for arm, labels in ARMS.items():
        if arm in means:
            print(f"arm_{arm.replace(chr(39), '_prime')}_{labels}_truth_map: {means[arm]:.4f}")
    print(f"engine_gap_closed: {summary['engine_gap_closed']:.2f}" if closed else "engine_gap_closed: nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
