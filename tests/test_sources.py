import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import StageContext
from stages.readers.files import Img2Dataset, ProjectParquet
from stages.readers.multi import MultiSource
from stages.readers.sources import Cc3mTsv, CocoCaptions, Flickr30kKarpathy, ImageFolder

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


# -- ids that cannot collide (stages/readers/ids.py) ---------------------------------------------------
def test_multi_source_prefixes_each_sources_ids_and_rejects_with_its_name(tmp_path):
    """Two img2dataset outputs both number their keys from 000000000: the names keep them apart."""
    for out, pixels in (("a", b"\xff\xd8A"), ("b", b"\xff\xd8B")):
        (tmp_path / out).mkdir()
        _tar(tmp_path / out / "00000.tar", [("000000000.jpg", pixels), ("000000000.txt", b"a kite"),
                                            ("000000001.txt", b"no image")])
    stage = make(MultiSource, sources=[{"use": "source.img2dataset.v1", "name": "laion_a", "path": str(tmp_path / "a/*.tar")},
                                       {"use": "source.img2dataset.v1", "name": "laion_b", "path": str(tmp_path / "b/*.tar")}])
    rows, rejects = read_all(stage)
    assert [(r["image_id"], r["image_bytes"]) for r in rows] == [("laion_a/000000000", b"\xff\xd8A"),
                                                                 ("laion_b/000000000", b"\xff\xd8B")]
    assert [(r.image_id, r.code) for r in rejects] == [("laion_a/000000001", "row_no_image"),
                                                       ("laion_b/000000001", "row_no_image")]


def test_multi_source_names_default_to_the_reader_and_must_differ(tmp_path):
    a = tmp_path / "a.tsv"
    a.write_text("a dog\thttp://x/1.jpg\n")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"image_name": "1.jpg", "captions": ["a cat"]}]))
    rows, _ = read_all(make(MultiSource, sources=[{"use": "source.cc3m_tsv.v1", "path": str(a)},
                                                  {"use": "source.flickr30k.v1", "path": str(b)}]))
    assert [r["image_id"].split("/")[0] for r in rows] == ["cc3m_tsv", "flickr30k"]
    assert rows[1]["image_id"] == "flickr30k/1"
    twice = [{"use": "source.flickr30k.v1", "path": str(b)}, {"use": "source.flickr30k.v1", "path": str(b)}]
    with pytest.raises(ValueError, match=r"sources\[1\].name: sources\[0\] is named 'flickr30k' too"):
        MultiSource.Config(sources=twice)
    with pytest.raises(ValueError, match=r"sources\[0\].name: 'a/b' is not a name"):
        MultiSource.Config(sources=[{"use": "source.flickr30k.v1", "name": "a/b", "path": str(b)}])
    twice[1]["name"] = "flickr_again"
    assert len(read_all(make(MultiSource, sources=twice))[0]) == 2


def test_ids_from_paths_are_relative_to_the_image_root_not_stems(tmp_path):
    """VG_100K/1.jpg and other/1.jpg are two images; a COCO file listed twice is one (rejected)."""
    data = {"images": [{"id": 1, "file_name": "VG_100K/1.jpg"}, {"id": 2, "file_name": "other/1.jpg"},
                       {"id": 3, "file_name": "other/1.jpg"}],
            "annotations": [{"image_id": k, "caption": f"c{k}"} for k in (1, 2, 3)]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    rows, rejects = read_all(make(CocoCaptions, path=str(tmp_path / "coco.json"), image_dir="/imgs"))
    assert [(r["image_id"], r["image"]) for r in rows] == [("VG_100K/1", "/imgs/VG_100K/1.jpg"),
                                                           ("other/1", "/imgs/other/1.jpg")]
    assert [(r.image_id, r.code) for r in rejects] == [("other/1", "row_duplicate_id")]
    (tmp_path / "k.json").write_text(json.dumps([{"image_name": "VG_100K/1.jpg", "captions": ["a"]},
                                                 {"image_name": "/imgs/other/1.jpg", "captions": ["b"]}]))
    rows, _ = read_all(make(Flickr30kKarpathy, path=str(tmp_path / "k.json"), image_dir="/imgs"))
    assert [r["image_id"] for r in rows] == ["VG_100K/1", "other/1"]


# -- a large per-file input split into shards: byte ranges of a tar, row ranges of a Parquet file ----------
def _webdataset(n: int) -> list[tuple[str, bytes]]:
    """``n`` samples (image, caption, metadata); every seventh has no image, one has a name too long for a
    plain tar header (a GNU long-name member before it)."""
    out = []
    for i in range(n):
        key = f"{i:09d}" if i != 5 else "x" * 120
        if i % 7 != 3:
            out.append((f"{key}.jpg", bytes([i]) * (100 + 37 * i)))
        out += [(f"{key}.txt", f"caption {i}".encode()), (f"{key}.json", json.dumps({"url": f"http://x/{i}"}).encode())]
    return out


def _split_read(stage) -> tuple[list[dict], list, list[dict]]:
    rows, rejects = read_all(stage)
    return rows, [(r.image_id, r.code) for r in rejects], stage.plan()


def test_a_tar_splits_into_byte_ranges_of_whole_samples_that_concatenate_to_the_whole_read(tmp_path):
    p = tmp_path / "00000.tar"
    _tar(p, _webdataset(23))
    whole = _split_read(make(Img2Dataset, path=str(p), shard_bytes=None))
    assert len(whole[2]) == 1 and len(whole[0]) == 20 and len(whole[1]) == 3
    for limits in ({"shard_rows": 4}, {"shard_bytes": 3000}, {"shard_rows": 1}, {"shard_rows": 5, "shard_bytes": 2000}):
        rows, rejects, specs = _split_read(make(Img2Dataset, path=str(p), **limits))
        assert len(specs) > 2, limits
        assert (rows, rejects) == whole[:2], limits  # same rows, ids and order; the same rejects
        assert specs == make(Img2Dataset, path=str(p), **limits).plan()  # deterministic
        assert all(a["stop"] == b["start"] for a, b in zip(specs, specs[1:]))  # adjacent, nothing skipped
    specs = make(Img2Dataset, path=str(p), shard_rows=4).plan()
    assert len(specs) == 6  # 23 samples, 4 a shard
    sizes = [len(make(Img2Dataset, path=str(p), shard_rows=4).read_shard(s).table) for s in specs]
    assert sum(sizes) == 20 and max(sizes) <= 4


def test_a_compressed_tar_is_one_shard(tmp_path):
    p = tmp_path / "00000.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        for name, data in _webdataset(6):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows, rejects, specs = _split_read(make(Img2Dataset, path=str(p), shard_rows=2))
    assert specs == [{"file": str(p)}] and len(rows) == 5 and rejects == [("000000003", "row_no_image")]


@pytest.mark.parametrize("reader", ["img2dataset", "project"])
def test_a_parquet_file_splits_into_row_ranges_that_concatenate_to_the_whole_read(tmp_path, reader):
    n = 23
    if reader == "img2dataset":
        table = pa.table({"key": [f"k{i:02d}" for i in range(n)], "url": [f"http://x/{i}" for i in range(n)],
                          "caption": [f"c{i}" for i in range(n)], "jpg": [bytes([i]) * (50 + 20 * i) for i in range(n)],
                          "status": ["success"] * n})
        cls, cfg = Img2Dataset, {"format": "parquet"}
    else:
        table = pa.table({"image_id": [f"i{i:02d}" for i in range(n)], "image": [None] * n,
                          "image_bytes": [bytes([i]) * (50 + 20 * i) for i in range(n)],
                          "captions": [[f"c{i}"] for i in range(n)]})
        cls, cfg = ProjectParquet, {}
    p = tmp_path / "00000.parquet"
    pq.write_table(table, p, row_group_size=5)
    whole = _split_read(make(cls, path=str(p), shard_bytes=None, **cfg))
    assert len(whole[2]) == 1 and len(whole[0]) == n
    for limits in ({"shard_rows": 4}, {"shard_rows": 7}, {"shard_bytes": 2000}, {"shard_rows": 1}):
        rows, rejects, specs = _split_read(make(cls, path=str(p), **cfg, **limits))
        assert len(specs) > 2 and (rows, rejects) == whole[:2], limits
        assert [(s["start"], s["stop"]) for s in specs][0][0] == 0 and specs[-1]["stop"] == n
        assert all(a["stop"] == b["start"] for a, b in zip(specs, specs[1:]))
    specs = make(cls, path=str(p), shard_rows=4, **cfg).plan()
    assert [(s["start"], s["stop"]) for s in specs] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]
