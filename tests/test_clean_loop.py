"""The whole clean loop end to end on a small scene world: report keys, decide-only re-runs, explain."""
import json

import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.index import find_shards
from pipeline.view import step_view
from tests.conftest import write_config

LOOP = """
workflow: clean
seed: 1
ray: {enabled: false}
input: {images: 48, shard_rows: 16, size: 64}
parse: {resources: {batch_size: 64}}
vocab: {min_count: 1}
train:
  model: ram_test
  model_args: {image_size: 64, window_size: 4, embed_dim: 8, depths: [2, 2, 2], num_heads: [1, 2, 4],
               head_hidden: 32, head_intermediate: 64}
  epochs: 1
  warmup_steps: 2
evidence: {ground: {candidate_score: 0.0}, verify: {views: [{window: 1.0, mirror: true}, {window: 0.75}]},
           resources: {decode_workers: 2}}
cluster: {regions_per_cluster: 5, min_regions: 3}
decide: {add_unclaimed: 0.3}
"""
STEPS = ["input", "parse", "vocab", "label", "train", "evidence", "cluster", "decide", "report", "export"]


def _statuses(out_text: str) -> dict[str, str]:
    st = {}
    for line in out_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in STEPS and parts[2] in ("ran", "skipped", "resumed"):
            st[parts[0]] = parts[2]
    return st


def test_clean_loop_end_to_end_then_decide_only_then_explain(tmp_path, capsys):
    cfg, out = write_config(tmp_path / "loop.yaml", LOOP), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert set(_statuses(capsys.readouterr().out).values()) == {"ran"}
    for s in STEPS:
        m = json.loads((out / s / "_manifest.json").read_text())
        assert m["rows_in"] == m["rows_out"] + m["rows_rejected"], s
    report = json.loads((out / "report.json").read_text())
    for stage in ("parse", "pseudolabel", "cluster", "verify", "final", "paper", "combined"):
        assert set(report["quality"][stage]) == {"precision", "recall", "f1"}
    assert report["quality"]["parse"]["f1"] > 0.5  # parse labels of the world are mostly right
    assert set(report["targets"]["met"]) >= {"pseudo_precision>=0.9", "f1_gain>=5"}
    kinds = report["targets"]["omissions_recovered_by_kind"]
    assert set(kinds) == {"object", "scene"}  # the overall rate is a mix of the two
    assert min(kinds.values()) <= report["targets"]["omissions_recovered"] <= max(kinds.values())
    assert report["targets"]["met"]["omitted_objects_recovered>=0.5"] == (kinds["object"] >= 0.5)
    for png in ("stages.png", "long_tail.png", "quality.png", "dropped_regions.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # region views: only pseudo candidates (regions of tags the image's labels lack) get them, and decide
    # records each one it weighs
    # every column is written once, by the step that makes it: the image bytes stay in the input's shards
    for s in STEPS[1:]:
        for f in (out / s).glob("part-*.parquet"):
            assert "image_bytes" not in pq.ParquetFile(f).schema_arrow.names, f
    assert pq.ParquetFile(out / "evidence" / "part-00000.parquet").schema_arrow.names == [
        "image_id", "tag_scores", "regions", "region_embeds", "crop_scores", "view_scores"]
    verified = step_view(out / "evidence").read_shard(0).to_pylist()
    assert any(r["view_scores"] for r in verified)
    for r in verified:
        assert {d["tag_id"] for d in r["view_scores"]} <= {x["tag_id"] for x in r["regions"]} - set(r["union_label_id"])
    decided = step_view(out / "decide").read_shard(0).to_pylist()
    assert any(e["reason"] == "region_views" for r in decided for e in r["tag_events"])
    export = pq.read_table(out / "export" / "part-00000.parquet")
    assert export.column_names == ["image_id", "image_path", "caption", "union_label_id", "parse_label_id"]

    # Only a threshold changes: the scoring stages are skipped, decide and what follows re-run.
    assert main(["run", str(cfg), "--out", str(out), "--set", "decide.rule=paper",
                 "--set", "decide.outer_share=0.5"]) == 0
    st = _statuses(capsys.readouterr().out)
    assert all(st[s] == "skipped" for s in STEPS[:STEPS.index("decide")])
    assert st["decide"] == st["export"] == st["report"] == "ran"

    # The paper rule with the outer half flagged drops many tags: explain one.
    rows = step_view(out / "decide").read_shard(0, ["image_id", "union_label_id", "tag_events",
                                                    "stage_labels"]).to_pylist()
    row = next(r for r in rows if any(e["stage"] == "decide" and e["action"] == "drop" for e in r["tag_events"]))
    dropped = [e for e in row["tag_events"] if e["stage"] == "decide" and e["action"] == "drop"]
    assert row["union_label_id"] == row["stage_labels"]["paper"]
    tag_id = dropped[0]["tag_id"]
    names = (out / "vocab" / "tag_list.txt").read_text().split("\n")
    # decide's id index names the shard; explain needs no other (the rest are deleted to show it)
    assert find_shards(out / "decide", row["image_id"]) == [0]
    for f in (out / "decide").glob("part-*.parquet"):
        if f.name != "part-00000.parquet":
            f.unlink()
    assert main(["explain", str(out), row["image_id"], names[tag_id]]) == 0
    text = capsys.readouterr().out
    for piece in ("label", "parse", "ground", "region", "cluster", "cluster_outlier", "quantile", "decide", "drop",
                  "dropped", "rule: paper", "pseudo_score", "box", "NOT in union_label_id"):
        assert piece in text, piece
    assert main(["explain", str(out), row["image_id"], "no-such-tag"]) == 1
    assert main(["explain", str(out), "no-such-image", names[tag_id]]) == 1
