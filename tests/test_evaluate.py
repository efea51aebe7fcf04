"""`run_eval` end to end: from a predictions file or a generator, to the scores JSON, per-item Parquet and report."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_data
from rich.console import Console

from vlmbatch.errors import VlmbatchError
from vlmbatch.evaluation.captions_data import CaptionItem, CaptionSet
from vlmbatch.evaluation.metrics import spice as spice_module
from vlmbatch.evaluation.metrics.captions import score_captions
from vlmbatch.evaluation.metrics.vqa import score_vqa
from vlmbatch.evaluation.run import (
    EvalRequest,
    caption_metric_families,
    render_report,
    run_eval,
)
from vlmbatch.evaluation.vqa_data import load_vqa_set

# The benchmark folders of the loader tests, as fixtures here too.
coco_folder = test_eval_data.coco_folder
vqa_folder = test_eval_data.vqa_folder
coco_name = test_eval_data.coco_name

FAST_CAPTION_METRICS = ["bleu", "ROUGE-L", "cider", "spice"]  # METEOR's JVM start is covered elsewhere


@pytest.fixture(autouse=True)
def no_corenlp(monkeypatch, tmp_path):
    """SPICE cannot run in tests (no CoreNLP); make that so even where it is provisioned."""
    monkeypatch.setattr(spice_module, "default_search_dirs", lambda: [tmp_path / "no-corenlp"])


def read_parquet(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def test_captions_from_official_results_json(coco_folder, tmp_path):
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps([{"image_id": 42, "caption": "caption 0 of image 42"},
                                       {"image_id": 73, "caption": "a picture of image 73"}]))
    request = EvalRequest(dataset="coco", data=str(coco_folder), predictions=predictions,
                          out=tmp_path / "scores.json", per_item=tmp_path / "items.parquet",
                          metrics=FAST_CAPTION_METRICS, model="google/paligemma-3b-mix-224",
                          settings={"prompt": "caption en", "max_new_tokens": 32})
    report = run_eval(request)

    expected = score_captions({"42": [f"caption {n} of image 42" for n in range(5)],
                               "73": [f"caption {n} of image 73" for n in range(5)]},
                              {"42": "caption 0 of image 42", "73": "a picture of image 73"},
                              metrics=("Bleu", "ROUGE_L", "CIDEr"))
    assert report.scores == expected.corpus
    assert list(report.scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert (report.covered, report.total, report.partial) == (2, 2, False)

    written = json.loads((tmp_path / "scores.json").read_text())
    assert {k: written[k] for k in expected.corpus} == pytest.approx(expected.corpus)
    assert (written["dataset"], written["split"], written["n_items"], written["covered"], written["total"]) == \
        ("coco", "test", 2, 2, 2)
    assert written["model"] == "google/paligemma-3b-mix-224"
    assert written["settings"] == {"prompt": "caption en", "max_new_tokens": 32}
    assert written["skipped"]["SPICE"].startswith("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found")

    items = read_parquet(tmp_path / "items.parquet")
    assert list(items) == ["image_id", "prediction", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert items["image_id"] == ["42", "73"]
    assert items["CIDEr"] == pytest.approx(expected.per_item["CIDEr"])


def test_partial_coverage_and_failed_rows_are_reported(coco_folder, tmp_path):
    predictions = tmp_path / "captions.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": f"val2014/{coco_name(42)}", "caption": "caption 1 of image 42", "error": None},
        {"id": f"val2014/{coco_name(73)}", "caption": None, "error": "cannot decode image"},
    ]), predictions)
    report = run_eval(EvalRequest(dataset="coco", data=str(coco_folder), predictions=predictions,
                                  metrics=FAST_CAPTION_METRICS))
    assert (report.covered, report.total, report.failed) == (1, 2, 1)
    notes = report.notes()
    assert notes[0].startswith("Partial coverage: scored 1 of 2 images (50.0%); 1 have no usable prediction "
                               "(1 prediction rows failed)")
    assert notes[1].startswith("SPICE skipped:")
    assert all("\n" not in note for note in notes)


def test_vqa_from_vlmbatch_parquet(vqa_folder, tmp_path):
    predictions = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question_id": "42000", "answer": "Yes.", "error": None},
        {"question_id": "42001", "answer": "two", "error": None},
        {"question_id": "73000", "answer": "blue", "error": None},
    ]), predictions)
    report = run_eval(EvalRequest(dataset="vqav2", data=str(vqa_folder), predictions=predictions,
                                  out=tmp_path / "vqa.json", per_item=tmp_path / "vqa.parquet"))
    bench = load_vqa_set(vqa_folder)
    expected = score_vqa(bench.items, {"42000": "Yes.", "42001": "two", "73000": "blue"})
    assert report.scores == expected.to_dict()
    written = json.loads((tmp_path / "vqa.json").read_text())
    assert written["overall"] == expected.overall
    assert written["perAnswerType"] == expected.per_answer_type
    assert written["perQuestionType"] == expected.per_question_type
    assert (written["split"], written["covered"], written["total"]) == ("val2014", 3, 3)
    items = read_parquet(tmp_path / "vqa.parquet")
    assert items == {"question_id": ["42000", "42001", "73000"], "answer": ["Yes.", "two", "blue"],
                     "accuracy": expected.accuracies, "answer_type": ["yes/no", "number", "other"],
                     "question_type": ["is it", "how many", "what color is the"]}


class FakeGenerate:
    """Stands in for the pipeline: records what it was given and writes predictions like `vlmbatch` does."""

    def __init__(self, answer: str = "caption 2 of image"):
        self.answer = answer
        self.calls: list[tuple] = []

    def __call__(self, task, records, questions, out_path):
        records = list(records)
        self.calls.append((task, records, questions, out_path))
        if task == "caption":
            rows = [{"id": r.id, "caption": f"{self.answer} {r.id}", "error": None} for r in records]
        else:
            rows = [{"question_id": q.question_id, "answer": self.answer, "error": None} for q in questions]
        pq.write_table(pa.Table.from_pylist(rows), out_path)
        return out_path


def test_generation_path_for_captions(coco_folder, tmp_path):
    generate = FakeGenerate()
    out = tmp_path / "results" / "coco.json"
    out.parent.mkdir()
    report = run_eval(EvalRequest(dataset="coco", data=str(coco_folder), out=out, metrics=["bleu"]), generate)
    task, records, questions, out_path = generate.calls[0]
    assert (task, questions) == ("caption", None)
    assert [(r.id, r.image) for r in records] == [("42", coco_folder / "val2014" / coco_name(42)),
                                                  ("73", coco_folder / "val2014" / coco_name(73))]
    assert out_path == tmp_path / "results" / "coco.predictions.parquet"
    assert report.predictions == str(out_path)
    assert report.covered == 2 and report.scores["Bleu_1"] > 0.9


def test_generation_path_for_vqa(vqa_folder, tmp_path):
    generate = FakeGenerate(answer="yes")
    report = run_eval(EvalRequest(dataset="vqav2", data=str(vqa_folder), out=tmp_path / "v.json"), generate)
    task, records, questions, _ = generate.calls[0]
    assert task == "vqa"
    assert [r.id for r in records] == ["42", "73"]
    assert [(q.image, q.question_id) for q in questions] == [("42", "42000"), ("42", "42001"), ("73", "73000")]
    assert report.scores["perAnswerType"] == {"yes/no": 100.0, "number": 0.0, "other": 0.0}


def test_limit_generates_and_scores_only_the_first_images(coco_folder, tmp_path):
    generate = FakeGenerate()
    out = tmp_path / "coco.json"
    report = run_eval(EvalRequest(dataset="coco", data=str(coco_folder), out=out, metrics=["bleu"], limit=1),
                      generate)
    _, records, _, _ = generate.calls[0]
    assert [r.id for r in records] == ["42"]
    alone = score_captions({"42": [f"caption {n} of image 42" for n in range(5)]},
                           {"42": "caption 2 of image 42"}, metrics=("Bleu",))
    assert report.scores == alone.corpus
    assert (report.covered, report.total, report.split_total, report.partial) == (1, 1, 2, False)
    assert report.notes() == ["Limited to the first 1 of the split's 2 images (--limit): a quick check, "
                              "not comparable with full-split results."]
    written = json.loads(out.read_text())
    assert (written["covered"], written["total"], written["limit"], written["split_total"]) == (1, 1, 1, 2)
    report = run_eval(EvalRequest(dataset="coco", data=str(coco_folder), out=tmp_path / "all.json", metrics=["bleu"],
                                  limit=5), generate)
    assert report.split_total is None and report.total == 2 and not report.notes()  # a limit past the end


def test_limit_on_saved_predictions_counts_the_rest_as_neither_unmatched_nor_missing(vqa_folder, tmp_path):
    predictions = tmp_path / "answers.parquet"
    answers = {"42000": "yes", "42001": "2", "73000": "blue"}
    pq.write_table(pa.Table.from_pylist([{"question_id": q, "answer": a, "error": None}
                                         for q, a in answers.items()]), predictions)
    report = run_eval(EvalRequest(dataset="vqav2", data=str(vqa_folder), predictions=predictions, limit=2))
    bench = load_vqa_set(vqa_folder)
    assert report.scores == score_vqa(bench.items[:2], {q: answers[q] for q in ("42000", "42001")}).to_dict()
    assert (report.covered, report.total, report.split_total, report.unmatched) == (2, 2, 3, 0)
    assert len(report.notes()) == 1 and "first 2 of the split's 3 questions" in report.notes()[0]


def test_a_limited_set_reads_only_its_own_lazy_images_and_stops_once_found():
    read = []

    def images():
        for n in range(100):
            read.append(n)
            yield str(n), f"img{n}.jpg".encode()

    items = [CaptionItem(str(n), f"{n}.jpg", ("a caption",)) for n in (3, 1, 7, 5)]
    head = CaptionSet("coco", "test", "test data", items=items, image_source=images).head(3)
    assert [item.image_id for item in head.items] == ["3", "1", "7"]
    assert [(r.id, r.image) for r in head.records()] == [("1", b"img1.jpg"), ("3", b"img3.jpg"), ("7", b"img7.jpg")]
    assert read == list(range(8))  # image 7 was the last wanted


def test_limit_below_one_is_refused(coco_folder):
    with pytest.raises(VlmbatchError, match="--limit must be at least 1"):
        run_eval(EvalRequest(dataset="coco", data=str(coco_folder), metrics=["bleu"], limit=0), FakeGenerate())


def test_generation_needs_images_and_a_generator(tmp_path, coco_folder):
    with pytest.raises(VlmbatchError, match="no --predictions file given, and no model"):
        run_eval(EvalRequest(dataset="coco", data=str(coco_folder)))
    annotations_only = tmp_path / "dataset_coco.json"
    annotations_only.write_text((coco_folder / "dataset_coco.json").read_text())
    with pytest.raises(VlmbatchError, match="holds no images to run a model on"):
        run_eval(EvalRequest(dataset="coco", data=str(annotations_only)), FakeGenerate())


def test_predictions_for_another_dataset_are_rejected(coco_folder, tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"image_id": 999, "caption": "x"}]))
    with pytest.raises(VlmbatchError, match="no usable prediction in .* for coco test .*1 unmatched"):
        run_eval(EvalRequest(dataset="coco", data=str(coco_folder), predictions=predictions))


def test_unknown_dataset_and_metric():
    with pytest.raises(VlmbatchError, match="unknown dataset 'gqa'"):
        run_eval(EvalRequest(dataset="gqa"))
    with pytest.raises(VlmbatchError, match="unknown caption metric 'bleurt'"):
        caption_metric_families(["bleurt"])
    assert caption_metric_families(["SPICE", "bleu_4", "Cider"]) == ("Bleu", "CIDEr", "SPICE")


def test_render_report_prints_scores_and_notes(coco_folder, tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"image_id": 42, "caption": "caption 3 of image 42"}]))
    report = run_eval(EvalRequest(dataset="coco", data=str(coco_folder), predictions=predictions,
                                  metrics=FAST_CAPTION_METRICS))
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "coco test — 1 of 2 images" in text
    assert f"{report.scores['CIDEr']:.4f}" in text and "Bleu_4" in text
    assert "Partial coverage: scored 1 of 2 images" in text
    assert "SPICE skipped: Stanford CoreNLP 3.6.0 jars not found" in text


def test_render_vqa_report(vqa_folder, tmp_path):
    predictions = tmp_path / "a.json"
    predictions.write_text(json.dumps([{"question_id": 42000, "answer": "yes"}]))
    report = run_eval(EvalRequest(dataset="vqav2", data=str(vqa_folder), predictions=predictions))
    console = Console(record=True, width=200)
    render_report(report, console, question_types=True)
    text = console.export_text()
    assert "overall (VQA accuracy, %)" in text and "100.00" in text
    assert "question type: is it" in text
    assert "Partial coverage: scored 1 of 3 questions" in text
