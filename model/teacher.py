"""Teachers for RAM's distillation term: an image -> pooled embedding the student's token 0 is pulled to.

RAM distils CLIP's image feature into its own pooled image embedding (L1). Two teachers, both from
local weights and both frozen:

* ``clip``: CLIP's image tower through ``open_clip`` (``pip install .[clip]``; RAM's own recipe).
* ``ram``: a released RAM / RAM++ checkpoint's pooled image embedding — itself trained to match CLIP's
  image feature, so it carries the same signal with no extra package, at the teacher's input size.

A teacher takes the student's input batch (normalised with the student's mean / std at the student's
size) and maps it to its own input: un-normalise, resize (bilinear, antialiased), re-normalise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def renormalise(x: torch.Tensor, src_mean, src_std, size: int, dst_mean, dst_std) -> torch.Tensor:
    def col(v):
        return torch.tensor(v, dtype=x.dtype, device=x.device)[None, :, None, None]

    rgb = x * col(src_std) + col(src_mean)
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (rgb - col(dst_mean)) / col(dst_std)


class RamTeacher:
    """Token 0 of a frozen RAM's ``image_embeds`` (``[B, label_dim]``)."""

    def __init__(self, model, student_cfg):
        self.model = model.eval().requires_grad_(False)
        self.student_cfg = student_cfg
        self.dim = model.cfg.label_dim

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s, t = self.student_cfg, self.model.cfg
        x = renormalise(x, s.mean, s.std, t.image_size, t.mean, t.std)
        return self.model.image_embeds(x)[:, 0]


class ClipTeacher:
    """CLIP's image feature from a local ``open_clip`` checkpoint (un-normalised, as RAM distils it)."""

    def __init__(self, weights: str, student_cfg, arch: str = "ViT-B-16", device: str = "cpu"):
        import open_clip

        self.model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        self.model.eval().requires_grad_(False)
        self.student_cfg = student_cfg
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.dim = self.model.visual.output_dim

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student_cfg
        return self.model.encode_image(renormalise(x, s.mean, s.std, self.size, CLIP_MEAN, CLIP_STD)).float()


def make_teacher(kind: str, weights: str | None, student_cfg, model_name: str = "ram_swin_l_384",
                 model_args: dict | None = None, device: str = "cpu"):
    """``kind``: ``ram`` (a local RAM checkpoint) or ``clip`` (local open_clip weights)."""
    if not weights:
        raise ValueError(f"teacher {kind!r} needs a local weights path (nothing is downloaded)")
    if kind == "clip":
        teacher = ClipTeacher(weights, student_cfg, device=device)
    elif kind == "ram":
        from model.registry import create_model

        teacher = RamTeacher(create_model(model_name, pretrained=weights, **(model_args or {})).to(device),
                             student_cfg)
    else:
        raise ValueError(f"unknown teacher {kind!r}; expected 'ram' or 'clip'")
    if teacher.dim != student_cfg.label_dim:
        raise ValueError(f"the teacher's embedding is {teacher.dim}-d but the student's pooled embedding is "
                         f"{student_cfg.label_dim}-d (label_dim); they must match for L1 distillation")
    return teacher
