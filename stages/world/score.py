"""Score labels against the scene world's truth: precision, recall, F1, omissions, hallucinations.

Only names of the world's label space are scored: object classes (and the synonyms captions use for
them), scenes and colours. Other predicted tags ("big", "float") are counted as ``unscored_tags``.
A label is true when the image holds that class, scene or colour.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stages.world.generate import COLOURS, SCENES, SYNONYMS
from stages.world.shapes import SHAPES

CANONICAL: dict[str, str] = {c: c for c in SHAPES} | {s: s for s in SCENES} | {c: c for c in COLOURS}
CANONICAL |= {syn: cls for cls, syns in SYNONYMS.items() for syn in syns}


@dataclass
class ImageTruth:
    tags: set[str]
    omitted: set[str] = field(default_factory=set)
    hallucinated: set[str] = field(default_factory=set)


def truth_by_image(truth: pa.Table) -> dict[str, ImageTruth]:
    out = {}
    for r in truth.to_pylist():
        objs = r["objects"]
        classes = {o["cls"] for o in objs}
        tags = classes | {r["scene"]} | {o["colour"] for o in objs}
        omitted = {c for c in classes if all(o["omitted"] for o in objs if o["cls"] == c)}
        if not r["scene_mentioned"]:
            omitted.add(r["scene"])
        out[r["image_id"]] = ImageTruth(tags, omitted, set(r["hallucinated"]) - classes)
    return out


def canonical(name: str) -> str | None:
    return CANONICAL.get(" ".join(name.lower().split()))


def names_for_ids(tagset) -> dict[int, set[str]]:
    """World names each tag id stands for (through its name and synonyms)."""
    out: dict[int, set[str]] = {}
    for t in tagset.tags:
        out[t.tag_id] = {c for c in (canonical(n) for n in [t.name, *t.synonyms]) if c}
    return out


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "tp": tp, "fp": fp, "fn": fn}


def score_counts(predicted: dict[str, set[str]], truth: dict[str, ImageTruth], unscored: int = 0) -> dict:
    """The additive counts behind :func:`score` (JSON-able): one shard's, summed by :func:`merge_counts`."""
    per: dict[str, list[int]] = {}
    c = {"tp": 0, "fp": 0, "fn": 0, "images": len(truth), "unscored": unscored,
         "om_total": 0, "om_rec": 0, "hal_total": 0, "hal_removed": 0}
    for iid, t in truth.items():
        pred = predicted.get(iid, set())
        for name in pred | t.tags:
            k = per.setdefault(name, [0, 0, 0])
            slot = 0 if name in pred and name in t.tags else (1 if name in pred else 2)
            k[slot] += 1
            c[("tp", "fp", "fn")[slot]] += 1
        c["om_total"] += len(t.omitted)
        c["om_rec"] += len(t.omitted & pred)
        c["hal_total"] += len(t.hallucinated)
        c["hal_removed"] += len(t.hallucinated - pred)
    c["per"] = per
    return c


def merge_counts(parts) -> dict:
    out = {"tp": 0, "fp": 0, "fn": 0, "images": 0, "unscored": 0, "om_total": 0, "om_rec": 0, "hal_total": 0,
           "hal_removed": 0, "per": {}}
    for p in parts:
        for k, v in p.items():
            if k == "per":
                for name, trio in v.items():
                    acc = out["per"].setdefault(name, [0, 0, 0])
                    for j in range(3):
                        acc[j] += trio[j]
            else:
                out[k] += v
    return out


def finish_score(c: dict) -> dict:
    om_total, om_rec, hal_total, hal_removed = c["om_total"], c["om_rec"], c["hal_total"], c["hal_removed"]
    return {
        **_prf(c["tp"], c["fp"], c["fn"]),
        "images": c["images"],
        "unscored_tags": c["unscored"],
        "omissions": {"total": om_total, "recovered": om_rec, "rate": round(om_rec / om_total, 4) if om_total else 0.0},
        "hallucinations": {"total": hal_total, "removed": hal_removed,
                           "rate": round(hal_removed / hal_total, 4) if hal_total else 0.0},
        "per_class": {n: _prf(*v) for n, v in sorted(c["per"].items())},
    }


def score(predicted: dict[str, set[str]], truth: dict[str, ImageTruth], unscored: int = 0) -> dict:
    """``predicted``: image_id -> world names. Images missing from ``predicted`` count as empty."""
    return finish_score(score_counts(predicted, truth, unscored))


def label_counts(labels: pa.Table, truth: pa.Table, tagset=None, column: str = "union_label_id") -> dict:
    """:func:`score_counts` of a labels table (``image_id`` + ids or names per image) against truth rows."""
    id_names = names_for_ids(tagset) if tagset is not None else None
    predicted: dict[str, set[str]] = {}
    unscored = 0
    for iid, labs in zip(labels.column("image_id").to_pylist(), labels.column(column).to_pylist()):
        names: set[str] = set()
        for lab in labs or []:
            got = id_names.get(lab, set()) if id_names is not None and isinstance(lab, int) else (
                {canonical(lab)} - {None} if isinstance(lab, str) else set())
            if not got:
                unscored += 1
            names |= got  # type: ignore[arg-type]
        predicted[iid] = names
    return score_counts(predicted, truth_by_image(truth), unscored)


def write_score(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def score_labels(labels: pa.Table, truth: pa.Table, tagset=None, column: str = "union_label_id",
                 out: Path | None = None) -> dict:
    """Score a labels table (``image_id`` + ids or names per image) against a truth table."""
    result = finish_score(label_counts(labels, truth, tagset, column))
    if out is not None:
        write_score(result, out)
    return result
