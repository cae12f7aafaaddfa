"""source.ram_export.v1: read back an export directory this engine wrote (``export.ram.v1``), so a tagger
can be retrained on it, or its labels cleaned again, without parsing a caption.

The rows are the export's Parquet shards (``part-*.parquet``: image_id, image_path, caption,
union_label_id, parse_label_id). Its labels travel as ``source_union_label_id`` /
``source_parse_label_id``, as with ``source.ram_json.v1``: ids into the export's own ``tag_list.txt``,
which ``label.source.v1`` maps by name into the run's tagset.
"""
from __future__ import annotations

from typing import Literal

import pyarrow.parquet as pq
from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import StageConfig
from stages.readers import fs
from stages.readers.files import PerFileReader
from stages.readers.sources_json import RAM_ROWS_SCHEMA

PARTS = "part-*.parquet"
EXPORT_COLUMNS = ("image_id", "image_path", "caption", "union_label_id", "parse_label_id")


class RamExportConfig(StageConfig):
    path: list[str] | str = Field(..., description="export directories (each holding the part-*.parquet shards "
                                  "export.ram.v1 wrote), globs of them, or part files; plain paths or fsspec URIs")
    image_dir: str | None = Field(None, description="where relative image_path values resolve (default: the "
                                  "folder of the part file, the export directory, as export.ram.v1 writes them)")
    shard_rows: int | None = Field(None, ge=1, description="split a part file into shards of whole row groups, "
                                   "about this many rows each (default: one shard per part file)")
    urls: Literal["keep", "reject"] = Field("reject", description="rows whose image_path is an http(s) URL: "
                                            "reject (download them first) or keep")


def _expand(paths: list[str] | str) -> list[str]:
    """Paths and globs: a glob matching directories gives them, else the files it matches."""
    out: list[str] = []
    for p in [paths] if isinstance(paths, str) else paths:
        dirs = fs.expand(p, dirs=True)
        out += dirs if dirs != [p] or fs.isdir(p) else fs.expand(p)
    return out


@register("source.ram_export.v1")
class RamExport(PerFileReader):
    """An export.ram.v1 directory read back, with its labels as source_union_label_id / source_parse_label_id.

    One shard per part file, or per run of its row groups (``shard_rows``): the driver reads only the
    directory listing and each file's footer. image_id is the export's own; a repeated id in one shard is
    rejected (``row_duplicate_id``); a row without image_path is ``row_no_image``."""

    Config = RamExportConfig
    outputs = ("image", "image_bytes", "captions", "source_union_label_id", "source_parse_label_id")
    schema = RAM_ROWS_SCHEMA

    def _files(self) -> list[str | tuple[str, str]]:
        """Part files in order; a directory without any gives ``(directory, why)``."""
        out: list[str | tuple[str, str]] = []
        for p in _expand(self.config.path):
            if fs.isdir(p):
                parts = [f for f in fs.expand(fs.join(p, PARTS)) if fs.exists(f)]
                out += parts or [(p, f"no {PARTS} in this directory: is it an export.ram.v1 step directory?")]
            else:
                out.append(p)
        return out

    def input_fingerprint(self) -> str:
        return "|".join(fs.file_key(f) if isinstance(f, str) else f"{f[0]}:empty" for f in self._files())

    def plan(self) -> list[dict]:
        specs: list[dict] = []
        for f in self._files():
            if not isinstance(f, str):
                specs.append({"file": f[0], "error": f[1]})
            elif self.config.shard_rows is None or not fs.exists(f):
                specs.append({"file": f})
            else:
                specs += self._row_group_specs(f)
        return specs

    def _row_group_specs(self, path: str) -> list[dict]:
        """Runs of whole row groups of about ``shard_rows`` rows, from the footer alone."""
        try:
            with fs.open_input(path) as fh:
                meta = pq.ParquetFile(fh).metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            return [{"file": path, "error": str(e)}]
        specs, run, rows = [], [], 0
        for g in range(meta.num_row_groups):
            run.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= self.config.shard_rows:  # type: ignore[operator]
                specs.append({"file": path, "row_groups": run})
                run, rows = [], 0
        if run or not specs:
            specs.append({"file": path, "row_groups": run})
        return specs

    def read_spec(self, spec: dict) -> tuple[list[dict], list[Reject]]:
        path = spec["file"]
        with fs.open_input(path) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in EXPORT_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"not an export.ram.v1 shard: no column(s) {missing}")
            groups = spec.get("row_groups")
            table = pf.read(columns=list(EXPORT_COLUMNS)) if groups is None else \
                pf.read_row_groups(groups, columns=list(EXPORT_COLUMNS))
        base = self.config.image_dir or fs.dirname(path)
        rows, rejects = [], []
        for r in table.to_pylist():
            iid, name = r["image_id"], r["image_path"]
            if not name:
                rejects.append(Reject(iid, "row_no_image", f"{path}: row without image_path",
                                      payload=str(r["caption"])[:2000]))
                continue
            image = name if name.startswith("/") or "://" in name else fs.join(base, name)
            rows.append({"image_id": iid, "image": image, "captions": r["caption"] or [],
                         "source_union_label_id": r["union_label_id"],
                         "source_parse_label_id": r["parse_label_id"]})
        return rows, rejects
