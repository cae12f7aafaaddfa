"""One conftest: shared data location, one spaCy parser per session, one Ray per session."""
from __future__ import annotations

import os
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
    from stages.parse import ParseConfig, ParseStage

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
