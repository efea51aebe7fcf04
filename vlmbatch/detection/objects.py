"""The `objects` of a detect or segment row, made from its answer: boxes, scores, codes and masks.

A box is given in pixels of the original image and as fractions of it. An object's score is the mean
log-probability of the tokens it was read from (its `<loc>`, `<seg>` and label tokens). A mask is the
VAE's 64x64 output resized into the box (bilinear) and taken where it is > 0, as big_vision's evaluator
does, then COCO RLE-encoded (pycocotools) at the original image's size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from vlmbatch.detection.parse import ParsedObject, parse_objects
from vlmbatch.detection.vae import MaskDecoder


class ObjectColumns:
    """Fills in a row's objects from its answer; `decode` is the processor's (token ids → text)."""

    def __init__(self, task: str, decode: Callable[[list[int]], str], masks: MaskDecoder | None = None):
        self.task, self.decode, self.masks = task, decode, masks

    def __call__(self, text: str, tokens: Sequence[int], logprobs: Sequence[float] | None,
                 width: int, height: int) -> dict:
        parsed, errors = parse_objects(text)
        scores = self._scores(parsed, tokens, logprobs)
        objects = [{"label": o.label, "score": score, "box": list(o.box(width, height)),
                    "box_normalized": list(o.box_normalized)} for o, score in zip(parsed, scores)]
        if self.task == "segment":
            masks = self._masks(parsed, width, height)
            for made, o, mask in zip(objects, parsed, masks):
                made.update(seg_codes=list(o.seg_codes) if o.seg_codes else None, mask=mask)
        return {"objects": objects, "parse_errors": errors}

    def _scores(self, parsed: list[ParsedObject], tokens: Sequence[int],
                logprobs: Sequence[float] | None) -> list[float | None]:
        """Each object's mean token log-probability, its tokens being those whose text overlaps the
        object's span; None throughout where the completion carries no log-probabilities."""
        if logprobs is None or len(logprobs) != len(tokens):
            return [None] * len(parsed)
        ends = token_ends(self.decode, tokens)
        starts = [0, *ends[:-1]]
        scores = []
        for o in parsed:
            a, b = o.span
            inside = [lp for lp, s, e in zip(logprobs, starts, ends) if s < b and e > a]
            scores.append(float(np.mean(inside)) if inside else None)
        return scores

    def _masks(self, parsed: list[ParsedObject], width: int, height: int) -> list[dict | None]:
        with_codes = [o for o in parsed if o.seg_codes]
        if self.masks is None or not with_codes:
            return [None] * len(parsed)
        decoded = iter(self.masks(torch.tensor([o.seg_codes for o in with_codes])).numpy())
        return [paste_mask(next(decoded), o, width, height) if o.seg_codes else None for o in parsed]


def token_ends(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[int]:
    """Where each token's text ends in the decoded answer: tokens are pieces of words, so the answer is
    decoded prefix by prefix (a few dozen tokens: cheap beside generating them)."""
    return [len(decode(list(tokens[: k + 1]))) for k in range(len(tokens))]


def paste_mask(mask64: np.ndarray, o: ParsedObject, width: int, height: int) -> dict:
    """The VAE's 64x64 output resized into the object's box of a `width` x `height` image, as COCO RLE.
    Pixel bounds are truncated as big_vision's evaluator truncates them; a box thinner than a pixel
    leaves an empty mask."""
    x_min, y_min, x_max, y_max = (int(v) for v in o.box(width, height))
    full = np.zeros((height, width), dtype=np.uint8)
    if x_max > x_min and y_max > y_min:
        resized = Image.fromarray(mask64.astype(np.float32)).resize(  # float32: mode F
            (x_max - x_min, y_max - y_min), resample=Image.Resampling.BILINEAR)
        full[y_min:y_max, x_min:x_max] = np.asarray(resized) > 0.0
    rle = coco_mask.encode(np.asfortranarray(full))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}
