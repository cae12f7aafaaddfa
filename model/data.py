"""Rows as training samples: an export's (or the engine's) rows read by reference, images opened through
:mod:`common.images`, batches that carry their rejects."""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from common.images import IMAGE_COLUMNS, ImageLimits, open_image
from common.rejects import Reject
from common.rows import ParquetRows
from model.preprocess import to_tensor

ROW_IMAGE_COLUMNS = ("image_id", *IMAGE_COLUMNS)  # a row's id and where its image is
ROW_COLUMNS = ROW_IMAGE_COLUMNS + ("caption", "captions", "union_label_id", "parse_label_id", "uncertain_label_id")
UNKNOWN = -1.0  # a target the loss leaves out (the engine's ``uncertain_label_id``: neither present nor absent)
# what the caption terms read of a batch that was rejected whole (model/objective.BatchLoss)
EMPTY_ROW = {"image_id": "", "caption": [""], "union_label_id": [], "parse_label_id": []}


def _rows(source):
    """The engine's rows as they are, or a list of Parquet files of whole rows."""
    return source if hasattr(source, "iter_refs") else ParquetRows(source)


def row_tables(source, columns):
    """(table, folder relative image paths resolve against) per shard, with those of ``columns`` that exist:
    from Parquet files of whole rows, or from anything with ``iter_tables_with_base`` (the engine's rows)."""
    yield from _rows(source).iter_tables_with_base(columns)


def row_refs(source, columns, by_reference: str = "image_bytes"):
    """As :func:`row_tables`, with column ``by_reference`` given as where its values are, ``(file,
    positions)`` per shard (None when the rows have no such column), instead of the values."""
    yield from _rows(source).iter_refs(columns, by_reference)


class ByteReader:
    """Values of one binary column fetched by (file, row): reads the row group that holds the row and keeps
    the most recently read groups up to ``budget`` bytes, so a worker's memory is bounded by the budget and
    it reads only the groups its rows are in."""

    def __init__(self, column: str, budget: int = 64 << 20):
        from collections import OrderedDict

        self.column, self.budget = column, budget
        self._groups: OrderedDict = OrderedDict()
        self._files: dict = {}
        self.reads = 0  # row groups read (a benchmark's and a test's measure)

    def __getstate__(self):  # loader processes start with an empty cache
        return {"column": self.column, "budget": self.budget}

    def __setstate__(self, st):
        self.__init__(st["column"], st["budget"])

    def get(self, path: Path, row: int) -> bytes | None:
        meta = self._files.get(path)
        if meta is None:
            md = pq.ParquetFile(path).metadata
            starts = [0]
            for g in range(md.num_row_groups):
                starts.append(starts[-1] + md.row_group(g).num_rows)
            meta = self._files[path] = starts
        g = bisect.bisect_right(meta, row) - 1
        key = (path, g)
        col = self._groups.get(key)
        if col is None:
            col = pq.ParquetFile(path).read_row_group(g, columns=[self.column]).column(0)
            self.reads += 1
            self._groups[key] = col
            while len(self._groups) > 1 and sum(c.nbytes for c in self._groups.values()) > self.budget:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return col[row - meta[g]].as_py()


class Batch(NamedTuple):
    """What the loader gives: the images that decoded, their targets and dataset indices, and a reject
    (with the vision steps' stable code) for each row of the batch whose image did not."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    rejects: list


class ExportDataset(torch.utils.data.Dataset):
    """Rows of the export Parquet (``image_path``, relative paths resolve against the shard's folder) or
    of any earlier step (``image`` path or inline ``image_bytes``) + ``union_label_id``.

    The rows are read shard by shard and only the kept ones stay, as Arrow tables (paths or inline
    bytes, labels, captions), never as Python objects per row: at most one input shard plus the kept
    rows are in memory. Images decode lazily, per item, through ``common.images.open_image``: a row
    whose image does not decode is left out of its batch and comes back in ``Batch.rejects`` with the
    vision steps' code; :func:`batches` records it in ``rejects`` (by image_id, once).

    ``ids``: keep these image_ids; ``keep``: a predicate on image_id (a Ray Train worker's own rows).
    ``cache``: keep decoded, resized tensors in memory after the first epoch (tiny corpora only: a
    64 px image is 48 KiB as a tensor; with loader processes each keeps its own copy).
    ``unknown``: a training set's targets are :data:`UNKNOWN` for the row's ``uncertain_label_id`` (where the
    rows have it), which the loss leaves out; an evaluation set's are 0/1.
    """

    def __init__(self, files, num_classes: int, cfg, ids: set[str] | None = None, cache: bool = False, keep=None,
                 record_opened: bool = False, unknown: bool = False):
        self.tables: list[pa.Table] = []
        self.bases: list[Path] = []
        self.refs: list[tuple[Path, pa.Array] | None] = []
        starts = [0]
        wanted = pa.array(sorted(ids), pa.string()) if ids is not None else None
        for table, base, ref in row_refs(files, ROW_COLUMNS):
            iid = table.column("image_id")
            mask = pc.is_in(iid, value_set=wanted.cast(iid.type)) if wanted is not None else None
            if keep is not None:
                mine = pa.array([keep(i) for i in iid.to_pylist()], pa.bool_())
                mask = mine if mask is None else pc.and_(mask, mine)
            t = (table.filter(mask) if mask is not None else table).combine_chunks()
            if ref is not None and mask is not None:
                ref = (ref[0], pc.filter(ref[1], mask))
            del table, iid  # only the kept rows stay, and inline images as where they are
            if t.num_rows:
                self.tables.append(t)
                self.bases.append(base)
                self.refs.append(ref)
                starts.append(starts[-1] + t.num_rows)
        self._starts = starts
        self.num_classes, self.cfg, self.unknown = num_classes, cfg, unknown
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.rejects: dict[str, Reject] = {}
        self.bytes = ByteReader("image_bytes")
        self.opened: list[str] | None = [] if record_opened else None  # image_ids decoded, in order (tests)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def nbytes(self) -> int:
        """Bytes the kept rows hold (the Arrow buffers)."""
        return sum(t.nbytes for t in self.tables)

    def _locate(self, i: int) -> tuple[pa.Table, int, Path]:
        s = bisect.bisect_right(self._starts, i) - 1
        return self.tables[s], i - self._starts[s], self.bases[s]

    def _ref(self, i: int) -> tuple[Path, int] | None:
        s = bisect.bisect_right(self._starts, i) - 1
        ref = self.refs[s]
        return None if ref is None else (ref[0], ref[1][i - self._starts[s]].as_py())

    def row(self, i: int, columns=ROW_COLUMNS) -> dict:
        """Row ``i`` as a dict (``caption``: the list of captions, from ``caption`` or ``captions``)."""
        t, j, _ = self._locate(i)
        r = {c: t.column(c)[j].as_py() for c in columns if c in t.column_names}
        if "caption" in columns or "captions" in columns:
            r["caption"] = r.get("caption") or r.pop("captions", None) or []
        return r

    def image_id(self, i: int) -> str:
        t, j, _ = self._locate(i)
        return t.column("image_id")[j].as_py()

    def decode(self, i: int) -> tuple[torch.Tensor | None, Reject | None]:
        """Row ``i``'s image as the model's input tensor, or the reject of why it has none."""
        if self.cache is not None and i in self.cache:
            return self.cache[i], None
        t, j, base = self._locate(i)
        r = {c: t.column(c)[j].as_py() for c in ROW_IMAGE_COLUMNS if c in t.column_names}
        ref = self._ref(i)
        if ref is not None:
            r["image_bytes"] = self.bytes.get(*ref)
        if self.opened is not None:
            self.opened.append(r["image_id"])
        img, rej = open_image(r, base, ImageLimits(min_side=1))
        if rej is not None:
            return None, rej
        x = to_tensor(img, self.cfg)
        if self.cache is not None:
            self.cache[i] = x
        return x, None

    def __getitem__(self, i: int):
        x, rej = self.decode(i)
        t, j, _ = self._locate(i)
        y = torch.zeros(self.num_classes)
        if self.unknown and "uncertain_label_id" in t.column_names:
            y[[k for k in t.column("uncertain_label_id")[j].as_py() or [] if k < self.num_classes]] = UNKNOWN
        y[[k for k in t.column("union_label_id")[j].as_py() if k < self.num_classes]] = 1
        return x, y, i, rej

    def collate(self, items: list) -> Batch:
        good = [it for it in items if it[0] is not None]
        s = self.cfg.image_size
        return Batch(torch.stack([it[0] for it in good]) if good else torch.zeros((0, 3, s, s)),
                     torch.stack([it[1] for it in good]) if good else torch.zeros((0, self.num_classes)),
                     torch.tensor([it[2] for it in good], dtype=torch.long),
                     [it[3] for it in items if it[0] is None])

    def check(self, indices) -> list[Reject]:
        """Decode rows ``indices`` (those an epoch's ``drop_last`` never gave to the loop) for their
        rejects, so that every row is either trained on or rejected."""
        new = []
        for i in indices:
            if self.image_id(int(i)) in self.rejects:
                continue
            _, rej = self.decode(int(i))
            if rej is not None:
                self.rejects[rej.image_id] = rej
                new.append(rej)
        return new


def batches(loader, on_reject=None):
    """``(x, y, idx)`` of each of ``loader``'s batches; the batch's rejects go to its dataset's
    ``rejects`` (once per image_id) and, the new ones, to ``on_reject``."""
    seen = getattr(loader.dataset, "rejects", {})
    for b in loader:
        if not isinstance(b, Batch):  # a dataset of plain (x, y, idx) items
            yield b
            continue
        new = [r for r in b.rejects if r.image_id not in seen]
        for r in new:
            seen[r.image_id] = r
        if new and on_reject is not None:
            on_reject(new)
        yield b.x, b.y, b.idx


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0, prefetch_factor: int = 2,
                **kw) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes in ``num_workers`` processes, ``prefetch_factor`` batches ahead each, into
    pinned memory when the model is on CUDA (so the copy to the device overlaps compute). With 0 workers
    it is the plain in-process loader. An :class:`ExportDataset` collates into a :class:`Batch` (read it
    through :func:`batches`)."""
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    if hasattr(dataset, "collate"):
        kw.setdefault("collate_fn", dataset.collate)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", **extra, **kw)
