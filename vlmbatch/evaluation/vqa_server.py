"""VQAv2 test-dev / test-std: no public answers, so the model's answers become the results JSON the
official evaluation server (EvalAI) takes, `[{"question_id": int, "answer": str}, ...]`, one entry per
question of the split; a question whose row failed gets an empty answer, and the report counts them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlmbatch.evaluation.predictions import load_vqa_predictions
from vlmbatch.evaluation.vqa_data import VqaSet


@dataclass(frozen=True)
class ServerResults:
    path: Path
    answered: int  # questions with a model answer
    total: int  # questions in the split (each has an entry)


def results_entries(bench: VqaSet, predictions: Path) -> tuple[list[dict], int]:
    """The results JSON's entries in the split's question order, and how many have a model answer."""
    texts = load_vqa_predictions(predictions, bench).texts
    entries = [{"question_id": _server_id(item.question_id), "answer": texts.get(item.question_id, "").strip()}
               for item in bench.items]
    return entries, sum(item.question_id in texts for item in bench.items)


def _server_id(question_id: str) -> int | str:
    """The server matches integer ids; an id that is no integer is kept as it is (then the server says so)."""
    return int(question_id) if question_id.isdigit() else question_id


def results_text(entries: list[dict]) -> str:
    return json.dumps(entries, ensure_ascii=False) + "\n"
