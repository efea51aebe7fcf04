"""Fetching images given as URLs (vlmbatch.sources.fetch) from a real HTTP server on 127.0.0.1, started
by the tests: real photos fetched, cached and read back with the server gone; each kind of failure one
reason; retries; a bounded window. The CLI end to end is in test_eval_cli.py and at the end here."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
from factory import real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.sources.fetch import FetchSettings, default_cache_dir, fetch_stream
from vlmbatch.sources.images import load_image
from vlmbatch.sources.records import Unreadable, Url

SLOW_S = 3.0  # how long /slow waits before answering: well past the tests' short timeouts
PHOTOS = list(real_photos())[:4]


def jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    real_photos()[name].convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on purpose (size cap, timeout)
        pass


class PhotoServer:
    """A threaded HTTP server on 127.0.0.1 serving the test photos and misbehaving on purpose:
    /photo/NAME.jpg, /missing (404), /slow (answers after SLOW_S), /text (not an image), /big and
    /big-declared (over any small cap; without and with Content-Length), /flaky/NAME.jpg (503, then the
    photo), /busy/NAME.jpg (429 with Retry-After: 1, then the photo), /together/NAME.jpg (answers only once 4 requests wait together). `hits` counts requests."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.barrier = threading.Barrier(4, timeout=5)
        self.photos = {name: jpeg(name) for name in PHOTOS}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.hits[self.path] += 1
                server.respond(self)

            def log_message(self, *args):  # quiet test output
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        name = path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if path.startswith("/photo/") and name in self.photos:
            return self.send(handler, 200, self.photos[name])
        if path.startswith("/flaky/") and name in self.photos:
            return self.send(handler, 503 if self.hits[path] == 1 else 200, self.photos[name])
        if path.startswith("/together/") and name in self.photos:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                return self.send(handler, 500, b"alone")
            return self.send(handler, 200, self.photos[name])
        if path.startswith("/busy/") and name in self.photos:  # 429 asking for a second's rest, then the photo
            if self.hits[path] == 1:
                handler.send_response(429)
                handler.send_header("Retry-After", "1")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return None
            return self.send(handler, 200, self.photos[name])
        if path == "/slow":
            time.sleep(SLOW_S)
            return self.send(handler, 200, self.photos[PHOTOS[0]])
        if path == "/text":
            return self.send(handler, 200, b"<html>no image here</html>", "text/html")
        if path == "/big":  # no Content-Length: the body ends when the connection closes (HTTP/1.0)
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.end_headers()
            for _ in range(64):
                handler.wfile.write(b"\xff" * 16384)
            return None
        if path == "/big-declared":
            return self.send(handler, 200, b"\xff" * 1_000_000)
        return self.send(handler, 404, b"not found", "text/plain")

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "image/jpeg") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)


@pytest.fixture()
def server():
    photo_server = PhotoServer()
    yield photo_server
    photo_server.stop()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "vlmbatch-cache"
    monkeypatch.setenv("VLMBATCH_CACHE", str(folder))
    return folder / "images"


def settings(**overrides) -> FetchSettings:
    """Short timeouts and backoff so that failing tests fail fast; the cache from VLMBATCH_CACHE."""
    return FetchSettings(**{"timeout": 0.5, "retries": 2, "workers": 4, "backoff": 0.01, **overrides})


def fetched(urls, **overrides) -> list:
    return [image for _, image in fetch_stream(urls, Url, settings(**overrides))]


def test_the_cache_folder_follows_vlmbatch_cache(cache, monkeypatch, tmp_path):
    assert default_cache_dir() == cache
    monkeypatch.delenv("VLMBATCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "vlmbatch" / "images"


def test_photos_are_fetched_in_order_cached_and_read_back_with_the_server_gone(server, cache):
    urls = [server.url(f"/photo/{name}.jpg") for name in PHOTOS]
    first = fetched(urls)
    assert all(isinstance(path, str) and path.startswith(str(cache)) for path in first)
    assert len(set(first)) == len(PHOTOS)
    for name, path in zip(PHOTOS, first, strict=True):  # the bytes served, in the order asked
        served = np.asarray(load_image(server.photos[name]))
        assert np.array_equal(np.asarray(load_image(path)), served)
    assert not list(cache.rglob("*.part"))  # nothing half written is left beside them
    server.stop()
    assert fetched(urls) == first
    assert sum(server.hits.values()) == len(PHOTOS)  # the second pass asked nothing


@pytest.mark.parametrize("path, reason", [
    ("/missing", "HTTP 404"),
    ("/slow", "timed out after 0.3 s"),
    ("/text", "not an image Pillow can identify"),
    ("/big", "over the size cap (more than 100,000 bytes)"),
    ("/big-declared", "over the size cap (1,000,000 bytes > 100,000)"),
])
def test_each_failure_is_one_reason_and_nothing_is_cached(server, cache, path, reason):
    good = server.url(f"/photo/{PHOTOS[0]}.jpg")
    results = fetched([good, server.url(path), good], timeout=0.3, retries=1, max_bytes=100_000)
    assert isinstance(results[0], str) and results[2] == results[0]
    failure = results[1]
    assert isinstance(failure, Unreadable)
    assert failure.reason.startswith(f"cannot fetch {server.url(path)}: {reason}")
    assert "\n" not in failure.reason
    assert [p.name for p in cache.rglob("*") if p.is_file()] == [results[0].rsplit("/", 1)[-1]]


def test_only_failures_that_may_pass_are_tried_again(server, cache):
    results = fetched([server.url("/missing"), server.url("/slow")], timeout=0.3, retries=2)
    assert server.hits["/missing"] == 1  # a 404 stays a 404
    assert server.hits["/slow"] == 3
    assert results[1].reason.endswith("(after 3 tries)")


def test_a_503_then_200_is_fetched_on_the_second_try(server, cache):
    url = server.url(f"/flaky/{PHOTOS[1]}.jpg")
    [path] = fetched([url])
    assert server.hits[f"/flaky/{PHOTOS[1]}.jpg"] == 2
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(server.photos[PHOTOS[1]])))


def test_a_429_is_tried_again_after_the_servers_retry_after(server, cache):
    started = time.monotonic()
    [path] = fetched([server.url(f"/busy/{PHOTOS[0]}.jpg")])  # a backoff of 0.01 s, but the server asks 1 s
    assert isinstance(path, str) and server.hits[f"/busy/{PHOTOS[0]}.jpg"] == 2
    assert time.monotonic() - started >= 1.0


def test_fetches_run_together(server, cache):
    """/together answers only while four requests wait at once: fetched one at a time, each fails."""
    urls = [server.url(f"/together/{name}.jpg") for name in PHOTOS]
    results = fetched(urls, workers=4, timeout=10, retries=0)
    assert all(isinstance(path, str) for path in results)


def test_the_window_ahead_is_bounded(server, cache):
    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield server.url(f"/photo/{PHOTOS[i % len(PHOTOS)]}.jpg")

    stream = fetch_stream(items(), Url, settings(workers=2), ahead=5)
    for given, _ in enumerate(stream, start=1):
        assert len(pulled) - given <= 5
    assert len(pulled) == 40


def test_other_images_pass_through_untouched(server, cache, tmp_path):
    photo = tmp_path / "local.jpg"
    photo.write_bytes(server.photos[PHOTOS[0]])
    refs = [str(photo), b"raw", Url(server.url(f"/photo/{PHOTOS[0]}.jpg"))]
    results = [image for _, image in fetch_stream(refs, lambda ref: ref, settings())]
    assert results[:2] == [str(photo), b"raw"] and results[2].startswith(str(cache))
    assert not fetched([])


def test_a_manifest_url_column_is_read_as_urls(tmp_path):
    from vlmbatch.sources.open import open_source

    manifest = tmp_path / "urls.jsonl"
    manifest.write_text('{"url": "https://example.org/a.jpg", "alt": "x"}\n{"url": "local.jpg", "alt": "y"}\n')
    records = list(open_source(str(manifest)))
    assert [r.id for r in records] == ["https://example.org/a.jpg", "local.jpg"]
    assert records[0].image == Url("https://example.org/a.jpg") and records[0].version is None
    assert records[1].image == str(tmp_path / "local.jpg")  # a path beside the manifest, as before


# --- caption / vqa: a manifest whose image column holds URLs -------------------------------------------

runner = CliRunner()


def caption_rows(*args) -> dict[str, dict]:
    result = runner.invoke(app, ["caption", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = args[args.index("--out") + 1]
    return {row["id"]: row for row in pq.read_table(out).to_pylist()}


@pytest.mark.slow
def test_a_url_manifest_is_captioned_with_fetch_images_and_each_failure_is_one_error_row(server, cache, tmp_path, ckpt):
    good = [server.url(f"/photo/{name}.jpg") for name in PHOTOS]
    bad = {"/missing": "HTTP 404", "/slow": "timed out after 0.5 s", "/text": "not an image",
           "/big": "over the size cap"}
    manifest = tmp_path / "urls.jsonl"
    lines = [f'{{"url": "{url}"}}' for url in [*good[:2], *(server.url(path) for path in bad), *good[2:]]]
    manifest.write_text("\n".join(lines) + "\n")
    common = [manifest, "--model", ckpt, "--max-new-tokens", 4, "--workers", 0, "--quiet"]

    refused = caption_rows(*common, "--out", tmp_path / "off.parquet")  # fetching is opt-in for caption
    assert all("image URL not fetched" in row["error"] and "--fetch-images" in row["error"] for row in refused.values())

    out = tmp_path / "caps.parquet"
    fetch = ["--fetch-images", "--fetch-timeout", 0.5, "--fetch-retries", 1, "--max-image-bytes", 200_000]
    rows = caption_rows(*common, *fetch, "--out", out)
    assert set(rows) == {*good, *(server.url(path) for path in bad)}
    for url in good:
        assert rows[url]["error"] is None and rows[url]["caption"] is not None
    for path, reason in bad.items():
        row = rows[server.url(path)]
        assert row["caption"] is None and row["error"].startswith(f"cannot fetch {server.url(path)}: {reason}")

    # From the cache alone, with the server gone: the same captions (the failures are tried again, and fail).
    server.stop()
    again = caption_rows(*common, *fetch, "--out", tmp_path / "again.parquet")
    assert {url: again[url]["caption"] for url in good} == {url: rows[url]["caption"] for url in good}
    assert all(again[server.url(path)]["error"].startswith(f"cannot fetch {server.url(path)}: connection failed")
               for path in bad)


def test_fetch_flags_are_bounded_in_one_line(tmp_path):
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text('{"url": "http://127.0.0.1:9/x.jpg"}\n')
    for flag, value, message in [("--fetch-timeout", 0, "fetch_timeout must be more than 0 seconds, got 0.0"),
                                 ("--fetch-workers", 0, "fetch_workers must be at least 1, got 0"),
                                 ("--max-image-bytes", 0, "max_image_bytes must be at least 1, got 0"),
                                 ("--fetch-retries", -1, "fetch_retries must be at least 0, got -1")]:
        result = runner.invoke(app, ["caption", str(manifest), "--out", str(tmp_path / "o.parquet"), flag, str(value)])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output


def test_a_half_written_file_left_by_a_killed_run_is_not_taken_for_the_image(server, cache):
    """A run killed while writing leaves at most a temporary `.part` beside the cache's files: the image is
    fetched again, whole, and the `.part` never read."""
    from vlmbatch.sources.fetch import Fetcher

    url = server.url(f"/photo/{PHOTOS[2]}.jpg")
    final = Fetcher(settings()).cached_path(url)
    final.parent.mkdir(parents=True)
    half = final.parent / f".{final.name}.x1y2.part"
    half.write_bytes(server.photos[PHOTOS[2]][:100])
    [path] = fetched([url])
    assert path == str(final) and final.read_bytes() == server.photos[PHOTOS[2]]
    assert server.hits[f"/photo/{PHOTOS[2]}.jpg"] == 1


def test_a_run_stopped_early_exits_without_waiting_for_the_fetches_in_flight(server, cache):
    """A process that stops reading the stream (as a run stopped by Ctrl-C or --limit does) with four slow
    fetches in flight exits at once, not when the server answers them."""
    code = (
        "import sys\n"
        "from vlmbatch.sources.fetch import FetchSettings, fetch_stream\n"
        "from vlmbatch.sources.records import Url\n"
        "urls = [sys.argv[1]] + [sys.argv[2]] * 4\n"
        "stream = fetch_stream(urls, Url, FetchSettings(timeout=60, retries=0, workers=4))\n"
        "print(next(stream)[1], flush=True)\n"
        "stream.close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, server.url(f"/photo/{PHOTOS[0]}.jpg"), server.url("/slow")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline()
        started = time.monotonic()  # from the stop on: the interpreter's start-up is not what is measured
        assert child.wait(timeout=60) == 0, child.stderr.read()
        exited = time.monotonic() - started
    finally:
        child.kill()
        child.communicate()
    assert first.startswith(str(cache))  # the first image came through, into the cache the test set
    assert server.hits["/slow"] >= 1  # fetches of /slow were in flight when it stopped
    assert exited < SLOW_S / 2


def test_an_output_of_urls_is_scored_from_the_cache_with_the_server_gone(server, cache, tmp_path, ckpt):
    from factory import make_siglip_checkpoint

    siglip = tmp_path / "siglip"
    make_siglip_checkpoint(siglip, seed=2)
    manifest = tmp_path / "urls.jsonl"
    good = [server.url(f"/photo/{name}.jpg") for name in PHOTOS]
    manifest.write_text("".join(f'{{"url": "{url}"}}\n' for url in good))
    out = tmp_path / "caps.parquet"
    caption_rows(manifest, "--model", ckpt, "--max-new-tokens", 4, "--workers", 0, "--quiet", "--fetch-images",
                 "--out", out)
    server.stop()
    unfetched = runner.invoke(app, ["score", str(out), "--source", str(manifest), "--model", str(siglip),
                                    "--workers", "0"])
    assert unfetched.exit_code == 0 and "image unreadable now" in unfetched.output  # URLs are not read unasked
    result = runner.invoke(app, ["score", str(out), "--source", str(manifest), "--model", str(siglip),
                                 "--workers", "0", "--quiet", "--fetch-images"])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
    assert set(rows) == set(good) and all(row["siglip_prob"] is not None for row in rows.values())
