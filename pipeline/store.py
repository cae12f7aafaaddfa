"""The Parquet store: deterministic shard names, atomic commits, per-shard done markers, manifests.

Layout of one step's directory::

    <run>/<step>/part-00000.parquet        rows (shard i of the step)
    <run>/<step>/rejects/part-00000.parquet
    <run>/<step>/<side>/part-00000.parquet side tables (e.g. the scene world's truth)
    <run>/<step>/_plan.json                written before the shards run: how many there are
    <run>/<step>/_stats/part-00000.json    written last: the shard is done
    <run>/<step>/_manifest.json            written last of all: the step is done

and beside the steps ``<run>/_run.json`` (the chain and config of the run that last started) and
``<run>/_error.json`` (the last failure, cleared by a run that succeeds), which ``status`` reads.

A shard counts as done only when its stats file exists and carries the step's fingerprint, so a
killed run resumes shard by shard, and a changed config never mixes with old shards. Whatever else a
step keeps in its directory (partials, samples, fits, checkpoints) is cleared with it when the plan or a
shard names another fingerprint (``holds_other_fingerprint``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.files import temp_path
from common.rejects import Reject

REJECTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("stage", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("level", pa.string()),
        ("caption_index", pa.int32()),
        ("payload", pa.string()),
    ]
)


def run_dir_path(where: str | Path, file: str = "--out") -> Path:
    """The run directory as an absolute local path; a ``file://`` URI is one. Object-store URIs are not a
    run directory yet: every step commits by atomic rename and reads by glob, so give a mount of the
    bucket (s3fs, gcsfuse, a POSIX gateway) that every node shares."""
    from urllib.parse import unquote, urlparse

    from pipeline.errors import ConfigError

    s = str(where)
    if "://" in s:
        u = urlparse(s)
        if u.scheme != "file":
            raise ConfigError(file, "out", f"run directory {s!r}: only local paths and file:// URIs are supported; "
                              f"mount the object store on every node and give the mount's path")
        s = unquote(u.path)
    return Path(s).expanduser().resolve()


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def rejects_table(rejects: list[Reject], stage: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in REJECTS_SCHEMA.names}
    for r in rejects:
        cols["image_id"].append(r.image_id)
        cols["stage"].append(stage)
        cols["code"].append(r.code)
        cols["reason"].append(r.reason)
        cols["level"].append(r.level)
        cols["caption_index"].append(r.caption_index)
        cols["payload"].append(r.payload)
    return pa.table(cols, schema=REJECTS_SCHEMA)


# Row groups hold at most about this many bytes (in memory, the table's own measure): a reader that needs
# a few rows of a column (the report's contact sheet, the trainer's ByteReader) reads the groups that hold
# them, not the whole shard. A shard under it (every caption or evidence shard of the scene world) is one
# group, as before.
ROW_GROUP_BYTES = 16 << 20


def row_group_rows(table: pa.Table, limit: int = ROW_GROUP_BYTES) -> int | None:
    """Rows per row group for ``table``: None (Parquet's default, one group here) when it is under
    ``limit``, else as many rows as fit in ``limit`` at the table's mean row size (at least one)."""
    if table.num_rows == 0 or table.nbytes <= limit:
        return None
    return max(1, table.num_rows * limit // table.nbytes)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows(table))
    os.replace(tmp, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


class StepDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "_manifest.json"

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    @property
    def plan_path(self) -> Path:
        return self.path / "_plan.json"

    def write_plan(self, fingerprint: str, shards: int | None) -> None:
        """The shard count a step will commit (None: it runs on the driver alone), known only once the
        step starts (a source plans its own): what ``status`` counts done shards against."""
        write_json_atomic({"fingerprint": fingerprint, "shards": shards}, self.plan_path)

    def plan(self) -> dict | None:
        try:
            return json.loads(self.plan_path.read_text())
        except FileNotFoundError:
            return None

    def is_done(self, fingerprint: str) -> bool:
        m = self.manifest()
        return m is not None and m.get("fingerprint") == fingerprint

    def reset(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def data_files(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def table_files(self, name: str) -> list[Path]:
        return sorted((self.path / name).glob("part-*.parquet"))

    def shard_stats(self, i: int) -> dict | None:
        try:
            return json.loads((self.path / "_stats" / f"part-{i:05d}.json").read_text())
        except FileNotFoundError:
            return None

    def done_shards(self, fingerprint: str) -> dict[int, dict]:
        """Shards committed under this fingerprint (a stale fingerprint means: redo the step)."""
        out: dict[int, dict] = {}
        for f in sorted((self.path / "_stats").glob("part-*.json")):
            st = json.loads(f.read_text())
            if st.get("fingerprint") == fingerprint:
                out[int(f.stem.split("-")[1])] = st
        return out

    def holds_other_fingerprint(self, fingerprint: str) -> bool:
        """Whether anything here was written under another fingerprint: a shard's stats, or the plan a step
        writes as it starts, before any side state of its own (a cluster's sample and fits, a training job's
        checkpoints), so a run killed before its first shard and then changed upstream starts clean."""
        plan = self.plan()
        if plan is not None and plan.get("fingerprint") != fingerprint:
            return True
        for f in (self.path / "_stats").glob("part-*.json"):
            if json.loads(f.read_text()).get("fingerprint") != fingerprint:
                return True
        return False

    def commit_shard(
        self,
        i: int,
        table: pa.Table,
        rejects: pa.Table,
        side: dict[str, pa.Table],
        stats: dict,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Write rows, rejects, side tables and side files, then the stats file last: that is the commit."""
        name = shard_name(i)
        write_parquet_atomic(table, self.path / name)
        write_parquet_atomic(rejects, self.path / "rejects" / name)
        for side_name, side_table in side.items():
            write_parquet_atomic(side_table, self.path / side_name / name)
        for ext, data in (files or {}).items():
            write_bytes_atomic(data, self.path / ext / f"part-{i:05d}.{ext}")
        write_json_atomic(stats, self.path / "_stats" / f"part-{i:05d}.json")

    def read(self, columns: list[str] | None = None, name: str | None = None) -> pa.Table:
        files = self.table_files(name) if name else self.data_files()
        if not files:
            return pa.table({})
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])

    def rejects(self) -> pa.Table:
        files = self.table_files("rejects")
        if not files:
            return REJECTS_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f) for f in files])
