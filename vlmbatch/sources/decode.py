"""Image decoding in background processes, overlapped with the model.

Items are decoded by a process pool with a bounded number in flight, so memory stays flat however
large the source; results come back in input order. A decode failure is a result (the reason as a
string), not an exception: one broken image becomes one error row.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar, Union

import numpy as np

from vlmbatch.errors import ImageDecodeError
from vlmbatch.sources.images import load_image, resize_square
from vlmbatch.sources.records import ImageRef

T = TypeVar("T")


Pixels = Union[np.ndarray, tuple[np.ndarray, ...]]


def decode_one(ref: ImageRef, size: int | tuple[int, ...]) -> Pixels | str:
    """uint8 [size, size, 3], or one such array per size of a tuple (one decode for two models)."""
    decoded = decode_with_size(ref, size)
    return decoded if isinstance(decoded, str) else decoded[0]


def decode_with_size(ref: ImageRef, size: int | tuple[int, ...]) -> tuple[Pixels, tuple[int, int]] | str:
    """As `decode_one`, with the image's own (width, height) after EXIF orientation (detection's boxes
    are given in its pixels)."""
    try:
        image = load_image(ref)
        pixels = tuple(resize_square(image, s) for s in size) if isinstance(size, tuple) else resize_square(image, size)
        return pixels, image.size
    except ImageDecodeError as exc:
        return str(exc)


def decode_stream(items: Iterable[T], ref: Callable[[T], ImageRef], size: int | tuple[int, ...], workers: int,
                  in_flight_per_worker: int = 8, decode: Callable = decode_one) -> Iterator[tuple[T, object]]:
    """Yield (item, pixels-or-error) for each item, decoding `ref(item)` with `decode`: `decode_one`, or
    `decode_with_size` (a module-level function, as the worker processes import it)."""
    if workers <= 0:
        for item in items:
            yield item, decode(ref(item), size)
        return
    # spawn: the parent holds torch's thread pools, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    pending: deque[tuple[T, Future]] = deque()
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(decode, ref(item), size)))
                if len(pending) >= workers * in_flight_per_worker:
                    head, future = pending.popleft()
                    yield head, future.result()
            while pending:
                head, future = pending.popleft()
                yield head, future.result()
        finally:
            for _, future in pending:
                future.cancel()
