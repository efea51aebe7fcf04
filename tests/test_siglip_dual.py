"""The SigLIP dual encoder against transformers' SiglipModel and its tokenizers, on random checkpoints of
each tokenizer kind (factory.SIGLIP_TOKENIZERS), real photos and awkward texts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factory import (
    SIGLIP_TOKENIZERS,
    make_checkpoint,
    make_siglip_checkpoint,
    real_photos,
)

from vlmbatch.errors import VlmbatchError
from vlmbatch.model.loading import resolve_checkpoint
from vlmbatch.model.siglip_dual_loading import (
    SiglipInputs,
    check_weights,
    dual_config,
    load_dual_encoder,
)
from vlmbatch.sources.images import load_image

LONG = " ".join(["a small dog standing next to a red car on the beach"] * 12)  # ~150 tokens, over 64
TEXTS = [
    "", "a cat sitting on a wooden table", "A Cat, SITTING on the Table!!", "猫が寝ている", "кошка спит",
    LONG, "  many   spaces\tand\nlines  ", "</s>starts with eos </s> and has one inside", "<unk>", "▁x ▁ y",
    "café au lait 🐱", "<pad><eos><bos>", "what's this? (a 'test')", "ÉCOLE", "x" * 300,
]


@pytest.fixture(scope="module", params=SIGLIP_TOKENIZERS)
def siglip(request, tmp_path_factory):
    """(checkpoint dir, HF SiglipModel, HF SiglipProcessor) for one tokenizer kind."""
    from transformers import SiglipProcessor

    path = tmp_path_factory.mktemp(f"siglip_{request.param}")
    hf = make_siglip_checkpoint(path, seed=3, tokenizer=request.param)
    return path, hf, SiglipProcessor.from_pretrained(path)


def reference_ids(processor, texts: list[str]) -> torch.Tensor:
    """The ids the model was trained on, as transformers' docs ask for them (padding="max_length")."""
    return processor.tokenizer(texts, padding="max_length", truncation=True, max_length=64,
                               return_tensors="pt")["input_ids"]


def test_token_ids_equal_transformers(siglip):
    path, _, processor = siglip
    checkpoint = resolve_checkpoint(str(path))
    ids = SiglipInputs.from_checkpoint(checkpoint, dual_config(checkpoint)).text_ids(TEXTS)
    assert ids.shape == (len(TEXTS), 64)
    assert ids.tolist() == reference_ids(processor, TEXTS).tolist()
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    long_row = ids[TEXTS.index(LONG)].tolist()
    assert pad not in long_row[:-1] and long_row[-1] == eos  # truncated to 63 tokens + </s> / <eos>


def test_embeddings_and_logits_equal_transformers(siglip):
    path, hf, processor = siglip
    checkpoint = resolve_checkpoint(str(path))
    model = load_dual_encoder(checkpoint)
    inputs = SiglipInputs.from_checkpoint(checkpoint, dual_config(checkpoint))
    photos = [load_image(photo) for photo in real_photos().values()]
    pixels, ids = inputs.pixel_values(photos), inputs.text_ids(TEXTS)
    reference_pixels = processor.image_processor(photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, reference_pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        # input_ids only: the towers were trained with the padding attended to (no attention mask)
        out = hf(input_ids=reference_ids(processor, TEXTS), pixel_values=reference_pixels)
    images, texts = model.image_embeds(pixels), model.text_embeds(ids)
    torch.testing.assert_close(images, out.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(texts, out.text_embeds, rtol=0, atol=1e-5)
    prob, cos = model.score(images[:, None], texts[None])  # every image with every text
    torch.testing.assert_close(model.logits(cos), out.logits_per_image, rtol=0, atol=1e-4)
    torch.testing.assert_close(prob, torch.sigmoid(out.logits_per_image), rtol=0, atol=1e-5)
    n = min(len(photos), len(TEXTS))  # pairs: row i with row i
    pair_prob, pair_cos = model.score(images[:n], texts[:n])
    torch.testing.assert_close(pair_cos, cos.diagonal()[:n], rtol=0, atol=1e-6)
    torch.testing.assert_close(pair_prob, prob.diagonal()[:n], rtol=0, atol=1e-6)


def one_line_error(path) -> str:
    checkpoint = resolve_checkpoint(str(path))
    with pytest.raises(VlmbatchError) as caught:
        load_dual_encoder(checkpoint)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_paligemma_checkpoint_is_refused_in_one_line(tmp_path):
    make_checkpoint(tmp_path, "pg1_tied", image_size=28)
    message = one_line_error(tmp_path)
    assert "not a SigLIP dual encoder" in message and "PaliGemma" in message


def test_vision_only_and_headless_checkpoints_are_refused(siglip, tmp_path):
    path = siglip[0]
    config = json.loads((path / "config.json").read_text())
    vision_only = tmp_path / "vision_only"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({**config["vision_config"]}))
    shutil.copy(path / "model.safetensors", vision_only)
    assert "model_type 'siglip_vision_model'" in one_line_error(vision_only)
    headless = tmp_path / "headless"
    shutil.copytree(path, headless)
    config["vision_config"]["vision_use_head"] = False
    (headless / "config.json").write_text(json.dumps(config))
    assert "vision_use_head" in one_line_error(headless)


def test_weights_are_checked_against_the_headers_before_building(siglip, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(siglip[0], path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(config))
    checkpoint = resolve_checkpoint(str(path))
    with pytest.raises(VlmbatchError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight \(64, 32\) "
                                            r"\(expected \(80, 32\)\)"):
        check_weights(checkpoint, dual_config(checkpoint))
    config["vision_config"]["intermediate_size"] = 64
    config["text_config"]["num_hidden_layers"] = 200
    (path / "config.json").write_text(json.dumps(config))
    assert "text_config.num_hidden_layers = 200, the weight files hold 2" in one_line_error(path)


def test_other_image_preprocessing_is_refused(siglip, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(siglip[0], path)
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "image_mean": [0.48, 0.46, 0.41]}))
    checkpoint = resolve_checkpoint(str(path))
    with pytest.raises(VlmbatchError, match="image_mean"):
        SiglipInputs.from_checkpoint(checkpoint, dual_config(checkpoint))
