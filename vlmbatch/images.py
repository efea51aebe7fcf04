"""Decode any image Pillow can read into an RGB `PIL.Image`, the way the reference processor sees it.

Conversion to RGB follows transformers' `convert_to_rgb` (transparency composited onto white) so that
pixel values match `PaliGemmaProcessor`; on top of that, EXIF orientation is applied, animated images
give their first frame, and 16-bit greyscale is scaled to 8 bits instead of being clipped.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from vlmbatch.errors import ImageDecodeError
from vlmbatch.records import ImageRef

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


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
    truncated files, other file types, images over Pillow's decompression-bomb limit, URLs (which are
    not fetched).
    """
    if isinstance(ref, (bytes, bytearray)) and not ref:
        raise ImageDecodeError("no image data (an empty or missing value)")
    if isinstance(ref, str) and "://" in ref:
        raise ImageDecodeError(f"{ref.split('://')[0]} URLs are not fetched: download the images first "
                               "(e.g. with img2dataset) and list their paths")
    try:
        if isinstance(ref, Image.Image):
            image = ref
        else:
            source = io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else os.fspath(ref)
            with warnings.catch_warnings():
                # A DecompressionBombWarning (between 1x and 2x the limit) is treated as the error it warns of.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(source)
                image.seek(0)  # first frame of animated GIF/WEBP/TIFF
                image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
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


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image → uint8 [size, size, 3], bicubic like the reference processor."""
    return np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC), dtype=np.uint8)


def load_resized(ref: ImageRef, size: int) -> np.ndarray:
    """Decode, orient, convert and resize; what the background workers do for each image."""
    return resize_square(load_image(ref), size)
