"""`vlmbatch report` of detect / segment outputs: every thumbnail under an SVG overlay of its objects'
boxes, labels and masks. Outputs come from real runs of the scripted checkpoint (tests/test_detect.py)
or are written by hand with the sink's schema (hostile labels); pages are read raw and opened in
headless Chromium, where boxes must land on the picture, labels show as text and nothing is fetched."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
import test_detect
import test_report
from selenium.webdriver.common.by import By
from test_detect import SIZES, by_id, run
from test_report import data_cards, no_dialog, open_page, requests, summary_count
from test_vae import write_random_vae

from vlmbatch.review.overlays import mask_png
from vlmbatch.review.report import build_report
from vlmbatch.sinks.rows import SCHEMAS

folder, detector, segmenter = test_detect.folder, test_detect.detector, test_detect.segmenter  # fixtures
browser = test_report.browser
HOSTILE_LABELS = ["<script>window.__pwned = 1; alert(1)</script>", '"><img src=x onerror=alert(1)>']

# Each drawn box and its picture, as the browser laid them out (CSS pixels).
LAYOUT = """
return [...document.querySelectorAll("#cards article.card")].map((card) => {
  const picture = card.querySelector("svg.overlay image.picture, svg.overlay rect.blank");
  const at = (node) => { const r = node.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
  return {id: card.dataset.id, picture: picture ? at(picture) : null,
          boxes: [...card.querySelectorAll("svg.overlay rect.box")].map(at),
          labels: [...card.querySelectorAll("svg.overlay text.box-label")].map((t) => t.textContent),
          masks: [...card.querySelectorAll("svg.overlay rect.seg")].map((tint) => {
            const image = card.querySelector(tint.getAttribute("mask").slice(4, -1) + " image");
            return [image.getAttribute("href"), at(tint), getComputedStyle(tint).fillOpacity]; }),
          listed: [...card.querySelectorAll(".objects-list .label")].map((l) => l.textContent)};
});"""


def assert_boxes_on_the_picture(shown: dict, row: dict) -> None:
    """Each rect's box relative to the drawn picture is the object's box_normalized, within 1.5 px."""
    x, y, width, height = shown["picture"]
    assert abs(width / height - row["width"] / row["height"]) < 0.02  # the picture keeps its aspect
    assert len(shown["boxes"]) == len(row["objects"])
    for (bx, by, bw, bh), o in zip(shown["boxes"], row["objects"]):
        x0, y0, x1, y1 = o["box_normalized"]
        assert bx - x == pytest.approx(x0 * width, abs=1.5) and by - y == pytest.approx(y0 * height, abs=1.5)
        assert bw == pytest.approx((x1 - x0) * width, abs=1.5) and bh == pytest.approx((y1 - y0) * height, abs=1.5)


def assert_labels(shown: dict, row: dict) -> None:
    assert shown["listed"] == [o["label"] for o in row["objects"]]
    for text, o in zip(shown["labels"], row["objects"]):
        label, score = text.rsplit(" ", 1)
        assert label == o["label"] and float(score) == pytest.approx(o["score"], abs=0.006)


def assert_offline(driver) -> None:
    urls = requests(driver)
    assert urls and all(url.startswith(("file:", "data:")) for url in urls), urls
    refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused == []  # nothing of the page's own (SVG images and masks included) is refused


def test_browser_draws_one_box_per_object_on_the_thumbnail(browser, folder, detector, tmp_path):
    out = tmp_path / "boxes.parquet"
    run("detect", folder, out, detector, "--objects", "cat ; dog")
    rows = by_id(out)
    done = build_report(out, tmp_path / "r.html", source=str(folder))
    assert (done.images, done.errors, done.thumbnails) == (3, 1, 2)
    open_page(browser, tmp_path / "r.html")
    shown = {card["id"]: card for card in browser.execute_script(LAYOUT)}
    assert list(shown)[0] == "broken.jpg" and shown["broken.jpg"]["boxes"] == []  # the error, first, no overlay
    assert browser.find_elements(By.CSS_SELECTOR, 'article[data-id="broken.jpg"] .thumb.placeholder')
    for name in SIZES:
        card, row = shown[f"{name}.png"], rows[f"{name}.png"]
        assert_boxes_on_the_picture(card, row)
        assert_labels(card, row)
        assert [label.rsplit(" ", 1)[0] for label in card["labels"]] == ["cat", "black dog"]
        assert card["masks"] == []  # detect: boxes only
    pictures = browser.execute_script("return [...document.querySelectorAll('svg.overlay image.picture')]"
                                      ".map((i) => i.getAttribute('href'))")
    assert len(pictures) == 2 and all(href.startswith("data:image/jpeg;base64,") for href in pictures)
    assert "2 objects · 0 parse errors" in browser.find_element(By.CSS_SELECTOR, 'article[data-id="wide.png"]').text
    assert_offline(browser)


def test_browser_draws_the_masks_of_a_segment_run_with_a_vae(browser, folder, segmenter, tmp_path):
    out = tmp_path / "masks.parquet"
    run("segment", folder, out, segmenter, "--objects", "cat", "--vae", write_random_vae(tmp_path / "vae.npz", 3))
    rows = by_id(out)
    build_report(out, tmp_path / "r.html", source=str(folder), embed=False)  # pictures from r_files/ ('self')
    open_page(browser, tmp_path / "r.html")
    shown = {card["id"]: card for card in browser.execute_script(LAYOUT)}
    for name, (width, height) in SIZES.items():
        card, row = shown[f"{name}.png"], rows[f"{name}.png"]
        assert_boxes_on_the_picture(card, row)
        assert_labels(card, row)
        ((href, at, opacity),) = card["masks"]  # one object: one tint over the picture, cut out by its mask
        assert at == pytest.approx(card["picture"], abs=0.5) and 0 < float(opacity) < 1
        assert href.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
        assert png.mode == "L" and png.size == (width, height)  # small images: not shrunk
        rle = row["objects"][0]["mask"]
        expected = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(np.asarray(png) > 127, expected.astype(bool))
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.overlay rect.seg")) == 2
    loaded = browser.execute_script("return [...document.querySelectorAll('svg.overlay image.picture')]"
                                    ".map((i) => i.getAttribute('href'))")
    assert sorted(loaded) == ["r_files/1.jpg", "r_files/2.jpg"]
    assert_offline(browser)


def test_segment_without_a_vae_has_boxes_and_no_masks(folder, segmenter, tmp_path):
    out = tmp_path / "codes.parquet"
    run("segment", folder, out, segmenter, "--objects", "cat")
    build_report(out, tmp_path / "r.html")
    cards = {card["id"]: card for card in data_cards((tmp_path / "r.html").read_text())}
    assert [o[0] for o in cards["tall.png"]["o"]] == ["cat"] and cards["tall.png"]["o"][0][3] is None
    assert cards["tall.png"]["s"] == [30, 90] and "s" not in cards["broken.jpg"]


def hostile_output(path):
    """A detect output written by hand with the sink's schema: hostile labels, a row with parse errors."""
    def row(id, labels, parse_errors=0, mean=-0.2, error=None):
        objects = None if error else [{"label": label, "score": -0.5, "box": [10.0, 20.0, 50.0, 60.0],
                                       "box_normalized": [0.1, 0.25, 0.5, 0.75]} for label in labels]
        return {"id": id, "text": None if error else " ; ".join(labels), "objects": objects,
                "parse_errors": None if error else parse_errors, "width": None if error else 100,
                "height": None if error else 80, "error": error, "prompt": "detect x", "num_tokens": 9,
                "finish_reason": "error" if error else "eos", "mean_logprob": None if error else mean}
    rows = [row("clean.jpg", ["cat"], mean=-0.9), row("hostile.jpg", HOSTILE_LABELS, mean=-0.1),
            row("doubtful.jpg", ["dog"], parse_errors=2, mean=-0.05), row("none.jpg", [], mean=-0.3),
            row("failed.jpg", [], error="cannot decode image")]
    schema = SCHEMAS["detect"]
    pq.write_table(pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows],
                                        schema=schema), path)
    return path


def test_overlay_data_is_escaped_and_parse_errors_are_doubtful(tmp_path):
    done = build_report(hostile_output(tmp_path / "boxes.parquet"), tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<script>window.__pwned" not in html and "<img src=x" not in html and html.count("<script>") == 1
    cards = data_cards(html)
    # The error, then flagged rows (no answer at all; parse errors) least confident first, then the rest.
    assert [c["id"] for c in cards] == ["failed.jpg", "none.jpg", "doubtful.jpg", "clean.jpg", "hostile.jpg"]
    hostile = cards[-1]
    assert [o[0] for o in hostile["o"]] == HOSTILE_LABELS  # the JSON holds the labels exactly
    assert hostile["s"] == [100, 80] and hostile["o"][0][1:] == [-0.5, [0.1, 0.25, 0.5, 0.75], None]
    assert cards[2]["pe"] == 2 and cards[2]["r"][0][5] == ["parse_errors"] and cards[1]["r"][0][5] == ["empty"]
    assert done.flags == {"error": 1, "empty": 1, "truncated": 0, "low_confidence": 0, "parse_errors": 1}
    assert summary_count(html, "objects") == 4 and summary_count(html, "parse_errors") == 1
    assert "objects per image" in html and "detections from" in html


def test_browser_shows_hostile_labels_as_text_and_runs_none(browser, tmp_path):
    build_report(hostile_output(tmp_path / "boxes.parquet"), tmp_path / "r.html")
    open_page(browser, tmp_path / "r.html")
    shown = {card["id"]: card for card in browser.execute_script(LAYOUT)}
    hostile = shown["hostile.jpg"]
    assert hostile["labels"] == [label + " -0.50" for label in HOSTILE_LABELS] and hostile["listed"] == HOSTILE_LABELS
    assert len(hostile["boxes"]) == 2 and hostile["picture"]  # no --source: boxes over a blank of the image's shape
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], [onerror], #cards script')"
                                  ".length") == 0
    assert no_dialog(browser)
    browser.find_element(By.CSS_SELECTOR, 'button[data-flag="parse_errors"]').click()
    assert [c["id"] for c in browser.execute_script(LAYOUT)] == ["doubtful.jpg"]
    assert_offline(browser)


def test_a_mask_is_a_small_grayscale_png_of_the_thumbnails_size():
    full = np.zeros((500, 1000), dtype=np.uint8)
    full[100:300, 200:600] = 1
    rle = coco_mask.encode(np.asfortranarray(full))
    png = Image.open(io.BytesIO(mask_png({"size": rle["size"], "counts": rle["counts"].decode()})))
    assert png.format == "PNG" and png.mode == "L" and png.size == (256, 128)
    pixels = np.asarray(png)
    assert pixels[40, 100] == 255 and pixels[10, 10] == 0 and pixels[40, 200] == 0
    assert mask_png({"size": [4, 4], "counts": coco_mask.encode(np.zeros((4, 4), np.uint8, order="F"))["counts"]}) \
        is None  # an empty mask: nothing to draw


@pytest.mark.parametrize("case", ["text without objects", "max chars"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    from vlmbatch.cli import app

    if case == "text without objects":
        pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "x.parquet")
        args, message = [], "caption or answer column (or text and objects)"
    else:
        hostile_output(tmp_path / "x.parquet")
        args, message = ["--max-chars", "50"], "--max-chars is for captions and answers"
    result = test_report.runner.invoke(app, ["report", str(tmp_path / "x.parquet"), "--html",
                                             str(tmp_path / "r.html"), *args])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output and not (tmp_path / "r.html").exists()


def segment_output(path, rows: int, side: int = 1500):
    """`rows` segment rows of a `side` x `side` image, each with one elliptic mask (COCO RLE)."""
    yy, xx = np.mgrid[:side, :side]
    full = (((xx - side / 2) / (side / 3)) ** 2 + ((yy - side / 2) / (side / 4)) ** 2 < 1).astype(np.uint8)
    counts = coco_mask.encode(np.asfortranarray(full))["counts"].decode()
    objects = [{"label": "cat", "score": -0.1, "box": [0.0, 0.0, 1.0, 1.0], "box_normalized": [0.1, 0.2, 0.9, 0.8],
                "seg_codes": list(range(16)), "mask": {"size": [side, side], "counts": counts}}]
    schema = SCHEMAS["segment"]
    table = pa.Table.from_pylist([{"id": f"{n:05d}.jpg", "text": "cat", "objects": objects, "parse_errors": 0,
                                   "width": side, "height": side, "mean_logprob": -0.1} for n in range(rows)],
                                 schema=schema)
    pq.write_table(table, path)
    return path


def test_masks_are_kept_out_of_memory_as_rows_grow(tmp_path):
    import tracemalloc

    from vlmbatch.review.outputs import read_output
    from vlmbatch.review.spool import Spool

    peaks = {}
    for rows in (20, 320):
        out = segment_output(tmp_path / f"{rows}.parquet", rows)
        with Spool() as masks:
            tracemalloc.start()
            data = read_output(out, masks=masks)
            peaks[rows] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert all(isinstance(o.mask, int) for row in data.rows() for o in row.objects)  # spooled handles
            assert masks.read(data.cards[-1].rows[0].objects[0].mask).startswith(b"\x89PNG")
    # 300 rows more cost a few KB each (the row, its object, its card): no mask is held, neither decoded
    # (2.25 MB each) nor as RLE, nor as the PNG the page will embed.
    assert (peaks[320] - peaks[20]) / 300 < 4096, peaks
