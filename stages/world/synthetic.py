"""source.synthetic_regions.v1: a SIMULATED corpus of tag regions, for scale benchmarks and engine tests.

It stands in for what ground + embed + verify write on real images, at sizes these machines cannot
render: per image a few tags drawn from a Zipf law over ``tags`` ids, each with a box, a whole-image
score, a crop score and a float16 embedding (a few modes per tag plus noise, some regions far off), and
parse labels for most of them. No image exists; nothing here measures tagging quality. It provides a
``tagset`` (names ``tag0``, ``tag1``, ...) so decide and report run on it unchanged.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import PSEUDO_SCORE, REGION, REGION_EMBED, ROWS_SCHEMA, TAG_EVENT, TAG_SCORE


class SyntheticRegionsConfig(StageConfig):
    images: int = Field(10000, ge=1)
    tags: int = Field(4585, ge=1, description="tag ids (RAM: 4,585)")
    dim: int = Field(512, ge=2, description="embedding width (RAM's image_proj: 512)")
    zipf: float = Field(1.3, gt=1, description="tag frequency law: P(rank r) ~ r^-zipf")
    regions_per_image: float = Field(3.0, gt=0, description="mean regions per image (1 + Poisson)")
    modes: int = Field(3, ge=1, description="clusters each tag's embeddings come from")
    outlier_share: float = Field(0.1, ge=0, le=1, description="regions drawn far from their tag's modes")
    parse_share: float = Field(0.7, ge=0, le=1, description="regions whose tag is also a parse label")
    shard_rows: int = Field(2000, ge=1)


@functools.lru_cache(maxsize=4)
def _modes(seed: int, tags: int, modes: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).normal(size=(tags, modes, dim)).astype(np.float32)


@register("source.synthetic_regions.v1")
class SyntheticRegions(Stage):
    """Rows with ``regions``, ``region_embeds``, ``tag_scores``, ``crop_scores`` and parse labels (simulated)."""

    kind = "source"
    Config = SyntheticRegionsConfig
    outputs = ("image", "image_bytes", "captions", "union_label_id", "parse_label_id", "tag_events", "tag_scores",
               "regions", "crop_scores", "view_scores", "region_embeds")
    provides = ("tagset",)

    def plan(self) -> list[dict]:
        n, s = self.config.images, self.config.shard_rows
        return [{"start": a, "stop": min(n, a + s)} for a in range(0, n, s)]

    def read_shard(self, spec: dict) -> StageResult:
        c = self.config
        rng = np.random.default_rng([self.context.seed, spec["start"]])
        n = spec["stop"] - spec["start"]
        per = 1 + rng.poisson(c.regions_per_image - 1, n) if c.regions_per_image > 1 else np.ones(n, np.int64)
        total = int(per.sum())
        raw = rng.zipf(c.zipf, total * 2)
        tags = (raw[raw <= c.tags][:total] - 1) if (raw <= c.tags).sum() >= total else (raw - 1) % c.tags
        tags = tags.astype(np.int32)
        modes = _modes(self.context.seed, c.tags, c.modes, c.dim)
        which = rng.integers(0, c.modes, total)
        emb = modes[tags, which] + rng.normal(0, 0.5, (total, c.dim)).astype(np.float32)
        far = rng.random(total) < c.outlier_share
        emb[far] = rng.normal(0, 2.0, (int(far.sum()), c.dim))
        scores = np.clip(rng.beta(4, 2, total) - 0.3 * far, 0, 1)
        crops = np.clip(rng.beta(4, 2, total) - 0.4 * far, 0, 1)
        parse = rng.random(total) < c.parse_share
        boxes = np.sort(rng.uniform(0, 224, (total, 2, 2)), axis=1).reshape(total, 4)[:, [0, 2, 1, 3]]
        ids = [f"syn{spec['start'] + i:09d}" for i in range(n)]
        cols: dict[str, list] = {k: [] for k in ("union_label_id", "parse_label_id", "tag_events", "tag_scores",
                                                 "regions", "crop_scores")}
        offsets, order = [0], []
        o = 0
        for i in range(n):
            seen: dict[int, int] = {}
            for j in range(o, o + int(per[i])):
                seen.setdefault(int(tags[j]), j)  # one region per (image, tag)
            js = sorted(seen.values(), key=lambda j: tags[j])
            order += js
            labels = sorted(int(tags[j]) for j in js if parse[j])
            cols["union_label_id"].append(labels)
            cols["parse_label_id"].append([labels])
            cols["tag_events"].append([{"tag_id": t, "stage": "label", "action": "add", "reason": "parse",
                                        "score": 1.0, "evidence": json.dumps({"captions": [0]})} for t in labels])
            cols["tag_scores"].append([{"tag_id": int(tags[j]), "score": float(scores[j]), "threshold": 0.5}
                                       for j in js])
            cols["regions"].append([{"tag_id": int(tags[j]), "box": [float(v) for v in boxes[j]],
                                     "score": float(scores[j]), "backend": "synthetic"} for j in js])
            cols["crop_scores"].append([{"tag_id": int(tags[j]), "score": float(crops[j])} for j in js])
            offsets.append(offsets[-1] + len(js))
            o += int(per[i])
        order = np.asarray(order, np.int64)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(emb[order].astype(np.float16).reshape(-1), pa.float16()),
                                                  c.dim).cast(pa.list_(pa.float16()))
        structs = pa.StructArray.from_arrays([pa.array(tags[order], pa.int32()), inner], fields=list(REGION_EMBED))
        table = pa.table({
            "image_id": pa.array(ids, pa.string()), "image": pa.nulls(n, pa.string()),
            "image_bytes": pa.nulls(n, pa.binary()), "captions": pa.array([[] for _ in ids], pa.list_(pa.string())),
            "union_label_id": pa.array(cols["union_label_id"], pa.list_(pa.int32())),
            "parse_label_id": pa.array(cols["parse_label_id"], pa.list_(pa.list_(pa.int32()))),
            "tag_events": pa.array(cols["tag_events"], pa.list_(TAG_EVENT)),
            "tag_scores": pa.array(cols["tag_scores"], pa.list_(PSEUDO_SCORE)),
            "regions": pa.array(cols["regions"], pa.list_(REGION)),
            "crop_scores": pa.array(cols["crop_scores"], pa.list_(TAG_SCORE)),
            "view_scores": pa.array([[] for _ in ids], pa.list_(TAG_SCORE)),
            "region_embeds": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs,
                                                      type=pa.list_(REGION_EMBED)),
        })
        assert table.schema.field("image").type == ROWS_SCHEMA.field("image").type
        return StageResult(table)

    def finalize(self, step_dir) -> dict:
        from tagset.tagset import Tag, TagSet
        from pipeline.store import write_bytes_atomic, write_parquet_atomic

        ts = TagSet([Tag(i, f"tag{i}", kind="object") for i in range(self.config.tags)])
        write_parquet_atomic(ts.to_table(), step_dir / "tagset.parquet")
        for name, data in ts.files().items():
            write_bytes_atomic(data, step_dir / name)
        return {"simulated": True, "summary": "SIMULATED regions (source.synthetic_regions.v1): no images exist"}

