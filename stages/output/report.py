"""report.v1: report.json + report.md + PNG plots in the run directory, from the decide step's rows
(a distributed reduce: per-shard summaries in the workers, merged on the driver).

Counts tags added / removed per stage and reason, the tag long tail, and on a scene world the
precision / recall / F1 after each stage and for both decision rules (``quality.<stage>.f1`` ...),
plus the issue's targets. Plots are matplotlib figures (``stages/output/report_plots.py``); on a scene world the
contact sheet of dropped regions frames each crop by whether the drop was right by the truth.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ReduceResult, RowSource, Stage, StageConfig
from stages.output.report_markdown import report_markdown

QUALITY_STAGES = ("parse", "pseudolabel", "cluster", "verify", "paper", "combined")


class ReportConfig(StageConfig):
    long_tail: int = Field(40, ge=1, description="tags shown in the long-tail plot")
    sheet_per_reason: int = Field(24, ge=0, description="dropped regions shown per reason on the contact sheet")


def event_counts(events_per_row) -> dict:
    """{stage: {action: {reason: n}}}."""
    out: dict = {}
    for evs in events_per_row:
        for e in evs or []:
            a = out.setdefault(e["stage"], {}).setdefault(e["action"], {})
            a[e["reason"]] = a.get(e["reason"], 0) + 1
    return out


def _add_nested(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict):
            _add_nested(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def boxes_of(regions: list[dict] | None) -> dict[int, list[float]]:
    return {g["tag_id"]: g["box"] for g in regions or []}


def _read_by_reference(view, shard: int, column: str, ids: list[str]) -> list:
    """``column``'s values for the rows ``ids`` of shard ``shard``, from the step that wrote the column."""
    from pipeline import view as views  # looked up per call, so a test can count what is read

    path, pos = view.locate(shard, column, pa.array(ids, pa.string()))
    return views.read_rows(path, column, pos.to_pylist())


def _priority(*key) -> int:
    return int.from_bytes(hashlib.blake2b("\x00".join(map(str, key)).encode(), digest_size=8).digest(), "little")


@register("report.v1")
class ReportStage(Stage):
    """A reduce in two halves: each worker summarises its shard (event counts, label counts, truth confusion
    counts, a bounded sample of dropped regions as small crops); the driver adds the summaries up and
    writes report.json, report.md and the plots. The driver never holds a row."""

    kind = "reduce"
    Config = ReportConfig
    # no image column: a worker reads no pixel; the driver reads the few rows the contact sheet shows
    inputs = ("image_id", "union_label_id", "tag_events", "stage_labels", "regions")
    needs = ("decisions", "tagset")
    # a retrain step's base-vs-retrained comparison; the previous round's report (its rounds so far)
    optional_needs = ("outcome", "report")
    provides = ("report",)

    @functools.cached_property
    def tagset(self):
        from tagset.tagset import TagSet

        return TagSet.load(self.context.artifact("tagset"))

    # -- in the workers ---------------------------------------------------------------------------------
    def partial(self, t: pa.Table, shard: int) -> dict:
        labels = t.column("stage_labels").to_pylist()
        final = t.column("union_label_id").to_pylist()
        events = t.column("tag_events").to_pylist()
        p = {"images": t.num_rows, "events": event_counts(events),
             "tail": Counter(x for labs in final for x in labs),
             "parse_tail": Counter(x for labs in labels for x in labs["parse"]),
             "added": sum(len(set(f) - set(l["parse"])) for f, l in zip(final, labels)),
             "removed": sum(len(set(l["parse"]) - set(f)) for f, l in zip(final, labels))}
        truth = self._truth(shard) if "truth" in self.context.artifacts else None
        if truth is not None:
            p["quality"] = self._quality_counts(t, labels, final, truth)
        p["sheet"] = self._sheet_sample(t, shard, events, labels, truth)
        return p

    def _truth(self, shard: int) -> dict:
        """The scene world's truth of this shard's images (the source's side table, shard for shard)."""
        import pyarrow.parquet as pq

        from stages.world.score import truth_by_image

        return truth_by_image(pq.read_table(Path(self.context.artifact("truth")) / "truth" /
                                            f"part-{shard:05d}.parquet"))

    @functools.cached_property
    def world_names(self) -> dict[int, set[str]]:
        from stages.world.score import names_for_ids

        return names_for_ids(self.tagset)

    def _quality_counts(self, t: pa.Table, labels, final, truth: dict) -> dict:
        from stages.world.generate import SCENES
        from stages.world.score import score_counts

        idn = self.world_names
        ids = t.column("image_id").to_pylist()

        def names(labs):
            return set().union(*[idn.get(x, set()) for x in labs]) if labs else set()

        per_stage = {s: {i: names(l[s]) for i, l in zip(ids, labels)} for s in QUALITY_STAGES}
        per_stage["final"] = {i: names(f) for i, f in zip(ids, final)}
        sub = {i: truth[i] for i in ids if i in truth}
        c = {"scores": {s: score_counts(pred, sub) for s, pred in per_stage.items()}}
        parse, fin = per_stage["parse"], per_stage["final"]
        added = [(i, n) for i in ids for n in fin[i] - parse[i]]
        omitted = [(i, n) for i in ids for n in truth[i].omitted]
        hall = [(i, n) for i in ids for n in truth[i].hallucinated if n in parse[i]]
        true_parse = [(i, n) for i in ids for n in parse[i] if n in truth[i].tags]
        c["targets"] = {
            "added": len(added), "added_true": sum(1 for i, n in added if n in truth[i].tags),
            "omitted": len(omitted), "recovered": sum(1 for i, n in omitted if n in fin[i]),
            "hall": len(hall), "hall_removed": sum(1 for i, n in hall if n not in fin[i]),
            "true_parse": len(true_parse), "lost": sum(1 for i, n in true_parse if n not in fin[i]),
        }
        for kind, sel in (("object", lambda n: n not in SCENES), ("scene", lambda n: n in SCENES)):
            om = [(i, n) for i, n in omitted if sel(n)]
            c["targets"][f"omitted_{kind}"] = len(om)
            c["targets"][f"recovered_{kind}"] = sum(1 for i, n in om if n in fin[i])
        return c

    def _sheet_sample(self, t: pa.Table, shard: int, events, labels, truth: dict | None) -> dict[str, list]:
        """Per drop group, the ``sheet_per_reason`` dropped regions of lowest hash priority in this shard, as
        ``(priority, shard, image_id, tag, box, verdict)``: merged across shards (the lowest of the lowest),
        the sheet is the same however rows are sharded. No pixel is read here: the driver reads the image
        bytes of the rows the merged sheet shows, and only those (:meth:`_cut_sheet`). Each item carries its
        verdict (``report_plots.drop_verdict``: right, wrong or not judged), judged here where the shard's
        truth is, so the driver needs none."""
        from stages.output.report_plots import drop_verdict

        per = self.config.sheet_per_reason
        regions = t.column("regions").to_pylist()
        ids = t.column("image_id").to_pylist()
        cands: dict[str, list] = {}
        for j, (evs, labs, regs) in enumerate(zip(events, labels, regions)):
            boxes = boxes_of(regs)
            for tag, key in self._drops(evs or [], labs or {}):
                if tag in boxes:
                    cands.setdefault(key, []).append((_priority(ids[j], tag, key), j, tag))
        out: dict[str, list] = {}
        for key, items in cands.items():
            for pri, j, tag in sorted(items)[:per]:
                known = truth.get(ids[j]) if truth is not None else None
                verdict = drop_verdict(self.world_names.get(tag, set()), known.tags) if known is not None else None
                out.setdefault(key, []).append((pri, shard, ids[j], tag, boxes_of(regions[j])[tag], verdict))
        return out

    # -- on the driver ----------------------------------------------------------------------------------
    def _cut_sheet(self, picked: dict[str, list], view) -> dict[str, list]:
        """The sheet's crops, ``{group: [(priority, png, tag name, image id, verdict)]}``, from the images of
        the rows it shows: their bytes (or paths) read by reference from the step that wrote them, shard by
        shard (``pipeline.view.read_rows``: only the row groups that hold them), one image decoded at a time."""
        from common.images import IMAGE_COLUMNS, ImageLimits, open_image
        from stages.vision.geometry import crop

        cell = 96
        rows: dict[int, dict[str, list]] = {}  # shard -> image id -> [(group, item)]
        for key, items in picked.items():
            for item in items:
                rows.setdefault(item[1], {}).setdefault(item[2], []).append((key, item))
        cols = [c for c in IMAGE_COLUMNS if view.rows is not None and c in view.owners]
        out: dict[str, list] = {key: [] for key in picked}
        for shard in sorted(rows):
            ids = sorted(rows[shard])
            found = {c: _read_by_reference(view, shard, c, ids) for c in cols}
            for k, iid in enumerate(ids):
                img, _ = open_image({"image_id": iid, **{c: found[c][k] for c in cols}}, Path(self.context.run_dir),
                                    ImageLimits())
                if img is None:
                    continue
                for key, (pri, _, _, tag, box, verdict) in rows[shard][iid]:
                    buf = io.BytesIO()
                    crop(img, box, 0.1).resize((cell - 4, cell - 4)).save(buf, "PNG")
                    out[key].append((pri, buf.getvalue(), self.tagset.names[tag], iid, verdict))
        return {key: sorted(items) for key, items in out.items() if items}

    def merge(self, partials) -> ReduceResult:
        return self._merge(partials, self.context.rows())

    def _merge(self, partials, view) -> ReduceResult:
        images, added, removed = 0, 0, 0
        counts: dict = {}
        tail, parse_tail = Counter(), Counter()
        quality: dict = {}
        sheet: dict[str, list] = {}
        for p in partials:
            images += p["images"]
            added += p["added"]
            removed += p["removed"]
            _add_nested(counts, p["events"])
            tail.update(p["tail"])
            parse_tail.update(p["parse_tail"])
            if "quality" in p:
                self._merge_quality(quality, p["quality"])
            for key, items in p["sheet"].items():
                sheet[key] = sorted(sheet.get(key, []) + items)[:self.config.sheet_per_reason]
        sheet = self._cut_sheet(sheet, view)
        return self._write(images, added, removed, counts, tail, parse_tail, quality, sheet)

    def run(self, rows: RowSource) -> ReduceResult:
        """The same reduce in one process (tests, small inputs), over a view's rows (the sheet's images are
        read from it by reference)."""
        if rows.view is None:
            raise ValueError("report.v1 reads a step's rows (a view), not loose Parquet files")
        view = rows.view
        return self._merge((self.partial(view.read_shard(i, self.inputs), i) for i in view.shards()), view)

    @staticmethod
    def _merge_quality(into: dict, q: dict) -> None:
        from stages.world.score import merge_counts

        for s, c in q["scores"].items():
            into.setdefault("scores", {})[s] = merge_counts([into["scores"][s], c]) if s in into.get("scores", {}) \
                else c
        _add_nested(into.setdefault("targets", {}), q["targets"])

    def _write(self, images, added, removed, counts, tail, parse_tail, quality, sheet) -> ReduceResult:
        tagset = self.tagset
        report: dict = {
            "images": images,
            "tags": {"parse": sum(parse_tail.values()), "final": sum(tail.values()), "added": added,
                     "removed": removed},
            "events": counts,
            "long_tail": [[tagset.names[i], n] for i, n in tail.most_common()],
        }
        if quality:
            report["quality"], report["targets"] = self._quality(quality)
        stats: dict = {}
        if "outcome" in self.context.artifacts or "report" in self.context.artifacts:
            stats = self._rounds(report)
        files = self._plots(report, counts, tail, parse_tail, sheet)
        files["report.json"] = (json.dumps(report, indent=1, sort_keys=True) + "\n").encode()
        files["report.md"] = report_markdown(report).encode()
        run_dir = Path(self.context.run_dir)
        for name in ("report.json", "report.md"):  # also at the top of the run directory
            (run_dir / name).write_bytes(files[name])
        summary = f"{report['tags']['added']} tags added, {report['tags']['removed']} removed"
        if "quality" in report:
            q = report["quality"]
            summary += f"; F1 parse {q['parse']['f1']:.3f} -> final {q['final']['f1']:.3f}"
        if "round_f1_gain_points" in stats:
            summary += f"; round {len(report['rounds'])}: label F1 {stats['round_f1_gain_points']:+.2f} points"
        return ReduceResult(files=files, stats={"summary": summary, **stats})

    def _rounds(self, report: dict) -> dict:
        """This round's entry after the earlier rounds' (the previous round's report), ``model_outcome``: the
        first round's base against this round's retrained tagger; stats for the runner's stopping rule."""
        prev = {}
        if "report" in self.context.artifacts:
            prev = json.loads((self.context.artifact("report") / "report.json").read_text())
        rounds = list(prev.get("rounds", []))
        entry: dict = {"round": len(rounds) + 1}
        q = report.get("quality")
        if q:
            entry["label_f1"] = q["final"]["f1"]
            entry["rules"] = {r: q[r] for r in ("paper", "combined") if r in q}
            entry["targets"] = {k: v for k, v in report["targets"].items() if k != "met"}
        outcome = None
        if "outcome" in self.context.artifacts:
            outcome = json.loads((self.context.artifact("outcome") / "outcome.json").read_text())
            j = outcome["judge"]
            entry.update({f"base_{j}_mAP": outcome[f"base_{j}_mAP"], f"retrained_{j}_mAP": outcome[f"retrained_{j}_mAP"],
                          "gain_points": outcome["gain_points"]})
        rounds.append(entry)
        report["rounds"] = rounds
        if outcome is not None:
            first = prev.get("model_outcome", outcome)  # round 1's base: the tagger trained on parse labels
            j = outcome["judge"]
            b, r = first[f"base_{j}_mAP"], outcome[f"retrained_{j}_mAP"]
            report["model_outcome"] = {**outcome, "base": first["base"], f"base_{j}_mAP": b,
                                       "gain_points": round(100 * (r - b), 2) if None not in (b, r) else None,
                                       "rounds": [{k: v for k, v in e.items() if k not in ("rules", "targets")}
                                                  for e in rounds]}
        if not q:
            return {}
        before = rounds[-2]["label_f1"] if len(rounds) > 1 else q["parse"]["f1"]
        return {"round_f1_gain_points": round(100 * (q["final"]["f1"] - before), 2)}

    @staticmethod
    def _quality(counts: dict) -> tuple[dict, dict]:
        from stages.world.score import finish_score

        q = {s: {k: v for k, v in finish_score(c).items() if k in ("precision", "recall", "f1")}
             for s, c in counts["scores"].items()}
        c = counts["targets"]
        by_kind = {kind: round(c[f"recovered_{kind}"] / max(1, c[f"omitted_{kind}"]), 4) for kind in ("object", "scene")}
        targets = {
            "omissions_recovered": round(c["recovered"] / max(1, c["omitted"]), 4),
            "omissions_recovered_by_kind": by_kind,
            "pseudo_precision": round(c["added_true"] / max(1, c["added"]), 4),
            "pseudo_added": c["added"],
            "hallucinations_removed": round(c["hall_removed"] / max(1, c["hall"]), 4),
            "hallucinations_in_parse": c["hall"],
            "true_parse_dropped": round(c["lost"] / max(1, c["true_parse"]), 4),
            "f1_gain_points": round(100 * (q["final"]["f1"] - q["parse"]["f1"]), 2),
        }
        targets["met"] = {
            "omissions_recovered>=0.5": targets["omissions_recovered"] >= 0.5,
            # the target's own words: omitted objects, without the scenes the rate above counts too
            "omitted_objects_recovered>=0.5": by_kind["object"] >= 0.5,
            "pseudo_precision>=0.9": targets["pseudo_precision"] >= 0.9,
            "hallucinations_removed>=0.6": targets["hallucinations_removed"] >= 0.6,
            "true_parse_dropped<=0.05": targets["true_parse_dropped"] <= 0.05,
            "f1_gain>=5": targets["f1_gain_points"] >= 5,
        }
        return q, targets

    def _plots(self, report: dict, counts: dict, tail: Counter, parse_tail: Counter, sheet: dict) -> dict[str, bytes]:
        from stages.output import report_plots as plots

        top = tail.most_common(self.config.long_tail)
        figs = {"stages.png": plots.stage_chart(counts),
                "long_tail.png": plots.long_tail_chart([self.tagset.names[i] for i, _ in top], [n for _, n in top],
                                                       [parse_tail.get(i, 0) for i, _ in top])}
        if "quality" in report:
            q = report["quality"]
            order = [s for s in ("parse", "pseudolabel", "cluster", "verify", "final", "paper", "combined") if s in q]
            figs["quality.png"] = plots.quality_chart({s: q[s] for s in order})
        figs["dropped_regions.png"] = plots.contact_sheet(sheet, judged="truth" in self.context.artifacts)
        return {name: plots.png_bytes(fig) for name, fig in figs.items()}

    @staticmethod
    def _drops(events: list[dict], labels: dict) -> list[tuple[int, str]]:
        """(tag, group) for every tag either rule drops: the combined rule by the signals that voted,
        the paper rule by its reason (outermost share, or the crop)."""
        out = []
        by_tag: dict[int, dict[str, dict]] = {}
        for e in events:
            by_tag.setdefault(e["tag_id"], {})[e["stage"]] = e
        parse = set(labels.get("parse") or [])
        for t in sorted(parse - set(labels.get("combined") or [])):
            ev = json.loads(by_tag.get(t, {}).get("decide", {}).get("evidence") or "{}")
            out.append((t, "combined: " + ("+".join(ev.get("votes") or []) or "dropped")))
        for t in sorted(set(labels.get("pseudolabel") or []) - set(labels.get("paper") or [])):
            outer = by_tag.get(t, {}).get("cluster", {}).get("reason") == "cluster_outlier"
            out.append((t, "paper: " + ("cluster_outlier" if outer else "verify_reject")))
        return out
