"""The unit of work that flows from a Source to the Sink (`ImageRecord`, `Question`), the `Source` that
yields records, and the defaults every kind of source shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Union

from PIL import Image

# Single-file manifests, by extension, and the `datasets` builder that streams them.
MANIFEST_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# Data files that make a folder a manifest folder. `.json` is left out: folders of images often hold
# unrelated JSON (configs, annotations) that is not a table of images.
FOLDER_DATA_EXTENSIONS = frozenset({".parquet", ".jsonl", ".csv"})
# Files whose presence marks a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
# The split used when a dataset has several and none is asked for: evaluation runs want held-out data.
DEFAULT_SPLIT = "test"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_ID_COLUMN = "id"  # used when present and no --id-column is given
# Columns a table's images are read from, when it has no image column, as URLs (COCO's and Flickr's names).
URL_COLUMNS = ("url", "image_url", "coco_url", "flickr_url")
URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class Unreadable:
    """An image its source already refuses to read (e.g. a manifest path outside the folder it is
    confined to); decoding it fails with `reason`, so it becomes an error row like any broken image."""

    reason: str


@dataclass(frozen=True)
class TarMember:
    """An image that is member `member` of the uncompressed tar `shard` (a WebDataset shard): its bytes
    are `size` bytes from `offset`, read by the worker that decodes it, so a pass over the shards reads
    headers only. Decoding refuses it if the shard's `file_version` is no longer `shard_version`."""

    shard: str
    member: str
    offset: int
    size: int
    shard_version: str | None = None


@dataclass(frozen=True)
class Url:
    """An image on a web server: fetched into the image cache by `sources.fetch` (--fetch-images) before it
    is decoded; without fetching, decoding refuses it with a reason that names the flag."""

    url: str


def as_url(value: str) -> Url | None:
    """`value` as a `Url` if it is an http(s) URL, else None."""
    return Url(value) if value.lower().startswith(URL_SCHEMES) else None


# Where an image comes from. Decoding is deferred to the processor workers so sources stay cheap.
ImageRef = Union[str, os.PathLike, bytes, Image.Image, Unreadable, TarMember, Url]


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


@dataclass(frozen=True)
class Source:
    """A lazy, re-iterable collection of `ImageRecord`s.

    `size` is the number of records when it is known without reading them (saved datasets, Parquet
    manifests, Hub splits with published sizes), for a progress bar; otherwise None.
    `unique_ids` is True where no id can come twice (a folder's relative paths, one file), so a run
    need not remember the ids it has seen to skip repeats.
    `count`, where `size` is None, counts the records by a pass much cheaper than reading them (a
    folder's listing), for a progress bar that wants a total; called only by those that do.
    """

    description: str
    size: int | None
    records: Callable[[], Iterator[ImageRecord]] = field(repr=False)  # a fresh iterator per call
    unique_ids: bool = False
    count: Callable[[], int] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[ImageRecord]:
        return self.records()


@dataclass(frozen=True)
class Columns:
    """The user's --image-column / --id-column choices (None: use the default)."""

    image: str | None
    id: str | None
