"""evidence.v1: pseudolabel, ground, embed and verify as one step: one decode per image, one forward
where one suffices.

It writes exactly the columns the four steps write (``tag_scores``, ``regions``, ``region_embeds``,
``crop_scores``, ``view_scores``), with the same values (tests/test_evidence.py), through the four
stages' own code; what it shares between them:

* **one decode**: each image is decoded once, on the step's decode workers (``resources.decode_workers``
  threads, ahead of the model, in row order), and kept in memory for its crops and views; separately
  each of the four steps decodes it again.
* **pseudolabel + ground (attention) from one backbone pass**: every tag's score, then the candidate
  tags' attention maps from the same image tokens (``BaseTagger.scores_then_maps``). With a detector
  backend (``ground.backend: transformers``) the detector runs on the same decoded images.
* **embed + verify from one pass over each crop batch**: the pooled feature and the crop's own-tag score
  from the same backbone output (``BaseTagger.embed_and_score``); they crop alike (``crops`` below).
* the region views still take their own forwards: they are other pixels.

Why one step and not four steps sharing decoded shards: decoded pixels are ~0.5 MB an image at 384 px
(7 TB for 14M images), while the compressed bytes are read by reference; and the forwards can be shared
only inside one process. What it costs: a change to any part's options re-runs the whole step, where the
four steps re-ran only from the changed one on (``decide``, which holds every threshold, still re-runs
alone). The four stages stay registered for workflows that want them apart (e.g. grounding on its own
GPU pool).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from common.images import IMAGE_COLUMNS
from pipeline.registry import register
from pipeline.stage import Stage, StageResult
from stages.pseudolabel import (GroundConfig, GroundFields, GroundStage, PseudoLabelConfig, PseudoLabelFields,
                                PseudoLabelStage, VisionConfig, _checkpoint_fingerprint, decoder)
from stages.regions import (CropConfig, CropFields, EmbedStage, VerifyConfig, VerifyStage, ViewFields,
                            _embed_array)
from stages.vision import BaseTagger, planned_runtime, pseudo_type, region_types

PARTS = ("pseudolabel", "ground", "crops", "verify")


class EvidenceConfig(VisionConfig):
    """The base tagger and image limits once (top level), each part's own options in its section."""

    pseudolabel: PseudoLabelFields = Field(default_factory=PseudoLabelFields)
    ground: GroundFields = Field(default_factory=GroundFields)
    crops: CropFields = Field(default_factory=CropFields, description="embed's and verify's crops (one pass)")
    verify: ViewFields = Field(default_factory=ViewFields)

    def part_configs(self) -> tuple[PseudoLabelConfig, GroundConfig, CropConfig, VerifyConfig]:
        """The four stages' configs this step runs with (what the four steps would be configured with)."""
        base = self.model_dump(exclude=set(PARTS))
        crops = self.crops.model_dump()
        return (PseudoLabelConfig(**base, **self.pseudolabel.model_dump()),
                GroundConfig(**base, **self.ground.model_dump()),
                CropConfig(**base, **crops),
                VerifyConfig(**base, **crops, **self.verify.model_dump()))


@register("evidence.v1")
class EvidenceStage(Stage):
    """The four vision steps' evidence from one decode per image and shared forwards (module docstring)."""

    Config = EvidenceConfig
    inputs = ("image_id", "union_label_id")
    optional_inputs = IMAGE_COLUMNS
    outputs = ("tag_scores", "regions", "region_embeds", "crop_scores", "view_scores")
    needs = ("tagset",)
    optional_needs = ("tagger",)  # the base tagger, unless the config names a released checkpoint

    def setup(self) -> None:
        from tagset.tagset import TagSet

        pl_cfg, gr_cfg, em_cfg, ve_cfg = self.config.part_configs()
        self.pl, self.gr = PseudoLabelStage(pl_cfg, self.context), GroundStage(gr_cfg, self.context)
        self.em, self.ve = EmbedStage(em_cfg, self.context), VerifyStage(ve_cfg, self.context)
        tagset = TagSet.load(self.context.artifact("tagset"))
        self.tagger = BaseTagger.load(self.config, self.context.artifacts, tagset.names, tagset.thresholds())
        # ground's attention backend loads its tagger without the tagset's fallback thresholds; the
        # thresholds only enter tag_scores, which pseudolabel writes: the one model serves all four
        for part in (self.pl, self.gr, self.em, self.ve):
            part.tagset, part.resources, part._decoder = tagset, self.resources, decoder(self)
        self.pl.tagger = self.gr.tagger = self.tagger
        self.em.bind(self.tagger)
        self.ve.bind(self.tagger)
        self.ve.view_tags = {t.tag_id for t in tagset.tags if t.kind in ve_cfg.view_kinds}
        if gr_cfg.backend != "attention":
            self.gr.load_detector()

    def input_fingerprint(self) -> str:
        c = self.config
        return f"{_checkpoint_fingerprint(c)};{planned_runtime(c, self)}" + (
            f";{c.ground.detector}" if c.ground.detector else "")

    def __call__(self, batch: pa.Table) -> StageResult:
        score_t, region_t, embed_t = region_types()
        parse_all = batch.column("union_label_id").to_pylist()
        keep, images, rejects, parse = [], [], [], []
        tag_scores: list[list[dict]] = []
        cands: list[list[int]] = []
        regions: list[list[dict]] = []

        def choose(j: int, s: np.ndarray) -> list[int]:
            tag_scores[j] = self.pl.pick(s, parse[j])
            cands[j] = self.gr.candidates(parse[j], tag_scores[j])
            return cands[j]

        attention = self.gr.config.backend == "attention"
        cols = [c for c in ("image_id", *IMAGE_COLUMNS) if c in batch.column_names]
        # the whole-image pass batch by batch as the decode threads deliver: the model computes on one
        # batch while they decode the next (the same batches as the separate steps make)
        for idx, imgs, pixels, rej in decoder(self).batches(batch.select(cols).to_pylist(), self.tagger.batch_size,
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
            if attention:
                got = self.tagger.scores_then_maps(pixels, lambda k, s: choose(first + k, s))
                regions += [self.gr.boxes(img, c, maps) for img, (_, c, maps) in zip(imgs, got)]
            else:
                for k, s in enumerate(self.tagger.scores(pixels)):
                    choose(first + k, s)
        if not attention:
            regions = self.gr.detect(images, cands)
        items = self.em.crop_items(images, regions)
        feats, own = self.tagger.embed_and_score([c for _, _, c in items], [t for _, t, _ in items],
                                                 native=self.em.native)
        embeds: list[list[dict]] = [[] for _ in keep]
        crop_scores: list[list[dict]] = [[] for _ in keep]
        for k, (j, t, _) in enumerate(items):
            embeds[j].append({"tag_id": t, "embedding": feats[k].astype(np.float16)})
            if not np.isnan(own[k]):
                crop_scores[j].append({"tag_id": t, "score": float(own[k])})
        views = self.ve.view_scores(regions, parse, images)
        table = batch.take(pa.array(keep, pa.int64()))
        for name, col in (("tag_scores", pa.array(tag_scores, pa.list_(pseudo_type()))),
                          ("regions", pa.array(regions, pa.list_(region_t))),
                          ("region_embeds", _embed_array(embeds, embed_t)),
                          ("crop_scores", pa.array(crop_scores, pa.list_(score_t))),
                          ("view_scores", pa.array(views, pa.list_(score_t)))):
            table = table.append_column(name, col)
        return StageResult(table, rejects)
