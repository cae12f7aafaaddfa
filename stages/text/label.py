"""label.v1: parse_label_id per caption, union_label_id, and the first tag_events (source: parse)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import TAG_EVENT
from stages.text.parse import TAG_KINDS


class LabelConfig(StageConfig):
    kinds: list[str] = Field(list(TAG_KINDS), description="which candidate kinds become labels")


@register("label.v1")
class LabelStage(Stage):
    """Maps each caption's candidate tags to tag ids through names and synonyms."""

    Config = LabelConfig
    inputs = ("image_id", "parsed")
    outputs = ("parse_label_id", "union_label_id", "tag_events")
    needs = ("tagset",)

    def setup(self) -> None:
        from tagset.tagset import TagSet

        bad = [k for k in self.config.kinds if k not in TAG_KINDS]
        if bad:
            raise ValueError(f"label.kinds: unknown kind(s) {bad}; expected a subset of {list(TAG_KINDS)}")
        self.tagset = TagSet.load(self.context.artifact("tagset"))

    def label_row(self, parsed: list[dict]) -> tuple[list[list[int]], list[int], list[dict]]:
        per_caption: list[list[int]] = []
        first_seen: dict[int, dict] = {}
        for ci, cap in enumerate(parsed):
            ids: list[int] = []
            for kind in self.config.kinds:
                for name in cap.get(kind) or []:
                    tid = self.tagset.id_of(name)
                    if tid is None:
                        continue
                    if tid not in ids:
                        ids.append(tid)
                    ev = first_seen.setdefault(tid, {"captions": [], "names": []})
                    if ci not in ev["captions"]:
                        ev["captions"].append(ci)
                    if name not in ev["names"]:
                        ev["names"].append(name)
            per_caption.append(sorted(ids))
        union = sorted(first_seen)
        events = [{"tag_id": t, "stage": "label", "action": "add", "reason": "parse",
                   "score": len(first_seen[t]["captions"]) / max(1, len(parsed)),
                   "evidence": json.dumps(first_seen[t], sort_keys=True)} for t in union]
        return per_caption, union, events

    def shard_summary(self, table: pa.Table, shard: int):
        """On a scene world (a ``truth`` artifact exists), this shard's parse-only labels scored against the
        same shard's truth (the truth side table is written shard for shard with the rows)."""
        if "truth" not in self.context.artifacts:
            return None
        import pyarrow.parquet as pq

        from stages.world.score import label_counts

        truth = pq.read_table(Path(self.context.artifact("truth")) / "truth" / f"part-{shard:05d}.parquet")
        return label_counts(table, truth, self.tagset)

    def merge_summaries(self, summaries: list) -> dict:
        if "truth" not in self.context.artifacts:
            return {}
        from stages.world.score import finish_score, merge_counts, write_score

        q = finish_score(merge_counts(s for s in summaries if s))
        write_score(q, self.context.step_dir / "quality.json")
        return {"quality": {k: q[k] for k in ("precision", "recall", "f1")},
                "summary": f"vs truth: P {q['precision']:.3f} R {q['recall']:.3f} F1 {q['f1']:.3f}"}

    def __call__(self, batch: pa.Table) -> StageResult:
        rows = [self.label_row(p or []) for p in batch.column("parsed").to_pylist()]
        out = batch
        for name, typ, idx in (("parse_label_id", pa.list_(pa.list_(pa.int32())), 0),
                               ("union_label_id", pa.list_(pa.int32()), 1),
                               ("tag_events", pa.list_(TAG_EVENT), 2)):
            col = pa.array([r[idx] for r in rows], typ)
            if name in out.column_names:
                out = out.set_column(out.schema.get_field_index(name), name, col)
            else:
                out = out.append_column(name, col)
        return StageResult(out)
