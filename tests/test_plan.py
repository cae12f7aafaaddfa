"""``python -m pipeline plan``: run or skip and why, workers, and a forecast from a sample run."""
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import write_config
from tests.test_clean_loop import LOOP

AFTER_DECIDE = ["decide", "retrain", "report", "export"]


def plan_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run directory with its size and mtime: plan must leave them all as they are."""
    return {str(f.relative_to(run)): (f.stat().st_size, f.stat().st_mtime_ns) for f in run.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_plan_of_a_finished_run_skips_all_and_a_threshold_change_names_decide_and_what_follows(tmp_path, capsys):
    cfg, out = write_config(tmp_path / "loop.yaml", LOOP), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    before = snapshot(out)

    plan = plan_json(capsys, str(cfg), "--out", str(out))
    steps = [s["step"] for s in plan["steps"]]
    assert steps == ["input", "parse", "vocab", "label", "train", "evidence", "cluster", "decide", "retrain",
                     "report", "export"]
    assert {s["action"] for s in plan["steps"]} == {"skip"}, [(s["step"], s["reasons"]) for s in plan["steps"]]
    assert plan["ray"]["where"].startswith("no Ray (ray.enabled: false)")
    assert main(["plan", str(cfg), "--out", str(out)]) == 0
    assert "every step would be skipped" in capsys.readouterr().out

    plan = plan_json(capsys, str(cfg), "--out", str(out), "--set", "decide.add_threshold=0.8")
    by = {s["step"]: s for s in plan["steps"]}
    assert [s for s in steps if by[s]["action"] != "skip"] == AFTER_DECIDE
    assert by["decide"]["reasons"] == ["config decide.add_threshold: 0.4 -> 0.8"]
    for later in AFTER_DECIDE[1:]:  # each names the upstream step that re-runs and the key behind it
        text = " ".join(by[later]["reasons"])
        assert "upstream" in text and "decide" in text and "decide.add_threshold 0.4 -> 0.8" in text, text
    assert by["retrain"]["workers"].startswith("on the driver")  # its backend is local here
    assert main(["plan", str(cfg), "--out", str(out), "--set", "decide.add_threshold=0.8"]) == 0
    text = capsys.readouterr().out
    assert "4 of 11 step(s) would run: decide, retrain, report, export" in text
    assert "decide.add_threshold: 0.4 -> 0.8" in text
    assert snapshot(out) == before  # plan wrote nothing into the run


def test_plan_names_the_code_file_a_manifest_was_written_with(small_world_config, tmp_path, capsys):
    """A manifest written by other code (simulated: its record of stages/label.py differs) makes label re-run,
    and plan names the file, not just 'code changed'."""
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    mpath = out / "label" / "_manifest.json"
    m = json.loads(mpath.read_text())
    assert "stages/label.py" in m["fingerprinted"]["code_files"] and m["fingerprinted"]["upstream"]
    m["fingerprint"], m["code_version"] = "0" * 20, "0.1.0+000000000000"
    m["fingerprinted"]["code_files"]["stages/label.py"] = "0" * 16
    mpath.write_text(json.dumps(m))
    by = {s["step"]: s for s in plan_json(capsys, str(cfg), "--out", str(out))["steps"]}
    assert by["label"]["action"] == "run" and by["label"]["reasons"] == ["code stages/label.py changed"]
    assert [by[s]["action"] for s in ("input", "parse", "vocab", "export")] == ["skip"] * 4


def test_plan_sample_forecasts_every_step_for_the_whole_input(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(images=40, shard_rows=10), tmp_path / "run"
    plan = plan_json(capsys, str(cfg), "--out", str(out), "--sample", "20")
    assert not out.exists()  # neither the plan nor its sample touch the run directory
    assert [s["action"] for s in plan["steps"]] == ["run"] * 5
    assert all(s["reasons"] == ["no output yet"] and s["shards"] == 4 for s in plan["steps"])
    fc = plan["forecast"]
    assert fc["sample"]["rows"] == 20 and fc["sample"]["shards"] == 2 and fc["sample"]["seconds"] > 0
    assert fc["input"] == {"shards": 4, "rows": 40, "rows_from": "4 planned shard(s) x 10 rows per shard in the sample"}
    assert [s["step"] for s in fc["steps"]] == ["input", "parse", "vocab", "label", "export"]
    for s in fc["steps"]:
        assert s["sample_rows"] == 20 and s["rows"] == 40, s
        assert s["seconds"] >= s["fixed_seconds"] >= 0 and s["bytes"] > 0 and s["worker_peak_rss_mb"] > 0
        assert "linear in rows" in s["assumes"], s
    by = {s["step"]: s for s in fc["steps"]}
    assert "the merge holds O(names) or O(tags)" in by["vocab"]["assumes"]  # a reduce: its merge does not scale
    assert "output fixed" in by["vocab"]["assumes"] and "output linear" in by["parse"]["assumes"]
    assert fc["total_seconds"] == pytest.approx(sum(s["seconds"] for s in fc["steps"]))
    assert main(["plan", str(cfg), "--out", str(out), "--sample", "10"]) == 0
    text = capsys.readouterr().out
    assert "forecast for the whole input: 40 rows" in text and "what each forecast assumes:" in text


def test_plan_sample_of_no_rows_is_a_config_error(small_world_config, tmp_path, capsys):
    assert main(["plan", str(small_world_config()), "--out", str(tmp_path / "run"), "--sample", "0"]) == 2
    assert "--sample" in capsys.readouterr().err
