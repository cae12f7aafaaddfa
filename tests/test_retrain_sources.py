"""Retrain from any export (issue 19, item 5): an export directory and RAM's training json read back with
their labels as the labels, mapped by name into a tagset read from a tag list; no caption parsed."""
import json
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_run_config
from pipeline.errors import ConfigError
from pipeline.stage import RowSource, StageContext
from pipeline.store import StepDir
from pipeline.contract import check_contract
from stages.columns import ROWS_SCHEMA
from stages.output.export import ExportConfig, ExportStage
from stages.text.label_source import SourceLabelConfig, SourceLabelStage
from stages.readers.sources_export import RamExport, RamExportConfig
from stages.readers.sources_json import RamJson, JsonListConfig
from stages.text.vocab_list import TagListConfig, TagListVocab
from tagset.tagset import KINDS, Tag, TagSet

REPO = Path(__file__).resolve().parent.parent
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


@pytest.mark.parametrize("name", ["retrain_export.yaml", "retrain_ram_json.yaml", "clean_ram_json.yaml"])
def test_shipped_retrain_configs_satisfy_the_contract(name):
    sets = ["input.path=/data/x"] + (["vocab.tag_list=/data/x", "label.source_tag_list=/data/x"]
                                     if name == "retrain_export.yaml" else [])
    check_contract(load_run_config(REPO / "stages" / name, sets))


def test_retrain_export_config_names_its_required_paths(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_run_config(REPO / "stages" / "retrain_export.yaml")
    assert ei.value.key == "input.path"
    with pytest.raises(ConfigError) as ei:
        load_run_config(REPO / "stages" / "retrain_export.yaml", ["input.path=/x", "vocab.tag_list=/x"])
    assert ei.value.key == "label.source_tag_list"


@pytest.mark.slow
def test_retrain_on_an_engine_export_through_the_cli(tmp_path, capsys):
    """An export written by export.ram.v1 (scene world images), retrained on through the retrain_export
    workflow into a vocabulary of a different order and size: labels identical by name, a model written."""
    from pipeline.cli import main
    from pipeline.view import read_step
    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    world, _ = to_tables(world_images(4, 0, 16, 64, NoiseRates(0, 0, 0)))
    shards = [[], []]
    for k, r in enumerate(world.to_pylist()):
        shards[k % 2].append({"id": r["image_id"], "union": sorted({k % 4, 1}), "parse": [[k % 4]]})
    export = _export(tmp_path, shards)
    for k, r in enumerate(world.to_pylist()):  # the world's real PNGs in place of the stand-in bytes
        img = pq.read_table(export / f"part-{k % 2:05d}.parquet").to_pylist()
        path = next(x["image_path"] for x in img if x["image_id"] == r["image_id"])
        (export / path).write_bytes(r["image_bytes"])
    run_list = tmp_path / "run_tags.txt"
    run_list.write_text("red\ngrass\nautomobile\nboat")  # no "ride"; "car" only as a synonym (syn.json)
    (tmp_path / "syn.json").write_text(json.dumps({"automobile": ["car"]}))
    out = tmp_path / "run"
    argv = ["run", str(REPO / "stages" / "retrain_export.yaml"), "--out", str(out)]
    for s in [f"input.path={export}", f"vocab.tag_list={run_list}", f"vocab.synonyms={tmp_path / 'syn.json'}",
              f"label.source_tag_list={export}", "ray.enabled=false", "train.epochs=1", "train.batch_size=8",
              "train.warmup_steps=1", "train.text_encoder=none", "train.val_fraction=0.25",
              "train.model_args={image_size: 64, window_size: 4, embed_dim: 8, head_hidden: 32, "
              "head_intermediate: 64}"]:
        argv += ["--set", s]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    src_names, run_names = [t.name for t in EXPORT_TAGS], run_list.read_text().splitlines()
    exported = {r["image_id"]: r for k in range(2) for r in pq.read_table(export / f"part-{k:05d}.parquet").to_pylist()}
    labelled = read_step(out / "label").to_pylist()
    assert len(labelled) == 16
    renamed = {"car": "automobile", "red": "red", "grass": "grass"}  # "ride" is not in the run's list
    for r in labelled:
        want = [renamed[n] for n in _names(exported[r["image_id"]]["union_label_id"], src_names) if n in renamed]
        assert _names(r["union_label_id"], run_names) == sorted(want)
    m = json.loads((out / "label" / "_manifest.json").read_text())
    assert m["unmapped_names"] == 1 and m["top_unmapped"] == [["ride", 4]]
    train = json.loads((out / "train" / "_manifest.json").read_text())
    assert train["rows_in"] == 16 and (out / "train" / "model.pth").exists()
    assert (out / "train" / "tag_list.txt").read_text().splitlines() == run_names
