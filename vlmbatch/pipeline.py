"""A caption or VQA job: Source → decode workers → Engine → resumable Parquet sink.

The job knows which ids the output already holds and sends only the others through the model, so
re-running the same command resumes a stopped run, and over a grown folder processes only new images.
Ids whose row is an error (an image that could not be decoded) are tried again by every run, and so
are image files replaced since their row was written (another size or modification time).
The weights are checked up front but loaded only once an image needs them.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping

import torch

from vlmbatch import __version__
from vlmbatch.engine.devices import WorkerSpec, cpu_threads_per_worker, run_on_devices
from vlmbatch.engine.scheduler import Completion, Engine, ImageWork
from vlmbatch.engine.scorer import Scorer
from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.model.blocks import CPU_MATMULS, choose_cpu_matmul
from vlmbatch.model.loading import (
    Checkpoint,
    check_weights,
    default_dtype,
    load_model,
    resolve_checkpoint,
    weight_shapes,
)
from vlmbatch.model.memory import (
    PROCESS_OVERHEAD,
    available_bytes,
    kv_cache_bytes,
    not_enough,
)
from vlmbatch.model.processor import Processor
from vlmbatch.review.rules import alt_text_flags
from vlmbatch.sinks.outputs import is_folder_output, open_sink, written_paths
from vlmbatch.sinks.rows import FAILURE_COLUMN, KEYS, SCHEMAS, VERSION_COLUMN
from vlmbatch.sources.decode import decode_one, decode_stream, decode_with_size
from vlmbatch.sources.open import open_source
from vlmbatch.sources.questions import group_by_image, load_questions
from vlmbatch.sources.records import ImageRecord, Question, Source, readable
from vlmbatch.spec import DETECTION_TASKS, SCORE_CPU_MATMUL, JobSpec

SINGLE_QUESTION_ID = "0"
MAX_PROMPT_TEXT_TOKENS = 256  # prompt tokens after the image tokens that the KV cache makes room for

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Summary:
    out: Path
    written: int = 0
    errors: int = 0
    already_done: int = 0  # rows the output already held
    retried: int = 0  # rows tried again because the output held only an error for them
    replaced: int = 0  # rows made again because their image file was replaced since
    images_skipped: int = 0  # source records with nothing left to do (duplicate ids included)
    duplicate_ids: int = 0  # source records skipped because an earlier one of this run had their id
    images: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass
class _Item:
    """An image with the rows to produce for it: (key, prompt, question or None)."""

    record: ImageRecord
    prompts: list[tuple[tuple, str, Question | None]]


ProgressFn = Callable[[Summary], None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VlmbatchError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VlmbatchError(f"device {device} requested but CUDA is not available")
    return resolved


def resolve_devices(devices: str) -> list[torch.device]:
    """ "all" (every CUDA device) or a comma-separated list such as "cuda:0,cuda:1" or "cpu,cpu"."""
    if devices == "all":
        if not torch.cuda.is_available():
            raise VlmbatchError("--devices all needs CUDA devices, and none is available")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    resolved = [resolve_device(d.strip()) for d in devices.split(",") if d.strip()]
    if not resolved:
        raise VlmbatchError(f"no device in --devices {devices!r}")
    if len({d.type for d in resolved}) > 1:
        raise VlmbatchError("--devices must all be of one kind (all cuda or all cpu)")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if dtype not in DTYPES:
        raise VlmbatchError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[dtype]


def resolve_cpu_matmul(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """Who multiplies the linear layers: "onednn+gelu", "onednn" or "torch"; decided once per job
    (workers on several CPUs share the decision), see `blocks.choose_cpu_matmul`."""
    if choice not in CPU_MATMULS:  # named as the flag is, whatever the device
        raise VlmbatchError(f"unknown --cpu-matmul {choice!r} (use {', '.join(CPU_MATMULS)})")
    try:
        return choose_cpu_matmul(choice, device, dtype)
    except ValueError as exc:
        raise VlmbatchError(str(exc)) from None


class Job:
    """Everything resolved up front, so every fatal mistake surfaces before any work starts."""

    def __init__(self, spec: JobSpec, *, source: Source | None = None, questions: list[Question] | None = None):
        """`source` and `questions` may be given ready-made (the evaluation does); otherwise they are
        read from `spec.source` and `spec.questions`."""
        self.spec = spec  # its values were checked by JobSpec itself
        # The output is excluded from the source: written into an image folder, it must not be read back.
        self.source: Source = source or open_source(spec.source, split=spec.split, image_column=spec.image_column,
                                                    id_column=spec.id_column, confine=spec.confine,
                                                    exclude=written_paths(spec.out))
        self.questions = group_by_image(questions) if questions is not None else self._questions()
        self.source_exhausted = False
        self.ray = self._join_cluster() if spec.ray is not None else None
        if self.ray is not None:  # the workers' device: the driver loads no weights
            self.gpus_per_worker = ray_runner().gpus_per_worker(self.ray, spec.gpus_per_worker)
            self.devices = [torch.device("cuda" if self.gpus_per_worker else "cpu")]
        else:
            self.devices = resolve_devices(spec.devices) if spec.devices else [resolve_device(spec.device)]
        self.device = self.devices[0]
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.cpu_matmul = resolve_cpu_matmul(spec.cpu_matmul, self.device, self.dtype)
        self.checkpoint: Checkpoint = resolve_checkpoint(spec.model)
        self.config = self.checkpoint.config
        shapes = weight_shapes(self.checkpoint)  # headers only: layers the files lack stop the job here
        # Scores are per row (`siglip_weights` says whose), not a setting: an output's rows may be scored later.
        self.scorer = (Scorer(spec.score_with, self.device, self.dtype, SCORE_CPU_MATMUL) if spec.score_with
                       else None)
        if self.device.type == "cpu" and self.ray is None:  # on CUDA the engine checks its cache, once loaded
            # Counted from the headers, before the model's structure is built for the tensor check.
            self._check_host_memory(sum(math.prod(shape) for shape in shapes.values()),
                                    self.scorer.parameters if self.scorer else 0)
        check_weights(self.checkpoint, shapes)  # the weights themselves load once an image needs them
        self.processor = Processor.from_dir(self.checkpoint.path, self.config)
        self.fingerprint = self.checkpoint.fingerprint()
        # Image embeddings by row key, between decoding and the caption: kept in this process, never in
        # the work's context, which --devices pickles to the engine processes and back.
        self._embeds: dict[tuple, torch.Tensor] = {}
        self.objects, self.vae_fingerprint = self._object_columns()
        self.sink = open_sink(
            spec.out, SCHEMAS[spec.task], key=KEYS[spec.task],
            failure_column=FAILURE_COLUMN, version_column=VERSION_COLUMN,
            settings=self.settings(), metadata=self.metadata(), overwrite=spec.overwrite, recover=spec.recover,
            flush_rows=spec.flush_rows)

    def _join_cluster(self):
        """Ray, joined before anything else is resolved: a missing Ray, an unreachable cluster or a
        single-file OUT (a cluster writes a dataset folder) stops the job before any work."""
        if not is_folder_output(self.spec.out):
            raise VlmbatchError(f"with --ray, --out must name a Parquet dataset folder (e.g. "
                                f"{Path(self.spec.out).with_suffix('')}/), not the single file {self.spec.out}")
        return ray_runner().connect(self.spec.ray)

    def _check_host_memory(self, parameters: int, scorer_parameters: int = 0) -> None:
        """Stop before any work when the weights and KV cache of every CPU worker (and the SigLIP scorer of
        --score-with, held by this process) cannot fit."""
        available = available_bytes(self.device)
        workers, slots = len(self.devices), self.spec.batch_size
        max_len = self.max_prompt_len + self.spec.generation.max_new_tokens
        if self.cpu_matmul != "torch" and self.config.tie_word_embeddings:
            parameters += self.config.text.vocab_size * self.config.text.hidden_size  # oneDNN's copy of the head
        weights = (parameters * workers + scorer_parameters) * self.dtype.itemsize
        cache = kv_cache_bytes(self.config.text, slots, max_len, self.dtype) * workers
        overhead = PROCESS_OVERHEAD * workers
        if available is None or weights + cache + overhead <= available:
            return
        each = f", {workers} workers" if workers > 1 else ""
        slots_that_fit = (available - weights - overhead) * slots // cache
        if slots_that_fit >= 1:
            remedy = f"lower --batch-size to at most {slots_that_fit}"
        elif self.dtype == torch.float32:
            remedy = "--dtype bfloat16 halves the weights (its outputs differ a little from float32's)"
        else:
            remedy = "the model needs a machine with more memory"
        needs = {f"weights ({str(self.dtype).removeprefix('torch.')}{each})": weights,
                 f"KV cache ({slots} slots x {max_len} tokens{each})": cache, "runtime": overhead}
        raise not_enough(self.device, needs, available, remedy)

    def _object_columns(self):
        """detect / segment: what fills in each row's objects, and the mask VAE's fingerprint (None
        without one); (None, None) for other tasks. A bad --vae file stops the job here, in one line."""
        if self.spec.task not in DETECTION_TASKS:
            return None, None
        from vlmbatch.detection.objects import ObjectColumns
        from vlmbatch.detection.vae import fingerprint, load_vae

        masks = load_vae(self.spec.vae) if self.spec.vae is not None else None
        if self.spec.task == "segment" and masks is None:
            warnings.warn("no --vae given: the <seg> codes are kept (seg_codes) and every mask is null; "
                          "pass --vae vae-oid.npz for masks", VlmbatchWarning, stacklevel=2)
        columns = ObjectColumns(self.spec.task, self.processor.decode, masks)
        return columns, fingerprint(masks) if masks is not None else None

    def _questions(self) -> dict[str, list[Question]] | None:
        spec = self.spec
        if spec.task != "vqa":
            return None
        if (spec.questions is None) == (spec.question is None):
            raise VlmbatchError("vqa needs exactly one of --questions FILE or --question TEXT")
        if "{question}" not in spec.prompt_template:
            raise VlmbatchError("--prompt-template must contain {question}")
        return group_by_image(load_questions(spec.questions)) if spec.questions else None

    def settings(self) -> dict:
        """What decides the outputs; a resumed run must match them. The model is its weights'
        fingerprint, not the name it was given: a relative path, an absolute one and a Hub id of the
        same weights resume one another's output (the name is kept in the metadata)."""
        spec = self.spec
        # With --lang the caption prompt is a template ("caption {lang}"): the languages are not a setting,
        # so a language added later captions that language alone.
        prompt = {"prompt_template": spec.prompt_template} if spec.task == "vqa" else {"prompt": spec.task_prompt}
        masks = {"vae": self.vae_fingerprint} if spec.task == "segment" else {}
        return {"task": spec.task, "weights": self.fingerprint, "dtype": str(self.dtype),
                **prompt, **masks, "generation": spec.generation.as_dict()}

    def metadata(self) -> dict[str, str]:
        return {"vlmbatch.version": __version__, "vlmbatch.model": self.spec.model,
                "vlmbatch.model_fingerprint": self.fingerprint, "vlmbatch.dtype": str(self.dtype),
                "vlmbatch.source": readable(self.spec.source)}

    # -- work ------------------------------------------------------------------------------------
    def items(self, done: Mapping[tuple, str | None], summary: Summary,
              failed: Collection[tuple] = frozenset()) -> Iterator[_Item]:
        """Images with rows still to produce: none yet, only an error (in `failed`), or one made from
        another version of the image file (`done` maps keys to the versions their rows were made
        from). At most `limit` that are not only retries: files that stay broken would use up every
        run's limit otherwise. An id holds one row: a record whose id an earlier one of this run had is
        skipped (the first counts) and counted in `summary.duplicate_ids`."""
        counted = 0
        seen: set[str] | None = None if self.source.unique_ids else set()  # a folder's ids cannot repeat
        self.source_exhausted = False
        for record in self.source:
            if self.spec.limit is not None and counted >= self.spec.limit:
                return
            if seen is not None:
                if record.id in seen:
                    summary.duplicate_ids += 1
                    summary.images_skipped += 1
                    continue
                seen.add(record.id)
            prompts = self._prompts(record)
            todo = [p for p in prompts if p[0] not in done or _replaced(done[p[0]], record.version)]
            retried = sum(key in failed for key, _, _ in todo)
            summary.already_done += len(prompts) - len(todo)
            summary.retried += retried
            summary.replaced += sum(key in done for key, _, _ in todo)
            if not todo:
                summary.images_skipped += 1
                continue
            counted += retried < len(todo)
            yield _Item(record, todo)
        self.source_exhausted = True

    def _prompts(self, record: ImageRecord) -> list[tuple[tuple, str, Question | None]]:
        spec = self.spec
        if spec.task == "caption":
            template = spec.task_prompt
            return [((record.id, lang), template.replace("{lang}", lang) if lang else template, None)
                    for lang in spec.lang or (None,)]
        if spec.task != "vqa":
            return [((record.id,), spec.task_prompt, None)]
        if self.questions is None:
            questions = [Question(record.id, spec.question, SINGLE_QUESTION_ID)]
        else:
            questions = self.questions.pop(record.id, [])
        return [((record.id, q.question_id), spec.prompt_template.format(question=q.question), q) for q in questions]

    def unmatched_question_rows(self, done: Collection[tuple]) -> list[dict]:
        """Questions whose image the source does not have: one error row each. Only known once the
        whole source was read: a run stopped by --limit leaves the others for the next run."""
        if not self.source_exhausted:
            return []
        rows = []
        for image, questions in (self.questions or {}).items():
            for q in questions:
                if (image, q.question_id) not in done:
                    rows.append(self._row((image, q.question_id), q, self.spec.prompt_template.format(question=q.question),
                                          error="image not found in source"))
        return rows

    def _row(self, key: tuple, question: Question | None, prompt: str, *, version: str | None = None,
             error: str | None = None) -> dict:
        """The row of `key` (caption: (id, lang); VQA: (id, question_id)) before its text is generated,
        or an error row."""
        row = {"id": key[0], self.spec.answer_column: None, "error": error, "prompt": prompt, "num_tokens": 0,
               "finish_reason": None if error is None else "error", "image_version": version}
        if self.spec.task == "vqa":
            row.update(question_id=question.question_id, question=question.question)
        elif self.spec.task == "caption":
            row["lang"] = key[1]
        return row

    def run(self, progress: ProgressFn | None = None) -> Summary:
        """Every row this run owes, error rows included, reaches the sink here, in this thread, and only here."""
        summary = Summary(out=self.spec.out)
        started = time.monotonic()
        with self.sink as sink:
            done, failed = sink.done_keys(), sink.failed_keys
            for row in self._rows(done, failed, summary):
                if self.spec.task == "caption":  # the alt-text rules, as the row is written
                    row["flags"] = self._flags(row)
                summary.written += sink.write([row])  # a failure the output already holds is not rewritten
                summary.errors += row["error"] is not None
                summary.generated_tokens += row["num_tokens"]
                summary.seconds = time.monotonic() - started
                if progress:
                    progress(summary)
        summary.seconds = time.monotonic() - started
        return summary

    def _flags(self, row: dict) -> list[str]:
        spec = self.spec
        return alt_text_flags(row["caption"], error=row["error"], truncated=row["finish_reason"] == "length",
                              mean_logprob=row.get("mean_logprob"), lang=row.get("lang"), max_chars=spec.max_chars,
                              min_confidence=spec.min_confidence)

    def _rows(self, done: Mapping[tuple, str | None], failed: Collection[tuple], summary: Summary) -> Iterator[dict]:
        """The rows of the images still to do, as they are made: error rows of images that could not be
        decoded or prompted (passed on from the decoding side, which may run in the engine's feeder
        thread, through a queue), then the rows of the engine's completions, and last the questions
        whose image the source lacked."""
        if self.ray is not None:
            yield from self._cluster_rows(done, failed, summary)
        else:
            errors: queue.SimpleQueue[dict] = queue.SimpleQueue()
            work = self._work(done, failed, summary, errors)
            # The model loads only once an image needs it: a rerun over an unchanged folder, or over one
            # whose new files are all broken, loads nothing.
            first = next(work, None)
            if first is not None:
                for completion in self._generate(itertools.chain([first], work)):
                    yield from _drain(errors)
                    yield self._completion_row(completion)
            yield from _drain(errors)
        leftovers = self.unmatched_question_rows(done)
        summary.retried += sum((row["id"], row["question_id"]) in failed for row in leftovers)
        yield from leftovers

    def _work(self, done: Mapping[tuple, str | None], failed: Collection[tuple], summary: Summary,
              errors: queue.SimpleQueue) -> Iterator[ImageWork]:
        """Decoded images with their prompts for the engine, each carrying (as its context) the rows its
        completions complete; what cannot go to the engine becomes an error row on `errors`."""
        size = self.config.vision.image_size
        sizes = (size, self.scorer.image_size) if self.scorer else size  # one decode serves both models
        sized = self.objects is not None  # boxes are given in the original image's pixels
        todo = self.items(done, summary, failed)
        if self.spec.fetch_images:
            todo = self._fetched(todo)
        decoded = decode_stream(todo, lambda item: item.record.image, sizes, self.decode_workers,
                                decode=decode_with_size if sized else decode_one)
        for item, pixels in decoded:
            summary.images += 1
            record = item.record
            if isinstance(pixels, str):
                for key, prompt, q in item.prompts:
                    errors.put(self._row(key, q, prompt, version=record.version, error=pixels))
                continue
            size = {}
            if sized:
                pixels, (width, height) = pixels
                size = {"width": width, "height": height}
            if self.scorer:  # the image's SigLIP embedding waits here, in this process, for its captions
                pixels, score_pixels = pixels
                embed = self.scorer.image_embeds([score_pixels])
            prompts, rows = [], {}
            for key, _, ids, row, error in self._engine_prompts(item):
                row.update(size)
                if error is not None:
                    errors.put({**row, "error": error, "finish_reason": "error"})
                    continue
                prompts.append((key, ids))
                rows[key] = row
                if self.scorer:
                    self._embeds[key] = embed
            if prompts:
                yield ImageWork(pixels, prompts, context=rows)

    def _fetched(self, items: Iterator[_Item]) -> Iterator[_Item]:
        """`items` with each image given as a URL replaced by its cached file, or by the reason it could
        not be fetched (its rows' error); fetched ahead by a bounded pool (`sources.fetch`). Only images
        with rows still to make are fetched: a resumed run asks nothing for the images it has done."""
        from vlmbatch.sources.fetch import FetchSettings, fetch_stream  # httpx, for the runs that fetch

        spec = self.spec
        settings = FetchSettings(timeout=spec.fetch_timeout, retries=spec.fetch_retries, workers=spec.fetch_workers,
                                 max_bytes=spec.max_image_bytes)
        for item, image in fetch_stream(items, lambda item: item.record.image, settings):
            yield _Item(replace(item.record, image=image), item.prompts)

    def _engine_prompts(self, item: _Item) -> list[tuple[tuple, str, list[int], dict, str | None]]:
        """Per prompt of `item`: its key, its text, its token ids, the row its completion fills in, and
        the error that row says instead where the prompt is too long (None where it is not)."""
        made = []
        for key, prompt, q in item.prompts:
            ids = self.processor.prompt_ids(prompt)
            error = None
            if len(ids) > self.max_prompt_len:
                error = (f"prompt too long: {len(ids) - self.config.num_image_tokens - 1} tokens "
                         f"(at most {MAX_PROMPT_TEXT_TOKENS})")
            made.append((key, prompt, ids, self._row(key, q, prompt, version=item.record.version), error))
        return made

    def _cluster_rows(self, done: Mapping[tuple, str | None], failed: Collection[tuple],
                      summary: Summary) -> Iterator[dict]:
        """The rows of the images still to do, made on the Ray cluster (`vlmbatch.distributed`): the
        to-do list goes out as image references and prompt ids, and each image's rows come back here."""
        runner, spec = ray_runner(), self.spec
        fewest, most = spec.worker_range
        threads = runner.cpu_threads(self.ray, most)
        worker = WorkerSpec(self.checkpoint, self.dtype, spec.generation, spec.batch_size, self.max_prompt_len,
                            cpu_threads=threads, cpu_matmul=self.cpu_matmul, cuda_graph=spec.cuda_graph)
        cluster = runner.ClusterWorker(worker, spec.model, self.fingerprint, spec.answer_column,
                                       self.config.vision.image_size, self.gpus_per_worker,
                                       sized=self.objects is not None)
        # Prompts travel as text (each worker tokenizes them again): a to-do list of token ids would be
        # 256 image tokens per prompt.
        todo = ((item.record.image, [(key, prompt, row, error) for key, prompt, _, row, error in self._engine_prompts(item)])
                for item in self.items(done, summary, failed))
        for rows in runner.run_on_ray(todo, cluster, (fewest, most)):
            summary.images += 1
            for row in rows:
                if runner.TOKENS in row:  # detect / segment: the objects are read here, as locally
                    tokens, logprobs = row.pop(runner.TOKENS)
                    row.update(self.objects(row["text"], tokens, logprobs, row["width"], row["height"]))
                yield row

    @property
    def decode_workers(self) -> int:
        return self.spec.workers if self.spec.workers is not None else default_workers(self.devices)

    @property
    def max_prompt_len(self) -> int:
        return self.config.num_image_tokens + 1 + MAX_PROMPT_TEXT_TOKENS

    def _generate(self, work: Iterator[ImageWork]) -> Iterator[Completion]:
        spec = self.spec
        if len(self.devices) == 1:
            model = load_model(self.checkpoint, self.devices[0], self.dtype, self.cpu_matmul)
            engine = Engine(model, spec.generation, max_slots=spec.batch_size, max_prompt_len=self.max_prompt_len,
                            cuda_graph=spec.cuda_graph)
            return engine.run(work)
        worker = WorkerSpec(self.checkpoint, self.dtype, spec.generation, spec.batch_size, self.max_prompt_len,
                            cpu_threads=cpu_threads_per_worker(len(self.devices)), cpu_matmul=self.cpu_matmul,
                            cuda_graph=spec.cuda_graph)
        return run_on_devices(work, self.devices, worker)

    def _completion_row(self, completion: Completion) -> dict:
        """The row its image's work left for this completion, filled in (and scored, with --score-with)."""
        row = {**completion.context[completion.key], **completion.columns(self.spec.answer_column, self.processor.decode)}
        if self.scorer:
            [(prob, cos)] = self.scorer.score(self._embeds.pop(completion.key), [row[self.spec.answer_column]])
            row.update(siglip_prob=prob, siglip_cos=cos, siglip_weights=self.scorer.fingerprint)
        if self.objects is not None:
            row.update(self.objects(row["text"], completion.tokens, completion.logprobs, row["width"], row["height"]))
        return row


def ray_runner():
    """`vlmbatch.distributed.ray_runner`, imported only by a --ray job (it imports Ray)."""
    from vlmbatch.distributed import ray_runner

    return ray_runner


def _drain(rows: queue.SimpleQueue) -> Iterator[dict]:
    while True:
        try:
            yield rows.get_nowait()
        except queue.Empty:
            return


def _replaced(done_version: str | None, version: str | None) -> bool:
    """Whether an image file changed since its row was made. Unknown on either side (an image given
    as bytes, a row written before versions were kept) counts as unchanged."""
    return done_version is not None and version is not None and done_version != version


def default_workers(devices: list[torch.device]) -> int:
    """Decode processes when --workers is not given. With an accelerator the CPU is otherwise idle, so
    decoding moves to spare cores (at most 8). On a CPU-only run torch's threads already use every core;
    a decode process would only take turns with them, and each turn stalls a whole parallel matmul (on 2
    cores it made whole runs 8-21 % slower), so images are decoded in the main process between steps."""
    if all(device.type == "cpu" for device in devices):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def run_job(spec: JobSpec, progress: ProgressFn | None = None) -> Summary:
    return Job(spec).run(progress)
