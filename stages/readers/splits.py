"""Splitting one large input file into shards a worker reads alone: a tar by byte ranges of whole samples,
a Parquet file by row ranges.

The driver plans from what is cheap to read: a tar's headers (each member's offset and size; the data
is seeked over, never read) and a Parquet file's footer (rows and uncompressed bytes per row group).
A range holds whole samples (a WebDataset sample is its run of adjacent members with one key), at
least one, and closes once it holds ``rows`` samples or about ``size`` bytes. The same file and
limits give the same ranges, and the ranges concatenated are the file read whole, in order.
"""
from __future__ import annotations

import os
import tarfile
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def sample_key(name: str) -> str:
    """A WebDataset member's sample key: its base name up to the first dot (``000123.jpg`` -> ``000123``)."""
    return os.path.basename(name).partition(".")[0]


class _Ranges:
    """Ranges closed as items are added: ``add(position, rows, size)`` per item, ``end(position)`` last."""

    def __init__(self, rows: int | None, size: int | None):
        self.limit_rows, self.limit_size = rows, size
        self.out: list[tuple[int, int]] = []
        self.start: int | None = None
        self.rows, self.size = 0, 0.0

    def full(self) -> bool:
        return self.rows > 0 and ((self.limit_rows is not None and self.rows >= self.limit_rows) or
                                  (self.limit_size is not None and self.size >= self.limit_size))

    def add(self, position: int, rows: int, size: float) -> None:
        if self.start is None:
            self.start = position
        elif self.full():
            self.out.append((self.start, position))
            self.start, self.rows, self.size = position, 0, 0.0
        self.rows += rows
        self.size += size

    def end(self, position: int) -> list[tuple[int, int]]:
        if self.start is not None:
            self.out.append((self.start, position))
        return self.out


def tar_ranges(f: IO[bytes], rows: int | None, size: int | None) -> list[tuple[int, int]]:
    """Byte ranges ``(start, stop)`` of an uncompressed tar, each starting at a sample's first header;
    raises ``tarfile.ReadError`` for a compressed one (which only a whole read can split)."""
    ranges = _Ranges(rows, size)
    with tarfile.open(fileobj=f, mode="r:") as tf:
        key = None
        while (m := tf.next()) is not None:
            tf.members.clear()  # headers only, and none kept: memory does not grow with the members
            if not m.isfile():
                continue
            k = sample_key(m.name)
            if k != key:
                ranges.add(m.offset, 1, 0)
                key = k
            ranges.size += m.offset_data - m.offset + m.size
        end = tf.offset
    return ranges.end(end)


def tar_members(f: IO[bytes], start: int = 0, stop: int | None = None) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """``(member, data)`` of each file in ``[start, stop)`` of an uncompressed tar (``stop`` None: to the
    end), reading that range only."""
    f.seek(start)
    with tarfile.open(fileobj=f, mode="r:") as tf:
        while (m := tf.next()) is not None:
            tf.members.clear()
            if stop is not None and m.offset >= stop:
                break
            if m.isfile():
                got = tf.extractfile(m)
                yield m, got.read() if got else b""


def row_ranges(meta: pq.FileMetaData, rows: int | None, size: int | None) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of a Parquet file from its footer: a row's size is its row group's
    uncompressed bytes over its rows."""
    ranges = _Ranges(rows, size)
    pos = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        per = meta.row_group(g).total_byte_size / max(1, n)
        while n:
            take = n  # rows that fit before the range is full (at least one: a range is never empty)
            if ranges.limit_rows is not None:
                take = min(take, max(1, ranges.limit_rows - ranges.rows))
            if ranges.limit_size is not None and per > 0:
                take = min(take, max(1, int(-(-(ranges.limit_size - ranges.size) // per))))
            ranges.add(pos, take, take * per)
            pos, n = pos + take, n - take
    return ranges.end(pos) or [(0, 0)]


def read_row_range(f: IO[bytes], start: int, stop: int, batch_rows: int = 1024) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file: the row groups they lie in, streamed in batches of
    ``batch_rows`` (what precedes ``start`` in its group is read and dropped a batch at a time)."""
    pf = pq.ParquetFile(f)
    first, groups, pos = 0, [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if pos < stop and pos + n > start:
            first = pos if not groups else first
            groups.append(g)
        pos += n
    batches, pos = [], first
    for b in pf.iter_batches(batch_size=batch_rows, row_groups=groups) if groups else ():
        lo, hi = max(0, start - pos), min(b.num_rows, stop - pos)
        if hi > lo:
            batches.append(b.slice(lo, hi - lo))
        pos += b.num_rows
        if pos >= stop:
            break
    return pa.Table.from_batches(batches, schema=pf.schema_arrow)
