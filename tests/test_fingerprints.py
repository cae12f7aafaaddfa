"""What a step's fingerprint covers: how a step runs is outside it (a change re-runs nothing), and the side
state a step keeps in its directory (cluster's sample and fits, training checkpoints) belongs to it, so a
run killed half way and then changed upstream starts that step clean."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.conftest import REPO, run_until_killed, write_config

REGIONS = """
steps: {input: source.synthetic_regions.v1, cluster: cluster.v1}
seed: 4
ray: {enabled: false}
input: {images: 120, shard_rows: 30, tags: 12, dim: 8, modes: 2}
cluster: {regions_per_cluster: 5, min_regions: 3, fit_buckets: 4}
"""


def _side_state(step: Path) -> dict[str, list]:
    """cluster's sample and fit tables and its per-tag table, by path under the step."""
    files = [*sorted(step.glob("sample/*/part-*.parquet")), *sorted(step.glob("fit/*.parquet")), step / "clusters.parquet"]
    return {str(f.relative_to(step)): pq.read_table(f).to_pylist() for f in files}


def test_a_cluster_killed_while_sampling_then_changed_upstream_keeps_no_old_sample(tmp_path):
    """The driver dies after three of four shards wrote their samples (no shard of the step is committed
    yet); the input then shrinks to two shards. The re-run's sample, fits and per-tag table are those of
    a fresh run of the new input: the dead run's sample of shard 2 is gone, not merged into the fits."""
    cfg, out = write_config(tmp_path / "regions.yaml", REGIONS), tmp_path / "run"
    run_until_killed(cfg, out, "kill_after:cluster.sample_shard:3")
    assert not (out / "cluster" / "_manifest.json").exists()
    assert list((out / "cluster" / "sample").glob("*/part-00002.parquet"))  # what the dead run left

    smaller = ["--set", "input.images=60"]
    assert main(["run", str(cfg), "--out", str(out), *smaller]) == 0
    assert main(["run", str(cfg), "--out", str(tmp_path / "fresh"), *smaller]) == 0
    assert not list((out / "cluster" / "sample").glob("*/part-00002.parquet"))
    assert _side_state(out / "cluster") == _side_state(tmp_path / "fresh" / "cluster")
    for f in ("part-00000.parquet", "part-00001.parquet"):
        assert pq.read_table(out / "cluster" / f).equals(pq.read_table(tmp_path / "fresh" / "cluster" / f))


TRAIN = """
workflow: train
seed: 2
ray: {{enabled: false, num_cpus: 2, progress: false}}
input: {{images: 24, shard_rows: 12, size: 64}}
parse: {{resources: {{batch_size: 64}}}}
vocab: {{min_count: 1}}
train:
  model: cnn_tagger_tiny
  model_args: {{image_size: 64}}
  text_encoder: none
  epochs: {epochs}
  batch_size: 4
  warmup_steps: 1
  backend: {backend}
"""
TRAIN_STEPS = ("input", "parse", "vocab", "label", "export", "train")


def _statuses(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in TRAIN_STEPS and parts[2] in ("ran", "skipped", "resumed"):
            out[parts[0]] = parts[2]
    return out


def test_how_the_train_step_runs_is_outside_its_fingerprint(tmp_path, capsys):
    """Raising max_failures, loader processes, CPUs per worker or the checkpoint interval (and a map step's
    pool) re-runs nothing; the recipe a retrain repeats holds none of them; the same keys at the step's top
    level, where they were, are a config error naming the file, the key and where it went."""
    cfg, out = write_config(tmp_path / "train.yaml", TRAIN.format(epochs=1, backend="local")), tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert set(_statuses(capsys.readouterr().out).values()) == {"ran"}
    first = json.loads((out / "train" / "_manifest.json").read_text())

    how = ["train.resources.max_failures=7", "train.resources.loader_workers=1", "train.resources.cpus_per_worker=2",
           "train.resources.checkpoint_every_steps=3", "train.resources.prefetch_factor=4", "parse.resources.pool_size=2"]
    assert main(["run", str(cfg), "--out", str(out), *[a for k in how for a in ("--set", k)]]) == 0
    assert _statuses(capsys.readouterr().out) == {s: "skipped" for s in TRAIN_STEPS}
    assert json.loads((out / "train" / "_manifest.json").read_text()) == first
    recipe = json.loads((out / "train" / "recipe.json").read_text())
    assert recipe["backend"] == "local" and recipe["workers"] == 1
    assert not {"max_failures", "num_workers", "loader_workers", "cpus_per_worker", "checkpoint_every_steps",
                "prefetch_factor"} & set(recipe)

    assert main(["run", str(cfg), "--out", str(out), "--set", "train.max_failures=7"]) == 2
    assert f"{cfg}: train.max_failures: says how the step runs" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(out), "--set", "train.num_workers=2"]) == 2
    assert "set it as train.resources.loader_workers" in capsys.readouterr().err


def test_a_ray_train_job_killed_then_changed_upstream_starts_from_scratch(tmp_path):
    """The driver of a Ray Train job (Ray started by the runner from the run's ``ray:`` block, although its
    shard steps run in-process) is SIGKILLed once the job has registered a checkpoint; with the input
    changed, the step's fingerprint differs, and the re-run's job starts from step 0 instead of resuming
    the old job's checkpoint, which has the same name (the train config did not change)."""
    from pipeline.executor import ray_temp_dir
    from tests.conftest import kill_leftovers

    cfg, out = write_config(tmp_path / "train.yaml", TRAIN.format(epochs=6, backend="ray_train")), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--out", str(out)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 300
        while not list((out / "train" / "ray_train").glob("run-*/checkpoint_manager_snapshot.json")) \
                and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before a checkpoint: {proc.stderr.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_leftovers(proc.pid, out)
    assert not (out / "train" / "_manifest.json").exists()
    assert (Path(ray_temp_dir(out)) / "session_latest").exists()  # the runner's Ray, with the run's temp dir

    assert main(["run", str(cfg), "--out", str(out), "--set", "input.images=20"]) == 0
    m = json.loads((out / "train" / "_manifest.json").read_text())
    assert m["resumed_at"] is None and m["rows_in"] == 20
    history = json.loads((out / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(-1, 6))


def test_what_auto_resolves_to_is_part_of_the_fingerprint():
    """``device: auto`` / ``precision: auto`` resolve, on the driver, to what the workers will run: under Ray
    a GPU when the step's resources ask for one (bf16), else the CPU (fp32); in-process, this machine's.
    Explicit settings stay as given. train: its workers' device and precision, and its driver's."""
    from pipeline.stage import Resources, StageContext
    from stages.vision.evidence import EvidenceConfig, EvidenceStage
    from stages.training.train import TrainStage, TrainStageConfig
    from stages.vision.tagger import resolve_device

    def evidence(ray: dict, gpus: float, **cfg) -> str:
        stage = EvidenceStage(EvidenceConfig(**cfg), StageContext("/nowhere", "evidence", ray=ray))
        stage.resources = Resources(num_gpus=gpus)
        return stage.input_fingerprint()

    under_ray = {"enabled": True}
    assert "device=cuda;precision=bf16" in evidence(under_ray, 1)
    assert "device=cpu;precision=fp32" in evidence(under_ray, 0)
    assert "device=cuda;precision=fp16" in evidence(under_ray, 0.5, precision="fp16")
    assert "device=cpu;precision=fp32" in evidence(under_ray, 1, device="cpu")
    here = resolve_device("auto")
    assert f"device={here};" in evidence({"enabled": False}, 1)

    def train(**cfg) -> dict:
        return json.loads(TrainStage(TrainStageConfig(**cfg), StageContext("/nowhere", "train")).input_fingerprint())

    assert train(device="cuda") == {"train": ["cuda", "bf16"], "driver": ["cuda", "bf16"]}
    assert train(device="cuda", bf16=False)["train"] == ["cuda", "fp32"]
    assert train(device="cpu") == {"train": ["cpu", "fp32"], "driver": ["cpu", "fp32"]}
    assert train(device="cuda", backend="ray_train")["driver"][0] == here  # the driver only orchestrates


PARSE_ONLY = """
workflow: parse_only
seed: 3
ray: {enabled: false, progress: false}
input: {images: 20, shard_rows: 10, size: 64}
vocab: {min_count: 1%s}
"""
CODE = ("pipeline", "stages", "tagset", "model", "workflows.yaml")


def _fingerprints(plan_out: str) -> dict[str, str]:
    return {s["step"]: s["fingerprint"] for s in json.loads(plan_out)["steps"]}


def test_two_checkouts_of_the_same_code_fingerprint_every_step_the_same(tmp_path):
    """The same config planned from two checkouts of the same code, at different paths: every step's
    fingerprint is the same (vocab's default overrides is the name ``builtin``, not a path inside the
    checkout, so neither its config nor its input identity says where the checkout is)."""
    import shutil

    plans = []
    for where in ("a/ram-engine", "somewhere/else/checkout"):
        root = tmp_path / where
        for name in CODE:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, root / name)
        cfg = write_config(root / "small.yaml", PARSE_ONLY % "")
        res = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(cfg), "--out", str(root / "run"),
                              "--json"], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["config"] == str(cfg)  # each plan ran from its own checkout
        plans.append(_fingerprints(res.stdout))
    assert list(plans[0]) == ["input", "parse", "vocab", "label", "export"]
    assert plans[0] == plans[1]


def test_vocab_fingerprint_follows_the_overrides_file_content_not_its_path(tmp_path, monkeypatch, capsys):
    """``vocab.overrides: ov.yaml`` (relative, as a user writes it) planned from two directories, each with
    a copy of the same file: the same fingerprints. Edit one copy: vocab and every later step re-run, the
    steps before it do not. A missing file fails before anything runs, naming the key and the path."""
    cfg = write_config(tmp_path / "small.yaml", PARSE_ONLY % ", overrides: ov.yaml")
    content = "force_merge: [[cup, mug]]\ndrop: [thing]\n"

    def plan_from(d: Path) -> dict[str, str]:
        monkeypatch.chdir(d)
        capsys.readouterr()
        assert main(["plan", str(cfg), "--out", str(tmp_path / "run"), "--json"]) == 0
        return _fingerprints(capsys.readouterr().out)

    first, second = tmp_path / "first", tmp_path / "second" / "deeper"
    for d in (first, second):
        d.mkdir(parents=True)
        (d / "ov.yaml").write_text(content)
    here = plan_from(first)
    assert plan_from(second) == here
    (second / "ov.yaml").write_text(content.replace("thing", "stuff"))
    edited = plan_from(second)
    assert [s for s in here if edited[s] != here[s]] == ["vocab", "label", "export"]

    (second / "ov.yaml").unlink()
    with pytest.raises(ValueError, match=r"vocab\.overrides: ov\.yaml does not exist \(relative to the working "
                                         r"directory .*deeper\)"):
        plan_from(second)


def test_vocab_overrides_default_is_the_checked_in_file_by_name():
    """The default names the checked-in overrides (what the build reads), and an explicit path to the same
    file is the same input identity: only the config value, as written, differs."""
    from pipeline.stage import StageContext
    from stages.text.vocab import BUILTIN, BUILTIN_OVERRIDES, VocabConfig, VocabStage

    def stage(**cfg) -> VocabStage:
        return VocabStage(VocabConfig(**cfg), StageContext("/nowhere", "vocab"))

    default = stage()
    assert default.config.overrides == BUILTIN == "builtin"
    assert default.overrides_file() == BUILTIN_OVERRIDES and BUILTIN_OVERRIDES.is_file()
    assert stage(overrides=str(BUILTIN_OVERRIDES)).input_fingerprint() == default.input_fingerprint()
    assert stage(overrides=None).input_fingerprint() != default.input_fingerprint()
    assert stage(overrides=None).overrides_file() is None
