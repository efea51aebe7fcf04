"""The `vlmbatch` command line: a thin layer that parses flags and hands a spec to the pipeline."""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import threading
import time
import typing
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vlmbatch import __version__
from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.spec import (
    DEFAULT_SCORE_MODEL,
    GenerationSettings,
    JobSpec,
    ScoreSpec,
)

if TYPE_CHECKING:
    from vlmbatch.pipeline import Job, Summary
    from vlmbatch.scoring import ScoreSummary

# torch, the model and the pipeline are imported by the commands that run a model, not here: `--help`,
# `--version`, a bad flag or spec, and scoring saved predictions answer without them (vlmbatch.spec).

app = typer.Typer(
    name="vlmbatch",
    help="Batched PaliGemma captioning and VQA over image collections, written to Parquet, and evaluated.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_GEN = GenerationSettings()
_JOB = {f.name: f.default for f in fields(JobSpec) if f.default is not MISSING}
_SCORE = {f.name: f.default for f in fields(ScoreSpec) if f.default is not MISSING}

# -- shared options ---------------------------------------------------------------------------------
# Every default is the spec's own (vlmbatch.spec): a flag left out and a key left out of a job spec mean
# the same. No min=/max= here: every bound lives in vlmbatch.spec, which flags, job specs and --set all meet, and
# whose refusal is one line (exit 2) where typer's is a usage box.
ModelOpt = typer.Option(_JOB["model"], "--model", "-m", help="Checkpoint directory or Hugging Face Hub id.")
OutOpt = typer.Option(..., "--out", "-o", help="Output, resumed if it exists: a .parquet file, or a Parquet dataset "
                      "folder (a name ending in / or without a suffix, an existing folder, or s3://, gs://).")
MaxNewOpt = typer.Option(_GEN.max_new_tokens, "--max-new-tokens", help="Most tokens generated per answer.")
BatchOpt = typer.Option(_JOB["batch_size"], "--batch-size", "-b", help="Sequences decoded together (KV-cache slots).")
BeamsOpt = typer.Option(_GEN.num_beams, "--num-beams", help="Beam search width; 1 is greedy or sampling.")
TempOpt = typer.Option(_GEN.temperature, "--temperature", help="Sampling temperature; 0 is greedy.")
TopPOpt = typer.Option(_GEN.top_p, "--top-p", help="Nucleus sampling threshold.")
SeedOpt = typer.Option(_GEN.seed, "--seed", help="Random seed for sampling.")
DeviceOpt = typer.Option(_JOB["device"], "--device", help="auto, cpu, cuda or cuda:N.")
DevicesOpt = typer.Option(_JOB["devices"], "--devices", help="Several devices, one worker each: cuda:0,cuda:1 or all.")
DtypeOpt = typer.Option(_JOB["dtype"], "--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).")
CpuMatmulOpt = typer.Option(_JOB["cpu_matmul"], "--cpu-matmul", help="float32 on a CPU: onednn+gelu (oneDNN, applying "
                            "the MLP's GELU as it writes the product), onednn (GELU after it), torch (MKL), or "
                            "auto: the fastest of the three on a quick check.")
CudaGraphOpt = typer.Option(_JOB["cuda_graph"], "--cuda-graph/--no-cuda-graph", help="On CUDA with greedy decoding, replay "
                            "each decode step as one captured CUDA graph; --no-cuda-graph runs it op by op.")
LimitOpt = typer.Option(_JOB["limit"], "--limit",
                        help="Process at most this many new images (images tried again after an error do not count).")
OverwriteOpt = typer.Option(_JOB["overwrite"], "--overwrite", help="Start afresh instead of resuming OUT.")
RecoverOpt = typer.Option(_JOB["recover"], "--recover", help="If OUT is damaged (cannot be read), move it aside to "
                          "OUT.corrupt-<time> and go on: rows saved in OUT.parts are kept, the rest are made again.")
SplitOpt = typer.Option(_JOB["split"], "--split", help="Dataset split (saved DatasetDict or Hub dataset).")
ImageColOpt = typer.Option(_JOB["image_column"], "--image-column", help="Dataset column holding images (default: the Image feature or 'image').")
IdColOpt = typer.Option(_JOB["id_column"], "--id-column", help="Dataset column holding record ids (default: 'id' if present, else an image path as written, else the row index).")
ConfineOpt = typer.Option(_JOB["confine"], "--confine", help="Manifests and saved datasets: read no image outside their "
                          "folder ('..', absolute paths, symlinks out): each such row is an error row instead.")
WorkersOpt = typer.Option(_JOB["workers"], "--workers", help="Image-decoding processes (0: decode in the main process). "
                          "Default: 0 on a CPU-only run, else cores - 1 (at most 8).")
FlushOpt = typer.Option(_JOB["flush_rows"], "--flush-rows", help="Rows buffered before they are saved (a crash loses at most these).")
RayOpt = typer.Option(_JOB["ray"], "--ray", help="Run on a Ray cluster: auto (the one RAY_ADDRESS or `ray start` "
                      "names, else a local instance), HOST:PORT or ray://HOST:10001. OUT is then a dataset folder.")
RayWorkersOpt = typer.Option(_JOB["ray_workers"], "--ray-workers", help="With --ray: engine workers, N or MIN-MAX "
                             "(an autoscaling pool). Default 1.")
GpusPerWorkerOpt = typer.Option(_JOB["gpus_per_worker"], "--gpus-per-worker", help="With --ray: GPUs per worker "
                                "(default 1 where the cluster has GPUs, else CPU workers sharing a node's cores).")
FetchImagesOpt = typer.Option(_JOB["fetch_images"], "--fetch-images/--no-fetch-images", help="Fetch images given as "
                              "http(s) URLs (a manifest's or dataset's url column) into the image cache "
                              "($VLMBATCH_CACHE/images, default ~/.cache/vlmbatch/images); each that fails is an error row.")
FetchTimeoutOpt = typer.Option(_JOB["fetch_timeout"], "--fetch-timeout", help="Seconds one try of one image may take.")
FetchRetriesOpt = typer.Option(_JOB["fetch_retries"], "--fetch-retries", help="Tries after the first, with backoff, on "
                               "connection errors, timeouts, HTTP 5xx, 408 and 429 (never on 404).")
FetchWorkersOpt = typer.Option(_JOB["fetch_workers"], "--fetch-workers", help="Images fetched at once.")
MaxImageBytesOpt = typer.Option(_JOB["max_image_bytes"], "--max-image-bytes", help="Largest image fetched, in bytes.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")


# The flags of every job command, after each command's own: JobSpec fields (or GenerationSettings ones)
# of the same names, plus --quiet and --debug.
_JOB_FLAGS: dict[str, tuple[object, typer.models.OptionInfo]] = {
    "model": (str, ModelOpt), "max_new_tokens": (int, MaxNewOpt), "batch_size": (int, BatchOpt),
    "num_beams": (int, BeamsOpt), "temperature": (float, TempOpt), "top_p": (float, TopPOpt),
    "seed": (Optional[int], SeedOpt), "device": (str, DeviceOpt), "devices": (Optional[str], DevicesOpt),
    "dtype": (Optional[str], DtypeOpt), "cpu_matmul": (str, CpuMatmulOpt), "cuda_graph": (bool, CudaGraphOpt),
    "limit": (Optional[int], LimitOpt), "overwrite": (bool, OverwriteOpt), "recover": (bool, RecoverOpt),
    "split": (Optional[str], SplitOpt), "image_column": (Optional[str], ImageColOpt),
    "id_column": (Optional[str], IdColOpt), "confine": (bool, ConfineOpt), "workers": (Optional[int], WorkersOpt),
    "flush_rows": (int, FlushOpt), "ray": (Optional[str], RayOpt), "ray_workers": (Optional[str], RayWorkersOpt),
    "gpus_per_worker": (Optional[float], GpusPerWorkerOpt),
    "fetch_images": (bool, FetchImagesOpt), "fetch_timeout": (float, FetchTimeoutOpt),
    "fetch_retries": (int, FetchRetriesOpt), "fetch_workers": (int, FetchWorkersOpt),
    "max_image_bytes": (int, MaxImageBytesOpt), "quiet": (bool, QuietOpt), "debug": (bool, DebugOpt),
}


def _job_command(task: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A job command from a function that declares only its own parameters (and the help): typer sees
    them followed by every flag of `_JOB_FLAGS`, and the command runs `task` from all of them."""
    def make(declared: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(declared)
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(declared).parameters.values()]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                  for name, (kind, option) in _JOB_FLAGS.items()]

        @functools.wraps(declared)
        def command(**flags) -> None:
            _run_command(task, flags)

        command.__signature__ = inspect.Signature([*own, *shared])
        command.__annotations__ = {p.name: p.annotation for p in (*own, *shared)}
        return command
    return make


def main() -> None:
    app()


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command(epilog="""Examples:\n
  vlmbatch caption ./photos --out captions.parquet\n
  vlmbatch caption ./photos --out alt.parquet --prompt "caption en" --batch-size 64\n
  vlmbatch caption my/dataset --split validation --image-column img --id-column key --out caps.parquet\n
  vlmbatch caption ./photos --lang en,es,fr,de --out alt.parquet\n
Re-running the same command resumes: over a grown folder only new images are captioned, and images
that failed or were replaced since are captioned again.""")
@_job_command("caption")
def caption(
    source: str = typer.Argument(..., help="Image folder, image file, saved/Hub dataset, or Parquet/JSONL/CSV manifest."),
    out: str = OutOpt,
    prompt: str = typer.Option(_JOB["prompt"], "--prompt", help="Prompt given with every image; with --lang, {lang} "
                               "stands for each language (default then: \"caption {lang}\")."),
    lang: Optional[str] = typer.Option(_JOB["lang"], "--lang", help="Caption languages, e.g. en,es,fr,de: one row "
                                       "per image and language (column lang), the image encoded once for all. "
                                       "A language added later captions only that language."),
    max_chars: int = typer.Option(_JOB["max_chars"], "--max-chars", help="Alt text longer than this is flagged "
                                  "too_long (column flags; 125 is the common screen-reader guideline)."),
    min_confidence: Optional[float] = typer.Option(_JOB["min_confidence"], "--min-confidence", help="Flag "
                                                   "low_confidence below this mean_logprob (natural log per token, "
                                                   "e.g. -1.5); default: no such flag."),
    score_with: Optional[str] = typer.Option(_JOB["score_with"], "--score-with", help="A SigLIP checkpoint (e.g. "
                                             f"{DEFAULT_SCORE_MODEL}) scoring each new caption against its image as "
                                             "it is written (siglip_prob, siglip_cos); see `vlmbatch score`."),
) -> None:
    """Caption every image of SOURCE into a Parquet file (columns id, caption, error, …)."""


@app.command(epilog="""Examples:\n
  vlmbatch vqa ./photos --questions questions.jsonl --out answers.parquet\n
  vlmbatch vqa ./photos --question "how many people are there?" --out counts.parquet\n
QUESTIONS is JSONL, CSV or Parquet with columns image (path relative to SOURCE, or the dataset record id),
question and optional question_id. Each image is decoded and encoded once, whatever its number of questions.""")
@_job_command("vqa")
def vqa(
    source: str = typer.Argument(..., help="Image folder, image file, saved/Hub dataset, or manifest."),
    out: str = OutOpt,
    questions: Optional[str] = typer.Option(None, "--questions", help="Questions file (JSONL, CSV or Parquet)."),
    question: Optional[str] = typer.Option(None, "--question", help="One question asked of every image."),
    prompt_template: str = typer.Option(_JOB["prompt_template"], "--prompt-template", help="Prompt; {question} is replaced."),
) -> None:
    """Answer questions about the images of SOURCE into a Parquet file (id, question_id, question, answer, error, …)."""


ObjectsOpt = typer.Option(_JOB["objects"], "--objects", help='What to find, separated by ";": "cat ; dog".')


@app.command(epilog="""Examples:\n
  vlmbatch detect ./photos --objects "cat ; dog" --out boxes.parquet\n
Each row holds the answer (text) and its objects: label, score (mean token log-probability), box in the
original image's pixels (x_min, y_min, x_max, y_max) and box_normalized (0..1); parse_errors counts the
malformed objects left out.""")
@_job_command("detect")
def detect(
    source: str = typer.Argument(..., help="Image folder, image file, saved/Hub dataset, or manifest."),
    out: str = OutOpt,
    objects: Optional[str] = ObjectsOpt,
) -> None:
    """Find objects in every image of SOURCE: boxes into a Parquet file (prompt "detect cat ; dog")."""


@app.command(epilog="""Examples:\n
  vlmbatch segment ./photos --objects cat --vae vae-oid.npz --out masks.parquet\n
As detect, and each object also has its 16 seg_codes and, with --vae, its mask as COCO RLE (size [h, w],
counts) in the original image's pixels. vae-oid.npz is big_vision's mask VAE (see the README).""")
@_job_command("segment")
def segment(
    source: str = typer.Argument(..., help="Image folder, image file, saved/Hub dataset, or manifest."),
    out: str = OutOpt,
    objects: Optional[str] = ObjectsOpt,
    vae: Optional[Path] = typer.Option(_JOB["vae"], "--vae", help="The mask VAE: vae-oid.npz, or its safetensors "
                                       "copy (convert-vae). Without it masks are null; the codes are kept."),
) -> None:
    """Segment objects in every image of SOURCE: boxes and masks into a Parquet file (prompt "segment cat")."""


@app.command("convert-vae")
def convert_vae(
    source: Path = typer.Argument(..., help="big_vision's vae-oid.npz."),
    target: Path = typer.Argument(..., help="The .safetensors file to write."),
    debug: bool = DebugOpt,
) -> None:
    """Copy the mask VAE's decoder weights from vae-oid.npz to safetensors (for `segment --vae`)."""
    from vlmbatch.detection.vae import convert_vae as convert

    with _fatal_errors(debug):
        count = convert(source, target)
        console.print(f"wrote {count} tensors to {target}", highlight=False)


@app.command(epilog="""Examples:\n
  vlmbatch score captions.parquet --source ./photos\n
  vlmbatch score alt/ --source ./photos --model google/siglip-base-patch16-224 --batch-size 32\n
Adds siglip_prob (SigLIP's match probability, sigmoid(scale * cos + bias)), siglip_cos and siglip_weights
to every caption row of OUT, in place. Resumable: a rerun scores only rows no run scored yet (new or
redone captions). Rows scored by other weights are refused unless --overwrite, which scores them again.""")
def score(
    out: str = typer.Argument(..., help="A caption output: .parquet file or Parquet dataset folder."),
    source: str = typer.Option(..., "--source", "-s", help="What OUT was captioned from: its images are read again."),
    model: str = typer.Option(DEFAULT_SCORE_MODEL, "--model", "-m", help="SigLIP checkpoint (folder or Hub id)."),
    batch_size: int = typer.Option(_SCORE["batch_size"], "--batch-size", "-b", help="Images embedded together."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Score again the rows other SigLIP weights scored."),
    fetch_images: bool = typer.Option(False, "--fetch-images/--no-fetch-images", help="Images given as URLs: read "
                                      "from the image cache the caption run filled, fetched where missing."),
    split: Optional[str] = SplitOpt, image_column: Optional[str] = ImageColOpt, id_column: Optional[str] = IdColOpt,
    confine: bool = ConfineOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    cpu_matmul: str = typer.Option(_SCORE["cpu_matmul"], "--cpu-matmul", help="float32 on a CPU: torch (MKL, the "
                                   "default: the scores of transformers to 1e-4), onednn, onednn+gelu or auto."),
    workers: Optional[int] = WorkersOpt, flush_rows: int = FlushOpt,
    quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Score each caption of OUT against its image with SigLIP, no reference captions needed."""
    with _fatal_errors(debug):
        spec = ScoreSpec(out=out, source=source, model=model, batch_size=batch_size, overwrite=overwrite,
                         fetch_images=fetch_images,
                         split=split, image_column=image_column, id_column=id_column, confine=confine,
                         device=device, dtype=dtype, cpu_matmul=cpu_matmul, workers=workers, flush_rows=flush_rows)
        from vlmbatch.scoring import ScoreJob

        job = ScoreJob(spec)
        if not quiet:
            console.print(f"[bold]score[/] {escape(spec.out)} ← {escape(job.source.description)}  (model "
                          f"{escape(spec.model)}, {job.device}, {str(job.dtype).removeprefix('torch.')})",
                          highlight=False)
        with _progress(job.source, "score", quiet) as update:
            summary = job.run(update)
        if not quiet:
            _print_score_summary(summary)


@app.command(epilog="""Examples:\n
  vlmbatch run pipelines/alt_text_nightly.toml\n
  vlmbatch run pipelines/alt_text_nightly.toml --set limit=100 --set device=cuda:1\n
A spec holds the flags of `caption` / `vqa` as TOML keys (generation settings at the top level or under \\[generation]);
--set overrides any of them, named as the flag is (max-new-tokens=48).""")
def run(
    spec_file: Path = typer.Argument(..., help="A job spec, e.g. pipelines/alt_text_nightly.toml."),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE overriding the spec (repeatable)."),
    recover: bool = RecoverOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Run a declarative job spec (scheduled alt-text jobs and the like)."""
    from vlmbatch.jobspec import load_job_spec

    with _fatal_errors(debug):
        given = _parse_overrides(overrides)
        if recover:  # the same as --set recover=true
            given["recover"] = True
        _run(_job(load_job_spec(spec_file, given)), quiet)


def _parse_overrides(pairs: list[str]) -> dict:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise VlmbatchError(f"--set expects KEY=VALUE, got {pair!r}")
        # Kept as text: the spec types each value by its key (split=2017 stays a name, overwrite=no is false).
        parsed[key.strip().replace("-", "_")] = value.strip()
    return parsed


@app.command("eval", epilog="""Examples:\n
  vlmbatch eval --dataset coco --model google/paligemma-3b-ft-cococap-224 --out scores.json  (the Hub copy, images fetched)\n
  vlmbatch eval --dataset vqav2 --split test-dev --out results.json                    (answers for the server)\n
  vlmbatch eval --dataset coco --data ./coco --split test --out scores.json             (a local copy)\n
  vlmbatch eval --dataset coco --data dataset_coco.json --predictions caps.parquet      (score only)\n
  vlmbatch eval --dataset vqav2 --data ./vqav2 --split val2014 --limit 200              (a quick check)\n
  vlmbatch eval --dataset coco --data ./coco --predictions caps.parquet --report eval.html  (+ a page)\n
  vlmbatch eval --provision-spice                                                       (fetch SPICE's CoreNLP jars)\n
Without --data, each benchmark reads: coco yerevann/coco-karpathy split test (Karpathy test, 5,000 images, fetched from their \
URLs), flickr30k umaru97/flickr30k_train_val_test split test (Karpathy test, 1,000 images), vqav2 \
lmms-lab/VQAv2 split validation (val2014, 214,354 questions); --split test-dev or test-std writes the results \
JSON for the VQA evaluation server instead of scores. Generation follows big_vision's PaliGemma transfer \
configs unless flags say otherwise: captions "caption en", 2 beams, 32 tokens; VQAv2 "answer en {question}", \
greedy, 32 tokens. Without --predictions the model runs first and its predictions are written beside the \
scores, resumably; with --predictions no model is loaded.""")
def eval_(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="coco, flickr30k or vqav2 (see below for their default data)."),
    data: Optional[str] = typer.Option(None, "--data", help="Annotation file, folder with annotations and images, saved dataset or Hub id."),
    split: Optional[str] = typer.Option(None, "--split", help="Karpathy split (default test), VQAv2 subtype such as val2014, or test-dev / test-std."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", "-p", help="Score these predictions (Parquet or results JSON) instead of generating."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Scores JSON (VQAv2 test-dev / test-std: the results JSON)."),
    per_item: Optional[Path] = typer.Option(None, "--per-item", help="Parquet with each item's scores."),
    report_html: Optional[Path] = typer.Option(None, "--report", help="An HTML page with the scores, the settings "
                                               "and the 50 worst items (by CIDEr or VQA accuracy) with their images."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated subset: bleu,meteor,rouge,cider,spice."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help='Prompt (captions) or template with {question} (VQA); default: the benchmark\'s.'),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the split's first N items (images, or VQA questions): a quick check."),
    provision_spice: bool = typer.Option(False, "--provision-spice", help="Download SPICE's Stanford CoreNLP 3.6.0 jars into the cache."),
    score_with: Optional[str] = typer.Option(None, "--score-with", help="Captions: a SigLIP checkpoint scoring each "
                                             "generated caption; the mean match probability and CLIP-S over SigLIP "
                                             "are reported beside the reference metrics (as they are for predictions "
                                             "scored by `vlmbatch score`)."),
    model: str = ModelOpt,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens generated per answer (default: the benchmark's, 32)."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="Beam search width (default: the benchmark's, 2 for captions, 1 for VQAv2)."),
    batch_size: int = BatchOpt,
    temperature: float = TempOpt, top_p: float = TopPOpt, seed: Optional[int] = SeedOpt, device: str = DeviceOpt,
    devices: Optional[str] = DevicesOpt, dtype: Optional[str] = DtypeOpt, cpu_matmul: str = CpuMatmulOpt,
    cuda_graph: bool = CudaGraphOpt, overwrite: bool = OverwriteOpt, recover: bool = RecoverOpt,
    workers: Optional[int] = WorkersOpt,
    fetch_images: Optional[bool] = typer.Option(None, "--fetch-images/--no-fetch-images", help="Fetch images given as URLs "
                                                "into the image cache (default: on without --data, off with it)."),
    fetch_timeout: float = FetchTimeoutOpt, fetch_retries: int = FetchRetriesOpt, fetch_workers: int = FetchWorkersOpt,
    max_image_bytes: int = MaxImageBytesOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Score captions (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) or VQAv2 answers (official accuracy)."""
    from vlmbatch.evaluation.metrics.spice import provision_corenlp
    from vlmbatch.evaluation.protocols import PROTOCOLS
    from vlmbatch.evaluation.run import EvalRequest, render_report, run_eval
    from vlmbatch.review.eval_report import write_eval_report
    from vlmbatch.review.page import check_writable

    with _fatal_errors(debug):
        if provision_spice:
            console.print(f"CoreNLP jars ready in {provision_corenlp()}", highlight=False)
            if dataset is None:
                return
        if dataset is None:
            raise VlmbatchError("--dataset is required: coco, flickr30k or vqav2")
        if dataset not in PROTOCOLS:
            raise VlmbatchError(f"unknown dataset {dataset!r}; choose from {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[dataset]  # what a flag left out means, for this benchmark
        prompt = protocol.prompt if prompt is None else prompt
        max_new_tokens = protocol.max_new_tokens if max_new_tokens is None else max_new_tokens
        if num_beams is None:  # sampling asked for: beams (which exclude it) are no default then
            num_beams = 1 if temperature > 0 else protocol.num_beams
        generation = _generation(max_new_tokens, num_beams, temperature, top_p, seed)
        # Built now, so that a flag out of bounds is refused before the dataset loads; generate() completes it.
        flags = JobSpec(task="caption", source=data or dataset, out=Path(), model=model, batch_size=batch_size,
                        device=device, devices=devices, dtype=dtype, cpu_matmul=cpu_matmul, cuda_graph=cuda_graph,
                        overwrite=overwrite, recover=recover, workers=workers, generation=generation,
                        fetch_images=data is None if fetch_images is None else fetch_images,
                        fetch_timeout=fetch_timeout, fetch_retries=fetch_retries, fetch_workers=fetch_workers,
                        max_image_bytes=max_image_bytes, score_with=score_with)

        def generate(task, records, questions, out_path: Path) -> Path:
            from vlmbatch.sources.records import Source

            if task != "caption" and score_with:
                raise VlmbatchError("--score-with scores captions; VQA answers are not scored")
            spec = replace(flags, task=task, out=out_path, prompt=prompt, prompt_template=prompt,
                           score_with=score_with if task == "caption" else None)
            source = Source(description=f"{dataset} {split or ''}".strip(), size=None, records=lambda: iter(records))
            _run(_job(spec, source=source, questions=questions), quiet)
            return out_path

        generating = predictions is None
        settings = {"prompt": prompt, "generation": generation.as_dict(),
                    "protocol": protocol.generation_note(prompt, num_beams, max_new_tokens)}
        request = EvalRequest(
            dataset=dataset, data=data, split=split, predictions=predictions, out=out, per_item=per_item,
            metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else None,
            model=model if generating else None, limit=limit, settings=settings if generating else {})
        if report_html is not None:
            check_writable(report_html)  # refused now, not after the model has run
        report = run_eval(request, generate if generating else None)
        render_report(report, Console())
        if report_html is not None:
            write_eval_report(report, report_html)
            if not quiet:
                console.print(f"report {report_html}", highlight=False, markup=False, soft_wrap=True)


@app.command(epilog="""Examples:\n
  vlmbatch report alt.parquet --source ./photos --html report.html\n
  vlmbatch report alt/ --source ./photos --html report.html --no-embed      (thumbnails in report_files/)\n
  vlmbatch report alt.parquet --html report.html --max-chars 100 --min-confidence -1.5\n
The page is one offline file (no network, its own script only): a summary with each flag's count and
histograms, then each image with every language's text, worst first, to filter, sort and search.""")
def report(
    out: str = typer.Argument(..., help="A job's output: a .parquet file or a Parquet dataset folder."),
    html: Path = typer.Option(..., "--html", help="The HTML page to write."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="What the job read (folder, dataset, manifest): "
                                         "its images become thumbnails, matched by id. Without it, placeholders."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Flag texts longer than this as too_long "
                                            "(re-flags every row; default: the job's flags, else 125)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="Flag rows whose mean token "
                                                   "log-prob is below this as low_confidence (re-flags every row)."),
    page_size: int = typer.Option(500, "--page-size", help="Images shown per page."),
    embed: bool = typer.Option(True, "--embed/--no-embed", help="Thumbnails inside the page (one file), or as "
                               "files in NAME_files/ beside it."),
    split: Optional[str] = SplitOpt, image_column: Optional[str] = ImageColOpt, id_column: Optional[str] = IdColOpt,
    confine: bool = ConfineOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Write an HTML page to review OUT's alt text in: thumbnails, texts, confidence and flags, worst first."""
    from vlmbatch.review.report import build_report

    with _fatal_errors(debug):
        options = {"split": split, "image_column": image_column, "id_column": id_column, "confine": confine}
        done = build_report(out, html, source=source, max_chars=max_chars, min_confidence=min_confidence,
                            page_size=page_size, embed=embed, source_options=options)
        if not quiet:
            flagged = ", ".join(f"{name} {count}" for name, count in done.flags.items() if count) or "no flags"
            console.print(f"report {done.html}: {done.rows} rows, {done.images} images "
                          f"({done.thumbnails} with thumbnails), {done.errors} errors; {flagged}",
                          highlight=False, markup=False, soft_wrap=True)
        if source is not None and done.images and not done.thumbnails:  # said even with --quiet
            console.print(f"[yellow]warning:[/] no image of {escape(source)} has an id of {escape(out)}: is it the "
                          "source the job read?", highlight=False, soft_wrap=True)


# -- helpers --------------------------------------------------------------------------------------
_GENERATION_FLAGS = ("max_new_tokens", "num_beams", "temperature", "top_p", "seed")


def _run_command(task: str, flags: dict) -> None:
    """Run `caption` / `vqa` from its flags: the generation ones become GenerationSettings, the rest
    are JobSpec fields of the same names."""
    flags = dict(flags)
    quiet, debug = flags.pop("quiet"), flags.pop("debug")
    with _fatal_errors(debug):
        generation = _generation(*(flags.pop(name) for name in _GENERATION_FLAGS))
        job = _job(JobSpec(task=task, generation=generation, **flags))
        from vlmbatch.sinks.parquet_file import skip_pyarrows_pandas_probe

        skip_pyarrows_pandas_probe()  # after the source is open: a dataset source has imported pandas itself
        _run(job, quiet)


def _generation(max_new_tokens: int, num_beams: int, temperature: float, top_p: float, seed: int | None):
    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, temperature=temperature,
                                  top_p=top_p, seed=seed)
    except ValueError as exc:
        raise VlmbatchError(str(exc)) from None


@contextmanager
def _fatal_errors(debug: bool) -> Iterator[None]:
    """A fatal mistake is one clear line and a non-zero exit; the traceback only with --debug. Ctrl-C and
    SIGTERM stop a run as cleanly: the rows written are saved and merged, and one line says so."""
    with _warnings_as_lines(), _sigterm_raises_terminated() as terminated:
        try:
            yield
        except Terminated:
            _stopped("terminated", 143)
        except KeyboardInterrupt:
            _stopped("interrupted", 130)
        except Exception as exc:
            if terminated:  # a failure the same SIGTERM caused: sent to the whole group, it stopped a worker first
                _stopped("terminated", 143)
            if debug:
                console.print_exception()
            if isinstance(exc, VlmbatchError):
                _error_line(str(exc))
                raise typer.Exit(2)
            # an unexpected failure: still one line unless debugging
            _error_line(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
            raise typer.Exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, as cron, systemd, Kubernetes and `timeout` stop a job. Raised in the main thread and, like
    Ctrl-C's KeyboardInterrupt, no Exception: it unwinds through the sink's `with`, which saves and merges."""


@contextmanager
def _sigterm_raises_terminated() -> Iterator[list[int]]:
    """While a command runs, SIGTERM raises `Terminated`; yields the SIGTERMs received. Raised once: a
    repeated SIGTERM must not cut short the merge that the first one started; nor does the first one when it
    arrives while the output is being merged anyway (the run then ends as it would have). Worker processes
    are spawned, not forked: they keep the default action and end without a word, their parent speaks."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def handler(signum: int, frame) -> None:
        received.append(signum)
        if len(received) == 1 and not _merging_output(frame):
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _merging_output(frame) -> bool:
    """Whether the main thread, stopped at `frame`, is inside a sink's `close` (merging or compacting the
    output: the one step a signal must not cut short)."""
    closes = {module.close.__code__ for module in _sink_classes()}
    while closes and frame is not None:
        if frame.f_code in closes:
            return True
        frame = frame.f_back
    return False


def _sink_classes() -> list[type]:
    """The sink classes imported so far (a run that never opened a sink imported none)."""
    found = []
    for module, name in (("vlmbatch.sinks.parquet_file", "ParquetSink"),
                         ("vlmbatch.sinks.dataset_dir", "ParquetDatasetSink")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return found


def _stopped(how: str, code: int) -> None:
    console.print(f"[yellow]{how}[/]: rows written so far are saved; run the same command to resume",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """vlmbatch's warnings (a damaged file moved aside) as one line each on stderr, even with --quiet;
    other warnings as Python shows them."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, VlmbatchWarning):
            return show(message, category, filename, lineno, file, line)
        console.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False,
                      soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", VlmbatchWarning)
        warnings.showwarning = one_line
        yield


def _error_line(message: str) -> None:
    """One line, never wrapped, whatever the terminal's width (scripts grep for it)."""
    console.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _job(spec: JobSpec, **given) -> Job:
    """The pipeline's Job for `spec`; the one place the CLI imports the pipeline, and torch with it."""
    from vlmbatch.pipeline import Job

    return Job(spec, **given)


def _run(job: Job, quiet: bool) -> Summary:
    from vlmbatch.engine.scheduler import graphs_apply

    spec = job.spec
    if not quiet:
        fast_path = {"onednn": ", oneDNN matmuls", "onednn+gelu": ", oneDNN matmuls + GELU"}.get(job.cpu_matmul, "")
        if spec.cuda_graph and graphs_apply(job.device, spec.generation):
            fast_path = ", CUDA graphs"
        console.print(f"[bold]{spec.task}[/] {job.source.description} → {spec.out}  "
                      f"(model {spec.model}, {job.device}, {str(job.dtype).removeprefix('torch.')}{fast_path})",
                      highlight=False)
        if spec.fetch_images:
            from vlmbatch.sources.fetch import default_cache_dir

            console.print(f"images given as URLs are fetched into {default_cache_dir()}", highlight=False)
    with _progress(job.source, spec.task, quiet) as update:
        summary = job.run(update)
    if not quiet:
        _print_summary(summary)
    if summary.duplicate_ids:  # images left out: said even with --quiet
        console.print(f"[yellow]warning:[/] skipped {summary.duplicate_ids} source record(s) whose id an earlier "
                      "record of this run had (the first one counts); give --id-column a column of unique ids",
                      highlight=False, soft_wrap=True)
    return summary


@contextmanager
def _progress(source, task: str, quiet: bool):
    """A progress callback for a job over `source`: a bar on a terminal, else a plain line every 10 s."""
    if quiet:
        yield None
        return
    total = source.size
    if total is None and source.count is not None:
        total = source.count()  # a folder's listing: quick beside captioning it, and it gives an ETA
    if console.is_terminal:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.1f} img/s · {task.fields[errors]} errors"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as bar:
            bar_task = bar.add_task(task, total=total, rate=0.0, errors=0)
            yield lambda s: bar.update(bar_task, completed=s.images + s.images_skipped, rate=s.images_per_second,
                                       errors=s.errors)
        return
    last = [0.0]
    latest: list[Summary] = []

    def plain(s: Summary) -> None:  # a line every 10 s when not on a terminal (logs, cron)
        latest[:] = [s]
        now = time.monotonic()
        if now - last[0] >= 10:
            last[0] = now
            print(_progress_line(task, s, total), file=sys.stderr, flush=True)

    yield plain
    if latest:  # and one as the run ends, whose counts are the summary's
        print(_progress_line(task, latest[0], total), file=sys.stderr, flush=True)


def _progress_line(task: str, s: Summary, total: int | None) -> str:
    """How far through the source (processed and skipped images), rows written, errors, rate and ETA."""
    seen = s.images + s.images_skipped
    rate = s.written / s.seconds if s.seconds else 0.0  # of rows done: images processed run ahead of them
    line = (f"{task}: {seen}{f'/{total}' if total else ''} images ({s.images} processed, {s.images_skipped} "
            f"skipped), {s.written} rows written, {s.errors} errors, {rate:.1f} rows/s")
    if total and s.images and s.seconds:  # the rest at the pace of the images processed so far
        left = round(max(total - seen, 0) * s.seconds / s.images)
        line += f", {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"
    return line


def _print_summary(summary: Summary) -> None:
    table = Table(title="vlmbatch summary", show_header=False)
    table.add_row("output", str(summary.out))
    table.add_row("rows written", str(summary.written))
    table.add_row("errors", str(summary.errors))
    table.add_row("already done (skipped)", str(summary.already_done))
    if summary.retried:
        table.add_row("retried (earlier errors)", str(summary.retried))
    if summary.replaced:
        table.add_row("redone (image replaced)", str(summary.replaced))
    if summary.duplicate_ids:
        table.add_row("duplicate ids (skipped)", str(summary.duplicate_ids))
    table.add_row("images processed", str(summary.images))
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("throughput", f"{summary.images_per_second:.2f} images/s")
    console.print(table)



def _print_score_summary(summary: ScoreSummary) -> None:
    table = Table(title="vlmbatch score", show_header=False)
    table.add_row("output", str(summary.out))
    table.add_row("rows scored", str(summary.written))
    if summary.mean_prob is not None:
        table.add_row("mean siglip_prob (this run)", f"{summary.mean_prob:.4f}")
    table.add_row("already scored (skipped)", str(summary.already_done))
    for label, count in (("error rows (no caption, not scored)", summary.unscorable),
                         ("image unreadable now (not scored)", summary.errors),
                         ("image replaced since captioned (caption again first)", summary.changed),
                         ("id not in source (not scored)", summary.missing)):
        if count:
            table.add_row(label, str(count))
    table.add_row("images read", str(summary.images))
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)


if __name__ == "__main__":
    main()
