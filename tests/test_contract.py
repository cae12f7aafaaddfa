import pytest

from common.rejects import REJECT_CODES
from pipeline.config import load_run_config
from pipeline.errors import ContractError
from pipeline.contract import check_contract


def test_step_reading_unwritten_column_fails_before_running(tmp_path, monkeypatch):
    import pipeline.config as config

    wf = tmp_path / "workflows.yaml"
    # label before parse: label reads `parsed`, which nobody has written yet
    wf.write_text("broken:\n  steps:\n    input: source.scene_world.v1\n    vocab: vocab.wordnet.v1\n"
                  "    label: label.v1\n")
    monkeypatch.setattr(config, "WORKFLOWS_FILE", wf)
    monkeypatch.setattr(config.load_workflows, "__defaults__", (wf,))
    c = tmp_path / "c.yaml"
    c.write_text("workflow: broken\n")
    cfg = load_run_config(c)
    with pytest.raises(ContractError) as ei:
        check_contract(cfg)
    msg = str(ei.value)
    assert "vocab" in msg and "'parsed'" in msg


def test_step_needing_missing_artifact_fails(tmp_path, monkeypatch):
    import pipeline.config as config

    wf = tmp_path / "workflows.yaml"
    wf.write_text("broken:\n  steps:\n    input: source.scene_world.v1\n    parse: parse.sng.v1\n"
                  "    label: label.v1\n")
    monkeypatch.setattr(config.load_workflows, "__defaults__", (wf,))
    c = tmp_path / "c.yaml"
    c.write_text("workflow: broken\n")
    with pytest.raises(ContractError, match="tagset"):
        check_contract(load_run_config(c))


def test_own_steps_reading_an_unwritten_column_fail_naming_file_step_and_column(tmp_path, capsys):
    from pipeline.cli import main

    c = tmp_path / "c.yaml"
    c.write_text("steps:\n  input: source.scene_world.v1\n  vocab: vocab.wordnet.v1\n  label: label.v1\n")
    with pytest.raises(ContractError) as ei:
        check_contract(load_run_config(c))
    msg = str(ei.value)
    assert str(c) in msg and "step 'vocab'" in msg and "'parsed'" in msg
    out = tmp_path / "run"
    assert main(["run", str(c), "--out", str(out)]) == 2
    assert not out.exists()  # checked before anything is written
    assert "step 'vocab'" in capsys.readouterr().err


def test_own_steps_need_a_source_first(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("steps: {parse: parse.sng.v1}\n")
    with pytest.raises(ContractError, match="first step, so it must be a source"):
        check_contract(load_run_config(c))


def test_reject_codes_are_pinned():
    assert sorted(REJECT_CODES) == sorted([
        "caption_null", "caption_not_string", "caption_empty", "caption_whitespace", "caption_too_long",
        "caption_control_chars", "caption_html", "caption_not_english", "row_no_image", "row_no_captions",
        "row_duplicate_id", "row_bad_record", "row_image_url_only", "row_no_labels", "image_decode_failed",
        "image_truncated", "image_too_small", "image_too_large", "input_missing", "input_unreadable",
    ])
