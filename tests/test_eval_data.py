"""Benchmark and prediction loaders: every supported shape lands in the same CaptionSet / VqaSet."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.captions_data import CaptionSet, load_caption_set
from vlmbatch.evaluation.predictions import (
    load_caption_predictions,
    load_vqa_predictions,
)
from vlmbatch.evaluation.vqa_data import load_vqa_set
from vlmbatch.sources.records import Question, Url

COCO_IDS = (42, 73, 74, 133)
COCO_SPLITS = {42: "test", 73: "test", 74: "val", 133: "restval"}
FLICKR = {"1000092795.jpg": "test", "10002456.jpg": "train", "1000268201.jpg": "test"}


def coco_name(image_id: int, subtype: str = "val2014") -> str:
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def refs_for(image_id) -> list[str]:
    return [f"caption {n} of image {image_id}" for n in range(5)]


@pytest.fixture
def coco_folder(tmp_path) -> Path:
    """A COCO folder as downloaded: val2014/ images, the official captions file and Karpathy's split file."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for image_id in COCO_IDS:
        (root / "val2014" / coco_name(image_id)).write_bytes(jpeg_bytes((image_id, 0, 0)))
    official = {
        "images": [{"id": i, "file_name": coco_name(i), "width": 8, "height": 6} for i in COCO_IDS],
        "annotations": [{"id": 1000 * i + n, "image_id": i, "caption": c}
                        for i in COCO_IDS for n, c in enumerate(refs_for(i))],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(official))
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": coco_name(i), "imgid": n, "split": COCO_SPLITS[i], "cocoid": i,
         "sentids": [5 * n + k for k in range(5)],
         "sentences": [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 5 * n + k}
                       for k, c in enumerate(refs_for(i))]}
        for n, i in enumerate(COCO_IDS)]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    return root


# --- Captions ------------------------------------------------------------------------------------------

def test_karpathy_coco_folder_test_split(coco_folder):
    bench = load_caption_set("coco", coco_folder)
    assert (bench.dataset, bench.split) == ("coco", "test")
    assert [item.image_id for item in bench.items] == ["42", "73"]
    item = bench.items[0]
    assert item.file_name == "val2014/COCO_val2014_000000000042.jpg"
    assert item.references == tuple(refs_for(42))
    assert item.image == coco_folder / "val2014" / coco_name(42)
    assert bench.references() == {"42": refs_for(42), "73": refs_for(73)}


@pytest.mark.parametrize("split, ids", [("val", ["74"]), ("validation", ["74"]), ("restval", ["133"])])
def test_karpathy_other_splits(coco_folder, split, ids):
    assert [item.image_id for item in load_caption_set("coco", coco_folder, split).items] == ids


def test_karpathy_unknown_split_lists_the_real_ones(coco_folder):
    with pytest.raises(VlmbatchError, match=r"no images in split 'dev' \(it has: restval, test, val\)"):
        load_caption_set("coco", coco_folder / "dataset_coco.json", "dev")


def test_official_coco_captions_file_is_its_own_split(coco_folder):
    bench = load_caption_set("coco", coco_folder / "annotations" / "captions_val2014.json")
    assert bench.split == "val2014"
    assert [item.image_id for item in bench.items] == [str(i) for i in COCO_IDS]
    assert bench.items[0].file_name == coco_name(42)
    # COCO's layout: annotations/captions_val2014.json beside val2014/.
    assert bench.items[0].image == coco_folder / "val2014" / coco_name(42)


def test_official_coco_captions_in_a_folder_with_images(tmp_path, coco_folder):
    folder = tmp_path / "official"
    (folder / "val2014").mkdir(parents=True)
    (folder / "captions_val2014.json").write_text((coco_folder / "annotations" / "captions_val2014.json").read_text())
    (folder / "val2014" / coco_name(73)).write_bytes(jpeg_bytes((1, 2, 3)))
    bench = load_caption_set("coco", folder)
    by_id = {item.image_id: item for item in bench.items}
    assert by_id["73"].image == folder / "val2014" / coco_name(73)
    assert by_id["42"].image is None  # no such file: still scorable, not generatable
    assert [record.id for record in bench.records()] == ["73"]


def test_karpathy_flickr_uses_file_stem_as_image_id(tmp_path):
    root = tmp_path / "flickr30k"
    (root / "flickr30k-images").mkdir(parents=True)
    for name in FLICKR:
        (root / "flickr30k-images" / name).write_bytes(jpeg_bytes((0, 9, 0)))
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": name, "imgid": n, "split": split, "sentences": [{"raw": c} for c in refs_for(name)]}
        for n, (name, split) in enumerate(FLICKR.items())]}
    (root / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    bench = load_caption_set("flickr30k", root)
    assert [item.image_id for item in bench.items] == ["1000092795", "1000268201"]
    assert bench.items[0].image == root / "flickr30k-images" / "1000092795.jpg"
    records = list(bench.records())
    assert [r.id for r in records] == ["1000092795", "1000268201"]


def test_folder_without_annotations_is_an_error(tmp_path):
    with pytest.raises(VlmbatchError, match="no caption annotations in"):
        load_caption_set("coco", tmp_path)
    with pytest.raises(VlmbatchError, match="unknown caption dataset 'nocaps'"):
        load_caption_set("nocaps", tmp_path)


def caption_dataset(rows: int = 3) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), (n * 40, 0, 0)) for n in range(rows)],
         "captions": [refs_for(f"img{n}") for n in range(rows)],
         "filename": [f"img{n}.jpg" for n in range(rows)],
         "image_id": [100 + n for n in range(rows)]},
        features=datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                    "filename": datasets.Value("string"), "image_id": datasets.Value("int64")}))


def test_saved_dataset_with_images(tmp_path):
    caption_dataset().save_to_disk(str(tmp_path / "saved"))
    bench = load_caption_set("coco", tmp_path / "saved")
    assert [item.image_id for item in bench.items] == ["100", "101", "102"]
    assert bench.items[1].references == tuple(refs_for("img1"))
    assert bench.items[1].file_name == "img1.jpg"
    records = list(bench.records())
    assert [r.id for r in records] == ["100", "101", "102"]
    stream = bench.records()
    assert [r.id for r in stream] == [r.id for r in stream]  # each pass starts over
    image = Image.open(io.BytesIO(records[1].image))  # the stored bytes, read lazily
    assert image.getpixel((0, 0))[0] == pytest.approx(40, abs=3)


def test_dataset_predictions_keyed_by_another_id_column(tmp_path):
    # Flickr-style rows: the image id is the file stem, but a run over the dataset may have keyed its
    # predictions by `img_id` (the dataset's own id column).
    table = datasets.Dataset.from_dict({"caption": [["a dog"], ["a cat"]], "img_id": ["0", "1"],
                                        "filename": ["1000092795.jpg", "10002456.jpg"]})
    table.save_to_disk(str(tmp_path / "flickr"))
    bench = load_caption_set("flickr30k", tmp_path / "flickr")
    assert [(item.image_id, item.aliases) for item in bench.items] == [("1000092795", ("0",)), ("10002456", ("1",))]
    path = write_parquet(tmp_path / "p.parquet", [{"id": "1", "caption": "x"}, {"id": "1000092795", "caption": "y"}])
    assert load_caption_predictions(path, bench).texts == {"10002456": "x", "1000092795": "y"}


def test_saved_dataset_dict_picks_split(tmp_path):
    splits = datasets.DatasetDict({"test": caption_dataset(2), "validation": caption_dataset(3)})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert len(load_caption_set("flickr30k", tmp_path / "dd").items) == 2
    assert len(load_caption_set("flickr30k", tmp_path / "dd", "val").items) == 3
    with pytest.raises(VlmbatchError, match="has no split 'train'"):
        load_caption_set("flickr30k", tmp_path / "dd", "train")


def test_one_caption_per_row_is_grouped_by_image(tmp_path):
    # Like COCO-on-the-Hub tables with one row per sentence ({"raw": ...} structs) and a Karpathy split column.
    table = datasets.Dataset.from_dict({
        "cocoid": [7, 7, 8, 9],
        "sentences": [{"raw": "a cat"}, {"raw": "the cat"}, {"raw": "a dog"}, {"raw": "a bird"}],
        "split": ["test", "test", "test", "train"],
    })
    table.save_to_disk(str(tmp_path / "rows"))
    bench = load_caption_set("coco", tmp_path / "rows")
    assert bench.references() == {"7": ["a cat", "the cat"], "8": ["a dog"]}
    assert not bench.has_images()


@pytest.fixture
def hub_answers(monkeypatch):
    """The Hub's one probe request answers: these tests fake `datasets.load_dataset` as the Hub."""
    import vlmbatch.sources.hf_datasets

    monkeypatch.setattr(vlmbatch.sources.hf_datasets, "why_unreachable", lambda: None)


def test_hub_dataset_via_load_dataset(monkeypatch, hub_answers):
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split))
        if split != "validation":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'test\', \'validation\'].')
        return caption_dataset(2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bench = load_caption_set("coco", None, "val")
    assert calls == [("yerevann/coco-karpathy", "val"), ("yerevann/coco-karpathy", "validation")]
    assert bench.source == "yerevann/coco-karpathy" and bench.split == "val"
    assert len(bench.items) == 2
    with pytest.raises(VlmbatchError, match="has no split 'train'"):
        load_caption_set("coco", "someone/captions", "train")


# --- VQAv2 ---------------------------------------------------------------------------------------------

VQA_ANSWERS = {1: ["yes"] * 10, 2: ["2"] * 6 + ["two"] * 4, 3: ["red"] * 10}


@pytest.fixture
def vqa_folder(tmp_path) -> Path:
    root = tmp_path / "vqav2"
    (root / "val2014").mkdir(parents=True)
    for image_id in (42, 73):
        (root / "val2014" / coco_name(image_id)).write_bytes(jpeg_bytes((0, 0, image_id)))
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "Is it sunny?", "question_id": 42000},
        {"image_id": 42, "question": "How many dogs?", "question_id": 42001},
        {"image_id": 73, "question": "What color is the car?", "question_id": 73000},
    ]}
    kinds = {42000: ("yes/no", "is it"), 42001: ("number", "how many"), 73000: ("other", "what color is the")}
    annotations = {"data_subtype": "val2014", "annotations": [
        {"question_id": qid, "image_id": qid // 1000, "answer_type": kinds[qid][0], "question_type": kinds[qid][1],
         "multiple_choice_answer": answers[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]}
        for qid, answers in zip(kinds, VQA_ANSWERS.values(), strict=True)]}
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    return root


def test_official_vqa_pair_in_a_folder(vqa_folder):
    bench = load_vqa_set(vqa_folder)
    assert (bench.dataset, bench.split) == ("vqav2", "val2014")
    first = bench.items[0]
    assert (first.question_id, first.image_id, first.question) == ("42000", "42", "Is it sunny?")
    assert first.answers == ("yes",) * 10
    assert (first.answer_type, first.question_type) == ("yes/no", "is it")
    assert first.image == vqa_folder / "val2014" / coco_name(42)
    assert bench.questions()[2] == Question(image="73", question="What color is the car?", question_id="73000")
    assert [r.id for r in bench.records()] == ["42", "73"]  # one record per image, not per question


def test_official_vqa_pair_given_as_a_file(vqa_folder):
    assert len(load_vqa_set(vqa_folder / "v2_mscoco_val2014_annotations.json").items) == 3


def test_vqa_folder_without_pair_or_split(tmp_path, vqa_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmbatchError, match="no VQAv2 question/annotation pair"):
        load_vqa_set(tmp_path / "empty")
    with pytest.raises(VlmbatchError, match="missing does not exist"):
        load_vqa_set(tmp_path / "missing")
    with pytest.raises(VlmbatchError, match=r"has no VQAv2 files for split 'test2015' \(it has: val2014\)"):
        load_vqa_set(vqa_folder, "test2015")
    assert load_vqa_set(vqa_folder, "validation").split == "val2014"


def test_vqa_hub_dataset_with_answer_dicts(monkeypatch, hub_answers):
    table = datasets.Dataset.from_dict({
        "question_id": [5, 6], "question": ["Is it?", "How many?"], "image_id": [1, 1],
        "answers": [[{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(10)],
                    [{"answer": "3", "answer_confidence": "maybe", "answer_id": k} for k in range(10)]],
        "answer_type": ["yes/no", "number"], "question_type": ["is it", "how many"],
        "image": [Image.new("RGB", (4, 4))] * 2,
    }, features=datasets.Features({
        "question_id": datasets.Value("int64"), "question": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
        "answer_type": datasets.Value("string"), "question_type": datasets.Value("string"),
        "image": datasets.Image()}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: table)
    bench = load_vqa_set()
    assert (bench.source, bench.split) == ("lmms-lab/VQAv2", "validation")
    assert [item.answers for item in bench.items] == [("yes",) * 10, ("3",) * 10]
    records = list(bench.records())
    assert len(records) == 1 and isinstance(records[0].image, bytes)


def test_an_unreachable_hub_says_how_to_pass_a_local_copy(monkeypatch, hub_answers):
    def offline(name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(VlmbatchError) as info:
        load_caption_set("coco")
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub to load yerevann/coco-karpathy (Couldn't reach")
    assert "pass a local copy with --data" in message and "\n" not in message


def test_vqa_saved_dataset_with_answer_strings(tmp_path):
    datasets.Dataset.from_dict({"question_id": ["q1"], "question": ["What?"], "image_id": ["im1"],
                                "answers": [["cat"] * 10]}).save_to_disk(str(tmp_path / "vqa"))
    item = load_vqa_set(tmp_path / "vqa").items[0]
    assert (item.question_id, item.answers, item.answer_type) == ("q1", ("cat",) * 10, "unknown")


# --- Predictions ---------------------------------------------------------------------------------------

def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_caption_predictions_from_vlmbatch_parquet_map_paths_to_image_ids(coco_folder, tmp_path):
    bench = load_caption_set("coco", coco_folder)
    path = write_parquet(tmp_path / "captions.parquet", [
        {"id": "val2014/COCO_val2014_000000000042.jpg", "caption": "a red square", "error": None},
        {"id": coco_name(73), "caption": None, "error": "image too large"},
        {"id": "somewhere/else/" + coco_name(133), "caption": "not in the test split", "error": None},
    ])
    predictions = load_caption_predictions(path, bench)
    assert predictions.texts == {"42": "a red square"}
    assert (predictions.failed, predictions.unmatched, predictions.duplicates) == (1, 1, 0)


def test_caption_predictions_by_bare_file_name_and_image_id(coco_folder, tmp_path):
    bench = load_caption_set("coco", coco_folder)
    path = write_parquet(tmp_path / "p.parquet", [{"id": coco_name(73), "caption": "x"},
                                                  {"id": "42", "caption": "y"},
                                                  {"id": "42", "caption": "again"}])
    predictions = load_caption_predictions(path, bench)
    assert predictions.texts == {"73": "x", "42": "y"}
    assert predictions.duplicates == 1


def test_caption_predictions_official_results_json(coco_folder, tmp_path):
    path = tmp_path / "captions_val2014_fakecap_results.json"
    path.write_text(json.dumps([{"image_id": 42, "caption": "a"}, {"image_id": 73, "caption": "b"}]))
    predictions = load_caption_predictions(path, load_caption_set("coco", coco_folder))
    assert predictions.texts == {"42": "a", "73": "b"}


def test_caption_predictions_need_id_and_caption_columns(coco_folder, tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"image": "x", "text2": "y"}])
    with pytest.raises(VlmbatchError, match=r"needs an id column \(image_id or id\)"):
        load_caption_predictions(path, load_caption_set("coco", coco_folder))
    with pytest.raises(VlmbatchError, match="predictions file not found"):
        load_caption_predictions(tmp_path / "missing.parquet", CaptionSet("coco", "test", "x"))


def test_vqa_predictions_parquet_and_json(vqa_folder, tmp_path):
    bench = load_vqa_set(vqa_folder)
    parquet = write_parquet(tmp_path / "answers.parquet", [
        {"question_id": "42000", "answer": "yes", "error": None},
        {"question_id": "42001", "answer": None, "error": "decode failed"},
        {"question_id": "99", "answer": "no", "error": None},
    ])
    predictions = load_vqa_predictions(parquet, bench)
    assert predictions.texts == {"42000": "yes"}
    assert (predictions.failed, predictions.unmatched) == (1, 1)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": 73000, "answer": "red"}]))
    assert load_vqa_predictions(results).texts == {"73000": "red"}


def test_a_caption_table_with_image_urls_gives_url_images(tmp_path):
    datasets.Dataset.from_dict({
        "cocoid": [7, 8], "split": ["test", "test"], "sentences": [["a cat"], ["a dog"]],
        "url": ["http://images.example/7.jpg", "not a url"],
    }).save_to_disk(str(tmp_path / "urls"))
    bench = load_caption_set("coco", tmp_path / "urls")
    assert bench.has_images()
    assert [(r.id, r.image) for r in bench.records()] == [("7", Url("http://images.example/7.jpg"))]


def test_vqav2_test_splits_are_questions_without_answers(tmp_path):
    datasets.Dataset.from_dict({"question_id": [1, 2], "question": ["What?", "Who?"], "image_id": [3, 3]}
                               ).save_to_disk(str(tmp_path / "testdev"))
    bench = load_vqa_set(tmp_path / "testdev", "test-dev")
    assert (bench.split, bench.answered) == ("test-dev", False)
    assert [(item.question_id, item.answers) for item in bench.items] == [("1", ()), ("2", ())]
    with pytest.raises(VlmbatchError, match="lacks the column.s. answers a VQA dataset needs"):
        load_vqa_set(tmp_path / "testdev", "validation")  # a split that has public answers must hold them


def test_flickr30k_default_is_the_karpathy_test_split_with_embedded_images(monkeypatch, hub_answers):
    """Shaped as umaru97/flickr30k_train_val_test: image, caption (five), sentids, split, img_id, filename."""
    calls = []
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), (n * 60, 0, 0)) for n in range(2)],
         "caption": [refs_for("1000092795"), refs_for("10002456")], "sentids": [["0"], ["5"]],
         "split": ["test", "test"], "img_id": ["0", "1"], "filename": ["1000092795.jpg", "10002456.jpg"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                                    "sentids": datasets.Sequence(datasets.Value("string")),
                                    "split": datasets.Value("string"), "img_id": datasets.Value("string"),
                                    "filename": datasets.Value("string")}))

    def load_dataset(name, split, streaming):
        calls.append((name, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    bench = load_caption_set("flickr30k")
    assert calls == [("umaru97/flickr30k_train_val_test", "test")]
    assert bench.references() == {"1000092795": refs_for("1000092795"), "10002456": refs_for("10002456")}
    assert [(r.id, type(r.image)) for r in bench.records()] == [("1000092795", bytes), ("10002456", bytes)]


def test_vqav2_test_dev_from_the_official_questions_file(tmp_path):
    """A folder as downloaded from visualqa.org: the test-dev questions (no annotations), test2015/ images."""
    root = tmp_path / "vqav2"
    (root / "test2015").mkdir(parents=True)
    (root / "test2015" / "COCO_test2015_000000000001.jpg").write_bytes(jpeg_bytes((9, 9, 9)))
    (root / "questions").mkdir()
    (root / "questions" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({"questions": [
        {"image_id": 1, "question": "What is it?", "question_id": 1000},
        {"image_id": 1, "question": "Is it big?", "question_id": 1001}]}))
    bench = load_vqa_set(root, "test-dev")
    assert (bench.split, bench.answered, len(bench.items)) == ("test-dev", False, 2)
    assert bench.items[0].image == root / "test2015" / "COCO_test2015_000000000001.jpg"
    assert [r.id for r in bench.records()] == ["1"]
    with pytest.raises(VlmbatchError, match="no v2_OpenEnded_mscoco_test2015_questions.json in .*the official "
                                            "VQAv2 test-std questions are needed"):
        load_vqa_set(root, "test-std")
