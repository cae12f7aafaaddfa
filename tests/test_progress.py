"""Progress lines a person can read, and ``<run>/run.log``."""
import io
import re

import pytest

from pipeline.cli import main
from pipeline.progress import RunLog, StepProgress

PROGRESS = re.compile(r"\[parse\] shards (\d+)/(\d+) \(\d+%\): ([\d,]+) rows, [\d,]+ rows/s, elapsed \d+:\d\d:\d\d")


class Ticks:
    """A clock that moves one second per reading: rates and ETAs are defined without waiting."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("total", [1, 4, 10, 40, 1000])
def test_plain_lines_come_at_each_tenth_of_the_shards_and_at_the_end(total, tmp_path):
    out, log = io.StringIO(), RunLog(tmp_path / "run.log")
    p = StepProgress("parse", total, "shard", stream=out, log=log, clock_fn=Ticks())
    for _ in range(total):
        p.update(rows=25)
    p.close()
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= min(total, 11), lines
    got = [PROGRESS.search(line) for line in lines]
    assert all(got), lines
    done = [int(m.group(1)) for m in got]
    assert done == sorted(set(done)) and done[-1] == total  # rising, and the last says total/total
    assert got[-1].group(3) == f"{25 * total:,}" and "ETA" not in lines[-1]
    assert all("ETA" in line for line in lines[:-1])
    # the same lines go to the run log (time-stamped), and nothing else does
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in logged] == [line.strip() for line in lines]


def test_forty_shards_give_ten_lines_the_last_forty_of_forty():
    out = io.StringIO()
    p = StepProgress("parse", 40, "shard", stream=out, clock_fn=Ticks())
    for _ in range(40):
        p.update(rows=10)
    lines = out.getvalue().splitlines()
    assert len(lines) <= 12 and "shards 40/40 (100%)" in lines[-1]
    assert "shards 4/40 (10%)" in lines[0] and "ETA 0:00:" in lines[0]


def test_calls_without_rows_report_counts_and_time_only():
    out = io.StringIO()
    p = StepProgress("cluster", 3, "sample_shard call", stream=out, clock_fn=Ticks())
    for _ in range(3):
        p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("  [cluster] sample_shard calls 3/3 (100%): elapsed ")
    assert "rows" not in out.getvalue()


def test_a_live_bar_writes_no_plain_lines_but_the_log_gets_them(tmp_path):
    out, log = io.StringIO(), RunLog(tmp_path / "run.log")
    p = StepProgress("parse", 20, "shard", stream=out, live=True, log=log, clock_fn=Ticks())
    for _ in range(20):
        p.update(rows=5)
    p.close()
    assert "20/20" in out.getvalue() and not PROGRESS.search(out.getvalue())  # the bar's own text
    assert len((tmp_path / "run.log").read_text().splitlines()) == 10


def test_a_run_leaves_a_log_with_each_step_and_a_second_run_appends(small_world_config, tmp_path, capsys):
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[parse] shards 4/4 (100%)" in err and "[input] shards 4/4 (100%)" in err
    log = (out / "run.log").read_text().splitlines()
    assert len([line for line in log if "=== run " in line]) == 1
    assert f"=== run {cfg.resolve()} (workflow parse_only): steps input, parse, vocab, label, export" in log[0]
    for step in ("input", "parse", "vocab", "label", "export"):
        assert any(f"[{step}] start (" in line for line in log), step
        result = next(line for line in log if f"[{step}] ran: rows in " in line)
        assert re.search(r"rows in \d+, out \d+, rejected \d+, \d+\.\d\ds", result)
    assert any("[parse] shards 4/4 (100%)" in line for line in log) and log[-1].endswith("run done: 5 step(s)")

    assert main(["run", str(cfg), "--out", str(out)]) == 0  # all skipped: a second header, skipped results
    log = (out / "run.log").read_text().splitlines()
    assert len([line for line in log if "=== run " in line]) == 2
    assert any("[parse] skipped: rows in 40" in line for line in log)

    assert main(["status", str(out)]) == 0
    assert f"log {out.resolve() / 'run.log'}" in capsys.readouterr().out


def test_a_failed_run_logs_the_error_and_points_at_error_json(tmp_path):
    base = "seed: 1\nray: {enabled: false}\ninput: {images: 20, shard_rows: 10, size: 64}\n"
    only_input, with_parse = tmp_path / "a.yaml", tmp_path / "b.yaml"
    only_input.write_text("steps: {input: source.scene_world.v1}\n" + base)
    with_parse.write_text("steps: {input: source.scene_world.v1, parse: parse.sng.v1}\n" + base)
    out = tmp_path / "run"
    assert main(["run", str(only_input), "--out", str(out)]) == 0
    (out / "input" / "part-00001.parquet").unlink()
    with pytest.raises(RuntimeError):
        main(["run", str(with_parse), "--out", str(out)])
    last = (out / "run.log").read_text().splitlines()[-1]
    assert "FAILED in step 'parse': RuntimeError: " in last and str(out.resolve() / "_error.json") in last


def test_the_summary_names_a_ray_train_job_not_the_driver():
    """A step that trained as a Ray Train job says so in the run summary; local training says driver."""
    from pipeline.report import workers_used

    assert workers_used({"ray_train_workers": 2}) == "Ray Train x2"
    assert workers_used({}) == "driver"
    assert workers_used({"workers": {"used": 3, "nodes": {"a": {}, "b": {}}}}) == "3 on 2 nodes"
