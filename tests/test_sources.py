"""open_source: every kind of SOURCE resolves to the right lazy records, and mistakes give one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vlmbatch.sources.hf_datasets
from vlmbatch.errors import ImageDecodeError, VlmbatchError
from vlmbatch.sources.images import load_image
from vlmbatch.sources.open import open_source

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color).save(path)
    return path


def color_of(record) -> tuple[int, int, int]:
    return load_image(record.image).getpixel((0, 0))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Three PNGs, red/green/blue, under tmp_path/data/images."""
    return [make_png(tmp_path / "data" / "images" / f"{i}.png", color) for i, color in enumerate(COLORS)]


# --- image folders -----------------------------------------------------------------------------------


def test_folder_walk_is_recursive_sorted_and_skips_non_images_and_hidden(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    names = ["b.png", "a.JPG", "notes.txt", "sub/c.Jpeg", "sub/deeper/d.webp", ".hidden/e.png", "sub/.f.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded while walking")
    source = open_source(str(root))
    ids = [record.id for record in source]
    assert ids == ["a.JPG", "b.png", "sub/c.Jpeg", "sub/deeper/d.webp"]
    assert [record.id for record in source] == ids  # re-iterable, same order
    first = next(iter(source))
    assert first.image == str(root / "a.JPG") and os.path.isabs(first.image)
    assert source.size is None and "photos" in source.description


def test_folder_walk_follows_symlinked_dirs_without_looping(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_png(root / "sub" / "a.png", COLORS[0])
    make_png(outside / "b.png", COLORS[1])
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "zlink").symlink_to(outside, target_is_directory=True)
    ids = [record.id for record in open_source(str(root))]
    assert ids == ["sub/a.png", "zlink/b.png"]


def test_single_image_file(images: list[Path]) -> None:
    source = open_source(str(images[1]))
    assert source.size == 1
    (record,) = list(source)
    assert record.id == "1.png" and color_of(record) == COLORS[1]


def test_only_sources_whose_ids_cannot_repeat_say_so(tmp_path: Path, images) -> None:
    """A folder walk or one file never repeats an id, so a run need not remember ids (memory stays
    flat over millions of files); a manifest may list an image or an id twice."""
    manifest = tmp_path / "data" / "m.parquet"
    pq.write_table(pa.table({"image": ["images/0.png", "images/0.png"]}), manifest)
    assert open_source(str(images[0].parent)).unique_ids and open_source(str(images[0])).unique_ids
    assert not open_source(str(manifest)).unique_ids
    assert [r.id for r in open_source(str(manifest))] == ["images/0.png"] * 2  # the run skips the repeat


def test_file_records_carry_a_version_that_changes_when_the_file_is_replaced(tmp_path: Path, images) -> None:
    """What lets a scheduled run tell a replaced image from the one it captioned: size and mtime."""
    folder = images[0].parent
    manifest = tmp_path / "data" / "manifest.parquet"
    pq.write_table(pa.table({"image": ["images/0.png", "images/gone.png"]}), manifest)
    sources = [open_source(str(folder)), open_source(str(images[0])), open_source(str(manifest))]

    def version_of_0() -> list[str]:
        return [next(iter(source)).version for source in sources]

    before = version_of_0()
    stat = images[0].stat()
    assert before == [f"{stat.st_size}:{stat.st_mtime_ns}"] * 3
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same bytes, copied anew
    assert all(after != b for after, b in zip(version_of_0(), before))
    assert [r.version for r in open_source(str(manifest))][1] is None  # missing: its decoding says so
    pq.write_table(pa.table({"image": [images[0].read_bytes()]}), manifest)
    assert next(iter(open_source(str(manifest)))).version is None  # bytes: nothing to tell versions by


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "source not found: .*missing"),
        ("no-images", "no images found in folder"),  # holds only a README
        ("notes.txt", "unsupported source file"),
        ("empty.jsonl", "manifest file .*empty.jsonl is empty"),
    ],
)
def test_unusable_sources_raise_one_line(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "README.md").write_text("hello")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(VlmbatchError, match=message) as info:
        open_source(str(tmp_path / name))
    assert "\n" not in str(info.value)


# --- saved datasets ---------------------------------------------------------------------------------


def image_dataset(images: list[Path], image_column: str = "image") -> datasets.Dataset:
    table = {
        image_column: [str(p) for p in images],
        "name": [f"img-{i}" for i in range(len(images))],
        "label": list(range(len(images))),
    }
    return datasets.Dataset.from_dict(table).cast_column(image_column, datasets.Image())


def test_saved_dataset_yields_undecoded_images_and_extra_columns(tmp_path: Path, images: list[Path]) -> None:
    image_dataset(images).save_to_disk(str(tmp_path / "saved"))
    source = open_source(str(tmp_path / "saved"))
    records = list(source)
    assert source.size == 3
    assert [r.id for r in records] == ["0", "1", "2"]
    assert all(isinstance(r.image, (bytes, str)) for r in records)  # never a decoded PIL image
    assert [color_of(r) for r in records] == COLORS
    assert records[2].extra == {"name": "img-2", "label": 2}
    json.dumps([dict(r.extra) for r in records])


def test_saved_dataset_id_and_image_columns(tmp_path: Path, images: list[Path]) -> None:
    image_dataset(images, image_column="picture").save_to_disk(str(tmp_path / "saved"))
    by_feature = list(open_source(str(tmp_path / "saved"), id_column="name"))
    assert [r.id for r in by_feature] == ["img-0", "img-1", "img-2"]
    assert color_of(by_feature[0]) == COLORS[0]  # found the Image-typed column without --image-column
    explicit = list(open_source(str(tmp_path / "saved"), image_column="picture"))
    assert color_of(explicit[1]) == COLORS[1]


def test_unknown_column_names_the_available_ones(tmp_path: Path, images: list[Path]) -> None:
    image_dataset(images).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(VlmbatchError, match=r"no column 'photo'.*available columns: image, name, label"):
        open_source(str(tmp_path / "saved"), image_column="photo")
    with pytest.raises(VlmbatchError, match=r"--id-column.*image, name, label"):
        open_source(str(tmp_path / "saved"), id_column="uid")


def test_dataset_dict_split_selection(tmp_path: Path, images: list[Path]) -> None:
    full = image_dataset(images)
    splits = datasets.DatasetDict({"train": full.select([0, 1]), "test": full.select([2])})
    splits.save_to_disk(str(tmp_path / "dict"))
    default = open_source(str(tmp_path / "dict"))
    assert "split test" in default.description and [color_of(r) for r in default] == [COLORS[2]]
    train = open_source(str(tmp_path / "dict"), split="train")
    assert train.size == 2 and [color_of(r) for r in train] == COLORS[:2]
    with pytest.raises(VlmbatchError, match=r"split 'validation' not found.*available splits: train, test"):
        open_source(str(tmp_path / "dict"), split="validation")


def test_dataset_dict_without_test_split_needs_a_choice(tmp_path: Path, images: list[Path]) -> None:
    full = image_dataset(images)
    datasets.DatasetDict({"train": full, "validation": full}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(VlmbatchError, match=r"several splits \(train, validation\).*--split"):
        open_source(str(tmp_path / "dict"))


# --- manifests --------------------------------------------------------------------------------------


def test_parquet_manifest_with_relative_paths(tmp_path: Path, images: list[Path]) -> None:
    manifest = tmp_path / "data" / "manifest.parquet"
    table = pa.table({"file": [f"images/{i}.png" for i in range(3)], "uid": ["a", "b", "c"]})
    pq.write_table(table, manifest)
    source = open_source(str(manifest), image_column="file", id_column="uid")
    records = list(source)
    assert source.size == 3
    assert [r.id for r in records] == ["a", "b", "c"]
    assert records[0].image == str(images[0])  # resolved against the manifest's folder
    assert [color_of(r) for r in records] == COLORS
    assert records[0].extra == {"uid": "a"}


def test_parquet_manifest_with_bytes(tmp_path: Path, images: list[Path]) -> None:
    manifest = tmp_path / "bytes.parquet"
    table = pa.table({"image": [p.read_bytes() for p in images], "caption": ["r", "g", "b"]})
    pq.write_table(table, manifest)
    records = list(open_source(str(manifest)))
    assert all(isinstance(r.image, bytes) for r in records)
    assert [r.id for r in records] == ["0", "1", "2"]  # no path to know them by: the row index
    assert [color_of(r) for r in records] == COLORS
    assert records[1].extra == {"caption": "g"}


def test_parquet_manifest_with_image_feature_struct(tmp_path: Path, images: list[Path]) -> None:
    manifest = tmp_path / "hf.parquet"
    image_dataset(images, image_column="picture").to_parquet(str(manifest))
    records = list(open_source(str(manifest)))
    assert [color_of(r) for r in records] == COLORS
    assert records[0].extra == {"name": "img-0", "label": 0}
    assert [r.id for r in records] == ["0", "1", "2"]


def test_jsonl_and_csv_manifests(tmp_path: Path, images: list[Path]) -> None:
    jsonl = tmp_path / "data" / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"images/{i}.png", "k": i}) + "\n" for i in range(3)))
    csv = tmp_path / "data" / "m.csv"
    csv.write_text("image,k\n" + "".join(f"{images[i]},{i}\n" for i in range(3)))  # absolute paths
    for manifest, written in ((jsonl, [f"images/{i}.png" for i in range(3)]), (csv, [str(p) for p in images])):
        records = list(open_source(str(manifest)))
        assert [color_of(r) for r in records] == COLORS
        assert [r.extra["k"] for r in records] == [0, 1, 2]
        assert [r.id for r in records] == written  # without an id column, each image's path as written


def test_a_manifest_id_column_is_used_unless_another_is_named(tmp_path: Path, images: list[Path]) -> None:
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/{i}.png", "id": 10 + i, "uid": f"u{i}"}) + "\n"
                                for i in range(3)))
    assert [r.id for r in open_source(str(manifest))] == ["10", "11", "12"]
    assert [r.id for r in open_source(str(manifest), id_column="uid")] == ["u0", "u1", "u2"]
    manifest.write_text(json.dumps({"image": "./images/0.png"}) + "\n")  # spelled as a questions file's image
    assert [r.id for r in open_source(str(manifest))] == ["images/0.png"]


def test_folder_of_data_files_is_one_manifest(tmp_path: Path, images: list[Path]) -> None:
    folder = tmp_path / "data"
    for index in range(3):
        pq.write_table(pa.table({"image": [f"images/{index}.png"]}), folder / f"shard-{index}.parquet")
    source = open_source(str(folder))
    assert source.size == 3 and "manifest folder" in source.description
    assert [color_of(r) for r in source] == COLORS


def test_manifest_unknown_image_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption\na.png,x\n")
    with pytest.raises(VlmbatchError, match=r"no column 'image'.*available columns: path, caption"):
        open_source(str(manifest))


def test_manifest_with_non_image_values_in_image_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": 3}\n')
    with pytest.raises(VlmbatchError, match="holds int values"):
        list(open_source(str(manifest)))


# --- Hugging Face Hub -------------------------------------------------------------------------------


def test_hub_dataset_is_streamed_with_default_split(monkeypatch, images: list[Path]) -> None:
    produced: list[int] = []

    def rows(split: str):
        for index, path in enumerate(images):
            produced.append(index)
            yield {"image": {"bytes": path.read_bytes(), "path": None}, "question_id": f"{split}-{index}"}

    features = datasets.Features({"image": datasets.Image(), "question_id": datasets.Value("string")})
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        make = datasets.IterableDataset.from_generator
        splits = {name: make(rows, features=features, gen_kwargs={"split": name}) for name in ("train", "test")}
        return datasets.IterableDatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(vlmbatch.sources.hf_datasets, "why_unreachable", lambda: None)  # the fake is the Hub
    source = open_source("someone/vqa-set", id_column="question_id")
    assert calls == [("someone/vqa-set", {"streaming": True})]
    assert source.description == "Hub dataset someone/vqa-set (split test)"
    first = next(iter(source))
    assert first.id == "test-0" and isinstance(first.image, bytes) and color_of(first) == COLORS[0]
    assert len(produced) < len(images)  # lazy: only what was asked for was read
    train = list(open_source("someone/vqa-set", split="train", id_column="question_id"))
    assert [r.id for r in train] == ["train-0", "train-1", "train-2"]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (datasets.exceptions.DatasetNotFoundError("Dataset 'x/y' doesn't exist on the Hub"), "HF_TOKEN"),
        (ConnectionError("Couldn't reach 'x/y' on the Hub"), "cannot reach the Hugging Face Hub"),
        (RuntimeError("something odd\nwith details"), "cannot load Hub dataset x/y: something odd$"),
    ],
    ids=["not-found", "offline", "other"],
)
def test_hub_failures_become_one_line(monkeypatch, error: Exception, message: str) -> None:
    def failing_load_dataset(name, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    monkeypatch.setattr(vlmbatch.sources.hf_datasets, "why_unreachable", lambda: None)  # the fake is the Hub
    with pytest.raises(VlmbatchError, match=message) as info:
        open_source("x/y")
    assert "\n" not in str(info.value)


def test_each_unreadable_image_gets_its_own_reason(broken_image_files):
    reasons = {"truncated_jpeg": "cannot decode image", "empty_jpg": "empty file",
               "text_as_png": "not an image Pillow can identify", "decompression_bomb": "decompression-bomb limit"}
    assert set(reasons) == set(broken_image_files)
    for name, path in broken_image_files.items():
        with pytest.raises(ImageDecodeError, match=reasons[name]):
            load_image(path)
    with pytest.raises(ImageDecodeError, match=r"^no image data \(an empty or missing value\)$"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="^https URLs are not fetched: download the images first"):
        load_image("https://example.com/cat.jpg")
    gone = str(broken_image_files["empty_jpg"]) + ".gone"
    with pytest.raises(ImageDecodeError) as info:
        load_image(gone)
    assert str(info.value) == f"file not found: {gone}"  # where it looked, for a manifest's relative path
