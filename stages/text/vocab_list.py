"""vocab.tag_list.v1: the run's tagset from a tag list file, with no caption parsed.

For retraining on labels that already exist (an export of this engine, RAM's released training json):
the list is the label space, line i is id i. A list carries names only, so what the other stages read
from a TagSet is filled in and recorded in the manifest: per-tag thresholds from ``threshold_file`` (else
``threshold`` for every tag), synonyms from ``synonyms`` (this engine's ``synonyms.json``; else none),
one ``kind`` for every tag (decide's ``region_kinds`` and verify's ``view_kinds`` read it), counts 0.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ReduceResult, RowSource, Stage, StageConfig

TAG_LIST = "tag_list.txt"
# What export.ram.v1 (and every vocab step) writes beside tag_list.txt: read when ``tag_list`` is a folder.
BESIDE = {"threshold_file": "tag_list_threshold.txt", "chinese_file": "tag_list_chinese.txt",
          "synonyms": "synonyms.json"}


def tag_list_file(path: str, key: str) -> Path:
    """``path`` itself, or its ``tag_list.txt`` when it is a folder; a clear error naming ``key`` if absent."""
    p = Path(path)
    f = p / TAG_LIST if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{key}: {f} does not exist" + (f" (the folder has no {TAG_LIST})" if p.is_dir() else ""))
    return f


def read_tag_names(path: Path) -> list[str]:
    """Line i is tag i (``str.splitlines``, as RAM's loaders read it); a blank line has no name to match."""
    names = path.read_text(encoding="utf-8").splitlines()
    blank = [i + 1 for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"{path}: line(s) {blank[:10]} are blank; line i of a tag list names tag i")
    if not names:
        raise ValueError(f"{path}: the tag list is empty")
    return names


class TagListConfig(StageConfig):
    tag_list: str = Field(..., description="a tag list, one name a line, line i = id i (RAM's ram_tag_list.txt), "
                          "or a folder holding tag_list.txt (an export or vocab step directory): then its "
                          "tag_list_threshold.txt, tag_list_chinese.txt and synonyms.json are read too when present")
    threshold_file: str | None = Field(None, description="per-tag thresholds, one a line (RAM's format)")
    chinese_file: str | None = Field(None, description="Chinese names, one a line (RAM's format)")
    synonyms: str | None = Field(None, description="JSON {name: [synonyms]} (this engine's synonyms.json)")
    threshold: float = Field(0.65, gt=0, le=1, description="every tag's threshold when there is no threshold_file "
                             "(RAM's default)")
    kind: Literal["object", "attribute", "action", "scene"] = Field(
        "object", description="every tag's kind (a list carries none; decide.region_kinds and verify.view_kinds "
        "read it)")


@register("vocab.tag_list.v1")
class TagListVocab(Stage):
    """The tagset of a tag list file; reads no rows (a reduce, so it runs after the source like any vocab)."""

    kind = "reduce"
    Config = TagListConfig
    provides = ("tagset",)

    def files(self) -> dict[str, Path | None]:
        c = self.config
        f = tag_list_file(c.tag_list, f"{self.context.step}.tag_list")
        given = {k: getattr(c, k) for k in BESIDE}
        out: dict[str, Path | None] = {"tag_list": f}
        for key, name in BESIDE.items():
            if given[key]:
                if not Path(given[key]).is_file():
                    raise ValueError(f"{self.context.step}.{key}: {given[key]} does not exist")
                out[key] = Path(given[key])
            else:  # a folder brings the files beside its list
                out[key] = f.parent / name if Path(c.tag_list).is_dir() and (f.parent / name).is_file() else None
        return out

    def input_fingerprint(self) -> str:
        """The contents of the files read: a changed list re-runs this step and what follows."""
        h = hashlib.sha256()
        for key, path in self.files().items():
            h.update(key.encode() + b"=" + (path.read_bytes() if path else b"-"))
        return h.hexdigest()[:16]

    def run(self, rows: RowSource) -> ReduceResult:
        from tagset.tagset import Tag, TagSet

        c = self.config
        files = self.files()
        tag_list: Path = files["tag_list"]  # type: ignore[assignment]
        names = read_tag_names(tag_list)
        base = TagSet.from_ram_files(tag_list, files["threshold_file"], files["chinese_file"], c.threshold)
        synonyms = self._synonyms(files["synonyms"], names)
        tags = [Tag(t.tag_id, t.name, synonyms.get(t.name, []), c.kind, 0, None, t.threshold, t.name_zh)
                for t in base.tags]
        tagset = TagSet(tags)
        dup = len(names) - len({" ".join(n.lower().split()) for n in names})
        defaults = {"kind": c.kind, "count": 0, "synset": None}  # what a list never carries
        if not files["threshold_file"]:
            defaults["threshold"] = c.threshold
        if not files["synonyms"]:
            defaults["synonyms"] = []
        stats = {"num_ids": len(tagset), "synonyms": sum(len(t.synonyms) for t in tags), "duplicate_names": dup,
                 "defaults": defaults,
                 "files": {k: str(v) if v else None for k, v in files.items()},
                 "summary": f"{len(tagset)} tags from {files['tag_list']} (every kind '{c.kind}'"
                            f"{'' if files['threshold_file'] else f', threshold {c.threshold:g}'}"
                            f"{'' if files['synonyms'] else ', no synonyms'})"}
        if dup:  # a name's labels go to its first id (TagSet.id_of); later ids of it get none by name
            stats["summary"] += f"; {dup} duplicate name(s): labels by name go to the first id"
        return ReduceResult(tables={"tagset": tagset.to_table()}, files=tagset.files(), stats=stats)

    @staticmethod
    def _synonyms(path: Path | None, names: list[str]) -> dict[str, list[str]]:
        if path is None:
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                 for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{name: [synonyms]}}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{path}: synonyms for name(s) not in the tag list: {unknown[:10]}")
        return data
