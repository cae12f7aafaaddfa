import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import StageContext
from stages.sources import (Cc3mTsv, CocoCaptions, Flickr30kKarpathy, Img2Dataset, ImageFolder, MultiSource,
                            ProjectParquet)

CTX = StageContext("/tmp", "input")


def read_all(stage) -> tuple[list[dict], list]:
    rows, rejects = [], []
    for spec in stage.plan():
        res = stage.read_shard(spec)
        rows += res.table.to_pylist()
        rejects += res.rejects
    return rows, rejects


def make(cls, **cfg):
    return cls(cls.Config(**cfg), CTX)


def test_coco_reader_on_real_coco20(shared):
    d = shared / "data" / "coco20"
    rows, rejects = read_all(make(CocoCaptions, path=str(d / "captions_train2017.json"), shard_rows=7))
    assert len(rows) == 20 and not rejects
    assert sum(len(r["captions"]) for r in rows) == 100
    assert all(r["image_id"].isdigit() and r["image"].endswith(r["image_id"] + ".jpg") for r in rows)
    assert all((d / "images" / (r["image_id"] + ".jpg")).exists() for r in rows)


def test_coco_ids_do_not_depend_on_row_order(tmp_path):
    data = {"images": [{"id": 1, "file_name": "b.jpg"}, {"id": 2, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]}
    (tmp_path / "1.json").write_text(json.dumps(data))
    data["images"].reverse()
    data["annotations"].reverse()
    (tmp_path / "2.json").write_text(json.dumps(data))
    one = read_all(make(CocoCaptions, path=str(tmp_path / "1.json")))[0]
    two = read_all(make(CocoCaptions, path=str(tmp_path / "2.json")))[0]
    assert one == two and [r["image_id"] for r in one] == ["a", "b"]


def test_flickr_reader_on_real_json(shared):
    rows, _ = read_all(make(Flickr30kKarpathy, path=str(shared / "data" / "captions" / "flickr30k_karpathy_test.json"),
                            shard_rows=300))
    assert len(rows) == 1000 and all(len(r["captions"]) == 5 for r in rows)
    assert rows[0]["image_id"] + ".jpg" == rows[0]["image"].rsplit("/", 1)[1]


def test_cc3m_tsv_bad_lines_are_rejected_and_ids_hash_the_url(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("a dog on grass\thttp://x/1.jpg\nno tab here\na cat\thttp://x/2.jpg\nsecond caption\thttp://x/1.jpg\n")
    rows, rejects = read_all(make(Cc3mTsv, path=str(p)))
    assert [r["captions"] for r in rows] == [["a dog on grass", "second caption"], ["a cat"]]
    assert [r.code for r in rejects] == ["row_bad_record"]
    rows2, _ = read_all(make(Cc3mTsv, path=str(p)))
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in rows2]


def test_missing_input_file_is_an_input_reject_and_others_still_read(tmp_path):
    good = tmp_path / "cc.tsv"
    good.write_text("a dog\thttp://x/1.jpg\n")
    rows, rejects = read_all(make(Cc3mTsv, path=[str(tmp_path / "nope.tsv"), str(good)]))
    assert len(rows) == 1
    assert [(r.code, r.level) for r in rejects] == [("input_missing", "input")]


def test_unreadable_json_is_an_input_reject(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    stage = make(Flickr30kKarpathy, path=str(p))
    (spec,) = stage.plan()  # the plan finds it is no JSON array; the worker reports it
    res = stage.read_shard(spec)
    assert res.table.num_rows == 0 and [(r.code, r.level) for r in res.rejects] == [("input_unreadable", "input")]
    assert "not a JSON array" in res.rejects[0].reason


def test_folder_with_sidecar_txt(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, caps in (("a", "a red car\na blue car"), ("sub/b", "a tree")):
        (tmp_path / f"{name}.jpg").write_bytes(b"\xff\xd8fake")
        (tmp_path / f"{name}.txt").write_text(caps)
    (tmp_path / "c.png").write_bytes(b"\x89PNG")
    rows, _ = read_all(make(ImageFolder, path=str(tmp_path)))
    assert [(r["image_id"], r["captions"]) for r in rows] == [("a", ["a red car", "a blue car"]), ("c", []),
                                                              ("sub/b", ["a tree"])]
    globbed, _ = read_all(make(ImageFolder, path=str(tmp_path.parent / (tmp_path.name[:-1] + "*"))))  # folders
    assert globbed == rows


def _tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_img2dataset_webdataset_tar(tmp_path):
    p = tmp_path / "00000.tar"
    _tar(p, [("000000001.jpg", b"\xff\xd8one"), ("000000001.txt", b"a red kite"),
             ("000000001.json", json.dumps({"key": "000000001", "url": "http://x/1"}).encode()),
             ("000000002.txt", b"caption without image")])
    rows, rejects = read_all(make(Img2Dataset, path=str(p)))
    assert rows == [{"image_id": "000000001", "image": "http://x/1", "image_bytes": b"\xff\xd8one",
                     "captions": ["a red kite"]}]
    assert [(r.image_id, r.code) for r in rejects] == [("000000002", "row_no_image")]


def test_img2dataset_parquet(tmp_path):
    p = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2"], "url": ["http://x/1", None], "caption": ["a dog", "a cat"],
                             "jpg": [b"\xff\xd8", None], "status": ["success", "failed_to_download"]}), p)
    rows, rejects = read_all(make(Img2Dataset, path=str(p), format="parquet"))
    assert [r["image_id"] for r in rows] == ["k1"] and rows[0]["image_bytes"] == b"\xff\xd8"
    assert [r.code for r in rejects] == ["row_no_image"]


def test_project_parquet_rejects_rows_without_image_and_duplicates(tmp_path):
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b", "a"], "image": ["a.jpg", None, "a2.jpg"],
                             "captions": [["x"], ["y"], ["z"]]}), p)
    rows, rejects = read_all(make(ProjectParquet, path=str(p)))
    assert [r["image_id"] for r in rows] == ["a"]
    assert sorted(r.code for r in rejects) == ["row_duplicate_id", "row_no_image"]


def test_multi_source_concatenates_and_validates(tmp_path):
    a = tmp_path / "a.tsv"
    a.write_text("a dog\thttp://x/1.jpg\n")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"image_name": "1.jpg", "captions": ["a cat"]}]))
    stage = make(MultiSource, sources=[{"use": "source.cc3m_tsv.v1", "path": str(a)},
                                       {"use": "source.flickr30k.v1", "path": str(b)}])
    rows, _ = read_all(stage)
    assert [r["captions"] for r in rows] == [["a dog"], ["a cat"]]
    with pytest.raises(ValueError, match="sources\\[0\\].path"):
        MultiSource.Config(sources=[{"use": "source.cc3m_tsv.v1"}])
