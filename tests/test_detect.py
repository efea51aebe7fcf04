"""`vlmbatch detect` / `segment`: parsing <loc>/<seg> answers, scores, masks, and the commands end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import invoke
from factory import distinct_photos, make_scripted_checkpoint
from PIL import Image
from pycocotools import mask as coco_mask
from test_cli import encoded_images
from test_vae import write_random_vae
from tokenizers import Tokenizer

from vlmbatch.detection.objects import ObjectColumns, paste_mask
from vlmbatch.detection.parse import (
    LOC_DIVISOR,
    ParsedObject,
    loc_tokens,
    parse_objects,
)
from vlmbatch.detection.vae import load_vae
from vlmbatch.engine.scheduler import Engine, ImageWork
from vlmbatch.model.loading import load_model, resolve_checkpoint
from vlmbatch.model.processor import Processor
from vlmbatch.sources.images import resize_square
from vlmbatch.spec import GenerationSettings

SIZES = {"wide": (64, 40), "tall": (30, 90)}  # original images, neither square nor the model's size


def segs(codes) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(640, 360), (300, 1000), (224, 224), (1, 7)])
def test_box_round_trip_within_one_bin(width, height):
    rng = random.Random(width * height)
    for _ in range(200):
        x = sorted(rng.uniform(0, width) for _ in range(2))
        y = sorted(rng.uniform(0, height) for _ in range(2))
        box = (x[0], y[0], x[1], y[1])
        objects, errors = parse_objects(loc_tokens(box, width, height) + " thing")
        if errors:  # both ends fell in one bin: an empty box, dropped as the model's own would be
            assert round(y[1] / height * LOC_DIVISOR) == round(y[0] / height * LOC_DIVISOR) or \
                round(x[1] / width * LOC_DIVISOR) == round(x[0] / width * LOC_DIVISOR)
            continue
        (parsed,) = objects
        assert parsed.label == "thing"
        for got, want, side in zip(parsed.box(width, height), box, (width, height, width, height)):
            assert abs(got - want) <= side / LOC_DIVISOR
        assert all(0 <= v <= 1 for v in parsed.box_normalized)


def test_bins_are_fractions_of_1023_in_the_original_image():
    """y_min, x_min, y_max, x_max as written; x_min, y_min, x_max, y_max out, scaled by each side."""
    (o,), errors = parse_objects("<loc0000><loc0341><loc1023><loc0682> cat")
    assert errors == 0 and o.bins == (0, 341, 1023, 682)
    assert o.box_normalized == (341 / 1023, 0.0, 682 / 1023, 1.0)
    assert o.box(640, 480) == pytest.approx((640 / 3, 0.0, 1280 / 3, 480.0))
    assert o.box(300, 900) == pytest.approx((100.0, 0.0, 200.0, 900.0))


def test_several_objects_labels_with_spaces_and_spans():
    a, b = "<loc0010><loc0020><loc0500><loc0600> red car", "<loc0100><loc0200><loc0300><loc0400> traffic light"
    text = f"{a} ; {b}"
    objects, errors = parse_objects(text)
    assert errors == 0
    assert [o.label for o in objects] == ["red car", "traffic light"]
    assert [text[slice(*o.span)] for o in objects] == [a, b]
    assert objects[1].bins == (100, 200, 300, 400) and objects[1].seg_codes is None


def test_segment_answers_carry_16_codes():
    codes = list(range(0, 128, 8))
    objects, errors = parse_objects(f"<loc0100><loc0200><loc0300><loc0400>{segs(codes)} cat ; "
                                    f"<loc0001><loc0002><loc0003><loc0004> dog")
    assert errors == 0 and [o.seg_codes for o in objects] == [tuple(codes), None]
    assert [o.label for o in objects] == ["cat", "dog"]


@pytest.mark.parametrize("bad", [
    "<loc0100><loc0200><loc0300> cat",  # too few location tokens
    "<loc0300><loc0200><loc0300><loc0400> cat",  # y_max == y_min
    "<loc0100><loc0500><loc0300><loc0400> cat",  # x_max < x_min
    "<loc0100><loc0200><loc0300><loc0400><loc0500> cat",  # five
    f"<loc0100><loc0200><loc0300><loc0400>{segs(range(15))} cat",  # a mask cut short
    f"<loc0100><loc0200><loc0300><loc0400>{segs(range(17))} cat",
    "<loc0100><loc0200><loc0300><loc1400> cat",  # not a bin
    "cat",  # no box at all
    f"<loc0100><loc0200><loc0300><loc0400> {segs(range(16))} cat",  # the codes must follow the box
])
def test_malformed_objects_are_dropped_and_counted(bad):
    good = "<loc0001><loc0002><loc0900><loc0800> dog"
    objects, errors = parse_objects(f"{good} ; {bad} ; {good}")
    assert errors == 1
    assert [o.label for o in objects] == ["dog", "dog"]


def test_blank_answers_have_no_objects_and_no_errors():
    assert parse_objects("") == ([], 0)
    assert parse_objects(" ; ") == ([], 0)


# -- scores and masks ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted_tokenizer(tmp_path_factory) -> Tokenizer:
    import factory

    path = tmp_path_factory.mktemp("tok")
    factory.make_tokenizer(path, image_size=28)
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_score_is_the_mean_log_prob_of_the_objects_own_tokens(scripted_tokenizer):
    """Tokens of the separator (' ; ') belong to no object; each object's are its loc tokens and label."""
    def encode(text):
        return scripted_tokenizer.encode(text, add_special_tokens=False).ids

    first, separator, second = (encode("<loc0100><loc0200><loc0300><loc0400> black cat"), encode(" ; "),
                                encode("<loc0010><loc0020><loc0900><loc1000> dog"))
    tokens = first + separator + second
    logprobs = [-0.1 * (k + 1) for k in range(len(tokens))]
    decode = scripted_tokenizer.decode
    made = ObjectColumns("detect", decode)(decode(tokens), tokens, logprobs, 100, 50)
    assert made["parse_errors"] == 0
    scores = [o["score"] for o in made["objects"]]
    assert scores == pytest.approx([np.mean(logprobs[: len(first)]),
                                    np.mean(logprobs[len(first) + len(separator):])])
    assert ObjectColumns("detect", decode)(decode(tokens), tokens, None, 100, 50)["objects"][0]["score"] is None


def test_mask_is_the_decoded_mask_resized_into_the_box():
    """Left half of the 64x64 output positive: the mask covers the box's left half, nothing outside it."""
    mask64 = np.where(np.arange(64)[None, :] < 32, 0.5, -0.5).repeat(64, axis=0).astype(np.float32)
    o = ParsedObject("cat", (1023 // 4, 1023 // 5, 1023 * 3 // 4, 1023 * 4 // 5), tuple(range(16)), (0, 1))
    width, height = 200, 120
    rle = paste_mask(mask64, o, width, height)
    assert rle["size"] == [height, width]
    full = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    x_min, y_min, x_max, y_max = (int(v) for v in o.box(width, height))
    expected = np.zeros((height, width), dtype=np.uint8)
    expected[y_min:y_max, x_min:x_min + (x_max - x_min) // 2] = 1
    assert np.array_equal(full, expected)


# -- the engine's log-probabilities ---------------------------------------------------------------
@pytest.mark.parametrize("static_shapes", [False, True])
def test_completion_logprobs_match_transformers(make_ckpt, static_shapes):
    ckpt = make_ckpt("pg1_untied", "hub", image_size=28, eos_boost=3.0)
    checkpoint = resolve_checkpoint(str(ckpt.path))
    model, processor = load_model(checkpoint), Processor.from_dir(checkpoint.path, checkpoint.config)
    images = distinct_photos(5, size=40)
    prompts = ["caption en", "detect cat", "answer en what?", "segment dog", "caption en"]
    work = [ImageWork(resize_square(image, 28), [(i, processor.prompt_ids(p))])
            for i, (image, p) in enumerate(zip(images, prompts))]
    engine = Engine(model, GenerationSettings(max_new_tokens=10), max_slots=2, static_shapes=static_shapes)
    completions = {c.key: c for c in engine.run(work)}
    reference = ckpt.processor()
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        inputs = reference(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = ckpt.hf.generate(**inputs, do_sample=False, max_new_tokens=10, output_logits=True,
                                   return_dict_in_generate=True)
        generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        expected = [torch.log_softmax(logits[0].float(), -1)[token].item()
                    for logits, token in zip(out.logits, generated)]
        got = completions[i]
        assert got.tokens == generated[: len(got.tokens)]
        assert len(got.logprobs) == len(got.tokens)
        assert got.logprobs == pytest.approx(expected[: len(got.tokens)], abs=1e-4)


# -- the commands end to end ------------------------------------------------------------------------
DETECT_SCRIPT = "<loc0100><loc0200><loc0600><loc0800> cat ; <loc0010><loc0020><loc0900><loc1000> black dog"
CODES = [3, 17, 42, 99, 127, 0, 64, 5, 6, 7, 8, 9, 10, 11, 12, 13]
SEGMENT_SCRIPT = f"<loc0100><loc0200><loc0600><loc0800>{segs(CODES)} cat"


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("detector"), DETECT_SCRIPT).path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("segmenter"), SEGMENT_SCRIPT).path


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for (name, size), photo in zip(SIZES.items(), distinct_photos(len(SIZES))):
        photo.convert("RGB").resize(size).save(root / f"{name}.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def run(task, folder, out, ckpt, *extra, expect=0):
    return invoke(task, folder, "--out", out, "--model", ckpt, "--max-new-tokens", 64, "--workers", 0, "--quiet",
                  *extra, expect=expect)


def by_id(path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def test_detect_writes_boxes_in_the_original_images_pixels(folder, tmp_path, detector, monkeypatch):
    out = tmp_path / "boxes.parquet"
    run("detect", folder, out, detector, "--objects", "cat ;dog")
    rows = by_id(out)
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["objects"] is None
    for name, (width, height) in SIZES.items():
        row = rows[f"{name}.png"]
        assert row["error"] is None and row["prompt"] == "detect cat ; dog" and row["text"] == DETECT_SCRIPT
        assert (row["width"], row["height"], row["parse_errors"]) == (width, height, 0)
        cat, dog = row["objects"]
        assert (cat["label"], dog["label"]) == ("cat", "black dog")
        assert cat["box_normalized"] == pytest.approx([200 / 1023, 100 / 1023, 800 / 1023, 600 / 1023])
        assert cat["box"] == pytest.approx([200 / 1023 * width, 100 / 1023 * height,
                                            800 / 1023 * width, 600 / 1023 * height])
        assert dog["box"] == pytest.approx([20 / 1023 * width, 10 / 1023 * height, width * 1000 / 1023,
                                            900 / 1023 * height])
        assert -3 < cat["score"] < 0 and -3 < dog["score"] < 0 and cat["score"] != dog["score"]
        assert "seg_codes" not in cat
    # resumed: no image goes through the model again; other objects are other settings, refused in one line
    encoded = encoded_images(monkeypatch)
    run("detect", folder, out, detector, "--objects", "cat ; dog")
    assert encoded == [] and by_id(out) == rows
    result = run("detect", folder, out, detector, "--objects", "bird", expect=2)
    assert "different settings" in result.output and len(result.output.strip().splitlines()) == 1


def test_segment_keeps_codes_and_makes_masks_with_a_vae(folder, tmp_path, segmenter):
    out = tmp_path / "masks.parquet"
    result = run("segment", folder, out, segmenter, "--objects", "cat")
    assert "no --vae given" in result.output  # said even with --quiet
    row = by_id(out)["wide.png"]
    (cat,) = row["objects"]
    assert cat["seg_codes"] == CODES and cat["mask"] is None and cat["label"] == "cat"

    vae = write_random_vae(tmp_path / "vae-oid.npz", seed=3)
    result = run("segment", folder, out, segmenter, "--objects", "cat", "--vae", vae, expect=2)
    assert "different settings" in result.output  # masks now: not the rows already written
    run("segment", folder, out, segmenter, "--objects", "cat", "--vae", vae, "--overwrite")
    decoder = load_vae(vae)
    for name, (width, height) in SIZES.items():
        (cat,) = by_id(out)[f"{name}.png"]["objects"]
        parsed = parse_objects(SEGMENT_SCRIPT)[0][0]
        expected = paste_mask(decoder(torch.tensor([CODES]))[0].numpy(), parsed, width, height)
        assert cat["mask"] == expected and cat["mask"]["size"] == [height, width]
        assert coco_mask.area({"size": expected["size"], "counts": expected["counts"].encode()}) > 0


def test_job_spec_runs_detect(folder, tmp_path, detector):
    spec = tmp_path / "boxes.toml"
    spec.write_text(f'task = "detect"\nsource = "{folder}"\nout = "out/boxes.parquet"\nmodel = "{detector}"\n'
                    f'objects = "cat ; dog"\nworkers = 0\nmax_new_tokens = 64\n')
    invoke("run", spec, "--quiet")
    rows = by_id(tmp_path / "out" / "boxes.parquet")
    assert [o["label"] for o in rows["tall.png"]["objects"]] == ["cat", "black dog"]
    settings = json.loads(pq.read_metadata(tmp_path / "out" / "boxes.parquet").metadata[b"vlmbatch.settings"])
    assert settings["task"] == "detect" and settings["prompt"] == "detect cat ; dog"


@pytest.mark.parametrize("args,message", [
    (("detect",), "detect needs the objects to find"),
    (("detect", "--objects", " ; "), "detect needs the objects to find"),
    (("segment", "--objects", "cat", "--vae", "VAE"), "cannot read VAE weights"),
    (("segment", "--objects", "cat", "--vae", "missing.npz"), "VAE weights not found"),
])
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, detector, args, message):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    args = [str(tmp_path / "bad.npz") if a == "VAE" else a for a in args]
    out = tmp_path / "x.parquet"
    result = invoke(args[0], folder, "--out", out, "--model", detector, "--quiet", *args[1:], expect=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not out.exists()


def test_original_size_follows_exif_orientation(tmp_path, detector):
    """A photo stored 64x40 but shown rotated (EXIF 6) is 40 wide and 64 high: boxes are in those pixels."""
    root = tmp_path / "rotated"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    distinct_photos(1)[0].convert("RGB").resize((64, 40)).save(root / "r.jpg", exif=exif.tobytes())
    out = tmp_path / "r.parquet"
    run("detect", root, out, detector, "--objects", "cat")
    row = by_id(out)["r.jpg"]
    assert (row["width"], row["height"]) == (40, 64)
    assert row["objects"][0]["box"][2] == pytest.approx(800 / 1023 * 40)


def test_several_devices_and_decode_workers_give_the_same_rows(folder, tmp_path, detector):
    """Completions (log-probs included) cross process boundaries, and so do decoded sizes."""
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    run("detect", folder, one, detector, "--objects", "cat ; dog")
    invoke("detect", folder, "--out", two, "--model", detector, "--max-new-tokens", 64, "--quiet",
           "--devices", "cpu,cpu", "--workers", 1, "--objects", "cat ; dog")
    assert by_id(one) == by_id(two)
    assert by_id(two)["wide.png"]["objects"][0]["score"] is not None


def test_beam_search_scores_objects_from_the_beams_tokens(folder, tmp_path, detector):
    """The scripted answer is every beam's best: its objects score as the greedy run's do."""
    beams, greedy = tmp_path / "beams.parquet", tmp_path / "greedy.parquet"
    run("detect", folder, beams, detector, "--objects", "cat ; dog", "--num-beams", 2)
    run("detect", folder, greedy, detector, "--objects", "cat ; dog")
    objects, expected = by_id(beams)["tall.png"]["objects"], by_id(greedy)["tall.png"]["objects"]
    assert [o["label"] for o in objects] == ["cat", "black dog"]
    assert [o["score"] for o in objects] == pytest.approx([o["score"] for o in expected], abs=1e-5)
    assert all(o["score"] is not None and o["score"] <= 0 for o in objects)


def test_job_spec_vae_path_is_taken_from_the_specs_folder(folder, tmp_path, segmenter):
    (tmp_path / "jobs").mkdir()
    write_random_vae(tmp_path / "jobs" / "vae-oid.npz")
    spec = tmp_path / "jobs" / "masks.toml"
    spec.write_text(f'task = "detect"\nsource = "{folder}"\nout = "masks.parquet"\nmodel = "{segmenter}"\n'
                    f'objects = "cat"\nworkers = 0\nmax_new_tokens = 64\n')
    invoke("run", spec, "--quiet", "--set", "task=segment", "--set", "vae=vae-oid.npz")
    (cat,) = by_id(tmp_path / "jobs" / "masks.parquet")["wide.png"]["objects"]
    assert cat["seg_codes"] == CODES and cat["mask"]["size"] == [40, 64]


def test_spec_builds_the_prompt_and_refuses_misplaced_keys():
    from vlmbatch.spec import JobSpec, SpecError

    spec = JobSpec(task="segment", source="x", out="y.parquet", objects=" cat;dog ;  ; red car ")
    assert spec.task_prompt == "segment cat ; dog ; red car" and spec.answer_column == "text"
    assert JobSpec(task="caption", source="x", out="y.parquet").task_prompt == "caption en"
    for bad, message in [(dict(task="caption", objects="cat"), "objects and vae are for detect and segment only"),
                         (dict(task="detect", objects="cat", vae="v.npz"), "vae is for segment only"),
                         (dict(task="segment"), "segment needs the objects to find")]:
        with pytest.raises(SpecError, match=message):
            JobSpec(source="x", out="y.parquet", **bad)
