"""Readers that map other corpora onto ``image_id, image, image_bytes, captions``.

Image ids come from the source's own key (file stem, COCO/img2dataset key, URL hash), never from a
row's position. A missing or unreadable input file becomes an ``input``-level reject and the run
goes on with the other files.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationError, model_validator

from pipeline.errors import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import ROWS_SCHEMA

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ReaderConfig(StageConfig):
    path: list[str] | str = Field(..., description="file(s) or glob(s)")
    image_dir: str | None = Field(None, description="where relative image names resolve")
    shard_rows: int = Field(1000, ge=1, description="rows per output shard")


def expand(paths: list[str] | str) -> list[str]:
    out: list[str] = []
    for p in [paths] if isinstance(paths, str) else paths:
        hits = sorted(glob.glob(os.path.expanduser(p)))
        out.extend(hits or [p])  # a pattern that matches nothing stays, and is reported missing
    return out


def _file_key(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{path}:missing"


def empty_rows() -> pa.Table:
    return ROWS_SCHEMA.empty_table()


def missing_input(path: str) -> StageResult:
    return StageResult(empty_rows(), [Reject(None, "input_missing", f"{path} does not exist", "input", payload=path)])


def unreadable_input(path: str, err: Exception | str) -> StageResult:
    return StageResult(empty_rows(), [Reject(None, "input_unreadable", f"{path}: {err}", "input", payload=path)])


def rows_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in ROWS_SCHEMA.names} for r in records], schema=ROWS_SCHEMA)


class _RecordReader(Stage):
    """Base for readers that load a whole file into records, then slice it into shards."""

    kind = "source"
    Config = ReaderConfig
    outputs = ("image", "image_bytes", "captions")

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        raise NotImplementedError

    def input_fingerprint(self) -> str:
        return "|".join(_file_key(p) for p in expand(self.config.path))

    def _load(self, path: str) -> tuple[list[dict], list[Reject]]:
        return _cached_records(type(self).registry_name, self.config.model_dump_json(), path)

    def plan(self) -> list[dict]:
        specs: list[dict] = []
        for path in expand(self.config.path):
            recs, _ = self._load(path) if os.path.exists(path) else ([], [])
            n = max(1, len(recs))
            specs += [{"file": path, "start": s, "stop": s + self.config.shard_rows}
                      for s in range(0, n, self.config.shard_rows)]
        return specs

    def read_shard(self, spec: dict) -> StageResult:
        path = spec["file"]
        if not os.path.exists(path):
            return missing_input(path)
        try:
            recs, rejects = self._load(path)
        except (OSError, ValueError, UnicodeDecodeError, tarfile.TarError) as e:
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


def _dedupe(records: list[dict]) -> tuple[list[dict], list[Reject]]:
    seen: OrderedDict[str, dict] = OrderedDict()
    rejects = []
    for r in records:
        if r["image_id"] in seen:
            rejects.append(Reject(r["image_id"], "row_duplicate_id", "image_id seen earlier in this file",
                                  payload=json.dumps(r.get("captions"))[:2000]))
        else:
            seen[r["image_id"]] = r
    return list(seen.values()), rejects


@register("source.coco.v1")
class CocoCaptions(_RecordReader):
    """COCO captions json (``images`` + ``annotations``); image_id is the file name's stem."""

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        data = json.loads(Path(path).read_text())
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
            recs.append({"image_id": Path(name).stem, "image": self.image_path(name, path),
                         "captions": caps.get(im["id"], [])})
        return recs, rejects


@register("source.flickr30k.v1")
class Flickr30kKarpathy(_RecordReader):
    """Karpathy-split json list of ``{split, image_name, captions}``."""

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        data = json.loads(Path(path).read_text())
        recs, rejects = [], []
        for item in data:
            name = item.get("image_name") if isinstance(item, dict) else None
            if not name:
                rejects.append(Reject(None, "row_bad_record", "record without image_name",
                                      payload=json.dumps(item)[:2000]))
                continue
            recs.append({"image_id": Path(name).stem, "image": self.image_path(name, path),
                         "captions": list(item.get("captions") or [])})
        return _merge(_dedupe(recs), rejects)


@register("source.cc3m_tsv.v1")
class Cc3mTsv(_RecordReader):
    """Conceptual Captions tsv ``caption<TAB>url``; image_id is a hash of the URL (its key)."""

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        by_url: OrderedDict[str, list[str]] = OrderedDict()
        rejects = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or not parts[1].strip():
                    rejects.append(Reject(None, "row_bad_record", f"line {n}: expected caption<TAB>url",
                                          payload=line[:2000]))
                    continue
                by_url.setdefault(parts[1].strip(), []).append(parts[0])
        recs = [{"image_id": hashlib.sha1(url.encode()).hexdigest()[:16], "image": url, "captions": c}
                for url, c in by_url.items()]
        return recs, rejects


@register("source.folder.v1")
class ImageFolder(_RecordReader):
    """A folder of images, each with a sidecar ``.txt`` (one caption per line)."""

    def input_fingerprint(self) -> str:
        return "|".join(_file_key(str(f)) for p in expand(self.config.path) for f in sorted(Path(p).rglob("*")))

    def records(self, path: str) -> tuple[list[dict], list[Reject]]:
        root = Path(path)
        recs, rejects = [], []
        for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            iid = str(img.relative_to(root).with_suffix(""))
            txt = img.with_suffix(".txt")
            try:
                caps = txt.read_text(encoding="utf-8").splitlines() if txt.exists() else []
            except (OSError, UnicodeDecodeError) as e:
                rejects.append(Reject(iid, "row_bad_record", f"{txt}: {e}", payload=str(txt)))
                continue
            recs.append({"image_id": iid, "image": str(img), "captions": caps})
        return recs, rejects


def _merge(a: tuple[list[dict], list[Reject]], extra: list[Reject]) -> tuple[list[dict], list[Reject]]:
    return a[0], extra + a[1]


class Img2DatasetConfig(StageConfig):
    path: list[str] | str = Field(..., description="img2dataset shard files or globs (*.tar or *.parquet)")
    format: Literal["webdataset", "parquet"] = "webdataset"


class _PerFileReader(Stage):
    """Base for readers whose input files are the shards (one output shard per file)."""

    kind = "source"
    outputs = ("image", "image_bytes", "captions")

    def read_file(self, path: str) -> tuple[list[dict], list[Reject]]:
        raise NotImplementedError

    def input_fingerprint(self) -> str:
        return "|".join(_file_key(p) for p in expand(self.config.path))

    def plan(self) -> list[dict]:
        return [{"file": p} for p in expand(self.config.path)]

    def read_shard(self, spec: dict) -> StageResult:
        path = spec["file"]
        if not os.path.exists(path):
            return missing_input(path)
        try:
            recs, rejects = self.read_file(path)
        except (OSError, tarfile.TarError, pa.ArrowException, ValueError) as e:
            return unreadable_input(path, e)
        recs, dups = _dedupe(recs)
        return StageResult(rows_table(recs), rejects + dups)


@register("source.img2dataset.v1")
class Img2Dataset(_PerFileReader):
    """img2dataset output: WebDataset tars (``key.jpg/.txt/.json``) or its Parquet; one shard per file."""

    Config = Img2DatasetConfig

    def read_file(self, path: str) -> tuple[list[dict], list[Reject]]:
        return self._read_tar(path) if self.config.format == "webdataset" else self._read_parquet(path)

    def _read_tar(self, path: str) -> tuple[list[dict], list[Reject]]:
        groups: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = os.path.basename(m.name).partition(".")
                f = tf.extractfile(m)
                groups.setdefault(key, {})[ext.lower()] = f.read() if f else b""
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

    def _read_parquet(self, path: str) -> tuple[list[dict], list[Reject]]:
        t = pq.read_table(path)
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


def _json_or_empty(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


class ParquetConfig(StageConfig):
    path: list[str] | str = Field(..., description="Parquet file(s) or glob(s) with image_id and captions")


@register("source.parquet.v1")
class ProjectParquet(_PerFileReader):
    """The project's own rows Parquet (``image_id``, ``captions``, ``image`` and/or ``image_bytes``)."""

    Config = ParquetConfig

    def read_file(self, path: str) -> tuple[list[dict], list[Reject]]:
        t = pq.read_table(path)
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
    sources: list[dict] = Field(..., min_length=1, description="list of {use: <source stage>, ...its config}")

    @model_validator(mode="after")
    def _check_sources(self) -> "MultiConfig":
        from pipeline import registry

        for i, spec in enumerate(self.sources):
            spec = dict(spec)
            use = spec.pop("use", None)
            try:
                cls = registry.get(str(use))
            except KeyError as e:
                raise ValueError(f"sources[{i}].use: {e.args[0]}") from None
            if cls.kind != "source" or cls is MultiSource:
                raise ValueError(f"sources[{i}].use: {use} is not a plain source stage")
            try:
                cls.Config.model_validate(spec)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"sources[{i}].{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self


@register("source.multi.v1")
class MultiSource(Stage):
    """Several sources as one input (e.g. CC3M tsv + Flickr30k json for one vocabulary)."""

    kind = "source"
    Config = MultiConfig
    outputs = ("image", "image_bytes", "captions")

    def _subs(self) -> list[Stage]:
        from pipeline import registry

        subs = []
        for spec in self.config.sources:
            spec = dict(spec)
            cls = registry.get(spec.pop("use"))
            subs.append(cls(cls.Config.model_validate(spec), self.context))
        return subs

    def input_fingerprint(self) -> str:
        return "||".join(getattr(s, "input_fingerprint", lambda: "")() for s in self._subs())

    def plan(self) -> list[dict]:
        return [{"source": i, **spec} for i, sub in enumerate(self._subs()) for spec in sub.plan()]

    def read_shard(self, spec: dict) -> StageResult:
        spec = dict(spec)
        return self._subs()[spec.pop("source")].read_shard(spec)
