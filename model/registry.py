"""The one model registry: entrypoint name -> a function that builds the model (timm's pattern).

Each model module registers its entrypoints into ``model/entrypoints.py`` when imported; this module
imports every model module, so no model module imports another to make its names known.
"""
from __future__ import annotations

import torch

# imported statically (so a step's fingerprint covers every model's code), each registering its entrypoints
import model.cnn  # noqa: F401
import model.ram  # noqa: F401
from model.checkpoint import load_checkpoint
from model.entrypoints import ENTRYPOINTS as _ENTRYPOINTS


def list_models() -> list[str]:
    return sorted(_ENTRYPOINTS)


def create_model(name: str, pretrained: str | None = None, **overrides) -> torch.nn.Module:
    """Build a registered model; ``pretrained`` is a local path (never a download)."""
    if name not in _ENTRYPOINTS:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()}")
    built = _ENTRYPOINTS[name](**overrides)
    if pretrained:
        load_checkpoint(built, pretrained)
    return built
