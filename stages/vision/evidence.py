"""evidence.v1: everything the base tagger (and a detector, if configured) says about each image, from one
decode per image and as few forwards as the parts allow. Columns: ``tag_scores``, ``regions``,
``region_embeds``, ``crop_scores``, ``view_scores``.

The parts (``stages/vision/parts.py``), each with its options section:

* **pseudolabel** (``tag_scores``) and **ground** (``regions``): every tag's score, then the candidate
  tags' attention maps from the same image tokens (``BaseTagger.scores_then_maps``); with a detector
  backend (``ground.backend: transformers``) the detector runs on the same decoded images.
* **crops** (``region_embeds``, ``crop_scores``): the pooled feature and the crop's own-tag score from one
  backbone pass over each crop batch (``BaseTagger.embed_and_score``).
* **verify** (``view_scores``): views of weak candidates in context; they are other pixels, so they take
  their own forwards.

Each image is decoded once, on the step's decode workers (``resources.decode_workers`` threads, ahead of
the model, in row order), and kept in memory for its crops and views. Why one step and not several
sharing decoded shards: decoded pixels are far larger than the compressed bytes, which are read by
reference, and forwards can be shared only inside one process. What it costs: a change to any part's
options re-runs the whole step (``decide``, which holds every threshold, still re-runs alone).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from common.images import IMAGE_COLUMNS, ImageLimits
from pipeline.registry import register
from pipeline.stage import Stage, StageResult
from stages.columns import PSEUDO_SCORE, REGION, REGION_EMBED, TAG_SCORE
from stages.vision.decode import Decoder
from stages.vision.parts import (CropFields, GroundFields, PseudoLabelFields, ViewFields, attention_regions,
                                 candidate_tags, crop_items, detector_regions, embed_array, load_detector, native_crops,
                                 pick_scores, view_scores)
from stages.vision.tagger import BaseTagger, TaggerConfig, checkpoint_fingerprint, planned_runtime


class VisionConfig(TaggerConfig, ImageLimits):
    """Base tagger + image limits."""

    work_size: int | None = Field(
        1333, ge=64, description="longer side, in px, each image is decoded at (aspect kept; smaller images as "
        "they are; null: full size). Every consumer resizes anyway: the tagger to its input (384 px for RAM), "
        "views to it, Grounding DINO to 800 / 1333 px, crops to the tagger's input; 1333 is the largest of "
        "those, so a step's memory follows its batch size, not its photos' size. Boxes stay in the file's "
        "pixels")


class EvidenceConfig(VisionConfig):
    """The base tagger and image limits once (top level), each part's own options in its section."""

    pseudolabel: PseudoLabelFields = Field(default_factory=PseudoLabelFields)
    ground: GroundFields = Field(default_factory=GroundFields)
    crops: CropFields = Field(default_factory=CropFields, description="how regions are cropped for "
                              "region_embeds and crop_scores (one pass)")
    verify: ViewFields = Field(default_factory=ViewFields)


@register("evidence.v1")
class EvidenceStage(Stage):
    """The base tagger's evidence for each image (module docstring); an actor per worker holds the model
    (GPU if resources ask for one)."""

    Config = EvidenceConfig
    inputs = ("image_id", "union_label_id")
    optional_inputs = IMAGE_COLUMNS
    outputs = ("tag_scores", "regions", "region_embeds", "crop_scores", "view_scores")
    needs = ("tagset",)
    optional_needs = ("tagger",)  # the base tagger, unless the config names a released checkpoint

    def setup(self) -> None:
        from tagset.tagset import TagSet

        c = self.config
        self.tagset = TagSet.load(self.context.artifact("tagset"))
        self.tagger = BaseTagger.load(c, self.context.artifacts, self.tagset.names, self.tagset.thresholds())
        self.native = native_crops(self.tagger, c.crops.crop_size, f"{self.context.step}.crops.crop_size")
        self.view_tags = {t.tag_id for t in self.tagset.tags if t.kind in c.verify.view_kinds}
        self.detector = None if c.ground.backend == "attention" else load_detector(c.ground, c.device, c.precision)
        self._pool = None

    @property
    def pool(self) -> Decoder:
        """The decode pool (``resources.decode_workers`` threads), made on first use."""
        if getattr(self, "_pool", None) is None:
            self._pool = Decoder(self.resources.decode_workers, Path(self.context.run_dir), self.config,
                                 work_size=self.config.work_size)
        return self._pool

    def input_fingerprint(self) -> str:
        c = self.config
        return f"{checkpoint_fingerprint(c)};{planned_runtime(c, self)}" + (
            f";{c.ground.detector}" if c.ground.detector else "")

    def __call__(self, batch: pa.Table) -> StageResult:
        keep, images, parse, tag_scores, regions, rejects = self.whole_images(batch)
        items = crop_items(self.tagger, self.pool, images, regions, self.config.crops.crop_pad, self.native)
        feats, own = self.tagger.embed_and_score([c for _, _, c in items], [t for _, t, _ in items],
                                                 native=self.native)
        embeds: list[list[dict]] = [[] for _ in keep]
        crop_scores: list[list[dict]] = [[] for _ in keep]
        for k, (j, t, _) in enumerate(items):
            embeds[j].append({"tag_id": t, "embedding": feats[k].astype(np.float16)})
            if not np.isnan(own[k]):
                crop_scores[j].append({"tag_id": t, "score": float(own[k])})
        views = view_scores(self.tagger, self.pool, images, regions, parse, self.config.verify.views, self.view_tags)
        table = batch.take(pa.array(keep, pa.int64()))
        for name, col in (("tag_scores", pa.array(tag_scores, pa.list_(PSEUDO_SCORE))),
                          ("regions", pa.array(regions, pa.list_(REGION))),
                          ("region_embeds", embed_array(embeds, REGION_EMBED)),
                          ("crop_scores", pa.array(crop_scores, pa.list_(TAG_SCORE))),
                          ("view_scores", pa.array(views, pa.list_(TAG_SCORE)))):
            table = table.append_column(name, col)
        return StageResult(table, rejects)

    def whole_images(self, batch: pa.Table):
        """The whole-image pass, batch by batch as the decode threads deliver (the model computes on one
        batch while they decode the next): ``(kept row indices, their images, parse tags, tag_scores,
        regions, rejects)``."""
        c = self.config
        parse_all = batch.column("union_label_id").to_pylist()
        keep, images, rejects, parse = [], [], [], []
        tag_scores: list[list[dict]] = []
        cands: list[list[int]] = []
        regions: list[list[dict]] = []

        def choose(j: int, s: np.ndarray) -> list[int]:
            tag_scores[j] = pick_scores(s, parse[j], c.pseudolabel, self.tagger.threshold_of_tag)
            cands[j] = candidate_tags(parse[j], tag_scores[j], c.ground.candidate_score, c.ground.max_candidates)
            return cands[j]

        cols = [col for col in ("image_id", *IMAGE_COLUMNS) if col in batch.column_names]
        for idx, imgs, pixels, rej in self.pool.batches(batch.select(cols).to_pylist(), self.tagger.batch_size,
                                                        self.tagger.prepare):
            rejects += rej
            first = len(keep)
            keep += idx
            images += imgs
            parse += [parse_all[i] for i in idx]
            tag_scores += [[] for _ in idx]
            cands += [[] for _ in idx]
            if not idx:
                continue
            if self.detector is None:
                got = self.tagger.scores_then_maps(pixels, lambda k, s: choose(first + k, s))
                regions += [attention_regions(img, cand, maps, self.tagger.class_of_tag, c.ground.attention_rel)
                            for img, (_, cand, maps) in zip(imgs, got)]
            else:
                for k, s in enumerate(self.tagger.scores(pixels)):
                    choose(first + k, s)
        if self.detector is not None:
            regions = detector_regions(self.detector, images, cands, self.tagset.names, c.ground, c.batch_size)
        return keep, images, parse, tag_scores, regions, rejects
