"""report.v1: report.json + report.md + PNG plots in the run directory, from the decide step's rows.

Counts tags added / removed per stage and reason, the tag long tail, and on a scene world the
precision / recall / F1 after each stage and for both decision rules (``quality.<stage>.f1`` ...),
plus the issue's targets. Plots are drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ReduceResult, RowSource, Stage, StageConfig
from pipeline.store import StepDir

QUALITY_STAGES = ("parse", "pseudolabel", "cluster", "verify", "paper", "combined")


class ReportConfig(StageConfig):
    long_tail: int = Field(40, ge=1, description="tags shown in the long-tail plot")
    sheet_per_reason: int = Field(24, ge=0, description="dropped regions shown per reason on the contact sheet")


def bar_chart(title: str, labels: list[str], series: dict[str, list[float]], width: int = 900,
              bar_h: int = 16, colours=((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88))) -> bytes:
    """Horizontal grouped bars, values >= 0, one row per label; PNG bytes."""
    n, k = len(labels), max(1, len(series))
    h = 40 + n * (bar_h * k + 6) + 20 * k
    img = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    vmax = max([v for vals in series.values() for v in vals] + [1e-9])
    left, right = 200, width - 80
    y = 32
    for i, lab in enumerate(labels):
        d.text((10, y + 2), str(lab)[:30], fill="black")
        for j, (name, vals) in enumerate(series.items()):
            v = vals[i]
            x1 = left + (right - left) * v / vmax
            d.rectangle([left, y, x1, y + bar_h - 2], fill=colours[j % len(colours)])
            d.text((x1 + 4, y + 2), f"{v:.3g}", fill="black")
            y += bar_h
        y += 6
    for j, name in enumerate(series):
        d.rectangle([left + 150 * j, y + 4, left + 150 * j + 12, y + 16], fill=colours[j % len(colours)])
        d.text((left + 150 * j + 16, y + 4), name, fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def event_counts(events_per_row) -> dict:
    """{stage: {action: {reason: n}}}."""
    out: dict = {}
    for evs in events_per_row:
        for e in evs or []:
            a = out.setdefault(e["stage"], {}).setdefault(e["action"], {})
            a[e["reason"]] = a.get(e["reason"], 0) + 1
    return out


@register("report.v1")
class ReportStage(Stage):
    kind = "reduce"
    Config = ReportConfig
    inputs = ("image_id",)
    needs = ("decisions", "tagset")

    def run(self, rows: RowSource) -> ReduceResult:
        from tagset.tagset import TagSet

        tagset = TagSet.load(self.context.artifact("tagset"))
        ddir = StepDir(self.context.artifact("decisions"))
        t = ddir.read(["image_id", "union_label_id", "tag_events", "stage_labels", "regions"])
        labels = t.column("stage_labels").to_pylist()
        final = t.column("union_label_id").to_pylist()
        events = t.column("tag_events").to_pylist()
        counts = event_counts(events)
        tail = Counter(x for labs in final for x in labs)
        parse_tail = Counter(x for labs in labels for x in labs["parse"])
        report: dict = {
            "images": t.num_rows,
            "tags": {"parse": sum(parse_tail.values()), "final": sum(tail.values()),
                     "added": sum(len(set(f) - set(l["parse"])) for f, l in zip(final, labels)),
                     "removed": sum(len(set(l["parse"]) - set(f)) for f, l in zip(final, labels))},
            "events": counts,
            "long_tail": [[tagset.names[i], n] for i, n in tail.most_common()],
        }
        files: dict[str, bytes] = {}
        if "truth" in self.context.artifacts:
            report["quality"], report["targets"] = self._quality(t, labels, final, tagset)
        files["stages.png"] = self._stage_plot(counts)
        top = tail.most_common(self.config.long_tail)
        files["long_tail.png"] = bar_chart("tag long tail (final labels, most frequent first)",
                                           [tagset.names[i] for i, _ in top],
                                           {"final": [n for _, n in top],
                                            "parse": [parse_tail.get(i, 0) for i, _ in top]})
        if "quality" in report:
            q = report["quality"]
            names = [s for s in ("parse", "pseudolabel", "cluster", "verify", "final", "paper", "combined") if s in q]
            files["quality.png"] = bar_chart("quality vs scene-world truth", names,
                                             {m: [q[s][m] for s in names] for m in ("precision", "recall", "f1")})
        files["dropped_regions.png"] = self._contact_sheet(ddir, tagset)
        files["report.json"] = (json.dumps(report, indent=1, sort_keys=True) + "\n").encode()
        files["report.md"] = self._markdown(report).encode()
        run_dir = Path(self.context.run_dir)
        for name in ("report.json", "report.md"):  # also at the top of the run directory
            (run_dir / name).write_bytes(files[name])
        summary = f"{report['tags']['added']} tags added, {report['tags']['removed']} removed"
        if "quality" in report:
            q = report["quality"]
            summary += f"; F1 parse {q['parse']['f1']:.3f} -> final {q['final']['f1']:.3f}"
        return ReduceResult(files=files, stats={"summary": summary})

    def _quality(self, t: pa.Table, labels, final, tagset) -> tuple[dict, dict]:
        from stages.world.generate import SCENES
        from stages.world.score import names_for_ids, score, truth_by_image

        truth = truth_by_image(StepDir(self.context.artifact("truth")).read(name="truth"))
        idn = names_for_ids(tagset)
        ids = t.column("image_id").to_pylist()

        def names(labs):
            return set().union(*[idn.get(x, set()) for x in labs]) if labs else set()

        q = {}
        per_stage = {s: {i: names(l[s]) for i, l in zip(ids, labels)} for s in QUALITY_STAGES}
        per_stage["final"] = {i: names(f) for i, f in zip(ids, final)}
        full = {}
        for s, pred in per_stage.items():
            sub = {i: truth[i] for i in ids if i in truth}
            full[s] = score(pred, sub)
            q[s] = {k: full[s][k] for k in ("precision", "recall", "f1")}
        # targets: what the pseudo tags added, what cleaning removed
        parse, fin = per_stage["parse"], per_stage["final"]
        added = [(i, n) for i in ids for n in fin[i] - parse[i]]
        added_true = sum(1 for i, n in added if n in truth[i].tags)
        omitted = [(i, n) for i in ids for n in truth[i].omitted]
        recovered = sum(1 for i, n in omitted if n in fin[i])
        by_kind = {}  # the target counts omitted scenes with omitted objects; each kind on its own
        for kind, sel in (("object", lambda n: n not in SCENES), ("scene", lambda n: n in SCENES)):
            om = [(i, n) for i, n in omitted if sel(n)]
            by_kind[kind] = round(sum(1 for i, n in om if n in fin[i]) / max(1, len(om)), 4)
        hall = [(i, n) for i in ids for n in truth[i].hallucinated if n in parse[i]]
        removed = sum(1 for i, n in hall if n not in fin[i])
        true_parse = [(i, n) for i in ids for n in parse[i] if n in truth[i].tags]
        lost = sum(1 for i, n in true_parse if n not in fin[i])
        targets = {
            "omissions_recovered": round(recovered / max(1, len(omitted)), 4),
            "omissions_recovered_by_kind": by_kind,
            "pseudo_precision": round(added_true / max(1, len(added)), 4),
            "pseudo_added": len(added),
            "hallucinations_removed": round(removed / max(1, len(hall)), 4),
            "hallucinations_in_parse": len(hall),
            "true_parse_dropped": round(lost / max(1, len(true_parse)), 4),
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

    def _stage_plot(self, counts: dict) -> bytes:
        rows = []
        for stage, actions in counts.items():
            for action, reasons in actions.items():
                for reason, n in reasons.items():
                    if action in ("add", "drop", "flag"):
                        rows.append((f"{stage}:{action}:{reason}", n))
        rows.sort()
        return bar_chart("tags added / flagged / dropped, by stage and reason", [r for r, _ in rows] or ["none"],
                         {"tags": [n for _, n in rows] or [0]})

    def _contact_sheet(self, ddir: StepDir, tagset) -> bytes:
        """Crops of dropped regions per rule and reason."""
        from stages.vision import ImageLimits, crop, open_image

        cell, per = 96, self.config.sheet_per_reason
        groups: dict[str, list] = {}
        for f in ddir.data_files():
            import pyarrow.parquet as pq

            cols = [c for c in ("image_id", "image", "image_bytes", "tag_events", "regions", "stage_labels")
                    if c in pq.ParquetFile(f).schema_arrow.names]
            for r in pq.read_table(f, columns=cols).to_pylist():
                boxes = {g["tag_id"]: g["box"] for g in r.get("regions") or []}
                labels = r.get("stage_labels") or {}
                for tag, key in self._drops(r["tag_events"], labels):
                    if len(groups.setdefault(key, [])) < per and tag in boxes:
                        img, _ = open_image(r, Path(self.context.run_dir), ImageLimits())
                        if img is not None:
                            groups[key].append((crop(img, boxes[tag], 0.1), tagset.names[tag], r["image_id"]))
        cols = 8
        height = sum(20 + ((len(v) + cols - 1) // cols) * (cell + 14) for v in groups.values()) or 40
        sheet = Image.new("RGB", (cols * cell, height + 10), "white")
        d = ImageDraw.Draw(sheet)
        y = 4
        if not groups:
            d.text((6, 12), "no dropped regions", fill="black")
        for key, items in sorted(groups.items()):
            d.text((6, y), f"dropped: {key} ({len(items)} shown)", fill="black")
            y += 20
            for k, (im, name, iid) in enumerate(items):
                x = (k % cols) * cell
                sheet.paste(im.resize((cell - 4, cell - 4)), (x + 2, y))
                d.text((x + 2, y + cell - 2), name[:14], fill="black")
                if k % cols == cols - 1:
                    y += cell + 14
            y += (cell + 14) if len(items) % cols else 0
        buf = io.BytesIO()
        sheet.save(buf, "PNG")
        return buf.getvalue()

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

    def _markdown(self, r: dict) -> str:
        lines = ["# Data engine report", "", f"Images: {r['images']}. Tags from parsing: {r['tags']['parse']}; "
                 f"final: {r['tags']['final']} ({r['tags']['added']} added, {r['tags']['removed']} removed).", ""]
        if "quality" in r:
            lines += ["## Quality vs the scene world's truth", "", "| labels | precision | recall | F1 |",
                      "|---|---|---|---|"]
            for s, q in r["quality"].items():
                lines.append(f"| {s} | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} |")
            lines += ["", "## Targets", ""]
            for k, v in r["targets"].items():
                if k != "met":
                    lines.append(f"- {k}: {v}")
            for k, ok in r["targets"]["met"].items():
                lines.append(f"- {'met' if ok else 'NOT met'}: {k}")
            lines.append("")
        lines += ["## Events by stage, action and reason", ""]
        for stage, actions in r["events"].items():
            for action, reasons in actions.items():
                lines.append(f"- {stage} {action}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        lines += ["", "## Long tail (top 20)", "", ", ".join(f"{n} {c}" for n, c in r["long_tail"][:20]), "",
                  "Plots: stages.png, long_tail.png, quality.png; dropped regions: dropped_regions.png.", ""]
        return "\n".join(lines)
