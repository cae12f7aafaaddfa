"""What a step's fingerprint covers: how a step runs is outside it (a change re-runs nothing), what its
config leaves to the machine (device and precision: auto) is resolved into it."""
import json

from pipeline.cli import main
from tests.conftest import write_config

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


def test_what_auto_resolves_to_is_part_of_the_fingerprint():
    """``device: auto`` / ``precision: auto`` resolve, on the driver, to what the workers will run: under Ray
    a GPU when the step's resources ask for one (bf16), else the CPU (fp32); in-process, this machine's.
    Explicit settings stay as given. train: its workers' device and precision, and its driver's."""
    from pipeline.stage import Resources, StageContext
    from stages.evidence import EvidenceConfig, EvidenceStage
    from stages.train import TrainStage, TrainStageConfig
    from stages.vision import resolve_device

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
