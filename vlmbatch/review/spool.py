"""Bytes the page embeds (thumbnails, masks), kept in a temporary file until the page is written and
read back one item at a time, so memory stays flat in their number."""

from __future__ import annotations

import base64
import os
import tempfile


class Spool:
    """An append-only temporary file of byte strings, each named by the handle `add` returns."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._spans: list[tuple[int, int]] = []

    def add(self, data: bytes) -> int:
        self._file.seek(0, os.SEEK_END)
        self._spans.append((self._file.tell(), len(data)))
        self._file.write(data)
        return len(self._spans) - 1

    def read(self, handle: int) -> bytes:
        offset, size = self._spans[handle]
        self._file.seek(offset)
        return self._file.read(size)

    def data_uri(self, handle: int, mime: str) -> str:
        return f"data:{mime};base64," + base64.b64encode(self.read(handle)).decode("ascii")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
