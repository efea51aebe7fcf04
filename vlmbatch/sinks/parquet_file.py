"""Resumable, crash-safe Parquet output.

Scheduled jobs re-run the same command until the collection is done, so the output must survive a crash,
SIGKILL, Ctrl-C or SIGTERM at any instant without losing or duplicating a row that was flushed, and must
refuse to mix the rows of runs with other settings. `ParquetSink` says how.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from vlmbatch.errors import VlmbatchError
from vlmbatch.sinks.atomic import output_errors, write_atomically, write_new
from vlmbatch.sinks.resumable import (  # noqa: F401  (SETTINGS_KEY, WRITTEN_AT_KEY: named here too, as before)
    MERGE_ROW_GROUP_ROWS,
    OVERWRITE_HINT,
    SETTINGS_KEY,
    WRITTEN_AT_KEY,
    LockFile,
    ResumableSink,
    RowGroupWriter,
    left_by_dead_run,
    move_aside,
    refuse_other_formats,
    warn,
)
from vlmbatch.spec import DEFAULT_FLUSH_ROWS

_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"
_PART_NAME = re.compile(r"part-(\d+)\.parquet")


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


class ParquetSink(ResumableSink):
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
        super().__init__(schema, key=key, failure_column=failure_column, version_column=version_column,
                         settings=settings, metadata=metadata, flush_rows=flush_rows, flush_seconds=flush_seconds)
        self.path, self.parts_dir, lock_path = output_files(path)
        self._lock = LockFile(lock_path, self.path)
        self._open(overwrite, recover)
        self._next_part = max((_part_number(p) for p in self._part_paths()), default=-1) + 1

    # --- public API (done_keys, failed_keys, write and the context manager are ResumableSink's) ---------

    def flush(self) -> None:
        """Make buffered rows durable as a new part file. Once this returns, no crash can lose them."""
        if self._buffer:
            table = pa.Table.from_pylist(self._buffer, schema=self._file_schema())
            write = lambda file: pq.write_table(table, file, write_page_checksum=True)  # noqa: E731
            written = write_new(self.parts_dir, _part_name, self._next_part, write)
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

    # --- opening ---------------------------------------------------------------------------------------

    def _open(self, overwrite: bool, recover: bool) -> None:
        """Probe that OUT is writable, lock it, then clear or validate what a previous run left."""
        if self.path.is_dir():
            example = self.path / "results.parquet"
            raise VlmbatchError(f"output {self.path} is a directory; give a file path such as {example}")
        refuse_other_formats(self.path, self.path.with_suffix(".parquet"))
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
            if left_by_dead_run(temporary, self.path.name if temporary.parent != self.parts_dir else None):
                temporary.unlink(missing_ok=True)

    def _set_aside_unreadable(self, recover: bool) -> None:
        """Read OUT and each part whole, now rather than at the final merge: an unreadable part is moved
        aside, its rows to be made again; an unreadable OUT too with `recover`, else it is refused."""
        if self.path.exists():
            reason = self._unreadable(self.path)
            if reason is not None and not recover:
                raise VlmbatchError(
                    f"{self.path} is not a readable Parquet file ({reason}); rerun with --recover (--set recover=true) "
                    f"to move it aside and go on, keeping the rows saved in {self.parts_dir} and making the rest "
                    f"again, or {OVERWRITE_HINT}")
            if reason is not None:
                aside = move_aside(self.path)
                warn(f"{self.path} could not be read ({reason}): moved it to {aside}; rows saved in "
                     f"{self.parts_dir} are kept, the rest are made again")
        for part in self._part_paths():
            reason = self._unreadable(part)
            if reason is not None:
                warn(f"part file {part} could not be read ({reason}): moved it to {move_aside(part)}; "
                     "its rows are made again")

    def _warn_of_misnamed_parts(self) -> None:
        for path in sorted(self.parts_dir.glob(f"{_PART_PREFIX}*{_PART_SUFFIX}")):
            if _part_number(path) is None:
                warn(f"{path} is not a part file (those are named part-NNNNNN.parquet): left alone, not read")

    # --- files -----------------------------------------------------------------------------------------

    def _part_paths(self) -> list[Path]:
        return _part_paths(self.parts_dir)

    def _existing_files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._part_paths()

    def _merge(self, parts: list[Path]) -> None:
        """Stream OUT and the parts into a new OUT, each key's latest row (see the module docstring)."""
        latest: dict[tuple, tuple[int, int]] = {}  # key -> (part, row in it) of its latest row in the parts
        for part_index, part in enumerate(parts):
            for row_index, key in enumerate(self._iter_keys(part)):
                latest[key] = (part_index, row_index)

        def write_merged(file: BinaryIO) -> None:
            with pq.ParquetWriter(file, self._file_schema(), write_page_checksum=True) as writer:
                row_groups = RowGroupWriter(writer)
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

    def _remove_parts(self, parts: list[Path]) -> None:
        """Delete merged parts; safe to interrupt, since OUT already holds their rows."""
        for part in parts:
            part.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass  # something else was put there; leave it to the user


# --- helpers ---------------------------------------------------------------------------------------------


def stored_schema(out: str | os.PathLike) -> pa.Schema | None:
    """The schema, with vlmbatch's metadata, of the single-file output `out` (or of its newest part, when
    a run stopped before its first merge); None when there is neither."""
    path, parts_dir, _ = output_files(out)
    files = ([path] if path.is_file() else []) or _part_paths(parts_dir)[-1:]
    return pq.read_schema(files[0]) if files else None


def _part_paths(parts_dir: Path) -> list[Path]:
    """Finished part files in write order (temporary files start with '.' and never match; nor does a
    name without a part number, nor a part moved aside)."""
    if not parts_dir.is_dir():
        return []
    named = parts_dir.glob(f"{_PART_PREFIX}*{_PART_SUFFIX}")
    return sorted((path for path in named if _part_number(path) is not None), key=_part_number)


def _part_name(number: int) -> str:
    return f"{_PART_PREFIX}{number:06d}{_PART_SUFFIX}"


def _part_number(path: Path) -> int | None:
    """The number of a part file's name; None for a name that is no part's."""
    match = _PART_NAME.fullmatch(path.name)
    return int(match[1]) if match else None
