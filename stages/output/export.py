"""export.ram.v1: RAM's training schema as Parquet shards, the same rows as JSONL shards beside them,
and (when asked) one official-style ``ram_train.json`` stitched from the JSONL without parsing it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from common.files import temp_path
from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from pipeline.store import write_bytes_atomic

EXPORT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_path", pa.string()), ("caption", pa.list_(pa.string())),
    ("union_label_id", pa.list_(pa.int32())), ("parse_label_id", pa.list_(pa.list_(pa.int32()))),
])
RECORD_KEYS = EXPORT_SCHEMA.names[1:]  # one line of the JSONL / one entry of ram_train.json
JSONL = "jsonl"  # side-file extension: <step>/jsonl/part-NNNNN.jsonl, one per Parquet shard
MAX_NAME = 160  # longer (escaped) image ids are cut and made unique by their hash: NAME_MAX is 255 bytes
_CHUNK = 1 << 20


class ExportConfig(StageConfig):
    json_name: str = Field("ram_train.json", description="official-style training json, stitched last")
    write_json: bool = Field(True, description="also write one json list (the JSONL shards are always written)")


def _ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"\xff\xd8":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def image_file(image_id: str, ext: str) -> str:
    """Where an inline image goes, relative to the export dir: ``images/<2 hex>/<2 hex>/<name><ext>``.

    The two folder levels come from a sha1 of the id, so every folder above the leaves holds at most 256
    entries and a leaf about N / 65,536 files (14M images: ~214). The name is the id percent-escaped
    (slashes, a leading dot and other odd characters become plain, distinct file names); an empty or
    long one is cut and ends with the id's full hash, which keeps it unique."""
    h = hashlib.sha1(image_id.encode()).hexdigest()
    name = quote(image_id, safe="")  # injective: "%" itself is escaped
    if name.startswith("."):  # no hidden files, no "." or "..": quote never writes "%2E" itself
        name = "%2E" + name[1:]
    if not name or len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 41]}-{h}"
    return f"images/{h[:2]}/{h[2:4]}/{name}{ext}"


def _is_local(path: str) -> bool:
    return "://" not in path


@register("export.ram.v1")
class ExportStage(Stage):
    """Writes inline image bytes under ``images/`` so every row has an ``image_path`` a trainer can open."""

    Config = ExportConfig
    inputs = ("image_id", "image", "image_bytes", "captions", "union_label_id", "parse_label_id")
    outputs = ("image_path", "caption", "union_label_id", "parse_label_id")
    needs = ("tagset",)
    replaces_columns = True

    def _image_path(self, row: dict, step_dir: Path) -> str | None:
        """A local path as the source gave it; else the inline bytes written out (a URL cannot be opened
        by a trainer, so img2dataset rows, which carry both, get their bytes written).

        The file is written every time, never taken as it is found: a file already there was left by a
        killed attempt or another image of the same name, and its bytes are not this row's to vouch for.
        (A step's fingerprint change clears its directory; the input step fails on a repeated id.)"""
        path, data = row.get("image"), row.get("image_bytes")
        if path and (data is None or _is_local(path)):
            return path
        if data is None:
            return None
        rel = image_file(row["image_id"], _ext(data))
        write_bytes_atomic(data, step_dir / rel)
        return rel

    def __call__(self, batch: pa.Table) -> StageResult:
        step_dir = Path(self.context.run_dir) / self.context.step
        rows, rejects, lines = [], [], []
        for r in batch.to_pylist():
            path = self._image_path(r, step_dir)
            if path is None:
                rejects.append(Reject(r["image_id"], "row_no_image", "no image path or bytes to export"))
                continue
            rec = {"image_path": path, "caption": r["captions"], "union_label_id": r["union_label_id"],
                   "parse_label_id": r["parse_label_id"]}
            rows.append({"image_id": r["image_id"], **rec})
            lines.append(json.dumps(rec) + "\n")  # json.dumps escapes newlines: one record, one line
        table = pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA)
        return StageResult(table, rejects, files={JSONL: "".join(lines).encode()})

    def finalize(self, step_dir: Path) -> dict:
        tagset_dir = self.context.artifact("tagset")
        for name in ("tag_list.txt", "tag_list_threshold.txt", "tag_list_chinese.txt", "synonyms.json"):
            if (tagset_dir / name).exists():
                shutil.copyfile(tagset_dir / name, step_dir / name)
        if not self.config.write_json:
            return {}
        return {"json_rows": stitch_json(step_dir, step_dir / self.config.json_name)}


def _jsonl_shards(step_dir: Path) -> list[tuple[Path, int]]:
    """Each Parquet shard's JSONL file with its row count (from the Parquet footer), in shard order."""
    out = []
    for part in sorted(step_dir.glob("part-*.parquet")):
        jl = step_dir / JSONL / f"{part.stem}.{JSONL}"
        if not jl.exists():
            raise FileNotFoundError(f"export shard {part.name} has no {JSONL}/{jl.name}")
        out.append((jl, pq.ParquetFile(part).metadata.num_rows))
    return out


def stitch_json(step_dir: Path, dest: Path) -> int:
    """One JSON list from the JSONL shards, copied in 1 MiB chunks (memory does not grow with rows).

    Lines become list entries by turning every newline into ``,\\n`` and cutting the last comma;
    a shard whose line count differs from its Parquet rows fails the step. Written to a temp name and
    renamed, so a reader never sees half a file. Returns the number of records."""
    tmp = temp_path(dest)
    total = 0
    with open(tmp, "wb") as out:
        out.write(b"[\n")
        for jl, rows in _jsonl_shards(step_dir):
            lines, last = 0, b"\n"
            with open(jl, "rb") as f:
                while chunk := f.read(_CHUNK):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
                    out.write(chunk.replace(b"\n", b",\n"))
            if lines != rows or last != b"\n":
                raise RuntimeError(f"export: {jl.name} holds {lines} lines for {rows} Parquet rows")
            total += lines
        if total:
            out.seek(out.tell() - 2)  # the last record's ",\n"
            out.truncate()
            out.write(b"\n")
        out.write(b"]\n")
    os.replace(tmp, dest)
    return total
