"""The alt-text rules: each flag, each language's redundant openings, and the order flags come in."""

from __future__ import annotations

import pytest

from vlmbatch.review.rules import FLAGS, MAX_CHARS, alt_text_flags, base_language, has_redundant_prefix


def test_a_good_caption_has_no_flags():
    assert alt_text_flags("A brown dog catching a frisbee in a park", mean_logprob=-0.2, min_confidence=-1.0) == []


def test_an_error_row_is_error_and_nothing_else():
    assert alt_text_flags(None, error="cannot decode image", truncated=True, mean_logprob=-9.0,
                          min_confidence=-1.0) == ["error"]
    assert alt_text_flags("photo of " + "x" * 300, error="boom") == ["error"]


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t"])
def test_no_text_is_empty(text):
    assert alt_text_flags(text) == ["empty"]


def test_truncated_follows_the_argument():
    assert alt_text_flags("a dog on a", truncated=True) == ["truncated"]
    assert alt_text_flags("a dog on a", truncated=False) == []


def test_too_long_counts_characters_of_the_stripped_text():
    assert MAX_CHARS == 125
    assert alt_text_flags("x" * 125) == []
    assert alt_text_flags("  " + "x" * 125 + "  ") == []
    assert alt_text_flags("x" * 126) == ["too_long"]
    assert alt_text_flags("x" * 50, max_chars=40) == ["too_long"]


def test_low_confidence_needs_both_the_threshold_and_the_score():
    assert alt_text_flags("a dog", mean_logprob=-2.0, min_confidence=-1.0) == ["low_confidence"]
    assert alt_text_flags("a dog", mean_logprob=-0.5, min_confidence=-1.0) == []
    assert alt_text_flags("a dog", mean_logprob=-1.0, min_confidence=-1.0) == []  # below, not at
    assert alt_text_flags("a dog", mean_logprob=-2.0) == []
    assert alt_text_flags("a dog", min_confidence=-1.0) == []
    assert alt_text_flags("a dog", mean_logprob=float("nan"), min_confidence=-1.0) == []


@pytest.mark.parametrize("lang, text", [
    (None, "image of a dog"), (None, "Picture of a cat"), (None, "A photo of two men"),
    (None, "  the photograph of a bridge"), ("en", "An image of a lake"), ("en-GB", "PHOTO OF a bus"),
    ("es", "Imagen de un perro"), ("es", "una foto de un gato"), ("es", "Fotografía de una playa"),
    ("es_MX", "foto del puente"),
    ("fr", "Une photo de chat"), ("fr", "L'image d'un chien"), ("fr", "photographie du port"),
    ("fr", "l\u2019image d\u2019une rue"),
    ("de", "Ein Bild von einem Hund"), ("de", "Foto eines Autos"), ("de", "eine Aufnahme von Bergen"),
    ("it", "Una foto di un gatto"), ("it", "immagine della spiaggia"), ("it", "L'immagine di un cane"),
    ("pt", "Uma foto de um cachorro"), ("pt-BR", "imagem do mar"), ("pt", "Fotografia da cidade"),
    ("nl", "Een foto van een hond"), ("nl", "afbeelding van een kat"), ("nl", "Het beeld van een brug"),
    ("fr", "photo of a dog"),  # English openings count in every language
])
def test_redundant_openings_in_each_language(lang, text):
    assert alt_text_flags(text, lang=lang) == ["redundant_prefix"]


@pytest.mark.parametrize("lang, text", [
    (None, "photographer holding a camera"), (None, "a dog looking at a photo of a cat"),
    (None, "imagery of the coast"), (None, "an image"), ("es", "perro con una foto de su dueño"),
    ("fr", "un chat noir"), ("de", "Bilder an einer Wand"), ("nl", "een fotograaf"),
    (None, "Imagen de un perro"),  # another language's opening is not English's
])
def test_texts_that_only_mention_a_photo_are_not_flagged(lang, text):
    assert not has_redundant_prefix(text, lang)


def test_languages_are_matched_by_their_base_code():
    assert [base_language(x) for x in ("pt-BR", "es_ES", "EN", None, "xx")] == ["pt", "es", "en", "en", "en"]


def test_flags_come_in_the_declared_order():
    assert FLAGS == ("error", "empty", "truncated", "too_long", "low_confidence", "redundant_prefix")
    flags = alt_text_flags("photo of " + "y" * 200, truncated=True, mean_logprob=-5.0, min_confidence=-1.0)
    assert flags == ["truncated", "too_long", "low_confidence", "redundant_prefix"]
    assert alt_text_flags(" ", truncated=True, mean_logprob=-5.0, min_confidence=-1.0) == [
        "empty", "truncated", "low_confidence"]
