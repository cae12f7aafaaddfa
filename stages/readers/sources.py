"""Readers that map other corpora onto ``image_id, image, image_bytes, captions``.

Here: COCO captions, Flickr30k (Karpathy json), CC3M tsv, an image folder; img2dataset output and the
project's Parquet are in ``files.py``, several sources as one in ``multi.py``.

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

import functools
import json
import os
import tarfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageResult
from stages.readers import fs
from stages.readers.ids import path_id, url_id
from stages.readers.ranged import (Entry, Parsed, RangeReader, RangeReaderConfig, ReaderConfig, dedupe,
                                   merge_by_key, missing_input, rows_table, text_of, unreadable_input)

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
