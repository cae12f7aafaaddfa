"""RAM's preprocessing, derived from a model's config: PIL bilinear resize to a square, /255, ImageNet norm.

PIL's bilinear filter antialiases when it shrinks, so it is used rather than ``F.interpolate``
(which differs by up to 0.017 after normalisation). No EXIF rotation, as the official scripts.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from common.images import upright
from model.ram import RamConfig

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def load_rgb(data: bytes | str) -> Image.Image:
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()
    img = upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale down to 8 bits
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((arr / max(1.0, arr.max()) * 255).astype(np.uint8))
    return img.convert("RGB")


def to_uint8(img: Image.Image, cfg: RamConfig, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[3, H, W]`` uint8 pixels at the model's square input (or ``size``, (w, h)): what a decode worker
    hands the model (a quarter of float32's bytes to copy; :func:`normalize` finishes on the device)."""
    s = size or (cfg.image_size, cfg.image_size)
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert() to its own mode would copy it whole
    return torch.from_numpy(np.array(rgb.resize(s, RESAMPLE[cfg.interpolation]))).permute(2, 0, 1)


def normalize(x: torch.Tensor, cfg: RamConfig) -> torch.Tensor:
    """uint8 pixels (``[3, H, W]`` or a batch) -> /255, ImageNet-normalised float32, on their own device."""
    shape = (3, 1, 1)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(shape).to(x.device)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(shape).to(x.device)
    return (x.to(torch.float32).div(255) - mean) / std


def to_tensor(img: Image.Image, cfg: RamConfig, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[3, H, W]`` normalised pixels, resized to the model's square input (or to ``size``, (w, h))."""
    return normalize(to_uint8(img, cfg, size), cfg)
