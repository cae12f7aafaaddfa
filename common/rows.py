"""Rows in Parquet files of whole rows, read shard by shard and only the columns asked for.

The engine's :class:`pipeline.stage.RowSource` reads a step's rows either from a view over its steps'
column groups or from plain files; the plain files are these, and a trainer handed a list of export
files reads them the same way without knowing the engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa


class ParquetRows:
    """Parquet files, each a shard of whole rows; relative image paths resolve against a file's folder."""

    def __init__(self, files: Iterable[Path | str]):
        self.files = [Path(f) for f in files]

    def iter_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        cols = list(columns) if columns is not None else None
        for f in self.files:
            yield pq.read_table(f, columns=cols)

    def iter_tables_with_base(self, columns: Iterable[str]) -> Iterator[tuple[pa.Table, Path]]:
        """Each file's table with those of ``columns`` it has, and its folder."""
        import pyarrow.parquet as pq

        cols = list(columns)
        for f in self.files:
            names = pq.ParquetFile(f).schema_arrow.names
            yield pq.read_table(f, columns=[c for c in cols if c in names]), f.parent

    def iter_refs(self, columns: Iterable[str], by_reference: str):
        """As :meth:`iter_tables_with_base`, with column ``by_reference`` (when a file has it) given as where
        its values are, ``(file, row positions)``, instead of the values: ``(table, base, ref or None)``."""
        import pyarrow.parquet as pq

        cols = [c for c in columns if c != by_reference]
        for f in self.files:
            names = pq.ParquetFile(f).schema_arrow.names
            t = pq.read_table(f, columns=[c for c in cols if c in names])
            yield t, f.parent, (f, pa.array(range(t.num_rows), pa.int32())) if by_reference in names else None

    def num_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
