"""Readers that split a record file into byte ranges on the driver and read one range per worker.

``plan()`` never parses records: line files (TSV, JSONL) are split by seeking near each split point
and moving to the next line start; JSON arrays by a streamed index of their top-level elements
(``jsonscan``). A spec is a small dict of byte offsets. A worker reads its range and no more, except
to finish a run: consecutive records of one key (one image's captions) belong to the range where the
run starts, so a worker skips a leading run that continues the previous range's last record and
reads past its end while its last key goes on. Within a range each reader combines records by key
(merging captions or rejecting duplicates); keys that repeat non-adjacently in different ranges are
not seen together (docs/data.md says how to sort such a file).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, ClassVar, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from common.rejects import Reject
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import ROWS_SCHEMA
from stages.readers import fs, jsonscan, lines

URL_ONLY_REASON = ("image is only a URL ({url}): download it first with img2dataset and read its output "
                   "(source.img2dataset.v1), or set urls: keep for workflows that never open images")


class ReaderConfig(StageConfig):
    path: list[str] | str = Field(..., description="file(s) or glob(s); plain paths or fsspec URIs (s3://, gs://, file://)")
    image_dir: str | None = Field(None, description="where relative image names resolve")
    shard_rows: int = Field(1000, ge=1, description="rows per output shard (line files: about that many)")


class RangeReaderConfig(ReaderConfig):
    shard_bytes: int | None = Field(None, ge=1, description="line files (tsv, jsonl): bytes per shard; default "
                                                            "shard_rows x the mean line length of the file's head")


def empty_rows(schema: pa.Schema = ROWS_SCHEMA) -> pa.Table:
    return schema.empty_table()


def missing_input(path: str, schema: pa.Schema = ROWS_SCHEMA) -> StageResult:
    return StageResult(empty_rows(schema), [Reject(None, "input_missing", f"{path} does not exist", "input",
                                                   payload=path)])


def unreadable_input(path: str, err: Exception | str, schema: pa.Schema = ROWS_SCHEMA) -> StageResult:
    return StageResult(empty_rows(schema), [Reject(None, "input_unreadable", f"{path}: {err}", "input",
                                                   payload=path)])


def planned_input_problem(spec: dict, schema: pa.Schema = ROWS_SCHEMA) -> StageResult | None:
    """A planned file that cannot be read (planning failed, or it is gone): the shard's input reject."""
    if spec.get("error"):
        return unreadable_input(spec["file"], spec["error"], schema)
    if not fs.exists(spec["file"]):
        return missing_input(spec["file"], schema)
    return None


def rows_table(records: list[dict], schema: pa.Schema = ROWS_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in records], schema=schema)


def dedupe(records: list[dict], where: str = "this file") -> tuple[list[dict], list[Reject]]:
    """First row of each image_id wins; later ones are rejected with their captions as the payload."""
    seen: OrderedDict[str, dict] = OrderedDict()
    rejects = []
    for r in records:
        if r["image_id"] in seen:
            rejects.append(Reject(r["image_id"], "row_duplicate_id", f"image_id seen earlier in {where}",
                                  payload=json.dumps(r.get("captions"))[:2000]))
        else:
            seen[r["image_id"]] = r
    return list(seen.values()), rejects


def merge_by_key(entries: list["Entry"]) -> list[dict]:
    """One row per key, in order of first appearance, with the captions of all its records."""
    rows: OrderedDict[str, dict] = OrderedDict()
    for e in entries:
        if e.key in rows:
            rows[e.key]["captions"] = rows[e.key]["captions"] + e.row["captions"]
        else:
            rows[e.key] = dict(e.row)
    return list(rows.values())


def url_only_rejects(rows: list[dict], policy: str) -> tuple[list[dict], list[Reject]]:
    """``urls: reject``: rows whose image is only an http(s) URL (no bytes) leave with a reject."""
    if policy != "reject":
        return rows, []
    kept, rejects = [], []
    for r in rows:
        if r.get("image_bytes") is None and fs.is_http_url(r.get("image")):
            rejects.append(Reject(r["image_id"], "row_image_url_only", URL_ONLY_REASON.format(url=r["image"]),
                                  payload=json.dumps(r.get("captions"))[:2000]))
        else:
            kept.append(r)
    return kept, rejects


def text_of(raw: bytes) -> str:
    return raw[:2000].decode("utf-8", "replace")


@dataclass
class Entry:
    """One parsed record: the key its run and merges go by, and its row."""

    key: str
    row: dict


Parsed = Entry | Reject | None  # None: a blank record, which carries nothing and ends a run


class RangeReader(Stage):
    """Base of the streamed readers: ``detect`` a file's format, ``parse`` one record, ``combine`` a range."""

    kind = "source"
    Config = RangeReaderConfig
    outputs = ("image", "image_bytes", "captions")
    schema: ClassVar[pa.Schema] = ROWS_SCHEMA
    chunk_bytes: int = jsonscan.CHUNK  # read size; an instance may set a smaller one (tests)
    max_record_bytes: int = jsonscan.MAX_ELEMENT

    # -- what a reader defines ---------------------------------------------------------------
    def detect(self, head: bytes) -> Literal["json", "lines"]:
        """The file's format from its first bytes; raises ValueError for a file this reader cannot read."""
        raise NotImplementedError

    def parse(self, raw: bytes, where: str, path: str) -> Parsed:
        """One record (a line without its newline, or an element without surrounding blanks): an
        Entry, a Reject, or None for a blank record (a JSON array's or JSONL file's empty line)."""
        raise NotImplementedError

    def combine(self, entries: list[Entry]) -> tuple[list[dict], list[Reject]]:
        return dedupe([e.row for e in entries], "this shard's range of the file")

    def image_path(self, name: str, source_file: str) -> str:
        base = self.config.image_dir or fs.join(fs.dirname(source_file), "images")
        return name if name.startswith("/") or "://" in name else fs.join(base, name)

    # -- driver ------------------------------------------------------------------------------
    def input_fingerprint(self) -> str:
        return "|".join(fs.file_key(p) for p in fs.expand(self.config.path))

    def plan(self) -> list[dict]:
        return [spec for path in fs.expand(self.config.path) for spec in self._plan_file(path)]

    def _plan_file(self, path: str) -> list[dict]:
        if not fs.exists(path):
            return [{"file": path, "start": 0, "stop": 0}]
        try:
            with fs.open_input(path) as f:
                head = f.read(lines.SAMPLE)
                fmt = self.detect(head)
                if fmt == "json":
                    ranges, error = jsonscan.index_array(f, self.config.shard_rows, self.chunk_bytes,
                                                         self.max_record_bytes)
                    specs = [{"file": path, "format": "json", "start": r.start, "stop": r.stop, "first": r.first,
                              "line": r.line, "prev": list(r.prev) if r.prev else None} for r in ranges]
                else:
                    target = self.config.shard_bytes or lines.bytes_per_range(head, self.config.shard_rows)
                    specs = [{"file": path, "format": "lines", "start": a, "stop": b}
                             for a, b in lines.line_ranges(f, fs.size(path), target)]
                    error = None
        except (OSError, ValueError) as e:
            return [{"file": path, "error": str(e)}]
        return specs + ([{"file": path, "error": error}] if error else [])

    # -- worker ------------------------------------------------------------------------------
    def read_shard(self, spec: dict) -> StageResult:
        path = spec["file"]
        problem = planned_input_problem(spec, self.schema)
        if problem is not None:
            return problem
        if "format" not in spec:  # planned while the file was missing
            return unreadable_input(path, "the file appeared after the run was planned; plan again", self.schema)
        try:
            with fs.open_input(path) as f:
                entries, rejects = self._read_range(f, spec, path)
        except OSError as e:
            return unreadable_input(path, e, self.schema)
        rows, more = self.combine(entries)
        rows, urls = url_only_rejects(rows, getattr(self.config, "urls", "keep"))
        return StageResult(rows_table(rows, self.schema), rejects + more + urls)

    def _records(self, f: IO[bytes], spec: dict) -> Iterator[tuple[int, bytes | None, str]]:
        """``(offset, raw, where)`` of each record from the range's start on (past its end too)."""
        if spec["format"] == "json":
            idx = spec["first"]
            for el in jsonscan.iter_elements(f, spec["start"], spec["line"], self.chunk_bytes, self.max_record_bytes):
                yield el.offset, el.raw, f"line {el.line} (element {idx})"
                idx += 1
            return
        n = 1
        for off, line in lines.iter_lines(f, spec["start"], self.chunk_bytes, self.max_record_bytes):
            where = f"line {n}" if spec["start"] == 0 else f"byte {off}"
            if line is None:
                yield off, None, f"{where}: longer than {self.max_record_bytes} bytes"
            else:
                yield off, line.removesuffix(b"\r"), where
            n += 1

    def _prev(self, f: IO[bytes], spec: dict, path: str) -> Parsed:
        if spec["format"] == "json":
            if not spec.get("prev"):
                return None
            a, b = spec["prev"]
            f.seek(a)
            raw = f.read(b - a).strip()
        else:
            line = lines.prev_line(f, spec["start"], self.max_record_bytes)
            raw = line.removesuffix(b"\r") if line is not None else b""
        return self.parse(raw, "previous record", path) if raw else None

    def _read_range(self, f: IO[bytes], spec: dict, path: str) -> tuple[list[Entry], list[Reject]]:
        prev = self._prev(f, spec, path)
        skip_key = prev.key if isinstance(prev, Entry) else None
        entries: list[Entry] = []
        rejects: list[Reject] = []
        last_key: str | None = None
        leading = True
        for off, raw, where in self._records(f, spec):
            got: Parsed = Reject(None, "row_bad_record", where) if raw is None else self.parse(raw, where, path)
            if off >= spec["stop"]:  # past the range: only the run of its last record goes on
                if isinstance(got, Entry) and last_key is not None and got.key == last_key:
                    entries.append(got)
                    continue
                break
            if leading and isinstance(got, Entry) and skip_key is not None and got.key == skip_key:
                continue  # the previous range's run: read there
            leading = False
            if isinstance(got, Entry):
                entries.append(got)
                last_key = got.key
            else:
                if got is not None:
                    rejects.append(got)
                last_key = None
        return entries, rejects
