"""What every benchmark shares: names, default Hub datasets and splits, the set of items with its lazily
read images, and the readers of JSON files and datasets. Whatever the source, captions become a
`CaptionSet` and questions a `VqaSet`, so scoring and generation never look at file formats; images in a
dataset are read only when a model has to see them, and images given as URLs are fetched by the job.

Default Hub datasets (`data=None`), Parquet all three: coco `yerevann/coco-karpathy` (Karpathy test, 5,000
images; captions and image URLs, fetched), flickr30k `umaru97/flickr30k_train_val_test` (Karpathy's split,
test 1,000 images, embedded), vqav2 `lmms-lab/VQAv2` (val2014 "validation", 214,354 questions, embedded).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (
    Any,
    Callable,
    Generic,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    TypeVar,
)

from vlmbatch.errors import VlmbatchError
from vlmbatch.sources.records import SAVED_DATASET_MARKERS, URL_COLUMNS, ImageRecord, ImageRef, as_url

CAPTION_DATASETS = ("coco", "flickr30k")
VQA_DATASETS = ("vqav2",)
DEFAULT_HUB_DATASETS = {"coco": "yerevann/coco-karpathy", "flickr30k": "umaru97/flickr30k_train_val_test",
                        "vqav2": "lmms-lab/VQAv2"}
DEFAULT_SPLITS = {"coco": "test", "flickr30k": "test", "vqav2": "validation"}
# Karpathy calls it "val", the Hub usually "validation".
_SPLIT_ALIASES = {"val": "validation", "validation": "val"}

#: Lazily yields (image id, image) for images not held in the items themselves.
ImageSource = Callable[[], Iterator[tuple[str, ImageRef]]]



# --- In-memory form -----------------------------------------------------------------------------------


ItemT = TypeVar("ItemT")  # a benchmark's item: it has `image_id` and `image`


class _Reiterable(Iterable[ImageRecord]):
    """An iterable that starts a new pass (a new iterator) each time it is iterated."""

    def __init__(self, start: Callable[[], Iterator[ImageRecord]]):
        self._start = start

    def __iter__(self) -> Iterator[ImageRecord]:
        return self._start()


@dataclass
class EvalSet(Generic[ItemT]):
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

    def head(self, n: int) -> "EvalSet[ItemT]":
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


# --- Small helpers ------------------------------------------------------------------------------------


def data_root(annotation_file: Path) -> Path:
    """The folder images are looked for under, given an annotation file: its folder, or the one above
    when that is an annotations/ or questions/ folder (COCO's and VQA's download layout)."""
    folder = annotation_file.parent
    return folder.parent if folder.name.lower() in ("annotations", "questions") else folder


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise VlmbatchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise VlmbatchError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def as_id(value: Any) -> str:
    """Ids compare as strings everywhere (JSON has ints, Parquet may have either)."""
    return str(value)


def split_names(split: str) -> list[str]:
    return [split] + ([_SPLIT_ALIASES[split]] if split in _SPLIT_ALIASES else [])


class ImageFinder:
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


# --- Datasets (Hub or save_to_disk) -------------------------------------------------------------------


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def load_dataset_split(data: str, split: str):
    """One split of a local `save_to_disk` dataset or a Hub dataset, as a `datasets.Dataset`.

    When the loaded table has a Karpathy-style `split` column, only the rows of the asked split are kept.
    """
    table = _open_dataset(data, split)
    if "split" in table.column_names:
        wanted = set(split_names(split))
        keep = [index for index, value in enumerate(table["split"]) if value in wanted]
        if keep and len(keep) < len(table):
            table = table.select(keep)
    return table


def _open_dataset(data: str, split: str):
    # Imported here: `datasets` is slow to import, and scoring saved predictions needs none of it.
    from vlmbatch.sources.hf_datasets import load_hub, load_saved

    if Path(data).is_dir():
        loaded = load_saved(Path(data))
        if not hasattr(loaded, "keys"):  # one Dataset, not a DatasetDict
            return loaded
        for name in split_names(split):
            if name in loaded:
                return loaded[name]
        raise VlmbatchError(f"{data} has no split {split!r} (it has: {', '.join(loaded)})")
    if Path(data).is_absolute() or data.startswith((".", "~")) or data.count("/") > 1:
        raise VlmbatchError(f"{data} does not exist")  # a path, not an "owner/name" Hub id
    errors = []
    for name in split_names(split):
        try:
            return load_hub(data, split=name, streaming=False, instead=_LOCAL_COPY)
        except ValueError as exc:  # unknown split
            errors.append(str(exc))
    raise VlmbatchError(f"dataset {data!r} has no split {split!r}: {errors[0].splitlines()[0]}")


_LOCAL_COPY = ("pass a local copy with --data (an annotation file, a folder of annotations and images, or a saved "
               "dataset); HF_HUB_OFFLINE=1 reads a copy in the Hugging Face cache")


def first_column(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((name for name in names if name in columns), None)


def table_images(table: Any, first_rows: Mapping[str, int]) -> ImageSource | None:
    """The lazy images of a dataset: its `image` column, else a URL column (`URL_COLUMNS`, as `Url`s the
    job fetches), else None (a table of references only)."""
    columns = table.column_names
    if "image" in columns:
        return dataset_images(table, "image", first_rows)
    url_column = first_column(columns, URL_COLUMNS)
    if url_column is None:
        return None

    def urls() -> Iterator[tuple[str, ImageRef]]:
        values = list(table[url_column])  # one column of text, read once per pass
        for image_id, row in first_rows.items():
            url = as_url(values[row]) if isinstance(values[row], str) else None
            if url is not None:
                yield image_id, url

    return urls


def dataset_images(table: Any, column: str, first_rows: Mapping[str, int]) -> ImageSource:
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
