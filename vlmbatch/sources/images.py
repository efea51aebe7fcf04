"""Decode any image Pillow can read into an RGB `PIL.Image`, the way the reference processor sees it.

Conversion to RGB follows transformers' `convert_to_rgb` (transparency composited onto white) so that
pixel values match `PaliGemmaProcessor`; on top of that, EXIF orientation is applied, animated images
give their first frame, and 16-bit greyscale is scaled to 8 bits instead of being clipped.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vlmbatch.errors import ImageDecodeError
from vlmbatch.sources.records import ImageRef, TarMember, Unreadable, Url, file_version, readable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# What a path names when it is not a regular file, as an error row says it.
_NOT_REGULAR = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB, compositing transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow clips 16/32-bit integers to 255 when converting; rescale to the 8-bit range instead.
        image = image.point(lambda v: v / 257 if image.mode.startswith("I;16") else v / 16843009).convert("L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(ref: ImageRef) -> Image.Image:
    """Open `ref` (path, bytes or PIL image), apply EXIF orientation, return an RGB image.

    Raises `ImageDecodeError` with a short reason for anything that is not a readable image: empty or
    truncated files, other file types, paths that are not regular files (FIFOs, sockets, devices, which
    are never opened), images over Pillow's decompression-bomb limit, URLs (which are not fetched).
    """
    try:
        return _load_image(ref)
    except ImageDecodeError as exc:
        # The reason becomes a row, which must be valid UTF-8; a path in it may not be (records.readable).
        raise ImageDecodeError(readable(str(exc))) from None


def _load_image(ref: ImageRef) -> Image.Image:
    if isinstance(ref, Unreadable):
        raise ImageDecodeError(ref.reason)
    if isinstance(ref, TarMember):
        ref = _member_bytes(ref)
    if isinstance(ref, Url):
        raise ImageDecodeError(f"image URL not fetched (fetching is off): {ref.url}; pass --fetch-images")
    if isinstance(ref, (bytes, bytearray)) and not ref:
        raise ImageDecodeError("no image data (an empty or missing value)")
    if isinstance(ref, str) and "://" in ref:
        raise ImageDecodeError(f"{ref.split('://')[0]} URLs are not fetched: download the images first "
                               "(e.g. with img2dataset) and list their paths")
    try:
        if isinstance(ref, Image.Image):
            return _oriented_rgb(ref)
        if isinstance(ref, (bytes, bytearray)):
            return _oriented_rgb(_first_frame(io.BytesIO(ref)))
        with _open_regular_file(ref) as file:  # open until converted: Pillow may read on after load()
            return _oriented_rgb(_first_frame(file))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large (decompression-bomb limit): {exc}") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {os.fspath(ref)}") from None
    except Image.UnidentifiedImageError:
        if not isinstance(ref, (bytes, bytearray)) and os.path.getsize(ref) == 0:
            raise ImageDecodeError("empty file") from None
        raise ImageDecodeError("not an image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None


def _member_bytes(ref: TarMember) -> bytes:
    """The bytes of a tar member, if its shard is still the one it was listed from and holds them."""
    shard = ref.shard
    if ref.shard_version is not None and file_version(shard) not in (ref.shard_version, None):
        raise ImageDecodeError(f"shard {shard} changed since it was listed (the next run reads it again)")
    try:
        with _open_regular_file(shard) as file:
            file.seek(ref.offset)
            data = file.read(ref.size)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read shard {shard}: {exc.strerror or exc}") from None
    if len(data) < ref.size:
        raise ImageDecodeError(f"member {ref.member} is cut off: shard {shard} ends inside it")
    if not data:
        raise ImageDecodeError(f"member {ref.member} of shard {shard} is empty")
    return data


def _first_frame(file: BinaryIO) -> Image.Image:
    with warnings.catch_warnings():
        # A DecompressionBombWarning (between 1x and 2x the limit) is treated as the error it warns of.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(file)
        image.seek(0)  # first frame of animated GIF/WEBP/TIFF
        image.load()
    return image


def _oriented_rgb(image: Image.Image) -> Image.Image:
    return to_rgb(ImageOps.exif_transpose(image) or image)


@contextlib.contextmanager
def _open_regular_file(path: str | os.PathLike):
    """`path` opened for reading if it is a regular file (symlinks followed); else `ImageDecodeError`
    saying what it is. Opening a FIFO waits for a writer, forever in a nightly run that holds its
    output's lock; a device can be read without end, and merely opening some has effects."""
    _refuse_irregular(os.stat(path).st_mode)
    # Non-blocking, so that a FIFO swapped in since the stat is refused below instead of waited on.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _refuse_irregular(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        yield file


def _refuse_irregular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(f"not a regular file: {_NOT_REGULAR.get(stat.S_IFMT(mode), 'not a file')}")


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image → uint8 [size, size, 3], bicubic like the reference processor."""
    return np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC), dtype=np.uint8)


def load_resized(ref: ImageRef, size: int) -> np.ndarray:
    """Decode, orient, convert and resize; what the background workers do for each image."""
    return resize_square(load_image(ref), size)
