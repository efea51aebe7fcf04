"""The unit of work that flows from a Source to the Sink."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from PIL import Image


@dataclass(frozen=True)
class Unreadable:
    """An image its source already refuses to read (e.g. a manifest path outside the folder it is
    confined to); decoding it fails with `reason`, so it becomes an error row like any broken image."""

    reason: str


# Where an image comes from. Decoding is deferred to the processor workers so sources stay cheap.
ImageRef = Union[str, os.PathLike, bytes, Image.Image, Unreadable]


@dataclass(frozen=True)
class ImageRecord:
    """One image to process.

    `id` is stable across runs (it is what resume keys on): for folders the path relative to the
    source root with `/` separators, for datasets and manifests the id column's value, else an image
    path as the rows write it, else the row index. Bytes a file name holds that are not UTF-8 are
    spelled as escapes (see `readable`).
    `version` tells one content of the image under that id from another: for an image file, its size
    and modification time (see `file_version`), so that a run can tell a file replaced since its row was
    written; None where nothing tells (bytes, dataset rows).
    `extra` carries passthrough columns (e.g. a dataset's own metadata).
    """

    id: str
    image: ImageRef
    extra: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None

    def __post_init__(self):
        # Every source's ids pass here on their way to a row; the image keeps the name it really has.
        object.__setattr__(self, "id", readable(self.id))


def readable(text: str) -> str:
    """`text` as valid UTF-8, for a row or a message.

    A file name that is not UTF-8 reaches Python with each undecodable byte as a lone surrogate
    (surrogateescape), which Parquet cannot store: those bytes are spelled `\\xNN`, as `backslashreplace`
    spells them (so `x\\xe9.jpg`, the same on every run), and any other lone surrogate `\\udNNN`."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte of a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_image_key(image: str) -> str:
    """Spell an image reference the way folder sources spell record ids: '/' separators, no leading './'."""
    key = image.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def file_version(path: str | os.PathLike) -> str | None:
    """`"<size>:<mtime in ns>"` of a file, None if it cannot be read (its decoding will say why).

    Any replacement of a file (a copy, an upload, an edit) changes one or the other; reading the
    contents to hash them would cost a scheduled run over a large folder all of its files' bytes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class Question:
    """One VQA question about the image whose record id (or path relative to the source) is `image`."""

    image: str
    question: str
    question_id: str
