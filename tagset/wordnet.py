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
    for Open Multilingual WordNet) by reading index.sense twice: ~4 s of every worker's start-up.
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
