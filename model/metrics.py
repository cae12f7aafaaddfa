"""Scores of a held-out loader and the average precision they reach."""
from __future__ import annotations

import numpy as np
import torch

from model.data import batches
from model.ram import RAM
from model.train import TrainConfig, autocast, model_device


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP (classes without positives get NaN)."""
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        y = targets[:, c]
        if y.sum() == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = y[order]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps[c] = float((prec * hits).sum() / hits.sum())
    return aps


def predict(model, loader, cfg: TrainConfig | None = None):
    """``(sigmoid scores, targets, indices)`` per batch, every tensor on the model's device: the batch
    goes to the model, never the model's output to the host (callers copy what they keep). Rows whose
    image was rejected are not among them (the dataset's ``rejects`` has them)."""
    device = model_device(model)
    model.eval()
    for x, y, idx in batches(loader):
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, cfg):  # per batch: grad mode is not held across a yield
            scores = torch.sigmoid(model(x)).float()
        yield scores, y, idx


def predict_all(model, loader, cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, targets and dataset indices of a whole (bounded) held-out loader, on the host."""
    scores, targets, index = [], [], []
    for s, y, idx in predict(model, loader, cfg):
        scores.append(s.cpu().numpy())
        targets.append(y.cpu().numpy())
        index.append(np.asarray(idx))
    if not scores:  # nothing held out, or every held-out image rejected
        c = loader.dataset.num_classes
        return np.zeros((0, c), np.float32), np.zeros((0, c), np.float32), np.zeros(0, np.int64)
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(index)


def predict_arrays(model, loader, cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and targets of a whole (bounded) held-out loader, on the host."""
    s, t, _ = predict_all(model, loader, cfg)
    return s, t


def evaluate(model: RAM, loader, cfg: TrainConfig | None = None) -> dict:
    if len(loader.dataset) == 0:  # nothing held out (a benchmark, a tiny corpus)
        return {"mAP": float("nan"), "chance_mAP": float("nan"), "classes_with_positives": 0}
    s, t = predict_arrays(model, loader, cfg)
    if len(s) == 0:  # every held-out image was rejected
        return {"mAP": float("nan"), "chance_mAP": float("nan"), "classes_with_positives": 0}
    aps = average_precision(s, t)
    rng = np.random.default_rng(0)
    chance = average_precision(rng.random(s.shape), t)
    return {"mAP": float(np.nanmean(aps)), "chance_mAP": float(np.nanmean(chance)),
            "classes_with_positives": int(np.sum(~np.isnan(aps)))}
