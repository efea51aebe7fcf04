"""Files that appear whole or not at all: written under a temporary name of their writer's own, fsynced,
then renamed (or hard-linked, where a rename must not replace) into place, and the folder fsynced.
The output's parts and merges and the evaluation's reports all go through here."""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from vlmbatch.errors import VlmbatchError


def write_atomically(path: Path, write: Callable[[BinaryIO], None],
                     before_replace: Callable[[], None] | None = None) -> None:
    """Write `path` so that it either appears complete and durable or not at all; `before_replace` may
    still refuse once the new content is written."""
    temporary = temporary_path(path)
    with output_errors(path):
        try:
            write_durably(temporary, write)
            if before_replace is not None:
                before_replace()
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)  # gone once replaced; a failed write's is no use to anyone
        fsync_directory(path.parent)


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a new file at `path`, then fsync it."""
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def link_new(source: Path, target: Path) -> bool:
    """Give `source` the name `target` unless that exists (False). A hard link, where the file system
    has them, as no rename can refuse to replace."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if target.exists():  # no hard links here: check, then rename (a race only a second writer can lose)
            return False
        os.replace(source, target)
    return True


def write_new(directory: Path, name_for: Callable[[int], str], number: int, write: Callable[[BinaryIO], None]) -> int:
    """Write a file of `directory` as `write_atomically` does, under the first of `name_for(number)`,
    `name_for(number + 1)`, ... that does not exist yet: never over another file (another run's, if its
    lock was taken from it). Returns the number it got."""
    temporary = temporary_path(directory / name_for(number))
    with output_errors(directory):
        try:
            write_durably(temporary, write)
            while not link_new(temporary, directory / name_for(number)):
                number += 1
        finally:
            temporary.unlink(missing_ok=True)
        fsync_directory(directory)
    return number


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Report OS failures (no space, no permission, not a folder) as the user's problem, in one line."""
    try:
        yield
    except OSError as exc:
        raise VlmbatchError(f"cannot write output {path}: {exc.strerror or exc}") from exc


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path`, its writer's own: another writer of the same file never shares it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_directory(directory: Path) -> None:
    """Persist a rename: without this a power cut can undo an `os.replace` that already returned."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
