"""A job's model on a Ray cluster, through Ray Data: `run_on_ray`.

Ray Data distributes the work, applies backpressure and retries; vlmbatch supplies the rest. The driver
(the `vlmbatch` process) cuts its to-do list (ids, image references and prompt ids, never pixels) into
shards, the rows of a Ray Dataset. Ray tasks decode each shard's images to uint8 at the processor's size
on any node's CPUs (a broken image is a result, the reason as text, never a failed task); a pool of
actors, each holding one `Engine` whose weights load once per actor, turns them into rows; the rows come
back to the driver, which alone writes them. A killed actor is restarted and its batch retried: its rows
had not reached the driver, so none is lost or written twice.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import socket
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmbatch.distributed.decode_tasks import decode_shard
from vlmbatch.engine.devices import WorkerSpec
from vlmbatch.engine.scheduler import Engine, ImageWork
from vlmbatch.errors import VlmbatchError
from vlmbatch.model.loading import load_model, resolve_checkpoint
from vlmbatch.model.processor import Processor
from vlmbatch.sources.records import ImageRef

TOKENS = "_tokens"  # a detect / segment row's (tokens, log-probs), for the driver; never written
SHARD_IMAGES = 32  # to-do images per shard: one decode task each
IMAGES_PER_SLOT = 4  # images handed to an actor per batch, per KV-cache slot (its engine's tail is short beside it)
CONNECT_TIMEOUT_S = 10.0  # how long an address may take to answer before the run is refused
INSTALL_HINT = "--ray needs Ray: pip install 'vlmbatch[ray]'"

# What the driver sends for one image: its reference, and per prompt (key, prompt text, the row its
# completion fills in, and the error its row says instead: a prompt too long; else None).
Prompt = tuple[Any, str, dict, "str | None"]
Todo = tuple[ImageRef, list[Prompt]]


@dataclass(frozen=True)
class ClusterWorker:
    """What an engine actor needs (picklable): the one-machine worker's settings, and where it runs."""

    worker: WorkerSpec
    model: str  # as given: a node without the driver's checkpoint path resolves this itself
    fingerprint: str  # ... and must find these very weights
    answer_column: str
    image_size: int
    gpus: float  # per actor; 0: a CPU worker of `worker.cpu_threads` torch threads
    # detect / segment: rows carry each image's (width, height) and, under TOKENS, each completion's
    # tokens and log-probs, from which the driver reads the objects (it holds the mask VAE).
    sized: bool = False


def import_ray():
    """Ray, imported only for --ray, or the one line saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise VlmbatchError(INSTALL_HINT) from None
    return ray


def connect(address: str):
    """Join the cluster `address` names: "auto" joins the one RAY_ADDRESS or `ray start` names, else starts
    a local instance; "HOST:PORT" and "ray://HOST:10001" join that one, once it answers within
    `CONNECT_TIMEOUT_S`. An instance this process already started (tests, notebooks) is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        # Ray's notices (token authentication, the fine print of actor restarts) are Ray's, not the job's:
        # errors only from its Python side, fatal ones only from its C++ core (whose error-level lines are
        # such notices; a failure reaches the job as an exception). RAY_BACKEND_LOG_LEVEL set by hand wins.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address == "auto":
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:  # no cluster running: one on this machine
                ray.init(include_dashboard=False, **quiet)
        else:
            _check_reachable(address)
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise VlmbatchError(f"cannot join the Ray cluster at {address}: {exc}") from None
    # ERROR: Ray Data warns of every column it stores as pickled objects (the shards' object references).
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # vlmbatch's own bar counts the rows as they arrive
    context.print_on_execution_start = False
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        raise VlmbatchError(f"--ray expects auto, HOST:PORT or ray://HOST:PORT, got {address!r}") from None
    except OSError as exc:
        raise VlmbatchError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def gpus_per_worker(ray, asked: float | None) -> float:
    """The GPUs each actor holds: as asked, else 1 where the cluster has GPUs and 0 (CPU workers) where not."""
    available = ray.cluster_resources().get("GPU", 0)
    if asked is None:
        return 1.0 if available else 0.0
    if asked > available:
        raise VlmbatchError(f"--gpus-per-worker {asked:g} but the Ray cluster has {available:g} GPUs")
    return asked


def cpu_threads(ray, most_workers: int) -> int:
    """Torch threads of a CPU worker: a node's CPUs shared among the pool's actors (at least 1)."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = max((node["Resources"].get("CPU", 1) for node in nodes), default=1)
    return max(1, int(cpus * len(nodes)) // most_workers)


def run_on_ray(todo: Iterable[Todo], worker: ClusterWorker, workers: tuple[int, int],
               actor: type | None = None) -> Iterator[list[dict]]:
    """The rows of each image of `todo` (one list per image, error rows included), made by a pool of
    `workers` = (fewest, most) engine actors, as batches finish. Call `connect` first. `actor` replaces
    `_EngineActor` (eval/bench_ray.py's scaling simulation: an engine that only sleeps)."""
    import ray

    # Each shard goes to the object store as soon as it is cut (spilled to disk when that fills): the
    # driver holds references only, so a to-do list of embedded image bytes never sits in its memory.
    shards = [{"shard": ray.put(pickle.dumps(chunk))} for chunk in _chunks(todo, SHARD_IMAGES)]
    if not shards:
        return
    fewest, most = workers
    # Ray Data's actors default to max_restarts=-1 and max_task_retries=-1: a killed actor (node lost,
    # OOM) is started again and the batch it held is retried on the pool.
    dataset = (ray.data.from_items(shards, override_num_blocks=len(shards))
               .flat_map(decode_shard, fn_kwargs={"size": worker.image_size, "sized": worker.sized}, num_cpus=1)
               .map_batches(actor or _EngineActor, fn_constructor_args=(worker,), batch_format="numpy",
                            batch_size=IMAGES_PER_SLOT * worker.worker.max_slots,
                            compute=ray.data.ActorPoolStrategy(min_size=fewest, max_size=most),
                            # A CPU worker reserves 1 CPU however many threads it runs: the decode
                            # tasks must always find CPUs to run on, or the pool waits on them forever.
                            num_cpus=1, num_gpus=worker.gpus or None))
    warnings.filterwarnings("ignore", "The minimum number of concurrent actors", UserWarning)  # a short to-do list
    try:
        for row in dataset.iter_rows():
            yield pickle.loads(row["rows"])
    except ray.exceptions.RayError as exc:
        raise VlmbatchError(f"the Ray job failed: {_reason(exc)}") from None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line. Ray wraps what a worker raised in its own exceptions, whose text
    holds the worker's traceback (ending `module.Error: message`) and hints on retries: the message of
    the innermost exception that traceback names, else Ray's own last line."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:  # Ray's own layers, outermost first
        seen.add(id(exc))
        texts.append(str(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    for text in texts:
        raised = [m.group(1) for m in _RAISED.finditer(text)]
        if raised:
            return raised[-1]
    lines = [line.strip() for line in texts[0].splitlines() if line.strip()] if texts else []
    return lines[-1] if lines else "unknown error"


# The last line of a Python traceback: `package.module.SomeError: message`.
_RAISED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): (.+)$", re.MULTILINE)


class _EngineActor:
    """One engine per actor, its weights loaded once; each call turns a batch of decoded images into rows,
    made exactly as a local run makes them (`Job._work` and `Job._completion_row`)."""

    def __init__(self, spec: ClusterWorker):
        worker = spec.worker
        checkpoint = worker.checkpoint
        if not Path(checkpoint.path).exists():  # a node without the driver's files: its own copy
            checkpoint = resolve_checkpoint(spec.model)
            if checkpoint.fingerprint() != spec.fingerprint:
                raise VlmbatchError(f"{spec.model} on {os.uname().nodename} is not the driver's weights")
        device = torch.device("cuda" if spec.gpus else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(worker.cpu_threads)
        model = load_model(checkpoint, device, worker.dtype, worker.cpu_matmul)
        self.engine = Engine(model, worker.settings, max_slots=worker.max_slots,
                             max_prompt_len=worker.max_prompt_len, cuda_graph=worker.cuda_graph)
        self.processor = Processor.from_dir(checkpoint.path, checkpoint.config)
        self.answer_column = spec.answer_column
        self.sized = spec.sized

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        images: list[list[dict]] = []
        work = []
        for blob in batch["item"]:
            pixels, prompts = pickle.loads(blob)
            rows: list[dict] = []
            images.append(rows)
            if isinstance(pixels, str):  # not decoded: every prompt's row is an error row
                rows.extend(_error_row(row, pixels) for _, _, row, _ in prompts)
                continue
            if self.sized:
                pixels, (width, height) = pixels
                prompts = [(key, prompt, {**row, "width": width, "height": height}, error)
                           for key, prompt, row, error in prompts]
            rows.extend(_error_row(row, error) for _, _, row, error in prompts if error is not None)
            todo = [(key, self.processor.prompt_ids(prompt)) for key, prompt, _, error in prompts if error is None]
            if todo:
                context = (rows, {key: row for key, _, row, error in prompts if error is None})
                work.append(ImageWork(pixels, todo, context=context))
        for completion in self.engine.run(work):
            rows, made = completion.context
            rows.append({**made[completion.key], **completion.columns(self.answer_column, self.processor.decode)})
            if self.sized:
                rows[-1][TOKENS] = (completion.tokens, completion.logprobs)
        return {"rows": [pickle.dumps(rows) for rows in images]}


def _error_row(row: dict, error: str) -> dict:
    return {**row, "error": error, "finish_reason": "error"}
