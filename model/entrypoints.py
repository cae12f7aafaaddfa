"""The table of model entrypoints that model modules register into (``register_model``); it imports
nothing, so a model module can register without importing the factory (``model/registry.py``)."""
from __future__ import annotations

from typing import Callable

ENTRYPOINTS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    ENTRYPOINTS[fn.__name__] = fn
    return fn
