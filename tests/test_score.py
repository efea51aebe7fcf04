"""`vlmbatch score` and `caption --score-with`: SigLIP scores in the caption rows, equal to transformers'
SiglipModel on the same images and captions, resumable, and living with the caption job's output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_eval_cli
import torch
from cli_runner import invoke
from factory import make_siglip_checkpoint, real_photos

from vlmbatch.scoring import ScoreJob
from vlmbatch.sources.images import load_image
from vlmbatch.spec import ScoreSpec


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """(checkpoint dir, the transformers SiglipModel it holds)."""
    path = tmp_path_factory.mktemp("siglip")
    return path, make_siglip_checkpoint(path, seed=5, tokenizer="spiece")


@pytest.fixture(scope="module")
def other_siglip(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip_other")
    make_siglip_checkpoint(path, seed=6, tokenizer="json")
    return path


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, (name, image) in enumerate(real_photos().items()):
        image.convert("RGB").save(root / f"{'sub/' if i % 2 else ''}{name}.jpg")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def caption(folder, out, ckpt, *extra):
    return invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 6, "--workers", 0,
                  "--quiet", *extra)


def score(out, folder, model, *extra, expect=0):
    return invoke("score", out, "--source", folder, "--model", model, "--workers", 0, "--quiet", *extra,
                  expect=expect)


def table(out) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(out).to_pylist()}


def reference_scores(model, folder: Path, rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """transformers' SiglipModel + SiglipProcessor on each (image, caption) pair: (probability, cosine)."""
    from transformers import SiglipProcessor

    processor = SiglipProcessor.from_pretrained(model[0])
    ids = sorted(key for key, row in rows.items() if row["error"] is None)
    images = [load_image(folder / key) for key in ids]
    batch = processor(text=[rows[key]["caption"] for key in ids], images=images, padding="max_length",
                      max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model[1](input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    logits = out.logits_per_image.diagonal()
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    return {key: (p, c) for key, p, c in zip(ids, torch.sigmoid(logits).tolist(), cos.tolist())}


def assert_scores_equal(rows: dict[str, dict], expected: dict[str, tuple[float, float]], atol=1e-4):
    assert {key for key, row in rows.items() if row["siglip_prob"] is not None} == set(expected)
    for key, (prob, cos) in expected.items():
        assert rows[key]["siglip_prob"] == pytest.approx(prob, abs=atol), key
        assert rows[key]["siglip_cos"] == pytest.approx(cos, abs=atol), key


def test_score_equals_transformers_and_leaves_the_captions_alone(folder, tmp_path, ckpt, siglip):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    before = table(out)
    score(out, folder, siglip[0])
    after = table(out)
    assert_scores_equal(after, reference_scores(siglip, folder, before))
    assert after["broken.jpg"]["error"] and after["broken.jpg"]["siglip_weights"] is None  # an error row: no score
    weights = {row["siglip_weights"] for key, row in after.items() if key != "broken.jpg"}
    assert len(weights) == 1 and None not in weights
    drop = ("siglip_prob", "siglip_cos", "siglip_weights")
    assert ({k: {c: v for c, v in r.items() if c not in drop} for k, r in after.items()}
            == {k: {c: v for c, v in r.items() if c not in drop} for k, r in before.items()})


def test_a_dataset_folder_output_is_scored_in_place(folder, tmp_path, ckpt, siglip):
    single, dataset = tmp_path / "caps.parquet", tmp_path / "caps"
    caption(folder, single, ckpt)
    caption(folder, dataset, ckpt)
    score(single, folder, siglip[0])
    score(dataset, folder, siglip[0])
    assert dataset.is_dir()
    from_folder = {row["id"]: row for row in pq.read_table(dataset).to_pylist()}
    assert len(from_folder) == len(table(single))
    assert_scores_equal(from_folder, {k: (r["siglip_prob"], r["siglip_cos"]) for k, r in table(single).items()
                                      if r["siglip_prob"] is not None}, atol=1e-6)


def test_a_stopped_run_resumes_to_the_uninterrupted_scores(folder, tmp_path, ckpt, siglip):
    whole, stopped = tmp_path / "whole.parquet", tmp_path / "stopped.parquet"
    caption(folder, whole, ckpt)
    shutil.copy(whole, stopped)
    score(whole, folder, siglip[0])

    def stop_after_first_batch(summary):
        raise KeyboardInterrupt

    spec = ScoreSpec(out=str(stopped), source=str(folder), model=str(siglip[0]), batch_size=2, flush_rows=1, workers=0)
    with pytest.raises(KeyboardInterrupt):
        ScoreJob(spec).run(stop_after_first_batch)
    first = [row for row in table(stopped).values() if row["siglip_prob"] is not None]
    assert len(first) == 2  # the first batch's rows were saved as it stopped

    summary = ScoreJob(spec).run()
    assert summary.already_done == 2 and summary.written == len(table(whole)) - 1 - 2
    assert_scores_equal(table(stopped), {k: (r["siglip_prob"], r["siglip_cos"]) for k, r in table(whole).items()
                                         if r["siglip_prob"] is not None}, atol=1e-6)


def test_caption_and_score_share_the_output_night_after_night(folder, tmp_path, ckpt, siglip, monkeypatch):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    score(out, folder, siglip[0])
    scored = table(out)
    real_photos()["coffee"].convert("RGB").save(folder / "new.jpg")  # the folder grows
    (folder / "broken.jpg").unlink()
    real_photos()["moon"].convert("RGB").save(folder / "broken.jpg")  # and a broken image is fixed
    caption(folder, out, ckpt)  # the caption job opens the scored output: same settings, same schema
    grown = table(out)
    assert grown["new.jpg"]["siglip_prob"] is None and grown["broken.jpg"]["siglip_prob"] is None
    assert all(grown[key] == row for key, row in scored.items() if key != "broken.jpg")

    embedded: list[int] = []
    from vlmbatch.model.siglip_dual import SiglipPooledVision
    original = SiglipPooledVision.forward
    monkeypatch.setattr(SiglipPooledVision, "forward", lambda self, px: embedded.append(len(px)) or original(self, px))
    score(out, folder, siglip[0])
    assert sum(embedded) == 2  # only the two new captions' images
    final = table(out)
    assert_scores_equal(final, reference_scores(siglip, folder, final))


def test_scores_of_other_weights_are_refused_unless_overwrite(folder, tmp_path, ckpt, siglip, other_siglip):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    score(out, folder, siglip[0])
    result = score(out, folder, other_siglip, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "other SigLIP weights" in lines[0] and "--overwrite" in lines[0]
    score(out, folder, other_siglip, "--overwrite")
    from vlmbatch.model.loading import resolve_checkpoint
    theirs = resolve_checkpoint(str(other_siglip)).fingerprint()
    assert {row["siglip_weights"] for row in table(out).values() if row["error"] is None} == {theirs}


def test_caption_score_with_equals_caption_then_score(folder, tmp_path, ckpt, siglip):
    together, apart = tmp_path / "together.parquet", tmp_path / "apart.parquet"
    caption(folder, together, ckpt, "--score-with", siglip[0])
    caption(folder, apart, ckpt)
    score(apart, folder, siglip[0])
    assert table(together).keys() == table(apart).keys()
    for key, row in table(apart).items():
        other = table(together)[key]
        assert other["caption"] == row["caption"] and other["siglip_weights"] == row["siglip_weights"]
        if row["siglip_prob"] is not None:
            assert other["siglip_prob"] == pytest.approx(row["siglip_prob"], abs=1e-5)
            assert other["siglip_cos"] == pytest.approx(row["siglip_cos"], abs=1e-5)


def test_an_image_replaced_since_its_caption_is_not_scored(folder, tmp_path, ckpt, siglip):
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt)
    target = next(folder.glob("*.jpg"))
    real_photos()["coffee"].convert("RGB").save(target)
    os.utime(target, ns=(1, 1))
    result = invoke("score", out, "--source", folder, "--model", siglip[0], "--workers", 0)
    assert "replaced since captioned" in result.output
    assert table(out)[target.name]["siglip_prob"] is None


@pytest.mark.parametrize("case", ["paligemma", "vqa", "missing", "not_vlmbatch"])
def test_fatal_mistakes_are_one_line(case, folder, tmp_path, ckpt, siglip):
    out = tmp_path / "caps.parquet"
    model, message = siglip[0], {"paligemma": "not a SigLIP dual encoder", "vqa": "vlmbatch score rates captions",
                                 "missing": "caption the images first", "not_vlmbatch": "not written by vlmbatch"}[case]
    if case == "paligemma":
        caption(folder, out, ckpt)
        model = ckpt
    elif case == "vqa":
        invoke("vqa", folder, "--question", "what is it?", "--out", out, "--model", ckpt, "--max-new-tokens", 4,
               "--workers", 0, "--quiet")
    elif case == "not_vlmbatch":
        pq.write_table(pa.table({"id": ["a"], "caption": ["a cat"]}), out)
    result = score(out, folder, model, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


coco_folder = test_eval_cli.coco_folder


def test_eval_reports_the_mean_score_and_clip_s_over_siglip(coco_folder, tmp_path, ckpt, siglip):
    scores = tmp_path / "scores.json"
    per_item = tmp_path / "items.parquet"
    invoke("eval", "--dataset", "coco", "--data", coco_folder, "--out", scores, "--per-item", per_item,
           "--model", ckpt, "--metrics", "bleu,cider", "--max-new-tokens", 6, "--workers", 0, "--quiet",
           "--score-with", siglip[0])
    predictions = table(scores.with_name("scores.predictions.parquet"))
    assert all(row["siglip_prob"] is not None for row in predictions.values())
    report = json.loads(scores.read_text())
    probs = [row["siglip_prob"] for row in predictions.values()]
    clip_s = [2.5 * max(row["siglip_cos"], 0.0) for row in predictions.values()]
    assert report["SigLIP_prob"] == pytest.approx(sum(probs) / len(probs))
    assert report["CLIP-S_SigLIP"] == pytest.approx(sum(clip_s) / len(clip_s))
    items = pq.read_table(per_item).to_pylist()
    assert sorted(item["siglip_prob"] for item in items) == pytest.approx(sorted(probs))

    # Predictions only partly scored: the mean covers those, and a line says so.
    partial = tmp_path / "partial.parquet"
    rows = sorted(predictions.values(), key=lambda row: row["id"])
    rows[0].update(siglip_prob=None, siglip_cos=None, siglip_weights=None)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(scores.with_name("scores.predictions.parquet"))),
                   partial)
    result = invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", partial, "--metrics", "bleu")
    assert "SigLIP_prob" in result.output and "SigLIP scores cover 3 of 4" in result.output


def test_score_with_on_several_devices_equals_one_device(folder, tmp_path, ckpt, siglip):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    caption(folder, one, ckpt, "--score-with", siglip[0])
    invoke("caption", folder, "--out", two, "--model", ckpt, "--max-new-tokens", 6, "--workers", 1, "--quiet",
           "--devices", "cpu,cpu", "--score-with", siglip[0])
    assert table(two).keys() == table(one).keys()
    for key, row in table(one).items():
        other = table(two)[key]
        assert other["caption"] == row["caption"] and other["siglip_weights"] == row["siglip_weights"]
        assert (other["siglip_prob"] is None) == (row["siglip_prob"] is None)
        if row["siglip_prob"] is not None:
            assert other["siglip_prob"] == pytest.approx(row["siglip_prob"], abs=1e-5)


def test_a_folder_whose_oldest_file_lacks_the_score_columns_reads_them(coco_folder, tmp_path):
    """Readers take a folder's schema from every file, not the first: a scored folder whose oldest file was
    written before the score columns existed still shows its scores to eval (and to the report)."""
    from vlmbatch.sinks.outputs import as_dataset

    folder = tmp_path / "preds"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["1", "2"], "caption": ["a photo", "a dog"], "error": pa.nulls(2, pa.string())}),
                   folder / "part-a.parquet")
    pq.write_table(pa.table({"id": ["3", "4"], "caption": ["a cat", "a car"], "error": pa.nulls(2, pa.string()),
                             "siglip_prob": pa.array([0.5, 0.25], pa.float32()),
                             "siglip_cos": pa.array([0.1, -0.2], pa.float32())}), folder / "part-b.parquet")
    assert "siglip_prob" in as_dataset(folder).schema.names
    result = invoke("eval", "--dataset", "coco", "--data", coco_folder, "--predictions", folder, "--metrics", "bleu")
    assert "SigLIP scores cover 2 of 4" in result.output


def test_the_memory_check_counts_the_scorer(folder, tmp_path, ckpt, siglip, monkeypatch):
    """Memory for the weights, the cache and the runtime, and not for SigLIP too: caption alone runs,
    `--score-with` stops before any work, in one line."""
    import vlmbatch.pipeline
    from vlmbatch.model import memory
    from vlmbatch.model.loading import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(str(ckpt))
    weights = 4 * sum(p.numel() for p in load_model(checkpoint).parameters())
    max_len = checkpoint.config.num_image_tokens + 1 + 256 + 6
    cache = memory.kv_cache_bytes(checkpoint.config.text, 16, max_len, torch.float32)
    free = weights + cache + memory.PROCESS_OVERHEAD + 1024
    monkeypatch.setattr(vlmbatch.pipeline, "available_bytes", lambda device: free)
    caption(folder, tmp_path / "alone.parquet", ckpt, "--cpu-matmul", "torch")
    out = tmp_path / "scored.parquet"
    result = invoke("caption", folder, "--out", out, "--model", ckpt, "--max-new-tokens", 6, "--quiet",
                    "--cpu-matmul", "torch", "--score-with", siglip[0], expect=2)
    assert " ".join(result.output.split()).startswith("error: not enough memory on cpu") and not out.exists()
