"""Ids that cannot collide (issue 20, item 3): sources that number their keys alike stay apart, and an
id that is still in two places fails the input step naming both, never reaching export."""
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.conftest import write_config
from tests.test_clean_coco import run_clean_coco



def world_pngs(n: int) -> list[tuple[bytes, str]]:
    """n scene-world images (distinct pixels) as PNG bytes with one caption each."""
    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    rows, _ = to_tables(world_images(5, 0, n, 64, NoiseRates()))
    return [(r["image_bytes"], r["captions"][0]) for r in rows.to_pylist()]


def img2dataset_output(folder: Path, images: list[tuple[bytes, str]]) -> None:
    """One WebDataset tar as img2dataset writes it: keys from 000000000, whatever other outputs hold."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for k, (png, caption) in enumerate(images):
            key = f"{k:09d}"
            meta = json.dumps({"key": key, "url": f"http://example.com/{key}.png"}).encode()
            for name, data in ((f"{key}.png", png), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_an_id_in_two_shards_fails_the_input_step_naming_both(tmp_path):
    """One img2dataset source globbing two outputs: their keys meet in two shards (files)."""
    images = world_pngs(4)
    img2dataset_output(tmp_path / "a", images[:2])
    img2dataset_output(tmp_path / "b", images[2:])
    cfg = write_config(tmp_path / "c.yaml", f"steps: {{input: source.img2dataset.v1}}\nray: {{enabled: false}}\n"
                                            f"input: {{path: '{tmp_path}/*/00000.tar'}}\n")
    with pytest.raises(RuntimeError) as e:
        main(["run", str(cfg), "--out", str(tmp_path / "run")])
    msg = str(e.value)
    assert "step 'input': 2 image id(s) are in more than one place" in msg
    assert (f"'000000000' in shard 0 ({tmp_path}/a/00000.tar) and shard 1 ({tmp_path}/b/00000.tar)" in msg
            and "'000000001' in shard 0" in msg and "source.multi.v1" in msg)
    assert not (tmp_path / "run" / "input" / "_manifest.json").exists()  # nothing downstream may read it
    # the fix the message names: one source per output, each with its name
    cfg.write_text("steps: {input: source.multi.v1}\nray: {enabled: false}\ninput:\n  sources:\n"
                   f"    - {{use: source.img2dataset.v1, name: a, path: '{tmp_path}/a/*.tar'}}\n"
                   f"    - {{use: source.img2dataset.v1, name: b, path: '{tmp_path}/b/*.tar'}}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    manifest = json.loads((tmp_path / "run" / "input" / "_manifest.json").read_text())
    assert manifest["rows_out"] == manifest["id_index_rows"] == 4


def test_a_repeat_in_another_range_of_a_record_file_fails_naming_both_ranges(tmp_path):
    """A reader judges repeats within its range; one far apart in the file is the input step's to find."""
    recs = [{"image_path": f"f/{k}.jpg", "caption": "c"} for k in range(4)] + [{"image_path": "f/0.jpg",
                                                                              "caption": "again"}]
    (tmp_path / "ram.json").write_text(json.dumps(recs))
    cfg = write_config(tmp_path / "c.yaml", "steps: {input: source.ram_json.v1}\nray: {enabled: false}\n"
                                            f"input: {{path: '{tmp_path}/ram.json', shard_rows: 2}}\n")
    with pytest.raises(RuntimeError, match=r"'f/0' in shard 0 \(.*ram.json, bytes \d+-\d+\) and shard 2 \("):
        main(["run", str(cfg), "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_alike_keys_and_file_names_go_through_the_clean_loop_each_under_its_own_pixels(tmp_path, capsys):
    """Two img2dataset outputs keyed 000000000-000000003 alike (and the same URLs), and a RAM json with
    1.png and 2.png in two folders, through clean_coco.yaml with tiny models: every exported image is
    the bytes its own source row held."""
    images = world_pngs(12)
    assert len({png for png, _ in images}) == 12
    img2dataset_output(tmp_path / "out_a", images[0:4])
    img2dataset_output(tmp_path / "out_b", images[4:8])
    want = {f"out_{o}/{k:09d}": images[4 * i + k][0] for i, o in enumerate("ab") for k in range(4)}
    recs = []
    for j, (folder, name) in enumerate((("VG_100K", "1"), ("other", "1"), ("VG_100K", "2"), ("other", "2"))):
        png, caption = images[8 + j]
        (tmp_path / "imgs" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / folder / f"{name}.png").write_bytes(png)
        recs.append({"image_path": f"{folder}/{name}.png", "caption": [caption]})
        want[f"ram/{folder}/{name}"] = png
    (tmp_path / "ram.json").write_text(json.dumps(recs))
    source = {"use": "source.multi.v1", "sources": [
        {"use": "source.img2dataset.v1", "name": "out_a", "path": f"{tmp_path}/out_a/*.tar"},
        {"use": "source.img2dataset.v1", "name": "out_b", "path": f"{tmp_path}/out_b/*.tar"},
        {"use": "source.ram_json.v1", "name": "ram", "path": str(tmp_path / "ram.json"),
         "image_dir": str(tmp_path / "imgs")}]}

    out = run_clean_coco(tmp_path, capsys, [f"input={json.dumps(source)}"])
    export = out / "export"
    rows = [r for part in sorted(export.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]
    assert sorted(r["image_id"] for r in rows) == sorted(want)  # all 12 through, none lost or doubled
    for r in rows:
        path = Path(r["image_path"]) if Path(r["image_path"]).is_absolute() else export / r["image_path"]
        assert path.read_bytes() == want[r["image_id"]], r["image_id"]
    listed = json.loads((export / "ram_train.json").read_text())
    assert sorted(e["image_path"] for e in listed) == sorted(r["image_path"] for r in rows)
