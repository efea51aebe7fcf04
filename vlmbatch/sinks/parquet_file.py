"""Resumable, crash-safe Parquet output.

Scheduled jobs re-run the same command until the collection is done, so the output must survive a crash,
SIGKILL, Ctrl-C or SIGTERM at any instant without losing or duplicating a row that was flushed, and must
refuse to mix the rows of runs with other settings. `ParquetSink` says how.
"""

from __future__ import annotations

import fcntl
import glob
import itertools
import json
import os
import re
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sinks.atomic import (
    fsync_directory,
    link_new,
    output_errors,
    temporary_path,
    write_atomically,
    write_durably,
)
from vlmbatch.spec import DEFAULT_FLUSH_ROWS

SETTINGS_KEY = "vlmbatch.settings"
WRITTEN_AT_KEY = "vlmbatch.written_at"
# Rows per row group of the merged file: large enough for efficient reads, small enough to buffer.
MERGE_ROW_GROUP_ROWS = 65_536
_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"
_PART_NAME = re.compile(r"part-(\d+)\.parquet")
# A temporary file: `.NAME.PID-TOKEN.tmp` (older versions wrote `.NAME.tmp`, without a writer).
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+?)(?:\.(?P<pid>\d+)-[0-9a-f]+)?\.tmp")
_OVERWRITE_HINT = "use --overwrite to replace it or a different --out"
# Output names that promise another format than the Parquet written (a CSV named file would be unreadable).
_OTHER_FORMATS = frozenset({".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".txt", ".xlsx", ".xls", ".arrow",
                            ".feather", ".orc", ".avro"})
_UNSET = object()  # a setting absent on one side of a comparison


def skip_pyarrows_pandas_probe() -> None:
    """Spare this process pyarrow's import of pandas (half a second of start-up, every run).

    On its first conversion of Python values pyarrow imports pandas, only to ask whether the values
    are pandas objects; a job's rows never are. This lets that one probe find no pandas: pyarrow then
    treats values as not pandas without importing it, and still imports pandas if anything later asks
    it for pandas output (`to_pandas`, `from_pandas`). For the CLI, which owns its process; a no-op
    once pandas is imported.
    """
    if "pandas" in sys.modules:
        return
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_NoPandas)


class _NoPandas:
    """A meta path finder under which `import pandas` fails."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("not imported for pyarrow's probe", name=name)
        return None


def output_files(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """What a sink writing `out` keeps on disk: OUT itself, its parts folder and its lock file (its
    temporary files are hidden ones beside these)."""
    out = Path(out)
    return out, out.with_name(out.name + ".parts"), out.with_name(out.name + ".lock")


class ParquetSink:
    """Append rows to the Parquet file `path`, resumably.

    How, for an output OUT:

    * Rows are buffered, then flushed as small part files `OUT.parts/part-NNNNNN.parquet`. Each part is
      written under a temporary name, fsynced and hard-linked into place under the first free number (then
      the folder is fsynced), so a part file either exists complete or does not exist, and never replaces
      another part.
    * `close()` merges OUT (if any) and the parts into a temporary file, streaming record batches, fsyncs it,
      `os.replace`s it onto OUT, fsyncs the folder, and only then deletes the parts.
    * Temporary names carry the writer's pid and a random token, so two writers never share one.
    * Merging keeps each key's latest row. A caller writes a key again only when it decides the row is
      out of date: the job does for a failed row (`failure_column` set: an image that could not be
      decoded, perhaps caught half copied) and for a row of an image replaced since (`version_column`
      differs). OUT never holds a key twice (it is only ever produced by a merge), so only keys that parts
      hold need deciding: an OUT row is dropped when a part holds its key, and a part row when a later
      part row has its key. This makes every crash state recoverable:
        - crash while parts are being written: finished parts are kept, the temporary file is deleted on
          the next open (under the lock, and only if no live process of that pid could still be writing it);
        - crash while merging, before the replace: OUT is the old file, all parts remain; the next close
          merges them again;
        - crash after the replace, while deleting parts: OUT already holds the parts' rows; the next close
          merges the same rows again.
      Memory during the merge is bounded by the parts' keys, not by the size of OUT.
    * An exclusive lock file (`OUT.lock`, flock-based, released by the kernel if the process dies) stops
      two runs from writing the same output at once. Deleting it by hand while a run holds it lets a second
      run in: the first finds its lock file gone or replaced at its next flush or before it would replace
      OUT, and stops there with an error, its parts kept for the next run to merge.
    * Every page carries a CRC32 checksum, verified whenever a page is read. Opening reads OUT and every
      part whole, so damage behind an intact footer is found before any work, not at the final merge. A damaged OUT is refused unless `recover` is given, which moves it aside
      (`OUT.corrupt-<time>`) and goes on: rows in the parts are kept, the rest are made again. A damaged
      part is always moved aside (`part-NNNNNN.parquet.corrupt-<time>`, in OUT.parts), its rows made
      again. Each is said in one `VlmbatchWarning`. A file in OUT.parts named `part-*.parquet` but not as
      parts are named is no part: it is left alone, with a warning.
    * File metadata carries `vlmbatch.settings` (JSON) plus the caller's metadata and `vlmbatch.written_at`.
      Reopening an output written with other settings or another schema is refused, so one file never
      mixes results of different runs. The one schema change accepted is an output written before a
      nullable column was added: its rows read as null there.

    `key` names the columns that identify a row (what resume skips on). A row whose `failure_column`
    is set (non-null: the reason) failed: `done_keys` leaves its key out. `version_column` names what
    `done_keys` reports beside each key (which version of the input the row was made from).
    `settings` (JSON-able) must match those of any existing output (a top-level setting the existing
    output has and `settings` lacks is not compared); `metadata` entries are stored as they are, not
    compared. `recover` moves an OUT that cannot be read aside instead of refusing it.
    """

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        *,
        key: tuple[str, ...],
        failure_column: str | None = None,
        version_column: str | None = None,
        settings: dict,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        recover: bool = False,
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        flush_seconds: float = 30.0,
    ) -> None:
        missing = [name for name in key if name not in schema.names]
        if not key or missing:
            raise ValueError(f"key columns {missing or key} must be non-empty and in the schema")
        for role, column in (("failure", failure_column), ("version", version_column)):
            if column is not None and column not in schema.names:
                raise ValueError(f"{role} column {column!r} is not in the schema")
        self.path, self.parts_dir, lock_path = output_files(path)
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
        self._lock = _LockFile(lock_path, self.path)
        self._open(overwrite, recover)
        self._next_part = max((_part_number(p) for p in self._part_paths()), default=-1) + 1

    # --- public API ------------------------------------------------------------------------------------

    def done_keys(self) -> dict[tuple, str | None]:
        """Keys whose row succeeded, each with its row's version (None without a `version_column`): in
        OUT, in leftover or new parts, buffered. A key's row is its latest one. Keys whose row failed
        are left out, and listed in `failed_keys`, to be tried again."""
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
        """Make buffered rows durable as a new part file. Once this returns, no crash can lose them."""
        if self._buffer:
            table = pa.Table.from_pylist(self._buffer, schema=self._file_schema())
            write = lambda file: pq.write_table(table, file, write_page_checksum=True)  # noqa: E731
            written = _write_new_part(self.parts_dir, self._next_part, write)
            self._next_part = written + 1
            self._buffer.clear()
            self._check_lock()  # after the part: its rows are saved whatever this finds
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, merge everything into the single file OUT, remove the parts and the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            parts = self._part_paths()
            if parts or not self.path.exists():
                self._check_lock()
                self._merge(parts)
            self._remove_parts(parts)
        finally:
            self._closed = True
            self._lock.release()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Finalize on success and on any exception, Ctrl-C included; the exception still propagates."""
        self.close()

    # --- opening ---------------------------------------------------------------------------------------

    def _open(self, overwrite: bool, recover: bool) -> None:
        """Probe that OUT is writable, lock it, then clear or validate what a previous run left."""
        if self.path.is_dir():
            example = self.path / "results.parquet"
            raise VlmbatchError(f"output {self.path} is a directory; give a file path such as {example}")
        if self.path.suffix.lower() in _OTHER_FORMATS:
            raise VlmbatchError(f"output {self.path} is named as a {self.path.suffix} file, but vlmbatch writes "
                                f"Parquet: name it {self.path.with_suffix('.parquet')} (pandas, polars and DuckDB "
                                "read it and can write it out as CSV or JSON)")
        with output_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        try:
            with output_errors(self.path):
                self._clear_leftovers(overwrite)
                self._set_aside_unreadable(recover)
            self._warn_of_misnamed_parts()
            for path in self._existing_files():
                self._check_compatible(path)
        except BaseException:
            self._lock.release()
            raise

    def _clear_leftovers(self, overwrite: bool) -> None:
        """Delete half-written temporary files of dead runs (and, with overwrite, all previous output).
        Called under the lock, so a live writer's temporary is one whose lock was taken from it."""
        if overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.path.unlink(missing_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        merges = self.path.parent.glob(f".{glob.escape(self.path.name)}.*tmp")  # from interrupted merges
        for temporary in itertools.chain(merges, self.parts_dir.glob(".*.tmp")):  # and flushes
            if _left_by_dead_run(temporary, self.path.name if temporary.parent != self.parts_dir else None):
                temporary.unlink(missing_ok=True)

    def _set_aside_unreadable(self, recover: bool) -> None:
        """Read OUT and each part whole, now rather than at the final merge: an unreadable part is moved
        aside, its rows to be made again; an unreadable OUT too with `recover`, else it is refused."""
        if self.path.exists():
            reason = _unreadable(self.path)
            if reason is not None and not recover:
                raise VlmbatchError(
                    f"{self.path} is not a readable Parquet file ({reason}); rerun with --recover (--set recover=true) "
                    f"to move it aside and go on, keeping the rows saved in {self.parts_dir} and making the rest "
                    f"again, or {_OVERWRITE_HINT}")
            if reason is not None:
                aside = _move_aside(self.path)
                _warn(f"{self.path} could not be read ({reason}): moved it to {aside}; rows saved in "
                      f"{self.parts_dir} are kept, the rest are made again")
        for part in self._part_paths():
            reason = _unreadable(part)
            if reason is not None:
                _warn(f"part file {part} could not be read ({reason}): moved it to {_move_aside(part)}; "
                      "its rows are made again")

    def _warn_of_misnamed_parts(self) -> None:
        for path in sorted(self.parts_dir.glob(f"{_PART_PREFIX}*{_PART_SUFFIX}")):
            if _part_number(path) is None:
                _warn(f"{path} is not a part file (those are named part-NNNNNN.parquet): left alone, not read")

    def _check_compatible(self, path: Path) -> None:
        """Refuse to add to a file written by another kind of run (settings or columns differ)."""
        try:
            existing = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise VlmbatchError(f"{path} is not a readable Parquet file; {_OVERWRITE_HINT}") from exc
        if not _readable_as(existing.remove_metadata(), self._schema):
            diff = _schema_diff(existing, self._schema)
            raise VlmbatchError(f"{path} has different columns ({diff}); {_OVERWRITE_HINT}")
        stored = (existing.metadata or {}).get(SETTINGS_KEY.encode())
        if stored is None:
            raise VlmbatchError(f"{path} was not written by vlmbatch (no settings in it); {_OVERWRITE_HINT}")
        # Only what this run records is compared: a setting that an earlier vlmbatch recorded and this
        # one no longer does has stopped deciding the outputs (the model's name: its weights decide).
        old_settings = {name: value for name, value in json.loads(stored).items() if name in self._settings}
        if old_settings != self._settings:
            diff = _settings_diff(old_settings, self._settings)
            raise VlmbatchError(f"{path} was written with different settings ({diff}); {_OVERWRITE_HINT}")

    # --- files -----------------------------------------------------------------------------------------

    def _part_paths(self) -> list[Path]:
        """Finished part files in write order (temporary files start with '.' and never match; nor does a
        name without a part number, nor a part moved aside)."""
        if not self.parts_dir.is_dir():
            return []
        named = self.parts_dir.glob(f"{_PART_PREFIX}*{_PART_SUFFIX}")
        return sorted((path for path in named if _part_number(path) is not None), key=_part_number)

    def _existing_files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._part_paths()

    def _file_schema(self) -> pa.Schema:
        return self._schema.with_metadata({**self._metadata, WRITTEN_AT_KEY: _now()})

    def _merge(self, parts: list[Path]) -> None:
        """Stream OUT and the parts into a new OUT, each key's latest row (see the module docstring)."""
        latest: dict[tuple, tuple[int, int]] = {}  # key -> (part, row in it) of its latest row in the parts
        for part_index, part in enumerate(parts):
            for row_index, key in enumerate(self._iter_keys(part)):
                latest[key] = (part_index, row_index)

        def write_merged(file: BinaryIO) -> None:
            with pq.ParquetWriter(file, self._file_schema(), write_page_checksum=True) as writer:
                row_groups = _RowGroupWriter(writer)
                if self.path.exists():
                    for batch in self._batches(self.path):
                        row_groups.add(batch.filter([key not in latest for key in self._batch_keys(batch)]))
                for part_index, part in enumerate(parts):
                    first_row = 0
                    for batch in self._batches(part):
                        keys = self._batch_keys(batch)
                        row_groups.add(batch.filter([latest[key] == (part_index, first_row + i)
                                                     for i, key in enumerate(keys)]))
                        first_row += len(keys)
                row_groups.flush()

        write_atomically(self.path, write_merged, before_replace=self._check_lock)

    def _check_lock(self) -> None:
        """Stop once the lock file is gone or another file took its name: another run may be writing OUT."""
        if not self._lock.held():
            raise VlmbatchError(
                f"the lock {self._lock.path} was deleted or replaced while this run held it, so another run may "
                f"be writing {self.path}: stopped without replacing it; the rows saved so far are kept in "
                f"{self.parts_dir} for the next run to merge")

    def _batches(self, path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """A file's rows (only `columns`, if given) in batches of the current schema: a file written
        before a nullable column was added reads as null there (see `_check_compatible`)."""
        file = pq.ParquetFile(path, page_checksum_verification=True)
        names = columns or self._schema.names
        present = [name for name in names if name in file.schema_arrow.names]
        schema = pa.schema([self._schema.field(name) for name in names])
        for batch in file.iter_batches(batch_size=MERGE_ROW_GROUP_ROWS, columns=present):
            if len(present) < len(names):
                arrays = [batch.column(f.name) if f.name in present else pa.nulls(batch.num_rows, f.type)
                          for f in schema]
                batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
            yield batch

    def _iter_keys(self, path: Path) -> Iterator[tuple]:
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

    def _iter_outcomes(self, path: Path) -> Iterator[tuple[tuple, str | None, str | None]]:
        """`_row_outcome` of each row of a file, streamed, reading only the columns it needs."""
        extra = [c for c in (self._failure_column, self._version_column) if c]
        for batch in self._batches(path, [*self._key, *extra]):
            failures, versions = (batch.column(c).to_pylist() if c else itertools.repeat(None)
                                  for c in (self._failure_column, self._version_column))
            yield from zip(self._batch_keys(batch), failures, versions)

    def _remove_parts(self, parts: list[Path]) -> None:
        """Delete merged parts; safe to interrupt, since OUT already holds their rows."""
        for part in parts:
            part.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass  # something else was put there; leave it to the user


class _RowGroupWriter:
    """Collects small batches (one per part) into row groups of about `MERGE_ROW_GROUP_ROWS` rows."""

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


class _LockFile:
    """An exclusive, non-blocking flock on a file next to OUT; the kernel drops it if the process dies."""

    def __init__(self, path: Path, output: Path) -> None:
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


def _write_new_part(directory: Path, number: int, write: Callable[[BinaryIO], None]) -> int:
    """Write a part as `write_atomically` does, as the first of part `number`, `number + 1`, ... that does
    not exist yet; never over another part (another run's, if its lock was taken from it). Returns its number."""
    temporary = temporary_path(directory / _part_name(number))
    with output_errors(directory):
        try:
            write_durably(temporary, write)
            while not link_new(temporary, directory / _part_name(number)):
                number += 1
        finally:
            temporary.unlink(missing_ok=True)
        fsync_directory(directory)
    return number


def _left_by_dead_run(temporary: Path, name: str | None) -> bool:
    """Whether a temporary file (of `name`, if given) was left by a process that is gone. One written by
    a process of our pid is: this one has written none yet (the pid was a run's before, in another container)."""
    match = _TEMPORARY_NAME.fullmatch(temporary.name)
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


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read whole as Parquet (its footer, every page of every column), or None."""
    with open(path, "rb") as file:  # an OS error opening it (permission) is no damage: it is raised
        try:
            parquet = pq.ParquetFile(file, page_checksum_verification=True)
            for _ in parquet.iter_batches(batch_size=MERGE_ROW_GROUP_ROWS):
                pass
        except (OSError, ValueError, pa.ArrowException) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _move_aside(path: Path) -> Path:
    """Rename a damaged file to `NAME.corrupt-<UTC time>` beside it, never over another, and return that."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in itertools.count():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{attempt}" if attempt else ""))
        if link_new(path, aside):
            break
    path.unlink(missing_ok=True)  # gone already where the file system has no hard links (renamed)
    fsync_directory(path.parent)
    return aside


def _warn(message: str) -> None:
    warnings.warn(message, VlmbatchWarning, stacklevel=2)


def _part_name(number: int) -> str:
    return f"{_PART_PREFIX}{number:06d}{_PART_SUFFIX}"


def _part_number(path: Path) -> int | None:
    """The number of a part file's name; None for a name that is no part's."""
    match = _PART_NAME.fullmatch(path.name)
    return int(match[1]) if match else None


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


def _readable_as(old: pa.Schema, new: pa.Schema) -> bool:
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
