import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.executor import ShardWorker
from pipeline.view import View
from pipeline.stage import StageContext
from pipeline.store import StepDir
from stages.columns import ROWS_SCHEMA
from stages.output.export import EXPORT_SCHEMA, RECORD_KEYS, ExportConfig, ExportStage, image_file, stitch_json
from stages.text.label import LabelConfig, LabelStage
from stages.text.parse import PARSED
from tagset.tagset import Tag, TagSet


def _tagset_dir(tmp_path):
    ts = TagSet([Tag(0, "car", ["automobile"]), Tag(1, "red", kind="attribute"), Tag(2, "grass", kind="scene"),
                 Tag(3, "ride", kind="action")])
    d = tmp_path / "vocab"
    d.mkdir()
    pq.write_table(ts.to_table(), d / "tagset.parquet")
    for name, data in ts.files().items():
        (d / name).write_bytes(data)
    return d


def _parsed(objects=(), attributes=(), actions=(), scenes=()):
    return {"entities": [], "relations": [], "objects": list(objects), "attributes": list(attributes),
            "actions": list(actions), "scenes": list(scenes)}


def test_label_maps_candidates_through_synonyms_per_caption(tmp_path):
    stage = LabelStage(LabelConfig(), StageContext(str(tmp_path), "label", artifacts={"tagset": str(_tagset_dir(tmp_path))}))
    stage.setup()
    batch = pa.table({
        "image_id": ["a", "b"],
        "parsed": pa.array([
            [_parsed(["automobile", "unicorn"], ["red"]), _parsed(["car"], scenes=["grass"])],
            [_parsed(actions=["ride"])],
        ], pa.list_(PARSED)),
    })
    out = stage(batch).table.to_pylist()
    assert out[0]["parse_label_id"] == [[0, 1], [0, 2]]
    assert out[0]["union_label_id"] == [0, 1, 2]
    assert out[1]["parse_label_id"] == [[3]] and out[1]["union_label_id"] == [3]
    ev = out[0]["tag_events"][0]
    assert (ev["tag_id"], ev["stage"], ev["action"], ev["reason"]) == (0, "label", "add", "parse")
    assert json.loads(ev["evidence"]) == {"captions": [0, 1], "names": ["automobile", "car"]}
    assert ev["score"] == 1.0  # both captions name it


def test_label_kinds_restrict_what_becomes_a_label(tmp_path):
    stage = LabelStage(LabelConfig(kinds=["objects"]),
                       StageContext(str(tmp_path), "label", artifacts={"tagset": str(_tagset_dir(tmp_path))}))
    stage.setup()
    batch = pa.table({"image_id": ["a"], "parsed": pa.array([[_parsed(["car"], ["red"])]], pa.list_(PARSED))})
    assert stage(batch).table.column("union_label_id").to_pylist() == [[0]]


def _export_rows(ids):
    """Rows as export reads them, each with inline PNG-signed bytes unique to its id."""
    rows = pa.Table.from_pylist(
        [{"image_id": i, "image": None, "image_bytes": b"\x89PNG\r\n\x1a\n" + i.encode(),
          "captions": [f"caption of {i}", "a \"quoted\"\nline"]} for i in ids], schema=ROWS_SCHEMA)
    n = len(ids)
    rows = rows.append_column("union_label_id", pa.array([[k % 4, 3] for k in range(n)], pa.list_(pa.int32())))
    return rows.append_column("parse_label_id", pa.array([[[k % 4], [3]] for k in range(n)],
                                                         pa.list_(pa.list_(pa.int32()))))


def _stage(tmp_path, **config):
    ctx = StageContext(str(tmp_path), "export", artifacts={"tagset": str(_tagset_dir(tmp_path))})
    return ExportStage(ExportConfig(**config), ctx)


def test_export_writes_inline_images_and_json(tmp_path):
    stage = _stage(tmp_path)
    rows = pa.Table.from_pylist([
        {"image_id": "a", "image": None, "image_bytes": b"\x89PNG\r\n\x1a\nxx", "captions": ["a red car"]},
        {"image_id": "b", "image": "/data/b.jpg", "image_bytes": None, "captions": ["grass"]},
        {"image_id": "c", "image": None, "image_bytes": None, "captions": ["x"]},
    ], schema=ROWS_SCHEMA)
    rows = rows.append_column("union_label_id", pa.array([[0, 1], [2], []], pa.list_(pa.int32())))
    rows = rows.append_column("parse_label_id", pa.array([[[0, 1]], [[2]], [[]]], pa.list_(pa.list_(pa.int32()))))
    res = stage(rows)
    assert res.table.schema == EXPORT_SCHEMA
    a_path = image_file("a", ".png")
    assert res.table.column("image_path").to_pylist() == [a_path, "/data/b.jpg"]
    assert [r.code for r in res.rejects] == ["row_no_image"]
    step = tmp_path / "export"
    assert (step / a_path).read_bytes().startswith(b"\x89PNG")
    StepDir(step).commit_shard(0, res.table, pa.table({}), {}, {}, res.files)
    stats = stage.finalize(step)
    data = json.loads((step / "ram_train.json").read_text())
    assert stats == {"json_rows": 2}
    assert data[0] == {"image_path": a_path, "caption": ["a red car"], "union_label_id": [0, 1],
                       "parse_label_id": [[0, 1]]}
    assert (step / "tag_list.txt").read_text() == "car\nred\ngrass\nride"


def _run_export_shards(tmp_path, shards: list[list[str]], batch_size: int = 2, **config) -> StepDir:
    """Each list of ids is one input shard, run through the engine's shard worker (batches of
    ``batch_size``, so a shard's JSONL is several batches concatenated), then finalize."""
    inp = tmp_path / "label"
    inp.mkdir()
    for i, ids in enumerate(shards):
        pq.write_table(_export_rows(ids), inp / f"part-{i:05d}.parquet")
    rows = View(str(tmp_path)).after("label", "source", _export_rows([]).column_names)  # the rows export reads
    ctx = StageContext(str(tmp_path), "export", artifacts={"tagset": str(_tagset_dir(tmp_path))},
                       view=rows.to_dict())
    step = StepDir(tmp_path / "export")
    worker = ShardWorker("export.ram.v1", ExportConfig(**config).model_dump_json(), ctx.to_json(),
                         str(step.path), "fp", batch_size)
    for i in range(len(shards)):
        worker.process(i, {})
    worker.stage.finalize(step.path)
    return step


def test_export_jsonl_shards_hold_the_parquet_rows_and_the_json_list_their_concatenation(tmp_path):
    shards = [[f"img{k}" for k in range(s, s + 5)] for s in (0, 5, 10)] + [[]]
    step = _run_export_shards(tmp_path, shards)
    lines = []
    for i in range(len(shards)):
        text = (step.path / "jsonl" / f"part-{i:05d}.jsonl").read_text()
        got = [json.loads(line) for line in text.splitlines()]
        expected = pq.read_table(step.path / f"part-{i:05d}.parquet", columns=RECORD_KEYS).to_pylist()
        assert got == expected and len(got) == len(shards[i])
        assert all(list(r) == RECORD_KEYS for r in got)  # the official record's keys, in its order
        lines += got
    data = json.loads((step.path / "ram_train.json").read_text())  # one valid json list
    assert data == lines and len(data) == 15
    assert data[1]["caption"] == ["caption of img1", 'a "quoted"\nline']
    assert not [p for p in step.path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_export_json_list_only_when_asked(tmp_path):
    step = _run_export_shards(tmp_path, [["a", "b"]], write_json=False)
    assert not (step.path / "ram_train.json").exists()
    assert len((step.path / "jsonl" / "part-00000.jsonl").read_text().splitlines()) == 2


def test_stitch_fails_when_a_jsonl_shard_disagrees_with_its_parquet(tmp_path):
    step = _run_export_shards(tmp_path, [["a", "b"], ["c", "d"]], write_json=False)
    jl = step.path / "jsonl" / "part-00001.jsonl"
    jl.write_text(jl.read_text().splitlines()[0] + "\n")
    with pytest.raises(RuntimeError, match="part-00001.jsonl holds 1 lines for 2 Parquet rows"):
        stitch_json(step.path, step.path / "ram_train.json")
    assert not (step.path / "ram_train.json").exists()


def test_stitching_memory_does_not_grow_with_rows(tmp_path):
    """~24 MB of JSONL in four shards stitch with a few MB of Python memory (1 MiB chunks)."""
    step = tmp_path / "export"
    (step / "jsonl").mkdir(parents=True)
    line = json.dumps({"image_path": "images/ab/cd/x.jpg", "caption": ["a caption " * 8],
                       "union_label_id": list(range(12)), "parse_label_id": [list(range(12))]}) + "\n"
    per_shard = 30_000
    for i in range(4):
        pq.write_table(pa.table({"image_id": [str(k) for k in range(per_shard)]}), step / f"part-{i:05d}.parquet")
        (step / "jsonl" / f"part-{i:05d}.jsonl").write_text(line * per_shard)
    size = 4 * per_shard * len(line)
    tracemalloc.start()
    n = stitch_json(step, step / "ram_train.json")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 4 * per_shard and size > 20e6
    assert peak < 4e6  # three 1 MiB buffers at most, whatever the size
    with open(step / "ram_train.json", "rb") as f:
        assert f.read(2) == b"[\n"
        f.seek(-(len(line) + 2), 2)
        assert f.read() == line.encode() + b"]\n"  # the last record has no comma after it


ODD_IDS = ["sub/dir/x.jpg", "../../etc/passwd", ".", "..", ".hidden", "", "a b?c#d%e", "caf\u00e9/\u732b",
           "x" * 400, "x" * 399 + "y", "A", "a", "%41", "back\\slash", "new\nline", "-rf"]


def test_image_tree_is_bounded_and_unique_for_many_and_odd_ids():
    ids = [f"sw0-{k:07d}" for k in range(20_000)] + ODD_IDS
    paths = [image_file(i, ".jpg") for i in ids]
    assert len(set(paths)) == len(ids)
    level1, level2 = set(), {}
    for p in paths:
        top, a, b, name = p.split("/")
        assert top == "images" and len(a) == len(b) == 2 and int(a, 16) < 256 and int(b, 16) < 256
        assert name.endswith(".jpg") and not name.startswith(".") and len(name.encode()) <= 255
        level1.add(a)
        level2.setdefault(a, set()).add(b)
    assert len(level1) == 256 and max(len(v) for v in level2.values()) <= 256
    assert image_file("sub/dir/x.jpg", ".png").endswith("/sub%2Fdir%2Fx.jpg.png")  # readable, one file name


def test_odd_image_ids_are_written_inside_the_image_tree(tmp_path):
    stage = _stage(tmp_path)
    res = stage(_export_rows(ODD_IDS))
    root = (tmp_path / "export").resolve()
    paths = res.table.column("image_path").to_pylist()
    assert len(set(paths)) == len(ODD_IDS) and not res.rejects
    for iid, rel in zip(ODD_IDS, paths):
        f = (root / rel).resolve()
        assert f.parent.parent.parent == root / "images"  # nothing escapes or nests deeper
        assert f.read_bytes() == b"\x89PNG\r\n\x1a\n" + iid.encode()


def test_inline_bytes_win_over_a_url_but_not_over_a_local_path(tmp_path):
    """img2dataset rows carry the URL and the bytes: a trainer can open the written file, not the URL."""
    stage = _stage(tmp_path)
    res = stage(_export_rows(["u", "p"]).set_column(1, "image", pa.array(["https://x/u.jpg", "/data/p.jpg"])))
    assert res.table.column("image_path").to_pylist() == [image_file("u", ".png"), "/data/p.jpg"]
    assert (tmp_path / "export" / image_file("u", ".png")).exists()
    assert not (tmp_path / "export" / image_file("p", ".png")).exists()


def test_export_writes_its_own_bytes_over_a_file_it_finds(tmp_path):
    """A file already at an image's path (a killed attempt's, another image's of the same name) is never
    taken for this row's: export writes the row's bytes every time."""
    stage = _stage(tmp_path)
    found = tmp_path / "export" / image_file("a", ".png")
    found.parent.mkdir(parents=True)
    found.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's pixels")
    res = stage(_export_rows(["a"]))
    assert res.table.column("image_path").to_pylist() == [image_file("a", ".png")]
    assert found.read_bytes() == b"\x89PNG\r\n\x1a\na"
