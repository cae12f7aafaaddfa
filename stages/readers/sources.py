"""Readers that map other corpora onto ``image_id, image, image_bytes, captions``.

Image ids come from the source's own key (a path relative to the image root, an img2dataset key, a URL's
hash: ``stages/readers/ids.py``), never from a row's position; ``source.multi.v1`` prefixes each source's
ids with its name. A missing or unreadable input file becomes an ``input``-level reject and the run
goes on with the other files. Inputs are plain paths or fsspec URIs (``stages/readers/fs.py``).

Record files stream (``stages/readers/ranged.py``): the Karpathy json and the CC3M tsv here, RAM's
training json and BLIP's caption json in ``stages/readers/sources_json.py``. COCO's captions json joins two
arrays by id, so it is read whole (bounded by the annotation file: COCO's own is 92 MB); a folder is
listed whole.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, ValidationError, model_validator

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import ROWS_SCHEMA
from stages.readers import fs, splits
from stages.readers.ids import NAME, SEP, path_id, prefixed, url_id
from stages.readers.ranged import (Entry, Parsed, RangeReader, RangeReaderConfig, ReaderConfig, dedupe,
                                   merge_by_key, missing_input, planned_input_problem, rows_table, text_of,
                                   unreadable_input, url_only_rejects)
from stages.readers.sources_json import CaptionJson, RamJson  # noqa: F401  (registers source.ram_json.v1, caption_json.v1)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class _RecordReader(Stage):
    """Base for readers that load a whole input into records, then slice it into shards."""

    kind = "source"
    Config = ReaderConfig
    outputs = ("image", "image_bytes", "captions")

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        raise NotImplementedError

    def input_fingerprint(self) -> str:
        return "|".join(fs.file_key(p) for p in fs.expand(self.config.path))

    def _load(self, path: str) -> tuple[list[dict], list[Reject]]:
        return _cached_records(type(self).registry_name, self.config.model_dump_json(), path)

    def plan(self) -> list[dict]:
        return self._plan(fs.expand(self.config.path))

    def _plan(self, paths: list[str]) -> list[dict]:
        specs: list[dict] = []
        for path in paths:
            try:
                recs, _ = self._load(path) if fs.exists(path) else ([], [])
            except (OSError, ValueError, KeyError, TypeError):  # reported by the worker that reads it
                recs = []
            n = max(1, len(recs))
            specs += [{"file": path, "start": s, "stop": s + self.config.shard_rows}
                      for s in range(0, n, self.config.shard_rows)]
        return specs

    def read_shard(self, spec: dict) -> StageResult:
        path = spec["file"]
        if not fs.exists(path):
            return missing_input(path)
        try:
            recs, rejects = self._load(path)
        except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as e:
            return unreadable_input(path, e)
        start, stop = spec["start"], spec["stop"]
        first = start == 0
        return StageResult(rows_table(recs[start:stop]), rejects if first else [])

    def image_path(self, name: str, source_file: str) -> str:
        base = self.config.image_dir or os.path.join(os.path.dirname(source_file), "images")
        return name if os.path.isabs(name) or "://" in name else os.path.join(base, name)


@functools.lru_cache(maxsize=8)
def _cached_records(use: str, config_json: str, path: str) -> tuple[list[dict], list[Reject]]:
    from pipeline import registry

    cls = registry.get(use)
    reader = cls(cls.Config.model_validate_json(config_json), None)  # type: ignore[arg-type]
    return reader.records(path)


@register("source.coco.v1")
class CocoCaptions(_RecordReader):
    """COCO captions json (``images`` + ``annotations``); image_id is the file name relative to ``image_dir``
    without extension (COCO's own names have no folder: the stem). A file name listed twice is one image:
    the later entry is rejected (``row_duplicate_id``).

    The two arrays are joined by id and the rows sorted by file name, so the file is parsed whole
    (once per process): memory follows the annotation file's size, not the shard's."""

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        with fs.open_input(path) as f:
            data = json.load(f)
        caps: dict[int, list[str]] = {}
        for a in data.get("annotations", []):
            caps.setdefault(a["image_id"], []).append(a.get("caption"))
        recs, rejects = [], []
        for im in sorted(data.get("images", []), key=lambda im: im.get("file_name", "")):
            name = im.get("file_name")
            if not name:
                rejects.append(Reject(str(im.get("id")), "row_no_image", "image entry without file_name",
                                      payload=json.dumps(im)[:2000]))
                continue
            recs.append({"image_id": path_id(name, self.config.image_dir), "image": self.image_path(name, path),
                         "captions": caps.get(im["id"], [])})
        recs, dups = dedupe(recs)
        return recs, rejects + dups


def _json_array(head: bytes, what: str) -> Literal["json"]:
    if not head.lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"["):
        raise ValueError(f"not a JSON array ({what} is a list of records)")
    return "json"


def _loads(raw: bytes, where: str) -> object | Reject:
    try:
        return json.loads(raw)
    except ValueError as e:
        return Reject(None, "row_bad_record", f"{where}: not valid JSON: {e}", payload=text_of(raw))


def _string_list(v: object) -> bool:
    return isinstance(v, list) and all(c is None or isinstance(c, str) for c in v)


@register("source.flickr30k.v1")
class Flickr30kKarpathy(RangeReader):
    """Karpathy-split json list of ``{split, image_name, captions}``, streamed by element ranges.

    A repeated image_name is rejected (``row_duplicate_id``) when it falls in the same range as the
    first, or right after it; repeats far apart in the file are not seen together."""

    Config = ReaderConfig

    def detect(self, head: bytes) -> Literal["json"]:
        return _json_array(head, "the Karpathy json")

    def parse(self, raw: bytes, where: str, path: str) -> Parsed:
        if not raw:
            return None
        item = _loads(raw, where)
        if isinstance(item, Reject):
            return item
        name = item.get("image_name") if isinstance(item, dict) else None
        if not name or not isinstance(name, str):
            return Reject(None, "row_bad_record", f"{where}: record without image_name", payload=json.dumps(item)[:2000])
        caps = item.get("captions") or []
        iid = path_id(name, self.config.image_dir)
        if not _string_list(caps):
            return Reject(iid, "row_bad_record", f"{where}: captions is not a list of strings",
                          payload=json.dumps(item)[:2000])
        return Entry(iid, {"image_id": iid, "image": self.image_path(name, path), "captions": list(caps)})


class Cc3mConfig(RangeReaderConfig):
    urls: Literal["keep", "reject"] = Field(
        "keep", description="rows are URLs by nature: keep them for caption-only workflows (tagset); 'reject' "
                            "says to download them first (img2dataset), for workflows that open images")


@register("source.cc3m_tsv.v1")
class Cc3mTsv(RangeReader):
    """Conceptual Captions tsv ``caption<TAB>url``, streamed by line ranges; image_id hashes the URL.

    Lines of one URL are merged into one row within a range, and across a range boundary when they
    are consecutive."""

    Config = Cc3mConfig

    def detect(self, head: bytes) -> Literal["lines"]:
        return "lines"

    def parse(self, raw: bytes, where: str, path: str) -> Parsed:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Reject(None, "row_bad_record", f"{where}: not UTF-8 ({e})", payload=text_of(raw))
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip():
            return Reject(None, "row_bad_record", f"{where}: expected caption<TAB>url", payload=line[:2000])
        url = parts[1].strip()
        return Entry(url, {"image_id": url_id(url), "image": url,
                           "captions": [parts[0]]})

    def combine(self, entries: list[Entry]) -> tuple[list[dict], list[Reject]]:
        return merge_by_key(entries), []


@register("source.folder.v1")
class ImageFolder(_RecordReader):
    """A folder of images, each with a sidecar ``.txt`` (one caption per line)."""

    def input_fingerprint(self) -> str:
        return "|".join(fs.file_key(_under(p, rel)) for p in fs.expand(self.config.path, dirs=True)
                        for rel in sorted(fs.find_files(p)))

    def plan(self) -> list[dict]:
        return self._plan(fs.expand(self.config.path, dirs=True))

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        files = set(fs.find_files(path))
        images = sorted((r for r in files if os.path.splitext(r)[1].lower() in IMAGE_EXTS), key=lambda r: r.split("/"))
        recs, rejects = [], []
        for rel in images:
            iid = os.path.splitext(rel)[0]
            txt = iid + ".txt"
            try:
                caps = _read_text(_under(path, txt)).splitlines() if txt in files else []
            except (OSError, UnicodeDecodeError) as e:
                rejects.append(Reject(iid, "row_bad_record", f"{_under(path, txt)}: {e}", payload=_under(path, txt)))
                continue
            recs.append({"image_id": iid, "image": _under(path, rel), "captions": caps})
        return recs, rejects


def _under(root: str, rel: str) -> str:
    """A file under a folder input, spelt as ``Path`` spells it (a URI keeps its scheme)."""
    return root.rstrip("/") + "/" + rel if fs.is_uri(root) else str(Path(root) / rel)


def _read_text(path: str) -> str:
    with fs.open_input(path) as f:
        return f.read().decode("utf-8")


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


class _PerFileReader(Stage):
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
class Img2Dataset(_PerFileReader):
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
class ProjectParquet(_PerFileReader):
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


class MultiConfig(StageConfig):
    sources: list[dict] = Field(..., min_length=1, description="list of {use: <source stage>, name: <id prefix>, "
                                "...its config}; name defaults to the reader's (source.img2dataset.v1 -> "
                                "img2dataset) and must differ between sources")

    @model_validator(mode="after")
    def _check_sources(self) -> "MultiConfig":
        from pipeline import registry

        named: dict[str, int] = {}
        for i, spec in enumerate(self.sources):
            spec = dict(spec)
            use = spec.pop("use", None)
            try:
                cls = registry.get(str(use))
            except KeyError as e:
                raise ValueError(f"sources[{i}].use: {e.args[0]}") from None
            if cls.kind != "source" or cls is MultiSource:
                raise ValueError(f"sources[{i}].use: {use} is not a plain source stage")
            name = source_name(use, spec.pop("name", None))
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ValueError(f"sources[{i}].name: {name!r} is not a name (a letter or digit, then letters, "
                                 f"digits, '_', '.' or '-'): it is the prefix of this source's image ids")
            if name in named:
                raise ValueError(f"sources[{i}].name: sources[{named[name]}] is named {name!r} too (a source's "
                                 f"name defaults to its reader's); give each its own name: it prefixes its "
                                 f"image ids, so two outputs that number their keys alike stay apart")
            named[name] = i
            try:
                cls.Config.model_validate(spec)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"sources[{i}].{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self


def source_name(use: str, name: object = None) -> object:
    """A multi source's name: as given, else its reader's (``source.img2dataset.v1`` -> ``img2dataset``)."""
    return name if name is not None else use.split(".")[1] if use.count(".") >= 2 else use


@register("source.multi.v1")
class MultiSource(Stage):
    """Several sources as one input (e.g. CC3M tsv + Flickr30k json for one vocabulary). Each source's
    image ids (and its rejects' ids) get its name as a prefix, ``name/key``, so two img2dataset outputs
    that both start at ``000000000`` stay two sets of images."""

    kind = "source"
    Config = MultiConfig
    outputs = ("image", "image_bytes", "captions")

    def _subs(self) -> list[tuple[str, Stage]]:
        from pipeline import registry

        subs = []
        for spec in self.config.sources:
            spec = dict(spec)
            use = spec.pop("use")
            name = source_name(use, spec.pop("name", None))
            cls = registry.get(use)
            subs.append((name, cls(cls.Config.model_validate(spec), self.context)))
        return subs

    def input_fingerprint(self) -> str:
        return "||".join(getattr(s, "input_fingerprint", lambda: "")() for _, s in self._subs())

    def plan(self) -> list[dict]:
        return [{"source": i, "name": name, **spec} for i, (name, sub) in enumerate(self._subs())
                for spec in sub.plan()]

    def read_shard(self, spec: dict) -> StageResult:
        spec = dict(spec)
        name, sub = self._subs()[spec.pop("source")]
        spec.pop("name", None)
        res = sub.read_shard(spec)
        return StageResult(_prefix_ids(res.table, name), [_prefix_reject(r, name) for r in res.rejects],
                           {k: _prefix_ids(t, name) for k, t in res.side.items()}, res.files)


def _prefix_ids(table: pa.Table, name: str) -> pa.Table:
    if "image_id" not in table.column_names:
        return table
    i = table.column_names.index("image_id")
    ids = pc.binary_join_element_wise(pa.scalar(name), table.column(i).cast(pa.string()), SEP)
    return table.set_column(i, table.schema.field(i).with_type(pa.string()), ids)


def _prefix_reject(r: Reject, name: str) -> Reject:
    return r if r.image_id is None else dataclasses.replace(r, image_id=prefixed(name, str(r.image_id)))
