"""Evaluation data (COCO, Flickr30K, VQAv2) and model predictions, read into one in-memory form.

Whatever the source -- the official JSON files, Karpathy's split files, a folder holding them beside the
images, a local `save_to_disk` dataset or a Hub dataset -- captions become a `CaptionSet` and questions a
`VqaSet`, so scoring and generation never look at file formats.

Images are held as paths when they are files on disk. Images inside a dataset are not read while loading
(scoring needs none of them); `records()` reads them lazily when a model has to see them.

Default Hub datasets (`data=None`), chosen because they load as plain Parquet with today's `datasets`:

* coco: `yerevann/coco-karpathy` -- Karpathy's COCO splits (test = 5,000 images) with five references per
  image. It holds captions and image URLs only: to generate captions, point `data` at local images.
* flickr30k: `lmms-lab/flickr30k` -- all 31,783 Flickr30K images with their five captions and the images,
  in one split named "test" (what lmms-eval scores). For Karpathy's 1,000-image test split use
  `dataset_flickr30k.json` with the images.
* vqav2: `lmms-lab/VQAv2`, split "validation" -- the 214,354 val2014 questions with images and all ten
  answers, the set VQAv2 val accuracy is reported on.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Sequence, TypeVar

from vlmbatch.errors import VlmbatchError
from vlmbatch.hub import why_unreachable
from vlmbatch.metrics.vqa import VqaAnnotation
from vlmbatch.records import ImageRecord, ImageRef, Question

CAPTION_DATASETS = ("coco", "flickr30k")
VQA_DATASETS = ("vqav2",)
DEFAULT_HUB_DATASETS = {"coco": "yerevann/coco-karpathy", "flickr30k": "lmms-lab/flickr30k",
                        "vqav2": "lmms-lab/VQAv2"}
DEFAULT_SPLITS = {"coco": "test", "flickr30k": "test", "vqav2": "validation"}
# Karpathy calls it "val", the Hub usually "validation".
_SPLIT_ALIASES = {"val": "validation", "validation": "val"}

#: Lazily yields (image id, image) for images not held in the items themselves.
ImageSource = Callable[[], Iterator[tuple[str, ImageRef]]]


# --- In-memory form -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionItem:
    """One image and its human captions. `file_name` is the image's path relative to the data root
    (e.g. "val2014/COCO_val2014_000000391895.jpg"), or its bare file name when that is all that is known.
    `aliases` are the source's other ids for the image (e.g. a dataset's `img_id` when the image id is the
    Flickr file stem), so predictions keyed by any of them still find it."""

    image_id: str
    file_name: str
    references: tuple[str, ...]
    image: ImageRef | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class VqaItem(VqaAnnotation):
    """One question with its ten human answers (from `VqaAnnotation`) and the image it is about."""

    image_id: str = ""
    question: str = ""
    image: ImageRef | None = None


ItemT = TypeVar("ItemT", CaptionItem, VqaItem)


class _Reiterable(Iterable[ImageRecord]):
    """An iterable that starts a new pass (a new iterator) each time it is iterated."""

    def __init__(self, start: Callable[[], Iterator[ImageRecord]]):
        self._start = start

    def __iter__(self) -> Iterator[ImageRecord]:
        return self._start()


@dataclass
class _EvalSet(Generic[ItemT]):
    """What caption and VQA sets share: name, split, where they came from, items, and lazily read images."""

    dataset: str
    split: str
    source: str
    items: list[ItemT] = field(default_factory=list)
    image_source: ImageSource | None = field(default=None, repr=False)

    def _images(self) -> Iterator[tuple[str, ImageRef]]:
        """Each image once: those the items hold (files), then whatever `image_source` reads."""
        seen: set[str] = set()
        held = ((item.image_id, item.image) for item in self.items if item.image is not None)
        lazy = self.image_source() if self.image_source is not None else iter(())
        for image_id, image in itertools.chain(held, lazy):
            if image_id not in seen:
                seen.add(image_id)
                yield image_id, image

    def records(self) -> Iterable[ImageRecord]:
        """One ImageRecord per image (id = image id), for a model to run on. Can be iterated more than once;
        each pass reads the images afresh, lazily, so a large dataset is never held in memory."""
        return _Reiterable(lambda: (ImageRecord(id=image_id, image=image) for image_id, image in self._images()))

    def has_images(self) -> bool:
        return self.image_source is not None or any(item.image is not None for item in self.items)

    def head(self, n: int) -> "_EvalSet[ItemT]":
        """The same set cut to its first n items (images for captions, questions for VQA); its lazy
        images are only theirs, and reading them stops once every one was found."""
        items = self.items[:n]
        lazy = self.image_source
        wanted = {item.image_id for item in items if item.image is None}

        def head_images() -> Iterator[tuple[str, ImageRef]]:
            left = set(wanted)
            for image_id, image in (lazy() if left else ()):
                if image_id in left:
                    left.discard(image_id)
                    yield image_id, image
                    if not left:
                        return

        return replace(self, items=items, image_source=head_images if lazy is not None else None)


@dataclass
class CaptionSet(_EvalSet[CaptionItem]):
    """A captioning benchmark split: images with their reference captions."""

    def references(self) -> dict[str, list[str]]:
        return {item.image_id: list(item.references) for item in self.items}


@dataclass
class VqaSet(_EvalSet[VqaItem]):
    """A VQA benchmark split: questions with their human answers and images."""

    def questions(self) -> list[Question]:
        """The questions as the VQA task takes them (`image` is the image's record id)."""
        return [Question(image=item.image_id, question=item.question, question_id=item.question_id)
                for item in self.items]


# --- Small helpers ------------------------------------------------------------------------------------


def _data_root(annotation_file: Path) -> Path:
    """The folder images are looked for under, given an annotation file: its folder, or the one above
    when that is an annotations/ or questions/ folder (COCO's and VQA's download layout)."""
    folder = annotation_file.parent
    return folder.parent if folder.name.lower() in ("annotations", "questions") else folder


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise VlmbatchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise VlmbatchError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _id(value: Any) -> str:
    """Ids compare as strings everywhere (JSON has ints, Parquet may have either)."""
    return str(value)


def _split_names(split: str) -> list[str]:
    return [split] + ([_SPLIT_ALIASES[split]] if split in _SPLIT_ALIASES else [])


class _ImageFinder:
    """Finds an image file under a root, trying a few conventional layouts; remembers which one worked."""

    def __init__(self, root: Path, subdirs: Sequence[str]):
        self.root = root
        self.subdirs = list(dict.fromkeys(subdirs))

    def find(self, relative: str) -> Path | None:
        for index, subdir in enumerate(self.subdirs):
            candidate = self.root / subdir / relative
            if candidate.is_file():
                if index:  # the layout that worked is tried first next time
                    self.subdirs.insert(0, self.subdirs.pop(index))
                return candidate
        return None


# --- Captions: official COCO JSON and Karpathy split files ------------------------------------------


def _is_karpathy(data: Any) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _is_coco_captions(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


def parse_coco_captions(data: Mapping[str, Any], root: Path | None = None) -> list[CaptionItem]:
    """Items from an official COCO captions JSON (`images` + `annotations`, e.g. captions_val2014.json).

    Images are looked for under `root`, `root/<subtype>` and `root/images[/<subtype>]` when a root is given.
    """
    captions: dict[str, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(_id(annotation["image_id"]), []).append(annotation["caption"])
    finder = _ImageFinder(root, _coco_subdirs(data)) if root is not None else None
    items = []
    for image in data["images"]:
        image_id = _id(image["id"])
        if image_id in captions:
            file_name = image["file_name"]
            items.append(CaptionItem(image_id, file_name, tuple(captions[image_id]),
                                     finder.find(file_name) if finder else None))
    return items


def _coco_subdirs(data: Mapping[str, Any]) -> list[str]:
    """Folders COCO images usually sit in, guessed from the file names ("COCO_val2014_..." -> val2014)."""
    first = data["images"][0]["file_name"] if data.get("images") else ""
    parts = PurePosixPath(first).name.split("_")
    subtype = parts[1] if len(parts) > 2 and parts[0] == "COCO" else ""
    return ["", subtype, "images", f"images/{subtype}"]


def parse_karpathy(data: Mapping[str, Any], split: str, root: Path | None = None) -> list[CaptionItem]:
    """Items of one split ("train", "val", "test", "restval") from a Karpathy `dataset_*.json`.

    The image id is the COCO id (`cocoid`) when there is one, else the file name's stem (the Flickr id).
    """
    wanted = set(_split_names(split))
    finder = _ImageFinder(root, ["", "images", "flickr30k-images", "Flicker8k_Dataset"]) if root is not None else None
    items = []
    for image in data["images"]:
        if image.get("split") not in wanted:
            continue
        relative = str(PurePosixPath(image.get("filepath") or "", image["filename"]))
        image_id = _id(image["cocoid"]) if "cocoid" in image else PurePosixPath(image["filename"]).stem
        references = tuple(sentence["raw"] for sentence in image["sentences"])
        path = (finder.find(relative) or finder.find(image["filename"])) if finder else None
        items.append(CaptionItem(image_id, relative, references, path))
    return items


def _karpathy_splits(data: Mapping[str, Any]) -> list[str]:
    return sorted({image.get("split", "") for image in data["images"]})


def _caption_set_from_json(dataset: str, path: Path, data: Any, split: str, root: Path) -> CaptionSet:
    if _is_karpathy(data):
        items = parse_karpathy(data, split, root)
        if not items:
            raise VlmbatchError(f"{path} has no images in split {split!r} "
                                f"(it has: {', '.join(_karpathy_splits(data))})")
        return CaptionSet(dataset, split, str(path), items=items)
    if _is_coco_captions(data):
        # An official captions file is one split already (its name says which, e.g. captions_val2014).
        own_split = path.stem.split("_", 1)[-1] if path.stem.startswith("captions_") else split
        return CaptionSet(dataset, own_split, str(path), items=parse_coco_captions(data, root))
    raise VlmbatchError(f"{path} is neither a COCO captions file (images + annotations) "
                        "nor a Karpathy split file (images with sentences)")


_CAPTION_JSON_NAMES = ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")


def _find_caption_json(folder: Path, dataset: str) -> Path:
    """The annotation file in a data folder: Karpathy's for this dataset first, then any COCO captions file."""
    preferred = [folder / f"dataset_{dataset}.json", *(folder / name for name in _CAPTION_JSON_NAMES)]
    candidates = preferred + sorted(folder.glob("captions_*.json")) + sorted(folder.glob("annotations/captions_*.json"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VlmbatchError(f"no caption annotations in {folder}: expected dataset_{dataset}.json "
                        "(Karpathy split) or captions_<split>.json (official COCO)")


# --- Datasets (Hub or save_to_disk) -------------------------------------------------------------------


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file() \
        or (folder / "state.json").is_file()


def _load_dataset_split(data: str, split: str):
    """One split of a local `save_to_disk` dataset or a Hub dataset, as a `datasets.Dataset`.

    When the loaded table has a Karpathy-style `split` column, only the rows of the asked split are kept.
    """
    import datasets  # imported here: it is slow to import and only these sources need it

    table = _open_dataset(datasets, data, split)
    if "split" in table.column_names:
        wanted = set(_split_names(split))
        keep = [index for index, value in enumerate(table["split"]) if value in wanted]
        if keep and len(keep) < len(table):
            table = table.select(keep)
    return table


def _open_dataset(datasets: Any, data: str, split: str):
    if Path(data).is_dir():
        loaded = datasets.load_from_disk(data)
        if isinstance(loaded, datasets.Dataset):
            return loaded
        for name in _split_names(split):
            if name in loaded:
                return loaded[name]
        raise VlmbatchError(f"{data} has no split {split!r} (it has: {', '.join(loaded)})")
    if Path(data).is_absolute() or data.startswith((".", "~")) or data.count("/") > 1:
        raise VlmbatchError(f"{data} does not exist")  # a path, not an "owner/name" Hub id
    unreachable = why_unreachable()  # one short request, instead of the Hub library's retry loop
    if unreachable:
        raise _no_hub(data, f"{unreachable}; HF_HUB_OFFLINE=1 reads a copy in the Hugging Face cache")
    errors = []
    for name in _split_names(split):
        try:
            return datasets.load_dataset(data, split=name)
        except ValueError as exc:  # unknown split
            errors.append(str(exc))
        except FileNotFoundError:
            raise VlmbatchError(f"{data!r} is neither a local path nor a dataset on the Hub") from None
        except ConnectionError as exc:
            raise _no_hub(data, str(exc)) from None
    raise VlmbatchError(f"dataset {data!r} has no split {split!r}: {errors[0].splitlines()[0]}")


def _no_hub(data: str, why: str) -> VlmbatchError:
    return VlmbatchError(f"could not reach the Hub to load {data!r} ({why}); pass a local copy with --data "
                         "(an annotation file, a folder of annotations and images, or a saved dataset)")


def _first_column(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in columns), None)


def _caption_texts(value: Any) -> list[str]:
    """Captions from one row's cell: a string, a list of strings, or Karpathy sentence dicts ({"raw": ...})."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [item["raw"] if isinstance(item, Mapping) else str(item) for item in values if item is not None]


def _dataset_images(table: Any, column: str, first_rows: Mapping[str, int]) -> ImageSource:
    """Lazy (image id, bytes or path) from a dataset's image column, reading only the rows asked for."""

    def images() -> Iterator[tuple[str, ImageRef]]:
        import datasets

        raw = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        for image_id, row in first_rows.items():
            cell = raw[row][column]
            image = (cell.get("bytes") or cell.get("path")) if isinstance(cell, Mapping) else cell
            if image is not None:
                yield image_id, image

    return images


_CAPTION_COLUMNS = ("captions", "caption", "sentences", "sentences_raw", "references", "refs", "text",
                    "alt_text", "answer")
_FILE_COLUMNS = ("file_name", "filename")


_ID_COLUMNS = ("image_id", "cocoid", "img_id", "imgid", "id")


def _caption_row_ids(row: Mapping[str, Any], index: int, file_name: str) -> tuple[str, tuple[str, ...]]:
    """A dataset row's image id and its other ids. The image id is image_id or cocoid, else the file name's
    stem (the Flickr id), else another id column, else the row index."""
    ids = [_id(row[column]) for column in _ID_COLUMNS if row.get(column) is not None]
    if row.get("image_id") is not None or row.get("cocoid") is not None:
        image_id = ids[0]
    elif file_name:
        image_id = PurePosixPath(file_name).stem
    else:
        image_id = ids[0] if ids else str(index)
    return image_id, tuple(dict.fromkeys(other for other in ids if other != image_id))


def caption_set_from_dataset(dataset: str, table: Any, split: str, source: str) -> CaptionSet:
    """A CaptionSet from a `datasets.Dataset` with a caption column and, optionally, images.

    Rows holding one caption each (one row per caption) are grouped by image id.
    """
    columns = table.column_names
    text_column = _first_column(columns, _CAPTION_COLUMNS)
    if text_column is None:
        raise VlmbatchError(f"{source} has no caption column (looked for: {', '.join(_CAPTION_COLUMNS)})")
    image_column = "image" if "image" in columns else None
    rows = table.select_columns([c for c in columns if c != image_column]).to_list()
    captions: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    first_rows: dict[str, int] = {}
    file_column = _first_column(columns, _FILE_COLUMNS)
    for index, row in enumerate(rows):
        file_name = str(PurePosixPath(row.get("filepath") or "", row[file_column])) if file_column else ""
        image_id, other_ids = _caption_row_ids(row, index, file_name)
        captions.setdefault(image_id, []).extend(_caption_texts(row[text_column]))
        files.setdefault(image_id, file_name)
        aliases.setdefault(image_id, other_ids)
        first_rows.setdefault(image_id, index)
    items = [CaptionItem(image_id, files[image_id], tuple(refs), aliases=aliases[image_id])
             for image_id, refs in captions.items()]
    images = _dataset_images(table, image_column, first_rows) if image_column else None
    return CaptionSet(dataset, split, source, image_source=images, items=items)


# --- Public loaders -----------------------------------------------------------------------------------


def load_caption_set(dataset: str, data: str | os.PathLike | None = None, split: str | None = None) -> CaptionSet:
    """Load a captioning benchmark ("coco" or "flickr30k").

    `data` is an annotation JSON (official COCO captions or Karpathy split file), a folder holding one of
    those and the images, a `save_to_disk` dataset folder, or a Hub dataset id; None uses the default Hub
    dataset. `split` (default "test") picks the Karpathy or Hub split; an official COCO captions file is a
    split by itself.
    """
    if dataset not in CAPTION_DATASETS:
        raise VlmbatchError(f"unknown caption dataset {dataset!r}; choose from {', '.join(CAPTION_DATASETS)}")
    split = split or DEFAULT_SPLITS[dataset]
    source = str(data) if data is not None else DEFAULT_HUB_DATASETS[dataset]
    path = Path(source)
    if path.is_file():
        return _caption_set_from_json(dataset, path, _read_json(path), split, _data_root(path))
    if path.is_dir() and not _is_saved_dataset(path):
        annotations = _find_caption_json(path, dataset)
        return _caption_set_from_json(dataset, annotations, _read_json(annotations), split, path)
    return caption_set_from_dataset(dataset, _load_dataset_split(source, split), split, source)


def parse_vqa(questions: Mapping[str, Any], annotations: Mapping[str, Any],
              image_path: Callable[[str], Path | None] = lambda image_id: None) -> list[VqaItem]:
    """Items from the official VQA pair: `v2_OpenEnded_mscoco_<subtype>_questions.json` and
    `v2_mscoco_<subtype>_annotations.json`, in the questions file's order."""
    by_question = {_id(annotation["question_id"]): annotation for annotation in annotations["annotations"]}
    items = []
    for question in questions["questions"]:
        question_id = _id(question["question_id"])
        annotation = by_question.get(question_id)
        if annotation is None:
            continue  # a test-split question: there is nothing to score it against
        image_id = _id(question["image_id"])
        items.append(VqaItem(
            question_id=question_id, answers=tuple(answer["answer"] for answer in annotation["answers"]),
            answer_type=annotation["answer_type"], question_type=annotation["question_type"],
            image_id=image_id, question=question["question"], image=image_path(image_id)))
    return items


def _find_vqa_pair(folder: Path, split: str | None) -> tuple[Path, Path, str]:
    """(questions file, annotations file, subtype) in a folder or its questions/ and annotations/ subfolders."""
    pattern_dirs = [folder, folder / "questions", folder / "annotations", folder / "Questions", folder / "Annotations"]
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


def _vqa_image_finder(root: Path, subtype: str) -> Callable[[str], Path | None]:
    """COCO's naming: <root>/<subtype>/COCO_<subtype>_<12-digit id>.jpg (also under images/, or flat)."""
    finder = _ImageFinder(root, [subtype, f"images/{subtype}", "images", "", f"Images/{subtype}"])

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
    missing = [name for name in ("question_id", "question", "answers") if name not in columns]
    if missing:
        raise VlmbatchError(f"{source} lacks the column(s) {', '.join(missing)} a VQA dataset needs")
    image_column = "image" if "image" in columns else None
    rows = table.select_columns([c for c in columns if c != image_column]).to_list()
    items: list[VqaItem] = []
    first_rows: dict[str, int] = {}
    for index, row in enumerate(rows):
        image_id = _id(row["image_id"]) if row.get("image_id") is not None else f"row{index}"
        first_rows.setdefault(image_id, index)
        items.append(VqaItem(
            question_id=_id(row["question_id"]), answers=_answer_texts(row["answers"]),
            answer_type=row.get("answer_type") or "unknown", question_type=row.get("question_type") or "unknown",
            image_id=image_id, question=row["question"]))
    images = _dataset_images(table, image_column, first_rows) if image_column else None
    return VqaSet("vqav2", split, source, image_source=images, items=items)


def load_vqa_set(data: str | os.PathLike | None = None, split: str | None = None) -> VqaSet:
    """Load VQAv2: a folder with the official question/annotation pair (and images), either file of the pair,
    a `save_to_disk` dataset, or a Hub dataset id (None: the default Hub dataset, split "validation")."""
    source = str(data) if data is not None else DEFAULT_HUB_DATASETS["vqav2"]
    path = Path(source)
    if path.is_file():
        path = _data_root(path)
    if path.is_dir() and not _is_saved_dataset(path):
        questions, annotations, subtype = _find_vqa_pair(path, split)
        items = parse_vqa(_read_json(questions), _read_json(annotations), _vqa_image_finder(path, subtype))
        return VqaSet("vqav2", subtype, str(path), items=items)
    split = split or DEFAULT_SPLITS["vqav2"]
    return vqa_set_from_dataset(_load_dataset_split(source, split), split, source)


# --- Predictions --------------------------------------------------------------------------------------


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

    def only(self, ids: Iterable[str]) -> "Predictions":
        """The texts for these ids alone (the items a --limit run scores); the counts stay the file's."""
        keep = set(ids)
        return replace(self, texts={key: text for key, text in self.texts.items() if key in keep})


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions file: Parquet, a JSON list of objects (official results format), or JSON lines."""
    if not path.is_file():
        raise VlmbatchError(f"predictions file not found: {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise VlmbatchError(f"cannot read {path} as Parquet: {exc}") from None
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise VlmbatchError(f"{path} must hold a JSON list of results, like the official results format")
    return rows


def _pick_columns(rows: list[dict[str, Any]], path: Path, ids: Sequence[str], texts: Sequence[str]) -> tuple[str, str]:
    columns = list(rows[0]) if rows else []
    id_column, text_column = _first_column(columns, ids), _first_column(columns, texts)
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
        key = resolve(_id(row[id_column]))
        if key is None:
            result.unmatched += 1
        elif key in result.texts:
            result.duplicates += 1
        else:
            result.texts[key] = str(text)
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
    return _collect(rows, id_column, text_column, _caption_id_resolver(caption_set))


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
