"""WordNet access without downloads: NLTK's reader over the files ``make setup`` lays out.

Data is looked up on NLTK's usual path (``NLTK_DATA``, then ``<venv>/nltk_data``), never fetched.
"""
from __future__ import annotations

import functools


class WordNetMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNet 3.0 reader, without its WordNet-to-WordNet sense map.

    NLTK's reader builds ``map30`` (a sense map from "WordNet 3.0" to the loaded version, used only
    for Open Multilingual WordNet) by reading index.sense twice, seconds of every worker's start-up.
    The loaded data *is* 3.0 and we use no OMW, so the map is skipped; synsets, morphy and sense
    counts are untouched.
    """
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        raise WordNetMissing(
            "WordNet data not found on NLTK's path. Run `make setup` (or "
            "`python scripts/setup_wordnet.py --dest .venv/nltk_data`); nothing is ever downloaded."
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": we use none
        return _Reader(root, None)


def _lemma_count(wn, word: str, pos: str) -> int:
    total = 0
    for s in wn.synsets(word, pos):
        for lem in s.lemmas():
            if lem.name().lower() == word:
                total += lem.count()
    return total


def sense_count(word: str, pos: str) -> int:
    """How often WordNet's sense-tagged corpus uses this exact word in this part of speech."""
    return _lemma_count(wordnet(), word.strip().lower().replace(" ", "_"), pos)


@functools.lru_cache(maxsize=65536)
def verb_lemma(surface: str, fallback: str) -> str:
    """Lemma of a verb form, preferring WordNet's most used base: riding -> ride, not rid.

    spaCy's rule lemmatiser strips -ing to a word when the stem is one (rid, din); WordNet's morphy
    lists every base it can reach, and the sense counts pick the common one.
    """
    wn = wordnet()
    cands = wn._morphy(surface.lower(), "v")
    if not cands:
        return fallback
    if len(cands) == 1:
        return cands[0]
    return max(cands, key=lambda c: (_lemma_count(wn, c, "v"), c == fallback))


@functools.lru_cache(maxsize=262144)
def is_english_word(word: str) -> bool:
    wn = wordnet()
    return any(wn._morphy(word, p) for p in ("n", "v", "a", "r"))


def senses(name: str, pos: str = "n") -> list:
    """A (possibly multi-word) name's senses, most frequent first; exact lemma matches only, when any."""
    wn = wordnet()
    key = name.strip().lower().replace(" ", "_")
    synsets = wn.synsets(key, pos)
    exact = [s for s in synsets if any(lem.name().lower() == key for lem in s.lemmas())]
    return exact or synsets


def first_synset(name: str, pos: str = "n"):
    """Most frequent sense of a (possibly multi-word) name, exact lemma matches first."""
    pool = senses(name, pos)
    return pool[0] if pool else None


def compound_forms(name: str) -> list[str]:
    """The other spellings of a compound: "surf board" -> surfboard, surf-board; "t shirt" -> t-shirt."""
    words = name.replace("-", " ").split()
    if len(words) < 2:
        return []
    forms = ["".join(words), "-".join(words), " ".join(words)]
    return [f for f in dict.fromkeys(forms) if f != name]


def is_lemma(name: str, pos: str = "n") -> bool:
    """WordNet lists this exact spelling (not only a form morphy reduces to it)."""
    key = name.strip().lower().replace(" ", "_")
    return any(lem.name().lower() == key for s in wordnet().synsets(key, pos) for lem in s.lemmas())


def wordnet_spelling(name: str, pos: str = "n") -> str | None:
    """The spelling WordNet lists for a compound it knows only closed or hyphenated, else None.

    "surf board" is no WordNet noun but "surfboard" is: captions that split a compound name the same
    thing as those that close it, provided the closed form is the kind of thing the head word names.
    """
    if is_lemma(name, pos):
        return None
    head = senses(name.replace("-", " ").split()[-1], pos)
    for form in compound_forms(name):
        if not is_lemma(form, pos):
            continue
        # the closed form must name the kind of thing its head does: "leather jacket" is no
        # "leatherjacket" (a fish), "surf board" is a surfboard (an artifact, as a board is)
        if not head or first_synset(form, pos).lexname() in {s.lexname() for s in head}:
            return form
    return None


def shares_synset(a: str, b: str, pos: str = "n") -> bool:
    """WordNet lists both spellings as lemmas of one synset (colour / color in color.n.01)."""
    ka, kb = a.strip().lower().replace(" ", "_"), b.strip().lower().replace(" ", "_")
    return any(kb in {lem.lower() for lem in s.lemma_names()}
               for s in wordnet().synsets(ka, pos) if ka in {lem.lower() for lem in s.lemma_names()})


@functools.lru_cache(maxsize=262144)
def under(synset_name: str, roots: frozenset[str]) -> str | None:
    """The first of ``roots`` that is the synset itself or one of its hypernyms (instance links too)."""
    wn = wordnet()
    seen, todo = set(), [wn.synset(synset_name)]
    while todo:
        s = todo.pop()
        if s.name() in roots:
            return s.name()
        if s.name() not in seen:
            seen.add(s.name())
            todo.extend(s.hypernyms() + s.instance_hypernyms())
    return None


@functools.lru_cache(maxsize=65536)
def has_adjective_sense(word: str) -> bool:
    wn = wordnet()
    return bool(wn.synsets(word, "a"))


@functools.lru_cache(maxsize=65536)
def is_noun_phrase(phrase: str) -> bool:
    wn = wordnet()
    return bool(wn.synsets(phrase.replace(" ", "_"), "n"))
