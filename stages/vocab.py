"""vocab.wordnet.v1: choose the tag vocabulary (or adopt one) and merge WordNet synonyms."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ReduceResult, RowSource, Stage, StageConfig

DEFAULT_OVERRIDES = str(Path(__file__).resolve().parent.parent / "tagset" / "data" / "overrides.yaml")


class VocabConfig(StageConfig):
    mode: Literal["build", "adopt"] = Field("build", description="build from counts, or adopt tag_list")
    num_tags: int = Field(6449, ge=1, description="names kept before synonym merging (RAM: 6449)")
    min_count: int = Field(1, ge=1, description="min images a name must appear in")
    threshold: float = Field(0.65, gt=0, le=1, description="per-class threshold for built vocabularies")
    overrides: str | None = Field(DEFAULT_OVERRIDES, description="force_merge / force_split / drop yaml")
    stoplist: str | None = Field(None, description="non-visual words file (default: tagset/data/stoplist.txt)")
    tag_list: str | None = Field(None, description="adopt: RAM-format tag list (line i = id i)")
    threshold_file: str | None = Field(None, description="adopt: RAM-format per-class thresholds")
    chinese_file: str | None = Field(None, description="adopt: RAM-format Chinese names")


@register("vocab.wordnet.v1")
class VocabStage(Stage):
    """Counts parsed candidate tags; top-N + stop-list + WordNet merges + overrides -> TagSet."""

    kind = "reduce"
    Config = VocabConfig
    inputs = ("image_id", "parsed")
    provides = ("tagset",)

    def input_fingerprint(self) -> str:
        """Contents of the files the config names (overrides, stop-list, adopted lists)."""
        import hashlib

        c = self.config
        h = hashlib.sha256()
        for path in (c.overrides, c.stoplist, c.tag_list, c.threshold_file, c.chinese_file):
            h.update(Path(path).read_bytes() if path and Path(path).exists() else b"-")
        return h.hexdigest()[:16]

    def partial(self, table: pa.Table, shard: int):
        """One shard's name counts (in a worker): the driver only ever holds counts per distinct name."""
        from tagset.vocab import TagCounts

        counts = TagCounts()
        for parsed in table.column("parsed").to_pylist():
            counts.add_image(parsed or [])
        return counts

    def merge(self, partials: Iterator) -> ReduceResult:
        from tagset.vocab import TagCounts

        counts = TagCounts()
        for p in partials:
            add_counts(counts, p)
        return self.build(counts)

    def run(self, rows: RowSource) -> ReduceResult:
        """The same reduce in one process (tests, small inputs)."""
        return self.merge(self.partial(t, i) for i, t in enumerate(rows.iter_tables(["parsed"])))

    def build(self, counts) -> ReduceResult:
        from tagset.tagset import TagSet
        from tagset.vocab import adopt_vocab, build_vocab, load_overrides, load_stoplist

        c = self.config
        if c.mode == "adopt":
            if not c.tag_list:
                raise ValueError("vocab.tag_list is required when vocab.mode is 'adopt'")
            base = TagSet.from_ram_files(c.tag_list, c.threshold_file, c.chinese_file, c.threshold)
            tagset, decisions = adopt_vocab(base, counts)
            names_selected = len(tagset)
        else:
            stop = load_stoplist(Path(c.stoplist) if c.stoplist else None)
            tagset, decisions = build_vocab(counts, c.num_tags, c.min_count, stop,
                                            load_overrides(Path(c.overrides) if c.overrides else None), c.threshold)
            names_selected = len(tagset) + sum(len(t.synonyms) for t in tagset.tags)
        counts_table = pa.table({
            "name": list(counts.images), "images": [counts.images[n] for n in counts.images],
            "captions": [counts.captions[n] for n in counts.images], "kind": [counts.kind(n) for n in counts.images],
        }).sort_by([("images", "descending"), ("name", "ascending")])
        files = tagset.files()
        files["decisions.json"] = (json.dumps(decisions, indent=1) + "\n").encode()
        merged = sum(1 for d in decisions if d["action"] == "merge")
        stats = {"names_observed": len(counts.images), "names_selected": names_selected, "num_ids": len(tagset),
                 "merges": merged, "summary": f"{names_selected} names -> {len(tagset)} ids ({merged} merged)"}
        return ReduceResult(tables={"tagset": tagset.to_table(), "tag_counts": counts_table}, files=files,
                            stats=stats)


def add_counts(into, other) -> None:
    """Adds one shard's TagCounts to another's (counts of images and captions are per shard, so they add)."""
    into.images.update(other.images)
    into.captions.update(other.captions)
    for name, kinds in other.kinds.items():
        into.kinds.setdefault(name, type(kinds)()).update(kinds)
