"""What the report draws over a detect or segment row's thumbnail: each object's box (as fractions of
the image), label and score, and its mask, decoded from COCO RLE one row at a time, shrunk to the
thumbnail's size and kept as a small grayscale PNG (white inside) in a spool until the page is written."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmbatch.review.spool import Spool
from vlmbatch.review.thumbnails import THUMBNAIL_PX


@dataclass(frozen=True, slots=True)
class DrawnObject:
    label: str
    score: float | None
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max as fractions of the image
    mask: int | None  # the mask's PNG in the report's spool; None: no mask (or an empty one)


def mask_png(rle: dict, longest: int = THUMBNAIL_PX) -> bytes | None:
    """A COCO RLE mask ({size: [h, w], counts}) as a grayscale PNG at most `longest` px on its longer
    side (area-averaged, so thin parts stay visible as grey); None for an empty mask."""
    from pycocotools import mask as coco_mask

    height, width = (int(n) for n in rle["size"])
    counts = rle["counts"]
    full = coco_mask.decode({"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts})
    if not full.any():
        return None
    scale = min(1.0, longest / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(full * np.uint8(255)).resize(size, resample=Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def drawn_objects(objects: list[dict] | None, masks: Spool | None) -> tuple[DrawnObject, ...]:
    """A row's `objects` column as the page draws them; masks go to `masks` (None: not kept)."""
    drawn = []
    for o in objects or ():
        box = o.get("box_normalized")
        if not box or len(box) != 4 or any(v is None for v in box):
            continue  # nothing to place it by (a hand-made output): listed nowhere rather than drawn wrong
        png = mask_png(o["mask"]) if masks is not None and o.get("mask") else None
        score = o.get("score")
        drawn.append(DrawnObject(label=o.get("label") or "", score=score if score is None or np.isfinite(score) else None,
                                 box=tuple(float(v) for v in box), mask=None if png is None else masks.add(png)))
    return tuple(drawn)
