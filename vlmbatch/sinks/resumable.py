"""What the resumable outputs share: the single file (`parquet_file.ParquetSink`) and the dataset folder
(`dataset_dir.ParquetDatasetSink`). Rows are keyed and buffered here, the outputs' files read back for
resume, checked against this run's settings and schema, and locked; each output stores rows its own way."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sinks.atomic import fsync_directory, link_new
from vlmbatch.spec import DEFAULT_FLUSH_ROWS

SETTINGS_KEY = "vlmbatch.settings"
WRITTEN_AT_KEY = "vlmbatch.written_at"
# Rows per row group of a merged or rewritten file: large enough for efficient reads, small enough to buffer.
MERGE_ROW_GROUP_ROWS = 65_536
# A temporary file: `.NAME.PID-TOKEN.tmp` (older versions wrote `.NAME.tmp`, without a writer).
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+?)(?:\.(?P<pid>\d+)-[0-9a-f]+)?\.tmp")
OVERWRITE_HINT = "use --overwrite to replace it or a different --out"
# Output names that promise another format than the Parquet written (a CSV named file would be unreadable).
OTHER_FORMATS = frozenset({".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", ".xlsx", ".xls", ".arrow",
                           ".feather", ".orc", ".avro"})
_UNSET = object()  # a setting absent on one side of a comparison

File = Any  # a file of an output: a local Path, or a path in `ResumableSink._filesystem`


class ResumableSink:
    """Rows keyed by `key`, buffered, and read back from the output's files for resume.

    A subclass stores the rows: it sets `path` (what errors name), lists `_existing_files()` in write
    order (a key's row in a later file, or later in one file, is its latest), and writes `flush` and
    `close`. `_filesystem` is None for local files, else the pyarrow file system the files are read from.
    See `ParquetSink` for what `key`, `failure_column`, `version_column`, `settings` and `metadata` mean.
    """

    path: Any
    _filesystem: pafs.FileSystem | None = None

    def __init__(self, schema: pa.Schema, *, key: tuple[str, ...], failure_column: str | None,
                 version_column: str | None, settings: dict, metadata: dict[str, str] | None,
                 flush_rows: int = DEFAULT_FLUSH_ROWS, flush_seconds: float = 30.0) -> None:
        missing = [name for name in key if name not in schema.names]
        if not key or missing:
            raise ValueError(f"key columns {missing or key} must be non-empty and in the schema")
        for role, column in (("failure", failure_column), ("version", version_column)):
            if column is not None and column not in schema.names:
                raise ValueError(f"{role} column {column!r} is not in the schema")
        self._key = tuple(key)
        self._failure_column = failure_column
        self._version_column = version_column
        self._failures: dict[tuple, str] = {}  # failed keys, as `done_keys` last found them: key -> reason
        self._settings = json.loads(json.dumps(settings, sort_keys=True))  # as it will read back
        self._metadata = {
            **(schema.metadata or {}),
            SETTINGS_KEY: json.dumps(self._settings, sort_keys=True),
            **{str(name): str(value) for name, value in (metadata or {}).items()},
        }
        self._schema = schema.remove_metadata()
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._closed = False

    # --- public API ------------------------------------------------------------------------------------

    def done_keys(self) -> dict[tuple, str | None]:
        """Keys whose row succeeded, each with its row's version (None without a `version_column`): in
        the output's files and buffered. A key's row is its latest one. Keys whose row failed are left
        out, and listed in `failed_keys`, to be tried again."""
        done: dict[tuple, str | None] = {}
        self._failures = {}
        buffered = (self._row_outcome(row) for row in self._buffer)
        for key, failure, version in itertools.chain(*map(self._iter_outcomes, self._existing_files()), buffered):
            if failure is None:
                done[key] = version
                self._failures.pop(key, None)
            else:
                done.pop(key, None)
                self._failures[key] = failure
        return done

    def latest_batches(self) -> Iterator[pa.RecordBatch]:
        """The output's rows as they read back, each key's latest row only, in batches (buffered rows
        not included). Two passes over the files: their keys, then the rows that are latest."""
        files = self._existing_files()
        latest: dict[tuple, tuple[int, int]] = {}
        for file_index, path in enumerate(files):
            for row_index, key in enumerate(self._iter_keys(path)):
                latest[key] = (file_index, row_index)
        for file_index, path in enumerate(files):
            first_row = 0
            for batch in self._batches(path):
                keys = self._batch_keys(batch)
                yield batch.filter([latest[key] == (file_index, first_row + i) for i, key in enumerate(keys)])
                first_row += len(keys)

    @property
    def failed_keys(self) -> set[tuple]:
        """Keys whose row failed, as the last `done_keys` found them."""
        return set(self._failures)

    def write(self, rows: list[dict]) -> int:
        """Buffer rows; flush when `flush_rows` are waiting or `flush_seconds` passed since the last flush.

        A failed row that repeats the failure the output holds for its key (same reason) is dropped, so
        a rerun over files that are still broken rewrites nothing. Returns the number of rows kept."""
        if self._closed:
            raise RuntimeError(f"sink for {self.path} is closed")
        rows = [row for row in rows if not self._repeats_failure(row)]
        self._buffer.extend(rows)
        due = time.monotonic() - self._last_flush >= self._flush_seconds
        if len(self._buffer) >= self._flush_rows or (due and self._buffer):
            self.flush()
        return len(rows)

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Finalize on success and on any exception, Ctrl-C included; the exception still propagates."""
        self.close()

    # --- reading the output back -----------------------------------------------------------------------

    def _existing_files(self) -> list[File]:
        raise NotImplementedError

    def _file_schema(self) -> pa.Schema:
        return self._schema.with_metadata({**self._metadata, WRITTEN_AT_KEY: now()})

    def _check_compatible(self, path: File) -> None:
        """Refuse to add to a file written by another kind of run (settings or columns differ)."""
        try:
            existing = pq.read_schema(str(path), filesystem=self._filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise VlmbatchError(f"{path} is not a readable Parquet file; {OVERWRITE_HINT}") from exc
        if not readable_as(existing.remove_metadata(), self._schema):
            diff = _schema_diff(existing, self._schema)
            raise VlmbatchError(f"{path} has different columns ({diff}); {OVERWRITE_HINT}")
        stored = (existing.metadata or {}).get(SETTINGS_KEY.encode())
        if stored is None:
            raise VlmbatchError(f"{path} was not written by vlmbatch (no settings in it); {OVERWRITE_HINT}")
        # Only what this run records is compared: a setting that an earlier vlmbatch recorded and this
        # one no longer does has stopped deciding the outputs (the model's name: its weights decide).
        old_settings = {name: value for name, value in json.loads(stored).items() if name in self._settings}
        if old_settings != self._settings:
            diff = _settings_diff(old_settings, self._settings)
            raise VlmbatchError(f"{path} was written with different settings ({diff}); {OVERWRITE_HINT}")

    def _batches(self, path: File, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """A file's rows (only `columns`, if given) in batches of the current schema: a file written
        before a nullable column was added reads as null there (see `_check_compatible`)."""
        file = pq.ParquetFile(str(path), filesystem=self._filesystem, page_checksum_verification=True)
        names = columns or self._schema.names
        present = [name for name in names if name in file.schema_arrow.names]
        schema = pa.schema([self._schema.field(name) for name in names])
        with file:
            for batch in file.iter_batches(batch_size=MERGE_ROW_GROUP_ROWS, columns=present):
                if len(present) < len(names):
                    arrays = [batch.column(f.name) if f.name in present else pa.nulls(batch.num_rows, f.type)
                              for f in schema]
                    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
                yield batch

    def _iter_keys(self, path: File) -> Iterator[tuple]:
        """The key of each row of a file, streamed, reading only the key columns."""
        for batch in self._batches(path, list(self._key)):
            yield from self._batch_keys(batch)

    def _batch_keys(self, batch: pa.RecordBatch) -> list[tuple]:
        return list(zip(*(batch.column(name).to_pylist() for name in self._key)))

    def _row_key(self, row: dict) -> tuple:
        return tuple(row[name] for name in self._key)

    def _row_outcome(self, row: dict) -> tuple[tuple, str | None, str | None]:
        """(key, failure or None, version or None) of a row."""
        failure, version = (row.get(c) if c else None for c in (self._failure_column, self._version_column))
        return self._row_key(row), failure, version

    def _repeats_failure(self, row: dict) -> bool:
        key, failure, _ = self._row_outcome(row)
        return failure is not None and self._failures.get(key) == failure

    def _iter_outcomes(self, path: File) -> Iterator[tuple[tuple, str | None, str | None]]:
        """`_row_outcome` of each row of a file, streamed, reading only the columns it needs."""
        extra = [c for c in (self._failure_column, self._version_column) if c]
        for batch in self._batches(path, [*self._key, *extra]):
            failures, versions = (batch.column(c).to_pylist() if c else itertools.repeat(None)
                                  for c in (self._failure_column, self._version_column))
            yield from zip(self._batch_keys(batch), failures, versions)

    def _unreadable(self, path: File) -> str | None:
        """Why `path` cannot be read whole as Parquet (its footer, every page of every column), or None."""
        # An OS error opening it (permission) is no damage: it is raised.
        opened = open(path, "rb") if self._filesystem is None else self._filesystem.open_input_file(str(path))
        with opened as file:
            try:
                parquet = pq.ParquetFile(file, page_checksum_verification=True)
                for _ in parquet.iter_batches(batch_size=MERGE_ROW_GROUP_ROWS):
                    pass
            except (OSError, ValueError, pa.ArrowException) as exc:
                return " ".join(str(exc).split()) or type(exc).__name__
        return None


class RowGroupWriter:
    """Collects small batches into row groups of about `MERGE_ROW_GROUP_ROWS` rows."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self._writer = writer
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch.replace_schema_metadata(self._writer.schema.metadata))
        self._rows += batch.num_rows
        if self._rows >= MERGE_ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending)
            self._writer.write_table(table, row_group_size=max(self._rows, 1))
        self._pending, self._rows = [], 0


class LockFile:
    """An exclusive, non-blocking flock on a file of the output; the kernel drops it if the process dies."""

    def __init__(self, path: Path, output: Any) -> None:
        self.path = path
        self._output = output
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise VlmbatchError(
                    f"{self._output} is being written by another vlmbatch run (lock {self.path}); "
                    "wait for it to finish or use a different --out"
                ) from None
            if self._still_linked(fd):
                self._fd = fd
                return
            os.close(fd)  # the previous holder removed this file as we locked it; lock the new one

    def held(self) -> bool:
        """Whether the lock file is still the one locked: deleted by hand, or replaced by another run's, it
        no longer keeps other runs out."""
        return self._fd is not None and self._still_linked(self._fd)

    def release(self) -> None:
        """Remove the file before unlocking, so a waiting run never holds a lock on a deleted file; but
        only our own: a file that took its name is another run's lock."""
        if self._fd is not None:
            if self._still_linked(self._fd):
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False


# --- helpers ---------------------------------------------------------------------------------------------


def refuse_other_formats(path: Path, suggestion: Path) -> None:
    """Refuse an output named for another format than Parquet; `suggestion` is the name to give instead."""
    if path.suffix.lower() in OTHER_FORMATS:
        raise VlmbatchError(f"output {path} is named as a {path.suffix} file, but vlmbatch writes Parquet: name "
                            f"it {suggestion} (pandas, polars and DuckDB read it and can write it out as CSV or JSON)")


def left_by_dead_run(temporary: Path, name: str | None) -> bool:
    """Whether a temporary file (of `name`, if given) was left by a process that is gone. One written by
    a process of our pid is: this one has written none yet (the pid was a run's before, in another container)."""
    match = TEMPORARY_NAME.fullmatch(temporary.name)
    if match is None or (name is not None and match["name"] != name):
        return False
    pid = int(match["pid"]) if match["pid"] else 0  # an older version's name gives no writer: left long ago
    return pid <= 0 or pid == os.getpid() or not _process_exists(pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def corrupt_name(name: str) -> str:
    """`NAME.corrupt-<UTC time>`: what a damaged file is renamed to."""
    return f"{name}.corrupt-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def move_aside(path: Path, prefix: str = "") -> Path:
    """Rename a damaged file to `PREFIX NAME.corrupt-<UTC time>` beside it, never over another, and return that."""
    stamped = prefix + corrupt_name(path.name)
    for attempt in itertools.count():
        aside = path.with_name(stamped + (f"-{attempt}" if attempt else ""))
        if link_new(path, aside):
            break
    path.unlink(missing_ok=True)  # gone already where the file system has no hard links (renamed)
    fsync_directory(path.parent)
    return aside


def warn(message: str) -> None:
    warnings.warn(message, VlmbatchWarning, stacklevel=2)


def _settings_diff(old: dict, new: dict) -> str:
    """'a.b: old -> new; ...' for every (dotted, nested) setting that differs."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    pairs = {k: (old_flat.get(k, _UNSET), new_flat.get(k, _UNSET)) for k in old_flat.keys() | new_flat.keys()}
    changed = sorted((k, old, new) for k, (old, new) in pairs.items() if old != new)
    return "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in changed)


def _flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else json.dumps(value)


def readable_as(old: pa.Schema, new: pa.Schema) -> bool:
    """Whether rows of schema `old` read as `new`: the same, or `new` with nullable columns added."""
    added = [field for field in new if field.name not in old.names]
    kept = pa.schema([field for field in new if field.name in old.names])
    return old.equals(kept) and all(field.nullable for field in added)


def _schema_diff(old: pa.Schema, new: pa.Schema) -> str:
    old_types = {f.name: str(f.type) for f in old}
    new_types = {f.name: str(f.type) for f in new}
    changes = [f"no column {name!r}" for name in new_types if name not in old_types]
    changes += [f"extra column {name!r}" for name in old_types if name not in new_types]
    changes += [
        f"{name!r} is {old_types[name]}, not {new_types[name]}"
        for name in new_types
        if name in old_types and old_types[name] != new_types[name]
    ]
    return "; ".join(changes) or "column order or nullability differs"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
