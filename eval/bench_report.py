"""`vlmbatch report`: build time and peak memory against the row count, and the page's first paint.

Workload: synthetic caption outputs written with the sink's schema (tests' corpus of captions, 1 % error
rows, a spread of mean log-probs, flags left for the rules to compute) of 1k, 10k and 100k rows, one
image each; the source is a folder of 10,000 files hard-linked to 100 small real JPEGs (200x150, from
tests/factory.py), so every row of the 1k and 10k outputs gets a thumbnail decoded and encoded.

Each report is one `python -m vlmbatch report` process, timed launch to exit, its peak RSS sampled every
50 ms from /proc: flat memory means the 10k peak is about the 1k one. Then headless Chromium (Debian's, as the tests use it)
opens each page: first-contentful-paint from `performance.getEntriesByType('paint')`, the time until
the first page of cards is in the DOM (the page's own `vlmbatch-cards-shown` mark), and the time to
click through every page and scroll the last.

    python eval/bench_report.py [--workdir /tmp/vlmbatch-bench-report] [--json eval/results/2026-12-07-report.json]
    python eval/bench_report.py --sizes 20,50 --workdir /tmp/small      (a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "eval")]
from bench_memory import check, machine_info, run_measured  # noqa: E402

SIZES = (1_000, 10_000, 100_000)
WITH_IMAGES = 10_000  # outputs up to this size are reported with --source (a thumbnail per row)
DISTINCT, IMAGE_SIZE = 100, (200, 150)
GOALS = {"build_10k_s": 15.0, "first_paint_s": 2.0}


def build(workdir: Path, sizes: tuple[int, ...]) -> None:
    """The image folder and the outputs, unless an earlier run left them."""
    if all((workdir / f"rows-{size}.parquet").is_file() for size in sizes):
        return
    sys.path.insert(0, str(REPO / "tests"))
    import factory
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmbatch.sinks.rows import CAPTION_SCHEMA

    base, images = workdir / "base", workdir / "images"
    base.mkdir(parents=True, exist_ok=True)
    images.mkdir(exist_ok=True)
    for number, photo in enumerate(factory.distinct_photos(DISTINCT)):
        photo.resize(IMAGE_SIZE).save(base / f"{number:03d}.jpg", quality=85)
    for number in range(min(WITH_IMAGES, max(sizes))):
        target = images / f"{number:05d}.jpg"
        if not target.exists():
            os.link(base / f"{number % DISTINCT:03d}.jpg", target)
    schema = CAPTION_SCHEMA  # with mean_logprob, min_logprob, lang and flags (left null: the rules compute them)
    sentences, rng = factory._corpus(), random.Random(0)
    for size in sizes:
        rows = []
        for number in range(size):
            failed = number % 100 == 7
            mean = None if failed else -rng.expovariate(2.0)
            rows.append({"id": f"{number:05d}.jpg", "caption": None if failed else sentences[number % len(sentences)],
                         "error": "cannot decode image: truncated file" if failed else None,
                         "prompt": "caption en", "num_tokens": 12, "finish_reason": "error" if failed else "eos",
                         "lang": "en", "mean_logprob": mean, "min_logprob": None if failed else mean - 1.5})
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), workdir / f"rows-{size}.parquet")


def report(workdir: Path, size: int) -> dict:
    html = workdir / f"report-{size}.html"
    command = [sys.executable, "-m", "vlmbatch", "report", str(workdir / f"rows-{size}.parquet"), "--html", str(html)]
    if size <= WITH_IMAGES:
        command += ["--source", str(workdir / "images")]
    # Sampled VmRSS, not wait4's ru_maxrss: a child's ru_maxrss counts the parent's pages it was forked
    # with, which after building the workload here are more than the report's own.
    measured = run_measured(command, log_path=workdir / f"report-{size}.log", interval=0.05)
    check(measured)
    return {"rows": size, "thumbnails": size if size <= WITH_IMAGES else 0, "seconds": round(measured.seconds, 2),
            "peak_rss_mb": round(measured.peak_tree_rss / 2**20, 1), "html_mb": round(html.stat().st_size / 2**20, 1)}


def paint(workdir: Path, sizes: tuple[int, ...]) -> dict[int, dict]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    found = {}
    try:
        for size in sizes:
            driver.get((workdir / f"report-{size}.html").as_uri())  # returns once the load event fired
            # A small page can load before its first paint is recorded: wait for the entry.
            driver.set_script_timeout(30)
            driver.execute_async_script(
                "const done = arguments[0]; (function wait() {"
                " if (performance.getEntriesByName('first-contentful-paint').length) done();"
                " else requestAnimationFrame(wait); })();")
            timing = driver.execute_script(
                "const p = performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint');"
                "const n = performance.getEntriesByType('navigation')[0];"
                "const shown = performance.getEntriesByName('vlmbatch-cards-shown')[0];"
                "return [p ? p.startTime : null, n.domContentLoadedEventEnd, n.loadEventEnd,"
                " document.querySelectorAll('#cards article').length, shown.startTime];")
            start = time.perf_counter()
            last = driver.execute_script(
                "const next = document.getElementById('next'); let pages = 1;"
                "while (!next.disabled) { next.click(); pages += 1; }"
                "window.scrollTo(0, document.body.scrollHeight);"
                "return [pages, document.querySelectorAll('#cards article').length];")
            found[size] = {"first_contentful_paint_s": round(timing[0] / 1000, 3),
                           "cards_shown_s": round(timing[4] / 1000, 3),
                           "dom_content_loaded_s": round(timing[1] / 1000, 3), "load_s": round(timing[2] / 1000, 3),
                           "cards_first_page": timing[3], "pages": last[0], "cards_last_page": last[1],
                           "all_pages_clicked_s": round(time.perf_counter() - start, 2)}
    finally:
        driver.quit()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmbatch-bench-report"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="row counts, comma-separated")
    parser.add_argument("--fresh", action="store_true", help="rebuild the workload")
    args = parser.parse_args()
    sizes = tuple(int(size) for size in args.sizes.split(","))
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    build(args.workdir, sizes)
    reports = [report(args.workdir, size) for size in sizes]
    for entry in reports:
        print(f"{entry['rows']:>7,} rows ({entry['thumbnails']:,} thumbnails): {entry['seconds']:6.2f} s, "
              f"peak RSS {entry['peak_rss_mb']:.0f} MB, page {entry['html_mb']} MB", flush=True)
    pages = paint(args.workdir, sizes)
    for size, entry in pages.items():
        print(f"{size:>7,} rows in Chromium: first paint {entry['first_contentful_paint_s']} s, first cards "
              f"{entry['cards_shown_s']} s, load "
              f"{entry['load_s']} s, {entry['pages']} pages clicked through in {entry['all_pages_clicked_s']} s")
    # The goals are for 10k rows against 1k; a run of other sizes compares its largest with images to its least.
    imaged = [entry for entry in reports if entry["thumbnails"]] or reports
    ten_k = next((entry for entry in reports if entry["rows"] == 10_000), imaged[-1])
    verdict = {"build_10k_s": ten_k["seconds"], "build_10k_goal_met": ten_k["seconds"] <= GOALS["build_10k_s"],
               "peak_rss_10k_over_1k": round(ten_k["peak_rss_mb"] / reports[0]["peak_rss_mb"], 2),
               "first_paint_worst_s": max(p["first_contentful_paint_s"] for p in pages.values()),
               "first_paint_goal_met": all(p["first_contentful_paint_s"] <= GOALS["first_paint_s"]
                                           for p in pages.values()),
               "cards_shown_worst_s": max(p["cards_shown_s"] for p in pages.values())}
    print(json.dumps(verdict))
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "bench_report", "machine": machine_info(), "goals": GOALS,
                                         "reports": reports, "chromium": {str(k): v for k, v in pages.items()},
                                         "verdict": verdict}, indent=2) + "\n")


if __name__ == "__main__":
    main()
