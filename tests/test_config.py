from pathlib import Path

import pytest

from pipeline import registry
from pipeline.cli import main
from pipeline.config import load_run_config
from pipeline.errors import ConfigError
from pipeline.contract import check_contract

REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, fragment", [
    ("workflow: parse_only\nparse: {max_wordz: 3}\n", "parse.max_wordz", "unknown key"),
    ("workflow: parse_only\nparse: {max_words: lots}\n", "parse.max_words", "valid integer"),
    ("workflow: parse_only\nparse: {use: parse.nope.v9}\n", "parse.use", "unknown stage"),
    ("workflow: nope\n", "workflow", "expected one of"),
    ("workflow: parse_only\nbogus: 1\n", "bogus", "unknown key"),
    ("workflow: parse_only\nparse: {resources: {pool_size: 0}}\n", "parse.resources.pool_size", "greater than or equal"),
    ("workflow: parse_only\nparse: {resources: {pool_size: 2, max_pool_size: 4}}\n", "parse.resources",
     "expected one or the other, not both"),
    ("workflow: parse_only\nparse: {resources: {min_pool_size: 4, max_pool_size: 2}}\n", "parse.resources",
     "expected min_pool_size <= max_pool_size, got 4 > 2"),
    ("workflow: parse_only\nseed: abc\n", "seed", "expected an integer"),
    ("workflow: parse_only\nray: {adress: auto}\n", "ray.adress", "unknown key"),
    # a run config's own chain (steps:) is checked as workflows.yaml is
    ("workflow: parse_only\nsteps: {input: source.scene_world.v1}\n", "steps", "not both"),
    ("name: x\n", "workflow", "or give the chain itself as 'steps:'"),
    ("steps: [input, parse]\n", "steps", "expected a mapping step name -> registered stage name"),
    ("steps: {input: source.scene_world.v1, parse: parse.nope.v9}\n", "steps.parse", "unknown stage 'parse.nope.v9'"),
    ("steps: {input: source.scene_world.v1, seed: parse.sng.v1}\n", "steps.seed", "top-level key"),
    ("steps: {input: source.scene_world.v1, _tmp: parse.sng.v1}\n", "steps._tmp", "directory of the run"),
    ("steps: {input: source.scene_world.v1}\nparse: {}\n", "parse", "unknown key for this file's steps"),
    ("steps: {input: source.scene_world.v1, parse: parse.sng.v1}\nparse: {max_wordz: 3}\n", "parse.max_wordz",
     "unknown key"),
    ("steps: {input: source.scene_world.v1}\ndescription: [a, b]\n", "description", "a line of text"),
])
def test_bad_config_names_file_key_and_expectation(tmp_path, text, key, fragment):
    path = _cfg(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_run_config(path)
    assert ei.value.key == key
    assert fragment in ei.value.message
    assert str(path) in str(ei.value)


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    path = _cfg(tmp_path, "workflow: parse_only\nparse: {max_wordz: 3}\n")
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "parse.max_wordz" in err and str(path) in err


def test_set_overrides_by_dotted_path(tmp_path):
    path = _cfg(tmp_path, "workflow: parse_only\ninput: {images: 10}\n")
    cfg = load_run_config(path, ["input.images=25", "parse.max_words=7", "ray.enabled=false"])
    assert cfg.step("input").config.images == 25
    assert cfg.step("parse").config.max_words == 7
    assert cfg.ray.enabled is False


def test_set_override_with_wrong_type_is_a_config_error(tmp_path):
    path = _cfg(tmp_path, "workflow: parse_only\n")
    with pytest.raises(ConfigError) as ei:
        load_run_config(path, ["input.images=many"])
    assert ei.value.key == "input.images"


CLEAN_THEN_RETRAIN = """
description: clean the labels, then train a tagger on the cleaned export
steps:
  input: source.scene_world.v1
  parse: parse.sng.v1
  vocab: vocab.wordnet.v1
  label: label.v1
  train: train.ram.v1
  evidence: evidence.v1
  cluster: cluster.v1
  decide: decide.v1
  report: report.v1
  export: export.ram.v1
  retrain: train.ram.v1
train: &tagger {model: cnn_tagger_tiny, text_encoder: none, epochs: 3}
retrain: {<<: *tagger, epochs: 6}
"""


def test_run_config_defines_its_own_chain(tmp_path):
    cfg = load_run_config(_cfg(tmp_path, CLEAN_THEN_RETRAIN))
    check_contract(cfg)
    assert cfg.workflow is None and cfg.description.startswith("clean the labels")
    assert [s.name for s in cfg.steps][-3:] == ["report", "export", "retrain"]
    # each step's section is validated into its stage's typed config, as under workflow:
    assert (cfg.step("train").config.epochs, cfg.step("retrain").config.epochs) == (3, 6)
    assert cfg.step("retrain").config.model == "cnn_tagger_tiny"
    with pytest.raises(ConfigError) as ei:
        load_run_config(_cfg(tmp_path, CLEAN_THEN_RETRAIN + "retrain: {epochz: 6}\n"))
    assert ei.value.key == "retrain.epochz"


def test_steps_can_be_added_with_set(tmp_path):
    path = _cfg(tmp_path, "steps: {input: source.scene_world.v1, parse: parse.sng.v1}\n")
    cfg = load_run_config(path, ["steps.vocab=vocab.wordnet.v2", "vocab.min_count=2"])
    assert [(s.name, s.use) for s in cfg.steps][-1] == ("vocab", "vocab.wordnet.v2")
    assert cfg.step("vocab").config.min_count == 2


def test_shipped_configs_validate_and_satisfy_contract():
    for name in ("clean.yaml", "tagset.yaml", "train.yaml"):
        cfg = load_run_config(REPO / "stages" / name)
        check_contract(cfg)


def test_registry_names_are_pinned():
    # A behaviour change gets a new versioned name; removing or renaming one breaks users' configs, so a
    # retired name says what replaces it.
    assert registry.names() == [
        "cluster.v1", "decide.v1", "evidence.v1", "export.ram.v1", "label.source.v1", "label.v1", "parse.sng.v1",
        "report.v1", "retrain.ram.v1", "source.caption_json.v1", "source.cc3m_tsv.v1", "source.coco.v1",
        "source.flickr30k.v1", "source.folder.v1", "source.img2dataset.v1", "source.multi.v1", "source.parquet.v1",
        "source.ram_export.v1", "source.ram_json.v1", "source.scene_world.v1", "source.synthetic_regions.v1",
        "train.ram.v1", "vocab.tag_list.v1", "vocab.wordnet.v1", "vocab.wordnet.v2",
    ]
    assert not set(registry.RETIRED) & set(registry.names())
    with pytest.raises(KeyError, match="'ground.v1' is retired: use evidence.v1"):
        registry.get("ground.v1")


def test_registry_rejects_unversioned_names():
    with pytest.raises(ValueError):
        registry.register("parse_sng")
