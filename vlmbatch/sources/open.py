"""Where images come from: `open_source` decides what the user's SOURCE means and returns a lazy `Source`.

Nothing is decoded or loaded whole (folders are walked as they are iterated, manifests and Hub datasets
streamed, saved datasets memory-mapped), so a million-image source costs the same to open as ten images.
Resolution: an existing file is an image (by extension), a .parquet/.jsonl/.json/.csv manifest or a
WebDataset .tar shard; an existing folder is a `save_to_disk` dataset (marker files), a WebDataset
folder (.tar files and no images beside them: img2dataset's .parquet beside its shards are not a
manifest), a manifest folder (data files and no images beside them) or an image folder, walked
recursively; a brace pattern that is no local path (`shards/{00000..00009}.tar`) names WebDataset shards;
an `owner/name` that is no local path is a Hub dataset, streamed.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sources.images import IMAGE_EXTENSIONS
from vlmbatch.sources.records import (
    FOLDER_DATA_EXTENSIONS,
    MANIFEST_BUILDERS,
    SAVED_DATASET_MARKERS,
    Columns,
    ImageRecord,
    Source,
    file_version,
    readable,
)
from vlmbatch.sources.shards import SHARD_SUFFIX, expand_pattern, folder_shards, is_pattern, open_webdataset

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def open_source(
    source: str,
    *,
    split: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    confine: bool = False,
    exclude: Iterable[str | os.PathLike] = (),
) -> Source:
    """Resolve SOURCE (see the module docstring) into a lazy `Source`.

    `split` only matters for sources with several splits (a saved DatasetDict, a Hub dataset); when it
    is None, "test" is used if present, else the only split. `image_column` and `id_column` only
    matter for datasets and manifests. `confine` makes each image path of a dataset or manifest that
    lies outside its folder (by '..', an absolute path or a symlink) an error row instead of a read.
    `exclude` names files and folders that are never inputs, wherever they sit in a folder (a job's
    output and the files its sink keeps beside it). Raises `VlmbatchError` when nothing usable matches.
    """
    path = Path(source).expanduser()
    columns = Columns(image=image_column, id=id_column)
    if path.is_file() or (path.exists() and not path.is_dir()):  # a FIFO or device: refused, never opened
        return _open_file(path.absolute(), columns, confine)
    if path.is_dir():
        return _open_folder(path.absolute(), split, columns, confine, _excluded_paths(exclude))
    if is_pattern(source):
        shards = expand_pattern(source)
        return open_webdataset(shards, f"WebDataset shards {source} ({len(shards)} shards)")
    if _HUB_ID.match(source):
        from vlmbatch.sources.hf_datasets import open_hub

        return open_hub(source, split, columns, confine)
    raise VlmbatchError(f"source not found: {source}")


def _excluded_paths(paths: Iterable[str | os.PathLike]) -> frozenset[str]:
    """The real paths of `paths`, spelled as the folder walk spells them."""
    return frozenset(os.path.realpath(path) for path in paths)


# --- files and folders -------------------------------------------------------------------------------


def _open_file(path: Path, columns: Columns, confine: bool) -> Source:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:  # not a regular file: its decoding says what it is, in its row
        def record() -> Iterator[ImageRecord]:  # the file's version as of each run
            yield ImageRecord(id=path.name, image=str(path), version=file_version(path))

        return Source(description=f"image {path}", size=1, records=record, unique_ids=True)
    if suffix in MANIFEST_BUILDERS and not path.is_file():
        raise VlmbatchError(f"manifest {path} is not a regular file")  # reading a FIFO would wait for a writer
    if suffix in MANIFEST_BUILDERS:
        from vlmbatch.sources.hf_datasets import open_manifest

        return open_manifest([path], columns, description=f"manifest {path}", confine=confine)
    if suffix == SHARD_SUFFIX:
        if not path.is_file():
            raise VlmbatchError(f"shard {path} is not a regular file")
        return open_webdataset([path], f"WebDataset shard {path}")
    raise VlmbatchError(
        f"unsupported source file {path}: expected an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
        f"a {', '.join(MANIFEST_BUILDERS)} manifest or a .tar WebDataset shard"
    )


def _open_folder(path: Path, split: str | None, columns: Columns, confine: bool, exclude: frozenset[str]) -> Source:
    # Datasets are imported only for dataset sources: `datasets` takes most of a second to import.
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        from vlmbatch.sources.hf_datasets import open_saved_dataset

        return open_saved_dataset(path, split, columns, confine)
    shards = folder_shards(path, exclude)
    if shards:  # before manifests: img2dataset writes a .parquet of metadata beside each shard
        return open_webdataset(shards, f"WebDataset folder {path} ({len(shards)} shards)")
    data_files = _manifest_files(path, exclude)
    if data_files:
        from vlmbatch.sources.hf_datasets import open_manifest

        return open_manifest(data_files, columns, description=f"manifest folder {path}", confine=confine)
    return _open_image_folder(path, exclude)


def _manifest_files(folder: Path, exclude: frozenset[str]) -> list[Path]:
    """The folder's own data files if it is a manifest folder (no images beside them), else [].

    An output written into the folder is not one of them: a folder whose images all sit in subfolders
    would be read as a manifest (the output) by every run after the first."""
    real = os.path.realpath(folder)
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise VlmbatchError(f"cannot read folder {readable(str(folder))}: {exc.strerror}") from None
    files = sorted(p for p in entries if p.is_file() and not p.name.startswith(".")
                   and os.path.join(real, p.name) not in exclude)
    suffixes = {p.suffix.lower() for p in files}
    if suffixes & IMAGE_EXTENSIONS:
        return []
    data_files = [p for p in files if p.suffix.lower() in FOLDER_DATA_EXTENSIONS]
    formats = {p.suffix.lower() for p in data_files}
    if len(formats) > 1:
        listed = ", ".join(sorted(formats))
        raise VlmbatchError(f"folder {folder} mixes data file formats ({listed}); keep one")
    return data_files


def _open_image_folder(root: Path, exclude: frozenset[str]) -> Source:
    unreadable: list[OSError] = []
    if next(_image_paths(root, exclude, unreadable.append), None) is None:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        skipped = f"; cannot read folder {readable(str(unreadable[0].filename))}" if unreadable else ""
        raise VlmbatchError(f"no images found in folder {root} (looked for {extensions}){skipped}")
    return Source(description=f"folder {root}", size=None, records=lambda: _walk_images(root, exclude),
                  unique_ids=True, count=lambda: sum(1 for _ in _image_paths(root, exclude, _ignore)))


def _walk_images(root: Path, exclude: frozenset[str]) -> Iterator[ImageRecord]:
    """The folder's records: ids relative to `root` with '/' separators; see `_image_paths`."""
    for image in _image_paths(root, exclude, _warn_unreadable):
        yield ImageRecord(id=image.relative_to(root).as_posix(), image=str(image), version=file_version(image))


def _image_paths(root: Path, exclude: frozenset[str], on_error: Callable[[OSError], None]) -> Iterator[Path]:
    """Yield the image paths under `root` in sorted order, none of them in `exclude` (real paths).

    Hidden files and folders are skipped. Symlinked folders are followed, but each real folder is
    visited once, so a link back to an ancestor cannot loop. A folder that cannot be listed goes to
    `on_error` and is skipped.
    """
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(name for name in dirnames
                             if not name.startswith(".") and os.path.join(real, name) not in exclude)
        for name in sorted(filenames):
            if (not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                    and os.path.join(real, name) not in exclude):
                yield Path(dirpath, name)


def _warn_unreadable(error: OSError) -> None:
    """Its images get no rows, so a run must say so; once per run (the walks that only count are quiet)."""
    warnings.warn(f"cannot read folder {readable(str(error.filename))} ({error.strerror}): its images are skipped",
                  VlmbatchWarning, stacklevel=2)


def _ignore(error: OSError) -> None:
    pass
