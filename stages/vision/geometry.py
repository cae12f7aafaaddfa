"""Boxes and crops: a region's box is stored in its file's pixels; the image in hand may be decoded
smaller (``work_size``), so every cut converts first."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from common.images import source_size


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
