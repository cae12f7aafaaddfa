"""``python -m pipeline status``: a run's steps read back from its directory, finished, killed or failed."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
STEPS = ["input", "parse", "vocab", "label", "export"]


def status_json(out: Path, capsys) -> dict:
    assert main(["status", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_of_a_finished_run_says_every_step_done(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    capsys.readouterr()
    st = status_json(out, capsys)
    assert st["run"]["workflow"] == "parse_only" and st["run"]["config"] == str(cfg.resolve())
    assert [s["step"] for s in st["steps"]] == STEPS  # the run's order, not the directory's
    for s in st["steps"]:
        assert (s["status"], s["shards_done"], s["shards_total"]) == ("done", 4, 4), s
        assert s["rows_in"] == s["rows_out"] + s["rows_rejected"]
    assert st["steps"][0]["rows_out"] == 40 and st["error"] is None
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    table = text[text.index(next(line for line in text if line.startswith("step"))) + 1:]
    assert [line.split()[0] for line in table] == STEPS and all(" done " in line for line in table)


def test_status_of_a_run_killed_in_a_step_shows_it_partial(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(), tmp_path / "run"
    # ray disabled: the shards run in the driver, so none is committed after the kill and the count is exact
    killed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--out", str(out)], cwd=REPO,
                            env=dict(os.environ, PIPELINE_FAULT="kill_after:parse:2"), capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pipeline", "status", str(out), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    steps = {s["step"]: s for s in json.loads(res.stdout)["steps"]}
    assert (steps["input"]["status"], steps["input"]["shards_done"], steps["input"]["shards_total"]) == ("done", 4, 4)
    parse = steps["parse"]
    assert (parse["status"], parse["shards_done"], parse["shards_total"]) == ("partial", 2, 4)
    assert parse["rows_in"] == 20 == parse["rows_out"] + parse["rows_rejected"]
    assert [steps[s]["status"] for s in STEPS[2:]] == ["pending"] * 3
    text = subprocess.run([sys.executable, "-m", "pipeline", "status", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
    assert next(line for line in text.splitlines() if line.startswith("parse ")).split()[2:4] == ["partial", "2/4"]

    assert main(["run", str(cfg), "--out", str(out)]) == 0  # resumes; the plan file does not get in its way
    capsys.readouterr()
    assert [s["status"] for s in status_json(out, capsys)["steps"]] == ["done"] * 5


def test_a_failed_step_is_recorded_and_a_later_good_run_clears_it(tmp_path, capsys):
    base = "seed: 1\nray: {enabled: false}\ninput: {images: 20, shard_rows: 10, size: 64}\n"
    only_input = tmp_path / "a.yaml"
    only_input.write_text("steps: {input: source.scene_world.v1}\n" + base)
    with_parse = tmp_path / "b.yaml"
    with_parse.write_text("steps: {input: source.scene_world.v1, parse: parse.sng.v1}\n" + base)
    out = tmp_path / "run"
    assert main(["run", str(only_input), "--out", str(out)]) == 0
    (out / "input" / "part-00001.parquet").unlink()  # a shard lost from storage: parse must refuse to start
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[1\] of 'input' are missing"):
        main(["run", str(with_parse), "--out", str(out)])
    capsys.readouterr()
    st = status_json(out, capsys)
    err = st["error"]
    assert (err["step"], err["use"]) == ("parse", "parse.sng.v1") and err["error"].startswith("RuntimeError: ")
    assert "check_input" in err["traceback"] and err["config"] == str(with_parse.resolve())
    assert [(s["step"], s["status"]) for s in st["steps"]] == [("input", "done"), ("parse", "pending")]
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "last error, step 'parse' (parse.sng.v1)" in text and str(out / "_error.json") in text

    renamed = tmp_path / "c.yaml"  # a later run, of another chain, into the same directory
    renamed.write_text("steps: {world: source.scene_world.v1}\n" + base.replace("input:", "world:"))
    assert main(["run", str(renamed), "--out", str(out)]) == 0
    capsys.readouterr()
    assert not (out / "_error.json").exists()
    st = status_json(out, capsys)
    assert st["error"] is None and st["run"]["workflow"] is None
    # input is no step of this run, but its directory is still there: shown after the run's steps, marked;
    # parse's holds nothing a step leaves, so it gets no row
    assert [(s["step"], s["status"], s.get("in_run", True)) for s in st["steps"]] == [
        ("world", "done", True), ("input", "done", False)]
    assert main(["status", str(out)]) == 0
    assert "input (not in this run's steps)" in capsys.readouterr().out


def test_status_of_no_run_directory_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
