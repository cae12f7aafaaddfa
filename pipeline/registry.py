"""Versioned stage registry: ``parse.sng.v1``. A change of behaviour is a new version; old ones stay.

Also the commands that belong to stages rather than to the engine (``scene-world``, ``explain``): the CLI
lists what is registered here, so the engine knows nothing of tags, images or the world."""
from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipeline.stage import Stage

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*\.v[0-9]+$")
_STAGES: dict[str, type["Stage"]] = {}
# Modules that register stages; imported lazily so `import pipeline` stays cheap.
STAGE_MODULES = (
    "stages.readers.sources",
    "stages.readers.sources_json",
    "stages.readers.files",
    "stages.readers.multi",
    "stages.readers.sources_export",
    "stages.world.source",
    "stages.text.parse",
    "stages.text.vocab",
    "stages.text.vocab_list",
    "stages.text.label",
    "stages.text.label_source",
    "stages.output.export",
    "stages.training.train",
    "stages.training.retrain",
    "stages.vision.evidence",
    "stages.cleaning.cluster",
    "stages.world.synthetic",
    "stages.cleaning.decide",
    "stages.output.report",
)


# Modules that register CLI commands of their own (``register_command``), imported when the CLI is built.
COMMAND_MODULES = (
    "stages.output.explain",
    "stages.world.tables",
)
_COMMANDS: dict[str, tuple[str, Callable]] = {}


def register_command(name: str, help: str) -> Callable[[Callable], Callable]:
    """A CLI command: the decorated ``configure(parser)`` adds its arguments and sets ``fn`` (args -> exit
    code) as the parser's default."""

    def deco(configure: Callable) -> Callable:
        _COMMANDS[name] = (help, configure)
        return configure

    return deco


def commands() -> dict[str, tuple[str, Callable]]:
    """Registered commands, name -> (help, configure), in the order their modules register them."""
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    return dict(_COMMANDS)


def register(name: str) -> Callable[[type["Stage"]], type["Stage"]]:
    if not _NAME.match(name):
        raise ValueError(f"registry name {name!r} must look like 'family.kind.v1'")

    def deco(cls: type["Stage"]) -> type["Stage"]:
        if name in _STAGES and _STAGES[name] is not cls:
            raise ValueError(f"stage name {name!r} registered twice")
        cls.registry_name = name
        _STAGES[name] = cls
        return cls

    return deco


def load_all() -> None:
    for mod in STAGE_MODULES:
        importlib.import_module(mod)


# Names that were registered once and are no longer, with what replaces them: a config that names one
# gets this instead of "unknown stage".
RETIRED = {
    "pseudolabel.v1": "evidence.v1 (its options: the evidence step's `pseudolabel:` section)",
    "ground.v1": "evidence.v1 (its options: the evidence step's `ground:` section)",
    "embed.v1": "evidence.v1 (its crops: the evidence step's `crops:` section)",
    "verify.v1": "evidence.v1 (its crops: `crops:`; its views: `verify:`)",
}


def get(name: str) -> type["Stage"]:
    load_all()
    try:
        return _STAGES[name]
    except KeyError:
        if name in RETIRED:
            raise KeyError(f"stage {name!r} is retired: use {RETIRED[name]}") from None
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(sorted(_STAGES))}") from None


def names() -> list[str]:
    load_all()
    return sorted(_STAGES)
