"""Opening a row's image: where it is (a path, a URI, inline bytes), the limits it must meet, and the
reject code when it does not decode. The one place every layer opens images through: the trainer's
dataset, the vision steps' decode threads, the report's contact sheet.

A decoded image is RGB and upright (its EXIF orientation applied: boxes live in the upright image); with a
working size, a large one comes back reduced, its size in the file kept in ``img.info[SOURCE_SIZE]``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from common.rejects import Reject

# Where a row's image is: a path or URI, or inline bytes (written once, by the input step; read by reference).
IMAGE_COLUMNS = ("image", "image_bytes", "image_path")


class ImageLimits(BaseModel):
    """What a decodable image must be: a stage config holds one (``limits:``), unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_side: int = Field(8, ge=1, description="images with a smaller side are rejected (image_too_small)")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are rejected (image_too_large)")


def open_image(row: dict, base: Path | None, limits: ImageLimits,
               work_size: int | None = None) -> tuple[Image.Image | None, Reject | None]:
    """RGB image of a row (path or inline bytes), or a reject with a stable code.

    16-bit grey, CMYK, palette and alpha images are converted to RGB (alpha over white): they are
    usable, so they are not rejected. An EXIF orientation is applied (boxes live in the upright image).
    With ``work_size``, an image whose longer side exceeds it comes back at the working size
    (:func:`work_dims`; a JPEG is decoded straight at a reduced scale, so a 64 MP photo is never held
    whole) and :func:`source_size` gives its upright size in the file; smaller images come back as before.
    The limits judge the file's own size.
    """
    iid = row.get("image_id")
    data, path = row.get("image_bytes"), row.get("image") or row.get("image_path")
    if data is None and not path:
        return None, Reject(iid, "row_no_image", "no image path or bytes")
    if data is None and str(path).lower().startswith(("http://", "https://")):
        return None, Reject(iid, "row_image_url_only", f"{path} is a web URL: download the images first "
                            f"(img2dataset) and read its output", payload=str(path))
    if data is not None:
        src = io.BytesIO(data)
    else:  # a relative path is as the source wrote it (relative to the working directory), else to ``base``
        src = Path(path) if Path(path).is_absolute() or base is None or Path(path).exists() else base / path
    try:
        # the size checks come before any pixel is decoded; Pillow's bomb check is made explicit (not a
        # warnings filter: filters are process-wide, and images decode on several threads at once)
        img = Image.open(src)
        w, h = img.size
        if w * h > limits.max_pixels:
            return None, Reject(iid, "image_too_large", f"{w}x{h} > max_pixels {limits.max_pixels}",
                                payload=str(path) if path else None)
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            return None, Reject(iid, "image_too_large", f"{w}x{h} exceeds Pillow's decompression-bomb limit of "
                                f"{Image.MAX_IMAGE_PIXELS} pixels", payload=str(path) if path else None)
        work = work_dims(w, h, work_size)
        # a JPEG decodes at 1/2, 1/4 or 1/8 scale, never below the working size (other formats: no-op)
        draft = img.draft(None, work) if work != (w, h) else None
        img.load()
        if draft is not None:  # to the working size; the box is the whole image in the reduced pixels
            img = img.resize(work, Image.BILINEAR, box=draft[1])
    except Image.DecompressionBombError as e:
        return None, Reject(iid, "image_too_large", str(e)[:300], payload=str(path) if path else None)
    except OSError as e:
        code = "image_truncated" if "truncated" in str(e).lower() else "image_decode_failed"
        return None, Reject(iid, code, _reason(e), payload=str(path) if path else None)
    except (ValueError, SyntaxError) as e:
        return None, Reject(iid, "image_decode_failed", _reason(e), payload=str(path) if path else None)
    source = (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # upright: 90 degrees turn it
    img = upright(img)
    if min(source) < limits.min_side:
        return None, Reject(iid, "image_too_small", f"{source[0]}x{source[1]} < min_side {limits.min_side}")
    img = to_rgb(img)
    if source == work_dims(*source, work_size):
        return img, None  # under the working size: the image as it always was
    if img.size != work_dims(*source, work_size):  # not reduced while decoding (a PNG, a WebP, ...)
        img = img.resize(work_dims(*source, work_size), Image.BILINEAR)
    img.info[SOURCE_SIZE] = source
    return img, None


# ``Image.info`` key of an image decoded at a working size: its upright size in the file, (w, h)
SOURCE_SIZE = "source_size"


def work_dims(w: int, h: int, work_size: int | None) -> tuple[int, int]:
    """The size a ``w`` x ``h`` image is worked at: unchanged when its longer side is at most ``work_size``
    (or there is none), else scaled, aspect kept, so that the longer side is ``work_size``."""
    if work_size is None or max(w, h) <= work_size:
        return w, h
    s = work_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def source_size(img: Image.Image) -> tuple[int, int]:
    """The upright size of a decoded image in its file (:func:`open_image`): where its boxes live."""
    return img.info.get(SOURCE_SIZE, img.size)


def _reason(e: Exception) -> str:
    """The error as a reject reason, the same in every run: Pillow names inline bytes by their object's
    address (``<_io.BytesIO object at 0x7f..>``), which would make two runs' rejects tables differ."""
    import re

    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "<inline image bytes>", f"{type(e).__name__}: {e}")[:300]


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phone and web photos store an EXIF orientation instead of
    rotating their pixels, and every box and crop must be in the upright image. Training and every
    vision step decode through this, so a tagger sees photos the way it is scored on them."""
    from PIL import ImageOps

    orientation = img.getexif().get(0x0112, 1)
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((arr / max(1.0, float(arr.max())) * 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return bg
    return img if img.mode == "RGB" else img.convert("RGB")
