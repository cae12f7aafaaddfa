"""Readers whose input files are the shards: img2dataset output (WebDataset tars or its Parquet) and the
project's own rows Parquet. A large file is split into byte or row ranges (``stages/readers/splits.py``),
each read by its worker alone."""
from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import ROWS_SCHEMA
from stages.readers import fs, splits
from stages.readers.ranged import dedupe, planned_input_problem, rows_table, unreadable_input, url_only_rejects


URLS_KEEP = Field("keep", description="'reject': rows whose image is only an http(s) URL (no bytes) are rejected "
                                     "(row_image_url_only: download them first with img2dataset)")


SHARD_ROWS = Field(None, ge=1, description="split an input file into shards of at most this many samples (rows); "
                                           "null: no row limit")
SHARD_BYTES = Field(256 << 20, ge=1, description="and of about this many bytes of it at most (a tar's samples, a "
                    "Parquet file's uncompressed rows), so a worker's memory follows this, not the file; null: no "
                    "byte limit. A shard is a byte or row range, read by its worker alone; at least one sample")


class SplitConfig(StageConfig):
    """How a per-file reader splits a large file into shards (``stages/readers/splits.py``)."""

    shard_rows: int | None = SHARD_ROWS
    shard_bytes: int | None = SHARD_BYTES


class Img2DatasetConfig(SplitConfig):
    path: list[str] | str = Field(..., description="img2dataset shard files or globs (*.tar or *.parquet)")
    format: Literal["webdataset", "parquet"] = "webdataset"
    urls: Literal["keep", "reject"] = URLS_KEEP


class PerFileReader(Stage):
    """Base for readers whose input files are the shards (one output shard per file, or per part of one:
    a reader may plan several specs of a file with ``file_specs`` and read each with ``read_spec``)."""

    kind = "source"
    outputs = ("image", "image_bytes", "captions")
    schema: ClassVar[pa.Schema] = ROWS_SCHEMA

    def read_spec(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        """The rows of one planned spec (a file, or a range of one) and its rejects."""
        raise NotImplementedError

    def input_fingerprint(self) -> str:
        return "|".join(fs.file_key(p) for p in fs.expand(self.config.path))

    def plan(self) -> list[dict]:
        return [spec for p in fs.expand(self.config.path) for spec in self.file_specs(p)]

    def file_specs(self, path: str) -> list[dict]:
        return [{"file": path}]

    def split(self, path: str, ranges) -> list[dict]:
        """``{"file", "start", "stop"}`` per range that ``ranges(open file)`` plans; one whole-file spec when
        there is one range, or the file cannot be planned (missing, compressed, not what it claims: its
        worker reports it)."""
        if not fs.exists(path):
            return [{"file": path}]
        try:
            with fs.open_input(path) as f:
                got = ranges(f)
        except (OSError, tarfile.TarError, pa.ArrowException, ValueError):
            return [{"file": path}]
        return [{"file": path}] if len(got) <= 1 else [{"file": path, "start": a, "stop": b} for a, b in got]

    def read_shard(self, spec: dict) -> StageResult:
        path = spec["file"]
        problem = planned_input_problem(spec, self.schema)
        if problem is not None:
            return problem
        try:
            recs, rejects = self.read_spec(spec)
        except (OSError, tarfile.TarError, pa.ArrowException, ValueError) as e:
            return unreadable_input(path, e, self.schema)
        recs, dups = dedupe(recs, "this shard's range of the file" if "start" in spec else "this file")
        recs, urls = url_only_rejects(recs, self.config.urls)
        return StageResult(rows_table(recs, self.schema), rejects + dups + urls)


@register("source.img2dataset.v1")
class Img2Dataset(PerFileReader):
    """img2dataset output: WebDataset tars (``key.jpg/.txt/.json``) or its Parquet; one shard per file, or
    per range of a large one (``shard_rows`` / ``shard_bytes``: a tar's byte range of whole samples, a
    Parquet file's row range). A compressed tar is one shard."""

    Config = Img2DatasetConfig

    def file_specs(self, path: str) -> list[dict]:
        c = self.config
        if c.shard_rows is None and c.shard_bytes is None:
            return [{"file": path}]
        if c.format == "webdataset":
            return self.split(path, lambda f: splits.tar_ranges(f, c.shard_rows, c.shard_bytes))
        return self.split(path, lambda f: splits.row_ranges(pq.ParquetFile(f).metadata, c.shard_rows, c.shard_bytes))

    def read_spec(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        return self._read_tar(spec) if self.config.format == "webdataset" else self._read_parquet(spec)

    def _read_tar(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        groups: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        with fs.open_input(spec["file"]) as raw:
            for m, data in _tar_files(raw, spec):
                key, _, ext = os.path.basename(m.name).partition(".")
                groups.setdefault(key, {})[ext.lower()] = data
        recs, rejects = [], []
        for key, files in groups.items():
            img = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            meta = _json_or_empty(files.get("json"))
            caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
            if img is None:
                rejects.append(Reject(key, "row_no_image", "sample has no image file", payload=caption))
                continue
            recs.append({"image_id": str(meta.get("key") or key), "image": meta.get("url"), "image_bytes": img,
                         "captions": [caption]})
        return recs, rejects

    def _read_parquet(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        t = _read_parquet(spec)
        cols = set(t.column_names)
        recs, rejects = [], []
        for r in t.to_pylist():
            key = str(r.get("key"))
            img = r.get("jpg") if "jpg" in cols else None
            if img is None and not r.get("url"):
                rejects.append(Reject(key, "row_no_image", "row has neither jpg bytes nor url",
                                      payload=r.get("caption")))
                continue
            if "status" in cols and r.get("status") not in (None, "success") and img is None:
                rejects.append(Reject(key, "row_no_image", f"img2dataset status {r.get('status')!r}",
                                      payload=r.get("caption")))
                continue
            recs.append({"image_id": key, "image": r.get("url"), "image_bytes": img, "captions": [r.get("caption")]})
        return recs, rejects


def _tar_files(raw, spec: dict):
    """``(member, data)`` of the tar's files: the spec's byte range of whole samples (an uncompressed tar,
    as planned), or the whole file, compressed or not."""
    if "start" in spec:
        yield from splits.tar_members(raw, spec["start"], spec["stop"])
        return
    with tarfile.open(fileobj=raw) as tf:
        for m in tf:
            if m.isfile():
                f = tf.extractfile(m)
                yield m, f.read() if f else b""


def _read_parquet(spec: dict) -> pa.Table:
    """A Parquet input file's rows, or those of the spec's row range."""
    with fs.open_input(spec["file"]) as f:
        return splits.read_row_range(f, spec["start"], spec["stop"]) if "start" in spec else pq.read_table(f)


def _json_or_empty(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


class ParquetConfig(SplitConfig):
    path: list[str] | str = Field(..., description="Parquet file(s) or glob(s) with image_id and captions")
    urls: Literal["keep", "reject"] = URLS_KEEP


@register("source.parquet.v1")
class ProjectParquet(PerFileReader):
    """The project's own rows Parquet (``image_id``, ``captions``, ``image`` and/or ``image_bytes``); one
    shard per file, or per row range of a large one (``shard_rows`` / ``shard_bytes``)."""

    Config = ParquetConfig

    def file_specs(self, path: str) -> list[dict]:
        c = self.config
        if c.shard_rows is None and c.shard_bytes is None:
            return [{"file": path}]
        return self.split(path, lambda f: splits.row_ranges(pq.ParquetFile(f).metadata, c.shard_rows, c.shard_bytes))

    def read_spec(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        t = _read_parquet(spec)
        if "image_id" not in t.column_names or "captions" not in t.column_names:
            raise ValueError("needs columns image_id and captions")
        recs, rejects = [], []
        for r in t.to_pylist():
            if r.get("image") is None and r.get("image_bytes") is None:
                rejects.append(Reject(str(r["image_id"]), "row_no_image", "neither image nor image_bytes",
                                      payload=json.dumps(r.get("captions"))[:2000]))
                continue
            recs.append(r)
        return recs, rejects
