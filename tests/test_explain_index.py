"""The image id -> shard index decide writes, and ``explain`` finding an image through it in one shard."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.index import find_shards, index_path, write_id_index
from pipeline.stage import StageContext
from stages.columns import TAG_EVENT
from stages.cleaning.decide import DecideConfig, DecideStage
from tagset.tagset import Tag, TagSet

NAMES = ["red", "ball", "grass", "sky"]
# shard -> ids, not sorted within a shard; "m" is in two shards (a source judges duplicates per range)
SHARDS = {0: ["q", "c", "m", "a"], 1: ["z", "b"], 2: ["m", "k", "x", "d", "e"], 3: [], 4: ["y"]}


def _event(tag: int, stage: str, action: str, reason: str, score: float | None, evidence: dict) -> dict:
    return {"tag_id": tag, "stage": stage, "action": action, "reason": reason, "score": score,
            "evidence": json.dumps(evidence, sort_keys=True)}


def _decide_step(run, shards=SHARDS):
    """A decide step's committed shards by hand: each image's events name its shard, so a row read from
    the wrong shard shows."""
    step = run / "decide"
    step.mkdir(parents=True)
    for i, ids in shards.items():
        events = [[_event(1, "label", "add", "parse", None, {"shard": i}),
                   _event(1, "decide", "drop", "dropped", 0.01, {"votes": ["low_score", "far_region"]})]
                  for _ in ids]
        pq.write_table(pa.table({"image_id": pa.array(ids, pa.string()),
                                 "union_label_id": pa.array([[0]] * len(ids), pa.list_(pa.int32())),
                                 "tag_events": pa.array(events, pa.list_(TAG_EVENT))}),
                       step / f"part-{i:05d}.parquet")
    (step / "_manifest.json").write_text("{}")
    vocab = run / "vocab"
    vocab.mkdir()
    ts = TagSet([Tag(i, n) for i, n in enumerate(NAMES)])
    pq.write_table(ts.to_table(), vocab / "tagset.parquet")
    for name, data in ts.files().items():
        (vocab / name).write_bytes(data)
    return step


@pytest.mark.parametrize("fan_in,row_group", [(64, 1 << 16), (2, 3)])  # one merge; merges in levels, many groups
def test_index_lists_every_id_sorted_with_its_shards(tmp_path, fan_in, row_group):
    step = _decide_step(tmp_path)
    assert find_shards(step, "a") is None  # no index yet
    assert write_id_index(step, fan_in=fan_in, row_group=row_group) == sum(map(len, SHARDS.values()))
    idx = pq.read_table(index_path(step))
    pairs = list(zip(idx.column("image_id").to_pylist(), idx.column("shard").to_pylist()))
    assert pairs == sorted((iid, s) for s, ids in SHARDS.items() for iid in ids)
    if row_group == 3:
        assert pq.ParquetFile(index_path(step)).metadata.num_row_groups == 4  # the lookup bisects groups
    for s, ids in SHARDS.items():
        for iid in ids:
            assert find_shards(step, iid) == ([0, 2] if iid == "m" else [s])
    for absent in ("", "0", "aa", "n", "zz"):  # before, between and after the indexed ids
        assert find_shards(step, absent) == []
    assert not (step / "_id_index.tmp").exists()


def test_an_empty_step_gets_an_empty_index(tmp_path):
    step = _decide_step(tmp_path, {0: []})
    assert write_id_index(step) == 0
    assert find_shards(step, "a") == []


def test_explain_reads_the_one_shard_the_index_names(tmp_path, capsys):
    run = tmp_path / "run"
    step = _decide_step(run)
    assert main(["explain", str(run), "x", "ball"]) == 0  # no index yet: the shards are scanned
    scanned = capsys.readouterr().out
    assert "shard: 2" in scanned

    # decide's finalize writes the index; then every shard but the one it names is deleted
    stats = DecideStage(DecideConfig(), StageContext(str(run), "decide")).finalize(step)
    assert stats == {"id_index_rows": sum(map(len, SHARDS.values()))}
    # an id two shards hold: the lowest shard's row, the one a scan meets first
    assert main(["explain", str(run), "m", "ball"]) == 0
    assert "shard: 0" in capsys.readouterr().out
    for f in step.glob("part-*.parquet"):
        if f.name != "part-00002.parquet":
            f.unlink()
    assert main(["explain", str(run), "x", "ball"]) == 0
    assert capsys.readouterr().out == scanned  # the same output, from the one shard
    # an id the index does not hold is reported without reading any shard
    assert main(["explain", str(run), "nope", "ball"]) == 1
    assert "image 'nope' is not in decide's rows" in capsys.readouterr().out
