"""Caption checks and normalisation. Each failure has a stable code (common.rejects.REJECT_CODES)."""
from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>")
_WS = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass(frozen=True)
class CaptionCheck:
    text: str | None  # the normalised caption, or None when rejected
    code: str | None = None
    reason: str | None = None


def _control_chars(s: str) -> list[str]:
    return [c for c in s if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\t\n\r"]


@functools.lru_cache(maxsize=1)
def foreign_function_words(stop_words: frozenset[str]) -> frozenset[str]:
    path = Path(__file__).parent / "data" / "foreign_function_words.txt"
    words = {w for ln in path.read_text().splitlines() if not ln.startswith("#") for w in ln.split()}
    return frozenset(words - stop_words)


def english_share(words: list[str], stop_words: frozenset[str]) -> float:
    from tagset.wordnet import is_english_word

    if not words:
        return 1.0
    known = sum(1 for w in words if w in stop_words or is_english_word(w))
    return known / len(words)


def check_caption(raw: object, max_words: int, min_english: float, stop_words: frozenset[str]) -> CaptionCheck:
    """Normalise one caption or say why it cannot be used.

    HTML entities are decoded (``&amp;`` is still English); markup, control characters, text that is
    not English and runaway lengths are rejected with their own code rather than silently repaired.
    """
    if raw is None:
        return CaptionCheck(None, "caption_null", "caption is null")
    if not isinstance(raw, str):
        return CaptionCheck(None, "caption_not_string", f"caption is {type(raw).__name__}")
    if raw == "":
        return CaptionCheck(None, "caption_empty", "caption is empty")
    if not raw.strip():
        return CaptionCheck(None, "caption_whitespace", "caption is whitespace only")
    bad = _control_chars(raw)
    if bad:
        return CaptionCheck(None, "caption_control_chars", f"control characters {sorted({hex(ord(c)) for c in bad})}")
    if _TAG.search(raw):
        return CaptionCheck(None, "caption_html", f"HTML markup {_TAG.search(raw).group(0)[:40]!r}")  # type: ignore[union-attr]
    text = _WS.sub(" ", html.unescape(raw)).strip()
    n_words = len(text.split(" "))
    if n_words > max_words:
        return CaptionCheck(None, "caption_too_long", f"{n_words} words > max_words {max_words}")
    words = [w.lower() for w in _WORD.findall(text)]
    letters = [c for w in words for c in w]
    if letters:
        non_latin = sum(1 for c in letters if not ("a" <= c <= "z") and unicodedata.name(c, "").find("LATIN") < 0)
        if non_latin / len(letters) > 0.3:
            return CaptionCheck(None, "caption_not_english", f"{non_latin}/{len(letters)} letters outside Latin script")
    if len(words) >= 4:
        foreign = sum(1 for w in words if w in foreign_function_words(stop_words))
        english = sum(1 for w in words if w in stop_words)
        if foreign >= 2 and foreign > english:
            return CaptionCheck(None, "caption_not_english",
                                f"{foreign} foreign function words vs {english} English ones")
        share = english_share(words, stop_words)
        if share < min_english:
            return CaptionCheck(None, "caption_not_english",
                                f"only {share:.0%} of words are English (min_english {min_english:.0%})")
    return CaptionCheck(text)
