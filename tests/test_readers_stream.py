"""Streamed readers: ranges planned without parsing, read by range, rows identical to a whole-file parse."""
import hashlib
import io
import json
import random
import tracemalloc
from pathlib import Path

import fsspec
import pytest

from pipeline.stage import StageContext
from stages.readers.jsonscan import index_array, iter_elements
from stages.readers.multi import MultiSource
from stages.readers.sources import Cc3mTsv, Flickr30kKarpathy
from stages.readers.sources_json import CaptionJson, RamJson

CTX = StageContext("/tmp", "input")
TRICKY = ['a "quoted" [word]', "back\\slash", "ends with a backslash \\", '\\"', "{[,]}", "tab\tand\nnewline",
          "café ☕", '",{"image_path": "fake.jpg"}', "]]]]", "\\\\\\\"", ""]


def make(cls, chunk_bytes=None, **cfg):
    stage = cls(cls.Config(**cfg), CTX)
    if chunk_bytes:
        stage.chunk_bytes = chunk_bytes
    return stage


def read_all(stage) -> tuple[list[dict], list, list[dict]]:
    rows, rejects = [], []
    specs = stage.plan()
    for spec in specs:
        res = stage.read_shard(json.loads(json.dumps(spec)))  # a spec survives the trip through JSON
        rows += res.table.to_pylist()
        rejects += res.rejects
    return rows, rejects, specs


def ram_records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    recs = []
    for i in range(n):
        caps = [rnd.choice(TRICKY) + f" {i}" for _ in range(rnd.randint(1, 3))]
        recs.append({"image_path": f"set{i % 3}/img_{i:06d}.jpg", "caption": caps,
                     "union_label_id": sorted(rnd.sample(range(4585), rnd.randint(0, 5))),
                     "parse_label_id": [sorted(rnd.sample(range(4585), rnd.randint(0, 3))) for _ in caps]})
    return recs


def expected_ram_rows(recs: list[dict], image_dir: str) -> list[dict]:
    """What a whole-file parse gives: one row per record (its id the path without extension), the released
    labels carried along."""
    return [{"image_id": str(Path(r["image_path"]).with_suffix("")), "image": f"{image_dir}/{r['image_path']}", "image_bytes": None,
             "captions": r["caption"], "source_union_label_id": r["union_label_id"],
             "source_parse_label_id": r["parse_label_id"]} for r in recs]


# -- the scanner -----------------------------------------------------------------------------------
def test_scanner_finds_every_element_whatever_the_chunk_boundaries():
    recs = [{"s": TRICKY[i % len(TRICKY)] * (i % 3), "n": [[i], {"k": "]"}], "e": {}} for i in range(60)]
    for indent in (None, 1):
        data = json.dumps(recs, indent=indent, ensure_ascii=False).encode()
        for chunk in (1, 2, 3, 5, 8, 13, 64, 1 << 20):
            ranges, error = index_array(io.BytesIO(data), 7, chunk=chunk)
            assert error is None and len(ranges) == 9
            got = []
            for r in ranges:
                for el in iter_elements(io.BytesIO(data), r.start, r.line, chunk=chunk):
                    if el.offset >= r.stop:
                        break
                    got.append(json.loads(el.raw))
                    assert data.count(b"\n", 0, data.index(el.raw, el.offset)) + 1 == el.line
            assert got == recs, (indent, chunk)


@pytest.mark.parametrize("text, error", [
    (b'{"images": []}', "not a JSON array"),
    (b'[{"a": 1}, {"a": 2', "truncated"),
    (b'[{"a": "unclosed}, {"a": 2}]', "truncated"),
    (b'[{"a": 1}] [2]', "data after the end"),
    (b'', "no '[' found"),
])
def test_scanner_reports_where_a_file_stops_being_an_array(text, error):
    ranges, err = index_array(io.BytesIO(text), 1, chunk=4)
    assert error in err
    assert all(json.loads(text[r.start:r.stop]) == {"a": 1} for r in ranges)


# -- RAM's training json ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["json", "json_indented", "jsonl"])
def test_ram_json_rows_equal_a_whole_file_parse_across_many_ranges(tmp_path, layout):
    recs = ram_records(230)
    p = tmp_path / ("ram.jsonl" if layout == "jsonl" else "ram.json")
    if layout == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        p.write_text(json.dumps(recs, indent=2 if layout == "json_indented" else None))
    stage = make(RamJson, chunk_bytes=61, path=str(p), image_dir="/imgs", shard_rows=17, shard_bytes=997)
    rows, rejects, specs = read_all(stage)
    assert len(specs) > 10 and not rejects
    assert rows == expected_ram_rows(recs, "/imgs")  # nothing lost or doubled at a range boundary
    whole = read_all(make(RamJson, path=str(p), image_dir="/imgs", shard_rows=10_000, shard_bytes=10**9))
    assert len(whole[2]) == 1 and whole[0] == rows


def test_ram_json_bad_records_and_duplicates_are_rejected_with_where(tmp_path):
    recs = ram_records(6)
    text = ",\n".join(json.dumps(r) for r in recs[:2])
    text += ',\n{"image_path": "x/bad.jpg", "caption": ["ok"], "union_label_id": ["not", "ids"]}'
    text += ',\n{"caption": ["no image"]}'
    text += ',\n{"image_path": "y/b.jpg", "caption": [1]}'
    text += ',\n{"image_path": "z/img_000000.jpg", "caption": ["same stem as the first"]}'
    text += ",\n{oops not json}"
    text += ",\n" + ",\n".join(json.dumps(r) for r in recs[2:])
    text += ',\n{"image_path": "/imgs/set0/img_000000.jpg", "caption": ["the first, spelt absolute"]}'
    p = tmp_path / "ram.json"
    p.write_text("[\n" + text + "\n]\n")
    rows, rejects, _ = read_all(make(RamJson, path=str(p), image_dir="/imgs", shard_rows=100))
    # ids are paths relative to image_dir: z/img_000000 is another image than set0/img_000000
    assert [r["image_id"] for r in rows][:3] == ["set0/img_000000", "set1/img_000001", "z/img_000000"]
    assert [r for r in rows if r["image_id"] != "z/img_000000"] == expected_ram_rows(recs, "/imgs")
    assert [(r.code, r.reason.split(":")[0]) for r in rejects] == [
        ("row_bad_record", "line 4 (element 2)"), ("row_bad_record", "line 5 (element 3)"),
        ("row_bad_record", "line 6 (element 4)"), ("row_bad_record", "line 8 (element 6)"),
        ("row_duplicate_id", "image_id seen earlier in this shard's range of the file")]
    assert rejects[-1].image_id == "set0/img_000000"  # an absolute path under image_dir is the same image
    assert all(r.level == "row" for r in rejects)
    by_stem, stem_rejects, _ = read_all(make(RamJson, path=str(p), image_dir="/imgs", shard_rows=100, image_id="stem"))
    assert [r["image_id"] for r in by_stem][:3] == ["img_000000", "img_000001", "img_000002"]
    assert [(r.image_id, r.code) for r in stem_rejects if r.code == "row_duplicate_id"] == [
        ("img_000000", "row_duplicate_id")] * 2  # the stem opt-in makes the two folders' files one id


def test_a_repeated_record_right_after_its_first_is_rejected_once_whatever_the_ranges(tmp_path):
    recs = ram_records(5)
    p = tmp_path / "ram.json"
    p.write_text(json.dumps(recs[:2] + [recs[1], recs[1]] + recs[2:]))  # records 2 and 3 repeat record 1
    for shard_rows in (1, 2, 3, 100):
        rows, rejects, _ = read_all(make(RamJson, path=str(p), image_dir="/imgs", shard_rows=shard_rows))
        assert rows == expected_ram_rows(recs, "/imgs"), shard_rows
        assert [(r.image_id, r.code) for r in rejects] == [("set1/img_000001", "row_duplicate_id")] * 2


def test_plan_never_decodes_a_record(tmp_path):
    """Every element of this array is broken JSON: plan still splits it, by byte offsets; the workers
    find each broken record and reject it."""
    elements = [f'{{"image_path": "a{i}.jpg", "caption": [ "[{{" ] oops}}' for i in range(50)]
    p = tmp_path / "broken.json"
    p.write_text("[" + ",\n".join(elements) + "]")
    stage = make(RamJson, path=str(p), shard_rows=8)
    specs = stage.plan()
    assert len(specs) == 7
    assert all(isinstance(s["start"], int) and isinstance(s["stop"], int) and s["format"] == "json" for s in specs)
    data = p.read_bytes()
    assert [data[s["start"]:s["stop"]].strip().count(b"\n") + 1 for s in specs] == [8] * 6 + [2]
    rows, rejects, _ = read_all(stage)
    assert rows == [] and len(rejects) == 50 and {r.code for r in rejects} == {"row_bad_record"}
    assert rejects[20].reason.startswith("line 21 (element 20): not valid JSON")


def test_a_broken_tail_keeps_the_elements_before_it(tmp_path):
    recs = ram_records(10)
    p = tmp_path / "cut.json"
    p.write_bytes(json.dumps(recs).encode()[:-40])  # cut inside the last element
    rows, rejects, _ = read_all(make(RamJson, path=str(p), image_dir="/imgs", shard_rows=3))
    assert rows == expected_ram_rows(recs[:9], "/imgs")
    assert [(r.code, r.level) for r in rejects] == [("input_unreadable", "input")]
    assert "truncated" in rejects[0].reason


def test_reading_is_bounded_by_the_chunk_not_the_file(tmp_path):
    """A 24 MB file in 140 ranges: planning it and reading a range each hold a few MB (the chunk read,
    256 KiB, and its index arrays; a range's rows), never the file."""
    recs = ram_records(2000, seed=3)
    block = ",\n".join(json.dumps(r) for r in recs).encode()
    p = tmp_path / "big.json"
    with open(p, "wb") as f:
        f.write(b"[\n")
        for i in range(70):
            f.write(block.replace(b'"image_path": "set', f'"image_path": "r{i}/set'.encode()) + (b",\n" if i < 69 else b"\n"))
        f.write(b"]\n")
    size = p.stat().st_size
    assert size > 20e6
    stage = make(RamJson, path=str(p), shard_rows=1000)
    stage.read_shard(stage.plan()[0])  # imports and caches warm, so the peaks below are the reading's own
    tracemalloc.start()
    specs = stage.plan()
    _, plan_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    res = stage.read_shard(specs[len(specs) // 2])
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(specs) == 140 and res.table.num_rows == 1000 and not res.rejects
    assert plan_peak < 8e6 < size / 2.5, plan_peak
    assert read_peak < 8e6, read_peak


# -- BLIP / ALBEF caption json ----------------------------------------------------------------------
def test_caption_json_merges_one_images_records_across_range_boundaries(tmp_path):
    recs, expected = [], []
    for i in range(40):  # 1 to 4 consecutive records per image, as BLIP's coco_karpathy_train.json has them
        caps = [f"{TRICKY[(i + j) % len(TRICKY)]} {i}.{j}" for j in range(1 + i % 4)]
        recs += [{"image": f"val2014/COCO_{i:03d}.jpg", "caption": c, "image_id": f"coco_{i}"} for c in caps]
        expected.append({"image_id": f"val2014/COCO_{i:03d}", "image": f"/coco/val2014/COCO_{i:03d}.jpg", "image_bytes": None,
                         "captions": caps})
    p = tmp_path / "coco_karpathy_train.json"
    p.write_text(json.dumps(recs))
    for shard_rows in (1, 2, 3, 5, 1000):
        rows, rejects, specs = read_all(make(CaptionJson, chunk_bytes=50, path=str(p), image_dir="/coco",
                                             shard_rows=shard_rows))
        assert rows == expected and not rejects, shard_rows
    assert len(specs) == 1


def test_caption_json_non_adjacent_records_merge_within_a_range_and_only_stems_collide(tmp_path):
    recs = [{"image": "a/x.jpg", "caption": ["one", "two"]}, {"image": "b.jpg", "caption": "three"},
            {"image": "a/x.jpg", "caption": "four"}, {"image": "c/x.jpg", "caption": "other folder, same stem"},
            {"image": "d.jpg"}, {"image": "e.jpg", "caption": {"not": "a caption"}}]
    p = tmp_path / "caps.json"
    p.write_text(json.dumps(recs))
    rows, rejects, _ = read_all(make(CaptionJson, path=str(p), image_dir="/i"))
    assert [(r["image_id"], r["captions"]) for r in rows] == [
        ("a/x", ["one", "two", "four"]), ("b", ["three"]), ("c/x", ["other folder, same stem"]), ("d", [])]
    assert [(r.image_id, r.code) for r in rejects] == [("e", "row_bad_record")]
    rows, rejects, _ = read_all(make(CaptionJson, path=str(p), image_dir="/i", image_id="stem"))
    assert [r["image_id"] for r in rows] == ["x", "b", "d"]
    assert [(r.image_id, r.code) for r in rejects] == [("e", "row_bad_record"), ("x", "row_duplicate_id")]


def test_url_only_images_are_rejected_with_the_download_hint_unless_kept(tmp_path):
    recs = [{"url": "https://example.com/a.jpg", "caption": "web caption"},
            {"image": "local/b.jpg", "caption": "a local file"}, {"image": "http://x.org/c.png", "caption": "c"}]
    p = tmp_path / "ccs_synthetic.json"
    p.write_text(json.dumps(recs))
    rows, rejects, _ = read_all(make(CaptionJson, path=str(p), image_dir="/i"))
    assert [r["image"] for r in rows] == ["/i/local/b.jpg"]
    assert [r.code for r in rejects] == ["row_image_url_only"] * 2
    assert "img2dataset" in rejects[0].reason and "urls: keep" in rejects[0].reason
    kept, none, _ = read_all(make(CaptionJson, path=str(p), image_dir="/i", urls="keep"))
    assert not none and [r["image"] for r in kept] == ["https://example.com/a.jpg", "/i/local/b.jpg",
                                                        "http://x.org/c.png"]
    assert kept[0]["image_id"] == hashlib.sha1(b"https://example.com/a.jpg").hexdigest()[:16]  # as CC3M's ids


# -- CC3M tsv -------------------------------------------------------------------------------------
def test_cc3m_line_ranges_merge_a_urls_consecutive_lines_across_boundaries(tmp_path):
    lines, expected = [], {}
    for g in range(150):  # runs of 1 to 3 lines of one URL
        url = f"http://x/{g}.jpg"
        for j in range(1 + g % 3):
            lines.append(f"caption {g}.{j} [{TRICKY[(g + j) % 4]!r}]\t{url}")
            expected.setdefault(url, []).append(lines[-1].split("\t")[0])
    lines.insert(151, "a bad line without a tab")
    p = tmp_path / "cc.tsv"
    p.write_text("\n".join(lines) + "\n")
    whole_rows, whole_rej, _ = read_all(make(Cc3mTsv, path=str(p), shard_rows=10**6))
    assert [r["captions"] for r in whole_rows] == list(expected.values())
    assert [r.reason for r in whole_rej] == ["line 152: expected caption<TAB>url"]
    for shard_bytes in (1, 40, 333, 4096):
        rows, rejects, specs = read_all(make(Cc3mTsv, chunk_bytes=29, path=str(p), shard_bytes=shard_bytes))
        assert rows == whole_rows and [r.code for r in rejects] == ["row_bad_record"], shard_bytes
    assert len(specs) == 4
    off = p.read_bytes().index(b"a bad line")
    assert rejects[0].reason == f"byte {off}: expected caption<TAB>url"


def test_cc3m_urls_option(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("a dog\thttp://x/1.jpg\n")
    assert len(read_all(make(Cc3mTsv, path=str(p)))[0]) == 1  # kept by default: caption-only workflows (tagset)
    rows, rejects, _ = read_all(make(Cc3mTsv, path=str(p), urls="reject"))
    assert rows == [] and [r.code for r in rejects] == ["row_image_url_only"]


def test_real_captions_read_identically_in_small_and_whole_ranges(shared):
    caps = shared / "data" / "captions"
    for cls, f, small in ((Cc3mTsv, "cc3m_val.tsv", 50), (Flickr30kKarpathy, "flickr30k_karpathy_test.json", 37)):
        whole = read_all(make(cls, path=str(caps / f), shard_rows=10**6))
        parts = read_all(make(cls, path=str(caps / f), shard_rows=small))
        assert len(whole[2]) == 1 and len(parts[2]) > 20 and parts[0] == whole[0] and not parts[1]


# -- URIs on fsspec filesystems ----------------------------------------------------------------------
def test_memory_and_file_uris_read_the_same_rows_as_plain_paths(tmp_path):
    recs = ram_records(40)
    tsv = "".join(f"caption {i}\thttp://x/{i // 5}.jpg\n" for i in range(60))
    (tmp_path / "ram.json").write_text(json.dumps(recs))
    (tmp_path / "a.tsv").write_text(tsv)
    (tmp_path / "b.tsv").write_text(tsv.replace("x/", "z/"))
    mem = fsspec.filesystem("memory")
    for name in ("ram.json", "a.tsv", "b.tsv"):
        mem.pipe(f"/rs-test/{name}", (tmp_path / name).read_bytes())
    try:
        for root in (str(tmp_path), f"file://{tmp_path}", "memory://rs-test"):
            ram = read_all(make(RamJson, path=f"{root}/ram.json", image_dir="/imgs", shard_rows=9))
            tsv_rows = read_all(make(Cc3mTsv, path=f"{root}/*.tsv", shard_bytes=100))
            assert ram[0] == expected_ram_rows(recs, "/imgs") and len(ram[2]) == 5
            assert [s["file"] for s in tsv_rows[2][::len(tsv_rows[2]) - 1]] == [f"{root}/a.tsv", f"{root}/b.tsv"]
            assert len(tsv_rows[0]) == 24 and tsv_rows[0][12]["image"] == "http://z/0.jpg"
        fp = make(RamJson, path="memory://rs-test/ram.json").input_fingerprint()
        mem.pipe("/rs-test/ram.json", b"[]")
        assert make(RamJson, path="memory://rs-test/ram.json").input_fingerprint() != fp
        missing = read_all(make(RamJson, path="memory://rs-test/nope.json"))
        assert [(r.code, r.level) for r in missing[1]] == [("input_missing", "input")]
    finally:
        mem.rm("/rs-test", recursive=True)


def test_multi_source_carries_range_specs(tmp_path):
    (tmp_path / "a.tsv").write_text("".join(f"c{i}\thttp://x/{i}\n" for i in range(30)))
    (tmp_path / "b.json").write_text(json.dumps([{"image_name": f"{i}.jpg", "captions": [f"d{i}"]} for i in range(9)]))
    stage = make(MultiSource, sources=[{"use": "source.cc3m_tsv.v1", "path": str(tmp_path / "a.tsv"), "shard_bytes": 50},
                                       {"use": "source.flickr30k.v1", "path": str(tmp_path / "b.json"), "shard_rows": 4}])
    rows, rejects, specs = read_all(stage)
    assert len(rows) == 39 and not rejects and [s["source"] for s in specs].count(1) == 3


@pytest.mark.slow
def test_ram_json_labels_travel_with_the_rows_through_a_run(tmp_path):
    """The released labels are declared outputs: the contract check passes and later steps carry them."""
    from pipeline.cli import main
    from pipeline.store import StepDir
    from pipeline.view import read_step

    recs = [{"image_path": f"coco/{i}.jpg", "caption": ["a man riding a horse on the beach"],
             "union_label_id": [i, 7], "parse_label_id": [[i]]} for i in range(5)]
    recs.append({"image_path": "https://example.com/web.jpg", "caption": ["a dog"]})
    (tmp_path / "ram.json").write_text(json.dumps(recs))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workflow: parse_only\nray: {{enabled: false}}\n"
                   f"input: {{use: source.ram_json.v1, path: {tmp_path / 'ram.json'}, shard_rows: 2}}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    labelled = read_step(tmp_path / "run" / "label").to_pylist()  # label's rows carry the input's columns
    assert sorted((r["image_id"], r["source_union_label_id"], r["source_parse_label_id"]) for r in labelled) == [
        (f"coco/{i}", [i, 7], [[i]]) for i in range(5)]
    assert StepDir(tmp_path / "run" / "input").rejects().column("code").to_pylist() == ["row_image_url_only"]
