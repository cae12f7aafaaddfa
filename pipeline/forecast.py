"""``plan --sample N``: run the chain on a sample, then forecast each step for the whole input.

The sample is the same config run by the same runner in a scratch directory, with the source limited to
its first planned shards (about N rows: ``ceil(N / shard_rows)`` shards where the source has
``shard_rows``, else one): whole shards, so a worker's memory in the sample is what it will be in the run.
The whole input's rows are the source's planned shard count (its ``plan()`` on the driver, no row read)
times the sample's rows per shard. Each step is then scaled by its own model, and the output says which:

* source and map steps: shard work is linear in rows (the sample's seconds per row, the shards spread
  over the workers the plan found), plus the sample's fixed part (workers starting, setup, a prepare,
  finalize) taken as is; peak memory per worker as in the sample (one shard at a time); output linear;
* reduce steps with partials (vocab, report): partials as a map; the merge on the driver taken as fixed
  (it holds O(names) or O(tags), not rows); output fixed;
* steps that train (a config with ``epochs``; their cost is epochs x rows): the sample trains each for
  one epoch (``--sample-epochs``, never more than the run's), and the step is forecast as its fixed part
  (the sample's step time less its epochs: job start, evaluation, calibration) + the sample's time per
  epoch x the epochs the run would train x (the whole input's training images / the sample's). The
  epochs are resolved as the run resolves them: a retrain repeats its base's recipe under its own keys
  (``recipe_from``), so it trains its own ``epochs`` when its section sets them, else its base's. What
  the cheap sample gives up: the steps after a training step work on its tagger's candidates and
  regions, and a tagger trained one epoch on the sample is not the run's (each such step's forecast says
  so): its regions spread over most of the image, so a step that works crops at their native size costs
  more per row than in the run. Its warmup is cut to the share of the schedule it has in the run, so it
  at least leaves it;
* other whole-data reduces: linear in rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import RunConfig, Step
from pipeline.executor import peak_rss_mb
from pipeline.stage import StageContext
from pipeline.store import StepDir
from pipeline.workflow import Runner

# Epochs a training step runs in the sample (``--sample-epochs``): its cost is epochs x rows, and the time
# of one epoch is what the forecast scales (a sample training all of them cost a quarter of the main job).
SAMPLE_EPOCHS = 1


def trains(step: Step) -> bool:
    """A step whose cost is epochs x rows: its config has ``epochs`` (train, retrain)."""
    return "epochs" in type(step.config).model_fields


def sample_config(cfg: RunConfig, scratch: Path, epochs: int = SAMPLE_EPOCHS, rows_share: float = 1.0) -> RunConfig:
    """The run's config for its sample: the scratch directory as its run directory, and every training step
    at ``epochs`` epochs (no more than the run's), set as the step's own key, so a retrain (which repeats
    its base's recipe under its own keys) trains that many too whether or not its section sets them.

    Its learning-rate warmup keeps the share of the schedule it has in the run (``rows_share``: the
    sample's rows over the whole input's): a run's 50 warmup steps are 2% of its optimizer steps but
    would be all of a one-epoch sample's 28, and a tagger that never left its warmup scores every tag
    near its initial 0.5, proposes the most candidates an image may have, and makes every step after it
    (evidence above all) look several times dearer per row than in the run."""
    run = run_epochs(cfg)

    def short(s: Step) -> Step:
        e, r = min(epochs, run[s.name]["epochs"]), run[s.name]
        update = {"epochs": e}
        if r["warmup_steps"]:
            update["warmup_steps"] = max(1, round(r["warmup_steps"] * e / r["epochs"] * min(1.0, rows_share)))
        return dataclasses.replace(s, config=s.config.model_copy(update=update))

    return dataclasses.replace(cfg, out=str(scratch), steps=tuple(short(s) if trains(s) else s for s in cfg.steps))


def run_epochs(cfg: RunConfig) -> dict[str, dict]:
    """Per training step, what the run (not the sample) trains: ``{"epochs", "from", "cache_images"}``,
    ``from`` saying where the number comes from. A step with ``recipe_from`` (a retrain) repeats its base's
    recipe under the keys its own section sets, as it does when it runs (stages/training/retrain.py); its base is
    the training step before it that provides an artifact it needs (the tagger it starts from)."""
    recipes: dict[str, object] = {}
    out: dict[str, dict] = {}
    for i, step in enumerate(cfg.steps):
        if not trains(step):
            continue
        needs = set(step.stage_cls.needs) | set(step.stage_cls.optional_needs)
        base = next((s.name for s in reversed(cfg.steps[:i]) if s.name in recipes and set(s.stage_cls.provides) & needs),
                    None)
        own = "epochs" in step.config.model_fields_set
        if base is not None and hasattr(step.stage_cls, "recipe_from"):
            stage = step.stage_cls(step.config, StageContext(str(cfg.out or ""), step.name, cfg.seed))
            recipes[step.name] = stage.recipe_from(recipes[base].model_dump(mode="json"))  # type: ignore[attr-defined]
            src = f"{step.name}.epochs" if own else f"{base}'s recipe: {out[base]['from']}"
        else:
            recipes[step.name] = step.config
            src = f"{step.name}.epochs" if own else f"the default of {step.use}"
        r = recipes[step.name]
        out[step.name] = {"epochs": r.epochs, "from": src, "cache_images": bool(getattr(r, "cache_images", False)),  # type: ignore[attr-defined]
                          "warmup_steps": int(getattr(r, "warmup_steps", 0) or 0)}
    return out


class SampleRunner(Runner):
    """A runner whose source runs only its first planned shards (about ``rows`` rows)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, rows: int):
        super().__init__(cfg, out_dir)
        self.rows = rows
        self.source_shards: tuple[int, int] | None = None  # (shards taken, shards planned)
        self.driver_rss: dict[str, float] = {}

    def _source_specs(self, step: Step, stage) -> list[dict]:
        specs = stage.plan()
        per = getattr(step.config, "shard_rows", None)
        k = max(1, math.ceil(self.rows / per)) if isinstance(per, int) and per > 0 else 1
        self.source_shards = (min(k, len(specs)), len(specs))
        return specs[:k]

    def _run_step(self, step: Step, *args, **kwargs):
        report = super()._run_step(step, *args, **kwargs)
        self.driver_rss[step.name] = peak_rss_mb()  # the driver's peak so far: a reduce's merge shows here
        return report


def followers(plan_steps: list[dict], training: set[str]) -> dict[str, str]:
    """Each step (not itself training) whose rows or artifacts follow a training step, directly or through
    the steps between: step -> that training step (the first it reads that way, by name)."""
    out: dict[str, str] = {}
    for s in plan_steps:
        if s["step"] in training:
            continue
        src = next((u if u in training else out[u] for u in s.get("upstream", []) if u in training or u in out), None)
        if src is not None:
            out[s["step"]] = src
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _shard_stats(sdir: StepDir) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((sdir.path / "_stats").glob("part-*.json"))]


def _history(sdir: StepDir) -> list[dict]:
    try:
        hist = json.loads((sdir.path / "history.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [h for h in hist if isinstance(h, dict) and h.get("epoch", -1) >= 0 and "seconds" in h and "images" in h]


def _sharded(m: dict, stats: list[dict], scale: float, shards: tuple[int, int], workers: int, what: str) -> dict:
    """Shard work linear in rows, spread over ``workers``, plus the sample's fixed part as is."""
    s_shards, f_shards = shards
    work = sum(st["seconds"] for st in stats)
    per_shard = work / max(1, len(stats))
    fixed = max(0.0, m["seconds"] - per_shard * math.ceil(len(stats) / workers))
    rows = sum(st["rows_in"] for st in stats) or 1
    shard_scale = scale * s_shards / f_shards  # rows per shard, whole input over sample
    seconds = fixed + per_shard * shard_scale * math.ceil(f_shards / workers)
    return {"seconds": seconds, "fixed_seconds": fixed, "ms_per_row": 1000 * work / rows,
            "assumes": f"{what} linear in rows ({1000 * work / rows:.2f} ms/row in the sample), {f_shards} "
                       f"shard(s) over {workers} worker(s); plus {fixed:.1f}s fixed as in the sample (workers "
                       f"starting, setup, a prepare, merge or finalize)"}


def _training(m: dict, hist: list[dict], scale: float, run: dict | None) -> dict:
    """fixed + time per epoch x the run's epochs x (the whole input's training images / the sample's)."""
    loop = sum(h["seconds"] for h in hist)
    fixed = max(0.0, m["seconds"] - loop)
    n = len(hist)
    run = run or {"epochs": n, "from": "as many as the sample trained", "cache_images": False}
    per_epoch, images = loop / n, hist[-1]["images"]
    per_image = loop / max(1, sum(h["images"] for h in hist))
    train_f = images * scale
    seconds = fixed + per_epoch * run["epochs"] * scale
    pace = ("every epoch at the pace of the sample's first" + (
        ", which decodes every image (cache_images: later epochs read the cache and run faster, so this is high "
        "by up to the decoding's share)" if run["cache_images"] and n == 1 else ""))
    return {"seconds": seconds, "fixed_seconds": fixed, "ms_per_image_epoch": 1000 * per_image,
            "epochs": run["epochs"], "epochs_from": run["from"], "sample_epochs": n, "sample_epoch_seconds": per_epoch,
            "assumes": f"fixed + time per epoch x epochs x training images (whole input / sample): the sample "
                       f"trained {n} epoch(s) of {images:,} images, {per_epoch:.1f}s each "
                       f"({1000 * per_image:.2f} ms per image-epoch); the run trains {run['epochs']} epoch(s) "
                       f"({run['from']}) of {train_f:,.0f} images; {pace}; plus {fixed:.1f}s fixed as in the sample "
                       f"(job start, evaluation and calibration on the held-out images: these grow with the "
                       f"held-out images, up to eval_max_images, and evaluation runs once per epoch)"}


def forecast_step(step: dict, sdir: StepDir, scale: float, shards: tuple[int, int], driver_rss: float | None,
                  epochs: dict | None = None) -> dict:
    """One step's forecast for the whole input from its sample run (``step``: the plan's entry; ``epochs``:
    a training step's epochs in the run, ``run_epochs``)."""
    m = sdir.manifest() or {}
    stats = _shard_stats(sdir)
    out_bytes = _dir_bytes(sdir.path)
    kind, workers = step["kind"], max(1, step["concurrency"])
    hist = _history(sdir) if kind == "reduce" else []
    if kind in ("source", "map") and stats:
        f = _sharded(m, stats, scale, shards, workers, "shard work")
        f["bytes"], size = out_bytes * scale, "output linear in rows"
    elif kind == "reduce" and stats:
        f = _sharded(m, stats, scale, shards, workers, "partials")
        f["assumes"] += "; the merge holds O(names) or O(tags), so it is taken as fixed"
        f["bytes"], size = out_bytes, "output fixed (tables of tags or names, figures)"
    elif hist:
        f = _training(m, hist, scale, epochs)
        f["bytes"], size = out_bytes, "output fixed (weights, thresholds)"
    else:
        f = {"seconds": m.get("seconds", 0.0) * scale, "assumes": "linear in rows (a whole-data step on the driver)"}
        f["bytes"], size = out_bytes * scale, "output linear in rows"
    worker_rss = max([st.get("peak_rss_mb", 0.0) for st in stats] + [m.get("prepare_worker_peak_rss_mb", 0.0)])
    per_shard = scale * shards[0] / shards[1]
    if worker_rss:
        f["worker_peak_rss_mb"] = worker_rss * max(1.0, per_shard)
        mem = ("peak memory per worker as in the sample (one shard at a time, shards alike)" if per_shard <= 1.05
               else f"peak memory per worker x {per_shard:.2f} (the whole input's shards hold more rows; an upper "
                    f"bound: a worker's fixed part does not grow)")
    else:
        f["worker_peak_rss_mb"] = None
        mem = "no worker memory recorded (Ray Train workers and driver-side steps do not record it)"
    f["driver_peak_rss_mb"] = driver_rss
    f["assumes"] += f"; {mem}; {size}"
    return {"step": step["step"], "action": step["action"], "sample_seconds": m.get("seconds"),
            "sample_rows": m.get("rows_in"), "rows": round((m.get("rows_in") or 0) * scale), **f}


def sample_forecast(cfg: RunConfig, rows: int, plan: dict, keep: Path | None = None,
                    sample_epochs: int = SAMPLE_EPOCHS) -> dict:
    """Run the sample in a scratch directory (removed after, unless ``keep``), its training steps for
    ``sample_epochs`` epochs, and forecast every step."""
    from pipeline.errors import ConfigError

    if rows < 1:
        raise ConfigError(cfg.file, "--sample", f"expected a positive number of rows, got {rows}")
    if sample_epochs < 1:
        raise ConfigError(cfg.file, "--sample-epochs", f"expected a positive number of epochs, got {sample_epochs}")
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="plan-sample-"))
    source = plan["steps"][0] if plan.get("steps") else {}
    per = getattr(cfg.steps[0].config, "shard_rows", None)
    planned = source.get("shards") or 1
    taken = min(planned, max(1, math.ceil(rows / per))) if isinstance(per, int) and per > 0 else 1
    sample_cfg = sample_config(cfg, scratch, sample_epochs, rows_share=taken / planned)
    epochs = run_epochs(cfg)
    try:
        runner = SampleRunner(sample_cfg, scratch, rows)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the runner's own lines; stdout is the plan (maybe JSON)
            runner.run()
        wall = time.perf_counter() - t0
        taken, planned = runner.source_shards or (1, 1)
        first = StepDir(scratch / cfg.steps[0].name).manifest() or {}
        sample_rows = first.get("rows_out", 0) + first.get("rows_rejected", 0)
        total_rows = sample_rows / taken * planned
        scale = total_rows / max(1, sample_rows)
        steps = [forecast_step(s, StepDir(scratch / s["step"]), scale, (taken, planned), runner.driver_rss.get(s["step"]),
                               epochs.get(s["step"])) for s in plan["steps"] if (scratch / s["step"]).is_dir()]
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    by_name = {s["step"]: s for s in steps}
    for name, src in followers(plan["steps"], {s["step"] for s in steps if "sample_epochs" in s}).items():
        if name in by_name:
            t = by_name[src]
            by_name[name]["assumes"] += (
                f"; its input follows {src}'s tagger, which the sample trained for {t['sample_epochs']} of "
                f"{t['epochs']} epoch(s) on its own rows: the run's may propose more or fewer candidates per "
                f"image, and larger or smaller regions (a barely trained tagger's spread over most of the image), "
                f"and this step's work per row follows them")
    would_run = [s for s in steps if s["action"] != "skip"]
    return {"sample": {"rows": sample_rows, "shards": taken, "seconds": round(wall, 1), "asked": rows,
                       "epochs": {s["step"]: s["sample_epochs"] for s in steps if "sample_epochs" in s}},
            "input": {"shards": planned, "rows": round(total_rows),
                      "rows_from": f"{planned} planned shard(s) x {sample_rows / taken:,.0f} rows per shard in the "
                                   f"sample"},
            "steps": steps, "total_seconds": sum(s["seconds"] for s in steps),
            "would_run_seconds": sum(s["seconds"] for s in would_run)}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n}"


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_forecast(fc: dict) -> str:
    sm, inp = fc["sample"], fc["input"]
    lines = [f"forecast for the whole input: {inp['rows']:,} rows ({inp['rows_from']}), from a sample of "
             f"{sm['rows']:,} rows ({sm['shards']} shard(s), asked {sm['asked']:,}) that took {_duration(sm['seconds'])}"
             + (f"; it trained {', '.join(f'{k} {v} epoch(s)' for k, v in sm['epochs'].items())}, each forecast "
                f"for its epochs in the run" if sm.get("epochs") else ""),
             f"{'step':<10} {'rows':>10} {'sample':>8} {'time':>9} {'worker peak':>12} {'output':>10}"]
    for s in fc["steps"]:
        rss = "-" if s["worker_peak_rss_mb"] is None else f"{s['worker_peak_rss_mb']:,.0f} MiB"
        lines.append(f"{s['step']:<10} {s['rows']:>10,} {_duration(s['sample_seconds'] or 0):>8} "
                     f"{_duration(s['seconds']):>9} {rss:>12} {_size(s['bytes']):>10}")
    lines.append(f"total {_duration(fc['total_seconds'])}; the steps that would run: {_duration(fc['would_run_seconds'])}")
    lines.append("what each forecast assumes:")
    lines += [f"  {s['step']}: {s['assumes']}" for s in fc["steps"]]
    return "\n".join(lines)
