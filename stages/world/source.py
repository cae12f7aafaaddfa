"""source.scene_world.v1: the generated scene world as a source (rows + a ``truth`` side table)."""
from __future__ import annotations

from pydantic import Field

from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.world.generate import NoiseRates
from stages.world.tables import to_tables, world_images


class SceneWorldConfig(StageConfig):
    images: int = Field(2000, ge=1, description="number of images")
    seed: int | None = Field(None, description="world seed (default: the run seed)")
    size: int = Field(128, ge=32, le=1024, description="image side in pixels")
    shard_rows: int = Field(250, ge=1, description="images per output shard")
    omit: float = Field(0.30, ge=0, le=1, description="share of objects missing from every caption")
    hallucinate: float = Field(0.15, ge=0, le=1, description="share of images mentioning an absent object")
    wrong_colour: float = Field(0.10, ge=0, le=1, description="share of objects given a wrong colour")


@register("source.scene_world.v1")
class SceneWorldSource(Stage):
    """Procedural images with known objects, colours, boxes and scenes; noisy template captions."""

    kind = "source"
    Config = SceneWorldConfig
    outputs = ("image", "image_bytes", "captions")
    provides = ("truth",)

    @property
    def seed(self) -> int:
        return self.config.seed if self.config.seed is not None else self.context.seed

    def plan(self) -> list[dict]:
        n, k = self.config.images, self.config.shard_rows
        return [{"start": s, "stop": min(n, s + k)} for s in range(0, n, k)]

    def read_shard(self, spec: dict) -> StageResult:
        c = self.config
        noise = NoiseRates(c.omit, c.hallucinate, c.wrong_colour)
        rows, truth = to_tables(world_images(self.seed, spec["start"], spec["stop"], c.size, noise))
        return StageResult(rows, side={"truth": truth})

    def input_fingerprint(self) -> str:
        return f"seed={self.seed}"
