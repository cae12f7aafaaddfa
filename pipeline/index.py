"""An image id -> shard index of a step's rows, so one image's row is read from one shard, not searched for.

``<step>/_id_index.parquet`` holds ``(image_id, shard)`` sorted by both, in row groups whose min/max
statistics a lookup bisects: it reads the footer and the one row group that can hold the id. A step's
``finalize`` builds it from the committed shards by an external merge sort, so the driver never holds
more than one shard's ids (to sort it) or ``fan_in`` open runs of one batch each (to merge them):

1. each shard's ``image_id`` column (a Parquet projection: no other column is read) is sorted into a
   run file under ``_id_index.tmp/``;
2. runs are merged ``fan_in`` at a time, level after level, the last merge writing the index.

Why one merged index rather than one per shard: a lookup then opens one small file, however many shards
the step has. Why the shards' own ``image_id`` column rather than a side table the workers write: it is
the same ids, already written once. An id two shards both hold (a source judges duplicates per range)
is listed once per shard, lowest shard first, the order a scan of the shards would meet them.

The input step builds one too and fails when ``duplicates`` finds an id listed twice: the sorted index
puts both places side by side, so the check costs one streamed pass and holds one batch.
"""
from __future__ import annotations

import bisect
import heapq
import os
import shutil
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.files import temp_path

INDEX_NAME = "_id_index.parquet"
SCHEMA = pa.schema([("image_id", pa.string()), ("shard", pa.int32())])
ROW_GROUP = 1 << 16  # ids per row group: what a lookup reads
_BATCH = 4096  # ids read at a time from each run while merging


def index_path(step_dir: Path) -> Path:
    return Path(step_dir) / INDEX_NAME


def _rows(run: Path) -> Iterator[tuple[str, int]]:
    for b in pq.ParquetFile(run).iter_batches(batch_size=_BATCH):
        yield from zip(b.column("image_id").to_pylist(), b.column("shard").to_pylist())


def _merge(runs: list[Path], dest: Path, row_group: int) -> int:
    """Merge sorted runs into ``dest`` (written under a temp name and renamed); returns its rows."""
    tmp = temp_path(dest)
    n = 0
    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as w:
        ids: list[str] = []
        shards: list[int] = []
        for iid, shard in heapq.merge(*(_rows(r) for r in runs)):
            ids.append(iid)
            shards.append(shard)
            if len(ids) == row_group:
                w.write_table(pa.table([ids, pa.array(shards, pa.int32())], schema=SCHEMA), row_group_size=row_group)
                n, ids, shards = n + len(ids), [], []
        if ids or not n:  # an empty index still has its schema
            w.write_table(pa.table([ids, pa.array(shards, pa.int32())], schema=SCHEMA), row_group_size=row_group)
            n += len(ids)
    os.replace(tmp, dest)
    return n


def write_id_index(step_dir: Path, fan_in: int = 64, row_group: int = ROW_GROUP) -> int:
    """Build ``<step_dir>/_id_index.parquet`` from the step's ``part-*.parquet``; returns the ids indexed."""
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    step_dir = Path(step_dir)
    work = step_dir / "_id_index.tmp"
    shutil.rmtree(work, ignore_errors=True)  # a killed build's runs
    work.mkdir()
    runs = []
    for part in sorted(step_dir.glob("part-*.parquet")):
        shard = int(part.stem.split("-")[1])
        ids = pq.read_table(part, columns=["image_id"]).column("image_id")
        t = pa.table([ids, pa.array([shard] * len(ids), pa.int32())], schema=SCHEMA).sort_by("image_id")
        runs.append(work / f"run-0-{shard:05d}.parquet")
        pq.write_table(t, runs[-1])
    level = 0
    while len(runs) > fan_in:
        level += 1
        merged = []
        for i in range(0, len(runs), fan_in):
            merged.append(work / f"run-{level}-{i // fan_in:05d}.parquet")
            _merge(runs[i:i + fan_in], merged[-1], row_group)
        runs = merged
    n = _merge(runs, index_path(step_dir), row_group)
    shutil.rmtree(work)
    return n


def duplicates(step_dir: Path, limit: int = 5) -> tuple[int, list[tuple[str, list[int]]]]:
    """Ids the step's index lists more than once: how many, and the first ``limit`` with their shards.

    One pass over the sorted index in batches; what it keeps is the current id's shards and the examples."""
    count, examples = 0, []
    cur: str | None = None
    shards: list[int] = []

    def close() -> None:
        nonlocal count
        if len(shards) > 1:
            count += 1
            if len(examples) < limit:
                examples.append((cur, list(shards)))

    for b in pq.ParquetFile(index_path(step_dir)).iter_batches(batch_size=_BATCH):
        for iid, shard in zip(b.column("image_id").to_pylist(), b.column("shard").to_pylist()):
            if iid != cur or not shards:
                close()
                cur, shards = iid, []
            shards.append(shard)
    close()
    return count, examples


def find_shards(step_dir: Path, image_id: str) -> list[int] | None:
    """The shards holding ``image_id`` (lowest first; empty: none does), or None when the step has no index.

    Reads the index's footer, then only the row groups whose min/max can hold the id (one, unless the id
    spans a row-group boundary): the index is sorted, so those are found by bisecting the maxima."""
    path = index_path(step_dir)
    if not path.exists():
        return None
    f = pq.ParquetFile(path)
    col = f.schema_arrow.get_field_index("image_id")
    bounds = []
    for g in range(f.metadata.num_row_groups):
        st = f.metadata.row_group(g).column(col).statistics
        if st is None or not st.has_min_max:  # no bounds written (e.g. very long ids): it must be read
            bounds.append((None, None))
        else:
            bounds.append((st.min, st.max))
    maxima = [hi for _, hi in bounds]
    start = bisect.bisect_left(maxima, image_id) if None not in maxima else 0
    out: list[int] = []
    for g in range(start, len(bounds)):
        lo, hi = bounds[g]
        if lo is not None and lo > image_id:
            break  # sorted: no later row group can hold it
        if hi is not None and hi < image_id:
            continue
        t = f.read_row_group(g)
        out += t.filter(pc.equal(t.column("image_id"), image_id)).column("shard").to_pylist()
    return out
