"""Run configs: YAML + ``--set`` overrides, validated into typed stage configs before anything runs.

A run config names a workflow (``workflows.yaml``) and has one section per step::

    workflow: clean
    seed: 0
    ray: {address: null}
    input: {use: source.scene_world.v1, images: 2000, resources: {pool_size: 2}}
    parse: {max_words: 1000}

or gives its own chain in ``steps:`` (step name -> registered stage name, in run order), checked
exactly as a workflow of ``workflows.yaml`` is::

    description: clean the labels, then train a tagger on the cleaned export
    steps: {input: source.scene_world.v1, parse: parse.sng.v1, ..., export: export.ram.v1, retrain: train.ram.v1}
    retrain: {epochs: 4}

``workflow:`` and ``steps:`` together are an error: one file, one chain, with no rule to remember about
which wins. Inside a step section, ``use`` picks the registered stage (default: the chain's),
``resources`` sets how it runs, and every other key is a field of that stage's config. Any error names
the file, the dotted key and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import re
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
TOP_LEVEL_KEYS = ("workflow", "steps", "name", "description", "seed", "out", "ray")
# A step name is a directory of the run and a key of --set: no dots, no leading '_' (the run's own files).
STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


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
    workflow: str | None  # None: the chain is the file's own ``steps:``
    seed: int
    out: str | None
    ray: RayConfig
    steps: tuple[Step, ...]
    description: str | None = None

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    @property
    def chain(self) -> str:
        """Where the steps come from, for messages."""
        return f"workflow '{self.workflow}'" if self.workflow else f"the steps of {self.file}"


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


def parse_chain(steps: Any, file: str, key: str) -> dict[str, str]:
    """An ordered chain, step name -> registered stage name: a workflow of ``workflows.yaml`` or a run
    config's own ``steps:``, both checked here so that neither can hold what the other may not."""
    if not isinstance(steps, dict) or not steps:
        raise ConfigError(file, key, f"expected a mapping step name -> registered stage name, in run order "
                          f"(e.g. {{input: source.scene_world.v1, parse: parse.sng.v1}}), got {steps!r}")
    for name, use in steps.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not STEP_NAME.match(name):
            raise ConfigError(file, where, "a step name is a directory of the run: a letter, then letters, "
                              "digits, '_' or '-'")
        if name in TOP_LEVEL_KEYS:
            raise ConfigError(file, where, f"a step may not take the name of a top-level key "
                              f"({', '.join(TOP_LEVEL_KEYS)})")
        try:
            registry.get(str(use))
        except KeyError as e:
            raise ConfigError(file, where, str(e.args[0])) from None
    return dict(steps)


def load_workflows(path: Path = WORKFLOWS_FILE) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "expected a mapping of workflow names")
    for name, wf in data.items():
        if not isinstance(wf, dict):
            raise ConfigError(str(path), str(name), "expected a mapping with 'steps' (and 'description')")
        parse_chain(wf.get("steps"), str(path), f"{name}.steps")
    return data


def _chain(raw: dict, file: str) -> tuple[str | None, str | None, dict[str, str]]:
    """(workflow name or None, description, steps) of a run config."""
    if "steps" in raw:
        if "workflow" in raw:
            raise ConfigError(file, "steps", "give either 'workflow: NAME' (a chain of workflows.yaml) or "
                              "'steps:' (this file's own chain), not both")
        return None, raw.get("description"), parse_chain(raw["steps"], file, "steps")
    workflows = load_workflows()
    wf_name = raw.get("workflow")
    if not isinstance(wf_name, str) or wf_name not in workflows:
        raise ConfigError(file, "workflow", f"expected one of {', '.join(workflows)}, got {wf_name!r}; "
                          f"or give the chain itself as 'steps:'")
    return wf_name, raw.get("description", workflows[wf_name].get("description")), workflows[wf_name]["steps"]


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
    wf_name, description, wf_steps = _chain(raw, file)
    for key in raw:
        if key not in TOP_LEVEL_KEYS and key not in wf_steps:
            allowed = ", ".join([*TOP_LEVEL_KEYS, *wf_steps])
            chain = f"workflow '{wf_name}'" if wf_name else "this file's steps"
            raise ConfigError(file, str(key), f"unknown key for {chain}; expected one of: {allowed}")
    if description is not None and not isinstance(description, str):
        raise ConfigError(file, "description", f"expected a line of text, got {description!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(file, "seed", f"expected an integer, got {seed!r}")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(file, "out", f"expected a path string, got {out!r}")
    ray_cfg = validate_model(RayConfig, raw.get("ray"), file, "ray")
    steps = tuple(_build_step(n, raw.get(n), use, file) for n, use in wf_steps.items())
    name = raw.get("name") or Path(path).stem
    return RunConfig(file, str(name), wf_name, seed, out, ray_cfg, steps, description)  # type: ignore[arg-type]
