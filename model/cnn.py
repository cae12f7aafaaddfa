"""A small convolutional tagger: the base tagger a CPU can train in minutes.

Why it exists: on the scene world, a tiny RAM (Swin + cross-attention tagging head) trained on CPU for
minutes learns scenes and some colours but not object classes (held-out AP stays at chance), while
this network learns them in a few epochs (docs/results.md, "The base tagger"). It
speaks the interface the vision stages use, so it is a drop-in base tagger:

* ``forward(pixels, classes=None, return_attn=False)`` -> logits ``[B, N]`` and, with ``return_attn``,
  class activation maps shaped like RAM's last-layer attention ``[B, 1, N, 1 + L]`` (softmax over
  the L positions; index 0, RAM's pooled token, is 0);
* ``image_embeds(pixels)`` -> ``[B, 1 + L, C]`` (max-pooled feature first, then every position);
* ``class_threshold``, ``set_thresholds``, ``cfg.image_size`` / ``mean`` / ``std`` / ``interpolation``
  for the shared preprocessing.

Per position a 1x1 convolution scores every class; an image's logit pools the positions
(multiple-instance pooling: a tag is present if some place shows it). ``pool='max'`` takes the
maximum; ``pool='lse'`` a smooth maximum, ``log(mean(exp(r * s))) / r`` with ``r = lse_r``, which
sends every position a share of the gradient instead of only the winner's, and learns object classes
in fewer epochs than the max (docs/results.md has both).

``fully_convolutional`` is true: the tagger takes any input size of at least 16 px, so a crop can be
scored at the scale the whole image is seen at (``stages/vision/parts.py``, ``crops.crop_size: native``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.ram import IMAGENET_MEAN, IMAGENET_STD, ThresholdedTagger
from model.entrypoints import register_model


@dataclass(frozen=True)
class CnnConfig:
    variant: str = "cnn"
    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 128)
    num_classes: int = 50
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    pool: str = "max"  # max | lse (a smooth maximum over positions)
    lse_r: float = 4.0

    @property
    def label_dim(self) -> int:  # width of the pooled feature (what embed stores)
        return self.widths[-1]


class CnnTagger(ThresholdedTagger, nn.Module):
    fully_convolutional = True
    min_input_size = 16  # four 2x poolings leave one position

    def __init__(self, cfg: CnnConfig):
        super().__init__()
        if cfg.pool not in ("max", "lse"):
            raise ValueError(f"cnn pool must be 'max' or 'lse', not {cfg.pool!r}")
        self.cfg = cfg
        layers, c = [], 3
        for w in cfg.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, cfg.num_classes, 1)
        self.register_buffer("class_threshold", torch.full((cfg.num_classes,), 0.65), persistent=False)

    def features_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """The feature map ``[B, C, h, w]`` every output is computed from (one pass serves scores, class
        maps and the pooled feature: ``stages/vision/evidence.py``)."""
        return self.features(pixels)

    def logits_from(self, f: torch.Tensor, classes: torch.Tensor | None = None, return_attn: bool = False):
        """:meth:`forward` from a feature map: each class's 1x1 convolution is its own, so scoring a
        subset of classes gives exactly their full-head values."""
        w, b = self.classifier.weight, self.classifier.bias
        if classes is not None:
            w, b = w[classes], b[classes]
        flat = F.conv2d(f, w, b).flatten(2)  # [B, N, L]
        if self.cfg.pool == "lse":
            r = self.cfg.lse_r
            logits = (torch.logsumexp(r * flat, dim=-1) - math.log(flat.shape[-1])) / r
        else:
            logits = flat.amax(dim=-1)
        if not return_attn:
            return logits
        attn = torch.cat([torch.zeros_like(flat[..., :1]), flat.softmax(dim=-1)], dim=-1).unsqueeze(1)
        return logits, attn

    @staticmethod
    def pooled_from(f: torch.Tensor) -> torch.Tensor:
        """The pooled feature ``image_embeds(pixels)[:, 0]`` from a feature map."""
        return f.flatten(2).amax(dim=-1)

    def forward(self, pixels: torch.Tensor, classes: torch.Tensor | None = None, return_attn: bool = False):
        return self.logits_from(self.features_of(pixels), classes, return_attn)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.features_of(pixels).flatten(2).transpose(1, 2)  # [B, L, C]
        return torch.cat([f.amax(dim=1, keepdim=True), f], dim=1)

    def for_inference(self) -> "CnnTagger":
        """An eval-only copy that computes the same function faster on CPU: every BatchNorm folded into
        its convolution, weights channels-last (feed it channels-last batches). Outputs agree with the
        original to float rounding (~1e-7); bench/cnn_train.py measures the speed."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        m = copy.deepcopy(self).eval()
        mods, out, i = list(m.features), [], 0
        while i < len(mods):
            if isinstance(mods[i], nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                out.append(fuse_conv_bn_eval(mods[i], mods[i + 1]))
                i += 2
            else:
                out.append(mods[i])
                i += 1
        m.features = nn.Sequential(*out)
        m.channels_last = True
        return m.to(memory_format=torch.channels_last)


CFG_CNN_TAGGER_TINY = CnnConfig()


@register_model
def cnn_tagger_tiny(**kw) -> CnnTagger:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    kw.pop("label_dim", None)  # the feature width is the label dimension; a text encoder's is ignored
    return CnnTagger(replace(CFG_CNN_TAGGER_TINY, **kw))
