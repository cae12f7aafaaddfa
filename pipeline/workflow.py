"""Plans and runs a workflow: contract check, fingerprints, skip / resume / force, manifests."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import __version__, partials
from pipeline.checks import check_counts, check_input, check_unique_ids, check_visible
from pipeline.config import RayConfig, RunConfig, Step
from pipeline.contract import check_contract, plan_views
from pipeline.errors import ContractError
from pipeline.executor import Pool, ray_temp_dir, run_calls, run_shards, start_ray, step_pool
from pipeline.fingerprint import code_files, code_hash
from pipeline.progress import LOG_FILE, RunLog
from pipeline.report import workers_used
from pipeline.stage import RowSource, StageContext
from pipeline.store import (StepDir, rejects_table, run_dir_path, write_bytes_atomic, write_json_atomic,
                            write_parquet_atomic)
from pipeline.shardstats import peak_rss, placement, sum_stats
from pipeline.view import View

# What a step directory holds and how steps read each other's (pipeline/view.py: column groups).
# Part of every fingerprint, so a run directory written in another layout is redone, never misread.
LAYOUT = "columns-v2"
# Beside the step directories: the chain of the run that last started, and its failure if it failed.
RUN_FILE = "_run.json"
ERROR_FILE = "_error.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version(cls: type) -> str:
    """Package version + a hash of the stage's module and every project module it imports (docstrings
    excluded; see pipeline/fingerprint.py): editing code a stage runs re-runs it, and nothing else does."""
    try:
        path = Path(inspect.getsourcefile(cls) or "")
        digest = code_hash(path) if path.is_file() else "nosrc"
    except (OSError, TypeError):
        digest = "nosrc"
    return f"{__version__}+{digest}"


@dataclass
class Planned:
    """A step before it runs: what ``Runner.plan_step`` resolved, and what its fingerprint hashed."""

    step: Step
    stage: object
    ctx: StageContext
    rows_step: str | None
    upstream: dict[str, str]  # the steps it reads (rows, artifacts) -> their fingerprints
    input_identity: str  # a reader's files (sizes, mtimes), a vision step's device and precision, ...
    fingerprint: str

    def fingerprinted(self) -> dict:
        """What the manifest records of the fingerprint's parts, beside the config and seed it already holds:
        enough for ``plan`` to say which file, upstream step or input changed (pipeline/plan.py)."""
        path = Path(inspect.getsourcefile(self.step.stage_cls) or "")
        return {"upstream": self.upstream, "input": self.input_identity, "layout": LAYOUT,
                "code_files": code_files(path) if path.is_file() else {}}


@dataclass
class StepReport:
    step: str
    use: str
    status: str  # ran | resumed | skipped
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class Runner:
    def __init__(self, cfg: RunConfig, out_dir: Path, force: bool = False, only: list[str] | None = None):
        # absolute: workers on other nodes (and Ray's own working directory) must find the same place
        self.cfg, self.out_dir, self.force = cfg, run_dir_path(out_dir), force
        names = [s.name for s in cfg.steps]
        for o in only or []:
            if o not in names:
                raise ContractError(f"--only {o}: no such step in {cfg.chain}; steps: {names}")
        self.only = set(only or names)
        self.fingerprints: dict[str, str] = {}
        self.reports: list[StepReport] = []
        self.current: Step | None = None  # the step running now: what a failure is recorded against
        self.local_ray = False
        self.log = RunLog(self.out_dir / LOG_FILE)

    # -- planning ----------------------------------------------------------------------------
    def _fingerprint(self, step: Step, upstream: list[str], extra: str = "") -> str:
        payload = {"code": code_version(step.stage_cls), "use": step.use, "config": step.config_hash(), "seed": self.cfg.seed,
                   "upstream": [self.fingerprints[u] for u in upstream], "input": extra, "layout": LAYOUT}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def plan_step(self, steps: list[Step], views: list[View], i: int) -> "Planned":
        """Step ``i`` as it would run now: its stage (built, not set up), context and fingerprint. Run and
        ``plan`` both call this, so ``plan`` says what a run would do by the run's own rule."""
        step = steps[i]
        rows_step = views[i].rows  # the step whose rows this one reads (a later round: from before round 1)
        ctx = StageContext(str(self.out_dir), step.name, self.cfg.seed, self._artifact_map(steps, i),
                           views[i].to_dict(), self.cfg.ray.model_dump(mode="json"))
        stage = step.stage_cls(step.config, ctx)
        # a driver-side stage (train) runs by them; a fingerprint may resolve by them (device: auto)
        stage.resources = step.resources
        read = set(step.stage_cls.needs) | set(step.stage_cls.optional_needs)
        upstream = sorted(set(([rows_step] if rows_step else []) + [
            s.name for s in steps[:i] if set(s.stage_cls.provides) & read]))
        extra = stage.input_fingerprint() if hasattr(stage, "input_fingerprint") else ""
        fp = self._fingerprint(step, upstream, extra)
        self.fingerprints[step.name] = fp
        return Planned(step, stage, ctx, rows_step, {u: self.fingerprints[u] for u in upstream}, extra, fp)

    def _source_specs(self, step: Step, stage) -> list[dict]:
        """A source step's shard specs (``plan``'s sample run takes the first few)."""
        return stage.plan()

    def _artifact_map(self, steps, upto: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in steps[:upto]:
            for a in s.stage_cls.provides:
                out[a] = str(self.out_dir / s.name)
        return out

    def _rounds_done(self, step: Step, steps) -> bool:
        """After a round's last step: whether the rounds stop here (the last round, or a round whose
        report says its label F1 gained less than ``rounds.min_f1_gain_points``)."""
        later = [s for s in steps if s.round > step.round]
        if not later:
            return False
        gain = (StepDir(self.out_dir / step.name).manifest() or {}).get("round_f1_gain_points")
        stop = gain is not None and gain < self.cfg.rounds.min_f1_gain_points
        if stop:
            line = (f"rounds: round {step.round} gained {gain:+.2f} label F1 points (< rounds.min_f1_gain_points "
                    f"{self.cfg.rounds.min_f1_gain_points}): no round {step.round + 1}")
            print(f"  {line}", flush=True)
            self.log.write(line)  # the run's log says why the rounds stopped, as the terminal did
        return stop

    def run(self) -> list[StepReport]:
        check_contract(self.cfg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = self._run_record()
        write_json_atomic(record, self.out_dir / RUN_FILE)
        self.log.write(self._log_header(record))
        try:
            self._run_steps()
        except (Exception, KeyboardInterrupt) as e:
            self._record_error(e)
            where = f"in step '{self.current.name}'" if self.current else "before any step"
            what = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
            self.log.write(f"FAILED {where}: {what} (traceback: {self.out_dir / ERROR_FILE})")
            raise
        self.log.write(f"run done: {len(self.reports)} step(s)")
        (self.out_dir / ERROR_FILE).unlink(missing_ok=True)  # the run went through: no failure stands
        return self.reports

    def _run_record(self) -> dict:
        """What ``status`` needs and a run directory does not otherwise hold: the order of the steps."""
        cfg = self.cfg
        only = [s.name for s in cfg.steps if s.name in self.only]
        return {"config": str(Path(cfg.file).resolve()), "name": cfg.name, "workflow": cfg.workflow,
                "description": cfg.description, "seed": cfg.seed, "force": self.force,
                "only": None if len(only) == len(cfg.steps) else only, "started_at": _now(),
                "steps": [{"name": s.name, "use": s.use} for s in cfg.steps]}

    def _log_header(self, record: dict) -> str:
        chain = f"workflow {record['workflow']}" if record["workflow"] else "its own steps"
        steps = ", ".join(s["name"] for s in record["steps"])
        flags = (f"; only {', '.join(record['only'])}" if record["only"] else "") + ("; force" if self.force else "")
        return f"=== run {record['config']} ({chain}): steps {steps}{flags}"

    def _log_result(self, r: StepReport) -> None:
        summary = f"; {r.extra['summary']}" if r.extra.get("summary") else ""
        self.log.write(f"[{r.step}] {r.status}: rows in {r.rows_in}, out {r.rows_out}, rejected {r.rows_rejected}, "
                       f"{r.seconds:.2f}s, workers: {workers_used(r.extra)}{summary}")

    def _record_error(self, e: BaseException) -> None:
        step = self.current
        record = {"step": step.name if step else None, "use": step.use if step else None,
                  "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "at": _now(),
                  "config": str(Path(self.cfg.file).resolve()),
                  # Ray's worker logs stay on disk only where this run started Ray itself
                  "ray_logs": str(Path(ray_temp_dir(self.out_dir)) / "session_latest" / "logs")
                  if self.local_ray else None}
        try:
            write_json_atomic(record, self.out_dir / ERROR_FILE)
        except OSError as w:  # never hide the run's own error behind the record's
            print(f"warning: could not record the error in {self.out_dir / ERROR_FILE}: {w}", file=sys.stderr)

    def _run_steps(self) -> None:
        steps = list(self.cfg.steps)
        views = plan_views(steps, self.out_dir)
        ray_started = False
        try:
            i = 0
            while i < len(steps):
                step = steps[i]
                self.current = step
                planned = self.plan_step(steps, views, i)
                stage, ctx, fp, rows_step = planned.stage, planned.ctx, planned.fingerprint, planned.rows_step
                sdir = StepDir(self.out_dir / step.name)
                if step.name not in self.only:
                    if not sdir.is_done(fp):
                        if not any(s.name in self.only for s in steps[i + 1:]):  # nothing asked for needs it
                            self.log.write(f"--only: left as they were, now stale: "
                                           f"{', '.join(s.name for s in steps[i:])} (run them too to bring them up "
                                           f"to date)")
                            break
                        raise ContractError(f"--only leaves out step '{step.name}', but its output is missing or "
                                            f"stale; run it too")
                    self.reports.append(self._skipped(step, sdir))
                elif sdir.is_done(fp) and not self.force:
                    self.reports.append(self._skipped(step, sdir))
                else:
                    self.log.write(f"[{step.name}] start ({step.use})")
                    shard_tasks = step.stage_cls.kind != "reduce" or step.stage_cls.defines("partial")
                    needs_ray = (shard_tasks and self.cfg.ray.enabled) or stage.drives_ray()
                    if needs_ray and not ray_started:
                        ray_started = start_ray(self.cfg.ray, self.out_dir)
                        self.local_ray = ray_started and not (self.cfg.ray.address or os.environ.get("RAY_ADDRESS"))
                    view_out = views[i].after(step.name, step.stage_cls.kind, step.stage_cls.outputs,
                                              step.stage_cls.replaces_columns)
                    self.reports.append(self._run_step(step, stage, ctx, sdir, fp, rows_step, view_out,
                                                       planned.fingerprinted()))
                self._log_result(self.reports[-1])
                last_of_round = step.round and (i + 1 == len(steps) or steps[i + 1].round != step.round)
                if last_of_round and self._rounds_done(step, steps):
                    steps = [s for s in steps if s.round <= step.round]
                    views = plan_views(steps, self.out_dir)
                i += 1
        finally:
            if ray_started:
                import ray

                ray.shutdown()

    def _skipped(self, step: Step, sdir: StepDir) -> StepReport:
        m = sdir.manifest() or {}
        return StepReport(step.name, step.use, "skipped", m.get("rows_in", 0), m.get("rows_out", 0),
                          m.get("rows_rejected", 0), 0.0,
                          {k: m[k] for k in ("workers", "ray_train_workers") if k in m})

    # -- running -----------------------------------------------------------------------------
    def _run_step(self, step: Step, stage, ctx: StageContext, sdir: StepDir, fp: str,
                  rows_step: str | None, view_out: View, fingerprinted: dict) -> StepReport:
        t0 = time.perf_counter()
        if self.force or sdir.manifest() is not None or sdir.holds_other_fingerprint(fp):
            sdir.reset()  # stale or forced: never mix shards, partials or side state of two fingerprints
        sdir.path.mkdir(parents=True, exist_ok=True)
        view_in = ctx.rows()
        if step.stage_cls.kind != "source":
            check_input(self.out_dir, step, view_in)
        if step.stage_cls.kind == "reduce":
            stats = self._run_reduce(step, stage, ctx, sdir, fp, view_in)
            status = "ran"
        else:
            specs = self._source_specs(step, stage) if step.stage_cls.kind == "source" else [{} for _ in view_in.shards()]
            shard_ids = list(range(len(specs))) if step.stage_cls.kind == "source" else view_in.shards()
            sdir.write_plan(fp, len(shard_ids))
            if step.stage_cls.kind == "map" and step.stage_cls.defines("prepare"):
                stats_prep = self._prepare(step, stage, ctx, sdir, fp)
            else:
                stats_prep = {}
            done = sdir.done_shards(fp)
            todo = [(i, spec) for i, spec in zip(shard_ids, specs) if i not in done]
            pool = self._pool(step, len(todo))
            new = run_shards(step, ctx, todo, sdir, fp, self.cfg.ray, log=self.log, pool=pool)
            check_visible(step, sdir, new, data=True)
            shard_stats = sorted([*done.values(), *new], key=lambda s: s["shard"])
            if step.stage_cls.kind == "map":
                check_counts(self.out_dir, step, view_in, shard_stats)
            stats = sum_stats(shard_stats)
            stats["shards"] = len(shard_stats)
            stats["shards_resumed"] = len(done)
            stats["pool"] = pool.to_dict() if pool else None
            stats.update(stats_prep)
            if step.stage_cls.kind == "source":
                stats.update(check_unique_ids(step, sdir, specs))
            if step.stage_cls.defines("shard_summary"):
                stats.update(stage.merge_summaries([s.get("summary") for s in shard_stats]))
            stats.update(stage.finalize(sdir.path))
            stats["view"] = view_out.to_dict()
            status = "resumed" if done else "ran"
        seconds = round(time.perf_counter() - t0, 3)
        manifest = {
            "step": step.name, "use": step.use, "fingerprint": fp, "code_version": code_version(step.stage_cls),
            "config_hash": step.config_hash(), "config": step.config.model_dump(mode="json"),
            "resources": step.resources.model_dump(mode="json"), "seed": self.cfg.seed,
            "input": {"rows_from": rows_step, "upstream": {k: self.fingerprints[k] for k in self.fingerprints
                                                           if k != step.name}},
            "fingerprinted": fingerprinted, "seconds": seconds, **stats,
        }
        if manifest["rows_in"] != manifest["rows_out"] + manifest["rows_rejected"]:
            raise RuntimeError(f"step {step.name}: rows_in != rows_out + rows_rejected: {stats}")
        write_json_atomic(manifest, sdir.manifest_path)
        extra = {k: v for k, v in stats.items() if k not in ("rows_in", "rows_out", "rows_rejected", "view")}
        return StepReport(step.name, step.use, status, stats["rows_in"], stats["rows_out"],
                          stats["rows_rejected"], seconds, extra)

    def _pool(self, step: Step, tasks: int) -> Pool | None:
        """The pool this invocation runs a step's ``tasks`` shard tasks on, said in run.log and kept in
        the manifest (None: every shard was already done)."""
        if not tasks:
            return None
        pool = step_pool(step, tasks, self.cfg.ray)
        self.log.write(f"[{step.name}] pool: {pool.describe()}, {tasks} shard task(s)")
        return pool

    def _prepare(self, step: Step, stage, ctx: StageContext, sdir: StepDir, fp: str) -> dict:
        """A map stage's driver-side preparation (e.g. fitting), once per fingerprint: a killed run that
        had finished it goes straight on with the shards."""
        marker = sdir.path / "_prepared.json"
        if marker.exists():
            got = json.loads(marker.read_text())
            if got.get("fingerprint") == fp:
                return got.get("stats", {})
        engine = StepEngine(self.cfg.ray, step, ctx, sdir, fp, self.log)
        stats = stage.prepare(engine) or {}
        if engine.peak_rss_mb:
            stats["prepare_worker_peak_rss_mb"] = engine.peak_rss_mb
        write_json_atomic({"fingerprint": fp, "stats": stats}, marker)
        return stats

    def _run_reduce(self, step: Step, stage, ctx: StageContext, sdir: StepDir, fp: str, view: View) -> dict:
        if step.stage_cls.defines("partial"):
            sdir.write_plan(fp, len(view.shards()))
            # a partial counts as done with its file (one from before partials were data has none: redone)
            done = {i: st for i, st in sdir.done_shards(fp).items() if partials.partial_path(sdir.path, i).exists()}
            todo = [(i, {"op": "partial"}) for i in view.shards() if i not in done]
            pool = self._pool(step, len(todo))
            new = run_shards(step, ctx, todo, sdir, fp, self.cfg.ray, what="partial", log=self.log, pool=pool)
            check_visible(step, sdir, new, data=False)
            shard_stats = sorted([*done.values(), *new], key=lambda s: s["shard"])
            check_counts(self.out_dir, step, view, shard_stats)

            def stream():  # one shard's summary in memory at a time, besides the merge
                for st in shard_stats:
                    yield partials.loads(partials.partial_path(sdir.path, st["shard"]).read_bytes())

            res = stage.merge(stream())
            rows = sum(st["rows_in"] for st in shard_stats)
            workers = {"worker_peak_rss_mb": peak_rss(shard_stats), "pool": pool.to_dict() if pool else None,
                       "workers": placement(shard_stats)}
        else:
            sdir.write_plan(fp, None)
            stage.setup()
            res = stage.run(RowSource(view=view))
            rows = view.num_rows() if view.rows else 0
            workers = {}
        for name, table in res.tables.items():
            write_parquet_atomic(table, sdir.path / f"{name}.parquet")
        for name, data in res.files.items():
            write_bytes_atomic(data, sdir.path / name)
        write_parquet_atomic(rejects_table(res.rejects, step.use), sdir.path / "rejects" / "part-00000.parquet")
        codes: dict[str, int] = {}
        for r in res.rejects:
            codes[r.code] = codes.get(r.code, 0) + 1
        # A reduce step consumes every row it is given; what it rejects is reported, not subtracted.
        return {"rows_in": rows, "rows_out": rows, "rows_rejected": 0, "rejects_by_code": codes, **workers,
                **res.stats}


class StepEngine:
    """What a map stage's ``prepare()`` may run in the workers: calls over its input shards and plain tasks.
    Results are small (counts, statistics); large results are written by the stage under ``step_dir``."""

    def __init__(self, ray_cfg: RayConfig, step: Step, ctx: StageContext, sdir: StepDir, fp: str,
                 log: RunLog | None = None):
        self._ray, self._step, self._ctx, self._sdir, self._fp = ray_cfg, step, ctx, sdir, fp
        self._log = log
        self.peak_rss_mb = 0.0  # the largest peak RSS (MiB) of a worker that ran one of these calls

    @property
    def step_dir(self) -> Path:
        return self._sdir.path

    def shards(self) -> list[int]:
        return self._ctx.rows().shards()

    def over_shards(self, method: str, columns: list[str]):
        """``(shard, stage.<method>(input shard, shard))`` for every input shard, in completion order."""
        tasks = [(i, {"op": "call", "method": method, "columns": list(columns)}) for i in self.shards()]
        return self._results(run_calls(self._step, self._ctx, tasks, self._sdir, self._fp, self._ray, self._log))

    def tasks(self, method: str, args: list):
        """``(k, stage.<method>(args[k]))`` for every argument (JSON-able), in completion order."""
        tasks = [(k, {"op": "call", "method": method, "arg": a}) for k, a in enumerate(args)]
        return self._results(run_calls(self._step, self._ctx, tasks, self._sdir, self._fp, self._ray, self._log))

    def _results(self, calls):
        for k, result, rss in calls:
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            yield k, result
