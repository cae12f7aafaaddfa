"""The one Ray Data adapter. Every source and map step runs through ``ShardWorker``.

A step's work is a list of shard tasks (input shard i -> output shard i). Ray Data maps them with
``map_batches``: as an ``ActorPoolStrategy`` pool when the stage has a ``setup()`` (heavy things load
once per actor), as plain tasks otherwise; ``resources`` maps onto ``num_cpus``/``num_gpus``/pool
size, and ``batch_size`` slices each shard into the batches the stage sees. Each worker commits its
shard atomically and returns only the shard's stats, so the driver never holds the data. With
``ray.enabled: false`` the same worker runs in-process (debugging, profiling).

How many workers (``plan_pool``): what the cluster offers when the step starts (its CPUs / the step's
``num_cpus``; a GPU step's GPUs / ``num_gpus``), never more than the step has shards, unless
``resources`` pins a ``pool_size`` or asks for an autoscaling pool (``min_pool_size``/``max_pool_size``).
An actor pool starts all its actors before its first shard and gives each one shard at a time, so a
step's shards spread over every node rather than queueing behind the first actor up. Each shard's stats
name the node and process that ran it. Shard i always comes from input shard i, so the pool's size and
placement never change what is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import resource
import sys
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline import partials, registry
from pipeline.config import RayConfig, Step
from pipeline.progress import RunLog, StepProgress
from pipeline.stage import Resources, StageContext, StageResult
from pipeline.store import StepDir, rejects_table, write_bytes_atomic, write_json_atomic

# test hooks: "kill_after:<step>:<n>" SIGKILLs the driver after n shards of a step, "kill_after:<step>.<method>:<n>"
# after n calls of a stage method a prepare() runs through the workers (e.g. cluster.sample_shard); in a worker's
# environment (set on one node of a test cluster), "stall:<step>:<dir>" makes each shard of the step it gets touch
# <dir>/<step>-<shard> and then wait until the process is killed (a node lost in the middle of a step)
FAULT_ENV = "PIPELINE_FAULT"


@dataclass(frozen=True)
class Pool:
    """The workers a step runs on: ``kind`` is ``actors`` (a stage with ``setup()``), ``tasks`` or
    ``in-process``; ``min_size == max_size`` is a fixed pool, else Ray Data autoscales between them.
    ``source`` says where the numbers came from (the config's key, or the cluster's resources)."""

    kind: str
    min_size: int
    max_size: int
    source: str

    def to_dict(self) -> dict:
        sizes = ({"size": self.max_size} if self.min_size == self.max_size
                 else {"min_size": self.min_size, "max_size": self.max_size})
        return {"kind": self.kind, **sizes, "from": self.source}

    def describe(self) -> str:
        n = str(self.max_size) if self.min_size == self.max_size else f"{self.min_size}-{self.max_size} (autoscaling)"
        return f"{n} {self.kind if self.kind != 'in-process' else 'worker, in-process'} ({self.source})"

    def strategy(self):
        import ray

        if self.kind == "tasks":
            return ray.data.TaskPoolStrategy(size=self.max_size)
        # one shard in flight per actor: a shard is a whole unit of work, and a queue of them on one actor
        # would keep it busy while others idle (and leave the step's tail on it)
        if self.min_size == self.max_size:
            return ray.data.ActorPoolStrategy(size=self.max_size, max_tasks_in_flight_per_actor=1)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size,
                                          max_tasks_in_flight_per_actor=1)


def cluster_capacity(res: Resources, totals: dict[str, float]) -> tuple[int, str]:
    """How many of a step's workers the cluster holds at once (``totals``: ``ray.cluster_resources()``),
    and why: the scarcest resource a worker reserves decides (GPUs for a GPU step, one actor per GPU at
    ``num_gpus: 1``); a worker that reserves nothing gets one per CPU. At least 1."""
    asks = [(name, per) for name, per in (("GPU", res.num_gpus), ("CPU", res.num_cpus)) if per > 0]
    if not asks:
        n = int(totals.get("CPU", 1))
        return max(1, n), f"cluster: {n} CPU, a worker reserves none: one per CPU"
    n, name, per = min((math.floor(totals.get(name, 0.0) / per + 1e-9), name, per) for name, per in asks)
    return max(1, n), f"cluster: {totals.get(name, 0.0):g} {name} / {per:g} per worker"


def plan_pool(res: Resources, tasks: int, actors: bool, enabled: bool = True,
              totals: dict[str, float] | None = None) -> Pool:
    """The pool for ``tasks`` shard tasks: the config's ``pool_size``, else its autoscaling bounds, else what
    the cluster (``totals``) offers; never more workers than tasks (each would only load its model)."""
    if not enabled:
        return Pool("in-process", 1, 1, "ray.enabled: false")
    kind = "actors" if actors else "tasks"

    def cap(n: int) -> int:
        return max(1, min(n, tasks))

    if res.pool_size is not None:
        return Pool(kind, cap(res.pool_size), cap(res.pool_size), "resources.pool_size")
    fits, why = cluster_capacity(res, totals or {})
    if res.min_pool_size is None and res.max_pool_size is None:
        return Pool(kind, cap(fits), cap(fits), why)
    hi = cap(res.max_pool_size or fits)
    lo = hi if kind == "tasks" else min(res.min_pool_size or 1, hi)  # a task pool has no minimum to keep
    return Pool(kind, lo, hi, "resources.min_pool_size/max_pool_size" + ("" if res.max_pool_size else f"; max {why}"))


def gpu_shortfall(step_name: str, res: Resources, totals: dict[str, float], joined: bool) -> str | None:
    """Why a step that reserves GPUs cannot start on a Ray this run started itself with fewer GPUs than one
    worker asks (None when it can, or when the run joined a cluster: an autoscaler may still add GPU
    nodes). Without it the pool waits ``pool_start_timeout_s`` for actors that never fit."""
    if joined or not res.num_gpus or totals.get("GPU", 0.0) >= res.num_gpus:
        return None
    return (f"step {step_name}: each worker reserves {res.num_gpus:g} GPU ({step_name}.resources.num_gpus) and the "
            f"local Ray this run started has {totals.get('GPU', 0.0):g}: run it on a GPU node (ray.address), or "
            f"set {step_name}.resources.num_gpus=0 with its device on cpu")


def step_pool(step: Step, tasks: int, ray_cfg: RayConfig, actors: bool | None = None) -> Pool:
    """:func:`plan_pool` for a step on the Ray the run started or joined (the cluster as it is now)."""
    actors = step.stage_cls.has_setup() if actors is None else actors
    totals = None
    if ray_cfg.enabled:
        import ray

        totals = ray.cluster_resources()
        joined = bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))
        why = gpu_shortfall(step.name, step.resources, totals, joined)
        if why is not None:
            raise RuntimeError(why)
    return plan_pool(step.resources, tasks, actors, ray_cfg.enabled,
                     totals if step.resources.pool_size is None else None)


def where_am_i() -> dict:
    """The node (Ray's node id) and process a shard runs in: each shard's stats carry it, and a step's
    manifest counts workers and shards per node from them. In-process without Ray: the host."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    else:
        node = f"local:{socket.gethostname()}"
    return {"node_id": node, "worker_pid": os.getpid()}


def _stall_hook(step: str, shard: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("stall:"):
        _, name, marker_dir = spec.split(":", 2)
        if name == step:
            (Path(marker_dir) / f"{step}-{shard:05d}").touch()
            while True:  # until this node is killed
                time.sleep(60)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB. A worker puts it in each shard's stats: the
    largest worker's memory is what must stay flat as a corpus grows, and only the worker knows it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 1024), 1)


class ShardWorker:
    """Builds the stage once (``setup()`` included unless ``setup`` is False) and processes shard tasks.

    A task is ``{"shard": i, "spec": {...}}``; ``spec["op"]`` says what to do with it:

    * ``shard`` (default): a source's ``read_shard(spec)`` or a map stage over input shard *i*; the shard is
      committed (rows, rejects, side tables and files, then its stats) and the stats come back;
    * ``partial``: a reduce stage's ``partial`` of input shard *i*, written to ``_partials/`` as data
      (``pipeline/partials.py``) and committed like a shard; its stats come back;
    * ``call``: ``stage.<method>(input shard i)`` or ``stage.<method>(arg)``; the (small) result comes back.
    """

    def __init__(self, use: str, config_json: str, context_json: str, step_dir: str, fingerprint: str,
                 batch_size: int, setup: bool = True, resources_json: str | None = None):
        cls = registry.get(use)
        self.context = StageContext.from_json(context_json)
        self.stage = cls(cls.Config.model_validate_json(config_json), self.context)
        if resources_json:
            self.stage.resources = cls.Resources.model_validate_json(resources_json)
        if setup:
            self.stage.setup()
        self.kind = cls.kind
        self.step = StepDir(step_dir)
        self.fingerprint = fingerprint
        self.batch_size = batch_size

    def read_input(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """Input shard ``shard`` with the stage's declared columns (``inputs`` + the optional ones present)."""
        view = self.context.rows()
        cls = type(self.stage)
        if columns is None:
            columns = [c for c in dict.fromkeys(("image_id", *cls.inputs, *cls.optional_inputs))
                       if c in view.owners]
        return view.read_shard(shard, columns)

    def _run_map(self, shard: int) -> tuple[int, StageResult]:
        table = self.read_input(shard)
        results = [self.stage(table.slice(o, self.batch_size)) for o in range(0, table.num_rows, self.batch_size)]
        if not results:  # an empty shard still goes through the stage so the schema is right
            results = [self.stage(table)]
        side_names = sorted({k for r in results for k in r.side})
        file_names = sorted({k for r in results for k in r.files})
        out = pa.concat_tables([r.table for r in results])
        keep = [c for c in dict.fromkeys(("image_id", *type(self.stage).outputs)) if c in out.column_names]
        merged = StageResult(
            out.select(keep),  # a map step writes the columns it makes; what it carries stays put
            [rej for r in results for rej in r.rejects],
            {n: pa.concat_tables([r.side[n] for r in results if n in r.side]) for n in side_names},
            {n: b"".join(r.files.get(n, b"") for r in results) for n in file_names},
        )
        return table.num_rows, merged

    def process(self, shard: int, spec: dict) -> dict:
        op = spec.get("op", "shard")
        if op == "call":
            fn = getattr(self.stage, spec["method"])
            return fn(spec["arg"]) if "arg" in spec else fn(self.read_input(shard, spec.get("columns")), shard)
        _stall_hook(self.context.step, shard)
        t0 = time.perf_counter()
        if op == "partial":
            table = self.read_input(shard)
            part = self.stage.partial(table, shard)
            write_bytes_atomic(partials.dumps(part), partials.partial_path(self.step.path, shard))
            stats = {"shard": shard, "fingerprint": self.fingerprint, "rows_in": table.num_rows,
                     "rows_out": table.num_rows, "rows_rejected": 0, "rejects_by_code": {},
                     "seconds": round(time.perf_counter() - t0, 4), "peak_rss_mb": peak_rss_mb(), **where_am_i()}
            write_json_atomic(stats, self.step.path / "_stats" / f"part-{shard:05d}.json")
            return stats
        if self.kind == "source":
            res = self.stage.read_shard(spec)
            rows_in = None
        else:
            rows_in, res = self._run_map(shard)
        row_rejects = sum(1 for r in res.rejects if r.level == "row")
        if rows_in is None:
            rows_in = res.table.num_rows + row_rejects
        if rows_in != res.table.num_rows + row_rejects:
            raise RuntimeError(
                f"{self.stage.registry_name}: shard {shard}: rows_in {rows_in} != rows_out "
                f"{res.table.num_rows} + rows_rejected {row_rejects} (a stage bug: rows must never vanish)"
            )
        codes: dict[str, int] = {}
        for r in res.rejects:
            codes[r.code] = codes.get(r.code, 0) + 1
        stats = {
            "shard": shard,
            "fingerprint": self.fingerprint,
            "rows_in": rows_in,
            "rows_out": res.table.num_rows,
            "rows_rejected": row_rejects,
            "rejects_by_code": dict(sorted(codes.items())),
            "seconds": round(time.perf_counter() - t0, 4),
            "peak_rss_mb": peak_rss_mb(),
            **where_am_i(),
        }
        if type(self.stage).defines("shard_summary"):
            stats["summary"] = self.stage.shard_summary(res.table, shard)
        self.step.commit_shard(shard, res.table, rejects_table(res.rejects, self.stage.registry_name),
                               res.side, stats, res.files)
        return stats

    def __call__(self, batch: dict) -> dict:
        out = [pickle.dumps((int(s), self.process(int(s), json.loads(sp)), peak_rss_mb()),
                            protocol=pickle.HIGHEST_PROTOCOL) for s, sp in zip(batch["shard"], batch["spec"])]
        return {"out": out}


def _task_fn(batch: dict, **kwargs) -> dict:
    return ShardWorker(**kwargs)(batch)


def ray_temp_dir(run_dir: Path) -> str:
    """Ray's temp dir lives under the run, unless the path is too long for its unix sockets."""
    cand = run_dir.resolve() / "_ray"
    if len(str(cand)) <= 48:
        return str(cand)
    return f"/tmp/ray-{hashlib.sha1(str(cand).encode()).hexdigest()[:10]}"


TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def start_ray(cfg: RayConfig, run_dir: Path) -> bool:
    """Start (or join) Ray. Returns True when this call started it, so the caller shuts it down."""
    if not sys.stderr.isatty():  # no bars to draw: Ray Data's INFO progress lines go to its log file only
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(log_to_driver=False, configure_logging=True, logging_level="ERROR")
    if address:
        ray.init(address=address, **common)
    else:
        # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and
        # a job waits several polls to start and to end, all of it idle; a local Ray's processes inherit
        # this process's environment, so a short poll here shortens every training job (a user's value wins)
        os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _temp_dir=ray_temp_dir(run_dir), **common)
    ctx = ray.data.DataContext.get_current()
    # the step's own bar (pipeline/progress.py) replaces Ray Data's per-operator bars, which would
    # interleave with it and count blocks rather than shards and rows
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return True


def _fault_hook(step: str) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("kill_after:"):
        _, name, n = spec.split(":")
        if name == step:
            return int(n)
    return None


def _worker_kwargs(step: Step, context: StageContext, step_dir: StepDir, fingerprint: str) -> dict:
    return dict(use=step.use, config_json=step.config.model_dump_json(), context_json=context.to_json(),
                step_dir=str(step_dir.path), fingerprint=fingerprint, batch_size=step.resources.batch_size,
                resources_json=step.resources.model_dump_json())


def run_shards(step: Step, context: StageContext, tasks: list[tuple[int, dict]], step_dir: StepDir,
               fingerprint: str, ray_cfg: RayConfig, what: str = "shard", log: RunLog | None = None,
               pool: Pool | None = None) -> list[dict]:
    """Run the shard tasks of one step on ``pool`` (default: :func:`step_pool`); returns their stats.
    Commits happen inside the workers."""
    if not tasks:
        return []
    kwargs = _worker_kwargs(step, context, step_dir, fingerprint)
    kill_after = _fault_hook(step.name)
    stats: list[dict] = []
    pool = pool or step_pool(step, len(tasks), ray_cfg)
    progress = StepProgress(step.name, len(tasks), what, live=_live(ray_cfg), log=log)
    try:
        for _, st, _ in _iter_results(step, tasks, kwargs, ray_cfg, pool):
            stats.append(st)
            progress.update(st["rows_out"])
            if kill_after is not None and len(stats) >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        progress.close()
    return stats


def run_calls(step: Step, context: StageContext, tasks: list[tuple[int, dict]], step_dir: StepDir,
              fingerprint: str, ray_cfg: RayConfig, log: RunLog | None = None) -> Iterator[tuple[int, object, float]]:
    """``(index, result, the worker's peak RSS in MiB)`` of each call task (``op: call``), in completion
    order; the stage is built without ``setup()`` (a call prepares what setup will load)."""
    kwargs = dict(_worker_kwargs(step, context, step_dir, fingerprint), setup=False)
    methods = {spec.get("method") for _, spec in tasks}
    method = methods.pop() if len(methods) == 1 else None
    kill_after = _fault_hook(f"{step.name}.{method}") if method else None
    progress = StepProgress(step.name, len(tasks), f"{method or 'call'} call", live=_live(ray_cfg), log=log)
    try:
        pool = step_pool(step, len(tasks), ray_cfg, actors=False)
        for n, item in enumerate(_iter_results(step, tasks, kwargs, ray_cfg, pool), start=1):
            progress.update()  # a call returns what its method returns: no rows to count
            if kill_after is not None and n >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item
    finally:
        progress.close()


def _live(ray_cfg: RayConfig) -> bool | None:
    """A live bar where stderr is a terminal (StepProgress decides), never where ``ray.progress`` is off."""
    return None if ray_cfg.progress else False


def _iter_results(step: Step, tasks: list[tuple[int, dict]], kwargs: dict, ray_cfg: RayConfig,
                  pool: Pool) -> Iterator[tuple[int, object, float]]:
    items = [{"shard": i, "spec": json.dumps(spec, sort_keys=True)} for i, spec in tasks]
    if not items:
        return
    if pool.kind == "in-process":
        worker = ShardWorker(**kwargs)
        for it in items:
            yield it["shard"], worker.process(it["shard"], json.loads(it["spec"])), peak_rss_mb()
        return
    import ray

    res = step.resources
    if pool.kind == "actors":  # every actor of the pool (its minimum) up before the first shard goes out
        ray.data.DataContext.get_current().wait_for_min_actors_s = ray_cfg.pool_start_timeout_s
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    common: dict = dict(batch_size=1, num_cpus=res.num_cpus, compute=pool.strategy())
    if res.num_gpus:  # tasks too: Ray hides the GPUs from a task that asks for none (cluster's faiss fits)
        common["num_gpus"] = res.num_gpus
    if pool.kind == "actors":
        ds = ds.map_batches(ShardWorker, fn_constructor_kwargs=kwargs, **common)
    else:
        ds = ds.map_batches(_task_fn, fn_kwargs=kwargs, **common)
    for row in ds.iter_rows():
        yield pickle.loads(row["out"])
