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

import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.features.features import require_decoding
from huggingface_hub.errors import GatedRepoError

from vlmbatch.errors import VlmbatchError
from vlmbatch.images import IMAGE_EXTENSIONS
from vlmbatch.records import ImageRecord, ImageRef

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What reading a dataset can raise when the data (not our code) is at fault.
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, datasets.exceptions.DatasetsError)

AnyDataset = datasets.Dataset | datasets.IterableDataset


@dataclass(frozen=True)
class Source:
    """A lazy, re-iterable collection of `ImageRecord`s.

    `size` is the number of records when it is known without reading them (saved datasets, Parquet
    manifests, Hub splits with published sizes), for a progress bar; otherwise None.
    """

    description: str
    size: int | None
    records: Callable[[], Iterator[ImageRecord]] = field(repr=False)  # a fresh iterator per call

    def __iter__(self) -> Iterator[ImageRecord]:
        return self.records()


@dataclass(frozen=True)
class _Columns:
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
    columns = _Columns(image=image_column, id=id_column)
    if path.is_file():
        return _open_file(path.absolute(), columns)
    if path.is_dir():
        return _open_folder(path.absolute(), split, columns)
    if _HUB_ID.match(source):
        return _open_hub(source, split, columns)
    raise VlmbatchError(f"source not found: {source}")


# --- files and folders -------------------------------------------------------------------------------


def _open_file(path: Path, columns: _Columns) -> Source:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        record = ImageRecord(id=path.name, image=str(path))
        return Source(description=f"image {path}", size=1, records=lambda: iter([record]))
    if suffix in MANIFEST_BUILDERS:
        return _open_manifest([path], columns, description=f"manifest {path}")
    raise VlmbatchError(
        f"unsupported source file {path}: expected an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
        f"or a {', '.join(MANIFEST_BUILDERS)} manifest"
    )


def _open_folder(path: Path, split: str | None, columns: _Columns) -> Source:
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return _open_saved_dataset(path, split, columns)
    data_files = _manifest_files(path)
    if data_files:
        return _open_manifest(data_files, columns, description=f"manifest folder {path}")
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
    return Source(description=f"folder {root}", size=None, records=lambda: _walk_images(root))


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
                yield ImageRecord(id=image.relative_to(root).as_posix(), image=str(image))


# --- datasets: saved, manifests, Hub --------------------------------------------------------------------


def _open_saved_dataset(path: Path, split: str | None, columns: _Columns) -> Source:
    try:
        loaded = datasets.load_from_disk(str(path))
    except _READ_ERRORS as exc:
        raise VlmbatchError(f"cannot load saved dataset {path}: {_one_line(exc)}") from exc
    description = f"dataset {path}"
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(loaded, split, description)
        loaded, description = loaded[chosen], f"{description} (split {chosen})"
    return _dataset_source(loaded, columns, base_dir=path, description=description, size=len(loaded))


def _open_manifest(files: list[Path], columns: _Columns, description: str) -> Source:
    """Stream data files with `datasets`; relative image paths resolve from the files' folder."""
    builder = MANIFEST_BUILDERS[files[0].suffix.lower()]
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:  # `datasets` fails on these with a bare StopIteration
        raise VlmbatchError(f"manifest file {empty[0]} is empty")
    try:
        data_files = [str(f) for f in files]
        dataset = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
        size = sum(pq.read_metadata(f).num_rows for f in files) if builder == "parquet" else None
    except _READ_ERRORS as exc:
        raise VlmbatchError(f"cannot read {description}: {_one_line(exc)}") from exc
    return _dataset_source(dataset, columns, base_dir=files[0].parent, description=description, size=size)


def _open_hub(name: str, split: str | None, columns: _Columns) -> Source:
    """Stream a Hub dataset; nothing is downloaded up front beyond the file listing."""
    splits = _load_hub_dataset(name)
    chosen = _pick_split(splits, split, f"Hub dataset {name}")
    dataset = splits[chosen]
    split_info = (dataset.info.splits or {}).get(chosen)
    size = split_info.num_examples if split_info and split_info.num_examples else None
    description = f"Hub dataset {name} (split {chosen})"
    return _dataset_source(dataset, columns, base_dir=None, description=description, size=size)


def _load_hub_dataset(name: str) -> Mapping[str, datasets.IterableDataset]:
    """`load_dataset(name, streaming=True)` with its many failure modes turned into one clear line."""
    try:
        return datasets.load_dataset(name, streaming=True)
    except GatedRepoError as exc:
        raise VlmbatchError(
            f"Hub dataset {name} is gated: accept its terms on huggingface.co and set HF_TOKEN"
        ) from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise VlmbatchError(
            f"source not found: {name} is neither a local path nor an accessible Hub dataset "
            "(check the name; private or gated datasets need HF_TOKEN)"
        ) from exc
    except ConnectionError as exc:
        raise VlmbatchError(
            f"cannot reach the Hugging Face Hub to load {name} (offline?); "
            "use a local path, or set HF_HUB_OFFLINE=1 if the dataset is cached"
        ) from exc
    except Exception as exc:  # the Hub stack raises many types; the user needs one line, not a traceback
        raise VlmbatchError(f"cannot load Hub dataset {name}: {_one_line(exc)}") from exc


def _pick_split(splits: Mapping[str, Any], split: str | None, where: str) -> str:
    names = list(splits)
    if split is not None:
        if split in splits:
            return split
        raise VlmbatchError(f"split {split!r} not found in {where}; available splits: {', '.join(names)}")
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(names) == 1:
        return names[0]
    raise VlmbatchError(f"{where} has several splits ({', '.join(names)}); choose one with --split")


def _dataset_source(
    dataset: AnyDataset, columns: _Columns, *, base_dir: Path | None, description: str, size: int | None
) -> Source:
    """Validate the columns, switch image decoding off and wrap the dataset as a `Source`."""
    names = _column_names(dataset, description)
    image_column = columns.image or _default_image_column(dataset.features)
    for option, column in (("--image-column", image_column), ("--id-column", columns.id)):
        if column is not None and column not in names:
            raise VlmbatchError(
                f"no column {column!r} in {description} (set {option}); available columns: {', '.join(names)}"
            )
    passthrough = [n for n in names if n != image_column and not _is_media_or_binary(dataset.features, n)]
    if dataset.features is not None:
        # Drop other media columns so iterating never decodes them, and keep the image undecoded.
        dataset = dataset.select_columns([image_column, *passthrough])
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    reader = _DatasetReader(dataset, image_column, columns.id, passthrough, base_dir, description)
    return Source(description=description, size=size, records=reader.records)


def _column_names(dataset: AnyDataset, description: str) -> list[str]:
    """Column names, peeking at the first row when a streamed format (CSV) does not declare them."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    try:
        first = next(iter(dataset), None)
    except _READ_ERRORS as exc:
        raise VlmbatchError(f"cannot read {description}: {_one_line(exc)}") from exc
    if first is None:
        raise VlmbatchError(f"{description} has no rows")
    return list(first)


def _default_image_column(features: datasets.Features | None) -> str:
    """The first column typed as `datasets.Image`, else "image"."""
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    return DEFAULT_IMAGE_COLUMN


def _is_media_or_binary(features: datasets.Features | None, name: str) -> bool:
    """Columns that do not belong in `ImageRecord.extra`: decodable media and raw bytes."""
    if features is None:
        return False
    feature = features[name]
    binary = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
    return binary or require_decoding(feature)


@dataclass(frozen=True)
class _DatasetReader:
    """Turns dataset rows into `ImageRecord`s; re-iterable because each call restarts the dataset."""

    dataset: AnyDataset
    image_column: str
    id_column: str | None
    passthrough: list[str]
    base_dir: Path | None
    description: str

    def records(self) -> Iterator[ImageRecord]:
        try:
            for index, row in enumerate(self.dataset):
                yield self._record(index, row)
        except _READ_ERRORS as exc:
            raise VlmbatchError(f"cannot read {self.description}: {_one_line(exc)}") from exc

    def _record(self, index: int, row: Mapping[str, Any]) -> ImageRecord:
        record_id = str(row[self.id_column]) if self.id_column else str(index)
        extra = {name: _json_simple(row[name]) for name in self.passthrough}
        return ImageRecord(id=record_id, image=self._image_ref(row[self.image_column]), extra=extra)

    def _image_ref(self, value: Any) -> ImageRef:
        """A path (made absolute against `base_dir`) or bytes, from any way a dataset stores an image.

        A missing image becomes empty bytes, which the workers report as an undecodable image for that
        row instead of stopping the run.
        """
        if isinstance(value, Mapping):  # the `datasets.Image` struct: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            return b""
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            is_local_relative = "://" not in value and not os.path.isabs(value)
            return str(self.base_dir / value) if self.base_dir and is_local_relative else value
        raise VlmbatchError(
            f"column {self.image_column!r} of {self.description} holds {type(value).__name__} values, "
            "not image paths or bytes (set --image-column)"
        )


def _json_simple(value: Any) -> Any:
    """Reduce a dataset value to JSON types so `extra` can be written anywhere; bytes are dropped."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_simple(item) for key, item in value.items()}
    if isinstance(value, Iterable):
        return [_json_simple(item) for item in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
