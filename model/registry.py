"""The one model registry: entrypoint name -> a function that builds the model (timm's pattern).

Each model module registers its entrypoints with :func:`register_model` when imported; the registry
imports the modules it lists (``MODEL_MODULES``) before it answers, so no model module has to import
another to make its names known.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

MODEL_MODULES = ("model.ram", "model.cnn")
_ENTRYPOINTS: dict[str, Callable[..., torch.nn.Module]] = {}


def register_model(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    _ENTRYPOINTS[fn.__name__] = fn
    return fn


def _load_entrypoints() -> None:
    for mod in MODEL_MODULES:
        importlib.import_module(mod)


def list_models() -> list[str]:
    _load_entrypoints()
    return sorted(_ENTRYPOINTS)


def create_model(name: str, pretrained: str | None = None, **overrides) -> torch.nn.Module:
    """Build a registered model; ``pretrained`` is a local path (never a download)."""
    from model.checkpoint import load_checkpoint

    _load_entrypoints()
    if name not in _ENTRYPOINTS:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()}")
    model = _ENTRYPOINTS[name](**overrides)
    if pretrained:
        load_checkpoint(model, pretrained)
    return model
