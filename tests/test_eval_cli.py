"""`vlmbatch eval` end to end: generate with a tiny random checkpoint, then score; and score only."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_data
from factory import real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app

runner = CliRunner()
vqa_folder = test_eval_data.vqa_folder


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("pg1_untied", "hub", image_size=28, eos_boost=3.0).path


def invoke(*args):
    result = runner.invoke(app, [*map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture()
def coco_folder(tmp_path):
    """An official-format COCO captions folder: captions_val2014.json and val2014/ images."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images, annotations = [], []
    for i, (name, photo) in enumerate(list(real_photos().items())[:4], start=1):
        file_name = f"COCO_val2014_{i:012d}.jpg"
        photo.convert("RGB").save(root / "val2014" / file_name)
        images.append({"id": i, "file_name": file_name})
        annotations += [{"id": 10 * i + j, "image_id": i, "caption": f"a photo of a {name} number {j}"}
                        for j in range(5)]
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.mark.slow
def test_generate_then_score_captions_and_resume(coco_folder, tmp_path, ckpt):
    scores = tmp_path / "scores.json"
    args = ["eval", "--dataset", "coco", "--data", coco_folder, "--out", scores, "--model", ckpt,
            "--metrics", "bleu,rouge,cider", "--max-new-tokens", 6, "--workers", 0, "--quiet"]
    result = invoke(*args)
    report = json.loads(scores.read_text())
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= report.keys()
    assert report["model"] == str(ckpt) and report["settings"]["generation"]["max_new_tokens"] == 6
    predictions = scores.with_name("scores.predictions.parquet")
    rows = pq.read_table(predictions).to_pylist()
    assert sorted(r["id"] for r in rows) == ["1", "2", "3", "4"]
    assert "CIDEr" in result.output
    # Scoring the same predictions explicitly gives the same numbers; rerunning generates nothing new.
    again = tmp_path / "again.json"
    invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", predictions, "--out", again,
           "--metrics", "bleu,rouge,cider")
    rescored = json.loads(again.read_text())
    assert all(rescored[k] == pytest.approx(report[k], abs=1e-12) for k in ("Bleu_1", "ROUGE_L", "CIDEr"))
    invoke(*args)
    assert len(pq.read_table(predictions)) == 4


@pytest.mark.slow
def test_a_limited_eval_runs_the_model_on_the_first_images_and_a_full_one_resumes_it(coco_folder, tmp_path, ckpt):
    scores = tmp_path / "scores.json"
    args = ["eval", "--dataset", "coco", "--data", coco_folder, "--out", scores, "--model", ckpt,
            "--metrics", "bleu", "--max-new-tokens", 4, "--workers", 0, "--quiet"]
    result = invoke(*args, "--limit", 2)
    predictions = scores.with_name("scores.predictions.parquet")
    assert sorted(r["id"] for r in pq.read_table(predictions).to_pylist()) == ["1", "2"]
    report = json.loads(scores.read_text())
    assert (report["covered"], report["total"], report["limit"], report["split_total"]) == (2, 2, 2, 4)
    assert "Limited to the first 2 of the split's 4 images (--limit)" in " ".join(result.output.split())
    invoke(*args)  # the whole split: the two generated images are kept, the other two added
    assert sorted(r["id"] for r in pq.read_table(predictions).to_pylist()) == ["1", "2", "3", "4"]
    report = json.loads(scores.read_text())
    assert (report["covered"], report["total"]) == (4, 4) and "limit" not in report


@pytest.mark.slow
def test_generate_then_score_vqav2(tmp_path, ckpt):
    root = tmp_path / "vqa"
    (root / "val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i, photo in enumerate(list(real_photos().values())[:3], start=1):
        photo.convert("RGB").save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        for j, q in enumerate(["what is this?", "is it red?"]):
            qid = 100 * i + j
            questions.append({"image_id": i, "question": q, "question_id": qid})
            answers = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                       for k, a in enumerate(["yes"] * 6 + ["no"] * 4)]
            annotations.append({"image_id": i, "question_id": qid, "answers": answers,
                                "answer_type": "yes/no", "question_type": "is it", "multiple_choice_answer": "yes"})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    scores = tmp_path / "vqa.json"
    per_item = tmp_path / "items.parquet"
    invoke("eval", "--dataset", "vqav2", "--data", root, "--out", scores, "--per-item", per_item,
           "--model", ckpt, "--max-new-tokens", 4, "--workers", 0, "--quiet")
    report = json.loads(scores.read_text())
    assert 0 <= report["overall"] <= 100 and "yes/no" in report["perAnswerType"]
    answers = {r["question_id"]: r["answer"] for r in pq.read_table(scores.with_name("vqa.predictions.parquet")).to_pylist()}
    assert len(answers) == 6
    items = pq.read_table(per_item).to_pylist()
    assert {str(r["question_id"]) for r in items} == {str(q["question_id"]) for q in questions}


def test_commands_that_run_no_model_do_not_import_torch(vqa_folder, tmp_path):
    """`--help`, a mistaken job spec and scoring saved predictions need no model: each, in a fresh
    interpreter, exits as it should without importing torch (2-3 s of a small CPU's start-up)."""
    predictions = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist([{"question_id": "42000", "answer": "yes", "error": None}]), predictions)
    bad_spec = tmp_path / "job.toml"
    bad_spec.write_text('task = "caption"\nsource = "photos"\nout = "caps.parquet"\nbatch_sise = 8\n')
    scores = tmp_path / "scores.json"
    code = """
import sys
from vlmbatch.__main__ import main
sys.argv = ["vlmbatch", *sys.argv[1:]]
try:
    main()
    status = 0
except SystemExit as done:
    status = done.code or 0
print("exit", status, "torch imported" if "torch" in sys.modules else "no torch")
"""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)

    for args in (["--help"], ["eval", "--help"],
                 ["eval", "--dataset", "vqav2", "--data", str(vqa_folder), "--predictions", str(predictions),
                  "--out", str(scores)]):
        done = run(*args)
        assert done.stdout.splitlines()[-1] == "exit 0 no torch", (args, done.stdout, done.stderr)
    assert json.loads(scores.read_text())["overall"] == 100.0  # the one question answered, answered right
    done = run("run", str(bad_spec))
    assert done.stdout.splitlines()[-1] == "exit 2 no torch", done.stderr
    assert "unknown keys batch_sise" in done.stderr
