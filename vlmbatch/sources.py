"""Where images come from: an image folder, one image file, a manifest, a saved dataset or a Hub dataset.

`open_source` decides what the user's SOURCE argument means and returns a lazy `Source`. Nothing is
decoded and nothing is loaded whole: folders are walked as they are iterated, manifests and Hub datasets
are streamed, and saved datasets are memory-mapped, so a million-image source costs the same to open as
a ten-image one. Images travel as paths or bytes; the processor workers decode them.

Resolution order:
1. an existing file: an image (by extension) is one record; a .parquet/.jsonl/.json/.csv file is a manifest;
2. an existing folder: a `save_to_disk` dataset (or DatasetDict) if it has the marker files; a manifest
   folder if its own files are data files and not images; otherwise an image folder, walked recursively;
3. a `user/name` string that is not a local path: a Hugging Face Hub dataset, streamed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vlmbatch.errors import VlmbatchError
from vlmbatch.images import IMAGE_EXTENSIONS
from vlmbatch.records import ImageRecord, file_version

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A lazy, re-iterable collection of `ImageRecord`s.

    `size` is the number of records when it is known without reading them (saved datasets, Parquet
    manifests, Hub splits with published sizes), for a progress bar; otherwise None.
    `unique_ids` is True where no id can come twice (a folder's relative paths, one file), so a run
    need not remember the ids it has seen to skip repeats.
    """

    description: str
    size: int | None
    records: Callable[[], Iterator[ImageRecord]] = field(repr=False)  # a fresh iterator per call
    unique_ids: bool = False

    def __iter__(self) -> Iterator[ImageRecord]:
        return self.records()


@dataclass(frozen=True)
class Columns:
    """The user's --image-column / --id-column choices (None: use the default)."""

    image: str | None
    id: str | None


def open_source(
    source: str,
    *,
    split: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
) -> Source:
    """Resolve SOURCE (see the module docstring) into a lazy `Source`.

    `split` only matters for sources with several splits (a saved DatasetDict, a Hub dataset); when it
    is None, "test" is used if present, else the only split. `image_column` and `id_column` only
    matter for datasets and manifests. Raises `VlmbatchError` when nothing usable matches.
    """
    path = Path(source).expanduser()
    columns = Columns(image=image_column, id=id_column)
    if path.is_file():
        return _open_file(path.absolute(), columns)
    if path.is_dir():
        return _open_folder(path.absolute(), split, columns)
    if _HUB_ID.match(source):
        from vlmbatch.dataset_sources import open_hub

        return open_hub(source, split, columns)
    raise VlmbatchError(f"source not found: {source}")


# --- files and folders -------------------------------------------------------------------------------


def _open_file(path: Path, columns: Columns) -> Source:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        def record() -> Iterator[ImageRecord]:  # the file's version as of each run
            yield ImageRecord(id=path.name, image=str(path), version=file_version(path))

        return Source(description=f"image {path}", size=1, records=record, unique_ids=True)
    if suffix in MANIFEST_BUILDERS:
        from vlmbatch.dataset_sources import open_manifest

        return open_manifest([path], columns, description=f"manifest {path}")
    raise VlmbatchError(
        f"unsupported source file {path}: expected an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
        f"or a {', '.join(MANIFEST_BUILDERS)} manifest"
    )


def _open_folder(path: Path, split: str | None, columns: Columns) -> Source:
    # Datasets are imported only for dataset sources: `datasets` takes most of a second to import.
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        from vlmbatch.dataset_sources import open_saved_dataset

        return open_saved_dataset(path, split, columns)
    data_files = _manifest_files(path)
    if data_files:
        from vlmbatch.dataset_sources import open_manifest

        return open_manifest(data_files, columns, description=f"manifest folder {path}")
    return _open_image_folder(path)


def _manifest_files(folder: Path) -> list[Path]:
    """The folder's own data files if it is a manifest folder (no images beside them), else []."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    suffixes = {p.suffix.lower() for p in files}
    if suffixes & IMAGE_EXTENSIONS:
        return []
    data_files = [p for p in files if p.suffix.lower() in FOLDER_DATA_EXTENSIONS]
    formats = {p.suffix.lower() for p in data_files}
    if len(formats) > 1:
        listed = ", ".join(sorted(formats))
        raise VlmbatchError(f"folder {folder} mixes data file formats ({listed}); keep one")
    return data_files


def _open_image_folder(root: Path) -> Source:
    if next(_walk_images(root), None) is None:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise VlmbatchError(f"no images found in folder {root} (looked for {extensions})")
    return Source(description=f"folder {root}", size=None, records=lambda: _walk_images(root), unique_ids=True)


def _walk_images(root: Path) -> Iterator[ImageRecord]:
    """Yield the images under `root` in sorted order, ids relative to `root` with '/' separators.

    Hidden files and folders are skipped. Symlinked folders are followed, but each real folder is
    visited once, so a link back to an ancestor cannot loop.
    """
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                image = Path(dirpath, name)
                yield ImageRecord(id=image.relative_to(root).as_posix(), image=str(image), version=file_version(image))
