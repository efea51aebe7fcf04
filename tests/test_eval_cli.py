"""`vlmbatch eval` end to end: generate with a tiny random checkpoint, then score; and score only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_data
import test_fetch
from cli_runner import invoke
from factory import real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app

runner = CliRunner()
vqa_folder = test_eval_data.vqa_folder


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


# --- one command per benchmark: the default Hub dataset, its images fetched from their URLs ----------------

server = test_fetch.server  # a real HTTP server on 127.0.0.1 serving the test photos (tests/test_fetch.py)
cache = test_fetch.cache  # VLMBATCH_CACHE in tmp_path


@pytest.fixture()
def fake_hub(monkeypatch):
    """The Hub answers with `tables[(name, split)]`: `datasets.load_dataset` stands in for it (these tests
    run offline); everything after it, the images' HTTP included, is real. Records each call."""
    import datasets

    import vlmbatch.sources.hf_datasets

    tables, calls = {}, []
    monkeypatch.setattr(vlmbatch.sources.hf_datasets, "why_unreachable", lambda: None)

    def load_dataset(name, split, streaming):
        calls.append((name, split))
        if (name, split) not in tables:
            raise ValueError(f'Unknown split "{split}"')
        return tables[(name, split)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def karpathy_coco_table(urls: list[str]):
    """A table shaped as yerevann/coco-karpathy's (one row per image, captions in `sentences`, the image
    as a `url`), plus a train row that the test split must leave out."""
    import datasets

    n = len(urls)
    return datasets.Dataset.from_dict({
        "filepath": ["val2014"] * (n + 1),
        "filename": [f"COCO_val2014_{i:012d}.jpg" for i in range(1, n + 2)],
        "cocoid": list(range(1, n + 2)),
        "split": ["test"] * n + ["train"],
        "sentences": [[f"a photo number {i} of something", f"a picture {i}"] for i in range(1, n + 2)],
        "url": [*urls, urls[0]],
    })


@pytest.mark.slow
def test_coco_with_only_a_model_fetches_the_karpathy_test_images_scores_and_reads_the_cache_again(
        server, cache, fake_hub, tmp_path, ckpt):
    tables, calls = fake_hub
    urls = [server.url(f"/photo/{name}.jpg") for name in test_fetch.PHOTOS] + [server.url("/missing")]
    tables[("yerevann/coco-karpathy", "test")] = karpathy_coco_table(urls)
    scores = tmp_path / "scores.json"
    result = invoke("eval", "--dataset", "coco", "--model", ckpt, "--out", scores, "--metrics", "bleu,rouge,cider",
                    "--workers", 0, "--quiet")
    assert calls == [("yerevann/coco-karpathy", "test")]
    report = json.loads(scores.read_text())
    assert (report["covered"], report["total"], report["failed_predictions"]) == (4, 5, 1)
    assert report["settings"]["generation"]["num_beams"] == 2
    assert report["settings"]["generation"]["max_new_tokens"] == 32
    assert report["settings"]["protocol"] == ("prompt 'caption en', beam search (2 beams), at most 32 new tokens "
                                              "(as in big_vision cococap.py: beam_size=2, max_decode_len=32)")
    said = " ".join(result.output.split())
    assert "Settings: prompt 'caption en', beam search (2 beams)" in said and "Partial coverage: scored 4 of 5" in said
    rows = {r["id"]: r for r in pq.read_table(scores.with_name("scores.predictions.parquet")).to_pylist()}
    assert sorted(rows) == ["1", "2", "3", "4", "5"]
    assert rows["5"]["error"] == f"cannot fetch {urls[4]}: HTTP 404"
    assert server.hits["/missing"] == 1
    # Resumed: only the failed image is asked for again; the captioned ones are not fetched at all.
    photo_hits = sum(n for path, n in server.hits.items() if path.startswith("/photo/"))
    invoke("eval", "--dataset", "coco", "--model", ckpt, "--out", scores, "--metrics", "bleu", "--workers", 0, "--quiet")
    assert sum(n for path, n in server.hits.items() if path.startswith("/photo/")) == photo_hits == 4
    assert server.hits["/missing"] == 2
    # The server gone: the same command, afresh, reads every image from the cache and says the same.
    server.stop()
    again = tmp_path / "again.json"
    invoke("eval", "--dataset", "coco", "--model", ckpt, "--out", again, "--metrics", "bleu,rouge,cider",
           "--workers", 0, "--quiet")
    again_rows = {r["id"]: r for r in pq.read_table(again.with_name("again.predictions.parquet")).to_pylist()}
    assert {k: r["caption"] for k, r in again_rows.items()} == {k: r["caption"] for k, r in rows.items()}
    rescored = json.loads(again.read_text())
    assert all(rescored[k] == report[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr"))


@pytest.mark.slow
def test_flags_override_the_benchmark_settings_and_the_report_says_so(server, cache, fake_hub, tmp_path, ckpt):
    tables, _ = fake_hub
    urls = [server.url(f"/photo/{name}.jpg") for name in test_fetch.PHOTOS[:2]]
    tables[("yerevann/coco-karpathy", "test")] = karpathy_coco_table(urls)
    scores = tmp_path / "scores.json"
    invoke("eval", "--dataset", "coco", "--model", ckpt, "--out", scores, "--metrics", "bleu", "--num-beams", 1,
           "--max-new-tokens", 5, "--prompt", "caption es", "--workers", 0, "--quiet")
    settings = json.loads(scores.read_text())["settings"]
    assert (settings["generation"]["num_beams"], settings["generation"]["max_new_tokens"]) == (1, 5)
    assert settings["protocol"].startswith("prompt 'caption es', greedy, at most 5 new tokens (changed from big_vision")
    # --no-fetch-images: each URL is an error row that names the flag, and nothing is scored.
    result = runner.invoke(app, ["eval", "--dataset", "coco", "--model", str(ckpt), "--out", str(tmp_path / "off.json"),
                                 "--no-fetch-images", "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "no usable prediction" in result.output
    rows = pq.read_table(tmp_path / "off.predictions.parquet").to_pylist()
    assert len(rows) == 2 and all("--fetch-images" in row["error"] for row in rows)


@pytest.mark.slow
def test_vqav2_test_dev_writes_the_results_json_for_the_server(fake_hub, tmp_path, ckpt, monkeypatch):
    import datasets

    tables, calls = fake_hub
    photos = [photo.convert("RGB") for photo in list(real_photos().values())[:2]]
    tables[("lmms-lab/VQAv2", "testdev")] = datasets.Dataset.from_dict(
        {"question_id": [5001, 5002, 6001], "question": ["what is it?", "is it big?", "what color?"],
         "image_id": [5, 5, 6], "image": [photos[0], photos[0], photos[1]]},
        features=datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                    "image_id": datasets.Value("int64"), "image": datasets.Image()}))
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--dataset", "vqav2", "--split", "test-dev", "--model", ckpt, "--max-new-tokens", 4,
                    "--workers", 0, "--quiet")
    assert calls == [("lmms-lab/VQAv2", "testdev")]
    results = json.loads((tmp_path / "vqa_OpenEnded_mscoco_test-dev2015_vlmbatch_results.json").read_text())
    assert [entry["question_id"] for entry in results] == [5001, 5002, 6001]
    assert all(set(entry) == {"question_id", "answer"} and isinstance(entry["answer"], str) for entry in results)
    answers = {int(r["question_id"]): r["answer"].strip()
               for r in pq.read_table(tmp_path / "vqav2-test-dev.predictions.parquet").to_pylist()}
    assert {entry["question_id"]: entry["answer"] for entry in results} == answers
    said = " ".join(result.output.split())
    assert ("VQAv2 test-dev has no public answers, so nothing is scored here: wrote 3 of 3 answers to "
            "vqa_OpenEnded_mscoco_test-dev2015_vlmbatch_results.json") in said
    assert "Settings: prompt 'answer en {question}', greedy, at most 4 new tokens" in said


def test_the_help_names_each_benchmarks_default_data_and_settings():
    from vlmbatch.evaluation.benchmarks import DEFAULT_HUB_DATASETS, DEFAULT_SPLITS
    from vlmbatch.evaluation.protocols import PROTOCOLS

    said = " ".join(runner.invoke(app, ["eval", "--help"]).output.replace("│", " ").split())
    for dataset, hub in DEFAULT_HUB_DATASETS.items():
        assert f"{dataset} {hub} split {DEFAULT_SPLITS[dataset]}" in said
        protocol = PROTOCOLS[dataset]
        assert f'"{protocol.prompt}"' in said and f"{protocol.max_new_tokens} tokens" in said
    assert "2 beams" in said and "greedy" in said


def test_without_the_hub_eval_says_so_in_one_line(tmp_path, ckpt):
    """HF_HUB_OFFLINE with an empty cache: one line naming the dataset and what to do, exit 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "VLMBATCH_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "vlmbatch", "eval", "--dataset", "flickr30k", "--model", str(ckpt)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub to load umaru97/flickr30k_train_val_test")
    assert "pass a local copy with --data" in lines[0]
