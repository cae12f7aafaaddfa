"""pseudolabel.v1 and ground.v1: the base tagger's scores for every image, then a region per candidate tag.

Neither decides anything: pseudolabel keeps sparse scores (every tag at or above ``floor``, the
``top_k`` best, and the image's parse tags whatever their score); ground boxes the candidate tags.
``decide.v1`` turns the evidence into labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import Stage, StageResult
from stages.vision import (IMAGE_COLUMNS, BaseTagger, ImageLimits, TaggerConfig, attention_box, clip_box, open_image,
                           pseudo_type, region_types, resolve_device)


class VisionConfig(TaggerConfig, ImageLimits):
    """Base tagger + image limits, shared by every stage that looks at pixels."""


def image_base(context) -> Path:
    return Path(context.run_dir)


def load_images(stage: Stage, batch: pa.Table) -> tuple[list[int], list, list]:
    """Decoded images of a batch: (row indices that decoded, images, rejects)."""
    cols = [c for c in ("image_id", "image", "image_bytes", "image_path") if c in batch.column_names]
    keep, images, rejects = [], [], []
    for i, r in enumerate(batch.select(cols).to_pylist()):
        img, rej = open_image(r, image_base(stage.context), stage.config)
        if rej is not None:
            rejects.append(rej)
        else:
            keep.append(i)
            images.append(img)
    return keep, images, rejects


class PseudoLabelConfig(VisionConfig):
    floor: float = Field(0.05, ge=0, le=1, description="keep every tag scoring at least this")
    top_k: int = Field(10, ge=0, description="and the k best tags of each image")


@register("pseudolabel.v1")
class PseudoLabelStage(Stage):
    """Batched base-tagger scores; an actor per worker holds the model (GPU if resources ask for one)."""

    Config = PseudoLabelConfig
    inputs = ("image_id", "union_label_id")
    optional_inputs = IMAGE_COLUMNS
    outputs = ("tag_scores",)
    needs = ("tagset",)

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.tagset = TagSet.load(self.context.artifact("tagset"))
        self.tagger = BaseTagger.load(self.config, self.context.artifacts, self.tagset.names,
                                      self.tagset.thresholds())

    def input_fingerprint(self) -> str:
        return _checkpoint_fingerprint(self.config)

    def __call__(self, batch: pa.Table) -> StageResult:
        score_t = pseudo_type()
        th = self.tagger.threshold_of_tag
        keep, images, rejects = load_images(self, batch)
        scores = self.tagger.scores(images) if images else np.zeros((0, 0), np.float32)
        parse = batch.column("union_label_id").to_pylist()
        out = []
        for j, i in enumerate(keep):
            s = scores[j]
            chosen = set(np.nonzero(np.nan_to_num(s, nan=-1) >= self.config.floor)[0].tolist())
            if self.config.top_k:
                order = np.argsort(-np.nan_to_num(s, nan=-1), kind="stable")[: self.config.top_k]
                chosen |= {int(t) for t in order if not np.isnan(s[t])}
            chosen |= {t for t in (parse[i] or []) if t < len(s) and not np.isnan(s[t])}
            out.append([{"tag_id": int(t), "score": float(s[t]), "threshold": float(th[t])} for t in sorted(chosen)])
        table = batch.take(pa.array(keep, pa.int64())).append_column("tag_scores", pa.array(out, pa.list_(score_t)))
        return StageResult(table, rejects)


def _checkpoint_fingerprint(cfg: TaggerConfig) -> str:
    """A released checkpoint's identity (size + mtime) joins the step fingerprint."""
    parts = []
    for p in (cfg.checkpoint, cfg.tag_list):
        if p and Path(p).exists():
            st = Path(p).stat()
            parts.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)


class GroundConfig(VisionConfig):
    backend: Literal["attention", "transformers", "groundingdino"] = Field(
        "attention", description="attention: the tagger's own cross-attention; transformers: HF Grounding DINO")
    candidate_score: float = Field(0.5, ge=0, le=1, description="pseudo tags at or above this are grounded too")
    max_candidates: int = Field(16, ge=1, description="per image: parse tags first, then the best pseudo tags")
    attention_rel: float = Field(0.5, gt=0, le=1, description="attention cells >= this x the peak form the box")
    detector: str | None = Field(None, description="transformers: a local Grounding DINO directory (HF format); "
                                  "groundingdino: CONFIG.py:WEIGHTS.pth of the original release")
    box_threshold: float = Field(0.25, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    max_text_tokens: int = Field(256, ge=8, description="prompts are chunked to the detector's text limit")


def candidate_tags(parse: list[int] | None, tag_scores: list[dict] | None, min_score: float,
                   limit: int | None = None) -> list[int]:
    """An image's parse tags, then its pseudo tags scoring at least ``min_score`` (best first) up to
    ``limit`` tags in all (parse tags are never cut); sorted by id."""
    out = list(dict.fromkeys(parse or []))
    extra = sorted((d for d in tag_scores or [] if d["score"] >= min_score and d["tag_id"] not in set(out)),
                   key=lambda d: (-d["score"], d["tag_id"]))
    room = len(extra) if limit is None else max(0, limit - len(out))
    return sorted(out + [d["tag_id"] for d in extra[:room]])


@register("ground.v1")
class GroundStage(Stage):
    """One box per (image, candidate tag); a tag the backend cannot place gets no region."""

    Config = GroundConfig
    inputs = ("image_id", "union_label_id", "tag_scores")
    optional_inputs = IMAGE_COLUMNS
    outputs = ("regions",)
    needs = ("tagset",)

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.tagset = TagSet.load(self.context.artifact("tagset"))
        c = self.config
        if c.backend == "attention":
            self.tagger = BaseTagger.load(c, self.context.artifacts, self.tagset.names)
        elif c.backend == "transformers":
            from stages.detectors import HFGroundingDino

            if not c.detector:
                raise ValueError("ground.backend 'transformers' needs ground.detector: a local Grounding DINO "
                                 "directory in Hugging Face format")
            self.detector = HFGroundingDino(c.detector, resolve_device(c.device), c.max_text_tokens, c.precision)
        else:
            from stages.detectors import OriginalGroundingDino

            self.detector = OriginalGroundingDino(c.detector, resolve_device(c.device))

    def input_fingerprint(self) -> str:
        return _checkpoint_fingerprint(self.config) + (f";{self.config.detector}" if self.config.detector else "")

    def __call__(self, batch: pa.Table) -> StageResult:
        _, region_t, _ = region_types()
        keep, images, rejects = load_images(self, batch)
        parse = batch.column("union_label_id").to_pylist()
        scores = batch.column("tag_scores").to_pylist()
        cands = [candidate_tags(parse[i], scores[i], self.config.candidate_score, self.config.max_candidates)
                 for i in keep]
        if self.config.backend == "attention":
            regions = self._attention(images, cands)
        else:
            names = [[self.tagset.names[t] for t in c] for c in cands]
            found = self.detector.detect(images, names, self.config.box_threshold, self.config.text_threshold,
                                         self.config.batch_size)
            regions = []
            for img, c, dets in zip(images, cands, found):
                rs = []
                for t, name in zip(c, [self.tagset.names[t] for t in c]):
                    best = max((d for d in dets if d["label"] == name), key=lambda d: d["score"], default=None)
                    box = clip_box(best["box"], *img.size) if best else None
                    if box is not None:
                        rs.append({"tag_id": t, "box": box, "score": float(best["score"]),
                                   "backend": self.config.backend})
                regions.append(rs)
        table = batch.take(pa.array(keep, pa.int64())).append_column("regions", pa.array(regions, pa.list_(region_t)))
        return StageResult(table, rejects)

    def _attention(self, images, cands) -> list[list[dict]]:
        """Each candidate's box from its own attention map (a RAM head computes only the candidates)."""
        out = []
        for img, c, (_, maps) in zip(images, cands, self.tagger.scores_for(images, cands, attention=True)):
            rs = []
            for t, m in zip(c, maps):
                if self.tagger.class_of_tag[t] < 0 or not np.any(m > 0):
                    continue  # the model lacks the tag: no region (decide records no_region)
                box, mass = attention_box(m, *img.size, rel=self.config.attention_rel)
                box = clip_box(box, *img.size)
                if box is not None:
                    rs.append({"tag_id": t, "box": box, "score": mass, "backend": "attention"})
            out.append(rs)
        return out
