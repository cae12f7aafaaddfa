import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage import StageContext
from stages.columns import ROWS_SCHEMA
from stages.export import EXPORT_SCHEMA, ExportConfig, ExportStage
from stages.label import LabelConfig, LabelStage
from stages.parse import PARSED
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


def test_export_writes_inline_images_and_json(tmp_path):
    tdir = _tagset_dir(tmp_path)
    ctx = StageContext(str(tmp_path), "export", artifacts={"tagset": str(tdir)})
    stage = ExportStage(ExportConfig(), ctx)
    rows = pa.Table.from_pylist([
        {"image_id": "a", "image": None, "image_bytes": b"\x89PNG\r\n\x1a\nxx", "captions": ["a red car"]},
        {"image_id": "b", "image": "/data/b.jpg", "image_bytes": None, "captions": ["grass"]},
        {"image_id": "c", "image": None, "image_bytes": None, "captions": ["x"]},
    ], schema=ROWS_SCHEMA)
    rows = rows.append_column("union_label_id", pa.array([[0, 1], [2], []], pa.list_(pa.int32())))
    rows = rows.append_column("parse_label_id", pa.array([[[0, 1]], [[2]], [[]]], pa.list_(pa.list_(pa.int32()))))
    res = stage(rows)
    assert res.table.schema == EXPORT_SCHEMA
    assert res.table.column("image_path").to_pylist() == ["images/a.png", "/data/b.jpg"]
    assert [r.code for r in res.rejects] == ["row_no_image"]
    step = tmp_path / "export"
    assert (step / "images" / "a.png").read_bytes().startswith(b"\x89PNG")
    pq.write_table(res.table, step / "part-00000.parquet")
    stats = stage.finalize(step)
    data = json.loads((step / "ram_train.json").read_text())
    assert stats == {"json_rows": 2}
    assert data[0] == {"image_path": "images/a.png", "caption": ["a red car"], "union_label_id": [0, 1],
                       "parse_label_id": [[0, 1]]}
    assert (step / "tag_list.txt").read_text() == "car\nred\ngrass\nride"
