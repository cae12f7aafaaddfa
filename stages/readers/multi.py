"""``source.multi.v1``: several sources as one input, each source's image ids prefixed with its name."""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationError, model_validator

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.readers.ids import NAME, SEP, prefixed


class MultiConfig(StageConfig):
    sources: list[dict] = Field(..., min_length=1, description="list of {use: <source stage>, name: <id prefix>, "
                                "...its config}; name defaults to the reader's (source.img2dataset.v1 -> "
                                "img2dataset) and must differ between sources")

    @model_validator(mode="after")
    def _check_sources(self) -> "MultiConfig":
        from pipeline import registry

        named: dict[str, int] = {}
        for i, spec in enumerate(self.sources):
            spec = dict(spec)
            use = spec.pop("use", None)
            try:
                cls = registry.get(str(use))
            except KeyError as e:
                raise ValueError(f"sources[{i}].use: {e.args[0]}") from None
            if cls.kind != "source" or cls is MultiSource:
                raise ValueError(f"sources[{i}].use: {use} is not a plain source stage")
            name = source_name(use, spec.pop("name", None))
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ValueError(f"sources[{i}].name: {name!r} is not a name (a letter or digit, then letters, "
                                 f"digits, '_', '.' or '-'): it is the prefix of this source's image ids")
            if name in named:
                raise ValueError(f"sources[{i}].name: sources[{named[name]}] is named {name!r} too (a source's "
                                 f"name defaults to its reader's); give each its own name: it prefixes its "
                                 f"image ids, so two outputs that number their keys alike stay apart")
            named[name] = i
            try:
                cls.Config.model_validate(spec)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"sources[{i}].{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self


def source_name(use: str, name: object = None) -> object:
    """A multi source's name: as given, else its reader's (``source.img2dataset.v1`` -> ``img2dataset``)."""
    return name if name is not None else use.split(".")[1] if use.count(".") >= 2 else use


@register("source.multi.v1")
class MultiSource(Stage):
    """Several sources as one input (e.g. CC3M tsv + Flickr30k json for one vocabulary). Each source's
    image ids (and its rejects' ids) get its name as a prefix, ``name/key``, so two img2dataset outputs
    that both start at ``000000000`` stay two sets of images."""

    kind = "source"
    Config = MultiConfig
    outputs = ("image", "image_bytes", "captions")

    def _subs(self) -> list[tuple[str, Stage]]:
        from pipeline import registry

        subs = []
        for spec in self.config.sources:
            spec = dict(spec)
            use = spec.pop("use")
            name = source_name(use, spec.pop("name", None))
            cls = registry.get(use)
            subs.append((name, cls(cls.Config.model_validate(spec), self.context)))
        return subs

    def input_fingerprint(self) -> str:
        return "||".join(getattr(s, "input_fingerprint", lambda: "")() for _, s in self._subs())

    def plan(self) -> list[dict]:
        return [{"source": i, "name": name, **spec} for i, (name, sub) in enumerate(self._subs())
                for spec in sub.plan()]

    def read_shard(self, spec: dict) -> StageResult:
        spec = dict(spec)
        name, sub = self._subs()[spec.pop("source")]
        spec.pop("name", None)
        res = sub.read_shard(spec)
        return StageResult(_prefix_ids(res.table, name), [_prefix_reject(r, name) for r in res.rejects],
                           {k: _prefix_ids(t, name) for k, t in res.side.items()}, res.files)


def _prefix_ids(table: pa.Table, name: str) -> pa.Table:
    if "image_id" not in table.column_names:
        return table
    i = table.column_names.index("image_id")
    ids = pc.binary_join_element_wise(pa.scalar(name), table.column(i).cast(pa.string()), SEP)
    return table.set_column(i, table.schema.field(i).with_type(pa.string()), ids)


def _prefix_reject(r: Reject, name: str) -> Reject:
    return r if r.image_id is None else dataclasses.replace(r, image_id=prefixed(name, str(r.image_id)))
