"""`vlmbatch report`: the review page of a job's output, built from Parquet written as the sink writes
it, read raw (counts, order, escaping, the CSP) and opened in Debian's headless Chromium (what a person
sees: rows worst first, filters, pages, hostile text as text, no request leaving the page)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_data
from factory import real_photos
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.sinks.rows import CAPTION_SCHEMA, VQA_SCHEMA
from vlmbatch.review.report import build_report
from vlmbatch.sinks.dataset_dir import LOCK_NAME

HOSTILE_TEXT = '<script>window.__pwned = "caption"; alert(1)</script>'
HOSTILE_NAME = '"><img src=x onerror=alert(1)>.jpg'
# The columns issue 31 adds to the sink's schema, where it lacks them (older outputs have none of them).
NEW_FIELDS = [pa.field("lang", pa.string()), pa.field("mean_logprob", pa.float32()),
              pa.field("min_logprob", pa.float32()), pa.field("flags", pa.list_(pa.string()))]
runner = CliRunner()


def caption_row(id, caption, *, lang="en", mean=-0.3, error=None, flags=None, finish="eos", **extra) -> dict:
    return {"id": id, "caption": caption, "error": error, "prompt": f"caption {lang}", "num_tokens": 9,
            "finish_reason": "error" if error else finish, "image_version": None, "lang": lang,
            "mean_logprob": mean, "min_logprob": None if mean is None else mean - 1, "flags": flags, **extra}


def write_output(path: Path, rows: list[dict], schema: pa.Schema = CAPTION_SCHEMA, extra=NEW_FIELDS) -> Path:
    schema = pa.schema([*schema, *(field for field in extra if field.name not in schema.names)])
    pq.write_table(pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows],
                                        schema=schema), path)
    return path


def image_folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    photos = list(real_photos().values())
    for number, name in enumerate(names):
        photos[number % len(photos)].convert("RGB").save(root / name, "JPEG")
    return root


def data_cards(html: str) -> list[dict]:
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


def card_ids(html: str) -> list[str]:
    return [card["id"] for card in data_cards(html)]


def summary_count(html: str, name: str) -> int:
    return int(re.search(rf'id="count-{name}">(\d+)<', html).group(1))


def mixed_rows() -> list[dict]:
    """One image of each kind, given in the best-first order so that worst-first has to reorder them."""
    return [caption_row("clean.jpg", "A brown dog on the grass", mean=-0.1),
            caption_row("unsure.jpg", "A cat on a chair", mean=-2.5),
            caption_row("sure.jpg", "Two bicycles by a wall", mean=-0.05),
            caption_row("long.jpg", "x" * 140, mean=-0.2),
            caption_row("prefix.jpg", "A photo of a harbour at dusk", mean=-0.3),
            caption_row("broken.jpg", None, mean=None, error="cannot decode image: truncated file")]


# The error, then flagged rows (least confident first), then the rest by confidence.
WORST_FIRST = ["broken.jpg", "prefix.jpg", "long.jpg", "unsure.jpg", "clean.jpg", "sure.jpg"]


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, Path]:
    out = write_output(tmp_path / "alt.parquet", mixed_rows())
    images = image_folder(tmp_path / "photos", [r["id"] for r in mixed_rows() if r["id"] != "broken.jpg"])
    return out, images


# -- the page as written -------------------------------------------------------------------------------


def test_rows_come_worst_first_with_the_summary_counts(mixed, tmp_path):
    out, images = mixed
    done = build_report(out, tmp_path / "report.html", source=str(images))
    html = (tmp_path / "report.html").read_text()
    assert card_ids(html) == WORST_FIRST
    assert (summary_count(html, "rows"), summary_count(html, "errors"), summary_count(html, "thumbnails")) == (6, 1, 5)
    assert {flag: summary_count(html, flag) for flag in done.flags} == {
        "error": 1, "empty": 0, "truncated": 0, "too_long": 1, "low_confidence": 0, "redundant_prefix": 1}


def test_min_confidence_reflags_and_the_flags_column_is_used_as_written(tmp_path):
    rows = mixed_rows()
    rows[0]["flags"] = ["truncated"]  # the job's own flags, kept as written unless thresholds are given
    out = write_output(tmp_path / "alt.parquet", [{**r, "flags": r["flags"] or []} for r in rows])
    kept = build_report(out, tmp_path / "kept.html")
    assert kept.flags["truncated"] == 1 and kept.flags["too_long"] == 0
    redone = build_report(out, tmp_path / "redone.html", min_confidence=-1.0, max_chars=20)
    assert redone.flags["truncated"] == 0 and redone.flags["low_confidence"] == 1
    assert redone.flags["too_long"] == 4  # all but "A cat on a chair" (16 characters) and the error
    assert card_ids((tmp_path / "redone.html").read_text())[:2] == ["broken.jpg", "unsure.jpg"]


def test_max_chars_alone_keeps_the_jobs_low_confidence_flags(tmp_path):
    """A reviewer's --max-chars re-judges the length; the job's confidence threshold stays as it flagged."""
    rows = [caption_row("unsure.jpg", "a cat", mean=-3.0, flags=["low_confidence"]),
            caption_row("sure.jpg", "a cat sitting on a red chair", mean=-0.1, flags=[])]
    out = write_output(tmp_path / "alt.parquet", rows)
    redone = build_report(out, tmp_path / "redone.html", max_chars=10)
    assert redone.flags["low_confidence"] == 1 and redone.flags["too_long"] == 1
    assert build_report(out, tmp_path / "strict.html", min_confidence=-0.05).flags["low_confidence"] == 2


def test_thumbnails_beside_a_page_whose_name_needs_escaping(mixed, tmp_path):
    out, images = mixed
    build_report(out, tmp_path / "run#3.html", source=str(images), embed=False)
    urls = [card["t"] for card in data_cards((tmp_path / "run#3.html").read_text()) if card["t"]]
    assert urls and all(url.startswith("run%233_files/") for url in urls)  # not a fragment of the page's URL
    assert all((tmp_path / "run#3_files" / url.split("/")[-1]).is_file() for url in urls)


def test_source_is_opened_as_the_job_opened_it(tmp_path):
    """A dataset captioned with --id-column: the report finds its images with the same option."""
    import datasets

    photos = list(real_photos().values())[:3]
    buffers = []
    for photo in photos:
        data = io.BytesIO()
        photo.convert("RGB").save(data, "JPEG")
        buffers.append({"bytes": data.getvalue(), "path": None})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"uid": ["u0", "u1", "u2"], "image": buffers}).cast_column(
        "image", datasets.Image()).save_to_disk(saved)
    out = write_output(tmp_path / "alt.parquet", [caption_row(f"u{i}", "a photo") for i in range(3)])
    assert build_report(out, tmp_path / "plain.html", source=str(saved)).thumbnails == 0
    matched = build_report(out, tmp_path / "ids.html", source=str(saved), source_options={"id_column": "uid"})
    assert matched.thumbnails == 3
    result = runner.invoke(app, ["report", str(out), "--html", str(tmp_path / "cli.html"), "--source", str(saved),
                                 "--id-column", "uid", "--quiet"])
    assert result.exit_code == 0 and "no image" not in result.output


def test_several_languages_of_an_image_are_one_card(tmp_path):
    rows = [caption_row("dog.jpg", "A dog", lang="en", mean=-0.2), caption_row("dog.jpg", "Un perro", lang="es"),
            caption_row("dog.jpg", "Une photo de chien", lang="fr", mean=-0.4), caption_row("cat.jpg", "A cat")]
    out = write_output(tmp_path / "alt.parquet", rows)
    html_path = tmp_path / "r.html"
    build_report(out, html_path)
    cards = data_cards(html_path.read_text())
    assert [c["id"] for c in cards] == ["dog.jpg", "cat.jpg"]  # the French prefix makes dog.jpg the worse
    assert [(r[0], r[2], r[5]) for r in cards[0]["r"]] == [
        ("en", "A dog", []), ("es", "Un perro", []), ("fr", "Une photo de chien", ["redundant_prefix"])]
    assert 'id="lang"' in html_path.read_text() and ">es</option>" in html_path.read_text()


def test_vqa_output_groups_questions_and_an_old_output_without_new_columns_reads(tmp_path):
    rows = [{"id": "a.jpg", "question_id": str(n), "question": q, "answer": a, "error": None}
            for n, (q, a) in enumerate([("what color?", "red"), ("how many?", ""), ("where?", "park"),
                                        ("<iframe src=javascript:alert(1)>?", "no")])]
    before_issue_31 = pa.schema([VQA_SCHEMA.field(name) for name in ("id", "question_id", "question", "answer",
                                                                     "error")])
    out = write_output(tmp_path / "vqa.parquet", rows, before_issue_31, extra=[])
    done = build_report(out, tmp_path / "vqa.html")
    html = (tmp_path / "vqa.html").read_text()
    assert (done.rows, done.images, done.flags["empty"]) == (4, 1, 1)
    assert [r[1] for r in data_cards(html)[0]["r"]][:3] == ["what color?", "how many?", "where?"]
    assert "<iframe" not in html and "\\u003ciframe src=javascript:alert(1)\\u003e?" in html
    assert '<option value="confidence">' not in html  # no confidence column: nothing to sort by


def test_a_dataset_folder_reads_as_one_output_with_each_key_latest(tmp_path):
    folder = tmp_path / "alt"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    write_output(folder / "part-20261207T000000000000Z-1-aaaaaaaa-000000.parquet",
                 [caption_row("a.jpg", None, error="file not found"), caption_row("b.jpg", "A boat")])
    write_output(folder / "part-20261207T000000000000Z-1-aaaaaaaa-000001.parquet", [caption_row("a.jpg", "An apple")])
    done = build_report(folder, tmp_path / "r.html")
    assert (done.rows, done.errors) == (2, 0)
    assert sorted(r["r"][0][2] for r in data_cards((tmp_path / "r.html").read_text())) == ["A boat", "An apple"]


def test_siglip_score_is_shown_and_sortable(tmp_path):
    rows = [caption_row("a.jpg", "A cat", siglip_prob=0.9), caption_row("b.jpg", "A dog", siglip_prob=0.1),
            caption_row("c.jpg", "A cow", mean=float("nan"), siglip_prob=float("inf"))]  # shown as unknown
    out = write_output(tmp_path / "alt.parquet", rows)  # the caption schema has the SigLIP columns
    build_report(out, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert '<option value="siglip">lowest siglip_prob</option>' in html
    build_report(write_output(tmp_path / "unscored.parquet", mixed_rows()), tmp_path / "unscored.html")
    assert 'value="siglip"' not in (tmp_path / "unscored.html").read_text()  # columns all null: not scored yet
    assert [c["r"][0][7] and round(c["r"][0][7], 2) for c in data_cards(html)] == [0.9, 0.1, None]
    assert data_cards(html)[2]["r"][0][3] is None


def test_hostile_strings_are_escaped_in_the_raw_page(tmp_path):
    rows = [caption_row(HOSTILE_NAME, HOSTILE_TEXT), caption_row("q.jpg", "</script><script>alert(2)</script>",
                                                                   lang='"><svg onload=alert(3)>')]
    out = write_output(tmp_path / "alt.parquet", rows)
    images = image_folder(tmp_path / "photos", [HOSTILE_NAME])
    build_report(out, tmp_path / "r.html", source=str(images))
    html = (tmp_path / "r.html").read_text()
    assert "<script>window.__pwned" not in html and "alert(2)</script>" not in html
    assert "<img src=x" not in html and "<svg onload" not in html
    assert html.count("<script>") == 1  # the page's own, and only it
    assert [c["id"] for c in data_cards(html)][0] == HOSTILE_NAME  # the JSON still holds the text exactly
    assert data_cards(html)[0]["t"].startswith("data:image/jpeg;base64,")


def test_the_policy_allows_exactly_the_inline_script_and_style_and_nothing_remote(mixed, tmp_path):
    out, images = mixed
    build_report(out, tmp_path / "r.html", source=str(images))
    html = (tmp_path / "r.html").read_text()
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html).group(1)
    policy = policy.replace("&#39;", "'")
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives == {"default-src": "'none'", "script-src": digest(script), "style-src": digest(style),
                          "img-src": "data:", "base-uri": "'none'", "form-action": "'none'"}
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


def test_thumbnails_are_small_jpegs_embedded_or_in_report_files(mixed, tmp_path):
    out, images = mixed
    build_report(out, tmp_path / "embedded.html", source=str(images))
    for card in data_cards((tmp_path / "embedded.html").read_text()):
        if card["id"] == "broken.jpg":
            assert card["t"] is None  # no image: a placeholder
            continue
        image = Image.open(io.BytesIO(base64.b64decode(card["t"].split(",", 1)[1])))
        assert image.format == "JPEG" and max(image.size) <= 256 and max(image.size) >= 200
    build_report(out, tmp_path / "report.html", source=str(images), embed=False)
    html = (tmp_path / "report.html").read_text()
    urls = [card["t"] for card in data_cards(html) if card["t"]]
    assert len(urls) == 5 and all(re.fullmatch(r"report_files/\d+\.jpg", url) for url in urls)
    assert all(Image.open(tmp_path / url).format == "JPEG" for url in urls)
    assert "img-src data: 'self'" in html.replace("&#39;", "'")


def test_without_source_every_card_has_a_placeholder(mixed, tmp_path):
    out, _ = mixed
    done = build_report(out, tmp_path / "r.html")
    assert done.thumbnails == 0 and all(c["t"] is None for c in data_cards((tmp_path / "r.html").read_text()))


# -- the command -----------------------------------------------------------------------------------------


def test_the_command_writes_the_page_and_says_what_it_holds(mixed, tmp_path):
    out, images = mixed
    result = runner.invoke(app, ["report", str(out), "--source", str(images), "--html", str(tmp_path / "r.html"),
                                 "--page-size", "2"])
    assert result.exit_code == 0, result.output
    assert "6 rows, 6 images (5 with thumbnails), 1 errors" in result.output
    assert '"pageSize": 2' in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("case", ["missing", "not parquet", "no folder", "a folder", "bad source", "page size"])
def test_bad_input_is_one_line_and_exit_2(case, mixed, tmp_path):
    out, images = mixed
    html = tmp_path / "r.html"
    args = {"missing": [str(tmp_path / "nope.parquet"), "--html", str(html)],
            "not parquet": [str(write_text(tmp_path / "x.parquet", "id,caption\n1,a\n")), "--html", str(html)],
            "no folder": [str(out), "--html", str(tmp_path / "none" / "r.html")],
            "a folder": [str(out), "--html", str(tmp_path)],
            "bad source": [str(out), "--html", str(html), "--source", str(tmp_path / "nowhere")],
            "page size": [str(out), "--html", str(html), "--page-size", "0"]}[case]
    result = runner.invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert not html.exists() and not (tmp_path / "none").exists() and not (tmp_path / "r_files").exists()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_source_that_matches_no_id_is_said(mixed, tmp_path):
    out, _ = mixed
    other = image_folder(tmp_path / "other", ["unrelated.jpg"])
    result = runner.invoke(app, ["report", str(out), "--source", str(other), "--html", str(tmp_path / "r.html"),
                                 "--quiet"])
    assert result.exit_code == 0 and result.output.startswith("warning: no image of ")
    assert (tmp_path / "r.html").is_file()


def test_help_gives_examples():
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    assert "vlmbatch report alt.parquet --source ./photos --html report.html" in result.output
    for flag in ("--max-chars", "--min-confidence", "--page-size", "--no-embed"):
        assert flag in result.output


def test_a_real_caption_run_is_reported(make_ckpt, tmp_path):
    ckpt = make_ckpt("pg1_untied", "hub", image_size=28, eos_boost=3.0).path
    images = image_folder(tmp_path / "photos", ["one.jpg", "two.jpg", "three.jpg"])
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "caps.parquet"
    result = runner.invoke(app, ["caption", str(images), "--out", str(out), "--model", str(ckpt),
                                 "--max-new-tokens", "4", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(out), "--source", str(images), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    cards = data_cards((tmp_path / "r.html").read_text())
    written = pq.read_table(out).to_pylist()
    assert sorted(c["id"] for c in cards) == sorted(row["id"] for row in written)
    assert cards[0]["id"] == "broken.jpg" and cards[0]["r"][0][6]  # the error row first, with its reason
    assert sum(1 for c in cards if c["t"]) == 3
    by_id = {row["id"]: row["caption"] for row in written}
    assert all(c["r"][0][2] == by_id[c["id"]] for c in cards)


# -- in a real browser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven through its own chromedriver (Selenium Manager never asked to
    download one). Missing, the tests fail: CI installs it (.ci/run)."""
    assert shutil.which("chromium") and Path("/usr/bin/chromedriver").exists(), \
        "Chromium is missing: apt-get install chromium chromium-driver (as .ci/run does)"
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def open_page(driver, html: Path) -> None:
    driver.get_log("performance"), driver.get_log("browser")  # forget what earlier pages logged
    driver.get(html.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def shown_ids(driver) -> list[str]:
    return [card.find_element(By.CSS_SELECTOR, ".card-id").text
            for card in driver.find_elements(By.CSS_SELECTOR, "#cards article.card")]


def requests(driver) -> dict[str, str | None]:
    """Every URL the page asked for since the last call, as Chromium's network layer logged it (DevTools
    protocol), with why it was blocked (e.g. "csp"), None if it was not."""
    urls, blocked = {}, {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls[message["params"]["requestId"]] = message["params"]["request"]["url"]
        elif message["method"] == "Network.loadingFailed":
            blocked[message["params"]["requestId"]] = message["params"].get("blockedReason")
    return {url: blocked.get(request) for request, url in urls.items()}


def no_dialog(driver) -> bool:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_browser_shows_rows_worst_first_and_loads_nothing_from_outside(browser, mixed, tmp_path):
    out, images = mixed
    build_report(out, tmp_path / "report.html", source=str(images), embed=False)
    open_page(browser, tmp_path / "report.html")
    assert shown_ids(browser) == WORST_FIRST
    loaded = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(loaded) == 5 and all(done and 0 < width <= 256 for done, width in loaded)  # 'self' lets them in
    urls = requests(browser)
    assert urls and all(url.startswith(("file:", "data:")) for url in urls), urls
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(("file:", "data:")) for name in resources), resources
    blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert blocked == []  # the hashes match: the policy refused nothing of the page's own


def test_browser_flag_filter_language_search_and_sort(browser, tmp_path):
    rows = [*mixed_rows(), caption_row("perro.jpg", "Un perro en la playa", lang="es", mean=-0.7)]
    build_report(write_output(tmp_path / "alt.parquet", rows), tmp_path / "r.html")
    open_page(browser, tmp_path / "r.html")
    browser.find_element(By.CSS_SELECTOR, 'button[data-flag="too_long"]').click()
    assert shown_ids(browser) == ["long.jpg"]
    browser.find_element(By.CSS_SELECTOR, 'button[data-flag="redundant_prefix"]').click()
    assert shown_ids(browser) == ["prefix.jpg"]
    browser.find_element(By.CSS_SELECTOR, 'button[data-flag=""]').click()
    assert len(shown_ids(browser)) == 7
    Select(browser.find_element(By.ID, "lang")).select_by_value("es")
    assert shown_ids(browser) == ["perro.jpg"]
    Select(browser.find_element(By.ID, "lang")).select_by_value("")
    Select(browser.find_element(By.ID, "sort")).select_by_value("confidence")
    assert shown_ids(browser)[:3] == ["unsure.jpg", "perro.jpg", "prefix.jpg"]
    Select(browser.find_element(By.ID, "sort")).select_by_value("length")
    assert shown_ids(browser)[0] == "long.jpg"
    browser.find_element(By.ID, "search").send_keys("BICYCLES")
    assert shown_ids(browser) == ["sure.jpg"]


def test_browser_pages_through_the_rows(browser, tmp_path):
    rows = [caption_row(f"{n:03d}.jpg", f"caption {n}", mean=-n / 10) for n in range(7)]
    build_report(write_output(tmp_path / "alt.parquet", rows), tmp_path / "r.html", page_size=3)
    open_page(browser, tmp_path / "r.html")
    info = browser.find_element(By.ID, "pageinfo")
    assert shown_ids(browser) == ["006.jpg", "005.jpg", "004.jpg"] and info.text == "page 1 of 3 · 7 images"
    assert not browser.find_element(By.ID, "prev").is_enabled()
    browser.find_element(By.ID, "next").click()
    assert shown_ids(browser) == ["003.jpg", "002.jpg", "001.jpg"] and info.text == "page 2 of 3 · 7 images"
    browser.find_element(By.ID, "next").click()
    assert shown_ids(browser) == ["000.jpg"] and not browser.find_element(By.ID, "next").is_enabled()
    browser.find_element(By.ID, "prev").click()
    assert shown_ids(browser)[0] == "003.jpg"


def test_browser_shows_hostile_strings_as_text_and_runs_none(browser, tmp_path):
    onerror = '<img src=x onerror="window.__pwned = \'img\'">'
    rows = [caption_row(HOSTILE_NAME, HOSTILE_TEXT, mean=-3.0), caption_row("b.jpg", onerror, lang=onerror),
            caption_row("c.jpg", None, error=onerror)]
    out = write_output(tmp_path / "alt.parquet", rows)
    images = image_folder(tmp_path / "photos", [HOSTILE_NAME, "b.jpg"])
    build_report(out, tmp_path / "r.html", source=str(images))
    open_page(browser, tmp_path / "r.html")
    assert set(shown_ids(browser)) == {HOSTILE_NAME, "b.jpg", "c.jpg"}
    texts = [node.text for node in browser.find_elements(By.CSS_SELECTOR, ".text, .error, .lang")]
    assert HOSTILE_TEXT in texts and onerror in texts and texts.count(onerror) == 3
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], #cards script').length") == 0
    assert len(browser.execute_script("return [...document.images].filter(i => i.naturalWidth > 0)")) == 2
    assert no_dialog(browser)


def test_browser_enforces_the_policy_on_anything_injected(browser, mixed, tmp_path):
    out, _ = mixed
    build_report(out, tmp_path / "r.html")
    open_page(browser, tmp_path / "r.html")
    refused = browser.execute_async_script("""
        const done = arguments[0], refused = [];
        document.addEventListener("securitypolicyviolation", (e) => refused.push(e.violatedDirective));
        const script = document.createElement("script");
        script.textContent = "window.__injected = 1";
        document.body.appendChild(script);
        const image = document.createElement("img");
        image.src = "http://127.0.0.1:9/x.png";
        document.body.appendChild(image);
        setTimeout(() => done([window.__injected === undefined, refused.sort()]), 300);""")
    assert refused == [True, ["img-src", "script-src-elem"]]  # neither ran nor loaded: the policy is in force
    remote = {url: blocked for url, blocked in requests(browser).items() if not url.startswith(("file:", "data:"))}
    assert remote == {"http://127.0.0.1:9/x.png": "csp"}  # announced, then blocked before it left


def test_browser_opens_and_pages_a_100k_row_report(browser, tmp_path):
    rows = [caption_row(f"{n:06d}.jpg", f"caption number {n}", mean=-(n % 1000) / 100) for n in range(100_000)]
    done = build_report(write_output(tmp_path / "alt.parquet", rows), tmp_path / "r.html")
    assert done.rows == 100_000
    started = time.perf_counter()
    open_page(browser, tmp_path / "r.html")
    assert time.perf_counter() - started < 20  # opens (the figure itself is eval/bench_report.py's)
    assert len(shown_ids(browser)) == 500 and browser.find_element(By.ID, "pageinfo").text == \
        "page 1 of 200 · 100000 images"
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    assert browser.execute_script("return window.scrollY") > 10_000  # a page long enough to scroll
    browser.find_element(By.ID, "search").send_keys("number 99999")
    assert shown_ids(browser) == ["099999.jpg"]


def test_browser_screenshot_for_a_person(browser, mixed, tmp_path):
    out, images = mixed
    build_report(out, tmp_path / "report.html", source=str(images))
    open_page(browser, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    print(f"screenshot of the review page: {shot}")


# -- the eval report -------------------------------------------------------------------------------------

vqa_folder = test_eval_data.vqa_folder


@pytest.fixture()
def coco_folder(tmp_path) -> Path:
    """Official-format COCO captions: captions_val2014.json and val2014/, one image named hostilely."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images, annotations = [], []
    for number, (name, photo) in enumerate(list(real_photos().items())[:4], start=1):
        file_name = HOSTILE_NAME if number == 4 else f"COCO_val2014_{number:012d}.jpg"
        photo.convert("RGB").save(root / "val2014" / file_name, "JPEG")
        images.append({"id": number, "file_name": file_name})
        annotations += [{"id": 10 * number + k, "image_id": number, "caption": f"a {name} seen from close by {k}"}
                        for k in range(4)]
    annotations.append({"id": 99, "image_id": 1, "caption": HOSTILE_TEXT})
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def test_eval_report_has_the_scores_settings_and_the_worst_captions_first(coco_folder, tmp_path):
    names = list(real_photos())[:4]
    predictions = write_output(tmp_path / "caps.parquet", [
        {"id": "1", "caption": f"a {names[0]} seen from close by"},  # near its references
        {"id": "2", "caption": "nothing alike at all"},
        {"id": "3", "caption": f"a {names[2]} seen"},
        {"id": "4", "caption": "</p><script>alert(1)</script>"}], schema=pa.schema([("id", pa.string()),
                                                                               ("caption", pa.string())]), extra=[])
    html = tmp_path / "eval.html"
    result = runner.invoke(app, ["eval", "--dataset", "coco", "--data", str(coco_folder), "--predictions",
                                 str(predictions), "--metrics", "bleu,rouge,cider", "--report", str(html)])
    assert result.exit_code == 0, result.output
    page = html.read_text()
    scores = dict(re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([^<]+)</td></tr>", page))
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    per_item = [float(x) for x in re.findall(r"CIDEr (\d+\.\d+)", page)]
    assert len(per_item) == 4 and per_item == sorted(per_item) and per_item[-1] > per_item[0]
    assert re.findall(r'<article class="card" data-id="([^"]+)"', page)[-1] == "1"  # the best comes last
    assert page.count('src="data:image/jpeg;base64,') == 4
    assert "<script>alert(1)" not in page and "<script>window.__pwned" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.__pwned" in page  # the hostile reference is shown, as text
    assert "script-src &#39;none&#39;" in page and "http://" not in page and "https://" not in page
    assert "(predictions given: no model run)" in page


def test_eval_report_of_vqa_has_accuracy_per_answer_type_and_the_questions(vqa_folder, tmp_path, browser):
    predictions = write_output(tmp_path / "answers.parquet", [
        {"question_id": "42000", "answer": "yes"}, {"question_id": "42001", "answer": "<b>seven</b>"},
        {"question_id": "73000", "answer": "red"}],
        schema=pa.schema([("question_id", pa.string()), ("answer", pa.string())]), extra=[])
    html = tmp_path / "eval.html"
    result = runner.invoke(app, ["eval", "--dataset", "vqav2", "--data", str(vqa_folder), "--predictions",
                                 str(predictions), "--report", str(html)])
    assert result.exit_code == 0, result.output
    open_page(browser, html)
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#scores tbody tr")]
    assert rows[0].startswith("overall (VQA accuracy, %)")
    assert {row.split(":")[1].split()[0] for row in rows[1:]} == {"yes/no", "number", "other"}
    cards = browser.find_elements(By.CSS_SELECTOR, "#worst article.card")
    assert cards[0].find_element(By.CSS_SELECTOR, ".question").text == "How many dogs?"
    assert cards[0].find_element(By.CSS_SELECTOR, ".prediction .text").text == "<b>seven</b>"
    assert len(browser.execute_script("return [...document.images].filter(i => i.naturalWidth > 0)")) == 3
    assert [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]] == []


def test_eval_report_of_a_split_without_answers_says_where_the_results_went(tmp_path):
    from vlmbatch.evaluation.run import EvalReport
    from vlmbatch.review.eval_report import write_eval_report

    report = EvalReport(dataset="vqav2", task="vqa", split="test-dev", source="x", scores={}, covered=3, total=3,
                        predictions="answers.parquet", results_json="results.json",
                        settings={"generation": {"num_beams": 1}})
    page = write_eval_report(report, tmp_path / "e.html").read_text()
    assert "<tbody>\n</tbody>" in page and "num_beams" in page and "The 0 worst questions" in page
    assert "3 answers went to results.json" in page


def test_eval_report_to_an_unwritable_place_is_refused_before_scoring(vqa_folder, tmp_path):
    result = runner.invoke(app, ["eval", "--dataset", "vqav2", "--data", str(vqa_folder), "--predictions",
                                 str(tmp_path / "missing.parquet"), "--report", str(tmp_path / "no" / "e.html")])
    assert result.exit_code == 2 and "cannot write output" in result.output and "missing" not in result.output


def test_the_report_benchmark_runs_on_a_tiny_workload(tmp_path):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "eval" / "bench_report.py"
    result = subprocess.run([sys.executable, str(bench), "--sizes", "12,30", "--workdir", str(tmp_path / "w"),
                             "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((tmp_path / "r.json").read_text())
    assert [entry["rows"] for entry in found["reports"]] == [12, 30]
    assert [entry["thumbnails"] for entry in found["reports"]] == [12, 30]
    assert found["chromium"]["30"]["cards_first_page"] == 30 and found["chromium"]["30"]["pages"] == 1
    assert 0 < found["verdict"]["first_paint_worst_s"] < 30
