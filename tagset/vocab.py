"""Vocabulary selection and WordNet synonym merging, pure functions over tag counts.

RAM took 6,449 frequent parsed names and merged synonyms into 4,585 ids. ``build_vocab`` does the
same: count, drop non-visual words, keep the top ``num_tags`` names, group names whose most frequent
WordNet sense is one synset (car / automobile), then apply a checked-in overrides file last. Every
merge, split and drop is returned as a decision record.

``vocab.wordnet.v1`` drops only a stop-list. ``vocab.wordnet.v2`` adds three things, each a keyword
of ``build_vocab`` so v1 stays as it was: the visual-word rules of ``tagset.visual`` (``visual``),
compound and spelling merges (``variants``: "surf board" / "surfboard", "colour" / "color"), and a
stated rule for each id's name (``short_name_share``, see ``canonical_names``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from tagset.tagset import Tag, TagSet

DATA = Path(__file__).parent / "data"
KIND_OF = {"objects": "object", "scenes": "scene", "attributes": "attribute", "actions": "action"}
POS_OF = {"object": "n", "scene": "n", "attribute": "a", "action": "v"}
OVERRIDE_KEYS = ("force_merge", "force_split", "drop", "keep")
Judge = Callable[[str, str], "dict | None"]  # (name, kind) -> None to keep, else the drop's rule


@dataclass
class TagCounts:
    """Per candidate name: captions and images that mention it, and under which kind."""

    captions: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    kinds: dict[str, Counter] = field(default_factory=dict)

    def add_image(self, parsed_captions: list[dict]) -> None:
        # dicts, not sets: names counted in the order the captions give them, so a shard's counts (a
        # reduce partial on storage) are the same bytes in every process, whatever its string hash seed
        seen: dict[str, None] = {}
        for cap in parsed_captions:
            names: dict[str, None] = {}
            for col, kind in KIND_OF.items():
                for name in cap.get(col) or []:
                    names[name] = None
                    self.kinds.setdefault(name, Counter())[kind] += 1
            self.captions.update(names.keys())
            seen.update(names)
        self.images.update(seen.keys())

    def merge(self, other: "TagCounts") -> "TagCounts":
        """Add another shard's counts into these (a shard's images are its own, so counts add)."""
        self.captions.update(other.captions)
        self.images.update(other.images)
        for name, c in other.kinds.items():
            self.kinds.setdefault(name, Counter()).update(c)
        return self

    def kind(self, name: str) -> str:
        c = self.kinds.get(name)
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if c else "object"


def load_stoplist(path: Path | None = None) -> set[str]:
    lines = (path or DATA / "stoplist.txt").read_text().splitlines()
    return {ln.strip().lower() for ln in lines if ln.strip() and not ln.startswith("#")}


def load_overrides(path: Path | None) -> dict:
    if path is None:
        return {k: [] for k in OVERRIDE_KEYS}
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - set(OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected {', '.join(OVERRIDE_KEYS)}")
    return {k: data.get(k) or [] for k in OVERRIDE_KEYS}


def visual_judge(light_verbs: set[str] | None = None, keep: list[str] | tuple[str, ...] = ()) -> Judge:
    """The visual-word rules of ``tagset.visual``; names in the overrides' ``keep`` are exempt."""
    from tagset.visual import load_light_verbs, verdict

    light = frozenset(load_light_verbs() if light_verbs is None else light_verbs)
    exempt = set(keep)
    return lambda name, kind: None if name in exempt else verdict(name, kind, light)


def select(counts: TagCounts, num_tags: int, min_count: int, stoplist: set[str],
           judge: Judge | None = None) -> tuple[list[str], list[dict]]:
    """Names ranked by image count (ties: caption count, then name), stop-listed, rare and (with a
    ``judge``) non-visual ones out."""
    decisions = []
    ranked = sorted(counts.images, key=lambda n: (-counts.images[n], -counts.captions[n], n))
    keep = []
    for n in ranked:
        if n in stoplist:
            decisions.append({"tag": n, "action": "drop", "rule": "stoplist"})
        elif counts.images[n] < min_count:
            decisions.append({"tag": n, "action": "drop", "rule": "min_count", "count": counts.images[n]})
        elif judge is not None and (why := judge(n, counts.kind(n))) is not None:
            decisions.append({"tag": n, "action": "drop", **why, "kind": counts.kind(n), "count": counts.images[n]})
        else:
            keep.append(n)
    for n in keep[num_tags:]:
        decisions.append({"tag": n, "action": "drop", "rule": "top_n", "count": counts.images[n]})
    return keep[:num_tags], decisions


def merge_synonyms(names: list[str], kind_of: dict[str, str], variants: bool = False
                   ) -> tuple[list[list[str]], dict[str, str | None], list[dict]]:
    """Group names that share their most frequent WordNet synset (and part of speech).

    ``names`` is in rank order; the first member of a group names it. Returns groups, each name's
    synset, and one decision per merged name. With ``variants`` a compound WordNet knows only closed
    or hyphenated is looked up by that spelling ("surf board" joins surfboard.n.01, rule
    ``closed_compound``), a noun-plus-participle parse by its noun ("zebra standing" joins zebra,
    rule ``noun_then_participle``), and groups whose names are spellings of one WordNet lemma set
    merge (colour / color, rule ``spelling_variant``).
    """
    from tagset.variants import merge_spellings, wordnet_form
    from tagset.wordnet import first_synset

    groups: dict[str, list[str]] = {}
    synset_of: dict[str, str | None] = {}
    decisions = []
    for n in names:
        pos = POS_OF[kind_of[n]]
        form, why = wordnet_form(n, pos) if variants else (None, None)
        s = first_synset(form or n, pos)
        synset_of[n] = s.name() if s else None
        key = f"{kind_of[n]}:{s.name()}" if s else f"name:{n}"
        if key in groups:
            decisions.append({"tag": n, "action": "merge", "into": groups[key][0], "rule": why or "same_first_synset",
                              "synset": synset_of[n]})
        groups.setdefault(key, []).append(n)
    if variants:
        decisions += merge_spellings(groups, {n: POS_OF[k] for n, k in kind_of.items()}, kind_of)
    return [g for g in groups.values() if g], synset_of, decisions


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
                overrides: dict | None = None, threshold: float = 0.65, *, judge: Judge | None = None,
                variants: bool = False, short_name_share: float | None = None) -> tuple[TagSet, list[dict]]:
    """The tagset and every decision. Without the keywords this is ``vocab.wordnet.v1``; v2 passes
    ``judge=visual_judge(...)``, ``variants=True`` and a ``short_name_share``."""
    names, decisions = select(counts, num_tags, min_count, stoplist if stoplist is not None else load_stoplist(),
                              judge)
    kind_of = {n: counts.kind(n) for n in names}
    groups, synset_of, merges = merge_synonyms(names, kind_of, variants)
    naming: list[dict] = []
    if short_name_share is not None:
        from tagset.variants import canonical_names

        groups, naming = canonical_names(groups, counts.images, {n: POS_OF[k] for n, k in kind_of.items()},
                                         synset_of, short_name_share)
        for g in groups:  # a name no caption used (surfboard for "surf board") takes its members' kind
            if g[0] not in kind_of:
                kind_of[g[0]] = kind_of[g[1]]
        final = {m: g[0] for g in groups for m in g}
        merges = [{**d, "into": final.get(d["tag"], d["into"])} for d in merges]
    groups, over = apply_overrides(groups, overrides or load_overrides(None))
    # ids in order of the group's total image count (then name): frequent tags get small ids
    groups.sort(key=lambda g: (-sum(counts.images[n] for n in g), g[0]))
    tags = [Tag(i, g[0], g[1:], kind_of.get(g[0], "object"), sum(counts.images[n] for n in g),
                synset_of.get(g[0]), threshold) for i, g in enumerate(groups)]
    return TagSet(tags), decisions + merges + naming + over


def adopt_vocab(base: TagSet, counts: TagCounts, variants: bool = False,
                overrides: dict | None = None) -> tuple[TagSet, list[dict]]:
    """Map observed names onto an existing vocabulary: exact name, else a lemma of its first synset.

    With ``variants`` (v2) a name also maps through the merges ``build_vocab`` makes and one step of
    WordNet beyond them, each its own rule: a ``force_merge`` list of ``overrides`` holding it and a
    list name (people -> person, ``override``), its WordNet or American spelling or a list name that is
    its spelling variant ("surf board" -> surfboard, "colour" -> color; ``variant_spelling``), a lemma
    of its first synset (``synset_lemma``), a list name with the same first synset
    (``same_first_synset``), or, for a concrete noun, the one list name among the lemmas of its
    synset's direct hypernyms in the same lexicographer file (puppy -> dog, ``synset_hypernym``).
    Never down to a hyponym: "refrigerator" does not become "fridge" (electric_refrigerator.n.01).
    """
    from tagset.wordnet import first_synset

    index = _ReferenceIndex(base) if variants else None
    forced = {}
    for names in (overrides or {}).get("force_merge", []) if variants else []:
        hit = next((base.id_of(x) for x in names if base.id_of(x) is not None), None)
        forced.update({x: hit for x in names if hit is not None})
    decisions = []
    extra: dict[int, list[str]] = {}
    for n in sorted(counts.images, key=lambda n: (-counts.images[n], n)):
        if base.id_of(n) is not None:
            continue
        pos = POS_OF[counts.kind(n)]
        if n in forced:
            hit, rule, syn = forced[n], "override", None
        elif index is not None:
            hit, rule, syn = index.find(n, pos)
        else:
            s = first_synset(n, pos)
            hit = next((h for lem in (s.lemma_names() if s else []) if (h := base.id_of(lem.replace("_", " ")))
                        is not None), None)
            rule, syn = "synset_lemma", s.name() if s else None
        if hit is None:
            decisions.append({"tag": n, "action": "unmapped", "rule": "not_in_vocabulary", "count": counts.images[n]})
            continue
        extra.setdefault(hit, []).append(n)
        decisions.append({"tag": n, "action": "merge", "into": base.tags[hit].name, "rule": rule, "synset": syn})
    tags = [Tag(t.tag_id, t.name, t.synonyms + extra.get(t.tag_id, []), t.kind,
                counts.images.get(t.name.lower(), 0) + sum(counts.images[x] for x in extra.get(t.tag_id, [])),
                t.synset, t.threshold, t.name_zh) for t in base.tags]
    return TagSet(tags), decisions


class _ReferenceIndex:
    """An adopted list looked up through spellings and WordNet (``adopt_vocab(variants=True)``)."""

    # one step up or down WordNet only among things of one kind: lady -> woman, puppy -> dog
    NEIGHBOUR_FILES = frozenset({"noun.artifact", "noun.animal", "noun.plant", "noun.food", "noun.object",
                                 "noun.body", "noun.substance", "noun.person"})

    def __init__(self, base: TagSet):
        from tagset.variants import american
        from tagset.wordnet import first_synset, is_lemma

        self.base = base
        self.by_american: dict[str, list[int]] = {}
        self.by_synset: dict[tuple[str, str], int] = {}
        for t in reversed(base.tags):  # earlier ids win
            key = t.name.lower()
            self.by_american.setdefault(american(key), []).insert(0, t.tag_id)
            for pos in ("n", "v", "a"):
                s = first_synset(key, pos)
                if s is not None and (pos == "n" or is_lemma(key, pos)):  # plurals, not "stove" -> stave
                    self.by_synset[(pos, s.name())] = t.tag_id

    def _lemma_hits(self, synsets) -> set[int]:
        hits = (self.base.id_of(lem.replace("_", " ")) for s in synsets for lem in s.lemma_names())
        return {h for h in hits if h is not None}

    def _spelling(self, name: str, pos: str) -> int | None:
        from tagset.variants import american, wordnet_form
        from tagset.wordnet import compound_forms, shares_synset

        for form in [wordnet_form(name, pos)[0], *compound_forms(name)]:
            if form and self.base.id_of(form) is not None:
                return self.base.id_of(form)
        for tid in self.by_american.get(american(name), []):
            if shares_synset(name, self.base.tags[tid].name.lower(), pos):
                return tid
        return None

    def find(self, name: str, pos: str) -> tuple[int | None, str, str | None]:
        from tagset.variants import wordnet_form
        from tagset.wordnet import first_synset

        hit = self._spelling(name, pos)
        if hit is not None:
            return hit, "variant_spelling", None
        s = first_synset(wordnet_form(name, pos)[0] or name, pos)
        if s is None:
            return None, "", None
        hits = self._lemma_hits([s])
        if hits:
            return min(hits), "synset_lemma", s.name()
        if (pos, s.name()) in self.by_synset:
            return self.by_synset[(pos, s.name())], "same_first_synset", s.name()
        if s.lexname() in self.NEIGHBOUR_FILES:
            # up, never down: a puppy is a dog, but a refrigerator is not a fridge in particular
            # (down, "friend" reached "light" and "waitress" "bunny" on real captions)
            hits = self._lemma_hits([x for x in s.hypernyms() if x.lexname() == s.lexname()])
            if len(hits) == 1:
                return hits.pop(), "synset_hypernym", s.name()
        return None, "", None


def adopt_summary(tagset: TagSet, counts: TagCounts, top: int = 25) -> dict:
    """Share of parsed tag occurrences (image and caption mentions) the adopted list maps, and the
    most frequent names it does not."""
    mapped = [n for n in counts.images if tagset.id_of(n) is not None]
    unmapped = sorted((n for n in counts.images if tagset.id_of(n) is None), key=lambda n: (-counts.images[n], n))
    total_i, total_c = sum(counts.images.values()), sum(counts.captions.values())
    return {
        "mapped_share": round(sum(counts.images[n] for n in mapped) / total_i, 4) if total_i else None,
        "mapped_share_captions": round(sum(counts.captions[n] for n in mapped) / total_c, 4) if total_c else None,
        "names_mapped": len(mapped), "names_unmapped": len(unmapped),
        "top_unmapped": [[n, counts.images[n]] for n in unmapped[:top]],
    }
