"""VQA question files: which question to ask about which image.

A question file is JSONL, CSV or Parquet with columns `image` (the record id, or the image's path
relative to the source), `question`, and optionally `question_id`. Question ids key the output rows, so
they must be unique; when absent, a row's position in the file is used, which stays stable as the
file grows at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vlmbatch.errors import VlmbatchError
from vlmbatch.sources.records import Question, normalize_image_key

REQUIRED_COLUMNS = ("image", "question")
QUESTION_FILE_EXTENSIONS = (".jsonl", ".csv", ".parquet")
# Read as text so ids such as "007" and image names such as "1.0" survive as written.
_CSV_TEXT_COLUMNS = {name: pa.string() for name in ("image", "question", "question_id")}


def load_questions(path: str | Path) -> list[Question]:
    """Read every question in `path`, validated; raises `VlmbatchError` for any problem with the file."""
    path = Path(path)
    rows = _read_rows(path)
    questions = [_question(path, index, row) for index, row in enumerate(rows)]
    if not questions:
        raise VlmbatchError(f"questions file {path} is empty")
    _check_unique_ids(path, questions)
    return questions


def group_by_image(questions: Iterable[Question]) -> dict[str, list[Question]]:
    """Questions per image, images in order of first appearance, questions in file order."""
    groups: dict[str, list[Question]] = {}
    for question in questions:
        groups.setdefault(question.image, []).append(question)
    return groups


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in QUESTION_FILE_EXTENSIONS:
        raise VlmbatchError(
            f"unsupported questions file {path}: expected {', '.join(QUESTION_FILE_EXTENSIONS)}"
        )
    try:
        if path.stat().st_size == 0:
            raise VlmbatchError(f"questions file {path} is empty")
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            options = pa_csv.ConvertOptions(column_types=_CSV_TEXT_COLUMNS)
            return pa_csv.read_csv(path, convert_options=options).to_pylist()
        return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        os_reason = exc.strerror if isinstance(exc, OSError) else None
        reason = os_reason or str(exc).strip().splitlines()[0]
        raise VlmbatchError(f"cannot read questions file {path}: {reason}") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped and do not count as rows."""
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                where = f"questions file {path}, line {line_number}"
                raise VlmbatchError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise VlmbatchError(f"questions file {path}, line {line_number}: expected a JSON object")
            rows.append(row)
    return rows


def _question(path: Path, index: int, row: Mapping[str, Any]) -> Question:
    """Validate one row (0-based `index`; messages count rows from 1) and build its `Question`."""
    for column in REQUIRED_COLUMNS:
        if column not in row:
            raise VlmbatchError(
                f"questions file {path}, row {index + 1}: missing {column!r} "
                f"(required columns: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(map(str, row))})"
            )
        value = row[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise VlmbatchError(f"questions file {path}, row {index + 1}: {column!r} is empty")
    image = row["image"]
    if not isinstance(image, (str, int)) or isinstance(image, bool):
        raise VlmbatchError(f"questions file {path}, row {index + 1}: 'image' must be a path or an id")
    question_id = row.get("question_id")
    return Question(
        image=normalize_image_key(str(image)),
        question=str(row["question"]),
        question_id=str(index) if question_id is None else str(question_id),
    )


def _check_unique_ids(path: Path, questions: list[Question]) -> None:
    first_row: dict[str, int] = {}
    for index, question in enumerate(questions):
        if question.question_id in first_row:
            raise VlmbatchError(
                f"questions file {path}: duplicate question_id {question.question_id!r} "
                f"(rows {first_row[question.question_id] + 1} and {index + 1})"
            )
        first_row[question.question_id] = index
