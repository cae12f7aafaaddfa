"""The paper's fourth step in the clean loop: retrain on decide's cleaned labels, judged against the base;
rounds; the label sets the ablation trains on. A small scene world, Ray off, a tiny RAM."""
import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.view import read_step
from stages.training.holdout import held_out
from tests.conftest import run_until_killed, write_config
from tests.test_clean_loop import LOOP

pytestmark = pytest.mark.slow


def _digest(run, step: str = "decide") -> tuple[int, str]:
    """What split_rows records for the training rows of ``step``'s labels (not held out, by hash)."""
    d, n = hashlib.sha1(), 0
    for r in read_step(run / step, ["image_id", "union_label_id"]).to_pylist():
        if not held_out(r["image_id"], 0.1):
            n += len(r["union_label_id"])
            d.update(f"{r['image_id']}:{sorted(r['union_label_id'])}\n".encode())
    return n, d.hexdigest()


def _manifest(run, step: str) -> dict:
    return json.loads((run / step / "_manifest.json").read_text())


def _check_label_sets(out) -> None:
    """retrain.labels: generated = parse + what the rule adds; paper = the paper rule's; truth = the world's;
    none of them carries decide's unknowns (uncertain_label_id)."""
    from pipeline.view import step_view
    from stages.training.retrain import LabelledRows
    from stages.world.score import names_for_ids
    from tagset.tagset import TagSet

    view = step_view(out / "decide")
    rows = read_step(out / "decide", ["image_id", "union_label_id", "stage_labels"]).to_pylist()
    truth = {r["image_id"]: r for r in pq.read_table(out / "input" / "truth").to_pylist()}
    names = names_for_ids(TagSet.load(out / "vocab"))
    got = {}
    for labels in ("generated", "paper", "parse", "truth"):
        src = LabelledRows(view, labels, str(out / "input"), names)
        tables = [t for t, _ in src.iter_tables_with_base(["image_id", "union_label_id", "uncertain_label_id"])]
        assert all("uncertain_label_id" not in t.column_names for t in tables)  # decide's unknowns are its own
        got[labels] = {r["image_id"]: r["union_label_id"] for t in tables for r in t.to_pylist()}
    for r in rows:
        i, s = r["image_id"], r["stage_labels"]
        assert got["generated"][i] == sorted(set(s["parse"]) | set(r["union_label_id"]))
        assert got["paper"][i] == sorted(s["paper"]) and got["parse"][i] == sorted(s["parse"])
        t = truth[i]
        world = {o["cls"] for o in t["objects"]} | {t["scene"]} | {o["colour"] for o in t["objects"]}
        assert got["truth"][i] == sorted(k for k, n in names.items() if n & world)
    with pytest.raises(ValueError, match="truth"):
        LabelledRows(view, "truth")


def test_retrain_trains_on_the_cleaned_labels_and_reports_what_the_engine_bought(tmp_path):
    loop = LOOP.replace("decide: {add_unclaimed: 0.3}", "decide: {add_unclaimed: 0.3, uncertain_score: 0.1}")
    assert loop != LOOP
    cfg, out = write_config(tmp_path / "loop.yaml", loop), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    rows = read_step(out / "decide", ["union_label_id", "parse_label_id", "uncertain_label_id"]).to_pylist()
    assert any(r["uncertain_label_id"] for r in rows)  # the tagger saw tags the rule left out
    for r in rows:  # unknown: neither a label nor a tag the captions named
        named = {t for cap in r["parse_label_id"] for t in cap}
        assert not set(r["uncertain_label_id"]) & (set(r["union_label_id"]) | named)
    base, retrain = _manifest(out, "train"), _manifest(out, "retrain")
    assert (retrain["train_labels"], retrain["train_labels_sha1"]) == _digest(out, "decide")
    assert (base["train_labels"], base["train_labels_sha1"]) == _digest(out, "label")  # the parse labels
    recipe = json.loads((out / "train" / "recipe.json").read_text())
    assert json.loads((out / "retrain" / "recipe.json").read_text()) == {**recipe, "start": "scratch",
                                                                         "labels": "cleaned"}
    o = json.loads((out / "report.json").read_text())["model_outcome"]
    assert o["judge"] == "truth" and o["eval_images"] == retrain["val_images"] > 0
    assert o["gain_points"] == pytest.approx(100 * (o["retrained_truth_mAP"] - o["base_truth_mAP"]), abs=0.011)
    assert o["base_truth_mAP"] == base["val_truth_mAP_after"]  # the base, judged on the same images
    for who in ("base", "retrained"):
        assert set(o[who]) >= {"mAP", "precision", "recall", "f1", "by_kind", "by_frequency"}
        assert set(o[who]["by_frequency"]) == {"head", "middle", "tail"}
    assert "## What the engine bought" in (out / "report.md").read_text()
    _check_label_sets(out)

    # one changed decision rule: decide, the retrain (on the new labels), report and export re-run
    assert main(["run", str(cfg), "--out", str(out), "--set", "decide.rule=paper"]) == 0
    again = _manifest(out, "retrain")
    assert again["fingerprint"] != retrain["fingerprint"]
    assert (again["train_labels"], again["train_labels_sha1"]) == _digest(out, "decide")
    assert again["train_labels_sha1"] != retrain["train_labels_sha1"]
    assert _manifest(out, "train")["fingerprint"] == base["fingerprint"]  # the base did not move


def _rounds(gain: int) -> str:
    return LOOP + f"rounds: {{max: 2, min_f1_gain_points: {gain}}}\n"


def test_rounds_stop_by_the_rule_and_resume_after_a_kill_between_rounds(tmp_path):
    out = tmp_path / "run"
    stop = write_config(tmp_path / "stop.yaml", _rounds(1000))  # no round gains 1000 points
    assert main(["run", str(stop), "--out", str(out)]) == 0
    assert not (out / "evidence_r2").exists()
    from pipeline.progress import LOG_FILE

    said = [line for line in (out / LOG_FILE).read_text().splitlines() if "rounds: round 1 gained" in line]
    assert len(said) == 1 and "no round 2" in said[0]  # the run's log says why the rounds stopped
    assert _manifest(out, "export")["input"]["rows_from"] == "decide"
    assert len(json.loads((out / "report.json").read_text())["rounds"]) == 1
    fresh = tmp_path / "fresh"  # round 1 as it is before the kill: the undisturbed run below starts there
    shutil.copytree(out, fresh)

    go = write_config(tmp_path / "go.yaml", _rounds(-1000))
    run_until_killed(go, out, "kill_after:evidence_r2:1")  # round 1 done, round 2 half way
    assert (out / "evidence_r2").exists() and not (out / "evidence_r2" / "_manifest.json").exists()
    assert main(["run", str(go), "--out", str(out)]) == 0
    m = {s: _manifest(out, s) for s in ("evidence_r2", "retrain_r2", "report_r2", "export")}
    assert m["export"]["input"]["rows_from"] == "decide_r2"
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["model_outcome"]["base_truth_mAP"] == _manifest(out, "train")["val_truth_mAP_after"]
    # round 2 re-judged the parse labels (label's rows, not decide's), with round 1's retrained tagger as its base
    assert m["evidence_r2"]["input"]["rows_from"] == "label"
    assert m["evidence_r2"]["view"]["owners"]["union_label_id"] == "label"
    scores = [read_step(out / s, ["image_id", "tag_scores"]).column("tag_scores") for s in ("evidence", "evidence_r2")]
    assert not scores[0].equals(scores[1])

    # the killed and resumed run equals one whose round 2 ran undisturbed (from the same round 1)
    assert main(["run", str(go), "--out", str(fresh)]) == 0
    assert json.loads((fresh / "report.json").read_text())["rounds"] == report["rounds"]
    assert read_step(fresh / "export").equals(read_step(out / "export"))
