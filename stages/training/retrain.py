"""retrain.ram.v1: the paper's fourth step. Train the tagger again on the engine's cleaned labels, with the
base tagger's recipe, and measure what the engine bought: both taggers judged on the same held-out
images (chosen by hash of image_id, never trained on by either).

The step is ``train.ram.v1`` (same config, same training path) on the rows it is given: after ``decide``
their ``union_label_id`` is the cleaned labels. Before it runs, the run's ``tagger`` artifact is the base
tagger (trained on parse labels); after it, this step's tagger, so a later round's evidence uses it.

The judge: on a scene world, the truth of the held-out images; elsewhere, their cleaned labels (the
outcome then says so, and it measures agreement with the engine, not correctness). Reported: mAP over the
judged tags, F1 of each tagger at its own calibrated thresholds, and mAP by tag kind and by frequency
third (head / middle / tail, by the tag's count in the parse labels).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import RowSource
from stages.training.train import TrainStage, TrainStageConfig

KINDS = ("object", "scene", "attribute", "action")
THIRDS = ("head", "middle", "tail")


LABELS = ("cleaned", "generated", "paper", "parse", "truth")


class RetrainConfig(TrainStageConfig):
    """A retrain step trains with the base tagger's recipe (the ``recipe.json`` its step wrote); only the
    keys set in this step's own section change it."""

    start: Literal["scratch", "base"] = Field("scratch", description="scratch: a new tagger, the base's "
                                              "recipe (the paper's retraining); base: start from the base "
                                              "tagger's weights (a fine-tune: cheaper, but not a like-for-like "
                                              "comparison, since the base's training continues)")
    labels: Literal[LABELS] = Field(  # type: ignore[valid-type]
        "cleaned", description="what to train on: cleaned (decide's union_label_id), generated (the parse labels "
        "plus what the rule adds, nothing removed), paper (the paper's rule), parse (the parse labels), truth "
        "(a scene world's truth: the ceiling; only a generated world has it)")


class LabelledRows(RowSource):
    """A step's rows (a :class:`pipeline.view.View`) with ``union_label_id`` taken from another label set
    (``labels``), and without decide's ``uncertain_label_id`` (every other tag a negative), so the one
    training path trains on it: a RowSource for ``TrainStage.fit``. Picklable: Ray
    Train workers read their rows through it."""

    def __init__(self, view, labels: str, truth_dir: str | None = None, names: dict[int, set[str]] | None = None):
        super().__init__(view=view)
        self.labels, self.truth_dir, self.names = labels, truth_dir, names
        if labels == "truth" and truth_dir is None:
            raise ValueError("retrain.labels: 'truth' needs a scene world's truth (its input step provides it); "
                             "this run has none")

    def iter_tables_with_base(self, columns):
        import pyarrow as pa

        cols = list(columns)
        if "union_label_id" not in cols or self.labels == "cleaned":
            yield from super().iter_tables_with_base(cols)
            return
        extra = [] if self.labels == "truth" else ["stage_labels"]
        view = self.view
        owner = view.owners.get("image_path") or view.owners.get("image") or view.rows
        for i in view.shards():
            t = view.read_shard(i, [c for c in dict.fromkeys([*cols, *extra]) if c in view.owners])
            labs = self._labels(t, i)
            k = t.column_names.index("union_label_id")
            t = t.set_column(k, "union_label_id", pa.array(labs, pa.list_(pa.int32())))
            if "uncertain_label_id" in t.column_names:  # decide's unknowns belong to its own labels only
                t = t.drop_columns(["uncertain_label_id"])
            yield (t.drop_columns(extra) if extra and "stage_labels" not in cols else t), view.step_dir(owner)

    def _labels(self, t, shard: int) -> list[list[int]]:
        if self.labels != "truth":
            stage = t.column("stage_labels").to_pylist()
            union = t.column("union_label_id").to_pylist()
            if self.labels == "generated":  # the rule's additions, nothing removed
                return [sorted(set(s["parse"]) | set(u)) for s, u in zip(stage, union)]
            return [sorted(s[self.labels]) for s in stage]
        import pyarrow.parquet as pq

        from stages.world.score import truth_by_image

        truth = truth_by_image(pq.read_table(Path(self.truth_dir) / "truth" / f"part-{shard:05d}.parquet"))
        return [sorted(tag for tag, n in self.names.items() if n & truth[i].tags)
                for i in t.column("image_id").to_pylist()]


def judged_tags(tagset, truth: bool, labels: np.ndarray) -> list[int]:
    """Tag ids the judge can speak to: against truth, the tags that name a world class; against labels,
    the tags with at least one held-out positive."""
    if truth:
        from stages.world.score import names_for_ids

        names = names_for_ids(tagset)
        return [t for t in sorted(names) if names[t]]
    return [int(t) for t in np.flatnonzero(labels.sum(axis=0) > 0)]


def truth_matrix(ids: list[str], cols: list[int], tagset, truth_dir: Path) -> np.ndarray:
    """[images, cols] 0/1 from the scene world's truth, reading only the held-out images' truth rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from stages.world.score import names_for_ids, truth_by_image

    wanted = pa.array(sorted(set(ids)), pa.string())
    parts = []
    for f in sorted((truth_dir / "truth").glob("part-*.parquet")):
        t = pq.read_table(f)
        parts.append(t.filter(pc.is_in(t.column("image_id"), value_set=wanted)))
    truth = truth_by_image(pa.concat_tables(parts)) if parts else {}
    names = names_for_ids(tagset)
    return np.array([[1.0 if names[t] & truth[i].tags else 0.0 for t in cols] for i in ids], np.float32)


def _map(scores: np.ndarray, y: np.ndarray) -> float | None:
    from model.metrics import average_precision

    if not scores.shape[1] or not y.any():
        return None
    return round(float(np.nanmean(average_precision(scores, y))), 4)


def _f1(scores: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> dict:
    pred = scores >= thresholds[None, :]
    tp = float((pred & (y > 0)).sum())
    fp, fn = float((pred & (y == 0)).sum()), float((~pred & (y > 0)).sum())
    p, r = tp / max(1.0, tp + fp), tp / max(1.0, tp + fn)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def groups(tagset, cols: list[int]) -> dict[str, dict[str, list[int]]]:
    """Positions in ``cols`` by the tag's kind and by frequency third (count in the parse labels, most
    frequent first; ties by tag id)."""
    kinds = {k: [j for j, t in enumerate(cols) if tagset.tags[t].kind == k] for k in KINDS}
    order = sorted(range(len(cols)), key=lambda j: (-tagset.tags[cols[j]].count, cols[j]))
    cut = [round(len(order) * k / 3) for k in range(4)]
    thirds = {name: sorted(order[cut[k]:cut[k + 1]]) for k, name in enumerate(THIRDS)}
    return {"by_kind": {k: v for k, v in kinds.items() if v}, "by_frequency": thirds}


def compare(scores: dict[str, np.ndarray], thresholds: dict[str, np.ndarray], y: np.ndarray,
            grouping: dict[str, dict[str, list[int]]]) -> dict:
    """Per tagger: mAP over the judged tags, F1 at its calibrated thresholds, mAP per group."""
    out: dict = {}
    for name, s in scores.items():
        m = {"mAP": _map(s, y), **_f1(s, y, thresholds[name])}
        for g, parts in grouping.items():
            m[g] = {k: _map(s[:, idx], y[:, idx]) for k, idx in parts.items()}
        out[name] = m
    return out


@register("retrain.ram.v1")
class RetrainStage(TrainStage):
    """``train.ram.v1`` on the cleaned labels, then the base and the retrained tagger side by side on the
    held-out images (``outcome.json``, and ``model_outcome`` in the manifest and in report.json)."""

    Config = RetrainConfig
    needs = ("tagset", "tagger")
    provides = ("tagger", "outcome")

    def fit(self, rows: RowSource):
        base = self.context.artifact("tagger")  # the tagger before this step: the base
        self.config = recipe = self.recipe(base)
        if self.config.start == "base":  # for this training only: the recipe a later round repeats has none
            self.config = self.config.model_copy(update={"init_checkpoint": str(base / "model.pth"),
                                                         "init_tag_list": str(base / "tag_list.txt")})
        if self.config.labels != "cleaned":
            from stages.world.score import names_for_ids
            from tagset.tagset import TagSet

            truth = "truth" in self.context.artifacts
            names = names_for_ids(TagSet.load(self.context.artifact("tagset"))) if truth else None
            rows = LabelledRows(rows.view, self.config.labels,
                                str(self.context.artifact("truth")) if truth else None, names)
        fitted = super().fit(rows)
        outcome = self.outcome(fitted, base)
        res = fitted.result
        res.files["recipe.json"] = (recipe.model_dump_json(indent=1) + "\n").encode()
        res.files["outcome.json"] = (json.dumps(outcome, indent=1, sort_keys=True) + "\n").encode()
        res.stats["model_outcome"] = outcome
        j, gain = outcome["judge"], outcome["gain_points"]
        res.stats["summary"] += (f"; {outcome['eval_images']} held-out images, judged by {j}: mAP base "
                                 f"{outcome[f'base_{j}_mAP']} -> retrained {outcome[f'retrained_{j}_mAP']} "
                                 f"({'no held-out image to judge by' if gain is None else f'{gain:+.2f} points'})")
        return fitted

    def planned(self) -> RetrainConfig:
        return self.recipe(self.context.artifact("tagger"))

    def recipe(self, base: Path) -> RetrainConfig:
        """The base's recipe (its ``recipe.json``) with the keys this step's section sets on top, so a
        retrain is the same training unless the config says otherwise."""
        f = base / "recipe.json"
        if not f.exists():  # a tagger from before recipes were recorded: this step's own config
            return self.config
        return self.recipe_from(json.loads(f.read_text()))

    def recipe_from(self, base: dict) -> RetrainConfig:
        """This step's recipe over a base's (its config as a dict): ``plan`` resolves with it what a run
        would train (e.g. the epochs a forecast scales to) before the base has trained."""
        own = self.config.model_dump(include=self.config.model_fields_set)
        recipe = {k: v for k, v in base.items() if k in TrainStageConfig.model_fields}  # not the base's start / labels
        return RetrainConfig.model_validate({**recipe, **own})

    def outcome(self, fitted, base_dir: Path) -> dict:
        """Both taggers on the evaluation sample; the judge is the truth when the run has one."""
        import torch

        from model.data import make_loader

        from model.metrics import predict_all

        from model.train import model_device
        from stages.vision.tagger import TaggerConfig, load_model

        base_model, _, base_thr = load_model(TaggerConfig(), {"tagger": str(base_dir)}, fitted.tagset.names)
        base_model.eval()
        val = fitted.val_set
        got = {}
        for name, model in (("base", base_model.to(model_device(fitted.model))), ("retrained", fitted.model)):
            with torch.no_grad():
                s, labels, index = predict_all(model, make_loader(val, 64, model_device(model)))
            got[name] = s
        ids = [val.image_id(int(i)) for i in index]
        truth = "truth" in self.context.artifacts
        cols = judged_tags(fitted.tagset, truth, labels)
        y = truth_matrix(ids, cols, fitted.tagset, self.context.artifact("truth")) if truth else labels[:, cols]
        thr = {"base": np.asarray(base_thr or fitted.tagset.thresholds(), np.float32)[cols],
               "retrained": np.asarray(fitted.thresholds, np.float32)[cols]}
        res = compare({k: v[:, cols] for k, v in got.items()}, thr, y, groups(fitted.tagset, cols))
        b, r = res["base"]["mAP"], res["retrained"]["mAP"]
        judge = "truth" if truth else "labels"
        return {"judge": judge, "judge_note": "the scene world's truth of the held-out images" if truth else
                "no truth: the cleaned labels of the held-out images (agreement with the engine, not correctness)",
                "eval_images": len(ids), "judged_tags": len(cols),
                f"base_{judge}_mAP": b, f"retrained_{judge}_mAP": r,
                "gain_points": round(100 * (r - b), 2) if b is not None and r is not None else None,
                "base": res["base"], "retrained": res["retrained"], "start": self.config.start}
