"""VQAv2: the official question / annotation pair (`v2_OpenEnded_mscoco_<subtype>_questions.json`,
`v2_mscoco_<subtype>_annotations.json`) with COCO's images, or a dataset with questions and answers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.benchmarks import (
    DEFAULT_HUB_DATASETS,
    DEFAULT_SPLITS,
    EvalSet,
    ImageFinder,
    as_id,
    data_root,
    table_images,
    is_saved_dataset,
    load_dataset_split,
    read_json,
)
from vlmbatch.evaluation.metrics.vqa import VqaAnnotation
from vlmbatch.evaluation.protocols import SERVER_FILE_SPLITS, SERVER_SPLITS
from vlmbatch.sources.records import ImageRef, Question


@dataclass(frozen=True)
class VqaItem(VqaAnnotation):
    """One question with its ten human answers (from `VqaAnnotation`) and the image it is about."""

    image_id: str = ""
    question: str = ""
    image: ImageRef | None = None


@dataclass
class VqaSet(EvalSet[VqaItem]):
    """A VQA benchmark split: questions with their human answers and images. `answered` is False for a
    split without public answers (test-dev, test-std): its answers go to the evaluation server."""

    answered: bool = True

    def questions(self) -> list[Question]:
        """The questions as the VQA task takes them (`image` is the image's record id)."""
        return [Question(image=item.image_id, question=item.question, question_id=item.question_id)
                for item in self.items]


def parse_vqa(questions: Mapping[str, Any], annotations: Mapping[str, Any],
              image_path: Callable[[str], Path | None] = lambda image_id: None) -> list[VqaItem]:
    """Items from the official VQA pair: `v2_OpenEnded_mscoco_<subtype>_questions.json` and
    `v2_mscoco_<subtype>_annotations.json`, in the questions file's order."""
    by_question = {as_id(annotation["question_id"]): annotation for annotation in annotations["annotations"]}
    items = []
    for question in questions["questions"]:
        question_id = as_id(question["question_id"])
        annotation = by_question.get(question_id)
        if annotation is None:
            continue  # a test-split question: there is nothing to score it against
        image_id = as_id(question["image_id"])
        items.append(VqaItem(
            question_id=question_id, answers=tuple(answer["answer"] for answer in annotation["answers"]),
            answer_type=annotation["answer_type"], question_type=annotation["question_type"],
            image_id=image_id, question=question["question"], image=image_path(image_id)))
    return items


def _annotation_dirs(folder: Path) -> list[Path]:
    """Where the official files sit in a VQAv2 folder: in it, or in its questions/ and annotations/."""
    return [folder, folder / "questions", folder / "annotations", folder / "Questions", folder / "Annotations"]


def _find_vqa_pair(folder: Path, split: str | None) -> tuple[Path, Path, str]:
    """(questions file, annotations file, subtype) in a folder or its questions/ and annotations/ subfolders."""
    pattern_dirs = _annotation_dirs(folder)
    questions = {p.name[len("v2_OpenEnded_mscoco_"):-len("_questions.json")]: p
                 for d in pattern_dirs for p in sorted(d.glob("v2_OpenEnded_mscoco_*_questions.json"))}
    annotations = {p.name[len("v2_mscoco_"):-len("_annotations.json")]: p
                   for d in pattern_dirs for p in sorted(d.glob("v2_mscoco_*_annotations.json"))}
    subtypes = [subtype for subtype in questions if subtype in annotations]
    if not subtypes:
        raise VlmbatchError(f"no VQAv2 question/annotation pair in {folder} (expected "
                            "v2_OpenEnded_mscoco_<subtype>_questions.json and v2_mscoco_<subtype>_annotations.json)")
    if split in subtypes:
        subtype = split
    elif len(subtypes) == 1 and split in (None, DEFAULT_SPLITS["vqav2"], "val"):
        subtype = subtypes[0]  # the one pair there is, asked for by a generic name
    elif split is None:
        raise VlmbatchError(f"{folder} has VQAv2 files for {', '.join(subtypes)}; pick one with --split")
    else:
        raise VlmbatchError(f"{folder} has no VQAv2 files for split {split!r} (it has: {', '.join(subtypes)})")
    return questions[subtype], annotations[subtype], subtype


def _server_questions(folder: Path, split: str) -> VqaSet:
    """test-dev or test-std from the official questions file (there are no annotations), the images in
    test2015/ (test-dev's are a part of test2015's)."""
    name = f"v2_OpenEnded_mscoco_{SERVER_FILE_SPLITS[SERVER_SPLITS[split]]}_questions.json"
    found = next((d / name for d in _annotation_dirs(folder) if (d / name).is_file()), None)
    if found is None:
        raise VlmbatchError(f"no {name} in {folder}: the official VQAv2 {split} questions are needed")
    image_path = _vqa_image_finder(folder, "test2015")
    items = [VqaItem(question_id=as_id(q["question_id"]), answers=(), answer_type="unknown", question_type="unknown",
                     image_id=as_id(q["image_id"]), question=q["question"], image=image_path(as_id(q["image_id"])))
             for q in read_json(found)["questions"]]
    return VqaSet("vqav2", split, str(folder), items=items, answered=False)


def _vqa_image_finder(root: Path, subtype: str) -> Callable[[str], Path | None]:
    """COCO's naming: <root>/<subtype>/COCO_<subtype>_<12-digit id>.jpg (also under images/, or flat)."""
    finder = ImageFinder(root, [subtype, f"images/{subtype}", "images", "", f"Images/{subtype}"])

    @lru_cache(maxsize=None)  # about five questions per image
    def image_path(image_id: str) -> Path | None:
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg" if image_id.isdigit() else f"{image_id}.jpg"
        return finder.find(name)

    return image_path


def _answer_texts(value: Any) -> tuple[str, ...]:
    """Human answers from a dataset cell: a list of strings or of {"answer": ...} dicts."""
    return tuple(item["answer"] if isinstance(item, Mapping) else str(item) for item in value or [])


def vqa_set_from_dataset(table: Any, split: str, source: str) -> VqaSet:
    """A VqaSet from a `datasets.Dataset` with question_id, question, answers (and image, types)."""
    columns = table.column_names
    answered = split not in SERVER_SPLITS  # whatever a copy holds there, nothing public to score against
    missing = [name for name in ("question_id", "question", "answers")[:3 if answered else 2] if name not in columns]
    if missing:
        raise VlmbatchError(f"{source} lacks the column(s) {', '.join(missing)} a VQA dataset needs")
    image_column = "image" if "image" in columns else None
    rows = table.select_columns([c for c in columns if c != image_column]).to_list()
    items: list[VqaItem] = []
    first_rows: dict[str, int] = {}
    for index, row in enumerate(rows):
        image_id = as_id(row["image_id"]) if row.get("image_id") is not None else f"row{index}"
        first_rows.setdefault(image_id, index)
        items.append(VqaItem(
            question_id=as_id(row["question_id"]), answers=_answer_texts(row["answers"]) if answered else (),
            answer_type=row.get("answer_type") or "unknown", question_type=row.get("question_type") or "unknown",
            image_id=image_id, question=row["question"]))
    images = table_images(table, first_rows)
    return VqaSet("vqav2", split, source, image_source=images, items=items, answered=answered)


def load_vqa_set(data: str | os.PathLike | None = None, split: str | None = None) -> VqaSet:
    """Load VQAv2: a folder with the official question/annotation pair (and images), either file of the pair,
    a `save_to_disk` dataset, or a Hub dataset id (None: the default Hub dataset, split "validation").
    "test-dev" and "test-std" (questions without answers) name the Hub's "testdev" and "test" splits, or
    a folder's official questions file for them."""
    source = str(data) if data is not None else DEFAULT_HUB_DATASETS["vqav2"]
    path = Path(source)
    if path.is_file():
        path = data_root(path)
    if path.is_dir() and not is_saved_dataset(path) and split in SERVER_SPLITS:
        return _server_questions(path, split)
    if path.is_dir() and not is_saved_dataset(path):
        questions, annotations, subtype = _find_vqa_pair(path, split)
        items = parse_vqa(read_json(questions), read_json(annotations), _vqa_image_finder(path, subtype))
        return VqaSet("vqav2", subtype, str(path), items=items)
    split = split or DEFAULT_SPLITS["vqav2"]
    return vqa_set_from_dataset(load_dataset_split(source, SERVER_SPLITS.get(split, split)), split, source)
