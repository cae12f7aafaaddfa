"""vocab.wordnet.v1 / v2: choose the tag vocabulary (or adopt one) and merge WordNet synonyms.

v1 ranks parsed names by frequency behind a stop-list. v2 (issue 15) keeps only names of visible
things (``tagset/visual.py``), merges compound and spelling variants, names each id by a stated rule
(``tagset/variants.py``), and adopts a list through the same merges. Either can score its result
against a reference list (``reference``), which the build itself never reads.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import ReduceResult, RowSource, Stage, StageConfig

# ``overrides: builtin``: the checked-in overrides. A name, not a path: the config (and so the step's
# fingerprint and manifest) holds it as written, never where this checkout happens to be.
BUILTIN = "builtin"
BUILTIN_OVERRIDES = Path(__file__).resolve().parents[2] / "tagset" / "data" / "overrides.yaml"


class VocabConfig(StageConfig):
    mode: Literal["build", "adopt"] = Field("build", description="build from counts, or adopt tag_list")
    num_tags: int = Field(6449, ge=1, description="names kept before synonym merging (RAM: 6449)")
    min_count: int = Field(1, ge=1, description="min images a name must appear in")
    threshold: float = Field(0.65, gt=0, le=1, description="per-class threshold for built vocabularies")
    overrides: str | None = Field(BUILTIN, description="force_merge / force_split / drop / keep yaml: a path, "
                                  "'builtin' (the checked-in tagset/data/overrides.yaml) or null (none)")
    stoplist: str | None = Field(None, description="non-visual words file (default: tagset/data/stoplist.txt)")
    tag_list: str | None = Field(None, description="adopt: RAM-format tag list (line i = id i)")
    threshold_file: str | None = Field(None, description="adopt: RAM-format per-class thresholds")
    chinese_file: str | None = Field(None, description="adopt: RAM-format Chinese names")
    reference: str | None = Field(None, description="RAM-format tag list to score the result against "
                                                    "(never read by the build; skipped when absent)")


class VisualVocabConfig(VocabConfig):
    light_verbs: str | None = Field(None, description="light verbs file (default: tagset/data/light_verbs.txt)")
    short_name_share: float = Field(0.25, ge=0, le=1, description="a shorter WordNet lemma names its id when it "
                                                                    "has this share of the leader's images")


@register("vocab.wordnet.v1")
class VocabStage(Stage):
    """Counts parsed candidate tags; top-N + stop-list + WordNet merges + overrides -> TagSet."""

    kind = "reduce"
    Config = VocabConfig
    inputs = ("image_id", "parsed")
    provides = ("tagset",)

    def overrides_file(self) -> Path | None:
        o = self.config.overrides
        return None if o is None else BUILTIN_OVERRIDES if o == BUILTIN else Path(o)

    def files_read(self) -> dict[str, Path | None]:
        """The files the config names, by key (None: unset; the stop-list's default is the package's data)."""
        c = self.config
        named = {"stoplist": c.stoplist, "tag_list": c.tag_list, "threshold_file": c.threshold_file,
                 "chinese_file": c.chinese_file, "reference": c.reference}
        return {"overrides": self.overrides_file(), **{k: Path(v) if v else None for k, v in named.items()}}

    def input_fingerprint(self) -> str:
        """The contents of the files the config names, by key, not where they are: the config holds each
        value as written, so a run made from another checkout (or with a copy of a file) is the same input,
        and an edited file is another. A named file that is missing fails here, on the driver, before any
        shard runs; only the reference may be absent (then it is not scored)."""
        h = hashlib.sha256()
        for key, path in self.files_read().items():
            if path is None:
                digest = "unset"
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif key == "reference":
                digest = "absent"
            else:
                raise ValueError(f"{self.context.step}.{key}: {path} does not exist"
                                 + ("" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"))
            h.update(f"{key}={digest}\n".encode())
        return h.hexdigest()[:16]

    def partial(self, table: pa.Table, shard: int):
        """One shard's name counts (in a worker): the driver only ever holds counts per distinct name."""
        from tagset.vocab import TagCounts

        counts = TagCounts()
        for parsed in table.column("parsed").to_pylist():
            counts.add_image(parsed or [])
        return {"captions": counts.captions, "images": counts.images, "kinds": counts.kinds}

    def merge(self, partials: Iterator) -> ReduceResult:
        from tagset.vocab import TagCounts

        counts = TagCounts()
        for p in partials:
            counts.merge(TagCounts(**p))
        return self.finish(counts)

    def run(self, rows: RowSource) -> ReduceResult:
        """The same reduce in one process (tests, small inputs)."""
        return self.merge(self.partial(t, i) for i, t in enumerate(rows.iter_tables(["parsed"])))

    def finish(self, counts) -> ReduceResult:
        """The tagset and its manifest stats from the merged counts (on the driver: O(distinct names))."""
        from tagset.reference import summary_line
        from tagset.vocab import adopt_summary

        c = self.config
        if c.mode == "adopt":
            tagset, decisions = self.adopt(counts)
            names_selected = len(tagset)
        else:
            tagset, decisions = self.build(counts)
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
        if c.mode == "adopt":
            stats["adopt"] = adopt_summary(tagset, counts)
            top = ", ".join(n for n, _ in stats["adopt"]["top_unmapped"][:8])
            stats["summary"] += (f"\n{'':<11}adopt: {stats['adopt']['mapped_share']:.1%} of parsed tag occurrences "
                                 f"mapped; most frequent unmapped: {top}")
        else:
            stats["largest_groups"] = [[t.name, *t.synonyms] for t in
                                       sorted(tagset.tags, key=lambda t: (-len(t.synonyms), t.tag_id))[:10]]
        if c.reference and c.mode == "build":  # an adopted list is the reference's own ids
            stats["reference"] = self._score(tagset)
            note = stats["reference"].get("note") or summary_line(stats["reference"])
            stats["summary"] += f"\n{'':<11}{note}"
        return ReduceResult(tables={"tagset": tagset.to_table(), "tag_counts": counts_table}, files=files,
                            stats=stats)

    def build(self, counts):
        from tagset.vocab import build_vocab, load_overrides, load_stoplist

        c = self.config
        return build_vocab(counts, c.num_tags, c.min_count, load_stoplist(Path(c.stoplist) if c.stoplist else None),
                           load_overrides(self.overrides_file()), c.threshold)

    def adopt(self, counts):
        from tagset.vocab import adopt_vocab

        return adopt_vocab(self._base(), counts)

    def _base(self):
        from tagset.tagset import TagSet

        c = self.config
        if not c.tag_list:
            raise ValueError("vocab.tag_list is required when vocab.mode is 'adopt'")
        return TagSet.from_ram_files(c.tag_list, c.threshold_file, c.chinese_file, c.threshold)

    def _score(self, tagset) -> dict:
        """Reference metrics of the finished tagset; a missing list is a note, not a failure."""
        from tagset.reference import load_reference, reference_metrics

        path = Path(self.config.reference)  # type: ignore[arg-type]
        if not path.is_file():
            return {"path": str(path), "note": f"reference {path} not found: metrics skipped"}
        return {"path": str(path), **reference_metrics(tagset, load_reference(path))}


@register("vocab.wordnet.v2")
class VisualVocabStage(VocabStage):
    """v1 plus visual-word selection, compound and spelling merges, stated canonical names (issue 15)."""

    Config = VisualVocabConfig

    def files_read(self) -> dict[str, Path | None]:
        lv = self.config.light_verbs
        return {**super().files_read(), "light_verbs": Path(lv) if lv else None}

    def build(self, counts):
        from tagset.visual import load_light_verbs
        from tagset.vocab import build_vocab, load_overrides, load_stoplist, visual_judge

        c = self.config
        overrides = load_overrides(self.overrides_file())
        light = load_light_verbs(Path(c.light_verbs) if c.light_verbs else None)
        return build_vocab(counts, c.num_tags, c.min_count, load_stoplist(Path(c.stoplist) if c.stoplist else None),
                           overrides, c.threshold, judge=visual_judge(light, overrides["keep"]), variants=True,
                           short_name_share=c.short_name_share)

    def adopt(self, counts):
        from tagset.vocab import adopt_vocab, load_overrides

        c = self.config
        return adopt_vocab(self._base(), counts, variants=True,
                           overrides=load_overrides(self.overrides_file()))
