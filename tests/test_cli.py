"""End-to-end: the `vlmbatch caption` / `vlmbatch vqa` commands on tiny random checkpoints."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import invoke
from factory import broken_images, drop_tensor, photo_variants, real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.engine.scheduler import Engine, ImageWork
from vlmbatch.model.loading import load_model, resolve_checkpoint
from vlmbatch.model.processor import Processor
from vlmbatch.model.siglip import SiglipVisionTower
from vlmbatch.pipeline import default_workers
from vlmbatch.sources.images import load_resized
from vlmbatch.spec import GenerationSettings

runner = CliRunner()


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i, (name, image) in enumerate(list(real_photos().items())[:6]):
        sub = ["", "nested/", "nested/deeper/"][i % 3]
        image.convert("RGB").save(root / f"{sub}{name}.jpg")
    return root


def caption(folder, out, ckpt, *extra, expect=0):
    return invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--workers", 0,
                  "--quiet", *extra, expect=expect)


def encoded_images(monkeypatch) -> list[int]:
    """From now on, the number of images of each vision-tower call (what a resume must not redo)."""
    encoded: list[int] = []
    original = SiglipVisionTower.forward
    monkeypatch.setattr(SiglipVisionTower, "forward", lambda self, px: encoded.append(len(px)) or original(self, px))
    return encoded


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def direct_captions(ckpt, refs: dict[str, Path | bytes], prompt="caption en", max_new_tokens=8,
                    cpu_matmul="torch") -> dict[str, str]:
    """What the engine gives for the same images, without the pipeline."""
    checkpoint = resolve_checkpoint(str(ckpt))
    model = load_model(checkpoint, cpu_matmul=cpu_matmul)
    processor = Processor.from_dir(checkpoint.path, checkpoint.config)
    size = checkpoint.config.vision.image_size
    work = [ImageWork(load_resized(ref, size), [(key, processor.prompt_ids(prompt))]) for key, ref in refs.items()]
    engine = Engine(model, GenerationSettings(max_new_tokens=max_new_tokens), max_slots=4)
    return {c.key: processor.decode(c.tokens) for c in engine.run(work)}


# -- sources --------------------------------------------------------------------------------------
def test_folder_captions_equal_the_engine_and_carry_metadata(folder, tmp_path, ckpt):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    table = rows(out)
    ids = sorted(r["id"] for r in table)
    expected_ids = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert ids == expected_ids and any("/" in i for i in ids)
    expected = direct_captions(ckpt, {i: folder / i for i in ids})
    assert {r["id"]: r["caption"] for r in table} == expected
    assert all(r["error"] is None for r in table) and any(r["num_tokens"] > 0 for r in table)
    for r in table:  # a caption that hit the limit has all its tokens; one that ended early has fewer
        assert (r["finish_reason"], r["num_tokens"] == 8) in {("length", True), ("eos", False)}
    meta = pq.read_metadata(out).metadata
    settings = json.loads(meta[b"vlmbatch.settings"])
    assert settings["prompt"] == "caption en" and settings["generation"]["max_new_tokens"] == 8
    assert settings["weights"] == meta[b"vlmbatch.model_fingerprint"].decode() == resolve_checkpoint(
        str(ckpt)).fingerprint()
    assert meta[b"vlmbatch.model"].decode() == str(ckpt) and meta[b"vlmbatch.version"]


@pytest.mark.parametrize("cpu_matmul, header", [("torch", None), ("onednn", "oneDNN matmuls)"),
                                                ("onednn+gelu", "oneDNN matmuls + GELU)")])
def test_cpu_matmul_flag_picks_the_library_and_the_captions_stay(folder, tmp_path, ckpt, cpu_matmul, header):
    out = tmp_path / "caps.parquet"
    result = invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--workers", 0,
                    "--cpu-matmul", cpu_matmul)
    said = " ".join(result.output.split())
    assert ("oneDNN" in said) == (header is not None) and (header is None or header in said)
    table = rows(out)
    assert {r["id"]: r["caption"] for r in table} == direct_captions(ckpt, {r["id"]: folder / r["id"] for r in table},
                                                                     cpu_matmul=cpu_matmul)
    assert "cpu_matmul" not in json.loads(pq.read_metadata(out).metadata[b"vlmbatch.settings"])  # resumable either way


@pytest.mark.parametrize("flag, expected", [((), True), (("--no-cuda-graph",), False)])
def test_cuda_graph_flag_reaches_the_engine(folder, tmp_path, ckpt, monkeypatch, flag, expected):
    """By default graphs are allowed, and the engine takes them where they apply (on CUDA for greedy
    decoding, `engine.graphs_apply`); --no-cuda-graph turns them off whatever the device. Captions
    stay those of the engine."""
    import vlmbatch.pipeline

    seen = []

    def recording_engine(*args, **kwargs):
        seen.append(kwargs["cuda_graph"])
        return Engine(*args, **kwargs)

    monkeypatch.setattr(vlmbatch.pipeline, "Engine", recording_engine)
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, *flag)
    assert seen == [expected]
    table = rows(out)
    assert {r["id"]: r["caption"] for r in table} == direct_captions(ckpt, {r["id"]: folder / r["id"] for r in table})


def test_cpu_matmul_applies_to_float32_on_a_cpu_only():
    from vlmbatch.pipeline import resolve_cpu_matmul

    assert resolve_cpu_matmul("onednn", torch.device("cpu"), torch.float32) == "onednn"
    assert resolve_cpu_matmul("onednn+gelu", torch.device("cpu"), torch.float32) == "onednn+gelu"
    assert resolve_cpu_matmul("onednn", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_cpu_matmul("onednn", torch.device("cuda"), torch.float32) == "torch"


def test_single_image_file(folder, tmp_path, ckpt):
    out = tmp_path / "one.parquet"
    file = next(folder.glob("*.jpg"))
    caption(file, out, ckpt)
    assert [r["id"] for r in rows(out)] == [file.name]


def test_saved_dataset_and_manifest(folder, tmp_path, ckpt):
    files = sorted(folder.rglob("*.jpg"))[:3]
    ds = datasets.Dataset.from_dict({"key": [f"k{i}" for i in range(3)], "img": [str(f) for f in files]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    out = tmp_path / "ds.parquet"
    caption(tmp_path / "saved", out, ckpt, "--id-column", "key")
    expected = direct_captions(ckpt, {f"k{i}": f for i, f in enumerate(files)})
    assert {r["id"]: r["caption"] for r in rows(out)} == expected

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": f.name, "name": f.stem}) + "\n" for f in files))
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    out2 = tmp_path / "manifest.parquet"
    caption(manifest, out2, ckpt, "--image-column", "path", "--id-column", "name")
    assert {r["id"]: r["caption"] for r in rows(out2)} == {f.stem: expected[f"k{i}"] for i, f in enumerate(files)}


def test_a_manifest_resorted_and_grown_at_the_top_resumes_by_image_path(folder, tmp_path, ckpt, monkeypatch):
    """A scheduled job over a manifest that is regenerated between runs (new uploads first): each
    caption stays with its image, and only the new image goes through the model."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    manifest = folder / "manifest.csv"
    manifest.write_text("image\n" + "".join(f"{name}\n" for name in files[1:4]))
    out = tmp_path / "caps.parquet"
    caption(manifest, out, ckpt)
    first = {r["id"]: r["caption"] for r in rows(out)}
    assert sorted(first) == files[1:4]
    manifest.write_text("image\n" + "".join(f"{name}\n" for name in [files[0], *reversed(files[1:4])]))
    encoded = encoded_images(monkeypatch)
    caption(manifest, out, ckpt)
    assert sum(encoded) == 1
    table = {r["id"]: r["caption"] for r in rows(out)}
    assert table == direct_captions(ckpt, {name: folder / name for name in files[:4]})
    assert {name: table[name] for name in first} == first


def test_a_source_that_repeats_an_id_gets_one_row_for_it_from_its_first_record(folder, tmp_path, ckpt):
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    manifest = folder / "manifest.csv"  # an id column with a repeat, and one path listed twice
    manifest.write_text(f"image,id\n{files[0]},a\n{files[1]},b\n{files[2]},a\n{files[1]},b\n")
    out = tmp_path / "caps.parquet"
    result = caption(manifest, out, ckpt, "--batch-size", 2)
    assert "skipped 2 source record(s) whose id an earlier record of this run had" in result.output
    captions = {r["id"]: r["caption"] for r in rows(out)}
    assert len(rows(out)) == 2 and captions == direct_captions(ckpt, {"a": folder / files[0], "b": folder / files[1]})
    manifest.write_text(f"image\n{files[0]}\n./{files[0]}\n{files[1]}\n")
    answers = tmp_path / "answers.parquet"
    result = invoke("vqa", manifest, "--question", "what is this?", "--out", answers, "--model", ckpt,
                    "--max-new-tokens", 4, "--workers", 0, "--quiet")
    assert result.output.count("skipped 1 source record(s)") == 1
    assert sorted(r["id"] for r in rows(answers)) == files[:2]


# -- VQA ------------------------------------------------------------------------------------------
def test_vqa_several_questions_per_image_encode_each_image_once(folder, tmp_path, ckpt, monkeypatch):
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[:3]
    questions = tmp_path / "q.jsonl"
    lines = [{"image": img, "question": q, "question_id": f"{n}-{j}"}
             for n, img in enumerate(images) for j, q in enumerate(["what is this?", "what color?", "how many?"])]
    lines.append({"image": "missing.jpg", "question": "anything?", "question_id": "lost"})
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))

    encoded = encoded_images(monkeypatch)
    out = tmp_path / "answers.parquet"
    invoke("vqa", folder, "--questions", questions, "--out", out, "--model", ckpt, "--max-new-tokens", 6,
           "--workers", 0, "--quiet")
    assert sum(encoded) == len(images)  # one vision pass per distinct image, not per question

    table = {r["question_id"]: r for r in rows(out)}
    assert len(table) == len(lines)
    assert table["lost"]["error"] == "image not found in source" and table["lost"]["answer"] is None
    first = table["0-1"]
    assert first["id"] == images[0] and first["question"] == "what color?"
    assert first["prompt"] == "answer en what color?"
    expected = direct_captions(ckpt, {"x": folder / images[0]}, prompt="answer en what color?", max_new_tokens=6)
    assert first["answer"] == expected["x"]


def test_vqa_limit_leaves_unreached_questions_for_the_next_run(folder, tmp_path, ckpt):
    """--limit stops before the source's end: questions about images not reached yet are not
    'missing from the source', and a later run answers them."""
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": img, "question": "what?"}) + "\n" for img in images))
    out = tmp_path / "a.parquet"
    args = ["vqa", folder, "--questions", questions, "--out", out, "--model", ckpt, "--max-new-tokens", 4,
            "--workers", 0, "--quiet"]
    invoke(*args, "--limit", 2)
    assert len(rows(out)) == 2 and all(r["error"] is None for r in rows(out))
    invoke(*args)
    table = rows(out)
    assert sorted(r["id"] for r in table) == images and all(r["error"] is None for r in table)


def test_progress_counts_images_not_rows(folder, tmp_path, ckpt):
    """A resumed VQA run with several questions per image: skipped images and processed images add up
    to the source's images, never to its question rows."""
    from vlmbatch.pipeline import Job, JobSpec

    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": img, "question": q}) + "\n" for img in images
                                 for q in ("what?", "where?", "who?")))
    out = tmp_path / "a.parquet"
    common = dict(task="vqa", source=str(folder), out=out, questions=str(questions), model=str(ckpt), workers=0)
    Job(JobSpec(**common, limit=2)).run()
    summary = Job(JobSpec(**common)).run()
    assert summary.images_skipped == 2 and summary.images == len(images) - 2
    assert summary.already_done == 6


def test_an_overlong_question_is_an_error_row_not_a_crash(folder, tmp_path, ckpt):
    image = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[0]
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": image, "question": "why " * 400, "question_id": "long"}) + "\n"
                         + json.dumps({"image": image, "question": "what?", "question_id": "short"}) + "\n")
    out = tmp_path / "a.parquet"
    invoke("vqa", folder, "--questions", questions, "--out", out, "--model", ckpt, "--workers", 0, "--quiet")
    table = {r["question_id"]: r for r in rows(out)}
    assert table["long"]["error"].startswith("prompt too long") and table["long"]["answer"] is None
    assert table["short"]["error"] is None and table["short"]["answer"] is not None


def test_vqa_single_question_for_every_image(folder, tmp_path, ckpt):
    out = tmp_path / "a.parquet"
    invoke("vqa", folder, "--question", "what is it?", "--out", out, "--model", ckpt, "--workers", 0, "--quiet")
    table = rows(out)
    assert len(table) == 6 and all(r["question"] == "what is it?" and r["answer"] is not None for r in table)


# -- bad input ------------------------------------------------------------------------------------
def test_broken_and_awkward_images(tmp_path, ckpt):
    root = tmp_path / "mixed"
    root.mkdir()
    awkward = photo_variants(root / "awkward")
    broken = broken_images(root / "broken")
    (root / "notes.txt").write_text("not an image, and not an image extension")
    out = tmp_path / "mixed.parquet"
    result = caption(root, out, ckpt)
    assert result.exit_code == 0
    table = {r["id"]: r for r in rows(out)}
    assert len(table) == len(awkward) + len(broken)
    for path in broken.values():
        row = table[path.relative_to(root).as_posix()]
        assert row["error"] and row["caption"] is None and row["finish_reason"] == "error"
    for path in awkward.values():
        row = table[path.relative_to(root).as_posix()]
        assert row["error"] is None and row["caption"] is not None, row


def test_summary_counts_errors(tmp_path, ckpt):
    root = tmp_path / "b"
    broken_images(root)
    result = invoke("caption", root, "--out", tmp_path / "b.parquet", "--model", ckpt, "--workers", 0)
    assert "errors" in result.output and str(len(list(root.iterdir()))) in result.output


def test_a_log_gets_a_progress_line_that_says_what_was_read_and_what_written(folder, tmp_path, ckpt):
    """Off a terminal (cron, a log file) progress is a plain line every 10 s, the first at once."""
    result = invoke("caption", folder, "--out", tmp_path / "p.parquet", "--model", ckpt, "--max-new-tokens", 4,
                    "--workers", 0)
    line = next(line for line in result.output.splitlines() if line.startswith("caption: "))
    assert re.fullmatch(r"caption: \d+/6 images \(\d+ processed, \d+ skipped\), \d+ rows written, 0 errors, "
                        r"[\d.]+ rows/s, \d+:\d\d:\d\d left", line), line


@pytest.mark.parametrize("case, args, message", [
    ("missing model", ["caption", "{folder}", "--out", "{tmp}/o.parquet", "--model", "{tmp}/no-model"], "model not found"),
    ("missing source", ["caption", "{tmp}/nothing-here", "--out", "{tmp}/o.parquet", "--model", "{ckpt}"], "not found"),
    ("unknown column", ["caption", "{tmp}/m.jsonl", "--out", "{tmp}/o.parquet", "--model", "{ckpt}",
                        "--image-column", "picture"], "picture"),
    ("unwritable out", ["caption", "{folder}", "--out", "/proc/vlmbatch/o.parquet", "--model", "{ckpt}"], "error"),
    ("vqa without questions", ["vqa", "{folder}", "--out", "{tmp}/o.parquet", "--model", "{ckpt}"], "--questions"),
    ("unknown cpu matmul", ["caption", "{folder}", "--out", "{tmp}/o.parquet", "--model", "{ckpt}",
                            "--cpu-matmul", "mkl"], "unknown --cpu-matmul 'mkl' (use auto, onednn+gelu, onednn, torch)"),
])
def test_fatal_mistakes_are_one_line(case, args, message, folder, tmp_path, ckpt):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg"}) + "\n")
    args = [a.format(folder=folder, tmp=tmp_path, ckpt=ckpt) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (case, result.output)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (case, result.output)
    assert "Traceback" not in result.output


def test_a_broken_checkpoint_stops_the_run_before_any_row(folder, tmp_path, ckpt):
    """The weights load only once an image needs them, but a checkpoint that cannot load is refused
    up front: broken images met first get no error rows written under a model that never ran."""
    broken_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken_ckpt)
    drop_tensor(broken_ckpt, "layers.0.mlp.up_proj")
    broken_images(folder / "0-broken")  # walked first
    out = tmp_path / "o.parquet"
    result = caption(folder, out, broken_ckpt, expect=2)
    assert "missing tensors: text.layers.0.mlp.up_proj.weight" in result.output
    assert not out.exists() and not list(Path(str(out) + ".parts").glob("*.parquet"))


def test_debug_shows_the_traceback(folder, tmp_path):
    result = runner.invoke(app, ["caption", str(folder), "--out", str(tmp_path / "o.parquet"),
                                 "--model", str(tmp_path / "none"), "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.output


# -- resume ---------------------------------------------------------------------------------------
def test_rerun_processes_only_new_images(folder, tmp_path, ckpt, monkeypatch):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    first = {r["id"]: r["caption"] for r in rows(out)}
    (folder / "new").mkdir()
    real_photos()["coins"].save(folder / "new" / "coins-copy.PNG")
    encoded = encoded_images(monkeypatch)
    caption(folder, out, ckpt)
    assert sum(encoded) == 1
    second = {r["id"]: r["caption"] for r in rows(out)}
    assert len(rows(out)) == len(first) + 1 and {k: second[k] for k in first} == first
    assert second["new/coins-copy.PNG"] is not None


def test_rerun_with_nothing_to_generate_loads_no_model(folder, tmp_path, ckpt, monkeypatch):
    """A scheduled job over a folder that did not change, or that only gained broken files, must not
    pay for loading the weights (seconds to minutes for a real checkpoint) or starting device workers."""
    import vlmbatch.pipeline

    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    before = rows(out)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded with nothing to generate")

    monkeypatch.setattr(vlmbatch.pipeline, "load_model", refuse)
    monkeypatch.setattr(vlmbatch.pipeline, "run_on_devices", refuse)
    caption(folder, out, ckpt)
    caption(folder, out, ckpt, "--devices", "cpu,cpu")
    assert rows(out) == before
    broken = broken_images(folder / "broken")
    caption(folder, out, ckpt)
    after = {r["id"]: r for r in rows(out)}
    assert len(after) == len(before) + len(broken)
    assert all(after[f"broken/{path.name}"]["error"] for path in broken.values())
    written = out.read_bytes()
    caption(folder, out, ckpt)  # the broken files are tried again, fail the same way: nothing is rewritten
    assert out.read_bytes() == written


def test_an_image_that_failed_is_tried_again_by_the_next_run(folder, tmp_path, ckpt):
    """A scheduled job can catch a file half copied: its error row must not be final. Once the file is
    whole, the next run captions it, and the output still holds the id once."""
    out = tmp_path / "caps.parquet"
    whole = sorted(folder.rglob("*.jpg"))[0]
    (folder / "late.jpg").write_bytes(whole.read_bytes()[:200])  # a copy cut short
    caption(folder, out, ckpt)
    first = {r["id"]: r for r in rows(out)}
    assert first["late.jpg"]["error"] and first["late.jpg"]["caption"] is None
    shutil.copy(whole, folder / "late.jpg")
    result = invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--workers", 0)
    assert re.search(r"retried \(earlier errors\)\s*│\s*1\s", result.output), result.output
    second = {r["id"]: r for r in rows(out)}
    assert len(rows(out)) == len(first)
    assert second["late.jpg"]["error"] is None
    assert second["late.jpg"]["caption"] == direct_captions(ckpt, {"x": folder / "late.jpg"})["x"]
    assert {k: v for k, v in second.items() if k != "late.jpg"} == {k: v for k, v in first.items() if k != "late.jpg"}


def test_an_image_replaced_since_its_caption_is_captioned_again(folder, tmp_path, ckpt, monkeypatch):
    """Alt text must describe the image that is there now: a file replaced under the same name (another
    size or modification time) goes through the model again, and only it; its row is replaced."""
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    first = {r["id"]: r for r in rows(out)}
    target = sorted(folder.rglob("*.jpg"))[0]
    replaced = target.relative_to(folder).as_posix()
    real_photos()["coins"].convert("RGB").save(target)
    encoded = encoded_images(monkeypatch)
    result = invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--workers", 0)
    assert sum(encoded) == 1
    assert re.search(r"redone \(image replaced\)\s*│\s*1\s", result.output), result.output
    second = {r["id"]: r for r in rows(out)}
    assert len(rows(out)) == len(first)
    assert second[replaced]["caption"] == direct_captions(ckpt, {"x": target})["x"] != first[replaced]["caption"]
    stat = target.stat()
    assert second[replaced]["image_version"] == f"{stat.st_size}:{stat.st_mtime_ns}"
    assert {k: v for k, v in second.items() if k != replaced} == {k: v for k, v in first.items() if k != replaced}
    written = out.read_bytes()
    caption(folder, out, ckpt)
    assert out.read_bytes() == written  # nothing changed since: nothing redone


def test_limit_counts_new_images_not_broken_ones_tried_again(folder, tmp_path, ckpt):
    """Files that stay broken are retried by every run, but must not use up a run's --limit, or a job
    that caps each run would retry them forever and never reach the rest of the folder."""
    for name in ("0a.jpg", "0b.jpg"):  # walked first
        (folder / name).write_bytes(b"not an image")
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, "--limit", 2)
    assert sorted(r["id"] for r in rows(out) if r["error"]) == ["0a.jpg", "0b.jpg"]
    caption(folder, out, ckpt, "--limit", 2)
    table = rows(out)
    assert len(table) == 4 and sum(r["caption"] is not None for r in table) == 2


def test_a_question_about_a_missing_image_is_answered_once_the_image_arrives(folder, tmp_path, ckpt):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": "later.jpg", "question": "what?"}) + "\n")
    out = tmp_path / "a.parquet"
    args = ["vqa", folder, "--questions", questions, "--out", out, "--model", ckpt, "--max-new-tokens", 4,
            "--workers", 0, "--quiet"]
    invoke(*args)
    assert [(r["id"], r["error"]) for r in rows(out)] == [("later.jpg", "image not found in source")]
    real_photos()["coins"].convert("RGB").save(folder / "later.jpg")
    invoke(*args)
    (row,) = rows(out)
    assert row["id"] == "later.jpg" and row["error"] is None and row["answer"] is not None


def test_a_seeded_sampled_run_resumed_or_spread_over_workers_gives_the_same_captions(folder, tmp_path, ckpt):
    sampled = ("--temperature", 1.0, "--seed", 11, "--batch-size", 4)
    whole = tmp_path / "whole.parquet"
    caption(folder, whole, ckpt, *sampled)
    resumed = tmp_path / "resumed.parquet"
    caption(folder, resumed, ckpt, *sampled, "--limit", 2)
    caption(folder, resumed, ckpt, *sampled, "--batch-size", 1)  # the rest, one slot at a time
    spread = tmp_path / "spread.parquet"
    caption(folder, spread, ckpt, *sampled, "--devices", "cpu,cpu")
    greedy = tmp_path / "greedy.parquet"
    caption(folder, greedy, ckpt)

    def captions(path):
        return {r["id"]: r["caption"] for r in rows(path)}

    assert len(captions(whole)) == 6 and captions(whole) != captions(greedy)
    assert captions(resumed) == captions(whole)
    assert captions(spread) == captions(whole)


def test_overwrite_and_settings_mismatch(folder, tmp_path, ckpt):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, "--limit", 2)
    assert len(rows(out)) == 2
    result = caption(folder, out, ckpt, "--prompt", "caption es", expect=2)
    assert "prompt" in result.output and "--overwrite" in result.output
    assert len(rows(out)) == 2  # the refused run changed nothing
    caption(folder, out, ckpt, "--prompt", "caption es", "--overwrite", "--limit", 1)
    table = rows(out)
    assert len(table) == 1 and table[0]["prompt"] == "caption es"


def test_the_same_weights_named_another_way_resume_and_other_weights_are_refused(
        folder, tmp_path, ckpt, make_ckpt, monkeypatch):
    """A scheduled job names the model by an absolute path, a person by a relative one, and a
    checkpoint may move: the weights, not the name, decide whether an output can be added to."""
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, "--limit", 2)
    moved = shutil.copytree(ckpt, tmp_path / "moved-checkpoint")
    monkeypatch.chdir(ckpt.parent)
    caption(folder, out, ckpt.name, "--limit", 2)  # relative
    caption(folder, out, moved)
    table = rows(out)
    assert len(table) == 6 and len({r["id"] for r in table}) == 6
    assert pq.read_metadata(out).metadata[b"vlmbatch.model"].decode() == str(moved)  # the last run's name
    other = make_ckpt("pg1_untied", "hub", image_size=28, eos_boost=3.0, seed=1).path
    result = caption(folder, out, other, expect=2)
    assert "different settings (weights: " in result.output and "--overwrite" in result.output
    assert rows(out) == table


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_id_once(tmp_path, make_ckpt):
    ckpt = make_ckpt("pg1_untied", "hub", image_size=56)  # slow enough to be killed mid-run
    root = tmp_path / "many"
    root.mkdir()
    photos = list(real_photos().values())
    for i in range(60):
        photos[i % len(photos)].convert("RGB").rotate(i * 6).save(root / f"img{i:03d}.jpg")
    out = tmp_path / "killed.parquet"
    cmd = [sys.executable, "-m", "vlmbatch", "caption", str(root), "--out", str(out), "--model", str(ckpt.path),
           "--max-new-tokens", "24", "--batch-size", "2", "--workers", "1", "--flush-rows", "4", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(parts.glob("part-*.parquet"))) >= 2, "the run should have been killed mid-way"
    subprocess.run(cmd, check=True)
    ids = [r["id"] for r in rows(out)]
    assert sorted(ids) == sorted(p.name for p in root.iterdir())  # every id exactly once
    assert not parts.exists() or not list(parts.glob("*.parquet"))


def test_decode_workers_default_to_spare_cores_beside_an_accelerator_only():
    """On a CPU-only run the model's threads use every core and a decode process would compete with
    them, so images are decoded in the main process; beside a GPU, on 1 to 8 spare cores."""
    assert default_workers([torch.device("cpu")]) == 0
    assert default_workers([torch.device("cpu"), torch.device("cpu")]) == 0
    assert 1 <= default_workers([torch.device("cuda", 0)]) <= 8
    assert 1 <= default_workers([torch.device("cuda", 0), torch.device("cuda", 1)]) <= 8


@pytest.mark.parametrize("name, text", [("m.jsonl", '{"image": "a.jpg"}\nnot json\n'),
                                        ("m.csv", 'image\n"unterminated\n')])
def test_a_broken_manifest_is_one_line_on_stderr(tmp_path, ckpt, name, text):
    """The reader `datasets` logs its own error before raising it; the user gets ours, once."""
    manifest = tmp_path / name
    manifest.write_text(text)
    run = subprocess.run([sys.executable, "-m", "vlmbatch", "caption", str(manifest), "--out",
                          str(tmp_path / "out.parquet"), "--model", str(ckpt), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [run.stderr.strip()] and run.stderr.startswith(
        f"error: cannot read manifest {manifest}: ")


def test_console_script_stays_light_for_spawned_workers():
    """A spawned decode process re-runs the program's main script. The `vlmbatch` script imports its
    entry point from `vlmbatch.__main__`, which must not import torch or the command line (seconds of
    CPU per worker, taken from the model, before its first image)."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="vlmbatch")
    assert script.value == "vlmbatch.__main__:main"
    code = "import sys, vlmbatch.__main__; print([m for m in ('torch', 'vlmbatch.cli') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_caption_job_does_not_import_pandas(folder, ckpt, tmp_path):
    """pyarrow imports pandas on its first conversion only to probe for pandas objects: half a second
    of every run's start-up. The CLI skips the probe; the output is unchanged."""
    out = tmp_path / "caps.parquet"
    argv = ["vlmbatch", "caption", str(folder), "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "4",
            "--quiet"]
    code = f"""
import sys
from vlmbatch.__main__ import main
sys.argv = {argv!r}
try:
    main()
except SystemExit as done:
    assert done.code in (0, None), done.code
print(sorted(m for m in ("pyarrow.parquet", "pandas") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "['pyarrow.parquet']"
    assert len(rows(out)) == len(list(folder.rglob("*.jpg")))


def test_pyarrow_still_converts_pandas_after_the_probe_is_skipped():
    code = """
import sys
from vlmbatch.sinks.parquet_file import skip_pyarrows_pandas_probe
skip_pyarrows_pandas_probe()
import pyarrow as pa
table = pa.Table.from_pylist([{"a": 1, "b": "x"}, {"a": 2, "b": None}])
assert "pandas" not in sys.modules
frame = table.to_pandas()
import pandas as pd
assert pa.Table.from_pandas(frame).to_pylist() == table.to_pylist()
assert pa.array(pd.Series([1.5, None])).to_pylist() == [1.5, None]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_folder_output_equals_the_single_file_and_resumes(folder, tmp_path, ckpt, monkeypatch):
    """An --out without a suffix is a Parquet dataset folder holding the same rows as a .parquet output."""
    single, dataset = tmp_path / "caps.parquet", tmp_path / "caps"
    caption(folder, single, ckpt)
    caption(folder, dataset, ckpt)
    assert dataset.is_dir()
    by_id = lambda table: sorted(table, key=lambda row: row["id"])  # noqa: E731
    assert by_id(rows(dataset)) == by_id(rows(single))
    encoded = encoded_images(monkeypatch)
    caption(folder, dataset, ckpt)  # a rerun writes nothing, encodes nothing
    assert encoded == [] and len(rows(dataset)) == len(rows(single)) == 6
    assert not any(path.name.endswith(".tmp") for path in dataset.iterdir())


def test_folder_output_inside_the_source_folder_is_not_read_back(folder, ckpt):
    out = folder / "captions/"
    caption(folder, str(out) + "/", ckpt)
    caption(folder, str(out) + "/", ckpt)
    assert sorted(row["id"] for row in rows(out)) == sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
