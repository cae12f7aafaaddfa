"""The report as Markdown (report.md), from the report.json it sits beside."""
from __future__ import annotations


def report_markdown(r: dict) -> str:
    """report.md: what report.json says, for a person."""
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
    if "model_outcome" in r:
        lines += outcome_markdown(r["model_outcome"])
    if len(r.get("rounds", [])) > 1:
        lines += ["## Rounds", "", "Each round re-judges the parse labels with the previous round's retrained "
                  "tagger as its base.", "", "| round | label F1 | omissions recovered | pseudo precision | "
                  "hallucinations removed | retrained mAP |", "|---|---|---|---|---|---|"]
        for e in r["rounds"]:
            t = e.get("targets", {})
            mAP = next((v for k, v in e.items() if k.startswith("retrained_")), None)
            lines.append(f"| {e['round']} | {e.get('label_f1', '-')} | {t.get('omissions_recovered', '-')} | "
                         f"{t.get('pseudo_precision', '-')} | {t.get('hallucinations_removed', '-')} | "
                         f"{'-' if mAP is None else mAP} |")
        lines.append("")
    lines += ["## Events by stage, action and reason", ""]
    for stage, actions in r["events"].items():
        for action, reasons in actions.items():
            lines.append(f"- {stage} {action}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    lines += ["", "## Long tail (top 20)", "", ", ".join(f"{n} {c}" for n, c in r["long_tail"][:20]), "",
              "Plots: stages.png, long_tail.png, quality.png; dropped regions: dropped_regions.png.", ""]
    return "\n".join(lines)


def outcome_markdown(o: dict) -> list[str]:
    """The section that says whether the engine was worth running: the tagger trained on parse labels (the
    base) against the one retrained on the cleaned labels, on the same held-out images."""
    j = o["judge"]

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["## What the engine bought", "",
             f"Two taggers of one recipe, judged on {o['eval_images']} held-out images (never trained on) against "
             f"{o['judge_note']}, over {o['judged_tags']} tags: the base, trained on the parse labels, and the "
             f"retrained one, trained on the cleaned labels ({'from scratch' if o['start'] == 'scratch' else 'from the base weights'}).",
             "", f"mAP {cell(o[f'base_{j}_mAP'])} -> {cell(o[f'retrained_{j}_mAP'])}: "
             + ("no held-out image to judge by." if o["gain_points"] is None else f"{o['gain_points']:+.2f} points."),
             "",
             "| | base | retrained |", "|---|---|---|"]
    b, n = o["base"], o["retrained"]
    for k in ("mAP", "precision", "recall", "f1"):
        lines.append(f"| {k}{' (calibrated thresholds)' if k != 'mAP' else ''} | {cell(b[k])} | {cell(n[k])} |")
    for g in ("by_kind", "by_frequency"):
        for k in b[g]:
            lines.append(f"| mAP, {g[3:]} {k} | {cell(b[g][k])} | {cell(n[g][k])} |")
    return lines + [""]
