"""`vlmbatch report`: a job's output as one self-contained HTML page to review alt text in: a summary
(counts, flags, histograms), then every image's card with its thumbnail and each row's text,
confidence and flags, worst first, filtered, sorted, searched and paged in the page itself. For a
detect or segment output, each thumbnail carries an SVG overlay of its boxes, labels and masks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlmbatch.errors import VlmbatchError
from vlmbatch.review.charts import histogram
from vlmbatch.review.outputs import Card, ReviewData, read_output
from vlmbatch.review.page import check_writable, json_chunks, write_page
from vlmbatch.review.rules import MAX_CHARS
from vlmbatch.review.spool import Spool
from vlmbatch.review.thumbnails import Thumbnails, collect_thumbnails
from vlmbatch.sources.records import ImageRecord

DEFAULT_PAGE_SIZE = 500


@dataclass
class ReportSummary:
    """What a report holds, for the command's closing line."""

    html: Path
    rows: int
    images: int
    errors: int
    thumbnails: int
    flags: dict[str, int]


def files_folder(html: Path) -> Path:
    """Where thumbnails go when not embedded: `report_files/` beside `report.html`."""
    return html.with_name(f"{html.stem}_files")


def build_report(out: str | os.PathLike, html: str | os.PathLike, *, source: str | None = None,
                 max_chars: int | None = None, min_confidence: float | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, embed: bool = True,
                 source_options: dict | None = None) -> ReportSummary:
    """Write the review page of output `out` to `html`; see the module docstring. `source` is what the
    job read (its images become thumbnails, matched by id), opened with the job's `source_options`
    (`split`, `image_column`, `id_column`, as `open_source` takes them); `max_chars` / `min_confidence` re-flag the
    rows with the reviewer's thresholds instead of the `flags` the job wrote."""
    if page_size < 1:
        raise VlmbatchError(f"--page-size must be at least 1, not {page_size}")
    if max_chars is not None and max_chars < 1:
        raise VlmbatchError(f"--max-chars must be at least 1, not {max_chars}")
    html = Path(html)
    check_writable(html)
    # Lazy: a wrong --source is said before any work.
    records = _open(source, source_options) if source is not None else None
    with Spool() as masks:
        data = read_output(out, max_chars=max_chars, min_confidence=min_confidence, masks=masks)
        with Thumbnails(None if embed else files_folder(html)) as thumbs:
            if records is not None:
                collect_thumbnails(records, {card.id: number for number, card in enumerate(data.cards)}, thumbs)
            summary = _summary(data, thumbs.count, max_chars, min_confidence)
            meta = {"pageSize": page_size, "hasConfidence": data.has_confidence, "hasSiglip": data.has_siglip,
                    "siglipColumn": data.siglip_column}
            write_page(html, "report.html.j2", script="report.js", files=not embed,
                       title=f"Review of {Path(data.path).name}", subtitle=_subtitle(data, source),
                       summary=summary, meta=meta, cards=json_chunks(_card_items(data.cards, thumbs, masks)))
    return ReportSummary(html=html, rows=summary["rows"], images=summary["images"], errors=summary["errors"],
                         thumbnails=thumbs.count, flags=summary["flags"])


def _open(source: str, options: dict | None) -> Iterator[ImageRecord]:
    """The records of --source, opened as a job opens its SOURCE (so ids match the rows')."""
    from vlmbatch.sources.open import open_source

    try:
        return iter(open_source(source, **(options or {})))
    except VlmbatchError as exc:
        raise VlmbatchError(f"--source: {exc}") from None


def _card_items(cards: list[Card], thumbs: Thumbnails, masks: Spool) -> Iterator[dict]:
    for number, card in enumerate(cards):
        item = {"id": card.id, "t": thumbs.url(number),
                "r": [[row.lang, row.question, row.text, row.mean_logprob, row.min_logprob, list(row.flags),
                       row.error, row.siglip] for row in card.rows]}
        drawn = next((row for row in card.rows if row.size), None)  # detect / segment: one row per image
        if drawn is not None:
            # "s": the original size (the overlay's viewBox), "o": [label, score, box as fractions, mask].
            item["s"] = list(drawn.size)
            item["o"] = [[o.label, o.score, [round(v, 5) for v in o.box],
                          None if o.mask is None else masks.data_uri(o.mask, "image/png")] for o in drawn.objects]
            item["pe"] = drawn.parse_errors
        yield item


def _subtitle(data: ReviewData, source: str | None) -> str:
    kind = {"caption": "captions", "vqa": "answers", "detect": "detections", "segment": "segmentations"}[data.task]
    return f"{kind} from {data.path}" + (f", images from {source}" if source else ", no --source: no images")


def _summary(data: ReviewData, thumbnails: int, max_chars: int | None, min_confidence: float | None) -> dict:
    objects = data.task in ("detect", "segment")
    if objects:
        lengths = [float(len(row.objects)) for row in data.rows() if not row.error]
    else:
        lengths = [float(len(row.text.strip())) for row in data.rows() if row.text is not None and not row.error]
    confidences = [row.mean_logprob for row in data.rows() if row.mean_logprob is not None]
    rows = sum(len(card.rows) for card in data.cards)
    if max_chars is None and min_confidence is None:
        settings = "flags as the job wrote them (or, where it wrote none, by the default rules)"
    else:
        settings = (f"flags recomputed: too_long over {max_chars or MAX_CHARS} characters"
                    + (f", low_confidence under a mean log-prob of {min_confidence}" if min_confidence is not None
                       else ""))
    return {"rows": rows, "images": len(data.cards), "errors": sum(1 for row in data.rows() if row.error),
            "thumbnails": thumbnails, "flags": data.flag_counts(), "languages": data.languages,
            "has_confidence": data.has_confidence, "has_siglip": data.has_siglip,
            "siglip_column": data.siglip_column, "settings": settings,
            "objects": sum(len(row.objects) for row in data.rows()) if objects else None,
            "lengths": histogram("objects per image" if objects else "text length (characters)", lengths),
            "confidence": histogram("confidence (mean log-prob per token)", confidences, digits=2)}
