"""Thumbnails for a report: made one image at a time as the source is read, and written out at once (to
files beside the page, or to a spool file the page embeds from), so memory stays flat in their number."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote

from vlmbatch.errors import ImageDecodeError
from vlmbatch.review.spool import Spool
from vlmbatch.sinks.atomic import output_errors
from vlmbatch.sources.images import load_image
from vlmbatch.sources.records import ImageRecord, ImageRef

THUMBNAIL_PX = 256
_JPEG_QUALITY = 80


def thumbnail_jpeg(ref: ImageRef) -> bytes | None:
    """`ref` as a JPEG at most THUMBNAIL_PX on its longer side; None if it cannot be decoded."""
    try:
        image = load_image(ref)  # the project's decoding: regular files only, bomb limits, EXIF orientation
    except ImageDecodeError:
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


class Thumbnails:
    """Thumbnails by card number: files `NAME_files/<n>.jpg` beside the page (`files_dir`), or, with no
    folder, embedded: spooled to a temporary file and read back one by one as the page is written."""

    def __init__(self, files_dir: Path | None) -> None:
        self.files_dir = files_dir
        self._spool = None if files_dir else Spool()
        self._handles: dict[int, int | None] = {}  # card number -> spool handle (None: a file)
        if files_dir is not None:
            with output_errors(files_dir):
                files_dir.mkdir(parents=True, exist_ok=True)

    def add(self, number: int, jpeg: bytes) -> None:
        if self._spool is None:
            with output_errors(self.files_dir):
                (self.files_dir / f"{number}.jpg").write_bytes(jpeg)
            self._handles[number] = None
        else:
            self._handles[number] = self._spool.add(jpeg)

    @property
    def count(self) -> int:
        return len(self._handles)

    def url(self, number: int) -> str | None:
        """What an <img> shows for card `number`: a data: URI or a path relative to the page; None if none."""
        if number not in self._handles:
            return None
        if self._spool is None:
            return f"{quote(self.files_dir.name)}/{number}.jpg"  # a page named "run#3.html" is no fragment
        return self._spool.data_uri(self._handles[number], "image/jpeg")

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def __enter__(self) -> "Thumbnails":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collect_thumbnails(records: Iterable[ImageRecord], wanted: Mapping[str, int], store: Thumbnails) -> int:
    """Thumbnail each record whose id is in `wanted` (id -> number), reading `records` once and only as
    far as needed; an image that is gone or broken gets none. Returns how many `store` holds."""
    left = set(wanted)
    for record in records:
        if not left:
            break
        if record.id in left:
            left.discard(record.id)
            jpeg = thumbnail_jpeg(record.image)
            if jpeg is not None:
                store.add(wanted[record.id], jpeg)
    return store.count
