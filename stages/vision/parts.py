"""The evidence step's parts, as functions of decoded images and the base tagger: which scores an image
keeps, which tags it grounds, their boxes (attention or a detector), the crops, the views. Each part
has its options section (``evidence.pseudolabel``, ``.ground``, ``.crops``, ``.verify``); none of them
decides anything (``decide.v1`` turns the evidence into labels).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from common.images import source_size
from pipeline.stage import StageConfig
from stages.vision.geometry import attention_box, clip_box, crop, native_crop, to_source_box, to_work_box, view_crop, \
    view_window
from stages.vision.tagger import BaseTagger, resolve_device


class PseudoLabelFields(StageConfig):
    """Which of the base tagger's scores an image keeps (``tag_scores``)."""

    floor: float = Field(0.05, ge=0, le=1, description="keep every tag scoring at least this")
    top_k: int = Field(10, ge=0, description="and the k best tags of each image")


class GroundFields(StageConfig):
    """Which tags get a region, and how they are boxed."""

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


class CropFields(StageConfig):
    """How regions are cropped for their embeddings and their crop scores (one pass serves both)."""

    crop_pad: float = Field(0.1, ge=0, le=1, description="context added around each box, share of its size")
    crop_size: Literal["auto", "model", "native"] = Field(
        "auto", description="model: each crop resized to the model's input (RAM's way); native: the crop at the "
        "scale the whole image is seen at (fully convolutional taggers only: the CNN), rounded up to a multiple "
        "of 8 px; auto: native when the tagger allows it")


class RegionView(StageConfig):
    window: float = Field(1.0, gt=0, le=1, description="share of the image's width and height around the box "
                          "(1.0: the whole image; 0.75: zoomed in 1.33x)")
    mirror: bool = Field(False, description="mirrored left-right")


class ViewFields(StageConfig):
    """Second looks at weak candidates (``view_scores``)."""

    views: list[RegionView] = Field(
        default_factory=list, description="views of each pseudo candidate's region in context, each resized to "
        "the model's input; view_scores holds the tag's mean score over them (empty: none)")
    view_kinds: list[str] = Field(["object", "scene"], description="tag kinds (the tagset's) whose pseudo "
                                  "candidates get views")


def pick_scores(s: np.ndarray, parse: list[int] | None, cfg: PseudoLabelFields, thresholds: np.ndarray) -> list[dict]:
    """An image's ``tag_scores``: every tag at or above ``floor``, the ``top_k`` best, its parse tags."""
    chosen = set(np.nonzero(np.nan_to_num(s, nan=-1) >= cfg.floor)[0].tolist())
    if cfg.top_k:
        order = np.argsort(-np.nan_to_num(s, nan=-1), kind="stable")[: cfg.top_k]
        chosen |= {int(t) for t in order if not np.isnan(s[t])}
    chosen |= {t for t in (parse or []) if t < len(s) and not np.isnan(s[t])}
    return [{"tag_id": int(t), "score": float(s[t]), "threshold": float(thresholds[t])} for t in sorted(chosen)]


def candidate_tags(parse: list[int] | None, tag_scores: list[dict] | None, min_score: float,
                   limit: int | None = None) -> list[int]:
    """An image's parse tags, then its pseudo tags scoring at least ``min_score`` (best first) up to
    ``limit`` tags in all (parse tags are never cut); sorted by id."""
    out = list(dict.fromkeys(parse or []))
    extra = sorted((d for d in tag_scores or [] if d["score"] >= min_score and d["tag_id"] not in set(out)),
                   key=lambda d: (-d["score"], d["tag_id"]))
    room = len(extra) if limit is None else max(0, limit - len(out))
    return sorted(out + [d["tag_id"] for d in extra[:room]])


def attention_regions(img, cands: list[int], maps: np.ndarray, class_of_tag: np.ndarray, rel: float) -> list[dict]:
    """Each candidate's box from its own attention map (``maps[k]`` for ``cands[k]``), in the file's
    pixels (a map covers the whole image, whatever size it was decoded at)."""
    rs = []
    size = source_size(img)
    for t, m in zip(cands, maps):
        if class_of_tag[t] < 0 or not np.any(m > 0):
            continue  # the model lacks the tag: no region (decide records no_region)
        box, mass = attention_box(m, *size, rel=rel)
        box = clip_box(box, *size)
        if box is not None:
            rs.append({"tag_id": t, "box": box, "score": mass, "backend": "attention"})
    return rs


def load_detector(cfg: GroundFields, device: str, precision: str):
    """The open-vocabulary detector of ``cfg.backend`` (not ``attention``), from its local files."""
    if cfg.backend == "transformers":
        from stages.vision.detectors import HFGroundingDino

        if not cfg.detector:
            raise ValueError("ground.backend 'transformers' needs ground.detector: a local Grounding DINO "
                             "directory in Hugging Face format")
        return HFGroundingDino(cfg.detector, resolve_device(device), cfg.max_text_tokens, precision)
    from stages.vision.detectors import OriginalGroundingDino

    return OriginalGroundingDino(cfg.detector, resolve_device(device))


def detector_regions(detector, images: list, cands: list[list[int]], names: list[str], cfg: GroundFields,
                     batch_size: int) -> list[list[dict]]:
    """Each candidate's best detector box (by its name's prompt); a tag not found gets no region."""
    found = detector.detect(images, [[names[t] for t in c] for c in cands], cfg.box_threshold, cfg.text_threshold,
                            batch_size)
    regions = []
    for img, c, dets in zip(images, cands, found):
        rs = []
        for t in c:
            best = max((d for d in dets if d["label"] == names[t]), key=lambda d: d["score"], default=None)
            box = clip_box(best["box"], *img.size) if best else None  # in the decoded image's pixels
            if box is not None:
                rs.append({"tag_id": t, "box": to_source_box(box, img), "score": float(best["score"]),
                           "backend": cfg.backend})
        regions.append(rs)
    return regions


def native_crops(tagger: BaseTagger, crop_size: str, where: str) -> bool:
    """Whether crops keep the whole image's scale (``crop_size``); 'native' on a tagger that takes one
    input size only is a config error naming ``where``."""
    fc = tagger.fully_convolutional
    if crop_size == "native" and not fc:
        raise ValueError(f"{where}: 'native' needs a fully convolutional tagger; {type(tagger.model).__name__} "
                         f"takes {tagger.image_size} px inputs only (use 'model' or 'auto')")
    return crop_size == "native" or (crop_size == "auto" and fc)


def crop_items(tagger: BaseTagger, pool, images: list, regions: list[list[dict] | None], pad: float,
               native: bool) -> list[tuple[int, int, object]]:
    """``(image position, tag_id, crop)`` for each region of each image, the crop as uint8 pixels at its
    model input; cut on the decode pool's threads (an image's crops in one task), in order."""
    size, interp = tagger.image_size, tagger.model.cfg.interpolation
    min_side = getattr(tagger.model, "min_input_size", 16)

    def cut(job):
        img, rs = job
        out = []
        for r in rs or []:
            box = to_work_box(r["box"], img)  # a region's box is in the file's pixels
            if native:
                c = native_crop(img, box, pad, size, min_side=min_side, interpolation=interp)
                out.append((r["tag_id"], tagger.prepare(c, native=True)))
            else:
                out.append((r["tag_id"], tagger.prepare(crop(img, box, pad))))
        return out

    items = []
    for j, got in enumerate(pool.map(cut, list(zip(images, regions)))):
        items.extend((j, t, c) for t, c in got)
    return items


def view_scores(tagger: BaseTagger, pool, images: list, regions: list, labels: list, views: list[RegionView],
                view_tags: set[int]) -> list[list[dict]]:
    """Per image (``images[j]``, ``regions[j]``, ``labels[j]``), the mean score of each pseudo candidate
    (a region whose tag the labels lack) of ``view_tags`` over ``views`` of its region in context."""
    out: list[list[dict]] = [[] for _ in images]
    if not views:
        return out
    size, interp = tagger.image_size, tagger.model.cfg.interpolation
    # a view depends on the image, its window and the mirror, not on the tag: candidates whose boxes
    # give the same window (always so for window 1.0) share one forward pass
    unique: dict[tuple, int] = {}
    jobs, items = [], []  # jobs: (image position, box, view); items: (image position, tag_id, [job per view])
    for j, img in enumerate(images):
        have = set(labels[j] or [])
        for r in regions[j] or []:
            if r["tag_id"] in have or r["tag_id"] not in view_tags:
                continue
            idx = []
            box = to_work_box(r["box"], img)  # a region's box is in the file's pixels
            for v in views:
                key = (j, v.mirror, *(round(x, 3) for x in view_window(box, *img.size, v.window)))
                if key not in unique:
                    unique[key] = len(jobs)
                    jobs.append((j, box, v))
                idx.append(unique[key])
            items.append((j, r["tag_id"], idx))
    if not items:
        return out
    crops = list(pool.map(lambda job: tagger.prepare(view_crop(images[job[0]], job[1], job[2].window, job[2].mirror,
                                                                size, interp), native=True), jobs))
    # each view scored for the tags that look at it only (the views are already the model's input size)
    want: list[list[int]] = [[] for _ in crops]
    for _, t, idx in items:
        for k in idx:
            if t not in want[k]:
                want[k].append(t)
    s = [dict(zip(w, got)) for w, got in zip(want, tagger.scores_for(crops, want))]
    for j, t, idx in items:
        got = np.array([s[k][t] for k in idx], dtype=np.float32)
        if not np.isnan(got).any():
            out[j].append({"tag_id": t, "score": float(got.mean())})
    return out


def embed_array(rows: list[list[dict]], embed_t: pa.DataType) -> pa.Array:
    """list<struct<tag_id, list<float16>>> from numpy vectors without going through Python floats."""
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
