"""`vlmbatch eval`: score a model on COCO / Flickr30K captioning or VQAv2, the way papers report them.

One pass: load the benchmark split, take the model's predictions from a file (or have the pipeline
generate them), score them with the reference-exact metrics, then write the scores JSON and per-item
Parquet and say plainly what the numbers cover -- a partial run or a skipped SPICE is never silent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Literal, Protocol

from rich.console import Console
from rich.table import Table

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.benchmarks import CAPTION_DATASETS, VQA_DATASETS
from vlmbatch.evaluation.captions_data import CaptionSet, load_caption_set
from vlmbatch.evaluation.metrics.captions import (
    CAPTION_METRICS,
    CaptionScores,
    score_captions,
)
from vlmbatch.evaluation.metrics.spice import SpiceRunner
from vlmbatch.evaluation.metrics.vqa import VqaScores, score_vqa
from vlmbatch.evaluation.predictions import (
    Predictions,
    load_caption_predictions,
    load_vqa_predictions,
)
from vlmbatch.evaluation.protocols import SERVER_SPLITS, server_results_name
from vlmbatch.evaluation.vqa_data import VqaSet, load_vqa_set
from vlmbatch.evaluation.vqa_server import results_entries, results_text
from vlmbatch.sinks.atomic import output_errors, write_atomically
from vlmbatch.sources.records import ImageRecord, Question

Task = Literal["caption", "vqa"]
DATASETS = (*CAPTION_DATASETS, *VQA_DATASETS)

# Spellings accepted for --metrics, folded to the scorer families of `score_captions`.
_METRIC_ALIASES = {
    "bleu": "Bleu", "bleu_1": "Bleu", "bleu_2": "Bleu", "bleu_3": "Bleu", "bleu_4": "Bleu",
    "meteor": "METEOR", "rouge": "ROUGE_L", "rouge_l": "ROUGE_L", "rouge-l": "ROUGE_L",
    "cider": "CIDEr", "spice": "SPICE",
}


class GenerateFn(Protocol):
    """Runs the model over a benchmark and writes its predictions; supplied by the pipeline.

    `task` "caption": one caption per record; "vqa": one answer per question, `questions[i].image` being
    the id of the record it asks about. Records have id = image id and image = path or bytes. Writes a
    Parquet at `out_path` (`id`/`caption`/`error` for captions, `question_id`/`answer`/`error` for VQA)
    and returns its path.
    """

    def __call__(self, task: Task, records: Iterable[ImageRecord], questions: list[Question] | None,
                 out_path: Path) -> Path: ...


@dataclass
class EvalRequest:
    """What to evaluate and where results go. `predictions=None` means: generate them."""

    dataset: str
    data: str | None = None
    split: str | None = None
    predictions: Path | None = None
    out: Path | None = None
    per_item: Path | None = None
    metrics: list[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    limit: int | None = None  # score only the split's first `limit` items: a quick check


@dataclass
class EvalReport:
    """Scores with what they cover. `scores` is keyed as the reference tools key them: pycocoevalcap's
    names for captions (Bleu_1 ... SPICE), the official VQA names (overall, perAnswerType, perQuestionType)."""

    dataset: str
    task: Task
    split: str
    source: str
    scores: dict[str, Any]
    covered: int
    total: int
    predictions: str
    failed: int = 0
    unmatched: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    split_total: int | None = None  # items in the whole split, when --limit scored fewer
    results_json: str | None = None  # a split without public answers: the results JSON for the server, no scores
    # What the HTML report (vlmbatch.review.eval_report) shows beside the scores: each item's scores, as
    # --per-item writes them, and the benchmark the items come from (references, questions, images).
    per_item: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    benchmark: CaptionSet | VqaSet | None = field(default=None, repr=False)

    @property
    def partial(self) -> bool:
        return self.covered < self.total

    def notes(self) -> list[str]:
        """One line per thing a reader must know to interpret the scores (limit, partial coverage,
        skipped metrics)."""
        lines = []
        unit = "images" if self.task == "caption" else "questions"
        if self.split_total is not None:
            lines.append(f"Limited to the first {self.total:,} of the split's {self.split_total:,} {unit} "
                         "(--limit): a quick check, not comparable with full-split results.")
        if self.partial:
            why = f" ({self.failed} prediction rows failed)" if self.failed else ""
            lines.append(f"Partial coverage: scored {self.covered:,} of {self.total:,} {unit} "
                         f"({100 * self.covered / self.total:.1f}%); {self.total - self.covered:,} have no "
                         f"usable prediction{why}, so these scores are not comparable with full-split results.")
        if self.unmatched:
            lines.append(f"{self.unmatched:,} prediction rows match no item of {self.dataset} {self.split} "
                         "and were ignored.")
        lines.extend(reason if reason.startswith(metric) else f"{metric} skipped: {reason}"
                     for metric, reason in self.skipped.items())
        return lines

    def to_json(self) -> dict[str, Any]:
        """The scores JSON written by --out."""
        data: dict[str, Any] = {**self.scores, "dataset": self.dataset, "split": self.split, "task": self.task,
                                "source": self.source, "n_items": self.covered, "covered": self.covered,
                                "total": self.total, "predictions": self.predictions}
        if self.split_total is not None:
            data.update(limit=self.total, split_total=self.split_total)
        if self.failed or self.unmatched:
            data.update(failed_predictions=self.failed, unmatched_predictions=self.unmatched)
        if self.skipped:
            data["skipped"] = self.skipped
        if self.model:
            data["model"] = self.model
        if self.settings:
            data["settings"] = self.settings
        return data


# --- Steps --------------------------------------------------------------------------------------------


def _task(dataset: str) -> Task:
    if dataset in CAPTION_DATASETS:
        return "caption"
    if dataset in VQA_DATASETS:
        return "vqa"
    raise VlmbatchError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def caption_metric_families(names: Iterable[str] | None) -> tuple[str, ...]:
    """--metrics values (any case, "bleu_4", "rouge-l", ...) as `score_captions` families, in report order."""
    if names is None:
        return CAPTION_METRICS
    families = set()
    for name in names:
        family = _METRIC_ALIASES.get(name.strip().lower())
        if family is None:
            raise VlmbatchError(f"unknown caption metric {name!r}; choose from {', '.join(CAPTION_METRICS)}")
        families.add(family)
    return tuple(name for name in CAPTION_METRICS if name in families)


def default_predictions_path(request: EvalRequest, split: str) -> Path:
    """Where generated predictions go: beside the scores (<out stem>.predictions.parquet), else the cwd."""
    if request.out is not None:
        return request.out.with_name(f"{request.out.stem}.predictions.parquet")
    return Path(f"{request.dataset}-{split}.predictions.parquet")


def _predictions_file(request: EvalRequest, task: Task, bench: CaptionSet | VqaSet,
                      generate: GenerateFn | None) -> Path:
    """The given predictions file, or the one `generate` writes for this benchmark."""
    if request.predictions is not None:
        return Path(request.predictions)
    if generate is None:
        raise VlmbatchError("no --predictions file given, and no model to generate them with")
    if not bench.has_images():
        raise VlmbatchError(f"{bench.source} holds no images to run a model on; pass --data with the images "
                            "(e.g. a folder with the annotation JSON and the image files) or --predictions")
    questions = bench.questions() if isinstance(bench, VqaSet) else None
    return Path(generate(task, bench.records(), questions, default_predictions_path(request, bench.split)))


def _check_coverage(predictions: Predictions, path: Path, bench: CaptionSet | VqaSet) -> None:
    if not predictions.texts:
        counts = f"{predictions.failed} failed, {predictions.unmatched} unmatched"
        raise VlmbatchError(f"no usable prediction in {path} for {bench.dataset} {bench.split} ({counts}); "
                            "is it the right file for this dataset and split?")


def _score_caption_set(bench: CaptionSet, predictions: Predictions, metrics: tuple[str, ...],
                       spice: SpiceRunner | None) -> CaptionScores:
    references = bench.references()
    ordered = {image_id: predictions.texts[image_id] for image_id in references if image_id in predictions.texts}
    return score_captions(references, ordered, metrics=metrics, spice=spice)


def _caption_rows(scores: CaptionScores, predictions: Predictions) -> dict[str, list[Any]]:
    return {"image_id": scores.image_ids,
            "prediction": [predictions.texts[image_id] for image_id in scores.image_ids],
            **scores.per_item}


def siglip_scores(predictions: Predictions, image_ids: list[str], rows: dict[str, list[Any]],
                  skipped: dict[str, str]) -> dict[str, float]:
    """The reference-free scores beside the reference metrics, where the predictions carry SigLIP's: the
    mean match probability, and CLIPScore's form over SigLIP's cosine, 2.5 · max(cos, 0) (Hessel et
    al., 2021), named as such: it is not CLIP's own CLIP-S. Per item too, in `rows`."""
    if not predictions.siglip:
        return {}
    pairs = [predictions.siglip.get(image_id) for image_id in image_ids]
    rows["siglip_prob"] = [pair and pair[0] for pair in pairs]
    rows["clip_s_siglip"] = [pair and 2.5 * max(pair[1], 0.0) for pair in pairs]
    scored = [pair for pair in pairs if pair is not None]
    if len(scored) < len(pairs):
        skipped["SigLIP"] = (f"SigLIP scores cover {len(scored):,} of {len(pairs):,} scored images: run "
                             "`vlmbatch score` on the predictions for the rest")
    return {"SigLIP_prob": sum(p for p, _ in scored) / len(scored),
            "CLIP-S_SigLIP": sum(2.5 * max(c, 0.0) for _, c in scored) / len(scored)}


def _vqa_rows(scores: VqaScores, bench: VqaSet) -> dict[str, list[Any]]:
    by_id = {item.question_id: item for item in bench.items}
    items = [by_id[question_id] for question_id in scores.question_ids]
    return {"question_id": scores.question_ids, "answer": scores.predictions, "accuracy": scores.accuracies,
            "answer_type": [item.answer_type for item in items],
            "question_type": [item.question_type for item in items]}


def write_scores_json(path: Path, report: EvalReport) -> None:
    text = json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=True) + "\n"
    _write_report(path, lambda file: file.write(text.encode("utf-8")))


def write_per_item(path: Path, columns: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_report(path, lambda file: pq.write_table(pa.table(columns), file))


def _write_report(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write)


# --- Entry points -------------------------------------------------------------------------------------


def run_eval(request: EvalRequest, generate: GenerateFn | None = None, *,
             spice: SpiceRunner | None = None) -> EvalReport:
    """Evaluate as `request` says; see the module docstring. Raises VlmbatchError on user mistakes."""
    task = _task(request.dataset)
    metrics = caption_metric_families(request.metrics) if task == "caption" else ()
    if request.limit is not None and request.limit < 1:
        raise VlmbatchError(f"--limit must be at least 1, not {request.limit}")
    split: CaptionSet | VqaSet = (load_caption_set(request.dataset, request.data, request.split)
                                  if task == "caption" else load_vqa_set(request.data, request.split))
    limited = request.limit is not None and request.limit < len(split.items)
    bench = split.head(request.limit) if limited else split
    path = _predictions_file(request, task, bench, generate)
    if isinstance(bench, VqaSet) and not bench.answered:
        return _server_results(request, bench, path, len(split.items) if limited else None)
    # Read against the whole split, so that a file's predictions beyond the limit are not "unmatched".
    predictions = (load_caption_predictions(path, split) if isinstance(split, CaptionSet)
                   else load_vqa_predictions(path, split))
    if limited:
        predictions = predictions.only(item.image_id if task == "caption" else item.question_id
                                       for item in bench.items)
    _check_coverage(predictions, path, bench)

    if isinstance(bench, CaptionSet):
        caption_scores = _score_caption_set(bench, predictions, metrics, spice)
        scores: dict[str, Any] = dict(caption_scores.corpus)
        rows, skipped, timings = (_caption_rows(caption_scores, predictions), caption_scores.skipped,
                                  caption_scores.timings)
        scores.update(siglip_scores(predictions, caption_scores.image_ids, rows, skipped))
    else:
        vqa_scores = score_vqa(bench.items, predictions.texts)
        scores, rows, skipped, timings = vqa_scores.to_dict(), _vqa_rows(vqa_scores, bench), {}, {}

    report = EvalReport(
        dataset=request.dataset, task=task, split=bench.split, source=bench.source, scores=scores,
        covered=len(predictions.texts), total=len(bench.items), predictions=str(path),
        failed=predictions.failed, unmatched=predictions.unmatched, skipped=skipped,
        model=request.model, settings=dict(request.settings), timings=timings,
        split_total=len(split.items) if limited else None, per_item=rows, benchmark=bench)
    if request.out is not None:
        write_scores_json(request.out, report)
    if request.per_item is not None:
        write_per_item(request.per_item, rows)
    return report


def _server_results(request: EvalRequest, bench: VqaSet, predictions: Path, split_total: int | None) -> EvalReport:
    """No scores: the answers as the evaluation server's results JSON, at --out or under the name it expects."""
    entries, answered = results_entries(bench, predictions)
    out = request.out or Path(server_results_name(SERVER_SPLITS[bench.split]))
    _write_report(out, lambda file: file.write(results_text(entries).encode("utf-8")))
    return EvalReport(dataset=request.dataset, task="vqa", split=bench.split, source=bench.source, scores={},
                      covered=answered, total=len(entries), predictions=str(predictions), model=request.model,
                      settings=dict(request.settings), split_total=split_total, results_json=str(out))


def _format(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def render_report(report: EvalReport, console: Console, *, question_types: bool = False) -> None:
    """Print the scores as a table, then the settings and the notes (partial coverage, skipped metrics)
    one line each; for a split without public answers, where its results JSON went instead."""
    if report.results_json is not None:
        console.print(f"VQAv2 {report.split} has no public answers, so nothing is scored here: wrote "
                      f"{report.covered:,} of {report.total:,} answers to {report.results_json}, the results JSON "
                      "for the VQA evaluation server (EvalAI).", markup=False, highlight=False)
        _print_notes(report, console)
        return
    title = (f"{report.dataset} {report.split} — {report.covered:,} of {report.total:,} "
             f"{'images' if report.task == 'caption' else 'questions'}")
    table = Table(title=title, min_width=len(title))
    table.add_column("metric")
    table.add_column("score", justify="right")
    if report.task == "caption":
        for name, value in report.scores.items():
            table.add_row(name, _format(value))
    else:
        table.add_row("overall (VQA accuracy, %)", f"{report.scores['overall']:.2f}")
        for kind, value in report.scores["perAnswerType"].items():
            table.add_row(f"  answer type: {kind}", f"{value:.2f}")
        if question_types:
            for kind, value in sorted(report.scores["perQuestionType"].items()):
                table.add_row(f"  question type: {kind}", f"{value:.2f}")
    console.print(table)
    _print_notes(report, console)


def _print_notes(report: EvalReport, console: Console) -> None:
    if report.settings.get("protocol"):
        console.print(f"Settings: {report.settings['protocol']}.", markup=False, highlight=False)
    for line in report.notes():
        console.print(line, style="yellow", markup=False, highlight=False)
