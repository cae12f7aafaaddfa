"""End-to-end runs of the clean workflow on a small scene world."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.store import StepDir
from tests.conftest import run_to_end, run_until_killed

REPO = Path(__file__).resolve().parent.parent
STEPS = ("input", "parse", "vocab", "label", "export")


def manifests(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / s / "_manifest.json").read_text()) for s in STEPS}


def test_run_skip_force_and_row_invariant(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    first = manifests(out)
    for m in first.values():
        assert m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    assert first["input"]["rows_out"] == 40 and first["parse"]["shards"] == 4
    assert "vs truth: P" in capsys.readouterr().out

    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert manifests(out) == first  # nothing re-ran

    label_before = StepDir(out / "label").read()
    (out / "label" / "part-00000.parquet").unlink()  # --force must rebuild it
    assert main(["run", str(cfg), "--out", str(out), "--force", "--only", "label", "export"]) == 0
    again = manifests(out)
    assert again["parse"] == first["parse"]  # not selected: untouched
    assert StepDir(out / "label").read().equals(label_before)


def test_run_config_with_its_own_steps_runs(tmp_path, capsys):
    # parse_only's chain up to the labels, given in the file itself: no export step
    cfg = tmp_path / "own.yaml"
    cfg.write_text("description: captions to labels\n"
                   "steps: {input: source.scene_world.v1, parse: parse.sng.v1, vocab: vocab.wordnet.v1, "
                   "label: label.v1}\n"
                   "seed: 3\nray: {enabled: false}\ninput: {images: 40, shard_rows: 10, size: 64}\n"
                   "vocab: {min_count: 1}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert f"steps of {cfg}" in capsys.readouterr().out
    m = {s: json.loads((out / s / "_manifest.json").read_text()) for s in STEPS[:4]}
    assert m["label"]["rows_out"] == 40 and m["label"]["shards"] == 4
    assert not (out / "export").exists()
    labels = StepDir(out / "label").read(["union_label_id"]).column("union_label_id").to_pylist()
    assert len(labels) == 40 and all(labels)  # every image got tags from its captions
    run = json.loads((out / "_run.json").read_text())
    assert [s["name"] for s in run["steps"]] == list(STEPS[:4]) and run["workflow"] is None
    assert run["description"] == "captions to labels"


def test_config_change_reruns_downstream_only(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    before = manifests(out)
    assert main(["run", str(cfg), "--out", str(out), "--set", "vocab.min_count=2"]) == 0
    after = manifests(out)
    assert after["parse"] == before["parse"]
    assert after["vocab"]["fingerprint"] != before["vocab"]["fingerprint"]
    assert after["label"]["fingerprint"] != before["label"]["fingerprint"]


def test_same_inputs_config_and_seed_give_identical_output(small_world_config, tmp_path):
    cfg = small_world_config()
    for name in ("a", "b"):
        assert main(["run", str(cfg), "--out", str(tmp_path / name)]) == 0
    for rel in ("export/part-00000.parquet", "export/part-00003.parquet", "vocab/tagset.parquet",
                "export/ram_train.json", "vocab/tag_list.txt", "parse/rejects/part-00001.parquet"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_export_is_readable_by_a_dataloader_without_this_package(small_world_config, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(small_world_config()), "--out", str(out)]) == 0
    code = f"""
import sys
sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]
import glob, io, torch, pyarrow.parquet as pq
from PIL import Image
import numpy as np
root = {str(out / 'export')!r}
rows = [r for f in sorted(glob.glob(root + '/part-*.parquet')) for r in pq.read_table(f).to_pylist()]
n = len(open(root + '/tag_list.txt').read().splitlines())
class D(torch.utils.data.Dataset):
    def __len__(self): return len(rows)
    def __getitem__(self, i):
        r = rows[i]
        img = torch.from_numpy(np.asarray(Image.open(root + '/' + r['image_path']).convert('RGB'))).permute(2, 0, 1)
        y = torch.zeros(n); y[r['union_label_id']] = 1
        return img, y
x, y = next(iter(torch.utils.data.DataLoader(D(), batch_size=8)))
assert 'pipeline' not in sys.modules and 'stages' not in sys.modules
print(tuple(x.shape), float(y.sum()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shape, positives = res.stdout.split(") ")
    assert shape == "(8, 3, 64, 64" and float(positives) > 8


def test_bad_rows_are_kept_in_rejects_through_a_run(tmp_path):
    import pyarrow as pa

    rows = tmp_path / "rows.parquet"
    pq.write_table(pa.table({
        "image_id": ["ok", "empty", "noimg", "mixed"],
        "image": ["ok.jpg", "e.jpg", None, "m.jpg"],
        "captions": [["A red car on the street."], ["", "  "], ["A dog."], ["A cat on a mat.", "<b>x</b> y"]],
    }), rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workflow: parse_only\nray: {{enabled: false}}\ninput: {{use: source.parquet.v1, path: {rows}}}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    m = manifests(out)
    assert (m["input"]["rows_in"], m["input"]["rows_out"], m["input"]["rows_rejected"]) == (4, 3, 1)
    assert StepDir(out / "input").rejects().column("code").to_pylist() == ["row_no_image"]
    assert (m["parse"]["rows_in"], m["parse"]["rows_out"], m["parse"]["rows_rejected"]) == (3, 2, 1)
    codes = sorted((r["image_id"], r["code"]) for r in StepDir(out / "parse").rejects().to_pylist())
    assert codes == [("empty", "caption_empty"), ("empty", "caption_whitespace"), ("empty", "row_no_captions"),
                     ("mixed", "caption_html")]
    assert m["parse"]["rejects_by_code"]["row_no_captions"] == 1
    exported = pq.read_table(out / "export" / "part-00000.parquet").to_pylist()
    assert [(r["image_id"], r["caption"]) for r in exported] == [("ok", ["A red car on the street."]),
                                                                 ("mixed", ["A cat on a mat."])]


@pytest.mark.ray
def test_ray_end_to_end_through_actor_pools(ray_local, small_world_config, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(small_world_config(ray=True)), "--out", str(out)]) == 0
    m = manifests(out)
    assert m["export"]["rows_out"] == 40 and m["export"]["json_rows"] == 40
    # parse pins its pool; label's is what this 2-CPU Ray offers, and its shards' stats say where they ran
    assert m["parse"]["pool"] == {"kind": "actors", "size": 1, "from": "resources.pool_size"}
    assert m["label"]["pool"] == {"kind": "actors", "size": 2, "from": "cluster: 2 CPU / 1 per worker"}
    (node, used), = ((n, w["shards"]) for n, w in m["label"]["workers"]["nodes"].items())
    assert used == m["label"]["shards"] == 4 and 1 <= m["label"]["workers"]["used"] <= 2
    assert {st["node_id"] for st in StepDir(out / "label").done_shards(m["label"]["fingerprint"]).values()} == {node}
    ids = StepDir(out / "label").read(["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_in_parse_then_resume_equals_uninterrupted_run(ray_local, small_world_config, tmp_path):
    cfg = small_world_config(images=120, shard_rows=10, ray=True)
    run_until_killed(cfg, tmp_path / "killed", "kill_after:parse:3")
    parse_dir = StepDir(tmp_path / "killed" / "parse")
    assert parse_dir.manifest() is None
    done_before = len(list((parse_dir.path / "_stats").glob("*.json")))
    assert 3 <= done_before < 12
    for run in ("killed", "clean"):
        run_to_end(cfg, tmp_path / run)
    resumed = json.loads((parse_dir.path / "_manifest.json").read_text())
    # shards committed before the kill are reused, not redone (a worker may have committed one more
    # after the driver died: commits are atomic, so that one is reused too)
    assert resumed["shards_resumed"] >= done_before and resumed["shards"] == 12
    for step in ("parse", "label", "export"):
        a = StepDir(tmp_path / "killed" / step).read()
        b = StepDir(tmp_path / "clean" / step).read()
        assert a.equals(b), step
        ids = a.column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) == 120
