"""Captioning benchmarks, COCO and Flickr30K: the official COCO captions JSON, Karpathy's split files
(`dataset_coco.json`, `dataset_flickr30k.json`; both datasets share the format), a folder holding one
of them beside the images, or a dataset with a caption column."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.benchmarks import (
    CAPTION_DATASETS,
    DEFAULT_HUB_DATASETS,
    DEFAULT_SPLITS,
    EvalSet,
    ImageFinder,
    as_id,
    data_root,
    table_images,
    first_column,
    is_saved_dataset,
    load_dataset_split,
    read_json,
    split_names,
)
from vlmbatch.sources.records import ImageRef


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


@dataclass
class CaptionSet(EvalSet[CaptionItem]):
    """A captioning benchmark split: images with their reference captions."""

    def references(self) -> dict[str, list[str]]:
        return {item.image_id: list(item.references) for item in self.items}


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
        captions.setdefault(as_id(annotation["image_id"]), []).append(annotation["caption"])
    finder = ImageFinder(root, _coco_subdirs(data)) if root is not None else None
    items = []
    for image in data["images"]:
        image_id = as_id(image["id"])
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
    wanted = set(split_names(split))
    finder = ImageFinder(root, ["", "images", "flickr30k-images", "Flicker8k_Dataset"]) if root is not None else None
    items = []
    for image in data["images"]:
        if image.get("split") not in wanted:
            continue
        relative = str(PurePosixPath(image.get("filepath") or "", image["filename"]))
        image_id = as_id(image["cocoid"]) if "cocoid" in image else PurePosixPath(image["filename"]).stem
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


def _caption_texts(value: Any) -> list[str]:
    """Captions from one row's cell: a string, a list of strings, or Karpathy sentence dicts ({"raw": ...})."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [item["raw"] if isinstance(item, Mapping) else str(item) for item in values if item is not None]


_CAPTION_COLUMNS = ("captions", "caption", "sentences", "sentences_raw", "references", "refs", "text",
                    "alt_text", "answer")
_FILE_COLUMNS = ("file_name", "filename")


_ID_COLUMNS = ("image_id", "cocoid", "img_id", "imgid", "id")


def _caption_row_ids(row: Mapping[str, Any], index: int, file_name: str) -> tuple[str, tuple[str, ...]]:
    """A dataset row's image id and its other ids. The image id is image_id or cocoid, else the file name's
    stem (the Flickr id), else another id column, else the row index."""
    ids = [as_id(row[column]) for column in _ID_COLUMNS if row.get(column) is not None]
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
    text_column = first_column(columns, _CAPTION_COLUMNS)
    if text_column is None:
        raise VlmbatchError(f"{source} has no caption column (looked for: {', '.join(_CAPTION_COLUMNS)})")
    image_column = "image" if "image" in columns else None
    rows = table.select_columns([c for c in columns if c != image_column]).to_list()
    captions: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    first_rows: dict[str, int] = {}
    file_column = first_column(columns, _FILE_COLUMNS)
    for index, row in enumerate(rows):
        file_name = str(PurePosixPath(row.get("filepath") or "", row[file_column])) if file_column else ""
        image_id, other_ids = _caption_row_ids(row, index, file_name)
        captions.setdefault(image_id, []).extend(_caption_texts(row[text_column]))
        files.setdefault(image_id, file_name)
        aliases.setdefault(image_id, other_ids)
        first_rows.setdefault(image_id, index)
    items = [CaptionItem(image_id, files[image_id], tuple(refs), aliases=aliases[image_id])
             for image_id, refs in captions.items()]
    images = table_images(table, first_rows)
    return CaptionSet(dataset, split, source, image_source=images, items=items)


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
        return _caption_set_from_json(dataset, path, read_json(path), split, data_root(path))
    if path.is_dir() and not is_saved_dataset(path):
        annotations = _find_caption_json(path, dataset)
        return _caption_set_from_json(dataset, annotations, read_json(annotations), split, path)
    return caption_set_from_dataset(dataset, load_dataset_split(source, split), split, source)
