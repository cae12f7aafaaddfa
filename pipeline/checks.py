"""The runner's checks that rows are counted across steps, not only within one: every shard a step reads
is there and visible, each step read what the step before it wrote, and no image id is in two places."""
from __future__ import annotations

from pathlib import Path

from pipeline import partials
from pipeline.config import Step
from pipeline.index import duplicates, write_id_index
from pipeline.shardstats import places
from pipeline.store import StepDir
from pipeline.view import View


def check_input(out_dir: Path, step: Step, view: View) -> None:
    """Every shard of the step this one reads, and of each step whose columns it joins, is visible."""
    for src in view.steps():
        m = StepDir(out_dir / src).manifest()
        if m is None:
            raise RuntimeError(f"step '{step.name}' reads the rows of step '{src}', which has no manifest in "
                               f"{out_dir / src}: is the run directory on storage this machine shares?")
        expected = set(range(int(m.get("shards", 0))))
        have = {int(f.stem.split("-")[1]) for f in (out_dir / src).glob("part-*.parquet")}
        missing = sorted(expected - have)
        if missing:
            raise RuntimeError(f"step '{step.name}' reads the rows of step '{src}', but shard(s) {missing} of "
                               f"'{src}' are missing ({len(expected)} committed, {len(have)} visible in "
                               f"{out_dir / src}); rerun '{src}' with --force --only {src}")


def check_counts(out_dir: Path, step: Step, view: View, shard_stats: list[dict]) -> None:
    """rows_in of this step == rows_out of the step it reads, shard by shard."""
    if view.rows is None:
        return
    up = StepDir(out_dir / view.rows)
    bad = []
    for st in shard_stats:
        u = up.shard_stats(st["shard"])
        if u is None or u["rows_out"] != st["rows_in"]:
            bad.append((st["shard"], None if u is None else u["rows_out"], st["rows_in"]))
    m = up.manifest() or {}
    total = sum(st["rows_in"] for st in shard_stats)
    if bad or total != m.get("rows_out"):
        raise RuntimeError(f"step '{step.name}' read {total} rows but step '{view.rows}' wrote "
                           f"{m.get('rows_out')}; shards (index, '{view.rows}' rows_out, '{step.name}' rows_in) "
                           f"that differ: {bad[:20]}")


def check_visible(step: Step, sdir: StepDir, shard_stats: list[dict], data: bool) -> None:
    """A worker's commit must be visible to the driver: else the next step would read fewer rows."""
    for st in shard_stats:
        i = st["shard"]
        paths = [sdir.path / "_stats" / f"part-{i:05d}.json"]
        paths += [sdir.path / f"part-{i:05d}.parquet"] if data else [partials.partial_path(sdir.path, i)]
        for p in paths:
            if not p.exists():
                raise RuntimeError(f"step '{step.name}': a worker committed shard {i}, but the driver cannot see "
                                   f"{p}; on a cluster the run directory must be storage every node shares "
                                   f"(a shared mount, given as an absolute path)")


def check_unique_ids(step: Step, sdir: StepDir, specs: list[dict]) -> dict:
    """Fail the input step when an image_id is in two places. Every later step joins its columns by
    image_id and export names image files by it, so two images of one id would share labels and
    pixels. A reader judges repeats within its range; this sees across ranges and inputs through the
    step's id index (an external sort: the driver holds one shard's ids, never the corpus's)."""
    rows = write_id_index(sdir.path)
    count, examples = duplicates(sdir.path)
    if count:
        shown = "; ".join(places(iid, shards, specs) for iid, shards in examples)
        raise RuntimeError(
            f"step '{step.name}': {count} image id(s) are in more than one place, e.g. {shown}. Two rows of "
            f"one id would share labels and exported pixels. Give each input its own source in "
            f"source.multi.v1 (its name prefixes its ids), or sort a record file by image so that a repeat "
            f"falls in one range, where it is rejected (docs/data.md, 'Image ids')")
    return {"id_index_rows": rows}
