"""One conftest: shared data location, one spaCy parser per session, one Ray per session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RAM_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared reference data not found at {SHARED} (set RAM_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def sng():
    from tagset.sng import BatchedSceneGraphParser

    return BatchedSceneGraphParser()


@pytest.fixture(scope="session")
def parse_stage():
    from pipeline.stage import StageContext
    from stages.text.parse import ParseConfig, ParseStage

    stage = ParseStage(ParseConfig(), StageContext("/nonexistent", "parse"))
    stage.setup()
    return stage


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """The one local Ray for end-to-end tests (2 CPUs, temp dir under pytest's tmp)."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.executor import start_ray

    started = start_ray(RayConfig(num_cpus=2, progress=False), tmp_path_factory.mktemp("ray"))
    yield ray
    if started:
        ray.shutdown()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL_WORLD = """
workflow: parse_only
seed: 3
ray: {{enabled: {ray}, progress: false}}
input: {{images: {images}, shard_rows: {shard_rows}, size: 64}}
parse: {{resources: {{pool_size: 1, batch_size: 64}}}}
vocab: {{min_count: 1}}
"""


@pytest.fixture
def small_world_config(tmp_path):
    def make(images: int = 40, shard_rows: int = 10, ray: bool = False, name: str = "small.yaml") -> Path:
        return write_config(tmp_path / name, SMALL_WORLD.format(images=images, shard_rows=shard_rows,
                                                                 ray=str(ray).lower()))

    return make


def kill_leftovers(pgid: int, run_dir: Path) -> None:
    """Stop what the dead driver's Ray left behind (its workers may still be committing shards)."""
    import time

    from pipeline.executor import ray_temp_dir

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pattern = ray_temp_dir(run_dir)
    subprocess.run(["pkill", "-9", "-f", pattern], check=False)
    for _ in range(100):  # wait until they are gone, so the shard count below is final
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)


def run_until_killed(cfg: Path, out: Path, fault: str) -> None:
    """Run a config in a subprocess that SIGKILLs its own driver at ``fault`` (PIPELINE_FAULT), then
    stop what its Ray left behind."""
    killed = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--out", str(out)], cwd=REPO,
                              start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", PIPELINE_FAULT=fault))
    try:
        assert killed.wait(timeout=300) == -signal.SIGKILL
    finally:
        kill_leftovers(killed.pid, out)


def run_to_end(cfg: Path, out: Path) -> None:
    """Run a config to its end in this process; a Ray config joins the session's Ray when it is up (the
    ``ray_local`` fixture), as a driver started after a dead one's Ray was stopped would start its own."""
    from pipeline.cli import main

    assert main(["run", str(cfg), "--out", str(out)]) == 0