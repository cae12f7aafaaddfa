"""decide.v1: the only stage that changes labels. Evidence in, ``union_label_id`` + ``tag_events`` out.

Two rules, both computed for every image (``stage_labels`` keeps each one's result, so the report
scores both and the chain parse -> pseudolabel -> cluster -> verify):

A tag's own threshold comes with its score (``tag_scores[].threshold``: calibrated on held-out images
by the train stage, or the released checkpoint's threshold file). A tag whose threshold is 1.0 is one
the tagger cannot predict at the wanted precision: it is never added, and the tagger's scores of it
never vote (an unreliable witness is not a witness).

* ``paper``: parse tags + pseudo tags scoring >= max(``add_threshold``, own threshold), minus the outermost
  ``outer_share`` of every tag's regions (K-Means distance), minus tags whose crop scores below
  ``crop_threshold``. It drops a fixed share of every tag, true ones included.
* ``combined`` (default): a parse tag is dropped only when at least ``votes_to_drop`` of three
  independent signals speak against it: its whole-image score < ``drop_score``, its crop score <
  ``crop_threshold`` (both only for tags the tagger can predict), its distance > ``far_relative`` x its
  tag's median distance. A pseudo tag is added when its score >= max(``add_threshold``, own threshold)
  and its crop agrees (crop score >= ``add_crop_min``). ``threshold_cap`` bounds the own threshold: one
  calibrated against caption labels sits above the tagger's scores for a tag the captions often leave out
  (the scene world's colours), and the tag is almost never added.

  Explaining away (on when ``add_unclaimed`` is set): a pseudo tag of a kind that occupies a region
  (``region_kinds``) with a box is judged by where that box lies. If it overlaps (IoU >= ``claim_iou``)
  the box of a label the image keeps, that thing is already named: the tag is most often the tagger
  confusing one shape for another, and needs ``add_claimed`` (and its own threshold). If no label's
  box is there, the tagger found something the captions never named, the case pseudo-labelling is
  for, and ``add_unclaimed`` is enough. Tags are judged best first and each one added claims its own
  box. This suits vocabularies where one region has one name (the scene world); where names nest
  (person / man / face), leave it off or restrict ``region_kinds``.

  Region views (when verify ran with ``views``): such a tag is judged by ``(1 - view_weight) x`` its
  whole-image score ``+ view_weight x`` its mean score over views of its region in context (zoomed in,
  mirrored). A small object the whole image barely resolves scores low there and higher zoomed in;
  a shape the tagger merely guessed at does not gain. The claimed rule keeps the whole-image score.

Unknown (when ``uncertain_score`` is set): a tag the tagger scored >= ``uncertain_score`` on the whole image
that the rule left out and the captions did not name is written to ``uncertain_label_id``: neither a
label nor a negative. Training leaves it out of the loss (``model/objective.py``) instead of teaching it
as absent: captions leave out much of what an image holds, and a tag the tagger already sees there is
more often such an omission than a tag it does not. A caption tag the rule dropped stays a negative.

Only this stage reads thresholds, so changing them re-runs decide alone. Its ``finalize`` writes an
image id -> shard index of its rows (``pipeline/index.py``), which ``explain`` reads instead of scanning.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.index import write_id_index
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import TAG_EVENT

# Stable reason codes of decision events (part of the data contract: add, never rename).
REASONS: dict[str, str] = {
    "pseudo_label": "base tagger scored the tag >= max(add_threshold, its own threshold) on the whole image",
    "pseudo_below": "pseudo tag scored >= add_threshold but its crop disagreed",
    "region": "the grounding backend placed a box for the tag",
    "no_region": "the grounding backend found no box for the tag",
    "cluster_inlier": "region is within the tag's usual distance",
    "cluster_outlier": "region is among the outermost outer_share of its tag (the paper's rule)",
    "cluster_far": "region is farther than far_relative x its tag's median distance",
    "too_few_regions": "the tag has too few regions to cluster",
    "verify_pass": "base tagger scores the tag on its own crop >= crop_threshold",
    "verify_reject": "base tagger scores the tag on its own crop < crop_threshold",
    "kept": "the rule keeps the tag",
    "dropped": "the rule drops the tag (evidence lists which signals voted)",
    "added": "the rule adds the pseudo tag",
    "pseudo_candidate": "base tagger scored the tag >= add_unclaimed on the whole image, or weighed with its "
                        "region views (view_weight): added only if its region is free",
    "region_free": "the pseudo tag's box overlaps no box of the image's labels (IoU < claim_iou) and it scored "
                   ">= add_unclaimed (weighed with its region views when it has them)",
    "region_claimed": "the pseudo tag's box overlaps a label's box (IoU >= claim_iou) and it scored below "
                      "max(add_claimed, its own threshold)",
    "pseudo_weak": "the pseudo tag scored below what its evidence needs",
    "region_views": "base tagger's mean score for the tag over views of its region in context (verify.views)",
    "uncertain": "the tagger scored the tag >= uncertain_score, the rule left it out and the captions did not name "
                 "it: unknown (uncertain_label_id), left out of training's loss rather than taught as absent",
}

STAGE_LABELS = pa.struct([(k, pa.list_(pa.int32())) for k in
                          ("parse", "pseudolabel", "cluster", "verify", "paper", "combined")])


class DecideConfig(StageConfig):
    rule: Literal["combined", "paper"] = Field("combined", description="which rule writes union_label_id")
    add_threshold: float = Field(0.4, ge=0, le=1, description="pseudo score needed to add a tag (and the tag's "
                                 "own threshold)")
    add_crop_min: float = Field(0.0, ge=0, le=1, description="combined: crop score an added tag needs")
    outer_share: float = Field(0.10, ge=0, le=1, description="paper: outermost share of each tag's regions")
    crop_threshold: float = Field(0.1, ge=0, le=1, description="crop score below this flags the tag")
    drop_score: float = Field(0.05, ge=0, le=1, description="combined: whole-image score below this votes drop")
    far_relative: float = Field(1.5, gt=0, description="combined: distance / tag median above this votes drop")
    votes_to_drop: int = Field(2, ge=1, le=3, description="combined: signals needed to drop a parse tag")
    trust: Literal["calibrated", "all"] = Field(
        "all", description="whose scores count (add and vote): tags with a calibrated threshold, or all")
    threshold_cap: float | None = Field(
        None, ge=0, le=1, description="a tag's own threshold counts at most this (null: as calibrated). For "
        "thresholds calibrated against caption labels: a tag the captions name in only part of the images "
        "that hold it calibrates above most of the tagger's scores for it, and so would never be added")
    uncertain_score: float | None = Field(
        None, ge=0, le=1, description="a tag the tagger scored at least this on the whole image that the rule left "
        "out and the captions did not name goes to uncertain_label_id: unknown, not absent, and training leaves "
        "it out of the loss (null: none; every tag outside union_label_id is a negative)")
    add_unclaimed: float | None = Field(
        None, ge=0, le=1, description="combined: explaining away; a region-kind pseudo tag whose box no label's "
        "box overlaps is added at this score (null: off). ground.candidate_score must not exceed it, or the "
        "weaker candidates have no box")
    add_claimed: float = Field(0.8, ge=0, le=1, description="combined: score a region-kind pseudo tag needs when a "
                               "label's box already covers its box (and its own threshold)")
    claim_iou: float = Field(0.2, gt=0, le=1, description="combined: IoU at which a label's box claims a pseudo "
                             "tag's box")
    region_kinds: list[str] = Field(["object", "scene"], description="tag kinds (the tagset's) that occupy a "
                                    "region and so can claim or be claimed")
    view_weight: float = Field(0.75, ge=0, le=1, description="combined, explaining away: weight of a region-kind "
                               "pseudo tag's view score (verify.views) against its whole-image score; an "
                               "unclaimed tag needs the weighted sum >= add_unclaimed")


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _ev(tag: int, stage: str, action: str, reason: str, score: float | None, evidence: dict) -> dict:
    assert reason in REASONS, reason
    return {"tag_id": tag, "stage": stage, "action": action, "reason": reason,
            "score": None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score),
            "evidence": json.dumps(evidence, sort_keys=True)}


@register("decide.v1")
class DecideStage(Stage):
    """Applies the configured rule; every step of every candidate tag becomes a tag event."""

    Config = DecideConfig
    inputs = ("image_id", "union_label_id", "tag_events", "tag_scores", "regions", "crop_scores",
              "cluster_distances")
    optional_inputs = ("view_scores",)  # absent when verify ran before it had views
    outputs = ("union_label_id", "tag_events", "stage_labels", "uncertain_label_id")
    needs = ("clusters", "tagset")
    provides = ("decisions",)

    def setup(self) -> None:
        from tagset.tagset import TagSet

        tags = TagSet.load(self.context.artifact("tagset")).tags
        self.name = {t.tag_id: t.name for t in tags}
        self.occupies = {t.tag_id for t in tags if t.kind in self.config.region_kinds}
        # per-region distances come with each row (cluster_distances, shard-local); only the O(tags) table here
        c = pq.read_table(Path(self.context.artifact("clusters")) / "clusters.parquet").to_pylist()
        self.too_few = {r["tag_id"] for r in c if r["status"] != "clustered"}

    def decide_row(self, iid: str, parse: list[int], scores: list[dict], regions: list[dict],
                   crops: list[dict], views: list[dict] | None = None,
                   dists: list[dict] | None = None) -> tuple[dict, list[dict]]:
        c = self.config
        dist_of = {d["tag_id"]: (d["cluster"], d["distance"], d["quantile"], d["relative"]) for d in dists or []}
        score = {d["tag_id"]: d["score"] for d in scores or []}
        own = {d["tag_id"]: d.get("threshold") for d in scores or []}
        reliable = {t for t, th in own.items() if th is None or (not math.isnan(th) and th < 1.0)}
        if c.trust == "all":  # every tag the model scores; an uncalibrated tag uses add_threshold alone
            own = {t: (th if th is not None and not math.isnan(th) and th < 1.0 else None) for t, th in own.items()}
            reliable = set(score)
        if c.threshold_cap is not None:  # after reliable: a tag the tagger cannot predict stays so
            own = {t: min(th, c.threshold_cap) if th is not None and not math.isnan(th) and th < 1.0 else th
                   for t, th in own.items()}
        box = {d["tag_id"]: d for d in regions or []}
        crop = {d["tag_id"]: d["score"] for d in crops or []}
        view = {d["tag_id"]: d["score"] for d in views or []}
        parse_set = set(parse or [])
        pseudo = {t for t, s in score.items() if t in reliable and t not in parse_set
                  and s >= max(c.add_threshold, own[t] if own[t] is not None else 0.0)}
        # tags judged by where their box lies (explaining away): a region kind, with a box
        by_region = {t for t in box if t in self.occupies} if c.add_unclaimed is not None else set()
        judged = {t: (1 - c.view_weight) * score[t] + c.view_weight * view[t] if t in view else score[t]
                  for t in by_region if t in score}
        cands = pseudo | {t for t in by_region if t in reliable and t not in parse_set
                          and max(score[t], judged[t]) >= c.add_unclaimed}
        events: list[dict] = []
        labels = {k: set() for k in STAGE_LABELS.names}
        labels["parse"] = set(parse_set)
        labels["pseudolabel"] = parse_set | pseudo
        cluster_keep, verify_keep = set(), set()
        pending = []  # pseudo tags for the combined rule, judged once the kept parse tags are known
        for t in sorted(parse_set | cands):
            s, cs = score.get(t, float("nan")), crop.get(t, float("nan"))
            ev = {"pseudo_score": None if math.isnan(s) else round(s, 4), "tag_threshold": own.get(t),
                  "tagger_reliable": t in reliable}
            if t in pseudo:
                events.append(_ev(t, "pseudolabel", "add", "pseudo_label", s, {
                    "score": round(s, 4), "add_threshold": c.add_threshold, "tag_threshold": own.get(t)}))
            elif t in cands:
                events.append(_ev(t, "pseudolabel", "candidate", "pseudo_candidate", s, {
                    "score": round(s, 4), "add_unclaimed": c.add_unclaimed}))
            if t in box:
                b = [round(v, 1) for v in box[t]["box"]]
                ev["box"] = b
                events.append(_ev(t, "ground", "box", "region", box[t]["score"], {"box": b,
                                                                                   "backend": box[t]["backend"]}))
            else:
                events.append(_ev(t, "ground", "none", "no_region", None, {}))
            d = dist_of.get(t)
            outer = far = False
            if d is not None:
                cl, dist, q, rel = d
                outer, far = q > 1 - c.outer_share, rel > c.far_relative
                ev.update(distance=round(dist, 4), quantile=round(q, 4), relative=round(rel, 3), cluster=cl)
                reason = "cluster_outlier" if outer else ("cluster_far" if far else "cluster_inlier")
                events.append(_ev(t, "cluster", "flag" if outer or far else "pass", reason, dist,
                                  {"distance": round(dist, 4), "quantile": round(q, 4), "relative": round(rel, 3),
                                   "cluster": cl, "outer_share": c.outer_share, "far_relative": c.far_relative}))
            elif t in box and t in self.too_few:
                events.append(_ev(t, "cluster", "none", "too_few_regions", None, {}))
            low_crop = not math.isnan(cs) and cs < c.crop_threshold
            if not math.isnan(cs):
                ev["crop_score"] = round(cs, 4)
                events.append(_ev(t, "verify", "flag" if low_crop else "pass",
                                  "verify_reject" if low_crop else "verify_pass", cs,
                                  {"crop_score": round(cs, 4), "crop_threshold": c.crop_threshold}))
            if t in view and t in cands:
                ev["view_score"] = round(view[t], 4)
                events.append(_ev(t, "verify", "score", "region_views", view[t], {"view_score": round(view[t], 4)}))
            if t in parse_set or t in pseudo:
                if not outer:
                    cluster_keep.add(t)
                    if not low_crop:
                        verify_keep.add(t)
            # the combined rule
            if t in parse_set:
                trust = t in reliable
                votes = [name for name, hit in (("low_score", trust and not math.isnan(s) and s < c.drop_score),
                                                ("low_crop_score", trust and low_crop), ("far_region", far)) if hit]
                keep = len(votes) < c.votes_to_drop
                if keep:
                    labels["combined"].add(t)
                ev.update(votes=votes, rule="combined")
                if c.rule == "combined":
                    events.append(_ev(t, "decide", "keep" if keep else "drop", "kept" if keep else "dropped", s, ev))
            else:
                pending.append((t, s, cs, ev))
            if c.rule == "paper" and (t in parse_set or t in pseudo):
                kept = t in verify_keep
                ev = dict(ev, rule="paper")
                events.append(_ev(t, "decide", ("add" if t in pseudo else "keep") if kept else "drop",
                                  ("added" if t in pseudo else "kept") if kept else "dropped", s, ev))
        # the combined rule's pseudo tags, best first: a box a kept label (or a tag added before) covers
        # is claimed (explaining away, see the module docstring)
        claims = [(t, box[t]["box"]) for t in sorted(labels["combined"] & by_region)]
        for t, s, cs, ev in sorted(pending, key=lambda p: (-judged.get(p[0], p[1]), p[0])):
            crop_ok = math.isnan(cs) or cs >= c.add_crop_min
            ev = dict(ev, rule="combined", add_crop_min=c.add_crop_min)
            if t in by_region:
                iou, by = max(((box_iou(box[t]["box"], b), u) for u, b in claims), default=(0.0, None))
                claimed = iou >= c.claim_iou
                need = max(c.add_claimed, own[t] or 0.0) if claimed else c.add_unclaimed
                got = s if claimed else judged[t]  # region views weigh in where no label explains the box
                ev.update(claim_iou=round(iou, 3), claimed_by=self.name.get(by) if claimed else None, needs=need)
                if t in view and not claimed:
                    ev.update(judged_score=round(got, 4), view_weight=c.view_weight)
                ok = got >= need and crop_ok
                reason = ("region_free" if not claimed else "added") if ok else (
                    "pseudo_below" if got >= need else "region_claimed" if claimed else "pseudo_weak")
            else:  # the score rule: only tags in pseudo get here
                ok, reason = crop_ok, "added" if crop_ok else "pseudo_below"
            if ok:
                labels["combined"].add(t)
                if t in by_region:
                    claims.append((t, box[t]["box"]))
            if c.rule == "combined":
                events.append(_ev(t, "decide", "add" if ok else "skip", reason, s, ev))
        labels["cluster"] = cluster_keep
        labels["verify"] = verify_keep
        labels["paper"] = verify_keep
        if c.uncertain_score is not None:
            final = labels[c.rule]
            for t in sorted(t for t, s in score.items() if s >= c.uncertain_score and t not in final
                            and t not in parse_set):
                events.append(_ev(t, "decide", "unknown", "uncertain", score[t], {
                    "score": round(score[t], 4), "uncertain_score": c.uncertain_score}))
        return {k: sorted(v) for k, v in labels.items()}, events

    @staticmethod
    def uncertain(events: list[dict]) -> list[int]:
        """The row's tags the rule left unknown (its ``uncertain`` events), for ``uncertain_label_id``."""
        return sorted(e["tag_id"] for e in events if e["reason"] == "uncertain")

    def __call__(self, batch: pa.Table) -> StageResult:
        n_rows = batch.num_rows  # view_scores is absent from batches made before verify had views
        cols = {n: batch.column(n).to_pylist() if n in batch.column_names else [None] * n_rows
                for n in (*self.inputs, *self.optional_inputs)}
        new_labels, new_events, stage_labels, uncertain = [], [], [], []
        for i, iid in enumerate(cols["image_id"]):
            labs, evs = self.decide_row(iid, cols["union_label_id"][i], cols["tag_scores"][i], cols["regions"][i],
                                        cols["crop_scores"][i], views=cols["view_scores"][i],
                                        dists=cols["cluster_distances"][i])
            stage_labels.append(labs)
            new_labels.append(labs[self.config.rule])
            uncertain.append(self.uncertain(evs))
            new_events.append((cols["tag_events"][i] or []) + evs)
        out = batch
        for name, arr in (("union_label_id", pa.array(new_labels, pa.list_(pa.int32()))),
                          ("tag_events", pa.array(new_events, pa.list_(TAG_EVENT))),
                          ("stage_labels", pa.array(stage_labels, STAGE_LABELS)),
                          ("uncertain_label_id", pa.array(uncertain, pa.list_(pa.int32())))):
            if name in out.column_names:
                out = out.set_column(out.schema.get_field_index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        return StageResult(out)

    def finalize(self, step_dir: Path) -> dict:
        """The id -> shard index ``explain`` looks an image up in, built from the committed shards (an
        external merge sort: the driver holds one shard's ids, or one batch per merged run, at a time)."""
        return {"id_index_rows": write_id_index(step_dir)}
