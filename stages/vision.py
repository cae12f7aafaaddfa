"""What the vision stages share: the decode pool, the base tagger, boxes and crops (a row's image opens
through :mod:`common.images`).

The base tagger is either the ``tagger`` artifact of an earlier ``train`` step (``model.json`` +
``model.pth``) or a released checkpoint named in the stage config (entrypoint, local checkpoint, the
checkpoint's tag list). Tags of the run's tagset are matched to the model's classes by name; a tag the
model does not know gets no score (NaN), never a made-up one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from common.images import ImageLimits, source_size
from pipeline.stage import StageConfig


def region_types():
    import pyarrow as pa

    score = pa.struct([("tag_id", pa.int32()), ("score", pa.float32())])
    region = pa.struct([("tag_id", pa.int32()), ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
                        ("backend", pa.string())])
    embed = pa.struct([("tag_id", pa.int32()), ("embedding", pa.list_(pa.float16()))])
    return score, region, embed


def pseudo_type():
    """``tag_scores`` items: the tagger's score and the tag's own threshold (calibrated or released)."""
    import pyarrow as pa

    return pa.struct([("tag_id", pa.int32()), ("score", pa.float32()), ("threshold", pa.float32())])


def _scaled(box, fx: float, fy: float) -> list[float]:
    return [box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy]


def to_work_box(box, img: Image.Image) -> list[float]:
    """A box in the file's coordinates (a region, as stored) in the pixels of ``img`` as decoded."""
    (sw, sh), (w, h) = source_size(img), img.size
    return list(box) if (sw, sh) == (w, h) else _scaled(box, w / sw, h / sh)


def to_source_box(box, img: Image.Image) -> list[float]:
    """A box in the pixels of ``img`` as decoded in the file's coordinates (what a region stores)."""
    (sw, sh), (w, h) = source_size(img), img.size
    return list(box) if (sw, sh) == (w, h) else _scaled(box, sw / w, sh / h)


class Decoder:
    """Decodes rows' images on ``workers`` threads, ahead of the model, in row order.

    Pillow releases the GIL while it decodes and resizes, so threads decode in parallel beside a
    forward pass (which releases it too): each vision actor keeps ``resources.decode_workers`` images
    in flight while its model computes. ``prepare`` (e.g. the resize to the model's input, as uint8)
    runs in the same thread. Rejects are exactly :func:`open_image`'s: same codes, same order.
    ``workers`` 1 decodes in the calling thread, as before there was a pool. ``work_size``: images come
    back at most that large (:func:`open_image`), so what a batch holds is bounded by its length.
    """

    def __init__(self, workers: int = 1, base: Path | None = None, limits: ImageLimits | None = None,
                 ahead: int | None = None, work_size: int | None = None):
        self.workers, self.base, self.limits = max(1, int(workers)), base, limits or ImageLimits()
        self.work_size = work_size
        self.ahead = ahead or 4 * self.workers  # tasks queued beyond the one being read
        self._pool = None

    def map(self, fn, items, ahead: int | None = None):
        """``fn(item)`` for each item, in order, at most ``ahead`` computed before they are read."""
        ahead = ahead or self.ahead
        if self.workers == 1:
            yield from map(fn, items)
            return
        import collections
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        queue: collections.deque = collections.deque()
        for item in items:
            queue.append(self._pool.submit(fn, item))
            if len(queue) > ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def decode(self, rows: list[dict], prepare=None, ahead: int | None = None):
        """``(row index, image or None, reject or None, prepare(image) or None)`` per row, in order."""
        import common.images as images  # looked up per call, so a benchmark can count decodes

        def one(item):
            i, row = item
            img, rej = images.open_image(row, self.base, self.limits, self.work_size)
            return i, img, rej, (prepare(img) if prepare is not None and img is not None else None)

        yield from self.map(one, list(enumerate(rows)), ahead)

    def batches(self, rows: list[dict], size: int, prepare=None):
        """The decoded rows in groups of ``size`` kept images, each yielded as soon as its last image is
        decoded (the threads go on decoding the next group meanwhile): ``(row indices, images,
        prepared, rejects since the last group)``; a last, shorter group and the trailing rejects end it."""
        idx, imgs, prep, rej = [], [], [], []
        # two groups in flight: the threads fill the next group while the model computes on this one
        for i, img, r, extra in self.decode(rows, prepare, ahead=max(self.ahead, 2 * size)):
            if r is not None:
                rej.append(r)
                continue
            idx.append(i), imgs.append(img), prep.append(extra)
            if len(idx) == size:
                yield idx, imgs, prep, rej
                idx, imgs, prep, rej = [], [], [], []
        if idx or rej:
            yield idx, imgs, prep, rej

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class TaggerConfig(StageConfig):
    """Which base tagger a stage uses: the run's ``tagger`` artifact, or a released checkpoint."""

    model: str | None = Field(None, description="entrypoint of a released checkpoint (null: the train step's)")
    checkpoint: str | None = Field(None, description="local checkpoint path (official layout)")
    tag_list: str | None = Field(None, description="the checkpoint's tag list (one name per line)")
    model_args: dict = Field(default_factory=dict, description="entrypoint overrides")
    device: str = Field("auto", description="auto (cuda when this worker sees a GPU: under Ray, when the "
                        "step's resources ask for one), cpu or cuda")
    batch_size: int = Field(32, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="inference dtype: auto is bf16 autocast on CUDA and fp32 on CPU (the golden "
        "numerics); bf16 / fp16 autocast anywhere; fp32 off")
    tf32: bool = Field(True, description="on CUDA, fp32 matmuls and convolutions in TF32")
    compile: bool = Field(False, description="torch.compile the backbone (minutes of warm-up per worker)")


@dataclass
class BaseTagger:
    """The base tagger as the stages see it: tagset ids in, scores out. Every forward goes through
    ``model/infer.Inference`` (device, precision, pinned copies, cached queries, restricted head)."""

    model: object  # model.ram.RAM or model.cnn.CnnTagger
    class_of_tag: np.ndarray  # tagset id -> model class index, -1 when the model has no such class
    threshold_of_tag: np.ndarray  # tagset id -> the tag's threshold (NaN when the model lacks the tag)
    device: str = "cpu"
    batch_size: int = 32
    precision: str = "auto"
    compile: bool | str = False  # True: inductor; a string names another torch.compile backend
    tf32: bool = True
    head_chunk: int | None = None
    pin_memory: bool | None = None  # None: on CUDA

    def __post_init__(self) -> None:
        from model.infer import Inference

        self.engine = Inference(self.model, self.device, self.precision, self.compile, self.tf32, self.head_chunk,
                                self.pin_memory)
        self.model = self.engine.model

    @classmethod
    def from_model(cls, model, model_names: list[str], tag_names: list[str] | None = None,
                   tag_thresholds: list[float] | None = None, **kw) -> "BaseTagger":
        """Tags matched to the model's classes by name (``tag_names``: default the model's own);
        thresholds are ``tag_thresholds`` where given, else the model's own ``class_threshold``."""
        tag_names = list(model_names) if tag_names is None else list(tag_names)
        index = {n: i for i, n in enumerate(model_names)}
        class_of_tag = np.array([index.get(n, -1) for n in tag_names], dtype=np.int64)
        own = model.class_threshold.cpu().numpy()
        th = np.array([np.nan if c < 0 else (own[c] if tag_thresholds is None else tag_thresholds[t])
                       for t, c in enumerate(class_of_tag)], dtype=np.float32)
        return cls(model, class_of_tag, th, **kw)

    @classmethod
    def load(cls, cfg: TaggerConfig, artifacts: dict[str, str], tag_names: list[str],
             tag_thresholds: list[float] | None = None) -> "BaseTagger":
        """``tag_thresholds`` (the tagset's) apply where the tagger brings none of its own."""
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, model_names, thresholds = _load_model(cfg, artifacts, tag_names)
        if thresholds is not None:
            model.set_thresholds(thresholds)
        model = model.eval()
        if hasattr(model, "for_inference"):  # same function, faster (CNN: BatchNorm folded, channels-last)
            model = model.for_inference()
        fallback = None if thresholds is not None else \
            (tag_thresholds if tag_thresholds is not None else [0.65] * len(tag_names))
        return cls.from_model(model, model_names, tag_names, fallback, device=resolve_device(cfg.device),
                              batch_size=cfg.batch_size, precision=cfg.precision, compile=cfg.compile, tf32=cfg.tf32)

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def fully_convolutional(self) -> bool:
        """True when the model takes inputs of any size (a crop can keep the whole image's scale)."""
        return bool(getattr(self.model, "fully_convolutional", False))

    def _pixels(self, images: list, native: bool = False):
        """A batch on the model's device; ``images``: PIL images, or uint8 ``[3, H, W]`` tensors already at
        their input size (:meth:`prepare`); ``native``: PIL images already at their input size (all equal)."""
        from model.preprocess import to_uint8

        x = self.engine.stack([to_uint8(im, self.model.cfg, im.size if native else None)
                               if isinstance(im, Image.Image) else im for im in images])
        return self.engine.to_device(x)

    def prepare(self, img: Image.Image, native: bool = False):
        """What a decode worker hands the model: uint8 pixels at the model's input (``native``: at the
        image's own size, already the input size)."""
        from model.preprocess import to_uint8

        return to_uint8(img, self.model.cfg, img.size if native else None)

    def _slices(self, n: int):
        return (list(range(i, min(n, i + self.batch_size))) for i in range(0, n, self.batch_size))

    def native_batches(self, images: list[Image.Image]):
        """Indices of ``images`` grouped by size, at most ``batch_size`` each (inputs of one size stack)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(_size(im), []).append(i)
        for size in sorted(groups):
            idx = groups[size]
            for s in range(0, len(idx), self.batch_size):
                yield idx[s:s + self.batch_size]

    def crop_scores(self, crops: list[Image.Image], tags: list[int], native: bool = False) -> np.ndarray:
        """Each crop's score for its own tag (NaN when the model lacks the tag); ``native``: crops are
        already at their input size (:func:`native_crop`), scored batch by batch of equal size."""
        if not native:
            got = self.scores_for(crops, [[t] for t in tags])
            return np.array([g[0] for g in got], dtype=np.float32)
        out = np.full(len(crops), np.nan, dtype=np.float32)
        jobs = ((idx, lambda idx=idx: self.engine.scores(self._pixels([crops[i] for i in idx], native=True)))
                for idx in self.native_batches(crops))
        for idx, p in self.engine.run(jobs):
            p = p.numpy()
            for k, i in enumerate(idx):
                c = self.class_of_tag[tags[i]]
                if c >= 0:
                    out[i] = p[k, c]
        return out

    def scores(self, images: list[Image.Image], attention: bool = False):
        """``[B, tags]`` sigmoid scores (NaN for tags the model lacks); with ``attention`` also the last
        tagging layer's attention over image tokens, ``[B, tags, g, g]`` (zeros for unknown tags)."""
        known = self.class_of_tag >= 0
        classes = self.class_of_tag[known]
        out = np.full((len(images), len(self.class_of_tag)), np.nan, dtype=np.float32)
        maps = None
        jobs = ((idx, lambda idx=idx: self.engine.scores(self._pixels([images[i] for i in idx]), classes, attention))
                for idx in self._slices(len(images)))
        for idx, res in self.engine.run(jobs):
            i, n = idx[0], len(idx)
            if attention:
                res, a = res
                g = int(round(a.shape[-1] ** 0.5))
                if maps is None:
                    maps = np.zeros((len(images), len(self.class_of_tag), g, g), dtype=np.float32)
                maps[i:i + n, known] = a.reshape(n, -1, g, g).numpy()
            out[i:i + n, known] = res.numpy()
        return (out, maps) if attention else out

    def scores_for(self, images: list[Image.Image], wanted: list[list[int]], attention: bool = False) -> list:
        """Each image's scores for its own tags only (``wanted[i]``, tagset ids; NaN where the model lacks
        the tag), with ``attention`` as (scores, maps ``[len(wanted[i]), g, g]``). A model with a query
        head (RAM) scores only the classes its batch needs, exactly what the full head gives them; other
        models score every class and the wanted ones are read off."""
        if not self.engine.query_head:
            if not images:
                return []
            full = self.scores(images, attention)
            if attention:
                return [(full[0][i, w], full[1][i, w]) for i, w in enumerate(wanted)]
            return [full[i, w] for i, w in enumerate(wanted)]
        scores = [np.full(len(w), np.nan, dtype=np.float32) for w in wanted]
        maps: list = [None] * len(wanted)

        def jobs():
            for idx in self._slices(len(images)):
                need = sorted({int(self.class_of_tag[t]) for i in idx for t in wanted[i] if self.class_of_tag[t] >= 0})
                if need:
                    yield (idx, need), lambda idx=idx, need=need: self.engine.scores(
                        self._pixels([images[i] for i in idx]), need, attention)

        for (idx, need), res in self.engine.run(jobs()):
            s, a = res if attention else (res, None)
            g = int(round(a.shape[-1] ** 0.5)) if attention else 0
            for k, i in enumerate(idx):
                hit, cols = self._columns(wanted[i], need)
                scores[i][hit] = s[k].numpy()[cols]
                if attention:
                    maps[i] = np.zeros((len(wanted[i]), g, g), np.float32)
                    maps[i][hit] = a[k].numpy()[cols].reshape(-1, g, g)
        if attention:
            return [(s, m if m is not None else np.zeros((len(s), 0, 0), np.float32)) for s, m in zip(scores, maps)]
        return scores

    def scores_then_maps(self, images: list, choose) -> list[tuple[np.ndarray, list[int], np.ndarray]]:
        """pseudolabel and attention grounding from one backbone pass per batch. For each batch: every
        tag's score (as :meth:`scores`), then ``choose(i, scores_i) -> tag ids`` per image, then those
        tags' attention maps from the same image tokens (as :meth:`scores_for` with ``attention``; a query
        head or a CNN scores only the chosen classes, exactly their full-head values). Returns per image
        ``(scores [tags], chosen, maps [len(chosen), g, g])``; the host waits for each batch's scores."""
        from model.infer import to_host

        known = self.class_of_tag >= 0
        classes = self.class_of_tag[known]
        out: list = []
        for idx in self._slices(len(images)):
            enc = self.engine.encode(self._pixels([images[i] for i in idx]))
            part = np.full((len(idx), len(self.class_of_tag)), np.nan, dtype=np.float32)
            part[:, known] = to_host(self.engine.scores_from(enc, classes)).numpy()
            chosen = [list(choose(i, part[k])) for k, i in enumerate(idx)]
            need = sorted({int(self.class_of_tag[t]) for c in chosen for t in c if self.class_of_tag[t] >= 0})
            amaps = to_host(self.engine.scores_from(enc, need, attention=True)[1]).numpy() if need else None
            for k, c in enumerate(chosen):
                if amaps is None:
                    maps = np.zeros((len(c), 0, 0), np.float32)
                else:
                    hit, cols = self._columns(c, need)
                    g = int(round(amaps.shape[-1] ** 0.5))
                    maps = np.zeros((len(c), g, g), np.float32)
                    maps[hit] = amaps[k, cols].reshape(-1, g, g)
                out.append((part[k], c, maps))
        return out

    def embed_and_score(self, crops: list, tags: list[int], native: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """embed and verify from one pass over each crop batch: the pooled feature (as :meth:`embed`) and
        the crop's score for its own tag (as :meth:`crop_scores`; NaN where the model lacks the tag), both
        from the same backbone output. Returns ``(features [n, label_dim], scores [n])``."""
        feats = np.zeros((len(crops), self.model.cfg.label_dim), np.float32)
        scores = np.full(len(crops), np.nan, dtype=np.float32)
        cls = self.class_of_tag[np.asarray(tags, dtype=np.int64)] if len(tags) else np.zeros(0, np.int64)

        def jobs():
            for idx in (self.native_batches(crops) if native else self._slices(len(crops))):
                need = sorted({int(cls[i]) for i in idx if cls[i] >= 0})
                yield (idx, need), lambda idx=idx, need=need: self._pool_and_score(
                    self._pixels([crops[i] for i in idx], native=native), need)

        for (idx, need), (f, s) in self.engine.run(jobs()):
            feats[idx] = f.numpy()
            if need:
                s = s.numpy()
                for k, i in enumerate(idx):
                    if cls[i] >= 0:
                        scores[i] = s[k, int(np.searchsorted(need, cls[i]))]
        return feats, scores

    def _pool_and_score(self, x, need: list[int]):
        enc = self.engine.encode(x)
        pooled = self.engine.pooled_from(enc)
        return pooled, (self.engine.scores_from(enc, need) if need else pooled[:, :0])

    def _columns(self, tags: list[int], need: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """For an image's ``tags``, the positions of those the model knows and their columns in the
        output of a call that scored the sorted class list ``need``."""
        cls = self.class_of_tag[tags] if tags else np.zeros(0, np.int64)
        hit = np.nonzero(cls >= 0)[0]
        return hit, np.searchsorted(need, cls[hit])

    def embed(self, images: list[Image.Image], native: bool = False) -> np.ndarray:
        """The pooled image feature (``image_embeds[:, 0]``), ``[B, label_dim]`` float32; ``native`` as in
        :meth:`crop_scores`."""
        out = np.zeros((len(images), self.model.cfg.label_dim), np.float32)
        batches = self.native_batches(images) if native else self._slices(len(images))
        jobs = ((idx, lambda idx=idx: self.engine.pooled(self._pixels([images[i] for i in idx], native=native)))
                for idx in batches)
        for idx, f in self.engine.run(jobs):
            out[idx] = f.numpy()
        return out


def _size(im) -> tuple[int, int]:
    """(w, h) of a PIL image or a ``[3, H, W]`` tensor."""
    return im.size if isinstance(im, Image.Image) else (int(im.shape[-1]), int(im.shape[-2]))


def _load_model(cfg: TaggerConfig, artifacts: dict[str, str], tag_names: list[str]):
    """(model, the model's class names, its own thresholds or None) from the run's tagger artifact or a
    released checkpoint."""
    import torch

    from model.checkpoint import load_checkpoint, load_state

    from model.registry import create_model

    if cfg.model is None:
        if "tagger" not in artifacts:
            raise ValueError("no base tagger: set model + checkpoint in the stage config, or run a train "
                             "step (it provides the 'tagger' artifact) before this one")
        d = Path(artifacts["tagger"])
        spec = json.loads((d / "model.json").read_text())
        model = create_model(spec["entrypoint"], **spec["model_args"])
        state = load_state(d / spec["checkpoint"])
        if "label_embed" in state["model"]:  # RAM / RAM++
            n = state["model"]["label_embed"].shape[0] // (
                model.cfg.descriptions_per_class if model.cfg.variant == "ram_plus" else 1)
            if n != model.cfg.num_classes:
                model.set_vocabulary(state["model"]["label_embed"])
            load_checkpoint(model, state)
        else:  # a tagger without label queries (model/cnn.py): its own strict load
            model.load_state_dict(state["model"])
        model_names = (d / "tag_list.txt").read_text().split("\n") if (d / "tag_list.txt").exists() \
            else list(tag_names)
        thresholds = json.loads((d / "thresholds.json").read_text()) if (d / "thresholds.json").exists() else None
    else:
        if not cfg.checkpoint:
            raise ValueError(f"model {cfg.model!r} needs a local checkpoint path (checkpoint:)")
        state = load_state(cfg.checkpoint)
        sd = state.get("model", state)
        model = create_model(cfg.model, **cfg.model_args)
        if "label_embed" not in sd and not hasattr(model, "set_vocabulary"):
            model.load_state_dict(sd)
        else:
            per = model.cfg.descriptions_per_class if model.cfg.variant == "ram_plus" else 1
            if "label_embed" in sd and sd["label_embed"].shape[0] // per != model.cfg.num_classes:
                model.set_vocabulary(sd["label_embed"] if sd["label_embed"].shape[1] == model.cfg.label_dim
                                     else torch.zeros(sd["label_embed"].shape[0], model.cfg.label_dim))
            load_checkpoint(model, state)
        model_names = Path(cfg.tag_list).read_text().split("\n") if cfg.tag_list else list(tag_names)
        thresholds = None
    return model, [n.strip() for n in model_names if n.strip()], thresholds


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_runtime(cfg: TaggerConfig, stage) -> str:
    """Where a step's workers will compute and in what precision, resolved on the driver before they start,
    for the step's fingerprint: ``device: auto`` is a GPU in a worker that gets one and ``precision: auto``
    is bf16 there and fp32 on a CPU, so one config gives two results. Under Ray a worker sees a GPU when
    the step's ``resources.num_gpus`` asks for one; in-process (``ray.enabled: false``), when the driver has
    one."""
    device = cfg.device
    if device == "auto":
        under_ray = stage.context.ray.get("enabled", True)
        device = "cuda" if (stage.resources.num_gpus > 0 if under_ray else resolve_device("auto") == "cuda") \
            else "cpu"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return f"device={device};precision={precision}"


def clip_box(box, w: int, h: int) -> list[float] | None:
    """Box clipped to the image; None when nothing of it is inside (or it is degenerate)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        return None
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return [x0, y0, x1, y1]


def crop(img: Image.Image, box, pad: float = 0.0) -> Image.Image:
    """The box with ``pad`` of its size added on each side (clipped to the image)."""
    x0, y0, x1, y1 = box
    px, py = (x1 - x0) * pad, (y1 - y0) * pad
    b = clip_box([x0 - px, y0 - py, x1 + px, y1 + py], *img.size) or [0, 0, img.size[0], img.size[1]]
    return img.crop(tuple(int(round(v)) for v in b))


def native_crop(img: Image.Image, box, pad: float, size: int, step: int = 8, min_side: int = 16,
                interpolation: str = "bilinear") -> Image.Image:
    """The box (plus ``pad``) at the scale the whole image is seen at by a model of input ``size``: the
    image becomes ``size`` x ``size``, so the crop shrinks by the same factors. Each side is rounded up to
    a multiple of ``step`` (at least ``min_side``) by taking a little more context around the box, so
    crops fall into few sizes and batch together. Returns the crop already resized to that input size."""
    w, h = img.size
    fx, fy = size / w, size / h
    x0, y0, x1, y1 = box
    px, py = (x1 - x0) * pad, (y1 - y0) * pad
    out = []
    for lo, hi, p, f, full in ((x0, x1, px, fx, w), (y0, y1, py, fy, h)):
        side = min(size, max(min_side, -(-math.ceil((hi - lo + 2 * p) * f - 1e-6) // step) * step))
        src = side / f  # that many source pixels
        c = (lo + hi) / 2
        a = min(max(0.0, c - src / 2), max(0.0, full - src))
        out.append((a, min(float(full), a + src), side))
    (ax, bx, sw), (ay, by, sh) = out
    from model.preprocess import RESAMPLE  # the filter the whole image is resized with

    return img.resize((sw, sh), RESAMPLE[interpolation], box=(ax, ay, bx, by))


def attention_box(amap: np.ndarray, w: int, h: int, rel: float = 0.5) -> tuple[list[float], float]:
    """Box around the attention peak: the 4-connected cells at >= ``rel`` x peak that touch the peak,
    scaled to the image. Returns the box and the share of attention mass inside it."""
    g_h, g_w = amap.shape
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    keep = amap >= rel * amap[peak]
    seen = np.zeros_like(keep)
    stack = [peak]
    seen[peak] = True
    while stack:
        y, x = stack.pop()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < g_h and 0 <= nx < g_w and keep[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                stack.append((ny, nx))
    ys, xs = np.nonzero(seen)
    box = [xs.min() * w / g_w, ys.min() * h / g_h, (xs.max() + 1) * w / g_w, (ys.max() + 1) * h / g_h]
    total = float(amap.sum())
    return [float(v) for v in box], float(amap[seen].sum() / total) if total > 0 else 0.0
