"""Model predictions to score: the Parquet `vlmbatch caption` / `vqa` write, or the official results JSON,
matched to a benchmark's items by id."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.benchmarks import as_id, first_column, read_json
from vlmbatch.evaluation.captions_data import CaptionSet
from vlmbatch.evaluation.vqa_data import VqaSet
from vlmbatch.sinks.outputs import as_dataset


@dataclass
class Predictions:
    """Model outputs keyed by image id (captions) or question id (VQA), with what was left out and why.

    `failed`: rows with `error` set or no text; `unmatched`: rows whose id names no item of the set;
    `duplicates`: further rows for an id already seen (the first one counts).
    """

    texts: dict[str, str]
    failed: int = 0
    unmatched: int = 0
    duplicates: int = 0
    siglip: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (siglip_prob, siglip_cos)

    def only(self, ids: Iterable[str]) -> "Predictions":
        """The texts for these ids alone (the items a --limit run scores); the counts stay the file's."""
        keep = set(ids)
        return replace(self, texts={key: text for key, text in self.texts.items() if key in keep},
                       siglip={key: score for key, score in self.siglip.items() if key in keep})


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions file: Parquet, a JSON list of objects (official results format), or JSON lines."""
    if path.is_dir():  # a Parquet dataset folder, as a job's folder output (its hidden files are skipped)
        return _read_parquet(path)
    if not path.is_file():
        raise VlmbatchError(f"predictions file not found: {path}")
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    rows = read_json(path)
    if not isinstance(rows, list):
        raise VlmbatchError(f"{path} must hold a JSON list of results, like the official results format")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return as_dataset(path).to_table().to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise VlmbatchError(f"cannot read {path} as Parquet: {exc}") from None


def _pick_columns(rows: list[dict[str, Any]], path: Path, ids: Sequence[str], texts: Sequence[str]) -> tuple[str, str]:
    columns = list(rows[0]) if rows else []
    id_column, text_column = first_column(columns, ids), first_column(columns, texts)
    if id_column is None or text_column is None:
        raise VlmbatchError(f"{path} needs an id column ({' or '.join(ids)}) and a text column "
                            f"({' or '.join(texts)}); it has: {', '.join(sorted(columns)) or 'no rows'}")
    return id_column, text_column


def _collect(rows: list[dict[str, Any]], id_column: str, text_column: str,
             resolve: Callable[[str], str | None]) -> Predictions:
    """Predictions from rows, skipping failed rows and counting unmatched ids and duplicates."""
    result = Predictions(texts={})
    for row in rows:
        text = row.get(text_column)
        if row.get("error") or text is None:
            result.failed += 1
            continue
        key = resolve(as_id(row[id_column]))
        if key is None:
            result.unmatched += 1
        elif key in result.texts:
            result.duplicates += 1
        else:
            result.texts[key] = str(text)
            if row.get("siglip_prob") is not None:  # scored by `vlmbatch score` or `--score-with`
                result.siglip[key] = (float(row["siglip_prob"]), float(row["siglip_cos"]))
    return result


def _caption_id_resolver(caption_set: CaptionSet) -> Callable[[str], str | None]:
    """Maps a predictions row id to an image id: the image id itself, else the image's relative path, bare
    file name or stem (what `vlmbatch caption` writes for a folder, depending on the folder it was run on),
    else another id the source gave the image."""
    lookup: dict[str, str] = {}
    for item in caption_set.items:
        name = PurePosixPath(item.file_name)
        for key in (*item.aliases, name.stem, name.name, item.file_name):
            if key:
                lookup.setdefault(key, item.image_id)
    lookup.update({item.image_id: item.image_id for item in caption_set.items})  # image ids win

    def resolve(row_id: str) -> str | None:
        row_id = row_id.replace(os.sep, "/")
        return lookup.get(row_id) or lookup.get(PurePosixPath(row_id).name)

    return resolve


def load_caption_predictions(path: str | os.PathLike, caption_set: CaptionSet) -> Predictions:
    """Captions keyed by the set's image ids, from Parquet or JSON with `image_id` (or `id`) and `caption`.

    Reads the official results JSON (`[{"image_id", "caption"}]`) and the Parquet `vlmbatch caption` writes
    (`id`, `caption`, `error`), whose `id` may be an image path relative to the folder it ran on.
    """
    path = Path(path)
    rows = _read_rows(path)
    id_column, text_column = _pick_columns(rows, path, ("image_id", "id"), ("caption", "text", "prediction"))
    return _collect(_english(rows, path), id_column, text_column, _caption_id_resolver(caption_set))


def _english(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The rows to score against the benchmarks' English references: those of a `--lang` output whose
    `lang` is English (or unset); every row of an output without languages."""
    languages = {row.get("lang") for row in rows} - {None}
    if not languages:
        return rows
    english = [row for row in rows if row.get("lang") in (None, "en") or str(row.get("lang")).startswith("en-")]
    if not english:
        raise VlmbatchError(f"{path} holds captions in {', '.join(sorted(languages))} only; the references are "
                            "English: caption with --lang en (or include en) to score")
    return english


def load_vqa_predictions(path: str | os.PathLike, vqa_set: VqaSet | None = None) -> Predictions:
    """Answers keyed by question id, from Parquet or JSON with `question_id` and `answer` (plus `error`).

    With `vqa_set`, answers to questions not in it are counted as unmatched and dropped.
    """
    path = Path(path)
    rows = _read_rows(path)
    id_column, text_column = _pick_columns(rows, path, ("question_id",), ("answer", "prediction", "text"))
    known = {item.question_id for item in vqa_set.items} if vqa_set is not None else None
    return _collect(rows, id_column, text_column,
                    lambda question_id: question_id if known is None or question_id in known else None)
