"""The unit of work that flows from a Source to the Sink."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from PIL import Image

# Where an image comes from. Decoding is deferred to the processor workers so sources stay cheap.
ImageRef = Union[str, os.PathLike, bytes, Image.Image]


@dataclass(frozen=True)
class ImageRecord:
    """One image to process.

    `id` is stable across runs (it is what resume keys on): for folders the path relative to the
    source root with `/` separators, for datasets the id column's value or the row index.
    `extra` carries passthrough columns (e.g. a dataset's own metadata).
    """

    id: str
    image: ImageRef
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    """One VQA question about the image whose record id (or path relative to the source) is `image`."""

    image: str
    question: str
    question_id: str
