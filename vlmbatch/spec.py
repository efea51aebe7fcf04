"""What a job asks for: its settings, free of torch.

The command line, `vlmbatch run`'s TOML specs and the evaluation build these before anything heavy
is needed, so `vlmbatch --help`, a mistyped flag or spec, and scoring saved predictions answer
without importing torch (2-3 s on a small CPU). The pipeline and the engine take them as they are.
"""

from __future__ import annotations

import functools
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlmbatch.errors import VlmbatchError

DEFAULT_MODEL = "google/paligemma2-3b-mix-224"
DEFAULT_SCORE_MODEL = "google/siglip-so400m-patch14-384"  # the SigLIP that PaliGemma's vision tower comes from
SCORE_CPU_MATMUL = "torch"  # see ScoreSpec.cpu_matmul
DEFAULT_CAPTION_PROMPT = "caption en"
LANG_PROMPT = "caption {lang}"  # PaliGemma mix's multilingual captions
DEFAULT_VQA_TEMPLATE = "answer en {question}"
TASKS = ("caption", "vqa", "detect", "segment")
DETECTION_TASKS = ("detect", "segment")  # answers parsed into objects (vlmbatch.detection)
DEFAULT_MAX_CHARS = 125  # alt text longer than this is flagged too_long: the common screen-reader guideline
DEFAULT_FLUSH_ROWS = 256  # rows buffered before a part file is written (what a kill can cost)

# The one statement of each setting's bounds: flags, job specs and --set values all meet them here.
AT_LEAST = {"max_chars": 1, "max_new_tokens": 1, "num_beams": 1, "temperature": 0, "batch_size": 1, "limit": 1, "flush_rows": 1,
            "workers": 0, "gpus_per_worker": 0, "fetch_retries": 0, "fetch_workers": 1, "max_image_bytes": 1}
# --fetch-images (vlmbatch.sources.fetch): seconds per try, tries after the first, fetches in flight, bytes.
DEFAULT_FETCH_TIMEOUT_S = 30.0
DEFAULT_FETCH_RETRIES = 3
DEFAULT_FETCH_WORKERS = 16
DEFAULT_MAX_IMAGE_BYTES = 20_000_000
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class SpecError(VlmbatchError, ValueError):
    """A setting of the wrong type or out of bounds, in one line naming it, its value and what it must be."""


def _validate(settings) -> None:
    """Coerce each field of the frozen dataclass `settings` to its annotated type, then check its bounds.
    Specs and --set give text or TOML values: "no" must not be true, nor 2.5 a batch size."""
    for item in fields(settings):
        value = _coerce(item.name, getattr(settings, item.name), _hints(type(settings))[item.name])
        object.__setattr__(settings, item.name, value)
        _check_bound(item.name, value)


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _check_bound(name: str, value) -> None:
    if value is None:
        return
    if name in AT_LEAST and not value >= AT_LEAST[name]:
        raise SpecError(f"{name} must be at least {AT_LEAST[name]}, got {value!r}")
    if name == "top_p" and not 0 < value <= 1:
        raise SpecError(f"top_p must be in (0, 1], got {value!r}")
    if name == "fetch_timeout" and not value > 0:
        raise SpecError(f"fetch_timeout must be more than 0 seconds, got {value!r}")


def _coerce(name: str, value, hint):
    """`value` as the type `hint` names (a class, or one with `| None`)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    wanted = next(option for option in options if option is not type(None))
    try:
        return _CONVERTERS.get(wanted, _instance_of(wanted))(value)
    except (TypeError, ValueError):
        raise SpecError(f"{name} must be {_NAMES.get(wanted, wanted.__name__)}, got {value!r}") from None


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def _as_int(value) -> int:
    if isinstance(value, str):  # text from --set: written as an integer, or as a float without a fraction
        value = _number(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)  # int() of a bool, or of 2.5, would pass unnoticed
    return value


def _as_float(value) -> float:
    if isinstance(value, str):
        value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(value)
    return float(value)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _as_str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _as_path(value) -> Path:
    if not isinstance(value, (str, Path)):
        raise TypeError(value)
    return Path(value)


class Location(str):
    """Where output goes, spelled as given: a path or a URI (`s3://...`). A trailing `/` says a folder, so
    it is not normalized away as a `Path` would."""


def _as_location(value) -> Location:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(value)
    return Location(os.fspath(value))


class Languages(tuple):
    """Caption languages, each a code as PaliGemma mix's prompts spell it (`en`, `es`, `pt-BR`, `zh`)."""


_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")


def _as_languages(value) -> Languages:
    """`"en,es"` (a flag, --set) or `["en", "es"]` (a job spec)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise TypeError(value)
    codes = [item.strip() for item in items if item.strip()]
    if not codes or len(set(codes)) < len(codes) or not all(_LANGUAGE_CODE.fullmatch(code) for code in codes):
        raise ValueError(value)
    return Languages(codes)


def _instance_of(cls: type):
    def check(value):
        if not isinstance(value, cls):
            raise TypeError(value)
        return value
    return check


_CONVERTERS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str, Path: _as_path,
               Location: _as_location, Languages: _as_languages}
_NAMES = {bool: "a boolean (true/false, yes/no, on/off, 1/0)", int: "an integer", float: "a number",
          str: "a string", Path: "a path", Location: "a path or URI",
          Languages: 'distinct language codes ("en,es" or ["en", "es"])'}


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    num_beams: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    length_penalty: float = 1.0  # beam search only, as in transformers

    def __post_init__(self):
        _validate(self)
        if self.num_beams > 1 and self.temperature > 0:
            raise SpecError("beam search with sampling is not supported: use --num-beams 1 with --temperature")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobSpec:
    task: str  # "caption" | "vqa"
    source: str
    out: Location  # a .parquet file, or a Parquet dataset folder (sinks.outputs.is_folder_output)
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_CAPTION_PROMPT  # caption; with `lang`, {lang} is each language's code
    lang: Languages | None = None  # caption: one row per image and language, prompted "caption {lang}"
    max_chars: int = DEFAULT_MAX_CHARS  # caption: longer alt text is flagged too_long (review.rules)
    min_confidence: float | None = None  # caption: a mean_logprob below this is flagged low_confidence
    prompt_template: str = DEFAULT_VQA_TEMPLATE  # vqa
    questions: str | None = None  # vqa: JSONL / CSV / Parquet file
    question: str | None = None  # vqa: one question for every image
    split: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 16  # KV-cache slots: sequences decoded together
    device: str = "auto"
    devices: str | None = None  # several devices, one engine process each: "cuda:0,cuda:1" or "all"
    dtype: str | None = None
    cpu_matmul: str = "auto"  # float32 on a CPU: one of blocks.CPU_MATMULS; "auto": the fastest here
    cuda_graph: bool = True  # on CUDA, greedy: each decode step is one replay of a captured CUDA graph
    limit: int | None = None  # at most this many new images this run
    overwrite: bool = False
    workers: int | None = None  # decode processes; 0 decodes in the main process; None: see default_workers
    flush_rows: int = DEFAULT_FLUSH_ROWS
    confine: bool = False  # datasets and manifests: image paths outside their folder become error rows
    recover: bool = False  # an unreadable OUT is moved aside (OUT.corrupt-<time>), not refused; parts are kept
    ray: str | None = None  # run on a Ray cluster: "auto", "HOST:PORT" or "ray://HOST:10001" (vlmbatch.distributed)
    ray_workers: str | None = None  # engine actors: "N", or "MIN-MAX" for an autoscaling pool (default 1)
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else CPU workers; 0: CPU workers
    score_with: str | None = None  # caption: a SigLIP checkpoint scoring each new caption as it is written
    fetch_images: bool = False  # images given as http(s) URLs are fetched into the image cache (sources.fetch)
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    fetch_retries: int = DEFAULT_FETCH_RETRIES
    fetch_workers: int = DEFAULT_FETCH_WORKERS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    objects: str | None = None  # detect / segment: what to find, "cat ; dog"
    vae: Path | None = None  # segment: the mask VAE's weights (vae-oid.npz or its safetensors copy)

    def __post_init__(self):
        _validate(self)
        if self.task not in TASKS:
            raise SpecError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        self._check_detection()
        if self.ray is None and (self.ray_workers is not None or self.gpus_per_worker is not None):
            raise SpecError("ray_workers and gpus_per_worker need ray (--ray auto or an address)")
        if self.ray is not None and self.devices is not None:
            raise SpecError("ray and devices exclude each other: on a cluster use ray_workers")
        if self.ray is not None and self.fetch_images:  # the driver's cache is no path on the workers' nodes
            raise SpecError("fetch_images is not supported with ray yet: fetch the images first, e.g. with img2dataset")
        self.worker_range  # noqa: B018  (refuses a malformed ray_workers now)
        if self.lang is None and self.task == "caption" and "{lang}" in self.prompt:
            raise SpecError(f"the prompt {self.prompt!r} has {{lang}} but no lang is given: add --lang en,es (lang = "
                            '["en", "es"] in a job spec), or write the language into the prompt')
        if self.lang is not None and self.task != "caption":
            raise SpecError("lang takes caption languages: it needs the caption task")
        if self.lang is not None and "{lang}" not in self.task_prompt:
            raise SpecError(f"with lang, the prompt must contain {{lang}} (e.g. \"{LANG_PROMPT}\"), got {self.prompt!r}")
        if self.score_with is not None and self.task != "caption":
            raise SpecError("score_with scores captions: it needs the caption task")
        if self.score_with is not None and self.ray is not None:
            raise SpecError("score_with is not available with ray yet: run `vlmbatch score OUT` after the job")

    def _check_detection(self) -> None:
        if self.task not in DETECTION_TASKS:
            if self.objects is not None or self.vae is not None:
                raise SpecError("objects and vae are for detect and segment only")
            return
        if self.objects is None or not self.object_names:
            raise SpecError(f'{self.task} needs the objects to find: --objects "cat ; dog"')
        if self.vae is not None and self.task != "segment":
            raise SpecError("vae is for segment only (detect gives boxes, no masks)")

    @property
    def object_names(self) -> list[str]:
        """`objects` split at ';', blanks left out."""
        return [name.strip() for name in (self.objects or "").split(";") if name.strip()]

    @property
    def task_prompt(self) -> str:
        """The one prompt of a caption, detect or segment job: `prompt` (with `lang` a template over
        {lang}, by default PaliGemma mix's "caption {lang}"), or "detect cat ; dog"."""
        if self.task in DETECTION_TASKS:
            return f"{self.task} {' ; '.join(self.object_names)}"
        return LANG_PROMPT if self.lang is not None and self.prompt == DEFAULT_CAPTION_PROMPT else self.prompt

    @property
    def worker_range(self) -> tuple[int, int]:
        """`ray_workers` as (fewest, most) engine actors: "4" is (4, 4), "2-8" an autoscaling (2, 8)."""
        text = (self.ray_workers or "1").strip()
        low, sep, high = text.partition("-")
        try:
            fewest, most = int(low), int(high if sep else low)
        except ValueError:
            raise SpecError(f"ray_workers must be N or MIN-MAX, got {self.ray_workers!r}") from None
        if not 1 <= fewest <= most:
            raise SpecError(f"ray_workers must be N or MIN-MAX with 1 <= MIN <= MAX, got {self.ray_workers!r}")
        return fewest, most

    @property
    def answer_column(self) -> str:
        return {"caption": "caption", "vqa": "answer"}.get(self.task, "text")


@dataclass(frozen=True)
class ScoreSpec:
    """`vlmbatch score`: SigLIP scores added to the caption rows of an existing output."""

    out: Location  # the caption output, a .parquet file or a dataset folder
    source: str  # what it was captioned from: its images are read again
    model: str = DEFAULT_SCORE_MODEL
    split: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    confine: bool = False
    device: str = "auto"
    dtype: str | None = None
    # MKL: a score is a number compared across runs and tools, and oneDNN's other summation order moves
    # SigLIP's cosine by ~1e-5, which its logit scale (~118 in trained checkpoints) makes ~1e-4 of probability.
    cpu_matmul: str = SCORE_CPU_MATMUL
    batch_size: int = 16  # images embedded together
    workers: int | None = None
    overwrite: bool = False  # rescore rows that other SigLIP weights scored (never deletes a row)
    flush_rows: int = DEFAULT_FLUSH_ROWS
    fetch_images: bool = False  # images given as URLs: read from the image cache, fetched where missing

    def __post_init__(self):
        _validate(self)
