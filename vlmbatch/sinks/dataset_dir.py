"""Resumable, crash-safe output as a Parquet dataset folder: one file per flush, read as one table.

A run adds files and rewrites only the few that its rows make stale, never one big file, so the output
of a large collection costs each run what that run writes. `ParquetDatasetSink` says how.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlmbatch.errors import VlmbatchError
from vlmbatch.sinks.atomic import fsync_directory, output_errors, write_atomically, write_new
from vlmbatch.sinks.resumable import (
    LockFile,
    ResumableSink,
    RowGroupWriter,
    corrupt_name,
    left_by_dead_run,
    move_aside,
    warn,
)
from vlmbatch.spec import DEFAULT_FLUSH_ROWS

LOCK_NAME = ".vlmbatch.lock"  # hidden: Parquet readers skip names starting with '.' or '_'
_STAMP = "%Y%m%dT%H%M%S%fZ"
# part-<UTC time the run began, to the microsecond>-<pid>-<random token of the run>-<sequence number>.parquet
_FILE_NAME = re.compile(r"part-(?P<stamp>\d{8}T\d{12}Z)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})-(?P<seq>\d{6,})\.parquet")

Write = Callable[[BinaryIO], None]


class ParquetDatasetSink(ResumableSink):
    """Append rows to the Parquet dataset folder `path` (a local folder or an object-store URI), resumably.

    The interface and the guarantees are `ParquetSink`'s; how, for a folder OUT:

    * Each flush writes one file `OUT/part-<UTC time>-<pid>-<token>-<seq>.parquet`: the time the run
      began (after the newest file's, should the clock have gone back), the writer's pid and a random
      token (names never collide across runs, processes or hosts) and a number counting the run's
      flushes. Files sort in write order by (time, number). Locally a file is written under a hidden
      temporary name, fsynced and hard-linked into place (never over another), then the folder fsynced.
    * Every file has this run's schema and the key-value metadata of the single file (`vlmbatch.settings`
      and the caller's metadata, `vlmbatch.written_at`), page checksums included, so
      `pyarrow.dataset.dataset(OUT)`, DuckDB's `read_parquet('OUT/*.parquet')`, polars and
      `ray.data.read_parquet` read OUT as one table. What else is written starts with '.' (the lock
      `.vlmbatch.lock`, temporaries, damaged files set aside), which those readers skip; anything else in
      OUT would be read as part of the table, so a folder holding other files is refused.
    * A key's row is its latest: in the newest file holding the key (a file never holds a key twice).
      A key written again (a failed row retried, an image replaced) makes the older file's row stale:
      `close` rewrites each file holding stale rows without them (temporary + rename, keeping its name
      and so its place in the order; a file left empty is deleted), and so does opening, which repairs
      a run that died between the two. Only such files are rewritten, and files written before a
      nullable column was added (once, on opening: every file keeps the same schema).
    * The lock (`OUT/.vlmbatch.lock`), the temporaries of dead runs, the settings and schema checks and
      the reading of every file whole on opening are `ParquetSink`'s; a damaged file is moved aside
      (`.NAME.corrupt-<time>`) with a `VlmbatchWarning`, its rows made again, so `recover` changes
      nothing here. An empty run leaves one file without rows, carrying the schema and the settings.
    * On an object store (`s3://bucket/prefix/`, `gs://...`, or any `filesystem` that is not pyarrow's
      local one) there is no rename and no flock: each file is written whole in memory, then stored under
      its final name in one upload (which appears whole or not at all), and nothing is locked. Two runs
      must not write one folder there at once unless their keys differ.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        schema: pa.Schema,
        *,
        key: tuple[str, ...],
        failure_column: str | None = None,
        version_column: str | None = None,
        settings: dict,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        recover: bool = False,  # noqa: ARG002  (damaged files are always set aside; see the docstring)
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        flush_seconds: float = 30.0,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        super().__init__(schema, key=key, failure_column=failure_column, version_column=version_column,
                         settings=settings, metadata=metadata, flush_rows=flush_rows, flush_seconds=flush_seconds)
        self._folder = _folder_for(path, filesystem)
        self.path = self._folder.shown
        self._filesystem = self._folder.filesystem
        self._files: list[str] = []  # the folder's files, in write order
        self._rows: dict[str, int] = {}  # file -> its rows
        self._latest: dict[tuple, tuple[str, int]] = {}  # key -> (file, row in it) of its latest row
        self._upgrade: set[str] = set()  # files of an older schema, to be rewritten
        self._lock = LockFile(self._folder.local / LOCK_NAME, self.path) if self._folder.local else None
        self._open(overwrite)
        stamp = max([datetime.now(timezone.utc)] + [_time_of(name) + timedelta(microseconds=1) for name in self._files])
        self._run = f"{stamp.strftime(_STAMP)}-{os.getpid()}-{secrets.token_hex(4)}"
        self._next = 0

    # --- public API (done_keys, failed_keys, write and the context manager are ResumableSink's) ---------

    def flush(self) -> None:
        """Make buffered rows durable as a new file of the folder. Once this returns, no crash can lose them."""
        if self._buffer:
            latest = {self._row_key(row): i for i, row in enumerate(self._buffer)}  # a key's last row wins
            rows = [row for i, row in enumerate(self._buffer) if latest[self._row_key(row)] == i]
            self._add_file(pa.Table.from_pylist(rows, schema=self._file_schema()))
            self._buffer.clear()
            self._check_lock()  # after the file: its rows are saved whatever this finds
        self._last_flush = _monotonic()

    def close(self) -> None:
        """Flush, rewrite the files holding stale rows, release the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            if not self._files:  # an empty run: one file without rows says what the folder holds
                self._add_file(self._file_schema().empty_table())
            self._compact()
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()

    # --- opening ---------------------------------------------------------------------------------------

    def _open(self, overwrite: bool) -> None:
        """Make the folder, lock it, then clear, check and repair what previous runs left."""
        self._folder.make()
        if self._lock is not None:
            with output_errors(self._folder.local):
                self._lock.acquire()
        try:
            with output_errors(self._folder.local or Path(str(self.path))):
                files = self._our_files()
                if overwrite:
                    for name in files:
                        self._folder.delete(name)
                    files = []
                self._folder.clear_temporaries()
                files = [name for name in files if self._readable(name)]
            for name in files:
                self._check_compatible(self._file(name))
                self._add_known(name)
            self._compact()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _our_files(self) -> list[str]:
        """The folder's data files in write order; refuses a folder holding anything else readers would read."""
        names = self._folder.names()
        ours = [name for name in names if _FILE_NAME.fullmatch(name)]
        foreign = sorted(name for name in names if name not in ours and not name.startswith((".", "_")))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise VlmbatchError(f"output folder {self.path} holds files vlmbatch did not write ({shown}), which "
                                "Parquet readers would read as part of the output: give a new or empty folder")
        return sorted(ours, key=_order)

    def _readable(self, name: str) -> bool:
        """Read a file whole; one that cannot be is moved aside with a warning, its rows to be made again."""
        reason = self._unreadable(self._file(name))
        if reason is not None:
            aside = self._folder.move_aside(name)
            warn(f"output file {self._file(name)} could not be read ({reason}): moved it to {aside}; "
                 "its rows are made again")
        return reason is None

    def _add_known(self, name: str) -> None:
        """Take in a file of a previous run: its rows' keys, and whether its schema is an older one."""
        if not pq.read_schema(str(self._file(name)), filesystem=self._filesystem).remove_metadata().equals(
                self._schema):
            self._upgrade.add(name)  # `_check_compatible` let it in: it lacks nullable columns added since
        self._note(name, self._iter_keys(self._file(name)))

    # --- files -----------------------------------------------------------------------------------------

    def _existing_files(self) -> list[Any]:
        return [self._file(name) for name in self._files]

    def _file(self, name: str) -> Any:
        return self._folder.file(name)

    def _add_file(self, table: pa.Table) -> None:
        """Store `table` as the run's next file."""
        def write(file: BinaryIO) -> None:
            pq.write_table(table, file, write_page_checksum=True)

        number = self._folder.write_new(lambda seq: f"part-{self._run}-{seq:06d}.parquet", self._next, write)
        self._next = number + 1
        name = f"part-{self._run}-{number:06d}.parquet"
        self._note(name, self._batch_keys(table))

    def _note(self, name: str, keys) -> None:
        """Record file `name` (the newest) and the keys of its rows, which its rows make the latest."""
        rows = 0
        for rows, key in enumerate(keys, start=1):
            self._latest[key] = (name, rows - 1)
        self._files.append(name)
        self._rows[name] = rows

    def _compact(self) -> None:
        """Rewrite each file holding stale rows (or an older schema) without them; delete files left empty.
        Safe to interrupt anywhere: a file is replaced whole, and only after the newer rows are durable."""
        live = Counter(name for name, _ in self._latest.values())
        if not live and self._files:
            live[self._files[-1]] = 0  # no rows at all: the newest file stays, to say what the folder is
        for name in list(self._files):
            if name not in live:
                self._check_lock()
                self._folder.delete(name)
                self._files.remove(name)
            elif live[name] < self._rows[name] or name in self._upgrade:
                self._rewrite(name)
        self._upgrade.clear()

    def _rewrite(self, name: str) -> None:
        """Replace a file by its rows that are their key's latest, in the current schema."""
        def write(file: BinaryIO) -> None:
            with pq.ParquetWriter(file, self._file_schema(), write_page_checksum=True) as writer:
                row_groups = RowGroupWriter(writer)
                first = 0
                for batch in self._batches(self._file(name)):
                    keys = self._batch_keys(batch)
                    row_groups.add(batch.filter([self._latest[key] == (name, first + i) for i, key in enumerate(keys)]))
                    first += len(keys)
                row_groups.flush()

        self._folder.replace(name, write, before=self._check_lock)
        kept = 0
        for key, (holder, row) in list(self._latest.items()):  # the rows kept are renumbered in order
            if holder == name:
                self._latest[key] = (name, row)
                kept += 1
        self._renumber(name)
        self._rows[name] = kept

    def _renumber(self, name: str) -> None:
        """After a rewrite of `name`: its kept rows, in their old order, are rows 0, 1, ... of it."""
        held = sorted((row, key) for key, (holder, row) in self._latest.items() if holder == name)
        for new, (_, key) in enumerate(held):
            self._latest[key] = (name, new)

    def _check_lock(self) -> None:
        """Stop once the lock file is gone or another file took its name: another run may be writing OUT."""
        if self._lock is not None and not self._lock.held():
            raise VlmbatchError(
                f"the lock {self._lock.path} was deleted or replaced while this run held it, so another run may "
                f"be writing {self.path}: stopped; the files written so far are kept for the next run")


# --- where the files are: a local folder or an object store ----------------------------------------------


class _Folder:
    """The folder's files, locally (`local` set: temporary names, renames, fsync, a lock) or in `filesystem`."""

    def __init__(self, shown: Any, local: Path | None, filesystem: pafs.FileSystem | None, base: str = "") -> None:
        self.shown, self.local, self.filesystem, self._base = shown, local, filesystem, base

    def file(self, name: str) -> Any:
        return self.local / name if self.local else f"{self._base}/{name}"

    def make(self) -> None:
        if self.local:
            if self.local.exists() and not self.local.is_dir():
                raise VlmbatchError(f"output {self.local} is a file, not a folder: name a folder, or give the "
                                    "file a .parquet name to write a single file")
            with output_errors(self.local):
                self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.filesystem.create_dir(self._base, recursive=True)

    def names(self) -> list[str]:
        if self.local:
            return [entry.name for entry in self.local.iterdir()]
        selector = pafs.FileSelector(self._base, allow_not_found=True)
        return [info.base_name for info in self.filesystem.get_file_info(selector)]

    def write_new(self, name_for: Callable[[int], str], number: int, write: Write) -> int:
        """Store a new file under the first free `name_for(number)`, `name_for(number + 1)`, ...; its number."""
        if self.local:
            return write_new(self.local, name_for, number, write)
        while self.filesystem.get_file_info(self.file(name_for(number))).type != pafs.FileType.NotFound:
            number += 1
        self._upload(name_for(number), write)
        return number

    def replace(self, name: str, write: Write, before: Callable[[], None]) -> None:
        if self.local:
            write_atomically(self.local / name, write, before_replace=before)
        else:
            self._upload(name, write)

    def delete(self, name: str) -> None:
        if self.local:
            (self.local / name).unlink(missing_ok=True)
            fsync_directory(self.local)
        else:
            self.filesystem.delete_file(self.file(name))

    def move_aside(self, name: str) -> Any:
        if self.local:
            return move_aside(self.local / name, prefix=".")
        aside = self.file("." + corrupt_name(name))
        self.filesystem.move(self.file(name), aside)
        return aside

    def clear_temporaries(self) -> None:
        """Delete the temporary files dead runs left (locally, under the lock; object stores have none)."""
        if self.local:
            for temporary in self.local.glob(".part-*.tmp"):
                if left_by_dead_run(temporary, None):
                    temporary.unlink(missing_ok=True)

    def _upload(self, name: str, write: Write) -> None:
        """The whole file first, in memory, then one upload: a failure while writing leaves nothing behind."""
        buffer = pa.BufferOutputStream()
        write(buffer)
        with self.filesystem.open_output_stream(self.file(name)) as stream:
            stream.write(buffer.getvalue())


def _folder_for(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> _Folder:
    """A local path, a URI (`file://` is local) or a path in `filesystem` (pyarrow's local one is local)."""
    if filesystem is None and isinstance(path, str) and "://" in path:
        try:
            filesystem, path = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise VlmbatchError(f"cannot open output {path}: {exc}") from None
        shown = path
    else:
        shown = path
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        local = Path(path)
        return _Folder(local if filesystem is None else local, local, None)
    return _Folder(shown, None, filesystem, str(path).rstrip("/"))


def stored_schema(path: str | os.PathLike) -> pa.Schema | None:
    """The schema, with vlmbatch's metadata, of the newest file of the dataset folder `path`; None when
    the folder does not exist or holds none."""
    folder = _folder_for(os.fspath(path), None)
    try:
        names = sorted((name for name in folder.names() if _FILE_NAME.fullmatch(name)), key=_order)
    except FileNotFoundError:
        return None
    return pq.read_schema(str(folder.file(names[-1])), filesystem=folder.filesystem) if names else None


def _order(name: str) -> tuple[str, int, str]:
    match = _FILE_NAME.fullmatch(name)
    return match["stamp"], int(match["seq"]), name


def _time_of(name: str) -> datetime:
    return datetime.strptime(_FILE_NAME.fullmatch(name)["stamp"], _STAMP).replace(tzinfo=timezone.utc)


def _monotonic() -> float:
    import time

    return time.monotonic()
