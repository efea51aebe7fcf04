"""A job's output read for review: rows in batches (only the columns a report shows), one row per key
(the latest), grouped into one card per image and ordered worst first. A detect or segment row also
keeps its objects as the page draws them, its masks spooled (review.overlays)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlmbatch.errors import VlmbatchError
from vlmbatch.review.overlays import DrawnObject, drawn_objects
from vlmbatch.review.rules import FLAGS, MAX_CHARS, OBJECT_FLAGS, alt_text_flags, object_flags
from vlmbatch.review.spool import Spool
from vlmbatch.sinks.outputs import as_dataset

# What a report reads of an output; any may be absent (outputs written before a column was added).
_COLUMNS = ("id", "caption", "answer", "question", "question_id", "lang", "mean_logprob", "min_logprob",
            "flags", "error", "finish_reason", "siglip_prob", "siglip_cos",
            "text", "objects", "parse_errors", "width", "height")
_BATCH_ROWS = 8192
_MASK_BATCH_ROWS = 64  # a segment row carries its masks' RLE: fewer rows per batch keep batches small
_FLAG_SETS: dict[tuple[str, ...], tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class ReviewRow:
    """One caption, answer or detect / segment answer as the page shows it."""

    lang: str | None
    question: str | None
    text: str | None
    mean_logprob: float | None
    min_logprob: float | None
    flags: tuple[str, ...]
    error: str | None
    siglip: float | None
    objects: tuple[DrawnObject, ...] = ()
    parse_errors: int = 0
    size: tuple[int, int] | None = None  # detect / segment: the original image's width and height

    @property
    def rank(self) -> tuple[int, float]:
        """Worst first: errors, then flagged rows, then the lowest confidence (unknown counts as sure)."""
        tier = 0 if self.error else 1 if self.flags else 2
        return tier, self.mean_logprob if self.mean_logprob is not None else math.inf


@dataclass(slots=True)
class Card:
    """Every row of one image (its languages, its questions)."""

    id: str
    rows: list[ReviewRow] = field(default_factory=list)

    @property
    def rank(self) -> tuple[int, float, str]:
        return (*min(row.rank for row in self.rows), self.id)


@dataclass
class ReviewData:
    """An output's cards, worst first, with what the summary counts."""

    path: str
    cards: list[Card]
    task: str  # "caption", "vqa", "detect" or "segment"
    has_confidence: bool
    has_siglip: bool
    siglip_column: str | None
    languages: list[str]

    def rows(self) -> Iterator[ReviewRow]:
        for card in self.cards:
            yield from card.rows

    def flag_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OBJECT_FLAGS if self.task in ("detect", "segment") else FLAGS, 0)
        for row in self.rows():
            for flag in row.flags:
                counts[flag] = counts.get(flag, 0) + 1
        return counts


def read_output(out: str | os.PathLike, *, max_chars: int | None = None, min_confidence: float | None = None,
                masks: Spool | None = None) -> ReviewData:
    """Read OUT (a Parquet file or dataset folder). Flags come from its `flags` column, or from the rules
    where a row has none (null, or no such column) or where `max_chars` / `min_confidence` are given
    (the reviewer's own thresholds). A segment output's masks go to `masks` as PNGs (None: not drawn)."""
    dataset = _open_dataset(out)
    names = set(dataset.schema.names)
    task = _task(dataset.schema)
    text_column = {"caption": "caption", "vqa": "answer"}.get(task, "text")
    if "id" not in names or task is None:
        raise VlmbatchError(f"{out} is no vlmbatch output: it needs an id column and a caption or answer "
                            f"column (or text and objects); it has: {', '.join(sorted(names)) or 'none'}")
    if task in ("detect", "segment") and max_chars is not None:
        raise VlmbatchError(f"--max-chars is for captions and answers; {out} is a {task} output")
    recompute = "flags" not in names or max_chars is not None or min_confidence is not None
    siglip_column = next((name for name in ("siglip_prob", "siglip_cos") if name in names), None)
    latest: dict[str, dict[tuple, ReviewRow]] = {}
    # Columns an output may have and leave null (SigLIP until `vlmbatch score`; rows written before the
    # engine kept log-probs): offered for sorting only where some row has a value.
    scored = confident = False
    try:
        batches = dataset.to_batches(columns=[name for name in _COLUMNS if name in names],
                                     batch_size=_MASK_BATCH_ROWS if task == "segment" else _BATCH_ROWS)
        for batch in batches:
            for values in batch.to_pylist():
                if task in ("detect", "segment"):
                    row = _object_row(values, min_confidence, masks)
                else:
                    row = _review_row(values, text_column, siglip_column, recompute,
                                      MAX_CHARS if max_chars is None else max_chars, min_confidence)
                key = (values.get("question_id"), row.lang)
                # The latest row of a key wins, as when the sink merges (files are read in write order).
                latest.setdefault(str(values["id"]), {})[key] = row
                scored = scored or row.siglip is not None
                confident = confident or row.mean_logprob is not None
    except OSError as exc:  # pyarrow's errors for damaged files are OSError subclasses
        raise VlmbatchError(f"cannot read {out} as Parquet: {exc}") from None
    cards = sorted((Card(card_id, list(rows.values())) for card_id, rows in latest.items()), key=lambda c: c.rank)
    languages = sorted({row.lang for card in cards for row in card.rows if row.lang})
    return ReviewData(path=os.fspath(out), cards=cards, task=task,
                      has_confidence=confident, has_siglip=scored,
                      siglip_column=siglip_column if scored else None, languages=languages)


def _task(schema) -> str | None:
    """What wrote the output, from its columns: caption, vqa, detect or segment (objects with masks)."""
    names = set(schema.names)
    if "caption" in names:
        return "caption"
    if "answer" in names:
        return "vqa"
    if "text" in names and "objects" in names:
        import pyarrow as pa

        kind = schema.field("objects").type
        if not pa.types.is_list(kind) or not pa.types.is_struct(kind.value_type):
            return None
        return "segment" if kind.value_type.get_field_index("mask") >= 0 else "detect"
    return None


def _open_dataset(out: str | os.PathLike):
    """OUT as one pyarrow dataset: a file, or a folder's data files (hidden ones, as the lock, skipped)."""
    path = Path(out)
    if not path.exists():
        raise VlmbatchError(f"output not found: {out}")
    try:
        return as_dataset(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError: not Parquet
        raise VlmbatchError(f"cannot read {out} as Parquet: {' '.join(str(exc).split())}") from None


def _number(value) -> float | None:
    """A score as the page shows it: NaN and infinities (nothing JSON can carry) as unknown."""
    return float(value) if value is not None and math.isfinite(value) else None


def _review_row(values: dict, text_column: str, siglip_column: str | None, recompute: bool,
                max_chars: int, min_confidence: float | None) -> ReviewRow:
    text, error = values.get(text_column), values.get("error")
    mean_logprob = _number(values.get("mean_logprob"))
    written = values.get("flags")
    if recompute or written is None:  # null: a row written before the pipeline flagged rows
        flags = alt_text_flags(text, error=error, truncated=values.get("finish_reason") == "length",
                               mean_logprob=mean_logprob, lang=values.get("lang"), max_chars=max_chars,
                               min_confidence=min_confidence)
        if min_confidence is None and written and "low_confidence" in written and "low_confidence" not in flags:
            # --max-chars alone re-judges the length, not the job's confidence threshold
            flags = [flag for flag in FLAGS if flag in {*flags, "low_confidence"}]
    else:
        flags = [flag for flag in written if flag]
    lang = values.get("lang")
    # Few distinct languages and flag sets among many rows: share one object of each (memory per row).
    return ReviewRow(lang=sys.intern(lang) if lang else lang, question=values.get("question"), text=text,
                     mean_logprob=mean_logprob, min_logprob=_number(values.get("min_logprob")),
                     flags=_FLAG_SETS.setdefault(tuple(flags), tuple(flags)), error=error,
                     siglip=_number(values.get(siglip_column)) if siglip_column else None)


def _object_row(values: dict, min_confidence: float | None, masks: Spool | None) -> ReviewRow:
    """A detect or segment row: its own flags (rules.object_flags; such outputs write none), objects."""
    text, error = values.get("text"), values.get("error")
    mean_logprob = _number(values.get("mean_logprob"))
    parse_errors = values.get("parse_errors") or 0
    flags = object_flags(text, error=error, truncated=values.get("finish_reason") == "length",
                         mean_logprob=mean_logprob, parse_errors=parse_errors, min_confidence=min_confidence)
    width, height = values.get("width"), values.get("height")
    size = (int(width), int(height)) if width and height and width > 0 and height > 0 else None
    return ReviewRow(lang=None, question=None, text=text, mean_logprob=mean_logprob,
                     min_logprob=_number(values.get("min_logprob")),
                     flags=_FLAG_SETS.setdefault(tuple(flags), tuple(flags)), error=error, siglip=None,
                     objects=drawn_objects(values.get("objects"), masks if size else None),
                     parse_errors=int(parse_errors), size=size)
