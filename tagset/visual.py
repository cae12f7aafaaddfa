"""Which parsed names name something a picture can show, decided from WordNet and the parse.

RAM chose its 6,449 names by hand for being taggable. Here the choice is a rule per kind, on the
name's WordNet senses in its kind's part of speech, so that it holds for words no one listed:

* **nouns** (objects, scenes): kept when the first sense lies in a lexicographer file of things
  (artifact, animal, plant, food, object, body, location, substance, person, phenomenon, shape,
  group, event, Tops), is a visible property (colour, shape, texture), or is a season or a part of
  the day (winter, night, dusk: a picture shows them in its light and weather); or when one of the
  next two senses is a concrete thing that WordNet's corpus has seen used (heart: the seat of the
  feelings first, the organ second; kite: a cheque first, the toy third, no sense ever counted).
  Cognition, communication, time, act, attribute, relation and the rest go ("idea", "year",
  "name", "size"). A multi-word name WordNet lacks is judged by its head word ("fashion week").
* **adjectives** (attributes): kept when they describe how something looks. A word used at least as
  often as the noun of a substance as as an adjective is a material and stays (plastic, concrete,
  iron). Otherwise WordNet links the adjective's cluster head to the property it measures (red ->
  hue, large -> size, young -> age): it stays when that property is a visual one (colour, light,
  shape, texture, pattern) or a visible state (wet/dry, clean/dirty, broken), and goes otherwise
  (size, age, number, quality). Without such a link it stays when a derived noun is such a property
  (round -> roundness) or when it comes from a concrete noun its definition names, as a derived
  noun (metallic -> metal) or as the stem left by a suffix (wooden: "made or consisting of wood").
  Relational adjectives (adj.pert: musical, digital, american) go: they classify, not describe.
* **verbs** (actions): kept when the first sense is something a body is seen doing (motion,
  contact, body, consumption, competition, creation, weather), except light verbs, whose meaning
  lies in their complement (hold, look, come, try, include: ``data/light_verbs.txt``).

Every drop comes back as a decision record naming its rule and the WordNet evidence.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

DATA = Path(__file__).parent / "data"

NOUN_FILES = frozenset({
    "noun.artifact", "noun.animal", "noun.plant", "noun.food", "noun.object", "noun.body", "noun.location",
    "noun.substance", "noun.person", "noun.phenomenon", "noun.shape", "noun.group", "noun.event", "noun.Tops",
})
CONCRETE_FILES = frozenset({
    "noun.artifact", "noun.animal", "noun.plant", "noun.food", "noun.object", "noun.body", "noun.substance",
    "noun.phenomenon", "noun.shape",
})
LATER_SENSES = 2  # how many senses after the first may show that a noun names a thing
# times a picture shows in its light and weather: the seasons and the parts of the day (and their
# hyponyms: winter, dusk, sunrise), unlike a year, a week or a moment
VISIBLE_TIMES = frozenset({
    "season.n.02", "night.n.01", "morning.n.01", "evening.n.01", "twilight.n.01", "dawn.n.01", "sunset.n.01",
})
VERB_FILES = frozenset({
    "verb.motion", "verb.contact", "verb.body", "verb.consumption", "verb.competition", "verb.creation",
    "verb.weather",
})
# properties an eye can judge: colour, lightness and brightness (under visual_property), shape,
# surface texture, decorative pattern; and the visible states wet/dry, clean/dirty, broken/whole
VISIBLE_PROPERTIES = frozenset({
    "visual_property.n.01", "shape.n.01", "texture.n.01", "design.n.04", "wetness.n.01", "cleanness.n.01",
    "integrity.n.01",
})
SUFFIXES = ("", "en", "n", "y", "ic", "al", "ed", "ish")  # silver; wooden, golden; rocky, sunny; metallic


def load_light_verbs(path: Path | None = None) -> set[str]:
    lines = (path or DATA / "light_verbs.txt").read_text().splitlines()
    return {ln.split("#")[0].strip().lower() for ln in lines if ln.split("#")[0].strip()}


def verdict(name: str, kind: str, light_verbs: frozenset[str] = frozenset()) -> dict | None:
    """None when the name is kept; else the drop's rule and its evidence."""
    if kind == "attribute":
        return adjective_verdict(name)
    if kind == "action":
        return verb_verdict(name, light_verbs)
    return noun_verdict(name)


@functools.lru_cache(maxsize=65536)
def noun_verdict(name: str) -> dict | None:
    from tagset.variants import wordnet_form
    from tagset.wordnet import senses

    word = wordnet_form(name, "n")[0] or name  # "surf board" as surfboard, "zebra standing" as zebra
    pool = senses(word, "n")
    if not pool and " " in name:
        head = name.split()[-1]
        drop = _noun_kept(senses(head, "n"), head) if senses(head, "n") else None
        if drop:
            return {**drop, "rule": "head_not_visual", "head": head}
        return None
    if not pool:
        return None  # a word WordNet does not know: no evidence either way, the counts decide
    return _noun_kept(pool, word)


def _noun_kept(pool: list, word: str) -> dict | None:
    from tagset.wordnet import under

    first = pool[0]
    if first.lexname() in NOUN_FILES:
        return None
    if first.lexname() == "noun.attribute" and under(first.name(), VISIBLE_PROPERTIES):
        return None
    if first.lexname() == "noun.time" and under(first.name(), VISIBLE_TIMES):
        return None
    # a later sense shows a thing only if WordNet's corpus has seen it used ("size" as a glue has
    # not), or has seen none of the word's senses (kite: neither the cheque nor the toy)
    counts = [_count(s, word) for s in pool]
    later = [s for s, c in zip(pool[1:1 + LATER_SENSES], counts[1:]) if c > 0 or not any(counts)]
    if any(s.lexname() in CONCRETE_FILES for s in later):
        return None
    return {"rule": "noun_not_visual", **_noun_kept_evidence(pool)}


def _count(synset, word: str) -> int:
    key = word.replace(" ", "_")
    return sum(lem.count() for lem in synset.lemmas() if lem.name().lower() == key)


def _noun_kept_evidence(pool: list) -> dict:
    return {"synset": pool[0].name(), "lexfile": pool[0].lexname()}


@functools.lru_cache(maxsize=65536)
def verb_verdict(name: str, light_verbs: frozenset[str] = frozenset()) -> dict | None:
    from tagset.wordnet import first_synset

    if name in light_verbs:
        return {"rule": "light_verb"}
    s = first_synset(name, "v")
    if s is None:
        return {"rule": "not_a_verb"}
    if s.lexname() in VERB_FILES:
        return None
    return {"rule": "action_not_visible", "synset": s.name(), "lexfile": s.lexname()}


@functools.lru_cache(maxsize=65536)
def adjective_verdict(name: str) -> dict | None:
    from tagset.wordnet import first_synset, under

    s = first_synset(name, "a")
    n = first_synset(name, "n")
    if s is None:  # a noun used as a modifier: "denim", "pine", "gravel"
        return None if n is not None and n.lexname() in CONCRETE_FILES else {"rule": "not_an_adjective"}
    if n is not None and n.lexname() == "noun.substance" and len(name) >= 3 and _more_noun_than_adjective(name):
        return None  # a material: plastic, concrete, metal, iron, rubber
    if s.lexname() == "adj.pert":
        return {"rule": "relational_adjective", "synset": s.name()}
    head = s.similar_tos()[0] if s.pos() == "s" and s.similar_tos() else s
    props = s.attributes() or head.attributes()
    if props:  # WordNet names the property the adjective measures: that decides
        if any(under(p.name(), VISIBLE_PROPERTIES) for p in props):
            return None
        return {"rule": "property_not_visible", "synset": s.name(), "property": props[0].name()}
    if _names_its_source(name, s):
        return None
    return {"rule": "no_visible_property", "synset": s.name()}


def _more_noun_than_adjective(name: str) -> bool:
    """WordNet's sense-tagged corpus uses the word at least as often as a noun as as an adjective
    ("concrete" 16 : 9, "plastic" 2 : 1), unlike "solid" 15 : 32 or "fat" 3 : 24."""
    from tagset.wordnet import sense_count

    return sense_count(name, "n") >= sense_count(name, "a")


def _names_its_source(name: str, synset) -> bool:
    """An adjective made from a noun its definition names: a visible property (round -> roundness,
    "having a circular shape"...) or a concrete thing it is made of or covered with (metallic ->
    metal, "made of ... a metal"; wooden = wood + en, "made or consisting of wood"). The definition
    check keeps "busy" from becoming "bus" and "annual" from becoming a plant."""
    from tagset.wordnet import first_synset, under, wordnet

    wn = wordnet()
    words = {wn.morphy(w, "n") or w for w in re.findall(r"[a-z]+", synset.definition().lower())}
    derived = [d.synset() for lem in synset.lemmas() for d in lem.derivationally_related_forms()]
    for d in derived:
        if d.pos() == "n" and under(d.name(), VISIBLE_PROPERTIES):
            return True
        if d.pos() == "n" and d.lexname() in CONCRETE_FILES and words & {ln.lower() for ln in d.lemma_names()}:
            return True
    for suffix in SUFFIXES:
        if not name.endswith(suffix) or len(name) - len(suffix) < 3:
            continue
        stem = name[: len(name) - len(suffix)]
        for noun in {stem, stem + "e", stem[:-1] if len(stem) > 3 and stem[-1] == stem[-2] else stem}:
            n = first_synset(noun, "n")
            if n is not None and n.lexname() in CONCRETE_FILES and noun in words:
                return True
    return False
