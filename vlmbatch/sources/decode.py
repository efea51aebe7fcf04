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
    try:
        image = load_image(ref)
        return tuple(resize_square(image, s) for s in size) if isinstance(size, tuple) else resize_square(image, size)
    except ImageDecodeError as exc:
        return str(exc)


def decode_stream(items: Iterable[T], ref: Callable[[T], ImageRef], size: int | tuple[int, ...], workers: int,
                  in_flight_per_worker: int = 8) -> Iterator[tuple[T, Pixels | str]]:
    """Yield (item, pixels-or-error) for each item, decoding `ref(item)` as `decode_one` does."""
    if workers <= 0:
        for item in items:
            yield item, decode_one(ref(item), size)
        return
    # spawn: the parent holds torch's thread pools, which a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    pending: deque[tuple[T, Future]] = deque()
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(decode_one, ref(item), size)))
                if len(pending) >= workers * in_flight_per_worker:
                    head, future = pending.popleft()
                    yield head, future.result()
            while pending:
                head, future = pending.popleft()
                yield head, future.result()
        finally:
            for _, future in pending:
                future.cancel()
