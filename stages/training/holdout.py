"""What judging a tagger needs, for the train and retrain steps: the held-out rows (by a hash of image_id,
never trained on), the bounded evaluation sample among them, per-tag thresholds calibrated on it, and
mAP against a generated world's truth."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.stage import ReduceResult


def truth_map(scores, image_ids: list[str], truth_by_id: dict, id_names: dict[int, set[str]]) -> tuple[float, float]:
    """mAP of tag scores against the scene world's truth, over tags that name a world class."""
    import numpy as np

    from model.metrics import average_precision

    cols = [t for t, names in sorted(id_names.items()) if names]
    y = np.array([[1.0 if id_names[t] & truth_by_id[i].tags else 0.0 for t in cols] for i in image_ids])
    s = scores[:, cols]
    chance = average_precision(np.random.default_rng(0).random(s.shape), y)
    return float(np.nanmean(average_precision(s, y))), float(np.nanmean(chance))


@dataclass
class Fitted:
    """A trained tagger with what judging it needs: its tagset, the held-out evaluation sample (an
    ``ExportDataset``), its calibrated thresholds, and the step's result."""

    model: object
    tagset: object
    val_set: object
    thresholds: list[float]
    result: ReduceResult


@dataclass
class Split:
    """What the driver knows of the rows before training: counts, the bounded evaluation sample, and a
    digest of the training rows' labels (what the step trains on, comparable between runs)."""

    rows: int
    held_out: int
    eval_ids: set[str]
    train_labels: int = 0
    train_labels_sha1: str = ""


def split_rows(source, fraction: float, k: int) -> Split:
    """One pass over the ``image_id`` and ``union_label_id`` columns, shard by shard: how many rows, how
    many held out (by hash), the ``k`` held-out ids of the evaluation sample (an O(k) heap), and the
    training rows' labels as a count and a digest. No image is decoded: a bad image is found where it
    is decoded, in training or evaluation."""
    from model.data import row_tables

    count = {"rows": 0, "held": 0, "labels": 0}
    digest = hashlib.sha1()

    def held_ids():
        for table, _ in row_tables(source, ("image_id", "union_label_id")):
            ids = table.column("image_id").to_pylist()
            labels = table.column("union_label_id").to_pylist() if "union_label_id" in table.column_names \
                else [[]] * len(ids)
            count["rows"] += len(ids)
            for i, lab in zip(ids, labels):
                if held_out(i, fraction):
                    count["held"] += 1
                    yield i
                else:
                    count["labels"] += len(lab or [])
                    digest.update(f"{i}:{sorted(lab or [])}\n".encode())

    sample = eval_sample(held_ids(), k)
    return Split(count["rows"], count["held"], sample, count["labels"], digest.hexdigest())


def calibrate(scores, labels, precision: float, min_hits: int) -> list[float]:
    """Per class, the lowest threshold at which held-out precision reaches ``precision`` with at least
    ``min_hits`` true hits above it; 1.0 (never fires) where no threshold does. Tags the tagger cannot
    predict thus never pseudo-label, whatever their raw scores look like."""
    import numpy as np

    out = []
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        hits = np.cumsum(labels[order, c])
        prec = hits / np.arange(1, len(order) + 1)
        ok = np.nonzero((prec >= precision) & (hits >= min_hits))[0]
        # the deepest cut that still holds the precision, and never below a tie with the next image
        out.append(round(float(scores[order[ok[-1]], c]), 6) if len(ok) else 1.0)
    return out


def held_out(image_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def eval_sample(ids, k: int) -> set[str]:
    """The ``k`` held-out ids of lowest priority (a second hash of image_id): a sample that does not depend
    on sharding or order, kept in O(k) memory; all of them when there are at most ``k``."""
    import heapq

    return set(heapq.nsmallest(k, ids, key=lambda i: hashlib.sha1(f"eval:{i}".encode()).digest()))
