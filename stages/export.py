"""export.ram.v1: RAM's training schema as Parquet, plus the official-style training json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.errors import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from pipeline.store import write_bytes_atomic

EXPORT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_path", pa.string()), ("caption", pa.list_(pa.string())),
    ("union_label_id", pa.list_(pa.int32())), ("parse_label_id", pa.list_(pa.list_(pa.int32()))),
])


class ExportConfig(StageConfig):
    json_name: str = Field("ram_train.json", description="official-style training json, written last")
    write_json: bool = True


def _ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"\xff\xd8":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


@register("export.ram.v1")
class ExportStage(Stage):
    """Writes inline image bytes to ``images/`` so every row has an ``image_path`` a trainer can open."""

    Config = ExportConfig
    inputs = ("image_id", "captions", "union_label_id", "parse_label_id")
    optional_inputs = ("image", "image_bytes")
    outputs = ("image_path", "caption", "union_label_id", "parse_label_id")
    needs = ("tagset",)
    replaces_columns = True

    def __call__(self, batch: pa.Table) -> StageResult:
        step_dir = Path(self.context.run_dir) / self.context.step
        cols = batch.column_names
        rows, rejects = [], []
        for r in batch.to_pylist():
            path = r.get("image") if "image" in cols else None
            data = r.get("image_bytes") if "image_bytes" in cols else None
            if path is None and data is not None:
                rel = f"images/{r['image_id']}{_ext(data)}"
                if not (step_dir / rel).exists():
                    write_bytes_atomic(data, step_dir / rel)
                path = rel
            if path is None:
                rejects.append(Reject(r["image_id"], "row_no_image", "no image path or bytes to export"))
                continue
            rows.append({"image_id": r["image_id"], "image_path": path, "caption": r["captions"],
                         "union_label_id": r["union_label_id"], "parse_label_id": r["parse_label_id"]})
        return StageResult(pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA), rejects)

    def finalize(self, step_dir: Path) -> dict:
        tagset_dir = self.context.artifact("tagset")
        for name in ("tag_list.txt", "tag_list_threshold.txt", "tag_list_chinese.txt", "synonyms.json"):
            if (tagset_dir / name).exists():
                shutil.copyfile(tagset_dir / name, step_dir / name)
        if not self.config.write_json:
            return {}
        tmp = step_dir / f".{self.config.json_name}.tmp"
        n = 0
        with open(tmp, "w") as f:
            f.write("[")
            for part in sorted(step_dir.glob("part-*.parquet")):
                for r in pq.read_table(part, columns=EXPORT_SCHEMA.names[1:]).to_pylist():
                    f.write(("," if n else "") + "\n" + json.dumps(r))
                    n += 1
            f.write("\n]\n")
        tmp.replace(step_dir / self.config.json_name)
        return {"json_rows": n}
