"""How close a built vocabulary comes to a reference tag list (RAM's), measured after the build.

The build never sees the reference: this module only scores a finished ``TagSet``. Two levels:

* **name**: a tag hits when its name or one of its synonyms is a reference name (case and spacing
  ignored).
* **concept**: also when the first WordNet synset of one of its members, in its kind's part of speech,
  is the first synset of a reference name in that part of speech, or has a lemma that is a reference
  name ("ocean" hits a list holding "sea": sea.n.01 has both).

Precision@K counts hits among the K most frequent ids (ids are in frequency order); ``reached``
counts the reference names at least one built id matches, over the whole vocabulary.
"""
from __future__ import annotations

from pathlib import Path

from tagset.tagset import TagSet

KS = (100, 500, 1000, 2000)
POS_OF = {"object": "n", "scene": "n", "attribute": "a", "action": "v"}


def _key(s: str) -> str:
    return " ".join(s.lower().replace("_", " ").split())


def load_reference(path: str | Path) -> list[str]:
    """A RAM-format tag list (one name per line, line i = id i); blank lines are skipped."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


class Reference:
    """A reference list indexed by name and, per part of speech, by first synset."""

    def __init__(self, names: list[str]):
        from tagset.wordnet import first_synset

        self.names = [_key(n) for n in names]
        self.keys = set(self.names)
        self.by_synset: dict[str, dict[str, set[str]]] = {}  # pos -> synset name -> reference names
        for pos in sorted(set(POS_OF.values())):
            index: dict[str, set[str]] = {}
            for n in self.keys:
                s = first_synset(n, pos)
                if s is not None:
                    index.setdefault(s.name(), set()).add(n)
            self.by_synset[pos] = index

    def name_hits(self, members: list[str]) -> set[str]:
        return {k for k in map(_key, members) if k in self.keys}

    def concept_hits(self, members: list[str], kind: str) -> set[str]:
        """Reference names a tag reaches by name or through its members' first synsets."""
        from tagset.wordnet import first_synset

        pos = POS_OF.get(kind, "n")
        hits = self.name_hits(members)
        for m in members:
            s = first_synset(m, pos)
            if s is None:
                continue
            hits |= self.by_synset[pos].get(s.name(), set())
            hits |= {k for k in (_key(lem) for lem in s.lemma_names()) if k in self.keys}
        return hits


def reference_metrics(tagset: TagSet, reference: list[str], ks: tuple[int, ...] = KS) -> dict:
    """Precision@K by name and by concept, overall and by kind, and the reference names reached.

    ``by_kind[kind][K]`` splits the overall top K: how many of those ids are of that kind and what
    share of them hit. JSON-ready (string keys), so it can sit in a manifest.
    """
    ref = Reference(reference)
    rows = []
    for t in tagset.tags:  # ids are in frequency order
        members = [t.name, *t.synonyms]
        rows.append((t.kind, ref.name_hits(members), ref.concept_hits(members, t.kind)))
    kinds = sorted({k for k, _, _ in rows})
    precision: dict[str, dict[str, float | None]] = {"name": {}, "concept": {}}
    by_kind: dict[str, dict[str, dict]] = {k: {} for k in kinds}
    for k in ks:
        top = rows[:k]
        for level, col in (("name", 1), ("concept", 2)):
            precision[level][str(k)] = round(sum(1 for r in top if r[col]) / len(top), 4) if top else None
        for kind in kinds:
            mine = [r for r in top if r[0] == kind]
            by_kind[kind][str(k)] = {
                "ids": len(mine),
                "name": round(sum(1 for r in mine if r[1]) / len(mine), 4) if mine else None,
                "concept": round(sum(1 for r in mine if r[2]) / len(mine), 4) if mine else None,
            }
    reached = {"name": len(set().union(*(r[1] for r in rows))) if rows else 0,
               "concept": len(set().union(*(r[2] for r in rows))) if rows else 0,
               "by_kind": {kind: {"name": len(set().union(*(r[1] for r in rows if r[0] == kind))),
                                  "concept": len(set().union(*(r[2] for r in rows if r[0] == kind)))}
                           for kind in kinds}}
    return {"reference_names": len(ref.keys), "ids": len(rows), "precision": precision, "by_kind": by_kind,
            "reached": reached}


def summary_line(m: dict) -> str:
    """One line for the run summary: p@K name / concept, and names reached."""
    ps = " ".join(f"@{k} {m['precision']['name'][k]:.3f}/{m['precision']['concept'][k]:.3f}"
                  for k in m["precision"]["name"] if m["precision"]["name"][k] is not None)
    r = m["reached"]
    return (f"reference precision name/concept {ps}; reached {r['name']}/{r['concept']} of "
            f"{m['reference_names']} names")
