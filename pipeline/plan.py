"""``python -m pipeline plan CONFIG``: what a run would do, before it does it.

For each step: skip, run or resume, and why, by the runner's own rule (``Runner.plan_step`` computes the
fingerprint a run would compute); the reason is a diff of what the fingerprint hashed now against what the
step's manifest recorded (its config, seed, stage, code files, upstream fingerprints and input identity),
so it names the key (``decide.add_threshold: 0.4 -> 0.8``), the code file, or the upstream step that
re-runs and the change behind it. Then the workers each step would get on the run's Ray (a running
cluster's resources, or what a local Ray would start with), and with ``--sample N`` a forecast of each
step's time, memory and output for the whole input (``pipeline/forecast.py``).

Nothing here writes to the run directory: stages are built (a cheap constructor) but never set up or run.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import RayConfig, RunConfig, Step
from pipeline.contract import plan_views
from pipeline.store import StepDir
from pipeline.workflow import LAYOUT, Planned, Runner, code_version


@dataclass
class StepPlan:
    step: str
    use: str
    kind: str
    round: int
    action: str  # skip | run | resume | maybe (a later round: runs only if the round before gains enough)
    reasons: list[str]
    causes: list[str] = field(default_factory=list)  # the root changes (not "upstream re-runs"), for later steps
    fingerprint: str = ""
    shards: int | None = None
    workers: str = ""
    concurrency: int = 1  # shard workers at once (the forecast divides shard work by it)
    upstream: list[str] = field(default_factory=list)  # the steps whose rows or artifacts it reads


def _flatten(d: object, prefix: str) -> dict[str, object]:
    if isinstance(d, dict):
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out if d else {prefix: {}}
    return {prefix: d}


def config_changes(step: Step, stored: dict | None) -> list[tuple[str, str]]:
    """(reason, cause) for every config value that differs from the manifest's, by dotted key."""
    now = _flatten(step.config.model_dump(mode="json"), step.name)
    was = _flatten(stored or {}, step.name)
    out = []
    for key in sorted(set(now) | set(was)):
        a, b = was.get(key, "(unset)"), now.get(key, "(unset)")
        if a != b:
            out.append((f"config {key}: {a!r} -> {b!r}", f"{key} {a!r} -> {b!r}"))
    return out


def code_changes(planned: Planned, m: dict) -> list[tuple[str, str]]:
    """(reason, cause) for the code a step runs: the files of its import closure whose syntax tree changed."""
    step, now_version = planned.step, code_version(planned.step.stage_cls)
    if m.get("code_version") == now_version:
        return []
    module = f"{step.stage_cls.__module__.replace('.', '/')}.py"
    was_files = (m.get("fingerprinted") or {}).get("code_files")
    if was_files is None:  # a manifest from before per-file records
        return [(f"code: {module} or a module it imports changed ({m.get('code_version')} -> {now_version}; "
                 f"the manifest predates per-file records, so the file is not named)", f"{step.name}: code")]
    now_files = planned.fingerprinted()["code_files"]
    files = [f for f in sorted(set(now_files) | set(was_files)) if now_files.get(f) != was_files.get(f)]
    out = [(f"code {f} {'changed' if f in was_files and f in now_files else 'added' if f in now_files else 'gone'}",
            f"{step.name}: code {f}") for f in files]
    old_pkg, new_pkg = str(m.get("code_version", "")).split("+")[0], now_version.split("+")[0]
    if old_pkg != new_pkg:
        out.append((f"package version {old_pkg} -> {new_pkg}", f"{step.name}: package version"))
    return out or [(f"code version {m.get('code_version')} -> {now_version}", f"{step.name}: code")]


def why(planned: Planned, m: dict, plans: dict[str, StepPlan]) -> tuple[list[str], list[str]]:
    """(reasons, root causes) why a finished step's fingerprint no longer matches its manifest. A cause is
    a change made here (a key, a file, the seed), not "an upstream step re-runs": later steps name it."""
    step, own = planned.step, []
    if m.get("use") != step.use:
        own.append((f"stage {m.get('use')} -> {step.use}", f"{step.name}: stage {step.use}"))
    own += config_changes(step, m.get("config"))
    if m.get("seed") != planned.ctx.seed:
        own.append((f"seed {m.get('seed')} -> {planned.ctx.seed}", f"seed {m.get('seed')} -> {planned.ctx.seed}"))
    own += code_changes(planned, m)
    rec = m.get("fingerprinted") or {}
    if rec and rec.get("input") != planned.input_identity:
        own.append((f"input identity {rec.get('input')!r} -> {planned.input_identity!r} (files, device or "
                    f"precision)", f"{step.name}: input"))
    if rec and rec.get("layout") != LAYOUT:
        own.append((f"storage layout {rec.get('layout')} -> {LAYOUT}", f"layout {LAYOUT}"))
    stored_up = rec.get("upstream") or (m.get("input") or {}).get("upstream") or {}
    reasons, causes = [r for r, _ in own], list(dict.fromkeys(c for _, c in own))
    ups, inherited = [], []
    for u, fp in planned.upstream.items():
        if stored_up.get(u) != fp:
            ups.append(u)
            inherited += [c for c in (plans[u].causes if u in plans else []) if c not in causes + inherited]
    if ups:
        verb = "re-runs" if len(ups) == 1 else "re-run"
        reasons.append(f"upstream {', '.join(ups)} {verb}" + (f" (because of {'; '.join(inherited)})"
                                                              if inherited else ""))
        causes += inherited
    if not reasons:
        reasons.append("its fingerprint changed in a part this manifest does not record (input files, device "
                       "or precision)" if not rec else "its fingerprint changed (no recorded part differs)")
        causes = [f"{step.name}: unrecorded"]
    return reasons, causes


def decide(planned: Planned, root: Path, plans: dict[str, StepPlan]) -> StepPlan:
    step, sdir = planned.step, StepDir(root / planned.step.name)
    base = StepPlan(step.name, step.use, step.stage_cls.kind, step.round, "run", [], [], planned.fingerprint)
    m = sdir.manifest()
    if m is not None and m.get("fingerprint") == planned.fingerprint:
        base.action, base.reasons = "skip", ["its manifest matches (same config, code, seed and inputs)"]
        return base
    if m is not None:
        base.reasons, base.causes = why(planned, m, plans)
        return base
    done = sdir.done_shards(planned.fingerprint) if sdir.path.is_dir() else {}
    plan = sdir.plan() or {}
    if done:
        total = plan.get("shards") if plan.get("fingerprint") == planned.fingerprint else None
        base.action = "resume"
        base.reasons = [f"a run stopped in this step: {len(done)} of {total or '?'} shards are done under "
                        f"this fingerprint and are kept"]
    elif plan:
        base.reasons = ["a run started this step and stopped before a shard was done" +
                        ("" if plan.get("fingerprint") == planned.fingerprint else
                         " (under another fingerprint: its files are cleared)")]
    else:
        base.reasons = ["no output yet"]
    base.causes = [f"{step.name} has no output"]
    return base


def plan_steps(cfg: RunConfig, out_dir: Path) -> list[tuple[Planned, StepPlan]]:
    """Each step as the runner resolves it, with its action and reasons, in run order; later rounds as the
    runner would take them."""
    runner = Runner(cfg, out_dir)
    steps = list(cfg.steps)
    views = plan_views(steps, runner.out_dir)
    plans: dict[str, StepPlan] = {}
    out: list[tuple[Planned, StepPlan]] = []
    stop_after: tuple[int, str] | None = None  # (round, why) once a done round's report stops the rounds
    for i, step in enumerate(steps):
        planned = runner.plan_step(steps, views, i)
        p = decide(planned, runner.out_dir, plans)
        p.upstream = list(planned.upstream)
        if stop_after and step.round > stop_after[0]:
            p.action, p.reasons = "skip", [stop_after[1]]
        elif step.round > 1 and p.action != "skip" and not stop_after:
            p.action = "maybe"
            p.reasons.append(f"runs only if round {step.round - 1} gains >= {cfg.rounds.min_f1_gain_points} "
                             f"label F1 points")
        plans[step.name] = p
        out.append((planned, p))
        last_of_round = step.round and (i + 1 == len(steps) or steps[i + 1].round != step.round)
        if last_of_round and p.action == "skip" and not stop_after:
            gain = (StepDir(runner.out_dir / step.name).manifest() or {}).get("round_f1_gain_points")
            if gain is not None and gain < cfg.rounds.min_f1_gain_points:
                stop_after = (step.round, f"not run: round {step.round} gained {gain:+.2f} label F1 points "
                                          f"(< rounds.min_f1_gain_points {cfg.rounds.min_f1_gain_points})")
    return out


# -- workers -------------------------------------------------------------------------------------------
@dataclass
class Capacity:
    where: str
    cpus: float
    gpus: float
    in_process: bool = False  # ray.enabled: false: the driver runs every shard itself, one at a time


def ray_capacity(ray_cfg: RayConfig) -> Capacity:
    """What the run's Ray offers: the cluster it would join (its resources now), else a local Ray's start."""
    if not ray_cfg.enabled:
        return Capacity("no Ray (ray.enabled: false): every shard runs in the driver, one at a time", 1, 0, True)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    import ray

    if ray.is_initialized():
        res = ray.cluster_resources()
        return Capacity(f"the Ray this process is connected to ({len(ray.nodes())} node(s))",
                        res.get("CPU", 0), res.get("GPU", 0))
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            return Capacity(f"no Ray cluster answers at {address!r} ({str(e).splitlines()[0]}): a run would fail "
                            f"to start", 0, 0)
        try:
            res, nodes = ray.cluster_resources(), len([n for n in ray.nodes() if n.get("Alive")])
        finally:
            ray.shutdown()
        return Capacity(f"the running Ray cluster at {address!r} ({nodes} node(s), resources now)",
                        res.get("CPU", 0), res.get("GPU", 0))
    cpus = ray_cfg.num_cpus or os.cpu_count() or 1
    return Capacity(f"a local Ray (ray.address unset: a run starts one on this machine; ray.num_cpus "
                    f"{'unset: all cores' if ray_cfg.num_cpus is None else ray_cfg.num_cpus})", cpus, _local_gpus())


def _local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _fits(cap: Capacity, cpus: float, gpus: float) -> float:
    return min(cap.cpus // cpus if cpus else math.inf, cap.gpus // gpus if gpus else math.inf)


def shard_pool(step: Step, shards: int | None, cap: Capacity):
    """The pool a run would give the step: the runner's own rule (``pipeline/executor.plan_pool``) on this
    capacity, so ``plan`` and ``run`` size pools alike."""
    from pipeline.executor import plan_pool

    return plan_pool(step.resources, shards or 1, step.stage_cls.has_setup(), not cap.in_process,
                     {"CPU": cap.cpus, "GPU": cap.gpus})


def concurrency(step: Step, shards: int | None, cap: Capacity) -> int:
    """Shard workers that run at once: the pool's largest size, as many as fit now."""
    if cap.in_process:
        return 1
    r = step.resources
    return max(0, int(min(shard_pool(step, shards, cap).max_size, _fits(cap, r.num_cpus, r.num_gpus))))


def workers(planned: Planned, shards: int | None, cap: Capacity) -> str:
    step, cls = planned.step, planned.step.stage_cls
    r = step.resources
    each = f"{r.num_cpus:g} CPU" + (f" + {r.num_gpus:g} GPU" if r.num_gpus else "")
    if cls.kind == "reduce" and not cls.defines("partial"):
        if planned.stage.drives_ray():
            n = int(getattr(step.config, "workers", 1))
            per = float(getattr(r, "cpus_per_worker", r.num_cpus))
            fit = int(_fits(cap, per, 0))
            short = f"; only {fit} fit now" if fit < n else ""
            return f"a Ray Train job: {n} worker(s) x {per:g} CPU{short}; the driver merges and evaluates"
        return "on the driver (one process: it reads the rows itself)"
    n = concurrency(step, shards, cap)
    what = "actors (setup once each)" if cls.has_setup() else "tasks"
    if cap.in_process:
        text = "in the driver, one shard at a time"
    else:
        pool = shard_pool(step, shards, cap)
        short = f"; a pool of {pool.max_size}, only {n} fit now" if n < pool.max_size else ""
        size = f"{pool.min_size}-{n}" if pool.min_size < pool.max_size else f"{n}"
        text = f"{size} {what} x {each} ({pool.source}){short}"
        text = text.replace("1 actors", "1 actor").replace("1 tasks", "1 task")
    if cls.kind == "reduce":
        text = f"partials: {text}; merge on the driver"
    elif cls.defines("prepare"):
        text += "; its prepare runs calls as tasks first"
    return text


def source_shards(planned: Planned) -> int:
    """The shard count of a source step, from its own plan (the driver's planning only: no row is read)."""
    return len(planned.stage.plan())


def plan_run(cfg: RunConfig, out_dir: Path) -> dict:
    """The whole plan as data: Ray capacity, and per step the action, reasons, shards and workers."""
    cap = ray_capacity(cfg.ray)
    plans = plan_steps(cfg, out_dir)
    shards = None
    for planned, p in plans:
        if planned.step.stage_cls.kind == "source":
            shards = source_shards(planned)
        driver_only = planned.step.stage_cls.kind == "reduce" and not planned.step.stage_cls.defines("partial")
        p.shards = None if driver_only else shards
        p.workers = workers(planned, shards, cap)
        p.concurrency = 1 if driver_only else max(1, concurrency(planned.step, shards, cap))
    return {"config": str(Path(cfg.file).resolve()), "run_dir": str(Runner(cfg, out_dir).out_dir),
            "chain": cfg.chain, "seed": cfg.seed, "ray": asdict(cap), "steps": [asdict(p) for _, p in plans]}


def format_plan(plan: dict) -> str:
    ray = plan["ray"]
    lines = [f"plan {plan['config']} ({plan['chain']}, seed {plan['seed']}) -> {plan['run_dir']}",
             f"Ray: {ray['where']}: {ray['cpus']:g} CPUs, {ray['gpus']:g} GPUs", ""]
    width = max(len(s["step"]) for s in plan["steps"])
    for s in plan["steps"]:
        lines.append(f"{s['step']:<{width}}  {s['action']:<6}  {s['use']}")
        for r in s["reasons"]:
            lines.append(f"{'':<{width}}    {r}")
        shards = "" if s["shards"] is None else f"{s['shards']} shard(s); "
        lines.append(f"{'':<{width}}    workers: {shards}{s['workers']}")
    runs = [s["step"] for s in plan["steps"] if s["action"] in ("run", "resume", "maybe")]
    lines.append("")
    lines.append(f"{len(runs)} of {len(plan['steps'])} step(s) would run: {', '.join(runs)}" if runs else
                 "every step would be skipped: the run is current")
    return "\n".join(lines)
