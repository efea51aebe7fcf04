"""Several devices on one machine: one engine process per device, all fed from one queue.

Each worker pulls image work only when its engine has room, so a slower device simply takes less
(dynamic load balancing). Completions flow back to the parent, which alone writes the output, so
resume, ordering independence and error rows are exactly those of a single-device run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from vlmbatch.engine.scheduler import Completion, Engine, ImageWork
from vlmbatch.errors import VlmbatchError
from vlmbatch.model.loading import Checkpoint, load_model
from vlmbatch.spec import GenerationSettings

_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its engine (picklable)."""

    checkpoint: Checkpoint
    dtype: torch.dtype
    settings: GenerationSettings
    max_slots: int
    max_prompt_len: int
    cpu_threads: int
    cpu_matmul: str = "torch"  # resolved by the job: "onednn+gelu", "onednn" or "torch"
    cuda_graph: bool = True  # where the engine can (CUDA, greedy); False: never


def run_on_devices(work: Iterator[ImageWork], devices: list[torch.device], spec: WorkerSpec) -> Iterator[Completion]:
    """Like `Engine.run`, over one engine per device in its own process."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    tasks = context.Queue(maxsize=2 * len(devices))
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(i, str(device), spec, tasks, results), daemon=True)
               for i, device in enumerate(devices)]
    for process in workers:
        process.start()
    stop = threading.Event()
    feeder_error: list[BaseException] = []
    feeder = threading.Thread(target=_feed, args=(work, tasks, len(workers), stop, feeder_error), daemon=True)
    feeder.start()
    finished = 0
    try:
        while finished < len(workers):
            try:
                kind, payload = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                _check_alive(workers, devices)
                continue
            if kind == "completion":
                yield payload
            elif kind == "finished":
                finished += 1
            else:  # "failed"
                index, message = payload
                raise VlmbatchError(f"worker on {devices[index]} failed: {message}")
        feeder.join()
        if feeder_error:
            raise feeder_error[0]
    finally:
        stop.set()
        # Work still buffered for the pipe is no one's now: at exit, waiting for the stopped workers to
        # read it would hang the parent.
        tasks.cancel_join_thread()
        for process in workers:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


def _feed(work: Iterator[ImageWork], tasks, n_workers: int, stop: threading.Event, error: list) -> None:
    """Put every work item on the shared queue, then one end marker per worker."""
    try:
        for item in work:
            if not _put(tasks, item, stop):
                return
    except BaseException as exc:  # surfaced by the parent once the workers drain
        error.append(exc)
    for _ in range(n_workers):
        if not _put(tasks, None, stop):
            return


def _put(tasks, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            tasks.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _check_alive(workers, devices) -> None:
    for index, process in enumerate(workers):
        if process.exitcode not in (None, 0):
            why = " (killed: most likely by the kernel, out of memory)" if process.exitcode == -signal.SIGKILL else ""
            raise VlmbatchError(f"worker on {devices[index]} died (exit code {process.exitcode}){why}")


def _worker(index: int, device: str, spec: WorkerSpec, tasks, results) -> None:
    try:
        if device.startswith("cpu"):
            torch.set_num_threads(spec.cpu_threads)
        model = load_model(spec.checkpoint, device, spec.dtype, spec.cpu_matmul)
        engine = Engine(model, spec.settings, max_slots=spec.max_slots, max_prompt_len=spec.max_prompt_len,
                        cuda_graph=spec.cuda_graph)
        for completion in engine.run(iter(tasks.get, None)):
            results.put(("completion", completion))
        results.put(("finished", index))
    except BaseException as exc:  # reported to the parent, which stops the run with one line
        results.put(("failed", (index, f"{type(exc).__name__}: {exc}")))


def cpu_threads_per_worker(n_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_workers)


__all__ = ["WorkerSpec", "run_on_devices", "cpu_threads_per_worker"]
