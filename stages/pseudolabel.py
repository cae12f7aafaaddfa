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

from common.images import IMAGE_COLUMNS, ImageLimits, source_size
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.vision import (BaseTagger, Decoder, TaggerConfig, attention_box, clip_box, planned_runtime, pseudo_type,
                           region_types, resolve_device, to_source_box)


class VisionConfig(TaggerConfig, ImageLimits):
    """Base tagger + image limits, shared by every stage that looks at pixels."""

    work_size: int | None = Field(
        1333, ge=64, description="longer side, in px, each image is decoded at (aspect kept; smaller images as "
        "they are; null: full size). Every consumer resizes anyway: the tagger to its input (384 px for RAM), "
        "views to it, Grounding DINO to 800 / 1333 px, crops to the tagger's input; 1333 is the largest of "
        "those, so a step's memory follows its batch size, not its photos' size. Boxes stay in the file's "
        "pixels")


def image_base(context) -> Path:
    return Path(context.run_dir)


def decoder(stage: Stage) -> Decoder:
    """The stage's decode pool (``resources.decode_workers`` threads), made on first use."""
    if getattr(stage, "_decoder", None) is None:
        stage._decoder = Decoder(stage.resources.decode_workers, image_base(stage.context), stage.config,
                                 work_size=stage.config.work_size)
    return stage._decoder


def load_images(stage: Stage, batch: pa.Table, prepare=None) -> tuple[list[int], list, list, list]:
    """Decoded images of a batch: (row indices that decoded, images, rejects, ``prepare(image)`` of each
    kept image or None), decoded on the stage's decode workers in row order."""
    cols = [c for c in ("image_id", "image", "image_bytes", "image_path") if c in batch.column_names]
    keep, images, rejects, prepared = [], [], [], []
    for i, img, rej, extra in decoder(stage).decode(batch.select(cols).to_pylist(), prepare):
        if rej is not None:
            rejects.append(rej)
        else:
            keep.append(i)
            images.append(img)
            prepared.append(extra)
    return keep, images, rejects, prepared


class PseudoLabelFields(StageConfig):
    """pseudolabel's own options (``PseudoLabelConfig`` adds the tagger; ``evidence.v1`` nests these)."""

    floor: float = Field(0.05, ge=0, le=1, description="keep every tag scoring at least this")
    top_k: int = Field(10, ge=0, description="and the k best tags of each image")


class PseudoLabelConfig(VisionConfig, PseudoLabelFields):
    pass


@register("pseudolabel.v1")
class PseudoLabelStage(Stage):
    """Batched base-tagger scores; an actor per worker holds the model (GPU if resources ask for one)."""

    Config = PseudoLabelConfig
    inputs = ("image_id", "union_label_id")
    optional_inputs = IMAGE_COLUMNS
    outputs = ("tag_scores",)
    needs = ("tagset",)
    optional_needs = ("tagger",)  # the base tagger, unless the config names a released checkpoint

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.tagset = TagSet.load(self.context.artifact("tagset"))
        self.tagger = BaseTagger.load(self.config, self.context.artifacts, self.tagset.names,
                                      self.tagset.thresholds())

    def input_fingerprint(self) -> str:
        return f"{_checkpoint_fingerprint(self.config)};{planned_runtime(self.config, self)}"

    def __call__(self, batch: pa.Table) -> StageResult:
        keep, _, rejects, pixels = load_images(self, batch, self.tagger.prepare)
        scores = self.tagger.scores(pixels) if pixels else np.zeros((0, 0), np.float32)
        parse = batch.column("union_label_id").to_pylist()
        out = [self.pick(scores[j], parse[i]) for j, i in enumerate(keep)]
        table = batch.take(pa.array(keep, pa.int64())).append_column("tag_scores", pa.array(out, pa.list_(pseudo_type())))
        return StageResult(table, rejects)

    def pick(self, s: np.ndarray, parse: list[int] | None) -> list[dict]:
        """An image's ``tag_scores``: every tag at or above ``floor``, the ``top_k`` best, its parse tags."""
        th = self.tagger.threshold_of_tag
        chosen = set(np.nonzero(np.nan_to_num(s, nan=-1) >= self.config.floor)[0].tolist())
        if self.config.top_k:
            order = np.argsort(-np.nan_to_num(s, nan=-1), kind="stable")[: self.config.top_k]
            chosen |= {int(t) for t in order if not np.isnan(s[t])}
        chosen |= {t for t in (parse or []) if t < len(s) and not np.isnan(s[t])}
        return [{"tag_id": int(t), "score": float(s[t]), "threshold": float(th[t])} for t in sorted(chosen)]


def _checkpoint_fingerprint(cfg: TaggerConfig) -> str:
    """A released checkpoint's identity (size + mtime) joins the step fingerprint."""
    parts = []
    for p in (cfg.checkpoint, cfg.tag_list):
        if p and Path(p).exists():
            st = Path(p).stat()
            parts.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)


class GroundFields(StageConfig):
    """ground's own options (``GroundConfig`` adds the tagger; ``evidence.v1`` nests these)."""

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


class GroundConfig(VisionConfig, GroundFields):
    pass


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
    optional_needs = ("tagger",)  # attention boxes come from the base tagger

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.tagset = TagSet.load(self.context.artifact("tagset"))
        if self.config.backend == "attention":
            self.tagger = BaseTagger.load(self.config, self.context.artifacts, self.tagset.names)
        else:
            self.load_detector()

    def load_detector(self) -> None:
        c = self.config
        if c.backend == "transformers":
            from stages.detectors import HFGroundingDino

            if not c.detector:
                raise ValueError("ground.backend 'transformers' needs ground.detector: a local Grounding DINO "
                                 "directory in Hugging Face format")
            self.detector = HFGroundingDino(c.detector, resolve_device(c.device), c.max_text_tokens, c.precision)
        else:
            from stages.detectors import OriginalGroundingDino

            self.detector = OriginalGroundingDino(c.detector, resolve_device(c.device))

    def input_fingerprint(self) -> str:
        return f"{_checkpoint_fingerprint(self.config)};{planned_runtime(self.config, self)}" + (
            f";{self.config.detector}" if self.config.detector else "")

    def __call__(self, batch: pa.Table) -> StageResult:
        _, region_t, _ = region_types()
        attention = self.config.backend == "attention"
        keep, images, rejects, pixels = load_images(self, batch, self.tagger.prepare if attention else None)
        parse = batch.column("union_label_id").to_pylist()
        scores = batch.column("tag_scores").to_pylist()
        cands = [self.candidates(parse[i], scores[i]) for i in keep]
        if attention:
            got = self.tagger.scores_for(pixels, cands, attention=True)
            regions = [self.boxes(img, c, maps) for img, c, (_, maps) in zip(images, cands, got)]
        else:
            regions = self.detect(images, cands)
        table = batch.take(pa.array(keep, pa.int64())).append_column("regions", pa.array(regions, pa.list_(region_t)))
        return StageResult(table, rejects)

    def candidates(self, parse: list[int] | None, tag_scores: list[dict] | None) -> list[int]:
        return candidate_tags(parse, tag_scores, self.config.candidate_score, self.config.max_candidates)

    def detect(self, images: list, cands: list[list[int]]) -> list[list[dict]]:
        """Each candidate's best detector box (by its name's prompt); a tag not found gets no region."""
        names = [[self.tagset.names[t] for t in c] for c in cands]
        found = self.detector.detect(images, names, self.config.box_threshold, self.config.text_threshold,
                                     self.config.batch_size)
        regions = []
        for img, c, dets in zip(images, cands, found):
            rs = []
            for t, name in zip(c, [self.tagset.names[t] for t in c]):
                best = max((d for d in dets if d["label"] == name), key=lambda d: d["score"], default=None)
                box = clip_box(best["box"], *img.size) if best else None  # in the decoded image's pixels
                if box is not None:
                    rs.append({"tag_id": t, "box": to_source_box(box, img), "score": float(best["score"]),
                               "backend": self.config.backend})
            regions.append(rs)
        return regions

    def boxes(self, img, cands: list[int], maps: np.ndarray) -> list[dict]:
        """Each candidate's box from its own attention map (``maps[k]`` for ``cands[k]``), in the file's
        pixels (a map covers the whole image, whatever size it was decoded at)."""
        rs = []
        size = source_size(img)
        for t, m in zip(cands, maps):
            if self.tagger.class_of_tag[t] < 0 or not np.any(m > 0):
                continue  # the model lacks the tag: no region (decide records no_region)
            box, mass = attention_box(m, *size, rel=self.config.attention_rel)
            box = clip_box(box, *size)
            if box is not None:
                rs.append({"tag_id": t, "box": box, "score": mass, "backend": "attention"})
        return rs
