"""embed.v1 and verify.v1: what each (image, tag) region looks like to the base tagger.

* embed: crop every region (with a little context) and store the tagger's pooled feature, float16.
* verify: the base tagger's score for the tag on its own crop; with ``views``, also each pseudo
  candidate's mean score over views of its region in context (zoomed windows, mirrored copies).

The clustering of the embeddings is ``stages/cluster.py``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from common.images import IMAGE_COLUMNS
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.pseudolabel import VisionConfig, _checkpoint_fingerprint, decoder, load_images
from stages.vision import BaseTagger, crop, native_crop, planned_runtime, region_types, to_work_box


class CropFields(StageConfig):
    """How regions are cropped (embed's and verify's: ``evidence.v1`` shares one crop pass between them)."""

    crop_pad: float = Field(0.1, ge=0, le=1, description="context added around each box, share of its size")
    crop_size: Literal["auto", "model", "native"] = Field(
        "auto", description="model: each crop resized to the model's input (RAM's way); native: the crop at the "
        "scale the whole image is seen at (fully convolutional taggers only: the CNN), rounded up to a multiple "
        "of 8 px; auto: native when the tagger allows it")


class CropConfig(VisionConfig, CropFields):
    pass


class _CropStage(Stage):
    Config = CropConfig
    needs = ("tagset",)
    optional_needs = ("tagger",)  # the base tagger, unless the config names a released checkpoint
    optional_inputs = IMAGE_COLUMNS

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.tagset = TagSet.load(self.context.artifact("tagset"))
        self.bind(BaseTagger.load(self.config, self.context.artifacts, self.tagset.names))

    def bind(self, tagger: BaseTagger) -> None:
        """Use ``tagger`` (this stage's own, or one an ``evidence.v1`` step shares between its parts)."""
        self.tagger = tagger
        fc = self.tagger.fully_convolutional
        if self.config.crop_size == "native" and not fc:
            raise ValueError(f"{self.context.step}.crop_size: 'native' needs a fully convolutional tagger; "
                             f"{type(self.tagger.model).__name__} takes {self.tagger.image_size} px inputs only "
                             f"(use 'model' or 'auto')")
        self.native = self.config.crop_size == "native" or (self.config.crop_size == "auto" and fc)

    def input_fingerprint(self) -> str:
        return f"{_checkpoint_fingerprint(self.config)};{planned_runtime(self.config, self)}"

    def crops(self, batch: pa.Table):
        """(kept row indices, rejects, [(row position, tag_id, crop pixels)], the kept rows' images)."""
        keep, images, rejects, _ = load_images(self, batch)
        regions = batch.column("regions").to_pylist()
        return keep, rejects, self.crop_items(images, [regions[i] for i in keep]), images

    def crop_items(self, images: list, regions: list[list[dict] | None]) -> list[tuple[int, int, object]]:
        """``(image position, tag_id, crop)`` for each region of each image, the crop as uint8 pixels at its
        model input; cut on the decode workers (an image's crops in one task), in order."""
        size, interp = self.tagger.image_size, self.tagger.model.cfg.interpolation
        min_side = getattr(self.tagger.model, "min_input_size", 16)

        def cut(job):
            img, rs = job
            out = []
            for r in rs or []:
                box = to_work_box(r["box"], img)  # a region's box is in the file's pixels
                if self.native:
                    c = native_crop(img, box, self.config.crop_pad, size, min_side=min_side, interpolation=interp)
                    out.append((r["tag_id"], self.tagger.prepare(c, native=True)))
                else:
                    out.append((r["tag_id"], self.tagger.prepare(crop(img, box, self.config.crop_pad))))
            return out

        items = []
        for j, got in enumerate(decoder(self).map(cut, list(zip(images, regions)))):
            items.extend((j, t, c) for t, c in got)
        return items

    @staticmethod
    def emit(batch: pa.Table, keep: list[int], name: str, column: pa.Array, rejects) -> StageResult:
        """The kept rows with the new column; undecodable rows leave as rejects."""
        return StageResult(batch.take(pa.array(keep, pa.int64())).append_column(name, column), rejects)


@register("embed.v1")
class EmbedStage(_CropStage):
    """``region_embeds``: one float16 vector per region (the tagger's pooled image feature of the crop)."""

    inputs = ("image_id", "regions")
    outputs = ("region_embeds",)

    def __call__(self, batch: pa.Table) -> StageResult:
        _, _, embed_t = region_types()
        keep, rejects, items, _ = self.crops(batch)
        feats = self.tagger.embed([c for _, _, c in items], native=self.native).astype(np.float16)
        out: list[list[dict]] = [[] for _ in keep]
        for (j, t, _), f in zip(items, feats):
            out[j].append({"tag_id": t, "embedding": f})
        return self.emit(batch, keep, "region_embeds", _embed_array(out, embed_t), rejects)


def _embed_array(rows: list[list[dict]], embed_t: pa.DataType) -> pa.Array:
    """Build list<struct<tag_id, list<float16>>> from numpy without going through Python floats."""
    offsets, tags, vecs = [0], [], []
    for row in rows:
        for d in row:
            tags.append(d["tag_id"])
            vecs.append(d["embedding"])
        offsets.append(len(tags))
    dim = len(vecs[0]) if vecs else 0
    flat = np.concatenate(vecs).astype(np.float16) if vecs else np.zeros(0, np.float16)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, max(dim, 1), dtype=np.int32)
                                              if dim else np.zeros(1, np.int32)), pa.array(flat, pa.float16()))
    structs = pa.StructArray.from_arrays([pa.array(tags, pa.int32()), inner], fields=list(embed_t))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs, type=pa.list_(embed_t))


def view_crop(img: Image.Image, box, window: float, mirror: bool, size: int,
              interpolation: str = "bilinear") -> Image.Image:
    """The box seen in its context: a window ``window`` x the image's width and height, centred on the box
    (moved inside the image where it would leave it), resized to the model's ``size`` x ``size`` input
    and mirrored left-right if ``mirror``. Below 1.0 it zooms in by ``1 / window`` relative to the whole
    image; ``window`` 1.0 without mirror is the whole image exactly as the model sees it."""
    from model.preprocess import RESAMPLE  # the filter the whole image is resized with

    v = img.resize((size, size), RESAMPLE[interpolation], box=view_window(box, *img.size, window))
    return v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else v


def view_window(box, w: int, h: int, window: float) -> tuple[float, float, float, float]:
    """The part of a ``w`` x ``h`` image that :func:`view_crop` shows (before any mirroring)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sw, sh = window * w, window * h
    x0 = min(max(0.0, cx - sw / 2), w - sw)
    y0 = min(max(0.0, cy - sh / 2), h - sh)
    return x0, y0, x0 + sw, y0 + sh


class RegionView(StageConfig):
    window: float = Field(1.0, gt=0, le=1, description="share of the image's width and height around the box "
                          "(1.0: the whole image; 0.75: zoomed in 1.33x)")
    mirror: bool = Field(False, description="mirrored left-right")


class ViewFields(StageConfig):
    """verify's own options beside the crops (``evidence.v1`` nests these)."""

    views: list[RegionView] = Field(
        default_factory=list, description="views of each pseudo candidate's region in context, each resized to "
        "the model's input; view_scores holds the tag's mean score over them (empty: none)")
    view_kinds: list[str] = Field(["object", "scene"], description="tag kinds (the tagset's) whose pseudo "
                                  "candidates get views")


class VerifyConfig(CropConfig, ViewFields):
    pass


@register("verify.v1")
class VerifyStage(_CropStage):
    """``crop_scores``: each region's tag re-scored by the base tagger on the crop alone.
    ``view_scores``: for pseudo candidates (regions of tags the image's labels lack) of ``view_kinds``, the
    tag's mean score over ``views``: a second look at a weak candidate, mostly zoomed in, where a small
    object the whole-image view barely resolves becomes visible. Empty when ``views`` is."""

    Config = VerifyConfig
    inputs = ("image_id", "regions", "union_label_id")
    outputs = ("crop_scores", "view_scores")

    def setup(self) -> None:
        super().setup()
        self.view_tags = {t.tag_id for t in self.tagset.tags if t.kind in self.config.view_kinds}

    def __call__(self, batch: pa.Table) -> StageResult:
        score_t, _, _ = region_types()
        keep, rejects, items, images = self.crops(batch)
        out: list[list[dict]] = [[] for _ in keep]
        if items:
            s = self.tagger.crop_scores([c for _, _, c in items], [t for _, t, _ in items], native=self.native)
            for k, (j, t, _) in enumerate(items):
                if not np.isnan(s[k]):
                    out[j].append({"tag_id": t, "score": float(s[k])})
        table = self.emit(batch, keep, "crop_scores", pa.array(out, pa.list_(score_t)), rejects).table
        regions = batch.column("regions").to_pylist()
        labels = batch.column("union_label_id").to_pylist()
        views = self.view_scores([regions[i] for i in keep], [labels[i] for i in keep], images)
        return StageResult(table.append_column("view_scores", pa.array(views, pa.list_(score_t))), rejects)

    def view_scores(self, regions: list, labels: list, images: list) -> list[list[dict]]:
        """Per image (``regions[j]``, ``labels[j]``, ``images[j]``), each pseudo candidate's mean score over
        the configured views of its region."""
        out: list[list[dict]] = [[] for _ in images]
        if not self.config.views:
            return out
        size, interp = self.tagger.image_size, self.tagger.model.cfg.interpolation
        # a view depends on the image, its window and the mirror, not on the tag: candidates whose boxes
        # give the same window (always so for window 1.0) share one forward pass
        unique: dict[tuple, int] = {}
        jobs, items = [], []  # jobs: (image position, box, view); items: (image position, tag_id, [job per view])
        for j, img in enumerate(images):
            have = set(labels[j] or [])
            for r in regions[j] or []:
                if r["tag_id"] in have or r["tag_id"] not in self.view_tags:
                    continue
                idx = []
                box = to_work_box(r["box"], img)  # a region's box is in the file's pixels
                for v in self.config.views:
                    key = (j, v.mirror, *(round(x, 3) for x in view_window(box, *img.size, v.window)))
                    if key not in unique:
                        unique[key] = len(jobs)
                        jobs.append((j, box, v))
                    idx.append(unique[key])
                items.append((j, r["tag_id"], idx))
        if not items:
            return out
        crops = list(decoder(self).map(
            lambda job: self.tagger.prepare(view_crop(images[job[0]], job[1], job[2].window, job[2].mirror, size,
                                                      interp), native=True), jobs))
        # each view scored for the tags that look at it only (the views are already the model's input size)
        want: list[list[int]] = [[] for _ in crops]
        for _, t, idx in items:
            for k in idx:
                if t not in want[k]:
                    want[k].append(t)
        s = [dict(zip(w, got)) for w, got in zip(want, self.tagger.scores_for(crops, want))]
        for j, t, idx in items:
            got = np.array([s[k][t] for k in idx], dtype=np.float32)
            if not np.isnan(got).any():
                out[j].append({"tag_id": t, "score": float(got.mean())})
        return out
