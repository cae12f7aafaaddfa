"""Vocabulary selection and WordNet synonym merging, pure functions over tag counts.

RAM took 6,449 frequent parsed names and merged synonyms into 4,585 ids. ``build_vocab`` does the
same: count, drop non-visual words, keep the top ``num_tags`` names, group names whose most frequent
WordNet sense is one synset (car / automobile), then apply a checked-in overrides file last. Every
merge, split and drop is returned as a decision record.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tagset.tagset import Tag, TagSet

DATA = Path(__file__).parent / "data"
KIND_OF = {"objects": "object", "scenes": "scene", "attributes": "attribute", "actions": "action"}
POS_OF = {"object": "n", "scene": "n", "attribute": "a", "action": "v"}


@dataclass
class TagCounts:
    """Per candidate name: captions and images that mention it, and under which kind."""

    captions: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    kinds: dict[str, Counter] = field(default_factory=dict)

    def add_image(self, parsed_captions: list[dict]) -> None:
        seen: set[str] = set()
        for cap in parsed_captions:
            names: set[str] = set()
            for col, kind in KIND_OF.items():
                for name in cap.get(col) or []:
                    names.add(name)
                    self.kinds.setdefault(name, Counter())[kind] += 1
            self.captions.update(names)
            seen |= names
        self.images.update(seen)

    def kind(self, name: str) -> str:
        c = self.kinds.get(name)
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if c else "object"


def load_stoplist(path: Path | None = None) -> set[str]:
    lines = (path or DATA / "stoplist.txt").read_text().splitlines()
    return {ln.strip().lower() for ln in lines if ln.strip() and not ln.startswith("#")}


def load_overrides(path: Path | None) -> dict:
    if path is None:
        return {"force_merge": [], "force_split": [], "drop": []}
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"force_merge", "force_split", "drop"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected force_merge, force_split, drop")
    return {k: data.get(k) or [] for k in ("force_merge", "force_split", "drop")}


def select(counts: TagCounts, num_tags: int, min_count: int, stoplist: set[str]) -> tuple[list[str], list[dict]]:
    """Names ranked by image count (ties: caption count, then name), stop-listed and rare ones out."""
    decisions = []
    ranked = sorted(counts.images, key=lambda n: (-counts.images[n], -counts.captions[n], n))
    keep = []
    for n in ranked:
        if n in stoplist:
            decisions.append({"tag": n, "action": "drop", "rule": "stoplist"})
        elif counts.images[n] < min_count:
            decisions.append({"tag": n, "action": "drop", "rule": "min_count", "count": counts.images[n]})
        else:
            keep.append(n)
    for n in keep[num_tags:]:
        decisions.append({"tag": n, "action": "drop", "rule": "top_n", "count": counts.images[n]})
    return keep[:num_tags], decisions


def merge_synonyms(names: list[str], kind_of: dict[str, str]) -> tuple[list[list[str]], dict[str, str | None],
                                                                          list[dict]]:
    """Group names that share their most frequent WordNet synset (and part of speech).

    ``names`` is in rank order; the first member of a group names it. Returns groups, each name's
    synset, and one decision per merged name.
    """
    from tagset.wordnet import first_synset

    groups: dict[str, list[str]] = {}
    synset_of: dict[str, str | None] = {}
    decisions = []
    for n in names:
        s = first_synset(n, POS_OF[kind_of[n]])
        synset_of[n] = s.name() if s else None
        key = f"{kind_of[n]}:{s.name()}" if s else f"name:{n}"
        if key in groups:
            decisions.append({"tag": n, "action": "merge", "into": groups[key][0], "rule": "same_first_synset",
                              "synset": synset_of[n]})
        groups.setdefault(key, []).append(n)
    return list(groups.values()), synset_of, decisions


def apply_overrides(groups: list[list[str]], overrides: dict) -> tuple[list[list[str]], list[dict]]:
    decisions = []
    groups = [list(g) for g in groups]
    for pair in overrides["force_split"]:
        for g in groups:
            if all(p in g for p in pair):
                for p in pair[1:]:
                    g.remove(p)
                    groups.append([p])
                    decisions.append({"tag": p, "action": "split", "from": pair[0], "rule": "override"})
    for names in overrides["force_merge"]:
        present = [g for g in groups if any(n in g for n in names)]
        if not present:
            continue
        target = next((g for g in present if names[0] in g), present[0])
        if names[0] not in target:
            target.insert(0, names[0])
        for g in present:
            if g is not target:
                target.extend(x for x in g if x not in target)
                g.clear()
        for n in names[1:]:
            if n not in target:
                target.append(n)
            decisions.append({"tag": n, "action": "merge", "into": target[0], "rule": "override"})
        # the canonical name leads its group
        target.sort(key=lambda x: x != names[0])
    drop = set(overrides["drop"])
    for g in groups:
        for n in [x for x in g if x in drop]:
            g.remove(n)
            decisions.append({"tag": n, "action": "drop", "rule": "override"})
    return [g for g in groups if g], decisions


def build_vocab(counts: TagCounts, num_tags: int = 6449, min_count: int = 1, stoplist: set[str] | None = None,
                overrides: dict | None = None, threshold: float = 0.65) -> tuple[TagSet, list[dict]]:
    names, decisions = select(counts, num_tags, min_count, stoplist if stoplist is not None else load_stoplist())
    kind_of = {n: counts.kind(n) for n in names}
    groups, synset_of, merges = merge_synonyms(names, kind_of)
    groups, over = apply_overrides(groups, overrides or load_overrides(None))
    # ids in order of the group's total image count (then name): frequent tags get small ids
    groups.sort(key=lambda g: (-sum(counts.images[n] for n in g), g[0]))
    tags = [Tag(i, g[0], g[1:], kind_of.get(g[0], "object"), sum(counts.images[n] for n in g),
                synset_of.get(g[0]), threshold) for i, g in enumerate(groups)]
    return TagSet(tags), decisions + merges + over


def adopt_vocab(base: TagSet, counts: TagCounts) -> tuple[TagSet, list[dict]]:
    """Map observed names onto an existing vocabulary: exact name, else a lemma of its first synset."""
    from tagset.wordnet import first_synset

    decisions = []
    extra: dict[int, list[str]] = {}
    for n in sorted(counts.images, key=lambda n: (-counts.images[n], n)):
        if base.id_of(n) is not None:
            continue
        s = first_synset(n, POS_OF[counts.kind(n)])
        hit = None
        if s is not None:
            for lem in s.lemma_names():
                hit = base.id_of(lem.replace("_", " "))
                if hit is not None:
                    break
        if hit is None:
            decisions.append({"tag": n, "action": "unmapped", "rule": "not_in_vocabulary", "count": counts.images[n]})
            continue
        extra.setdefault(hit, []).append(n)
        decisions.append({"tag": n, "action": "merge", "into": base.tags[hit].name, "rule": "synset_lemma",
                          "synset": s.name()})  # type: ignore[union-attr]
    tags = [Tag(t.tag_id, t.name, t.synonyms + extra.get(t.tag_id, []), t.kind,
                counts.images.get(t.name.lower(), 0) + sum(counts.images[x] for x in extra.get(t.tag_id, [])),
                t.synset, t.threshold, t.name_zh) for t in base.tags]
    return TagSet(tags), decisions
