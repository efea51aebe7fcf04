"""PaliGemma's detection and segmentation answers, parsed into objects (pure text, no model).

An answer lists objects separated by ';'. Each is 4 `<locNNNN>` tokens (y_min, x_min, y_max, x_max as
bins 0..1023), then optionally 16 `<segNNN>` tokens (the mask's VQ-VAE codes), then its label. Bin b
is the fraction b / 1023 of the image side: big_vision's encoder writes round(fraction * 1023)
(pp/proj/paligemma/segmentation.py) and its evaluator divides by 1023. The model's square input is
the whole image squeezed, so the same fractions hold in the original image. Anything else (too few
tokens, a partial mask, an empty box) is dropped and counted, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOC_DIVISOR = 1023  # the largest bin: bins 0..1023 cover fractions 0..1
SEG_CODES = 16  # a mask's codes: a 4x4 grid of the VQ-VAE's 128-entry codebook
CODEBOOK_SIZE = 128
_OBJECT = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)(.*)", re.DOTALL)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class ParsedObject:
    label: str
    bins: tuple[int, int, int, int]  # as written: y_min, x_min, y_max, x_max
    seg_codes: tuple[int, ...] | None  # 16 codes, or None where the object has no mask tokens
    span: tuple[int, int]  # [start, end) characters of the answer text this object was read from

    @property
    def box_normalized(self) -> tuple[float, float, float, float]:
        """x_min, y_min, x_max, y_max as fractions (0..1) of the image's width and height."""
        y_min, x_min, y_max, x_max = (b / LOC_DIVISOR for b in self.bins)
        return x_min, y_min, x_max, y_max

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """x_min, y_min, x_max, y_max in pixels of an image `width` x `height` (the original one)."""
        x_min, y_min, x_max, y_max = self.box_normalized
        return x_min * width, y_min * height, x_max * width, y_max * height


def parse_objects(text: str) -> tuple[list[ParsedObject], int]:
    """The well-formed objects of an answer, and how many malformed ones were dropped. Blank pieces
    (an empty answer, a trailing ';') are neither."""
    objects, errors = [], 0
    for piece in re.finditer(r"[^;]+", text):
        body = piece.group()
        start = piece.start() + len(body) - len(body.lstrip())
        body = body.strip()
        if not body:
            continue
        parsed = _parse_one(body, (start, start + len(body)))
        if parsed is None:
            errors += 1
        else:
            objects.append(parsed)
    return objects, errors


def _parse_one(body: str, span: tuple[int, int]) -> ParsedObject | None:
    match = _OBJECT.fullmatch(body)
    if match is None:
        return None
    locs, segs, label = match.groups()
    bins = tuple(int(n) for n in _NUMBER.findall(locs))
    codes = tuple(int(n) for n in _NUMBER.findall(segs))
    if "<loc" in label or "<seg" in label or len(codes) not in (0, SEG_CODES):
        return None  # five boxes' worth of tokens, or a mask cut short
    if max(bins) > LOC_DIVISOR or any(code >= CODEBOOK_SIZE for code in codes):
        return None
    y_min, x_min, y_max, x_max = bins
    if y_max <= y_min or x_max <= x_min:
        return None
    return ParsedObject(label.strip(), bins, codes or None, span)


def loc_tokens(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """The `<loc>` tokens PaliGemma writes for a pixel box (x_min, y_min, x_max, y_max) of a `width` x
    `height` image, rounded as big_vision's encoder rounds: the inverse of `ParsedObject.box`."""
    x_min, y_min, x_max, y_max = box
    fractions = (y_min / height, x_min / width, y_max / height, x_max / width)
    return "".join(f"<loc{min(max(round(f * LOC_DIVISOR), 0), LOC_DIVISOR):04d}>" for f in fractions)
