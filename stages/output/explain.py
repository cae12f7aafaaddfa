"""``python -m pipeline explain RUN_DIR IMAGE_ID TAG``: one tag's history on one image.

Reads the last step of the run (in workflow order, from its manifests) whose rows carry
``tag_events``, finds the image through the step's id index (``pipeline/index.py``: one shard is read,
not every shard searched), and prints every event of the tag with its evidence, then whether the tag
is in the final ``union_label_id``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.index import find_shards
from pipeline.registry import register_command
from pipeline.view import shard_file


def _event_steps(run_dir: Path) -> list[Path]:
    """Step directories with tag_events in their rows, latest (by manifest time) first."""
    steps = []
    for m in run_dir.glob("*/_manifest.json"):
        parts = sorted(m.parent.glob("part-*.parquet"))
        if parts and "tag_events" in pq.ParquetFile(parts[0]).schema_arrow.names:
            steps.append((m.stat().st_mtime, m.parent))
    return [p for _, p in sorted(steps, reverse=True)]


def _tag_id(run_dir: Path, tag: str) -> tuple[int | None, str]:
    from tagset.tagset import TagSet

    for vocab in [d.parent for d in run_dir.glob("*/tag_list.txt")]:
        try:
            ts = TagSet.load(vocab)
        except (OSError, ValueError, KeyError):
            continue
        if tag.isdigit() and int(tag) < len(ts):
            return int(tag), ts.names[int(tag)]
        tid = ts.id_of(tag)
        if tid is not None:
            return tid, ts.names[tid]
    return None, tag


def _row_in(part: Path, image_id: str) -> dict | None:
    t = pq.read_table(part, columns=["image_id", "union_label_id", "tag_events"])
    t = t.filter(pc.equal(t.column("image_id"), image_id))
    return t.to_pylist()[0] if t.num_rows else None


def _find_row(step: Path, image_id: str) -> dict | None:
    """The image's row: through the step's id index (``decide`` writes one), one shard read; a step without
    one (``label``, or a run made before the index) is scanned shard by shard."""
    shards = find_shards(step, image_id)
    if shards is not None:
        return _row_in(shard_file(step, shards[0]), image_id) if shards else None
    for f in sorted(step.glob("part-*.parquet")):
        row = _row_in(f, image_id)
        if row is not None:
            return row
    return None


def explain(run_dir: Path, image_id: str, tag: str) -> tuple[str, int]:
    steps = _event_steps(run_dir)
    if not steps:
        return f"{run_dir}: no finished step with tag_events (is this a run directory?)", 1
    tid, name = _tag_id(run_dir, tag)
    if tid is None:
        return f"{tag!r} is not a tag of this run's vocabulary (nor a synonym of one)", 1
    step = steps[0]
    row = _find_row(step, image_id)
    if row is None:
        rej = []
        for d in run_dir.glob("*/rejects/*.parquet"):
            r = pq.read_table(d).to_pylist()
            rej += [f"  {d.parent.parent.name}: {x['code']}: {x['reason']}" for x in r if x.get("image_id") == image_id]
        return (f"image {image_id!r} is not in {step.name}'s rows" + ("; rejected:\n" + "\n".join(rej) if rej else ""),
                1)
    lines = [f"{image_id} / {name} (tag {tid}) — events from step '{step.name}'"]
    evs = [e for e in row["tag_events"] or [] if e["tag_id"] == tid]
    if not evs:
        lines.append("  no events: the tag was never a candidate for this image")
    for e in evs:
        score = "" if e["score"] is None else f" score={e['score']:.4f}"
        lines.append(f"  {e['stage']:<12} {e['action']:<5} {e['reason']:<16}{score}")
        ev = json.loads(e["evidence"] or "{}")
        for k, v in sorted(ev.items()):
            lines.append(f"      {k}: {v}")
    lines.append(f"  final: {'IN' if tid in (row['union_label_id'] or []) else 'NOT in'} union_label_id")
    return "\n".join(lines), 0


@register_command("explain", "print one tag's history on one image: every event, with evidence")
def _configure(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("image_id")
    p.add_argument("tag", help="tag name (or a synonym of it) or tag id")
    p.set_defaults(fn=_run)


def _run(args) -> int:
    text, code = explain(Path(args.run_dir), args.image_id, args.tag)
    print(text)
    return code
