"""`vlmbatch eval ... --report eval.html`: the scores as a table, what they cover, the generation
settings, and the worst items (by per-item CIDEr, or VQA accuracy) each with its image, prediction and
references, on one self-contained page (no script at all: it is read, not filtered)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlmbatch.evaluation.captions_data import CaptionSet
from vlmbatch.evaluation.run import EvalReport
from vlmbatch.review.page import check_writable, write_page
from vlmbatch.review.thumbnails import Thumbnails, collect_thumbnails

WORST_ITEMS = 50
# The per-item score the worst items are ranked by, best first where several were computed.
_CAPTION_RANKING = ("CIDEr", "SPICE", "Bleu_4", "METEOR", "ROUGE_L", "Bleu_1")
_CAPTION_SHOWN = (*_CAPTION_RANKING, "siglip_prob", "clip_s_siglip")  # reference-free, where the rows had them


def write_eval_report(report: EvalReport, html: str | Path, *, worst: int = WORST_ITEMS) -> Path:
    """Write the page of `report` (as `run_eval` returns it) to `html`."""
    html = Path(html)
    check_writable(html)
    items, metric = (_caption_items(report) if report.task == "caption" else _vqa_items(report))
    items = items[:worst]
    with Thumbnails(None) as thumbs:
        if report.benchmark is not None and items:
            images = {item["image_id"]: number for number, item in enumerate(items)}
            collect_thumbnails(report.benchmark.records(), images, thumbs)
            for item in items:
                item["thumbnail"] = thumbs.url(images[item["image_id"]])
        write_page(html, "eval.html.j2", title=f"{report.dataset} {report.split}: scores",
                   subtitle=f"{report.covered:,} of {report.total:,} "
                            f"{'images' if report.task == 'caption' else 'questions'} scored, "
                            f"predictions from {report.predictions}",
                   scores=_score_rows(report), notes=_notes(report), settings=_settings(report),
                   items=items, metric=metric, task=report.task)
    return html


def _notes(report: EvalReport) -> list[str]:
    if report.results_json is not None:
        return [f"This split has no public answers: {report.covered:,} answers went to {report.results_json}, "
                "the results JSON for the evaluation server.", *report.notes()]
    return report.notes()


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _score_rows(report: EvalReport) -> list[tuple[str, str]]:
    if not report.scores:  # a split without public answers: its results JSON went to the server
        return []
    if report.task == "caption":
        return [(name, _number(value)) for name, value in report.scores.items()]
    rows = [("overall (VQA accuracy, %)", _number(report.scores["overall"], 2))]
    rows += [(f"answer type: {kind}", _number(value, 2)) for kind, value in report.scores["perAnswerType"].items()]
    return rows


def _settings(report: EvalReport) -> list[tuple[str, str]]:
    """The model and generation settings, one (name, value) per leaf."""
    found = [("model", report.model or "(predictions given: no model run)")]

    def walk(values: dict, prefix: str) -> None:
        for name, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            elif value is not None:
                found.append((prefix + name, str(value)))

    walk(report.settings, "")
    return found


def _caption_items(report: EvalReport) -> tuple[list[dict], str]:
    rows = report.per_item
    metric = next((name for name in _CAPTION_RANKING if name in rows), "")
    references = report.benchmark.references() if isinstance(report.benchmark, CaptionSet) else {}
    items = [{"id": image_id, "image_id": image_id, "question": None, "prediction": rows["prediction"][n],
              "references": references.get(image_id, []),
              "scores": [(name, _number(rows[name][n])) for name in _CAPTION_SHOWN if name in rows],
              "rank": rows[metric][n] if metric else 0.0, "thumbnail": None}
             for n, image_id in enumerate(rows.get("image_id", []))]
    return sorted(items, key=lambda item: (item["rank"], item["id"])), metric


def _vqa_items(report: EvalReport) -> tuple[list[dict], str]:
    rows = report.per_item
    questions = {item.question_id: item for item in report.benchmark.items} if report.benchmark else {}
    items = []
    for n, question_id in enumerate(rows.get("question_id", [])):
        item = questions.get(question_id)
        items.append({"id": question_id, "image_id": item.image_id if item else "",
                      "question": item.question if item else "", "prediction": rows["answer"][n],
                      "references": list(item.answers) if item else [],
                      "scores": [("accuracy", _number(rows["accuracy"][n], 2)),
                                 ("answer type", rows["answer_type"][n])],
                      "rank": rows["accuracy"][n], "thumbnail": None})
    return sorted(items, key=lambda item: (item["rank"], item["id"])), "accuracy"
