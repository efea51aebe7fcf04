"""Alt-text rules: which flags a caption or answer gets, as a pure function of the row's values.

Used by the report (for outputs written before the `flags` column) and by the pipeline as rows are
written, so both flag a row the same way.
"""

from __future__ import annotations

import math
import re

from vlmbatch.spec import DEFAULT_MAX_CHARS

FLAGS = ("error", "empty", "truncated", "too_long", "low_confidence", "redundant_prefix")
MAX_CHARS = DEFAULT_MAX_CHARS  # the common screen-reader guideline for alt text; one default for jobs and reports

# Per language: articles that may open the text, and the phrases a screen reader makes redundant (it
# already announces an image). English is checked for every language: the model often answers in it.
_ARTICLES = {
    "en": ("a", "an", "the"),
    "es": ("un", "una", "el", "la"),
    "fr": ("un", "une", "le", "la", "l'"),
    "de": ("ein", "eine", "das", "die", "der"),
    "it": ("un", "una", "uno", "un'", "il", "lo", "la", "l'"),
    "pt": ("um", "uma", "o", "a"),
    "nl": ("een", "de", "het"),
}
_PREFIXES = {
    "en": ("image of", "picture of", "photo of", "photograph of"),
    "es": ("imagen de", "imagen del", "foto de", "foto del", "fotografía de", "fotografia de", "fotografía del"),
    "fr": ("image de", "image d'", "image du", "image des", "photo de", "photo d'", "photo du", "photo des",
           "photographie de", "photographie d'", "photographie du", "photographie des"),
    "de": ("bild von", "bild eines", "bild einer", "foto von", "foto eines", "foto einer",
           "fotografie von", "fotografie eines", "fotografie einer", "aufnahme von"),
    "it": ("immagine di", "immagine del", "immagine della", "immagine d'", "foto di", "foto del", "foto della",
           "fotografia di", "fotografia del", "fotografia della"),
    "pt": ("imagem de", "imagem do", "imagem da", "foto de", "foto do", "foto da",
           "fotografia de", "fotografia do", "fotografia da"),
    "nl": ("afbeelding van", "foto van", "beeld van", "plaatje van", "foto met"),
}


def _pattern(lang: str) -> re.Pattern[str]:
    articles = sorted(set(_ARTICLES[lang]) | set(_ARTICLES["en"]), key=len, reverse=True)
    prefixes = sorted(set(_PREFIXES[lang]) | set(_PREFIXES["en"]), key=len, reverse=True)
    # An article ending in an apostrophe ("l'") is glued to the next word; others need a space after.
    article = "|".join(re.escape(a) + ("" if a.endswith("'") else r"\s+") for a in articles)
    prefix = "|".join(re.escape(p) + ("" if p.endswith("'") else r"\b") for p in prefixes)
    return re.compile(rf"(?:{article})?(?:{prefix})", re.IGNORECASE)


_PATTERNS = {lang: _pattern(lang) for lang in _PREFIXES}


def base_language(lang: str | None) -> str:
    """"pt-BR", "es_ES", "EN" -> "pt", "es", "en"; None or a language without rules -> "en"."""
    base = re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0] if lang else "en"
    return base if base in _PATTERNS else "en"


def has_redundant_prefix(text: str, lang: str | None = None) -> bool:
    """Whether `text` opens with "image of", "photo of"... (or its `lang` equivalent), after an article."""
    normalized = text.strip().replace("\u2019", "'")  # a typographic apostrophe as the plain one
    return _PATTERNS[base_language(lang)].match(normalized) is not None


def alt_text_flags(text: str | None, *, error: str | None = None, truncated: bool = False,
                   mean_logprob: float | None = None, lang: str | None = None,
                   max_chars: int = MAX_CHARS, min_confidence: float | None = None) -> list[str]:
    """The flags of one row, in `FLAGS` order. A failed row (`error` set) is ["error"] and nothing else;
    `low_confidence` needs both `min_confidence` and `mean_logprob` (natural log, per token)."""
    if error:
        return ["error"]
    stripped = (text or "").strip()
    found = set()
    if not stripped:
        found.add("empty")
    if truncated:
        found.add("truncated")
    if len(stripped) > max_chars:
        found.add("too_long")
    if (min_confidence is not None and mean_logprob is not None and not math.isnan(mean_logprob)
            and mean_logprob < min_confidence):
        found.add("low_confidence")
    if stripped and has_redundant_prefix(stripped, lang):
        found.add("redundant_prefix")
    return [flag for flag in FLAGS if flag in found]


# detect / segment rows: their text is `<loc>` tokens, not alt text; what makes one doubtful differs.
OBJECT_FLAGS = ("error", "empty", "truncated", "low_confidence", "parse_errors")


def object_flags(text: str | None, *, error: str | None = None, truncated: bool = False,
                 mean_logprob: float | None = None, parse_errors: int | None = None,
                 min_confidence: float | None = None) -> list[str]:
    """The flags of one detect or segment row, in `OBJECT_FLAGS` order: `empty` for no answer at all,
    `parse_errors` where some object of the answer was malformed (and dropped)."""
    if error:
        return ["error"]
    found = set(alt_text_flags(text, truncated=truncated, mean_logprob=mean_logprob,
                               min_confidence=min_confidence)) & set(OBJECT_FLAGS)
    if parse_errors:
        found.add("parse_errors")
    return [flag for flag in OBJECT_FLAGS if flag in found]
