"""What a stage is: a typed config, a cheap constructor, ``setup()`` once per worker, and work.

Three kinds share this base:

* ``source``: ``plan()`` on the driver lists shard specs; ``read_shard(spec)`` makes rows.
* ``map``: ``__call__(batch) -> StageResult`` over row batches; runs on Ray (actors if it has a setup).
* ``reduce``: ``run(rows) -> ReduceResult`` over the whole dataset on the driver (vocabulary, clustering).

Stages never import Ray. They declare the columns and artifacts they read and write so a workflow can
be checked before anything runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import Reject


class StageConfig(BaseModel):
    """Base for every stage's typed config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """How a step runs, apart from what it does (never part of the output fingerprint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    pool_size: int = Field(1, ge=1, description="actors (or concurrent tasks) for this step")
    batch_size: int = Field(256, ge=1, description="rows per call inside a shard")


@dataclass
class StageContext:
    """What a stage may know about the run: where its artifacts live and the run seed."""

    run_dir: str
    step: str
    seed: int = 0
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact name -> step directory

    def artifact(self, name: str) -> Path:
        return Path(self.artifacts[name])

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
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()  # artifacts read (written by an earlier reduce/source step)
    provides: ClassVar[tuple[str, ...]] = ()  # artifacts this step's directory holds for later steps
    replaces_columns: ClassVar[bool] = False  # output rows hold only image_id + outputs

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

    # -- reduce --------------------------------------------------------------------------------
    def run(self, rows: "RowSource") -> ReduceResult:
        raise NotImplementedError


class RowSource:
    """Read-only view of the rows a reduce step consumes, shard by shard, only the columns asked for."""

    def __init__(self, files: list[Path]):
        self.files = files

    def iter_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        cols = list(columns) if columns is not None else None
        for f in self.files:
            yield pq.read_table(f, columns=cols)

    def num_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
