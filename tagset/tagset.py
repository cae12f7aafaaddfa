"""The TagSet: ids, names, synonyms, kinds, counts, synsets, thresholds; RAM-format text files."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TAGSET_SCHEMA = pa.schema([
    ("tag_id", pa.int32()), ("name", pa.string()), ("synonyms", pa.list_(pa.string())), ("kind", pa.string()),
    ("count", pa.int64()), ("synset", pa.string()), ("threshold", pa.float32()), ("name_zh", pa.string()),
])
KINDS = ("object", "attribute", "action", "scene")


@dataclass
class Tag:
    tag_id: int
    name: str
    synonyms: list[str] = field(default_factory=list)
    kind: str = "object"
    count: int = 0
    synset: str | None = None
    threshold: float = 0.65
    name_zh: str | None = None


def _key(s: str) -> str:
    return " ".join(s.lower().split())


class TagSet:
    def __init__(self, tags: list[Tag]):
        for i, t in enumerate(tags):
            if t.tag_id != i:
                raise ValueError(f"tag ids must be 0..n-1 in order; position {i} has id {t.tag_id}")
        self.tags = tags
        self._lookup: dict[str, int] = {}
        for t in tags:  # names win over synonyms; earlier ids win ties
            self._lookup.setdefault(_key(t.name), t.tag_id)
        for t in tags:
            for s in t.synonyms:
                self._lookup.setdefault(_key(s), t.tag_id)

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tags]

    def id_of(self, name: str) -> int | None:
        return self._lookup.get(_key(name))

    def thresholds(self) -> list[float]:
        return [t.threshold for t in self.tags]

    # -- tables and files --------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(t) for t in self.tags], schema=TAGSET_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table) -> "TagSet":
        # thresholds are stored as float32; round back to the decimals they were written with
        return cls([Tag(**{**r, "threshold": round(r["threshold"], 6)}) for r in table.to_pylist()])

    def files(self) -> dict[str, bytes]:
        """RAM's text formats (line i is id i, no final newline, as upstream) and a synonyms json."""
        out = {
            "tag_list.txt": "\n".join(self.names).encode(),
            "tag_list_threshold.txt": "\n".join(f"{t.threshold:g}" for t in self.tags).encode(),
            "synonyms.json": (json.dumps({t.name: t.synonyms for t in self.tags if t.synonyms}, indent=1,
                                         ensure_ascii=False) + "\n").encode(),
        }
        if any(t.name_zh for t in self.tags):
            out["tag_list_chinese.txt"] = "\n".join(t.name_zh or "" for t in self.tags).encode()
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "TagSet":
        return cls.from_table(pq.read_table(Path(directory) / "tagset.parquet"))

    @classmethod
    def from_ram_files(cls, tag_list: str | Path, threshold_file: str | Path | None = None,
                       chinese_file: str | Path | None = None, default_threshold: float = 0.65) -> "TagSet":
        names = Path(tag_list).read_text(encoding="utf-8").splitlines()
        th = ([float(x) for x in Path(threshold_file).read_text().splitlines()] if threshold_file
              else [default_threshold] * len(names))
        zh = Path(chinese_file).read_text(encoding="utf-8").splitlines() if chinese_file else [None] * len(names)
        if len(th) != len(names) or len(zh) != len(names):
            raise ValueError(f"{tag_list}: {len(names)} tags but {len(th)} thresholds / {len(zh)} Chinese names")
        return cls([Tag(i, n, threshold=t, name_zh=z) for i, (n, t, z) in enumerate(zip(names, th, zh))])
