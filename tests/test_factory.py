"""Sanity checks of the test-data factory itself (fast; no vlmbatch code involved)."""

from __future__ import annotations

import json

import factory
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer


def _keys(ckpt_dir) -> list[str]:
    names = []
    for file in factory.safetensors_files(ckpt_dir):
        with safe_open(str(file), "pt") as f:
            names += list(f.keys())
    return names


def _greedy(ckpt: factory.Ckpt, images, max_new_tokens: int = 8) -> list[list[int]]:
    processor = ckpt.processor()
    prompts = ["<image>caption en"] * len(images)
    inputs = processor(text=prompts, images=[im.convert("RGB") for im in images], return_tensors="pt")
    with torch.no_grad():
        out = ckpt.hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


# --- tokenizer ---------------------------------------------------------------


def test_tokenizer_ids_match_real_paligemma_layout(tokenizer_dir):
    ids = factory.tokenizer_ids(tokenizer_dir)
    assert (ids["pad"], ids["eos"], ids["bos"], ids["unk"]) == (0, 1, 2, 3)
    assert ids["image"] == ids["vocab_size"] - 1  # last id, inside the vocab
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.token_to_id("<loc0000>") + 1023 == tok.token_to_id("<loc1023>")
    assert tok.token_to_id("<seg127>") + 1 == ids["image"]
    assert tok.token_to_id("<0x0A>") == ids["newline"]  # "\n" goes through byte fallback
    assert 1500 < ids["vocab_size"] < 2000


def test_tokenizer_round_trips_and_keeps_loc_tokens(tokenizer_dir):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "A cat on the grass. Ein Hund läuft über die Straße 😀"
    enc = tok.encode(text)
    assert enc.ids[0] == 2  # tokenizer.json's post-processor adds <bos>
    assert any(t.startswith("<0x") for t in enc.tokens)  # the emoji needs byte fallback
    assert tok.decode(enc.ids) == text
    loc = tok.encode("<loc0012><loc0500> cat", add_special_tokens=False).ids
    assert tok.decode(loc + [1], skip_special_tokens=True) == "<loc0012><loc0500> cat"


def test_reference_processor_inserts_image_tokens_and_single_bos(tokenizer_dir):
    from transformers import AutoTokenizer, PaliGemmaProcessor

    ids = factory.tokenizer_ids(tokenizer_dir)
    processor = PaliGemmaProcessor.from_pretrained(tokenizer_dir)
    assert processor.image_seq_length == 256
    img = factory.real_photos()["chelsea"]
    got = processor(text=["caption en"], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    prompt = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(
        "caption en", add_special_tokens=False).ids
    assert got == [ids["image"]] * 256 + [ids["bos"]] + prompt + [ids["newline"]]
    assert AutoTokenizer.from_pretrained(tokenizer_dir)("caption en")["input_ids"] == [ids["bos"]] + prompt


# --- checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("variant", factory.VARIANTS)
def test_layouts_hold_the_same_weights(tmp_path, variant):
    from transformers import PaliGemmaForConditionalGeneration

    prefixes = {"transformers": "vision_tower.embeddings.", "hub": "vision_tower.vision_model.embeddings.",
                "memory": "model.vision_tower.embeddings."}
    for layout, shards in [("transformers", 1), ("hub", 1), ("memory", 1), ("hub", 3)]:
        out = tmp_path / f"{layout}-{shards}"
        model = factory.make_checkpoint(out, variant, layout, image_size=28, shards=shards)
        names = _keys(out)
        assert any(n.startswith(prefixes[layout]) for n in names)
        assert any("lm_head" in n for n in names) == (variant != "pg1_tied")
        if shards > 1:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert sorted(index["weight_map"]) == sorted(names)
            assert len(set(index["weight_map"].values())) == shards
        loaded = PaliGemmaForConditionalGeneration.from_pretrained(out)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (layout, name)


def test_config_matches_variant(ckpt_pg1_tied, ckpt_pg1_untied, ckpt_pg2):
    assert ckpt_pg1_tied.hf.config.tie_word_embeddings
    assert ckpt_pg1_tied.hf.lm_head.weight is ckpt_pg1_tied.hf.model.language_model.embed_tokens.weight
    assert not ckpt_pg1_untied.hf.config.tie_word_embeddings
    text = ckpt_pg2.hf.config.text_config
    assert text.model_type == "gemma2"
    assert (text.attn_logit_softcapping, text.final_logit_softcapping) == (50.0, 30.0)
    assert text.query_pre_attn_scalar == text.head_dim == 16
    assert text.num_key_value_heads == 1 and text.num_attention_heads == 4
    for ckpt in (ckpt_pg1_tied, ckpt_pg1_untied, ckpt_pg2):
        assert ckpt.hf.config.image_token_id == ckpt.ids["image"]
        assert ckpt.hf.config.text_config.vocab_size == ckpt.ids["vocab_size"]
        assert ckpt.image_seq_length == 256


def test_overrides_reach_the_right_sub_config():
    config = factory.make_config("pg2", image_size=28, sliding_window=8, num_hidden_layers=4,
                                 vision_num_hidden_layers=3)
    assert config.text_config.sliding_window == 8
    assert config.text_config.num_hidden_layers == 4
    assert config.vision_config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="sliding_window"):
        factory.make_config("pg1_untied", sliding_window=8)


@pytest.mark.parametrize("fixture", ["ckpt_pg1_untied", "ckpt_pg2"])
def test_greedy_outputs_vary(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    photos = factory.real_photos()
    outputs = _greedy(ckpt, [photos["chelsea"], photos["rocket"]])
    print(fixture, outputs)
    assert outputs[0] != outputs[1]
    assert len({t for out in outputs for t in out}) > 2  # not all one repeated token


def test_eos_boost_varies_output_lengths(make_ckpt):
    ckpt = make_ckpt("pg1_untied", image_size=28, eos_boost=3.0)
    outputs = _greedy(ckpt, factory.distinct_photos(6, size=64), max_new_tokens=16)
    lengths = [out.index(1) + 1 if 1 in out else len(out) for out in outputs]
    print(lengths)
    assert len(set(lengths)) >= 3


def test_bin_checkpoint_has_no_safetensors(tmp_path):
    factory.make_bin_checkpoint(tmp_path)
    assert (tmp_path / "pytorch_model.bin").is_file()
    assert (tmp_path / "config.json").is_file()
    assert not factory.safetensors_files(tmp_path)


def test_drop_tensor_removes_one_name(tmp_path):
    factory.make_checkpoint(tmp_path, "pg1_untied", "hub", image_size=28, shards=2)
    before = _keys(tmp_path)
    dropped = factory.drop_tensor(tmp_path, "layers.1.mlp.down_proj")
    assert dropped == "language_model.model.layers.1.mlp.down_proj.weight"
    assert sorted(_keys(tmp_path)) == sorted(n for n in before if n != dropped)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert dropped not in index["weight_map"]


# --- photos ------------------------------------------------------------------


def test_real_photos_are_real():
    photos = factory.real_photos()
    assert set(factory.PHOTO_FILES) == set(photos)
    assert photos["camera"].mode == "L" and photos["chelsea"].mode == "RGB"
    assert all(min(img.size) >= 256 for img in photos.values())


def test_photo_variants_have_the_promised_modes(photo_variant_files):
    expected = {"rgb_jpeg": "RGB", "l_png": "L", "la_png": "LA", "p_png_transparency": "P",
                "rgba_png": "RGBA", "cmyk_jpeg": "CMYK", "i16_png": "I;16", "webp": "RGB"}
    for key, mode in expected.items():
        with Image.open(photo_variant_files[key]) as img:
            assert img.mode == mode, key
    with Image.open(photo_variant_files["exif_rotated_jpeg"]) as img:
        assert img.getexif()[0x0112] == 6
    with Image.open(photo_variant_files["animated_gif"]) as img:
        assert img.n_frames == 2
    with Image.open(photo_variant_files["tiny_1x1_png"]) as img:
        assert img.size == (1, 1)
    with Image.open(photo_variant_files["extreme_aspect_png"]) as img:
        assert img.size == (4000, 3)
    assert photo_variant_files["uppercase_ext_jpg"].suffix == ".JPG"


def test_broken_images_fail_to_open(broken_image_files):
    for key, path in broken_image_files.items():
        expected = Image.DecompressionBombError if key == "decompression_bomb" else OSError
        with pytest.raises(expected):
            with Image.open(path) as img:
                img.load()
    assert broken_image_files["decompression_bomb"].stat().st_size < 100_000


def test_distinct_photos_are_distinct_and_deterministic():
    first = factory.distinct_photos(30, size=48)
    assert len({img.tobytes() for img in first}) == 30
    assert {img.size for img in first} == {(48, 48)}
    assert [img.tobytes() for img in factory.distinct_photos(30, size=48)] == [img.tobytes() for img in first]
