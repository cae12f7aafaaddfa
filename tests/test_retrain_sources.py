"""Retrain from any export (issue 19, item 5): an export directory and RAM's training json read back with
their labels as the labels, mapped by name into a tagset read from a tag list; no caption parsed."""
import json
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import RowSource, StageContext
from pipeline.store import StepDir
from stages.columns import ROWS_SCHEMA
from stages.export import ExportConfig, ExportStage
from stages.label_source import SourceLabelConfig, SourceLabelStage
from stages.sources_export import RamExport, RamExportConfig
from stages.sources_json import RamJson, JsonListConfig
from stages.vocab_list import TagListConfig, TagListVocab
from tagset.tagset import KINDS, Tag, TagSet

EXPORT_TAGS = [Tag(0, "car", ["automobile"]), Tag(1, "red", kind="attribute"), Tag(2, "grass", kind="scene"),
               Tag(3, "ride", kind="action")]
PNG = b"\x89PNG\r\n\x1a\n"


def _vocab_dir(path: Path, tags: list[Tag]) -> Path:
    """A tagset artifact as a vocab step writes it."""
    ts = TagSet(tags)
    path.mkdir(parents=True)
    pq.write_table(ts.to_table(), path / "tagset.parquet")
    for name, data in ts.files().items():
        (path / name).write_bytes(data)
    return path


def read_all(stage) -> tuple[list[dict], list]:
    rows, rejects = [], []
    for spec in stage.plan():
        res = stage.read_shard(spec)
        assert res.table.schema == stage.schema
        rows += res.table.to_pylist()
        rejects += res.rejects
    return rows, rejects


def _export(tmp_path: Path, shards: list[list[dict]]) -> Path:
    """An export written by export.ram.v1 itself: each list of rows (image_id, union, parse) is a shard."""
    ctx = StageContext(str(tmp_path), "export", artifacts={"tagset": str(_vocab_dir(tmp_path / "vocab", EXPORT_TAGS))})
    stage = ExportStage(ExportConfig(), ctx)
    step = StepDir(tmp_path / "export")
    for i, recs in enumerate(shards):
        rows = pa.Table.from_pylist([{"image_id": r["id"], "image": None, "image_bytes": PNG + r["id"].encode(),
                                      "captions": r.get("captions", ["a caption"])} for r in recs], schema=ROWS_SCHEMA)
        rows = rows.append_column("union_label_id", pa.array([r["union"] for r in recs], pa.list_(pa.int32())))
        rows = rows.append_column("parse_label_id", pa.array([r["parse"] for r in recs],
                                                             pa.list_(pa.list_(pa.int32()))))
        res = stage(rows)
        step.commit_shard(i, res.table, pa.table({}), {}, {}, res.files)
    stage.finalize(step.path)
    return step.path


def _names(ids, tags):
    return sorted(tags[i] for i in ids)


def _map(tmp_path: Path, run_tags: list[Tag], source_tag_list: Path, rows: list[dict], **config):
    """label.source.v1 over rows as a source step writes them; (output rows, rejects, merged stats)."""
    run = _vocab_dir(tmp_path / "run_vocab", run_tags)
    stage = SourceLabelStage(SourceLabelConfig(source_tag_list=str(source_tag_list), **config),
                             StageContext(str(tmp_path), "label", artifacts={"tagset": str(run)}))
    stage.input_fingerprint()
    stage.setup()
    batch = pa.table({"image_id": [r["image_id"] for r in rows],
                      "source_union_label_id": pa.array([r["source_union_label_id"] for r in rows],
                                                        pa.list_(pa.int32())),
                      "source_parse_label_id": pa.array([r["source_parse_label_id"] for r in rows],
                                                        pa.list_(pa.list_(pa.int32())))})
    res = stage(batch)
    return res.table.to_pylist(), res.rejects, stage.merge_summaries([stage.shard_summary(res.table, 0)])


def test_export_reader_round_trips_an_engine_export_by_name(tmp_path):
    shards = [[{"id": "a", "union": [0, 1], "parse": [[0, 1], [0]], "captions": ["a red car", "a car"]},
               {"id": "b", "union": [2], "parse": [[2, 3]]}],  # decide dropped "ride": union is not the parse
              [{"id": "c", "union": [], "parse": [[]]}]]
    export = _export(tmp_path, shards)
    assert (export / "tag_list.txt").read_text() == "car\nred\ngrass\nride"
    rows, rejects = read_all(RamExport(RamExportConfig(path=str(export)), StageContext(str(tmp_path), "input")))
    assert not rejects and [r["image_id"] for r in rows] == ["a", "b", "c"]
    for r in rows:  # image paths in the export are relative to it; the rows name files that exist
        assert Path(r["image"]).is_absolute() and Path(r["image"]).read_bytes() == PNG + r["image_id"].encode()
        assert r["image_bytes"] is None
    assert rows[0]["captions"] == ["a red car", "a car"]
    assert [(r["source_union_label_id"], r["source_parse_label_id"]) for r in rows] == [
        ([0, 1], [[0, 1], [0]]), ([2], [[2, 3]]), ([], [[]])]
    # the export's labels into a run tagset that orders the same names differently: identical by name
    names = [t.name for t in EXPORT_TAGS]
    run_tags = [Tag(0, "ride"), Tag(1, "grass"), Tag(2, "red"), Tag(3, "car", ["automobile"])]
    run_names = [t.name for t in run_tags]
    out, rejects, stats = _map(tmp_path, run_tags, export, rows)
    assert not rejects and stats["unmapped_names"] == 0
    for src, got in zip(rows, out):
        assert _names(got["union_label_id"], run_names) == _names(src["source_union_label_id"], names)
        assert [_names(c, run_names) for c in got["parse_label_id"]] == \
            [_names(c, names) for c in src["source_parse_label_id"]]
    assert [e["reason"] for e in out[0]["tag_events"]] == ["source", "source"]


def test_export_reader_plans_from_footers_and_reports_bad_inputs(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    recs = [{"image_id": f"i{k}", "image_path": f"images/i{k}.png" if k != 3 else None, "caption": [f"c{k}"],
             "union_label_id": [k], "parse_label_id": [[k]]} for k in range(5)]
    pq.write_table(pa.Table.from_pylist(recs), d / "part-00000.parquet", row_group_size=2)
    pq.write_table(pa.table({"image_id": ["x"], "caption": [["c"]]}), d / "part-00001.parquet")
    (tmp_path / "empty").mkdir()
    stage = RamExport(RamExportConfig(path=[str(d), str(tmp_path / "empty"), str(tmp_path / "gone")], shard_rows=3),
                      StageContext(str(tmp_path), "input"))
    specs = stage.plan()
    assert [s.get("row_groups") for s in specs[:3]] == [[0, 1], [2], [0]]  # whole row groups, ~3 rows a shard
    rows, rejects = read_all(stage)
    assert [r["image_id"] for r in rows] == ["i0", "i1", "i2", "i4"]
    assert rows[0]["image"] == str(d / "images" / "i0.png")
    got = [(r.code, r.level, r.image_id) for r in rejects]
    assert got == [("row_no_image", "row", "i3"), ("input_unreadable", "input", None),
                   ("input_unreadable", "input", None), ("input_missing", "input", None)]
    assert "no column(s) ['image_path', 'union_label_id', 'parse_label_id']" in rejects[1].reason
    assert "part-00001.parquet" in rejects[1].reason
    assert "no part-*.parquet in this directory" in rejects[2].reason and str(tmp_path / "empty") in rejects[2].reason


def test_tag_list_vocab_from_ram_files_and_from_an_export_folder(tmp_path):
    lst = tmp_path / "ram_tag_list.txt"
    lst.write_text("dog\nred\nbeach")  # RAM's format: no final newline
    (tmp_path / "th.txt").write_text("0.7\n0.8\n1.0\n")
    ctx = StageContext(str(tmp_path), "vocab")
    res = TagListVocab(TagListConfig(tag_list=str(lst), threshold_file=str(tmp_path / "th.txt")), ctx).run(RowSource())
    ts = TagSet.from_table(res.tables["tagset"])
    assert ts.names == ["dog", "red", "beach"] and ts.thresholds() == [0.7, 0.8, 1.0]
    assert {t.kind for t in ts.tags} == {"object"} and res.stats["defaults"]["kind"] == "object"
    assert res.files["tag_list.txt"] == lst.read_bytes()  # what export.ram.v1 copies into the export
    # an export folder brings its thresholds and synonyms
    export = _export(tmp_path, [[{"id": "a", "union": [0], "parse": [[0]]}]])
    res = TagListVocab(TagListConfig(tag_list=str(export), kind="scene"), ctx).run(RowSource())
    ts = TagSet.from_table(res.tables["tagset"])
    assert ts.names == ["car", "red", "grass", "ride"] and ts.id_of("Automobile") == 0
    assert {t.kind for t in ts.tags} == {"scene"} and res.stats["files"]["synonyms"] == str(export / "synonyms.json")
    assert set(get_args(TagListConfig.model_fields["kind"].annotation)) == set(KINDS)


def test_tag_list_vocab_names_what_is_wrong(tmp_path):
    ctx = StageContext(str(tmp_path), "vocab")
    with pytest.raises(ValueError, match=r"vocab\.tag_list: .*nope\.txt does not exist"):
        TagListVocab(TagListConfig(tag_list=str(tmp_path / "nope.txt")), ctx).input_fingerprint()
    with pytest.raises(ValueError, match=r"vocab\.tag_list: .* \(the folder has no tag_list\.txt\)"):
        TagListVocab(TagListConfig(tag_list=str(tmp_path)), ctx).run(RowSource())
    (tmp_path / "t.txt").write_text("dog\n\ncat\n")
    with pytest.raises(ValueError, match=r"t\.txt: line\(s\) \[2\] are blank"):
        TagListVocab(TagListConfig(tag_list=str(tmp_path / "t.txt")), ctx).run(RowSource())


def test_ram_json_labels_map_by_name_into_a_differently_ordered_tagset(tmp_path):
    src = tmp_path / "ram_tag_list.txt"
    src.write_text("dog\nautomobile\nred\nunicorn\ngrass")
    recs = [{"image_path": "coco/1.jpg", "caption": ["a red automobile", "a unicorn on grass"],
             "union_label_id": [1, 2, 3, 4], "parse_label_id": [[1, 2], [3, 4]]},
            {"image_path": "coco/2.jpg", "caption": "a dog", "union_label_id": [0]},  # no per-caption ids
            {"image_path": "coco/3.jpg", "caption": ["a dog"], "parse_label_id": [[0, 3]]}]  # no union
    (tmp_path / "ram.json").write_text(json.dumps(recs))
    reader = RamJson(JsonListConfig(path=str(tmp_path / "ram.json")), StageContext(str(tmp_path), "input"))
    rows, rejects = read_all(reader)
    assert not rejects
    run_tags = [Tag(0, "grass"), Tag(1, "car", ["automobile"]), Tag(2, "dog"), Tag(3, "red")]
    out, rejects, stats = _map(tmp_path, run_tags, src, rows)
    assert not rejects
    assert [(r["union_label_id"], r["parse_label_id"]) for r in out] == [
        ([0, 1, 3], [[1, 3], [0]]),  # automobile -> car by the run's synonym; unicorn skipped
        ([2], []),                   # training uses the union for each caption
        ([2], [[2]])]                # the union of the per-caption ids
    assert [r["source_unmapped"] for r in out] == [["unicorn"], [], ["unicorn"]]
    assert (stats["unmapped_names"], stats["unmapped_row_names"], stats["top_unmapped"]) == (1, 2, [["unicorn", 2]])
    assert "1 source name(s) not in the run's tagset, skipped 2 times" in stats["summary"] and stats["labels"] == 5
    ev = {e["tag_id"]: e for e in out[0]["tag_events"]}
    assert sorted(ev) == [0, 1, 3] and {(e["stage"], e["action"], e["reason"], e["score"]) for e in ev.values()} == {
        ("label", "add", "source", 1.0)}
    assert json.loads(ev[1]["evidence"]) == {"captions": [0], "names": ["automobile"]}


def test_source_labels_bad_input_is_a_coded_reject_or_names_the_key(tmp_path):
    src = tmp_path / "list.txt"
    src.write_text("dog\ncat")
    rows = [{"image_id": "big", "source_union_label_id": [1, 9], "source_parse_label_id": None},
            {"image_id": "neg", "source_union_label_id": None, "source_parse_label_id": [[-1]]},
            {"image_id": "none", "source_union_label_id": None, "source_parse_label_id": None},
            {"image_id": "empty", "source_union_label_id": [], "source_parse_label_id": None}]
    out, rejects, _ = _map(tmp_path, [Tag(0, "cat"), Tag(1, "dog")], src, rows)
    assert [r["image_id"] for r in out] == ["empty"] and out[0]["union_label_id"] == []
    assert [(r.image_id, r.code) for r in rejects] == [("big", "row_bad_record"), ("neg", "row_bad_record"),
                                                       ("none", "row_no_labels")]
    assert "source_union_label_id holds id(s) [9], outside" in rejects[0].reason and str(src) in rejects[0].reason
    assert "source_parse_label_id[0] holds id(s) [-1]" in rejects[1].reason
    kept, rejects, stats = _map(tmp_path / "keep", [Tag(0, "cat")], src, rows[2:], unlabelled="keep")
    assert not rejects and [r["union_label_id"] for r in kept] == [[], []] and stats["rows_without_labels"] == 2
    stage = SourceLabelStage(SourceLabelConfig(source_tag_list=str(tmp_path / "absent.txt")),
                             StageContext(str(tmp_path), "label"))
    with pytest.raises(ValueError, match=r"label\.source_tag_list: .*absent\.txt does not exist"):
        stage.input_fingerprint()
