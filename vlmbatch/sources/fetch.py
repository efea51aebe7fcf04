"""Images given as URLs, fetched into a local cache ahead of decoding (--fetch-images).

`fetch_stream` passes a stream of items on in order, each `Url` replaced by its cached file (or by an
`Unreadable` saying in one line why not), while a bounded pool of threads fetches the next ones: memory
stays flat whatever the source's length. A fetch retries connection errors, timeouts, 5xx, 408 and 429
with exponential backoff (or the server's Retry-After), stops reading past the size cap, and caches only
what Pillow decodes, under a name hashed from the URL, written to a temporary name and renamed: a killed
run leaves no half file, and a later run, with the server gone or not, reads the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import httpx

from vlmbatch.errors import ImageDecodeError
from vlmbatch.sources.images import load_image
from vlmbatch.sources.records import ImageRef, Unreadable, Url
from vlmbatch.spec import (
    DEFAULT_FETCH_RETRIES,
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_FETCH_WORKERS,
    DEFAULT_MAX_IMAGE_BYTES,
)

T = TypeVar("T")

BACKOFF_S = 0.5  # the first retry's wait; each next one waits twice as long
MAX_RETRY_AFTER_S = 60.0  # a server's Retry-After is honoured up to this: a run is not parked for hours
_RETRIED_STATUSES = frozenset({408, 429})
_CHUNK = 64 * 1024


def default_cache_dir() -> Path:
    """`$VLMBATCH_CACHE/images`, else `$XDG_CACHE_HOME/vlmbatch/images`, else `~/.cache/vlmbatch/images`."""
    root = os.environ.get("VLMBATCH_CACHE")
    if root:
        return Path(root).expanduser() / "images"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlmbatch" / "images"


@dataclass(frozen=True)
class FetchSettings:
    """How images are fetched: the job's --fetch-* flags, whose defaults and bounds spec.py holds."""

    timeout: float = DEFAULT_FETCH_TIMEOUT_S  # seconds for one try, from the request to the last byte
    retries: int = DEFAULT_FETCH_RETRIES  # tries after the first, for failures that may pass
    workers: int = DEFAULT_FETCH_WORKERS  # fetches in flight
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    cache_dir: Path | None = None  # None: default_cache_dir()
    backoff: float = BACKOFF_S


class _Retry(Exception):
    """A failure worth another try (the reason in one line); `wait`: how long the server asked to be left
    alone (Retry-After), if it said."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Fail(Exception):
    """A failure another try would repeat."""


class Fetcher:
    """Fetches URLs into the cache; thread-safe (one httpx client, its connection pool shared)."""

    def __init__(self, settings: FetchSettings = FetchSettings()):
        self.settings = settings
        self.cache_dir = settings.cache_dir or default_cache_dir()
        limits = httpx.Limits(max_connections=settings.workers, max_keepalive_connections=settings.workers)
        self._client = httpx.Client(timeout=settings.timeout, limits=limits, follow_redirects=True,
                                    headers={"User-Agent": "vlmbatch (image fetcher)"})

    def close(self) -> None:
        self._client.close()

    def cached_path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / digest  # 256 folders: no folder of a million files

    def fetch(self, url: str) -> ImageRef:
        """The cached file of `url` (fetched first if need be), or an `Unreadable` saying why not."""
        try:
            return self._fetch(url)
        except Exception as exc:  # one image's surprise is its row's error, never the run's end
            return Unreadable(f"cannot fetch {url}: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def _fetch(self, url: str) -> ImageRef:
        path = self.cached_path(url)
        if path.is_file():
            return str(path)
        tries = self.settings.retries + 1
        for attempt in range(tries):
            try:
                data = self._download(url)
                break
            except _Fail as exc:
                return Unreadable(f"cannot fetch {url}: {exc}")
            except _Retry as exc:
                if attempt + 1 == tries:
                    after = f" (after {tries} tries)" if tries > 1 else ""
                    return Unreadable(f"cannot fetch {url}: {exc}{after}")
                backoff = self.settings.backoff * 2 ** attempt
                time.sleep(backoff if exc.wait is None else min(max(exc.wait, backoff), MAX_RETRY_AFTER_S))
        try:
            load_image(data)  # only an image Pillow decodes is cached
        except ImageDecodeError as exc:  # "not an image Pillow can identify", "cannot decode image: ..."
            return Unreadable(f"cannot fetch {url}: {exc}")
        try:
            _write_new(path, data)
        except OSError as exc:
            return Unreadable(f"cannot cache {url} in {self.cache_dir}: {exc.strerror or exc}")
        return str(path)

    def _download(self, url: str) -> bytes:
        limit, deadline = self.settings.max_bytes, time.monotonic() + self.settings.timeout
        try:
            with self._client.stream("GET", url) as response:
                status = response.status_code
                if status >= 500 or status in _RETRIED_STATUSES:
                    raise _Retry(f"HTTP {status}", _seconds(response.headers.get("retry-after", "")))
                if status != 200:
                    raise _Fail(f"HTTP {status}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _Fail(f"over the size cap ({int(declared):,} bytes > {limit:,})")
                chunks, size = [], 0
                for chunk in response.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > limit:  # a body longer than it said, or one that said nothing
                        raise _Fail(f"over the size cap (more than {limit:,} bytes)")
                    if time.monotonic() > deadline:  # a server that trickles would pass each read's timeout
                        raise _Retry(f"timed out after {self.settings.timeout:g} s")
                    chunks.append(chunk)
        except httpx.TimeoutException:
            raise _Retry(f"timed out after {self.settings.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"connection failed ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        except httpx.HTTPError as exc:  # an invalid URL, too many redirects, ...
            raise _Fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
        if not size:
            raise _Fail("empty response")
        return b"".join(chunks)


def _seconds(retry_after: str) -> float | None:
    """A Retry-After given in seconds; its other form, an HTTP date, is left to the backoff."""
    return float(retry_after) if retry_after.strip().isdigit() else None


def _write_new(path: Path, data: bytes) -> None:
    """`data` as `path`, which appears whole or not at all (written aside, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def fetch_stream(items: Iterable[T], ref: Callable[[T], ImageRef], settings: FetchSettings,
                 ahead: int | None = None) -> Iterator[tuple[T, ImageRef]]:
    """Yield (item, image) in input order, where image is `ref(item)` with a `Url` fetched (its cached
    path, or an `Unreadable`). At most `ahead` (default 2 x workers) items are held, fetched or in flight."""
    fetcher = Fetcher(settings)
    window = ahead or 2 * settings.workers
    pool = _DaemonPool(settings.workers)
    pending: deque[tuple[T, Future | ImageRef]] = deque()
    try:
        for item in items:
            image = ref(item)
            pending.append((item, pool.submit(fetcher.fetch, image.url) if isinstance(image, Url) else image))
            if len(pending) >= window:
                yield _ready(pending.popleft())
        while pending:
            yield _ready(pending.popleft())
    finally:
        for _, job in pending:
            if isinstance(job, Future):
                job.cancel()
        pool.shutdown()  # the fetches in flight finish on their own, or not at all if the process ends
        fetcher.close()  # their retries, if any, then fail at once


class _DaemonPool:
    """Threads taking fetches from a queue, as an executor would, but daemon ones: a run that stops (Ctrl-C,
    SIGTERM, --limit) exits at once, where an executor's threads are joined at exit, each holding it until
    its fetch in flight answers or times out."""

    def __init__(self, workers: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        for index in range(workers):
            threading.Thread(target=self._work, name=f"vlmbatch-fetch-{index}", daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        for _ in range(self._workers):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever reads the result, as an executor does
                future.set_exception(exc)


def _ready(entry: tuple[T, Future | ImageRef]) -> tuple[T, ImageRef]:
    item, job = entry
    return item, job.result() if isinstance(job, Future) else job

