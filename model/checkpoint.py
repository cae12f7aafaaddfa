"""Loading weights: the official RAM / RAM++ files and this project's checkpoints, by key and shape.

A checkpoint that does not fit its model fails naming the key and both shapes; official keys are renamed
and resized to the model's (``checkpoint_filter_fn``). Nothing here builds a model: the model registry
(``model/registry.py``) and the model modules import this, never the other way round.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key and both shapes."""


# -- checkpoint filter --------------------------------------------------------------------------------

CAPTION_BRANCH = ("tag_encoder.", "text_decoder.")
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "position_ids")


def resize_rel_pos_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Bicubic resize of a ``[(2w-1)², heads]`` table (window 7 -> 12), no scipy needed."""
    old = int(round(table.shape[0] ** 0.5))
    new = int(round(new_len ** 0.5))
    grid = table.T.reshape(1, table.shape[1], old, old)
    out = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=True)
    return out.reshape(table.shape[1], new * new).T.contiguous()


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official checkpoint -> this model's state_dict keys. Pure: the input is not modified.

    Unwraps ``['model']``, renames the legacy ``vision_multi`` to ``tagging_head``, drops the caption
    branch unless the model has one, drops the persistent buffers (the model's own are used), resizes
    relative-position tables.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        k = k.replace("vision_multi.", "tagging_head.")
        if k.endswith(BUFFER_SUFFIXES) or (k.startswith(CAPTION_BRANCH) and not getattr(model.cfg, "caption_branch", False)):
            continue
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            v = resize_rel_pos_table(v, own[k].shape[0])
        out[k] = v
    for k, v in own.items():
        if k.endswith(BUFFER_SUFFIXES):
            out[k] = v
    return out


def load_state(path) -> dict:
    """A checkpoint file read as data: ``torch.load(weights_only=True)``, which rebuilds tensors and plain
    containers only. A file that pickles anything else (a class, a function: unpickling it could run
    code) is refused with an error naming the file and what it holds. Every state this project writes
    (weights, AdamW and LambdaLR state, the loop's position) and the released RAM / RAM++ files are made
    of those, so no type is allow-listed (``torch.serialization.add_safe_globals``)."""
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"an object of {found.group(1)}" if found else "Python objects beyond tensors and plain containers"
        raise CheckpointError(f"{path}: refused: the checkpoint pickles {what}, and loading it could run code; "
                              f"only tensors, numbers, strings, lists and dicts are read. Re-save the weights "
                              f"alone where you trust the file: torch.save({{'model': model.state_dict()}}, "
                              f"path)") from None


def load_checkpoint(model: nn.Module, path_or_state, strict: bool = True) -> nn.Module:
    """Filter, check every key and shape, then ``load_state_dict(strict=True)``."""
    state = path_or_state
    if not isinstance(state, dict):
        state = load_state(path_or_state)
    sd = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    if "label_embed" not in sd:
        raise CheckpointError("checkpoint has no 'label_embed' (the official loader would leave zeros)")
    for k, v in sd.items():
        if k not in own:
            raise CheckpointError(f"unexpected key {k!r} with shape {list(v.shape)} (model has no such key)")
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{k}: checkpoint shape {list(v.shape)} != model shape {list(own[k].shape)}")
    missing = [k for k in own if k not in sd]
    if missing and strict:
        raise CheckpointError(f"missing key(s) {missing[:5]}{'...' if len(missing) > 5 else ''} "
                              f"(shapes {[list(own[k].shape) for k in missing[:5]]})")
    model.load_state_dict(sd, strict=strict)
    return model


# -- default configs, entrypoints (model/registry.py builds them) -------------------------------------------------------------
