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
    """A manifest written by other code (simulated: its record of stages/text/label.py differs) makes label re-run,
    and plan names the file, not just 'code changed'."""
    cfg, out = small_world_config(), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    mpath = out / "label" / "_manifest.json"
    m = json.loads(mpath.read_text())
    assert "stages/text/label.py" in m["fingerprinted"]["code_files"] and m["fingerprinted"]["upstream"]
    m["fingerprint"], m["code_version"] = "0" * 20, "0.1.0+000000000000"
    m["fingerprinted"]["code_files"]["stages/text/label.py"] = "0" * 16
    mpath.write_text(json.dumps(m))
    by = {s["step"]: s for s in plan_json(capsys, str(cfg), "--out", str(out))["steps"]}
    assert by["label"]["action"] == "run" and by["label"]["reasons"] == ["code stages/text/label.py changed"]
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


TRAINING = """
description: a base tagger, a retrain that repeats its recipe, and one that sets its own epochs
steps: {input: source.scene_world.v1, parse: parse.sng.v1, vocab: vocab.wordnet.v1, label: label.v1,
        train: train.ram.v1, retrain: retrain.ram.v1, again: retrain.ram.v1}
seed: 3
ray: {enabled: false, progress: false}
input: {images: 40, shard_rows: 10, size: 64}
parse: {resources: {batch_size: 64}}
vocab: {min_count: 1}
train: {model: cnn_tagger_tiny, model_args: {image_size: 64}, text_encoder: none, epochs: 3, batch_size: 4,
        warmup_steps: 1, cache_images: true}
again: {start: base, epochs: 2}
"""
EPOCHS = {"train": (3, "train.epochs"), "retrain": (3, "train's recipe: train.epochs"), "again": (2, "again.epochs")}


def trained_epochs(step_dir: Path) -> int:
    return len([h for h in json.loads((step_dir / "history.json").read_text()) if h["epoch"] >= 0])


def test_the_epochs_a_run_trains_are_resolved_as_the_run_resolves_them(tmp_path):
    """train's own epochs; the main job's retrain sets its own; a retrain that does not inherits its base's
    (the tagger it starts from: train, or the retrain before it); a step that sets none, its stage default."""
    from pipeline.config import load_run_config
    from pipeline.forecast import run_epochs
    from tests.conftest import REPO

    import yaml

    written = yaml.safe_load((REPO / "stages" / "clean.yaml").read_text())  # what the main job sets itself
    main_job = run_epochs(load_run_config(REPO / "stages" / "clean.yaml"))
    assert {k: (v["epochs"], v["from"]) for k, v in main_job.items()} == {
        "train": (written["train"]["epochs"], "train.epochs"),
        "retrain": (written["retrain"]["epochs"], "retrain.epochs")}
    assert main_job["train"]["cache_images"] is True
    unset = load_run_config(write_config(tmp_path / "t.yaml", TRAINING.replace(", epochs: 2", "")),
                            ["train.epochs=5"])
    assert {k: (v["epochs"], v["from"]) for k, v in run_epochs(unset).items()} == {
        "train": (5, "train.epochs"), "retrain": (5, "train's recipe: train.epochs"),
        "again": (5, "retrain's recipe: train's recipe: train.epochs")}
    default = load_run_config(write_config(tmp_path / "d.yaml", TRAINING.replace(" epochs: 3,", "")))
    assert run_epochs(default)["retrain"] == {"epochs": 8, "from": "train's recipe: the default of train.ram.v1",
                                              "cache_images": True, "warmup_steps": 1}


def test_the_sample_config_trains_each_step_its_sample_epochs_and_no_more_than_the_run(tmp_path):
    """Each training step's sample epochs are its own key (a retrain that inherits its epochs would inherit
    the sample's base's otherwise), at most the run's; nothing else of the config changes."""
    from pipeline.config import load_run_config
    from pipeline.forecast import sample_config

    cfg = load_run_config(write_config(tmp_path / "t.yaml", TRAINING))
    for asked, want in ((1, {"train": 1, "retrain": 1, "again": 1}), (3, {"train": 3, "retrain": 3, "again": 2})):
        sample = sample_config(cfg, tmp_path / "scratch", asked)
        assert sample.out == str(tmp_path / "scratch")
        assert {s.name: s.config.epochs for s in sample.steps if s.name in want} == want
        assert all("epochs" in s.config.model_fields_set for s in sample.steps if s.name in want)
        for s, was in zip(sample.steps, cfg.steps):
            assert s.config.model_dump(exclude={"epochs", "warmup_steps"}) == \
                was.config.model_dump(exclude={"epochs", "warmup_steps"})
            assert s.resources == was.resources


def test_the_sample_tagger_warms_up_for_its_share_of_the_run_schedule(tmp_path):
    """The main job's base warms up 50 of its ~2,700 optimizer steps; a one-epoch sample on one of its 8
    shards keeps that share (at least one step), so its tagger leaves warmup and learns something."""
    from pipeline.config import load_run_config
    from pipeline.forecast import run_epochs, sample_config
    from tests.conftest import REPO

    cfg = load_run_config(REPO / "stages" / "clean.yaml")
    run = run_epochs(cfg)
    sample = {s.name: s.config for s in sample_config(cfg, tmp_path / "scratch", 1, rows_share=1 / 8).steps}
    for name in ("train", "retrain"):
        want = max(1, round(run[name]["warmup_steps"] / run[name]["epochs"] / 8))
        assert sample[name].warmup_steps == want < run[name]["warmup_steps"]
        assert "warmup_steps" in sample[name].model_fields_set  # a retrain's own key, not its base's
    whole = {s.name: s.config for s in sample_config(cfg, tmp_path / "scratch", 100).steps}
    assert whole["train"].warmup_steps == run["train"]["warmup_steps"]  # all epochs, all rows: as the run


def test_the_steps_after_a_training_step_are_the_ones_that_work_on_its_tagger(tmp_path):
    """In the main job every step from evidence on reads what the base tagger made (its candidates and
    regions), directly or through the steps between; the steps before train do not."""
    from pipeline.config import load_run_config
    from pipeline.forecast import followers
    from pipeline.plan import plan_run
    from tests.conftest import REPO

    steps = plan_run(load_run_config(REPO / "stages" / "clean.yaml"), tmp_path / "run")["steps"]
    assert {s["step"]: s["upstream"] for s in steps}["evidence"] == ["label", "train", "vocab"]
    assert followers(steps, {"train", "retrain"}) == {
        "evidence": "train", "cluster": "train", "decide": "train", "report": "train", "export": "train"}


def test_plan_sample_epochs_must_be_positive(small_world_config, tmp_path, capsys):
    cfg = small_world_config()
    assert main(["plan", str(cfg), "--out", str(tmp_path / "run"), "--sample", "10", "--sample-epochs", "0"]) == 2
    assert f"{cfg}: --sample-epochs: expected a positive number of epochs, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_sample_trains_one_epoch_and_forecasts_each_training_step_for_the_run_epochs(tmp_path, capsys):
    """A run trains each step the epochs ``run_epochs`` says (its own, or its base's recipe); the sample
    trains each for one epoch (a retrain that inherits too), and each is forecast as its fixed part + the
    sample's time per epoch x the run's epochs x (whole input / sample rows), saying so."""
    from pipeline.config import load_run_config
    from pipeline.forecast import format_forecast, sample_forecast
    from pipeline.plan import plan_run

    cfg_file, out = write_config(tmp_path / "training.yaml", TRAINING), tmp_path / "run"
    assert main(["run", str(cfg_file), "--out", str(out)]) == 0
    assert {s: trained_epochs(out / s) for s in EPOCHS} == {s: e for s, (e, _) in EPOCHS.items()}

    cfg = load_run_config(cfg_file)
    fresh = tmp_path / "fresh-run"
    fc = sample_forecast(cfg, 20, plan_run(cfg, fresh), keep=tmp_path / "sample")
    assert not fresh.exists()
    assert {s: trained_epochs(tmp_path / "sample" / s) for s in EPOCHS} == {s: 1 for s in EPOCHS}
    assert fc["sample"]["epochs"] == {s: 1 for s in EPOCHS}
    assert fc["sample"]["rows"] == 20 and fc["input"]["rows"] == 40
    by = {s["step"]: s for s in fc["steps"]}
    for name, (epochs, src) in EPOCHS.items():
        s = by[name]
        assert (s["epochs"], s["epochs_from"], s["sample_epochs"]) == (epochs, src, 1), s
        assert s["seconds"] == pytest.approx(s["fixed_seconds"] + s["sample_epoch_seconds"] * epochs * 40 / 20)
        assert f"the run trains {epochs} epoch(s) ({src})" in s["assumes"], s["assumes"]
    assert "cache_images: later epochs read the cache" in by["train"]["assumes"]
    text = format_forecast(fc)
    assert "it trained train 1 epoch(s), retrain 1 epoch(s), again 1 epoch(s)" in text
    assert "again: fixed + time per epoch x epochs x training images" in text
