"""What a stage is: a typed config, a cheap constructor, ``setup()`` once per worker, and work.

Three kinds share this base:

* ``source``: ``plan()`` on the driver lists shard specs; ``read_shard(spec)`` makes rows.
* ``map``: ``__call__(batch) -> StageResult`` over row batches; runs on Ray (actors if it has a setup).
  A map step writes ``image_id`` and its declared ``outputs`` only (see ``pipeline/view.py``); it may
  define ``prepare(engine)`` (driver-side work before its shards, e.g. fitting centroids through calls
  that run in the workers) and ``shard_summary(table, shard)`` + ``merge_summaries(summaries)`` (a small
  per-shard summary merged on the driver, e.g. a quality score).
* ``reduce``: ``partial(table, shard)`` in the workers on each input shard, then ``merge(partials)`` on
  the driver: the driver holds merged summaries (O(tags) or O(names)), never rows. A reduce that needs
  everything in one place (training) defines ``run(rows) -> ReduceResult`` instead.

Stages never import Ray. They declare the columns and artifacts they read and write so a workflow can
be checked before anything runs; a worker reads only the declared ``inputs`` (and those of
``optional_inputs`` that exist).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.rejects import Reject
from common.rows import ParquetRows


class StageConfig(BaseModel):
    """Base for every stage's typed config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """How a step runs, apart from what it does (never part of the output fingerprint). A stage whose
    steps have more such keys (train: its Ray Train workers' CPUs, checkpoints, restarts) declares a
    subclass as its ``Resources``, so another step's block still rejects them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # keys the stage's config had before they moved here -> their names here: a config that still sets
    # one at the step's top level is told where it went
    moved_from_config: ClassVar[dict[str, str]] = {}
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # How many workers: what the cluster offers unless pinned (pipeline/executor.py ``plan_pool``)
    pool_size: int | None = Field(None, ge=1, description="a fixed pool of this many actors (or concurrent "
                                  "tasks); default: what the cluster offers when the step starts, its CPUs / "
                                  "num_cpus (a GPU step: its GPUs / num_gpus, one actor per GPU at 1)")
    min_pool_size: int | None = Field(None, ge=1, description="an autoscaling pool instead: at least this many "
                                      "actors (default 1 when only max_pool_size is set)")
    max_pool_size: int | None = Field(None, ge=1, description="an autoscaling pool instead: at most this many "
                                      "actors (default: what the cluster offers)")
    batch_size: int = Field(256, ge=1, description="rows per call inside a shard")
    decode_workers: int = Field(1, ge=1, description="vision steps: threads per worker (per GPU) decoding and "
                                "resizing images ahead of the model (1: in the worker's own thread)")

    @model_validator(mode="after")
    def _one_pool_kind(self) -> "Resources":
        autoscale = self.min_pool_size is not None or self.max_pool_size is not None
        if self.pool_size is not None and autoscale:
            raise ValueError(f"pool_size ({self.pool_size}) pins a fixed pool, min_pool_size/max_pool_size ask "
                             f"for an autoscaling one: expected one or the other, not both")
        lo, hi = self.min_pool_size, self.max_pool_size
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"expected min_pool_size <= max_pool_size, got {lo} > {hi}")
        return self


@dataclass
class StageContext:
    """What a stage may know about the run: where its artifacts live and the run seed."""

    run_dir: str
    step: str
    seed: int = 0
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact name -> step directory
    view: dict = field(default_factory=dict)  # the rows this step reads (pipeline.view.View.to_dict)
    # the run's ``ray:`` block (pipeline.config.RayConfig): the Ray a Ray Train job joins, and whether workers
    # run under Ray at all (what ``device: auto`` resolves to)
    ray: dict = field(default_factory=dict)

    def artifact(self, name: str) -> Path:
        return Path(self.artifacts[name])

    @property
    def step_dir(self) -> Path:
        return Path(self.run_dir) / self.step

    def rows(self):
        """The rows this step reads, as a :class:`pipeline.view.View` (column groups joined by shard)."""
        from pipeline.view import View

        return View.from_dict(self.run_dir, self.view)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "StageContext":
        return cls(**json.loads(s))


@dataclass
class StageResult:
    """Rows out, rejects, side tables written next to the rows (``name/part-NNNNN.parquet``) and side
    files (``files[ext]`` -> ``ext/part-NNNNN.ext``, e.g. a shard's JSONL; a shard's batches concatenate)."""

    table: pa.Table
    rejects: list[Reject] = field(default_factory=list)
    side: dict[str, pa.Table] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ReduceResult:
    """A reduce step's named output tables and files; ``stats`` lands in the manifest."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class Stage:
    kind: ClassVar[str] = "map"
    registry_name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    Resources: ClassVar[type[Resources]] = Resources  # what its steps' ``resources:`` block may set
    inputs: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # read when an earlier step wrote them
    outputs: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()  # artifacts read (written by an earlier reduce/source step)
    # artifacts read when an earlier step provides them (else the stage's config says where to look): a
    # provider, when there is one, enters this step's fingerprint like a need's
    optional_needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()  # artifacts this step's directory holds for later steps
    replaces_columns: ClassVar[bool] = False  # output rows hold only image_id + outputs
    # how this step runs (set by the runner on the driver and by the worker before setup; not its output)
    resources: Resources = Resources()

    def __init__(self, config: StageConfig, context: StageContext):
        self.config = config
        self.context = context

    def setup(self) -> None:
        """Load heavy things once per worker. Stages that override this run as an actor pool."""

    @classmethod
    def has_setup(cls) -> bool:
        return cls.setup is not Stage.setup

    # -- source ------------------------------------------------------------------------------
    def plan(self) -> list[dict]:
        raise NotImplementedError

    def read_shard(self, spec: dict) -> StageResult:
        raise NotImplementedError

    # -- map -----------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> StageResult:
        raise NotImplementedError

    def finalize(self, step_dir: Path) -> dict[str, Any]:
        """After every shard of a map step is committed (e.g. a JSON export). Returns manifest stats."""
        return {}

    def drives_ray(self) -> bool:
        """True when the stage submits Ray work itself from the driver (a Ray Train job): the runner then
        starts or joins the run's Ray (its ``ray:`` block) before the step, even with ``enabled: false``,
        which keeps only the shard workers in-process."""
        return False

    @classmethod
    def defines(cls, hook: str) -> bool:
        """True when the stage overrides an optional hook (``prepare``, ``partial``, ``shard_summary``)."""
        return getattr(cls, hook, None) is not getattr(Stage, hook, None)

    def prepare(self, engine) -> dict:
        """Map steps: driver-side work before the shards run (``engine``: pipeline.workflow.StepEngine)."""
        return {}

    def shard_summary(self, table: pa.Table, shard: int) -> Any:
        """Map steps: a small JSON-able summary of one output shard, merged by ``merge_summaries``."""
        return None

    def merge_summaries(self, summaries: list) -> dict[str, Any]:
        return {}

    # -- reduce --------------------------------------------------------------------------------
    def partial(self, table: pa.Table, shard: int) -> Any:
        """Reduce steps: the summary of one input shard (computed in a worker, stored as data: the types
        ``pipeline/partials.py`` encodes)."""
        raise NotImplementedError

    def merge(self, partials: Iterator[Any]) -> ReduceResult:
        """Reduce steps: merge the shards' partials (streamed from storage) on the driver."""
        raise NotImplementedError

    def run(self, rows: "RowSource") -> ReduceResult:
        raise NotImplementedError


class RowSource:
    """Read-only rows a whole-data reduce (``run``) consumes, shard by shard, only the columns asked for:
    Parquet files holding whole rows (:class:`common.rows.ParquetRows`), or a :class:`pipeline.view.View`."""

    def __init__(self, files: list[Path] | None = None, view=None):
        self.files = list(files or [])
        self.view = view
        self._files = ParquetRows(self.files)

    def iter_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        if self.view is None:
            yield from self._files.iter_tables(columns)
            return
        cols = list(columns) if columns is not None else None
        yield from self.view.iter_tables([c for c in cols if c in self.view.owners] if cols else None)

    def iter_tables_with_base(self, columns: Iterable[str]) -> Iterator[tuple[pa.Table, Path]]:
        """Shard tables with those of ``columns`` that exist, and the folder relative image paths resolve
        against (the step that wrote ``image_path``, else ``image``)."""
        if self.view is None:
            yield from self._files.iter_tables_with_base(columns)
            return
        owner = self.view.owners.get("image_path") or self.view.owners.get("image") or self.view.rows
        base = self.view.step_dir(owner)
        for t in self.view.iter_tables([c for c in columns if c in self.view.owners]):
            yield t, base

    def iter_refs(self, columns: Iterable[str], by_reference: str):
        """As :meth:`iter_tables_with_base`, and for column ``by_reference`` (when the rows have it) not its
        values but where they are: ``(table, base, (file, positions) or None)`` per shard."""
        if self.view is None:
            yield from self._files.iter_refs(columns, by_reference)
            return
        cols = [c for c in columns if c != by_reference]
        for i, (t, base) in zip(self.view.shards(), self.iter_tables_with_base(["image_id", *cols])):
            ref = self.view.locate(i, by_reference, t.column("image_id")) if by_reference in self.view.owners else None
            yield t, base, ref

    def num_rows(self) -> int:
        return self._files.num_rows() if self.view is None else self.view.num_rows()
