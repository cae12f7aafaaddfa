"""Run configs: YAML + ``--set`` overrides, validated into typed stage configs before anything runs.

A run config names a workflow (``workflows.yaml``) and has one section per step::

    workflow: clean
    seed: 0
    ray: {address: null}
    input: {use: source.scene_world.v1, images: 2000, resources: {pool_size: 2}}
    parse: {max_words: 1000}

Inside a step section, ``use`` picks the registered stage (default: the workflow's), ``resources``
sets how it runs, and every other key is a field of that stage's config. Any error names the file,
the dotted key and what was expected.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import registry
from pipeline.errors import ConfigError
from pipeline.stage import Resources, Stage, StageConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_FILE = REPO_ROOT / "workflows.yaml"
TOP_LEVEL_KEYS = ("workflow", "name", "description", "seed", "out", "ray")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="false runs the same shard workers in-process")
    address: str | None = Field(None, description="'auto' or ray://...; RAY_ADDRESS also works")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only; default: all cores")
    progress: bool = True


@dataclass(frozen=True)
class Step:
    name: str
    stage_cls: type[Stage]
    config: StageConfig
    resources: Resources

    @property
    def use(self) -> str:
        return self.stage_cls.registry_name

    def config_hash(self) -> str:
        payload = {"use": self.use, "config": self.config.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunConfig:
    file: str
    name: str
    workflow: str
    seed: int
    out: str | None
    ray: RayConfig
    steps: tuple[Step, ...]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def parse_override(item: str, file: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(file, item, "--set expects KEY=VALUE with a dotted key, e.g. parse.max_words=500")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(file, key, f"--set value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str], file: str) -> dict:
    for item in overrides:
        path, value = parse_override(item, file)
        node = raw
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(file, ".".join(path[: i + 1]), f"is {type(nxt).__name__}, cannot set a key inside it")
            node = nxt
        node[path[-1]] = value
    return raw


def load_workflows(path: Path = WORKFLOWS_FILE) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "expected a mapping of workflow names")
    for name, wf in data.items():
        if not isinstance(wf, dict) or not isinstance(wf.get("steps"), dict) or not wf["steps"]:
            raise ConfigError(str(path), f"{name}.steps", "expected a mapping step -> registered stage name")
    return data


def _explain(err: dict, prefix: str) -> tuple[str, str]:
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    if err["type"] == "extra_forbidden":
        return loc, "unknown key"
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    return loc, f"{err['msg']}{shown}"


def validate_model(model: type[BaseModel], data: Any, file: str, prefix: str) -> BaseModel:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, prefix, f"expected a mapping, got {type(data).__name__} {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc, msg = _explain(first, prefix)
        if first["type"] == "extra_forbidden":
            msg += f"; expected one of: {', '.join(model.model_fields)}"
        raise ConfigError(file, loc, msg) from None


def _build_step(name: str, section: Any, default_use: str, file: str) -> Step:
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(file, name, f"expected a mapping of settings, got {type(section).__name__}")
    section = dict(section)
    use = section.pop("use", default_use)
    try:
        stage_cls = registry.get(str(use))
    except KeyError as e:
        raise ConfigError(file, f"{name}.use", str(e.args[0])) from None
    resources = validate_model(Resources, section.pop("resources", None), file, f"{name}.resources")
    cfg = validate_model(stage_cls.Config, section, file, name)
    return Step(name, stage_cls, cfg, resources)  # type: ignore[arg-type]


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(file, "", f"cannot read config: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(file, "", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(file, "", f"expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [], file)
    workflows = load_workflows()
    wf_name = raw.get("workflow")
    if not isinstance(wf_name, str) or wf_name not in workflows:
        raise ConfigError(file, "workflow", f"expected one of {', '.join(workflows)}, got {wf_name!r}")
    wf_steps: dict[str, str] = workflows[wf_name]["steps"]
    for key in raw:
        if key not in TOP_LEVEL_KEYS and key not in wf_steps:
            allowed = ", ".join([*TOP_LEVEL_KEYS, *wf_steps])
            raise ConfigError(file, str(key), f"unknown key for workflow '{wf_name}'; expected one of: {allowed}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(file, "seed", f"expected an integer, got {seed!r}")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(file, "out", f"expected a path string, got {out!r}")
    ray_cfg = validate_model(RayConfig, raw.get("ray"), file, "ray")
    steps = tuple(_build_step(n, raw.get(n), use, file) for n, use in wf_steps.items())
    name = raw.get("name") or Path(path).stem
    return RunConfig(file, str(name), wf_name, seed, out, ray_cfg, steps)  # type: ignore[arg-type]
