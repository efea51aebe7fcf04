"""The Ray tasks that decode images for the engine actors: a module of its own, light to import.

Ray ships a task's function by reference, so each worker process that runs one imports the function's
module: this one imports Pillow and numpy, not torch and the model (a second or two of a node's CPU
per worker process, taken from the engine it feeds).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

from vlmbatch.sources.decode import decode_one, decode_with_size


def decode_shard(row: dict, size: int, sized: bool = False) -> Iterator[dict]:
    """Each image of a shard (in the object store) decoded to uint8 [size, size, 3], with its prompts
    (`sized`: with its own (width, height) too, as detect and segment need it); an image that cannot be
    decoded carries the reason instead, so it becomes error rows, not a failed task."""
    import ray

    decode = decode_with_size if sized else decode_one
    for ref, prompts in pickle.loads(ray.get(row["shard"])):
        yield {"item": pickle.dumps((decode(ref, size), prompts))}
