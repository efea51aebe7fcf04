"""Which output an `--out` names: a single Parquet file or a Parquet dataset folder, and its sink.

A folder is what a cluster writes and what a large collection wants (a run adds files instead of
rewriting one big file); a `.parquet` name keeps the single file that is simplest to hand around.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmbatch.sinks import dataset_dir, parquet_file
from vlmbatch.sinks.dataset_dir import LOCK_NAME, ParquetDatasetSink
from vlmbatch.sinks.parquet_file import ParquetSink, output_files
from vlmbatch.sinks.resumable import ResumableSink


def is_folder_output(out: str | os.PathLike) -> bool:
    """A URI (`s3://`, `gs://`, `file://`), a name ending in `/`, an existing folder, or a name without a
    suffix that is not an existing file (an older single-file output named so is still one)."""
    text = os.fspath(out)
    if "://" in text or text.endswith(("/", os.sep)):
        return True
    path = Path(text)
    return path.is_dir() or (path.suffix == "" and not path.exists())


def open_sink(out: str | os.PathLike, schema: pa.Schema, **options) -> ResumableSink:
    """The resumable sink writing `out`; `options` are the sinks' shared keyword arguments."""
    if is_folder_output(out):
        return ParquetDatasetSink(os.fspath(out), schema, **options)
    return ParquetSink(Path(out), schema, **options)


def stored_schema(out: str | os.PathLike) -> pa.Schema | None:
    """The schema an existing output was written with, its metadata (settings, model) included; None
    when `out` holds nothing yet."""
    return (dataset_dir if is_folder_output(out) else parquet_file).stored_schema(out)


def as_dataset(out: str | os.PathLike):
    """OUT (a file, or a folder's data files; hidden ones, as the lock, skipped) as one pyarrow dataset,
    its schema every file's columns: a file written before a nullable column was added reads null
    there, whichever file a reader would take the schema from."""
    import pyarrow.dataset as ds

    found = ds.dataset(os.fspath(out), format="parquet")
    if not found.files:
        return found
    return ds.dataset(found.files, format="parquet", schema=pa.unify_schemas([pq.read_schema(file) for file in found.files]))


def written_paths(out: str | os.PathLike) -> tuple[Path, ...]:
    """What writing `out` puts on this machine's disk (never to be read back as input)."""
    text = os.fspath(out)
    if "://" in text and not text.startswith("file://"):
        return ()
    if is_folder_output(out):
        folder = Path(text.removeprefix("file://"))
        return folder, folder / LOCK_NAME
    return output_files(out)
