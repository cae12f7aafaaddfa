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
TOP_LEVEL_KEYS = ("workflow", "steps", "round", "name", "description", "seed", "out", "ray", "rounds")
# A step name is a directory of the run and a key of --set: no dots, no leading '_' (the run's own files).
STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="false runs the same shard workers in-process")
    address: str | None = Field(None, description="'auto' or ray://...; RAY_ADDRESS also works")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only; default: all cores")
    pool_start_timeout_s: int = Field(600, ge=1, description="an actor pool starts all its actors before its "
                                      "first shard (so shards spread over every node); a pool that cannot "
                                      "start in this time (the cluster lacks the resources) fails the step")
    progress: bool = Field(True, description="a live bar per step where stderr is a terminal (plain lines "
                           "at every tenth of a step's shards otherwise, and in <run>/run.log)")


class RoundsConfig(BaseModel):
    """How often the workflow's round block runs (``round:`` in workflows.yaml, e.g. evidence -> cluster ->
    decide -> retrain -> report): round k+1 judges the original parse labels again with round k's
    retrained tagger as its base, and stops early when its labels stop improving."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max: int = Field(1, ge=1, description="rounds at most (1: the block runs once)")
    min_f1_gain_points: float = Field(
        0.5, description="stop after a round whose label F1 gain over the labels before it (x 100; the parse "
        "labels for round 1) is below this. Needs the report's truth; without truth every round runs")


@dataclass(frozen=True)
class Step:
    name: str
    stage_cls: type[Stage]
    config: StageConfig
    resources: Resources
    round: int = 0  # 0: outside the round block; k >= 1: the block's k-th run (its steps named <step>_r<k>, k > 1)

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
    steps: tuple[Step, ...]  # every round expanded; the runner may stop the rounds early
    description: str | None = None
    rounds: RoundsConfig = RoundsConfig()

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
        parse_round(wf.get("round", []), list(parse_chain(wf.get("steps"), str(path), f"{name}.steps")),
                    str(path), f"{name}.round")
    return data


def parse_round(block: Any, names: list[str], file: str, key: str) -> list[str]:
    """A chain's round block: consecutive steps of it, in its order (what ``rounds.max`` repeats)."""
    if not isinstance(block, list) or (block and (any(b not in names for b in block) or
                                                  names[names.index(block[0]):][:len(block)] != block)):
        raise ConfigError(file, key, f"expected consecutive steps of the chain, in its order "
                          f"({', '.join(names)}), got {block!r}")
    return list(block)


def round_name(step: str, k: int) -> str:
    """A round block step's name in round ``k`` (its directory in the run)."""
    return step if k == 1 else f"{step}_r{k}"


def expand_rounds(steps: dict[str, str], block: list[str], rounds: int) -> list[tuple[str, str, str, int]]:
    """(step name, config section, registered stage, round) in run order: the block ``rounds`` times."""
    out = []
    for name, use in steps.items():
        if name not in block:
            out.append((name, name, use, 0))
        elif name == block[0]:
            out += [(round_name(b, k), b, steps[b], k) for k in range(1, rounds + 1) for b in block]
    return out


def _chain(raw: dict, file: str) -> tuple[str | None, str | None, dict[str, str], list[str]]:
    """(workflow name or None, description, steps, round block) of a run config."""
    if "steps" in raw:
        if "workflow" in raw:
            raise ConfigError(file, "steps", "give either 'workflow: NAME' (a chain of workflows.yaml) or "
                              "'steps:' (this file's own chain), not both")
        steps = parse_chain(raw["steps"], file, "steps")
        return None, raw.get("description"), steps, parse_round(raw.get("round", []), list(steps), file, "round")
    if "round" in raw:
        raise ConfigError(file, "round", "a round block belongs to a chain: give it with 'steps:' (a workflow of "
                          "workflows.yaml has its own)")
    workflows = load_workflows()
    wf_name = raw.get("workflow")
    if not isinstance(wf_name, str) or wf_name not in workflows:
        raise ConfigError(file, "workflow", f"expected one of {', '.join(workflows)}, got {wf_name!r}; "
                          f"or give the chain itself as 'steps:'")
    wf = workflows[wf_name]
    return wf_name, raw.get("description", wf.get("description")), wf["steps"], wf.get("round", [])


def _explain(err: dict, prefix: str) -> tuple[str, str]:
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    if err["type"] == "extra_forbidden":
        return loc, "unknown key"
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):  # a model's own check says it all
        return loc, str(err["ctx"]["error"])
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


def _build_step(name: str, section: Any, default_use: str, file: str, round_: int = 0) -> Step:
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
    for key, now in stage_cls.Resources.moved_from_config.items():
        if key in section:
            raise ConfigError(file, f"{name}.{key}", f"says how the step runs, not what it computes, so it is not "
                              f"part of the step's fingerprint: set it as {name}.resources.{now}")
    resources = validate_model(stage_cls.Resources, section.pop("resources", None), file, f"{name}.resources")
    cfg = validate_model(stage_cls.Config, section, file, name)
    return Step(name, stage_cls, cfg, resources, round_)  # type: ignore[arg-type]


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
    wf_name, description, wf_steps, block = _chain(raw, file)
    rounds = validate_model(RoundsConfig, raw.get("rounds"), file, "rounds")
    if rounds.max > 1 and not block:
        raise ConfigError(file, "rounds.max", f"{f'workflow {wf_name!r}' if wf_name else 'this chain'} has no round "
                          f"block ('round:'); expected 1, got {rounds.max}")
    order = expand_rounds(wf_steps, block, rounds.max)
    for key in raw:
        if key not in TOP_LEVEL_KEYS and key not in wf_steps and key not in {n for n, *_ in order}:
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
    # a later round's step takes its own section when the config has one (``decide_r2:``), else its round-1 step's
    steps = tuple(_build_step(n, raw.get(n, raw.get(sec)), use, file, k) for n, sec, use, k in order)
    name = raw.get("name") or Path(path).stem
    return RunConfig(file, str(name), wf_name, seed, out, ray_cfg, steps, description, rounds)  # type: ignore[arg-type]
