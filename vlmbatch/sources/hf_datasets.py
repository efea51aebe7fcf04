"""Sources backed by Hugging Face `datasets`: saved datasets, manifests (Parquet / JSONL / CSV) and Hub
datasets. Split from `sources` so that plain image folders never pay for importing `datasets`."""

from __future__ import annotations

import datetime
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.features.features import require_decoding
from huggingface_hub.errors import GatedRepoError

from vlmbatch.errors import VlmbatchError
from vlmbatch.hub import why_unreachable
from vlmbatch.sources.records import (
    DEFAULT_ID_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_SPLIT,
    MANIFEST_BUILDERS,
    URL_COLUMNS,
    Columns,
    ImageRecord,
    ImageRef,
    Source,
    Unreadable,
    as_url,
    file_version,
    normalize_image_key,
)

# What reading a dataset can raise when the data (not our code) is at fault.
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, datasets.exceptions.DatasetsError)

AnyDataset = datasets.Dataset | datasets.IterableDataset
NO_HUB_HINT = "use a local path, or set HF_HUB_OFFLINE=1 if the dataset is cached"


def open_saved_dataset(path: Path, split: str | None, columns: Columns, confine: bool = False) -> Source:
    loaded = load_saved(path)
    description = f"dataset {path}"
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(loaded, split, description)
        loaded, description = loaded[chosen], f"{description} (split {chosen})"
    return _dataset_source(loaded, columns, base_dir=path, description=description, size=len(loaded),
                           confine="dataset" if confine else None)


def open_manifest(files: list[Path], columns: Columns, description: str, confine: bool = False) -> Source:
    """Stream data files with `datasets`; relative image paths resolve from the files' folder (to which
    `confine` holds them)."""
    builder = MANIFEST_BUILDERS[files[0].suffix.lower()]
    # The builder logs a bad file's error and raises it, which becomes our one-line error: not twice.
    logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}").setLevel(logging.CRITICAL)
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:  # `datasets` fails on these with a bare StopIteration
        raise VlmbatchError(f"manifest file {empty[0]} is empty")
    try:
        data_files = [str(f) for f in files]
        dataset = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
        size = sum(pq.read_metadata(f).num_rows for f in files) if builder == "parquet" else None
    except _READ_ERRORS as exc:
        raise VlmbatchError(f"cannot read {description}: {_one_line(exc)}") from exc
    return _dataset_source(dataset, columns, base_dir=files[0].parent, description=description, size=size,
                           confine="manifest" if confine else None)


def open_hub(name: str, split: str | None, columns: Columns, confine: bool = False) -> Source:
    """Stream a Hub dataset; nothing is downloaded up front beyond the file listing."""
    splits = load_hub(name, streaming=True)
    chosen = _pick_split(splits, split, f"Hub dataset {name}")
    dataset = splits[chosen]
    split_info = (dataset.info.splits or {}).get(chosen)
    size = split_info.num_examples if split_info and split_info.num_examples else None
    description = f"Hub dataset {name} (split {chosen})"
    return _dataset_source(dataset, columns, base_dir=None, description=description, size=size,
                           confine="Hub dataset" if confine else None)


# --- the one way into `datasets`, for jobs and the evaluation alike ----------------------------------------


def load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """`load_from_disk` of a `save_to_disk` folder, its failure as one line."""
    try:
        return datasets.load_from_disk(str(path))
    except _READ_ERRORS as exc:
        raise VlmbatchError(f"cannot load saved dataset {path}: {_one_line(exc)}") from exc


def load_hub(name: str, *, split: str | None = None, streaming: bool, instead: str = NO_HUB_HINT) -> Any:
    """`datasets.load_dataset(name, split=split, streaming=streaming)` after one short probe of the Hub
    (`vlmbatch.hub`), each of its failure modes as one line; `instead` says what to do without the Hub.
    An unknown split stays a ValueError, for the caller that knows other names of it."""
    unreachable = why_unreachable()
    if unreachable:
        raise _no_hub(name, unreachable, instead)
    try:
        return datasets.load_dataset(name, streaming=streaming, **({} if split is None else {"split": split}))
    except GatedRepoError as exc:
        raise VlmbatchError(f"Hub dataset {name} is gated: accept its terms on huggingface.co and set HF_TOKEN") from exc
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as exc:
        raise VlmbatchError(f"source not found: {name} is neither a local path nor an accessible Hub dataset "
                            "(check the name; private or gated datasets need HF_TOKEN)") from exc
    except ConnectionError as exc:
        raise _no_hub(name, _one_line(exc), instead) from exc
    except ValueError as exc:
        if split is not None:
            raise  # most likely an unknown split
        raise VlmbatchError(f"cannot load Hub dataset {name}: {_one_line(exc)}") from exc
    except Exception as exc:  # the Hub stack raises many types; the user needs one line, not a traceback
        raise VlmbatchError(f"cannot load Hub dataset {name}: {_one_line(exc)}") from exc


def _no_hub(name: str, why: str, instead: str) -> VlmbatchError:
    return VlmbatchError(f"cannot reach the Hugging Face Hub to load {name} ({why}); {instead}")


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
    dataset: AnyDataset, columns: Columns, *, base_dir: Path | None, description: str, size: int | None,
    confine: str | None = None,
) -> Source:
    """Validate the columns, switch image decoding off and wrap the dataset as a `Source`. `confine`
    (what `base_dir` is the folder of, for messages) refuses image paths outside `base_dir`."""
    names = _column_names(dataset, description)
    image_column = columns.image or _default_image_column(dataset.features, names)
    id_column = columns.id or (DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in names else None)
    for option, column in (("--image-column", image_column), ("--id-column", id_column)):
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
    reader = _DatasetReader(dataset, image_column, id_column, passthrough, base_dir, description, confine)
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


def _default_image_column(features: datasets.Features | None, names: list[str]) -> str:
    """The first column typed as `datasets.Image`, else "image", else a URL column (`URL_COLUMNS`)."""
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    if DEFAULT_IMAGE_COLUMN not in names:
        return next((name for name in URL_COLUMNS if name in names), DEFAULT_IMAGE_COLUMN)
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
    confine: str | None = None  # refuse paths outside base_dir, the folder of this ("manifest", ...)

    def records(self) -> Iterator[ImageRecord]:
        try:
            for index, row in enumerate(self.dataset):
                yield self._record(index, row)
        except _READ_ERRORS as exc:
            raise VlmbatchError(f"cannot read {self.description}: {_one_line(exc)}") from exc

    def _record(self, index: int, row: Mapping[str, Any]) -> ImageRecord:
        """The id: the id column's value; without one, an image given as a path is known by that path
        as written (so a manifest re-sorted or grown at the top between runs still resumes), spelled as
        a questions file's image is (`normalize_image_key`), other images by their row index."""
        value = row[self.image_column]
        if self.id_column:
            record_id = str(row[self.id_column])
        else:
            record_id = normalize_image_key(value) if isinstance(value, str) and value else str(index)
        extra = {name: _json_simple(row[name]) for name in self.passthrough}
        image = self._image_ref(value)
        version = file_version(image) if isinstance(image, str) else None  # a URL has no file: None
        return ImageRecord(id=record_id, image=image, extra=extra, version=version)

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
        if isinstance(value, str) and as_url(value):
            return as_url(value)  # fetched by the job when --fetch-images says so
        if isinstance(value, str):
            is_local = "://" not in value
            is_local_relative = is_local and not os.path.isabs(value)
            path = str(self.base_dir / value) if self.base_dir and is_local_relative else value
            return self._confined(path, value) if self.confine and is_local else path
        raise VlmbatchError(
            f"column {self.image_column!r} of {self.description} holds {type(value).__name__} values, "
            "not image paths or bytes (set --image-column)"
        )

    def _confined(self, path: str, value: str) -> ImageRef:
        """The file `path` really is, symlinks followed (what is read is what was checked), if that lies
        in the folder; else a refusal, which becomes the row's error."""
        if self._real_base is None:
            return Unreadable(f"a local path in a {self.confine}, which has no folder to confine it to: {value}")
        real = os.path.realpath(path)
        if os.path.commonpath([self._real_base, real]) != self._real_base:
            return Unreadable(f"outside the {self.confine} folder {self._real_base}: {value}")
        return real

    @functools.cached_property
    def _real_base(self) -> str | None:
        return os.path.realpath(self.base_dir) if self.base_dir else None


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
