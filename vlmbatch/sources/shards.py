"""WebDataset tar shards (what img2dataset writes): `00000.tar`, `00001.tar`, ... whose members are grouped
into samples by key, `000000001.jpg` + `000000001.txt` + `000000001.json` being sample `000000001`.

The naming rules are WebDataset's (`webdataset.tariterators`): a member's key is its name up to the first
'.' of its basename, folder kept, and the rest is its field (lower-cased); consecutive members with one
key are one sample; `__*__` members and names without a '.' (or starting with one) are not samples.
The tars are read with Python's `tarfile` rather than the `webdataset` package: its reader streams every
member's bytes, so a resumed run would read all of every shard only to skip the samples it has done.
Here a pass reads the headers alone (an uncompressed tar can be seeked) and each record's image is a
`TarMember`, its offset in the shard, which the decoding workers read, each its own. Brace patterns
(`shards/{00000..00099}.tar`) are expanded by `braceexpand`, as WebDataset expands them.

For a cluster runner that makes each shard one unit of work: `webdataset_shards(SOURCE)` lists the
shards, `read_shard(path)` yields one shard's records, `count_shard(path)` counts them, and
`open_webdataset(shards, description)` makes a `Source` of any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tarfile
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sources.images import IMAGE_EXTENSIONS
from vlmbatch.sources.records import ImageRecord, Source, TarMember, Unreadable, readable

SHARD_SUFFIX = ".tar"  # uncompressed only: a compressed tar cannot be seeked to a member
# A sample's image is its first field of these, in this order (the extensions a folder's images have).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# Fields passed through in `ImageRecord.extra` (img2dataset's caption and metadata), when this small.
TEXT_FIELDS = ("txt", "json")
_MAX_TEXT_BYTES = 1 << 20
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_BLOCK = tarfile.BLOCKSIZE


# --- which shards ---------------------------------------------------------------------------------


def webdataset_shards(source: str | os.PathLike) -> list[Path]:
    """The shard files SOURCE names, as `open_source` reads them: a folder's own `*.tar` files (sorted,
    no images beside them), one `.tar` file, or a brace pattern's files (in the pattern's order, those
    that exist). Absolute paths. Raises `VlmbatchError` when SOURCE names no shards."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        shards = folder_shards(path.absolute())
        if not shards:
            raise VlmbatchError(f"no WebDataset shards ({SHARD_SUFFIX} files, no images beside them) in folder {path}")
        return shards
    if path.exists():
        if path.suffix.lower() != SHARD_SUFFIX:
            raise VlmbatchError(f"{path} is not a WebDataset shard (a {SHARD_SUFFIX} file)")
        return [path.absolute()]
    if is_pattern(text):
        return expand_pattern(text)
    raise VlmbatchError(f"source not found: {text}")


def folder_shards(folder: Path, exclude: frozenset[str] = frozenset()) -> list[Path]:
    """The folder's own `.tar` files, sorted, if it holds no images beside them (then it is an image
    folder), else []. Hidden files and `exclude` (real paths) are not looked at; img2dataset's
    `.parquet` and `_stats.json` beside the shards are not inputs."""
    real = os.path.realpath(folder)
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise VlmbatchError(f"cannot read folder {readable(str(folder))}: {exc.strerror}") from None
    files = [p for p in entries if not p.name.startswith(".") and os.path.join(real, p.name) not in exclude
             and p.is_file()]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        return []
    return sorted(p for p in files if p.suffix.lower() == SHARD_SUFFIX)


def is_pattern(source: str) -> bool:
    """Whether SOURCE has a brace expression (`{0..9}`, `{a,b}`) that names several files."""
    if "{" not in source:
        return False
    import braceexpand

    try:
        return list(braceexpand.braceexpand(source)) != [source]
    except braceexpand.UnbalancedBracesError:
        return False


def expand_pattern(pattern: str) -> list[Path]:
    """The existing files a brace pattern names, in its order. Any missing one is left to `read_shard`,
    which warns of it when it comes (a shard still being written, a gap); none existing is an error."""
    import braceexpand

    names = list(dict.fromkeys(braceexpand.braceexpand(pattern)))
    others = [name for name in names if not name.lower().endswith(SHARD_SUFFIX)]
    if others:
        raise VlmbatchError(f"a brace pattern names WebDataset shards ({SHARD_SUFFIX} files); {pattern} also "
                            f"names {readable(others[0])}")
    paths = [Path(name).expanduser().absolute() for name in names]
    if not any(path.exists() for path in paths):
        raise VlmbatchError(f"source not found: no file of the pattern {pattern} exists ({len(paths)} named)")
    return paths


# --- a Source of shards ---------------------------------------------------------------------------


def open_webdataset(shards: list[Path], description: str) -> Source:
    """The shards' records, shard after shard. Ids are sample keys: img2dataset's are unique across
    shards, but hand-made shards may repeat one, so the run remembers ids (`unique_ids` False) and a
    repeat is skipped with a warning. `count` reads the headers only, for the progress bar's total."""
    return Source(description=description, size=None,
                  records=lambda: (record for shard in shards for record in read_shard(shard)),
                  count=lambda: sum(count_shard(shard) for shard in shards))


def read_shard(path: str | os.PathLike) -> Iterator[ImageRecord]:
    """The records of one shard, in member order: id = the sample key; image = a `TarMember` (the
    image's place in the shard, read when it is decoded); `extra` = the shard and image member, and
    the `txt` (text) and `json` (parsed) fields when present. A sample without an image is a record
    whose image is `Unreadable` (an error row saying so). A shard that cannot be read at all, or
    breaks off, is one `VlmbatchWarning` naming it; the samples before the break still count."""
    path = Path(path)
    shown = readable(str(path))
    try:
        with _open_shard(path) as (tar, file, version):
            read = 0
            for key, fields, damage in _samples(tar, file):
                if key is not None:
                    read += 1
                    yield _record(path, version, key, fields, damage, tar)
                if damage:
                    warnings.warn(f"shard {shown} is damaged or truncated ({damage}): the {read} sample(s) "
                                  "before that are read, the rest of the shard is not", VlmbatchWarning, stacklevel=2)
    except _Unreadable as exc:
        warnings.warn(f"cannot read shard {shown} ({exc}): its samples are skipped", VlmbatchWarning, stacklevel=2)


def count_shard(path: str | os.PathLike) -> int:
    """How many records `read_shard` yields for the shard, from its headers; quiet (0 for a shard that
    cannot be read): the run that reads it warns."""
    try:
        with _open_shard(Path(path)) as (tar, file, _):
            return sum(key is not None for key, _, _ in _samples(tar, file))
    except _Unreadable:
        return 0


class _Unreadable(Exception):
    """A shard that cannot be opened as a tar at all; the message says why."""


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[tuple[tarfile.TarFile, BinaryIO, str]]:
    """The shard opened for random access, its file, and its version as it was opened; `_Unreadable` if
    it is no regular file, cannot be opened or is no uncompressed tar."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would keep the run waiting for a writer
            raise _Unreadable("not a regular file")
        file = open(path, "rb")
    except OSError as exc:
        raise _Unreadable(exc.strerror or type(exc).__name__) from None
    with file:
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _Unreadable(f"not an uncompressed tar: {_one_line(exc)}") from None
        # The version is the whole shard's: a tar's members carry no trustworthy identity of their own
        # (TarWriter stamps them with the time of writing, hand-made tars often with 0), so a shard
        # replaced (another size or modification time) has all its samples redone.
        yield tar, file, f"{info.st_size}:{info.st_mtime_ns}"


def _samples(tar: tarfile.TarFile, file: BinaryIO) -> Iterator[tuple[str | None, dict[str, tarfile.TarInfo], str | None]]:
    """(key, fields, damage) for each sample in member order, fields mapping each field to its member
    (the first, if one repeats). `damage` is None but for the last yield of a shard that breaks off: it
    says how, and the sample it comes with (None if the break fell between samples) may lack members
    (those of its members yielded are whole)."""
    end = os.fstat(file.fileno()).st_size
    key: str | None = None
    fields: dict[str, tarfile.TarInfo] = {}
    damage = None
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            damage = _one_line(exc)
            break
        if member is None:
            damage = _trailing_garbage(file, tar.offset, end)
            break
        tar.members = []  # random access keeps every header read; a shard of a million members need not
        split = _key_field(member.name) if member.isreg() else None
        if split is None:
            continue
        member_key, field = split
        if member_key != key:
            if key is not None:
                yield key, fields, None
            key, fields = member_key, {}
        if member.offset_data + member.size > end:
            damage = f"{readable(member.name)} is cut off"
            break
        fields.setdefault(field, member)
    yield key, fields, damage


def _trailing_garbage(file: BinaryIO, offset: int, end: int) -> str | None:
    """Why a tar whose headers ended at `offset` did not end well, or None: `tarfile` ends quietly at a
    header that is cut off or not a header at all, where a whole tar has zero blocks or nothing."""
    file.seek(offset)
    block = file.read(_BLOCK)
    if not block.strip(b"\0"):
        return None
    return f"{'a cut-off' if len(block) < _BLOCK else 'an invalid'} header at byte {offset} of {end}"


def _key_field(name: str) -> tuple[str, str] | None:
    """(key, field) of a member name by WebDataset's rules, a leading './' dropped from the key; None
    for names that are no part of a sample."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = _KEY_FIELD.match(name)
    if match is None:
        return None
    key = match[1]
    while key.startswith("./"):
        key = key[2:]
    return key, match[2].lower()


def _record(path: Path, version: str, key: str, fields: dict[str, tarfile.TarInfo], damage: str | None,
            tar: tarfile.TarFile) -> ImageRecord:
    shard = str(path)
    extra: dict[str, object] = {"shard": readable(shard)}
    for field in TEXT_FIELDS:
        if field in fields:
            extra[field] = _text(tar, fields[field], field)
    image_field = next((field for field in IMAGE_FIELDS if field in fields), None)
    if image_field is None:
        has = ", ".join(sorted(fields)) or "none"
        if damage:
            reason = f"shard {shard} breaks off in this sample ({damage}) before an image member"
        else:
            reason = f"sample has no image member in shard {shard} (fields: {has}; looked for {', '.join(IMAGE_FIELDS)})"
        return ImageRecord(id=key, image=Unreadable(readable(reason)), extra=extra)
    member = fields[image_field]
    extra["member"] = readable(member.name)
    image = TarMember(shard=shard, member=member.name, offset=member.offset_data, size=member.size,
                      shard_version=version)
    return ImageRecord(id=key, image=image, extra=extra, version=f"{version}:{readable(member.name)}")


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo, field: str) -> object:
    """A `txt` field as text, a `json` field parsed; None if too large or not what it says."""
    if member.size > _MAX_TEXT_BYTES:
        return None
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, OSError):
        return None
    text = data.decode("utf-8", "replace")
    if field != "json":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

