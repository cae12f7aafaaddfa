"""WordNet access without downloads: NLTK's reader over the files ``make setup`` lays out.

Data is looked up on NLTK's usual path (``NLTK_DATA``, then ``<venv>/nltk_data``), never fetched.
"""
from __future__ import annotations

import functools


class WordNetMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def wordnet():
    from nltk.corpus import wordnet as wn

    try:
        wn.ensure_loaded()
    except LookupError:
        raise WordNetMissing(
            "WordNet data not found on NLTK's path. Run `make setup` (or "
            "`python scripts/setup_wordnet.py --dest .venv/nltk_data`); nothing is ever downloaded."
        ) from None
    return wn


def _lemma_count(wn, word: str, pos: str) -> int:
    total = 0
    for s in wn.synsets(word, pos):
        for lem in s.lemmas():
            if lem.name().lower() == word:
                total += lem.count()
    return total


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


def first_synset(name: str, pos: str = "n"):
    """Most frequent sense of a (possibly multi-word) name, exact lemma matches first."""
    wn = wordnet()
    key = name.strip().lower().replace(" ", "_")
    synsets = wn.synsets(key, pos)
    exact = [s for s in synsets if any(lem.name().lower() == key for lem in s.lemmas())]
    pool = exact or synsets
    return pool[0] if pool else None


@functools.lru_cache(maxsize=65536)
def has_adjective_sense(word: str) -> bool:
    wn = wordnet()
    return bool(wn.synsets(word, "a"))


@functools.lru_cache(maxsize=65536)
def is_noun_phrase(phrase: str) -> bool:
    wn = wordnet()
    return bool(wn.synsets(phrase.replace(" ", "_"), "n"))
