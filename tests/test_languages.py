"""`caption --lang`: one row per image and language, the image encoded once for all, resumed by (id, lang);
and the alt-text flags each caption row is written with."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_cli
from cli_runner import invoke
from factory import real_photos
from test_cli import encoded_images

from vlmbatch.review.rules import alt_text_flags


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        real_photos()[name].convert("RGB").save(root / f"{name}.jpg")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def caption(folder, out, ckpt, *extra):
    return invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 6, "--workers", 0,
                  "--quiet", *extra)


def rows(out) -> dict[tuple, dict]:
    return {(row["id"], row["lang"]): row for row in pq.read_table(out).to_pylist()}


def test_one_row_per_image_and_language_with_one_encode_per_image(folder, tmp_path, ckpt, monkeypatch):
    out = tmp_path / "alt.parquet"
    encoded = encoded_images(monkeypatch)
    caption(folder, out, ckpt, "--lang", "en,es,fr")
    assert sum(encoded) == 3  # three decodable images, each encoded once for its three languages
    got = rows(out)
    assert set(got) == {(name, lang) for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg", "broken.jpg")
                        for lang in ("en", "es", "fr")}
    assert {row["prompt"] for key, row in got.items() if key[1] == "es"} == {"caption es"}
    assert all(got[("broken.jpg", lang)]["error"] for lang in ("en", "es", "fr"))

    alone = tmp_path / "es.parquet"
    caption(folder, alone, ckpt, "--prompt", "caption {lang}", "--lang", "es")
    assert {k: r["caption"] for k, r in rows(alone).items()} == {k: r["caption"] for k, r in got.items() if k[1] == "es"}


def test_a_language_added_later_captions_only_that_language(folder, tmp_path, ckpt, monkeypatch):
    out = tmp_path / "alt.parquet"
    caption(folder, out, ckpt, "--lang", "en,es")
    first = rows(out)
    encoded = encoded_images(monkeypatch)
    caption(folder, out, ckpt, "--lang", "en,es,de")
    assert sum(encoded) == 3  # the images are encoded again only for German
    after = rows(out)
    assert {key for key in after if key[1] == "de"} == {(key[0], "de") for key in first if key[1] == "en"}
    assert all(after[key] == row for key, row in first.items() if row["error"] is None)
    encoded.clear()
    caption(folder, out, ckpt, "--lang", "de,en")  # nothing left: languages in any order
    assert encoded == []


def test_an_output_without_languages_is_resumed_and_not_mixed_with_one(folder, tmp_path, ckpt, monkeypatch):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    assert {key[1] for key in rows(out)} == {None}
    encoded = encoded_images(monkeypatch)
    caption(folder, out, ckpt)
    assert encoded == []
    result = invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 6, "--workers", 0,
                    "--quiet", "--lang", "en,es", expect=2)
    assert "different settings" in result.output and "caption {lang}" in result.output


def test_rows_are_written_with_their_alt_text_flags(folder, tmp_path, ckpt):
    out = tmp_path / "alt.parquet"
    caption(folder, out, ckpt, "--max-chars", 5, "--min-confidence", 0)
    got = rows(out)
    assert got[("broken.jpg", None)]["flags"] == ["error"]
    for key, row in got.items():
        expected = alt_text_flags(row["caption"], error=row["error"], truncated=row["finish_reason"] == "length",
                                  mean_logprob=row["mean_logprob"], max_chars=5, min_confidence=0)
        assert row["flags"] == expected, key
        if row["error"] is None:  # every log-prob is below 0
            assert "low_confidence" in row["flags"]
            assert ("too_long" in row["flags"]) == (len(row["caption"].strip()) > 5)
            assert ("truncated" in row["flags"]) == (row["finish_reason"] == "length")
    assert any("truncated" in row["flags"] for row in got.values())


def test_bad_language_lists_are_one_line(folder, tmp_path, ckpt):
    for value, message in (("en,,en", "distinct language codes"), ("e$", "distinct language codes")):
        result = invoke("caption", folder, "--out", tmp_path / "x.parquet", "--model", ckpt, "--lang", value, expect=2)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.output
    result = invoke("vqa", folder, "--question", "what?", "--out", tmp_path / "v.parquet", "--model", ckpt,
                    "--lang", "en", expect=2)
    assert result.exit_code == 2


def test_a_lang_placeholder_needs_languages(folder, tmp_path, ckpt):
    result = invoke("caption", folder, "--out", tmp_path / "x.parquet", "--model", ckpt, "--prompt", "caption {lang}",
                    expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no lang is given" in lines[0], result.output


coco_folder = test_eval_cli.coco_folder


def test_eval_scores_the_english_captions_of_a_multilingual_output(coco_folder, tmp_path):
    predictions = tmp_path / "multi.parquet"
    rows = [{"id": str(i), "lang": lang, "caption": f"{'une photo' if lang == 'fr' else 'a photo'} number {i}",
             "error": None} for i in range(1, 5) for lang in ("fr", "en")]
    pq.write_table(pa.Table.from_pylist(rows), predictions)
    scores = tmp_path / "scores.json"
    invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", predictions, "--metrics", "bleu",
           "--out", scores)
    english = tmp_path / "en.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["lang"] == "en"]), english)
    invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", english, "--metrics", "bleu",
           "--out", tmp_path / "en.json")
    assert json.loads(scores.read_text())["Bleu_1"] == json.loads((tmp_path / "en.json").read_text())["Bleu_1"]
    only_french = tmp_path / "fr.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["lang"] == "fr"]), only_french)
    result = invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", only_french, expect=2)
    assert "the references are English" in result.output
