"""Spellings of one name: closed and split compounds, British and American forms, parse slips;
and the rule that picks each id's name among its members. Used by ``vocab.wordnet.v2``.

Captions write one thing several ways ("surf board", "surfboard"; "colour", "color"), and a parser
sometimes glues a verb to its subject ("zebra standing"). WordNet decides which spellings are one
word: a split compound merges with the closed form only when WordNet lists that form, and two
spellings merge only when WordNet lists both as lemmas of one synset.
"""
from __future__ import annotations

import re
from typing import Mapping

PARTICIPLE_SUBJECTS = frozenset({"noun.animal", "noun.person"})
ACTIVITY_FILES = frozenset({"noun.act", "noun.state", "noun.event"})


def wordnet_form(name: str, pos: str) -> tuple[str | None, str | None]:
    """The WordNet entry a name WordNet lacks stands for, and why: a closed or hyphenated compound
    (``closed_compound``: "surf board" -> surfboard) or, for nouns, the subject of a participle the
    parse glued onto it (``noun_then_participle``: "zebra standing" -> zebra)."""
    from tagset.wordnet import wordnet_spelling

    form = wordnet_spelling(name, pos)
    if form:
        return form, "closed_compound"
    if pos == "n":
        noun = participle_subject(name)
        if noun:
            return noun, "noun_then_participle"
    return None, None


def participle_subject(name: str) -> str | None:
    """"zebra standing", "groom walking": an animal or a person followed by the -ing form of a verb
    whose noun senses, if any, are activities (not "brick building", "winter clothing")."""
    from tagset.wordnet import first_synset, is_lemma, senses, wordnet

    words = name.split()
    if len(words) < 2 or not words[-1].endswith("ing") or is_lemma(name, "n"):
        return None
    if not wordnet()._morphy(words[-1], "v"):
        return None
    as_noun = senses(words[-1], "n")
    if as_noun and as_noun[0].lexname() not in ACTIVITY_FILES:
        return None
    noun = " ".join(words[:-1])
    s = first_synset(noun, "n")
    return noun if s is not None and s.lexname() in PARTICIPLE_SUBJECTS else None


# British spellings and their American forms, word by word (colour, centre, organise, travelled,
# jewellery, catalogue, licence, grey, tyre, moustache, pyjamas); WordNet must list both spellings
# in one synset before they merge, so a rule that also rewrites other words is harmless
_BRITISH = [(re.compile(p), r) for p, r in (
    (r"yre(?=s?$)", "ire"), (r"our(?=(s|ed|ing|ful|ite|ites|less)?$)", "or"), (r"(?<=[^aeiou])re(?=s?$)", "er"),
    (r"is(?=(e|ed|es|ing|ation|ations)$)", "iz"), (r"ys(?=(e|ed|es|ing)$)", "yz"),
    (r"ll(?=(ed|ing|er|ers|ery)$)", "l"), (r"elery$", "elry"), (r"ae", "e"), (r"oe", "e"),
    (r"ogue$", "og"), (r"ence$", "ense"), (r"^grey", "gray"), (r"^moustach", "mustach"),
    (r"^pyjama", "pajama"),
)]


def american(name: str) -> str:
    words = []
    for w in name.split():
        for pattern, repl in _BRITISH:
            w = pattern.sub(repl, w)
        words.append(w)
    return " ".join(words)


def spelling_variant(a: str, b: str) -> bool:
    """hot dog / hotdog / hot-dog, colour / color, grey / gray, theatre / theater, jewellery / jewelry."""
    if a.replace(" ", "").replace("-", "") == b.replace(" ", "").replace("-", ""):
        return True
    return american(a) == american(b)


def merge_spellings(groups: dict[str, list[str]], pos_of: dict[str, str], kind_of: dict[str, str]) -> list[dict]:
    """Merge a later group into an earlier one when two of their names are spellings of one word
    (``spelling_variant``) that WordNet lists as lemmas of one synset. Their first senses can differ
    ("colour" alone is first the colouring material), which is why synset grouping missed them."""
    from tagset.wordnet import is_lemma, wordnet

    wn = wordnet()
    order = {k: i for i, k in enumerate(groups)}
    where = {n: k for k, g in groups.items() for n in g}
    decisions = []
    for n in list(where):
        pos = pos_of[n]
        if not is_lemma(n, pos):
            continue
        key = n.replace(" ", "_")
        for syn in wn.synsets(key, pos):
            if not any(lem.lower() == key for lem in syn.lemma_names()):
                continue
            for lem in syn.lemma_names():
                m = lem.lower().replace("_", " ")
                if m == n or m not in where or kind_of[m] != kind_of[n] or where[m] == where[n]:
                    continue
                if not spelling_variant(n, m):
                    continue
                keep, gone = sorted((where[n], where[m]), key=order.__getitem__)
                for x in groups[gone]:
                    decisions.append({"tag": x, "action": "merge", "into": groups[keep][0], "rule": "spelling_variant",
                                      "synset": syn.name()})
                    where[x] = keep
                groups[keep].extend(groups[gone])
                groups[gone] = []
    return decisions


def canonical_names(groups: list[list[str]], images: Mapping[str, int], pos_of: dict[str, str],
                    synset_of: dict[str, str | None], short_name_share: float) -> tuple[list[list[str]], list[dict]]:
    """Each id's name, by a stated rule; every member stays a synonym.

    The most frequent member names the id, with two exceptions: a compound WordNet knows only closed
    or hyphenated takes that spelling (surf board -> surfboard, rule ``wordnet_spelling``), as a
    noun-plus-participle parse takes its noun (zebra standing -> zebra); and a
    shorter member that is a lemma of the id's synset takes the name when it is the more common word
    for that sense in English (WordNet's sense-tagged corpus has it at least twice and more often than
    the leader) and common enough here (at least ``short_name_share`` of the leader's images): plane
    over airplane (corpus 21 : 5), rule ``short_lemma``.
    A name that is not itself a member is added to ``synset_of``.
    """
    from tagset.wordnet import wordnet

    taken = {m for g in groups for m in g}
    out, decisions = [], []
    for g in groups:
        lead = g[0]
        name, rule = lead, None
        form, why = wordnet_form(lead, pos_of[lead])
        if form and (form in g or form not in taken):  # never a name another id already has
            name, rule = form, ("wordnet_spelling" if why == "closed_compound" else why)
        syn = synset_of.get(lead)
        if syn:
            used = {lem.name().lower().replace("_", " "): lem.count() for lem in wordnet().synset(syn).lemmas()}
            short = [m for m in g[1:] if m in used and len(m) < len(name) and used[m] >= 2
                     and used[m] > used.get(name, used.get(lead, 0))
                     and images[m] >= short_name_share * images[lead]]
            if short:
                name, rule = min(short, key=lambda m: (len(m), -images[m], m)), "short_lemma"
        if rule is None:
            out.append(g)
            continue
        synset_of.setdefault(name, syn)
        out.append([name, *[m for m in g if m != name]])
        decisions.append({"tag": name, "action": "name", "rule": rule, "over": lead})
    return out, decisions
