"""A step's rows as a view over column groups: every column is written once, by the step that makes it.

A source step writes its rows (``image_bytes`` included). A map step writes ``image_id`` plus only the
columns it declares in ``outputs``; what it carries stays where it was written. The rows a step sees
are the image ids of the latest row-writing step's shard *i*; each column comes from shard *i* of the
step that last wrote it, aligned on ``image_id`` (a later step's shard holds the same ids or fewer:
rejected rows leave, no row is ever added). So image bytes are written by the input step and read by
reference after it, and a run writes each column once instead of once per step.

A view names steps, not paths (``root`` is the run directory), so a run directory can be moved.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def shard_file(step_dir: Path, i: int) -> Path:
    return step_dir / f"part-{i:05d}.parquet"


@dataclass(frozen=True)
class View:
    root: str  # the run directory
    rows: str | None = None  # the step whose shards hold the rows' image ids
    owners: dict[str, str] = field(default_factory=dict)  # column -> step that last wrote it

    # -- building (the workflow's contract walks the steps in order) -------------------------------------
    def after(self, step: str, kind: str, outputs: Iterable[str], replaces: bool = False) -> "View":
        """The view after ``step`` ran: a source or a replacing step starts afresh; a map step adds."""
        cols = {"image_id", *outputs}
        if kind == "reduce":
            return self
        if kind == "source" or replaces:
            return View(self.root, step, {c: step for c in sorted(cols)})
        return View(self.root, step, {**self.owners, **{c: step for c in sorted(cols)}})

    def to_dict(self) -> dict:
        return {"rows": self.rows, "owners": dict(sorted(self.owners.items()))}

    @classmethod
    def from_dict(cls, root: str | Path, d: dict) -> "View":
        return cls(str(root), d.get("rows"), dict(d.get("owners") or {}))

    # -- reading -------------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return sorted(self.owners)

    def step_dir(self, step: str) -> Path:
        return Path(self.root) / step

    def steps(self) -> list[str]:
        """Every step a full read of the view touches, the rows step first."""
        out = [self.rows] if self.rows else []
        return out + sorted(set(self.owners.values()) - set(out))

    def shards(self) -> list[int]:
        if not self.rows:
            return []
        return sorted(int(f.stem.split("-")[1]) for f in self.step_dir(self.rows).glob("part-*.parquet"))

    def num_rows(self) -> int:
        return sum(pq.ParquetFile(shard_file(self.step_dir(self.rows), i)).metadata.num_rows for i in self.shards())

    def read_shard(self, i: int, columns: Iterable[str] | None = None) -> pa.Table:
        """Shard ``i`` with ``columns`` (default: all), in the order asked, ``image_id`` first if asked."""
        if self.rows is None:
            raise ValueError("this view has no rows (no source step before it)")
        want = list(dict.fromkeys(columns if columns is not None else ["image_id", *self.columns]))
        missing = [c for c in want if c not in self.owners]
        if missing:
            raise KeyError(f"column(s) {missing} are not in the rows of step '{self.rows}'; have {self.columns}")
        by_step: dict[str, list[str]] = {}
        for c in want:
            by_step.setdefault(self.owners[c], []).append(c)
        rows_file = shard_file(self.step_dir(self.rows), i)
        base = pq.read_table(rows_file, columns=sorted({"image_id", *by_step.get(self.rows, [])}))
        ids = base.column("image_id")
        got: dict[str, pa.ChunkedArray] = {c: base.column(c) for c in by_step.get(self.rows, [])}
        for step, cols in by_step.items():
            if step == self.rows:
                continue
            t = pq.read_table(shard_file(self.step_dir(step), i), columns=["image_id", *cols])
            if not t.column("image_id").equals(ids):
                t = _align(t, ids, step, self.rows, i)
            got.update({c: t.column(c) for c in cols})
        return pa.table({c: got[c] for c in want}) if want else pa.table({"image_id": ids}).select([])

    def locate(self, i: int, column: str, ids: pa.ChunkedArray) -> tuple[Path, pa.Array]:
        """Where ``column``'s values of the rows ``ids`` (shard ``i``) are: the shard file of the step that
        wrote it and each row's position there. A reader then fetches only the rows it needs, by
        reference, instead of carrying the column (image bytes) along."""
        f = shard_file(self.step_dir(self.owners[column]), i)
        have = pq.read_table(f, columns=["image_id"]).column("image_id").combine_chunks()
        pos = pc.index_in(ids, value_set=have)
        if pos.null_count:
            raise ValueError(f"shard {i}: step '{self.rows}' has rows that step '{self.owners[column]}' does not")
        return f, pos.combine_chunks() if isinstance(pos, pa.ChunkedArray) else pos

    def iter_tables(self, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
        cols = list(columns) if columns is not None else None
        for i in self.shards():
            yield self.read_shard(i, cols)

    def read(self, columns: Iterable[str] | None = None) -> pa.Table:
        tables = list(self.iter_tables(columns))
        return pa.concat_tables(tables) if tables else pa.table({})


def read_rows(path: str | Path, column: str, rows: Sequence[int]) -> list:
    """``column``'s values at positions ``rows`` of one Parquet file, in that order, reading only the row
    groups that hold them, one group at a time. What a reader that needs a few rows' image bytes (the
    report's contact sheet) reads instead of the whole column: with :func:`pipeline.store.write_parquet_atomic`
    bounding row groups by bytes, that is a few groups' worth, not the shard."""
    pf = pq.ParquetFile(path)
    starts = [0]
    for g in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
    by_group: dict[int, list[int]] = {}
    for k, r in enumerate(rows):
        if not 0 <= r < starts[-1]:
            raise IndexError(f"{path}: row {r} of {starts[-1]}")
        by_group.setdefault(bisect.bisect_right(starts, r) - 1, []).append(k)
    out: list = [None] * len(rows)
    for g in sorted(by_group):
        col = pf.read_row_group(g, columns=[column]).column(0)
        for k in by_group[g]:
            out[k] = col[rows[k] - starts[g]].as_py()
    return out


def _align(t: pa.Table, ids: pa.ChunkedArray, step: str, rows: str, i: int) -> pa.Table:
    """``t``'s rows in the order of ``ids`` (a later step's ids: the same or fewer)."""
    have = t.column("image_id")
    if pc.count_distinct(have).as_py() != len(have):
        raise ValueError(f"shard {i} of step '{step}' repeats an image_id: rows cannot be joined by id")
    pos = pc.index_in(ids, value_set=have.combine_chunks())
    if pos.null_count:
        lost = ids.filter(pc.is_null(pos)).to_pylist()[:5]
        raise ValueError(f"shard {i}: step '{rows}' has rows that step '{step}' does not (e.g. {lost})")
    return t.take(pos)


def step_view(step_dir: str | Path) -> View:
    """The view after a finished step, from its manifest (what a reader outside the run uses)."""
    import json

    step_dir = Path(step_dir)
    m = json.loads((step_dir / "_manifest.json").read_text())
    if "view" not in m:  # a reduce step, or a step that keeps its own rows whole
        return View(str(step_dir.parent), step_dir.name, {})
    return View.from_dict(step_dir.parent, m["view"])


def read_step(step_dir: str | Path, columns: Iterable[str] | None = None) -> pa.Table:
    """All rows of a finished step, with the columns it carries (its own and those before it)."""
    return step_view(step_dir).read(columns)
