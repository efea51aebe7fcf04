"""Checkpoint resolution and loading: three weight-name layouts, shards, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from factory import drop_tensor, make_bin_checkpoint, make_checkpoint, real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.errors import VlmbatchError
from vlmbatch.model.config import PaliGemmaConfig
from vlmbatch.model.loading import (
    canonical_name,
    check_weights,
    load_model,
    resolve_checkpoint,
)


def state(path):
    return {k: v.clone() for k, v in load_model(resolve_checkpoint(str(path))).state_dict().items()}


@pytest.mark.parametrize("variant", ["pg1_tied", "pg1_untied", "pg2"])
def test_every_layout_loads_identical_weights(make_ckpt, variant):
    reference = state(make_ckpt(variant, "transformers", image_size=28).path)
    for layout, shards in [("hub", 1), ("memory", 1), ("hub", 3), ("transformers", 2)]:
        loaded = state(make_ckpt(variant, layout, image_size=28, shards=shards).path)
        assert loaded.keys() == reference.keys(), (layout, shards)
        for name, tensor in reference.items():
            assert torch.equal(loaded[name], tensor), (layout, shards, name)


def test_loaded_weights_equal_the_reference_models(make_ckpt):
    ckpt = make_ckpt("pg2", "hub", image_size=28)
    ours = load_model(resolve_checkpoint(str(ckpt.path))).state_dict()
    theirs = {canonical_name(k): v for k, v in ckpt.hf.state_dict().items()}
    for name, tensor in ours.items():
        if name.startswith("text.rotary"):
            continue
        assert torch.equal(tensor, theirs[name]), name


def test_tied_head_shares_the_embedding(make_ckpt):
    model = load_model(resolve_checkpoint(str(make_ckpt("pg1_tied", "hub", image_size=28).path)))
    assert model.lm_head.weight.data_ptr() == model.text.embed_tokens.weight.data_ptr()


def test_pickle_checkpoint_is_refused(tmp_path):
    make_bin_checkpoint(tmp_path)
    with pytest.raises(VlmbatchError, match=r"pickle.*pytorch_model\.bin.*safetensors"):
        load_model(resolve_checkpoint(str(tmp_path)))


# Each broken checkpoint is refused alike by the header-only check a job runs up front and by the load.
CHECKS = [pytest.param(lambda path: check_weights(resolve_checkpoint(str(path))), id="check_weights"),
          pytest.param(lambda path: load_model(resolve_checkpoint(str(path))), id="load_model")]


@pytest.mark.parametrize("check", CHECKS)
def test_missing_tensor_is_named(tmp_path, check):
    make_checkpoint(tmp_path, "pg1_untied", "hub", image_size=28)
    dropped = drop_tensor(tmp_path, "layers.1.mlp.up_proj")
    with pytest.raises(VlmbatchError, match=r"missing tensors: text\.layers\.1\.mlp\.up_proj\.weight"):
        check(tmp_path)
    assert "up_proj" in dropped


@pytest.mark.parametrize("check", CHECKS)
def test_untied_checkpoint_without_head_is_an_error(tmp_path, check):
    make_checkpoint(tmp_path, "pg1_untied", "hub", image_size=28)
    drop_tensor(tmp_path, "lm_head")
    with pytest.raises(VlmbatchError, match="missing tensors: lm_head.weight"):
        check(tmp_path)


@pytest.mark.parametrize("check", CHECKS)
def test_shapes_that_disagree_with_the_config_are_named(tmp_path, check):
    make_checkpoint(tmp_path, "pg1_untied", "hub", image_size=28)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VlmbatchError, match=r"shapes do not match the config: text\.layers\.0\.mlp\.\w+_proj"
                                            r"\.weight \(\d+, \d+\) \(expected"):
        check(tmp_path)


@pytest.mark.parametrize("check", CHECKS)
def test_a_weight_file_cut_short_is_named(tmp_path, check):
    make_checkpoint(tmp_path, "pg1_untied", "hub", image_size=28)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VlmbatchError, match=rf"cannot read {weights.name} .*delete the file and fetch it again"):
        check(tmp_path)


def test_a_sound_checkpoint_passes_the_check_and_counts_its_parameters(make_ckpt):
    for variant in ("pg1_tied", "pg1_untied", "pg2"):
        ckpt = make_ckpt(variant, "transformers", image_size=28)
        counted = check_weights(resolve_checkpoint(str(ckpt.path)))
        assert counted == sum(p.numel() for p in ckpt.hf.parameters())  # a tied head once, as torch counts it


def test_missing_local_model_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(VlmbatchError, match="model not found"):
        resolve_checkpoint(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(VlmbatchError, match="offline and not in the Hugging Face cache"):
        resolve_checkpoint("google/paligemma2-3b-mix-224")


def test_published_config_defaults_are_filled():
    """A config as published on the Hub for paligemma2-3b-pt-448: most fields left to defaults."""
    cfg = PaliGemmaConfig.from_dict({
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2304, "hidden_size": 2304,
        "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "vocab_size": 257216, "num_image_tokens": 1024},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 1024,
                          "patch_size": 14, "projection_dim": 2304, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False},
    })
    assert cfg.vision.image_size == 448 and cfg.num_image_tokens == 1024
    t = cfg.text
    assert (t.head_dim, t.rope_theta, t.query_pre_attn_scalar) == (256, 10000.0, 256)
    assert (t.attn_logit_softcapping, t.final_logit_softcapping, t.sliding_window) == (50.0, 30.0, 4096)
    assert t.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.tie_word_embeddings and cfg.image_token_id == 257152
    gemma = PaliGemmaConfig.from_dict({"model_type": "paligemma", "text_config": {"model_type": "gemma"}})
    assert gemma.text.sliding_window is None and gemma.text.attn_logit_softcapping is None
    assert {896: 4096, 224: 256}[896] == PaliGemmaConfig.from_dict(
        {"model_type": "paligemma", "vision_config": {"image_size": 896}}).num_image_tokens


def test_a_model_packed_for_onednn_keeps_no_mapping_of_the_checkpoint(make_ckpt):
    """Loaded tensors are views of the memory-mapped file; once the weights are packed for oneDNN the
    rest are copied, so the file's pages are not kept resident beside the packed copies."""
    import gc
    from pathlib import Path

    checkpoint = resolve_checkpoint(str(make_ckpt("pg1_untied", "hub", image_size=28).path))
    files = [str(f) for f in checkpoint.weight_files()]

    def mapped() -> bool:
        gc.collect()
        maps = Path("/proc/self/maps").read_text()
        return any(f in maps for f in files)

    plain = load_model(checkpoint)
    assert mapped()  # the check can see a mapping
    del plain
    assert not mapped()
    packed = load_model(checkpoint, cpu_matmul="onednn")
    assert not mapped()
    assert packed.text.embed_tokens.weight.is_contiguous()


# -- a damaged config, tokenizer or weights file is one line (exit 2), found before any model is built ----
def damaged_copy(ckpt, tmp_path, edit=None):
    """A private copy of the session checkpoint `ckpt`; `edit(config)` rewrites its config.json."""
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt.path, path)
    if edit is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(edit(config)))
    return path


def caption_error(path, tmp_path) -> str:
    """The one line `vlmbatch caption` stops with, run over one image with the checkpoint at `path`."""
    (tmp_path / "images").mkdir(exist_ok=True)
    next(iter(real_photos().values())).convert("RGB").save(tmp_path / "images" / "a.jpg")
    result = CliRunner().invoke(app, ["caption", str(tmp_path / "images"), "--out", str(tmp_path / "o.parquet"),
                                      "--model", str(path), "--workers", "0"])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _set(section, key, value):
    def edit(config):
        (config[section] if section else config)[key] = value
        return config
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda config: [config], "the config must be a JSON object, got list"),
    (_set("vision_config", "patch_size", 0), "vision_config.patch_size must be a positive integer, got 0"),
    (_set("text_config", "num_hidden_layers", "2"), "text_config.num_hidden_layers must be a positive integer, got '2'"),
    (_set("text_config", "hidden_size", 64.5), "text_config.hidden_size must be a positive integer, got 64.5"),
    (_set("text_config", "num_key_value_heads", True), "text_config.num_key_value_heads must be a positive integer"),
    (_set("text_config", "rms_norm_eps", -1), "text_config.rms_norm_eps must be a positive number, got -1"),
    (_set("text_config", "rope_scaling", "linear"), "text_config.rope_parameters must be a JSON object, got str"),
    (_set("vision_config", "image_size", 7), "vision_config.image_size 7 is smaller than its patch_size 14"),
    (_set("vision_config", "num_attention_heads", 5), "vision_config.hidden_size 32 is not a multiple of "
                                                      "num_attention_heads 5"),  # the factory's SigLIP width
    (_set("", "tie_word_embeddings", "false"), "tie_word_embeddings must be true or false, got 'false'"),
    (_set("", "image_token_index", 10**6), "image_token_id 1000000 is outside the vocabulary"),
    (_set("", "text_config", [1]), "text_config must be a JSON object, got list [1]"),
], ids=["list", "patch_size 0", "layers as text", "float size", "bool count", "negative eps", "rope as text",
        "image smaller than a patch", "heads", "tie as text", "token id", "text_config a list"])
def test_a_bad_config_value_is_one_line_naming_its_key(make_ckpt, tmp_path, edit, message):
    path = damaged_copy(make_ckpt("pg1_untied", "hub", image_size=28), tmp_path, edit)
    with pytest.raises(VlmbatchError, match=re.escape(f"{path}: cannot read config.json: {message}")):
        resolve_checkpoint(str(path)).config
    assert message in caption_error(path, tmp_path)


@pytest.mark.parametrize("section", ["text_config", "vision_config"])
def test_a_config_asking_for_layers_the_weights_lack_is_refused_before_any_model_is_built(make_ckpt, tmp_path,
                                                                                        section):
    path = damaged_copy(make_ckpt("pg1_untied", "hub", image_size=28), tmp_path,
                        _set(section, "num_hidden_layers", 100_000))
    start = time.monotonic()
    message = (f"weights do not match the config: config.json has {section}.num_hidden_layers = 100000, "
               "the weight files hold 2 such layers")
    for check in (check_weights, load_model):
        with pytest.raises(VlmbatchError, match=re.escape(f"{path}: {message}")):
            check(resolve_checkpoint(str(path)))
    assert caption_error(path, tmp_path) == f"error: {path}: {message}"
    assert time.monotonic() - start < 10  # building that model alone took over a minute


def test_a_broken_tokenizer_is_one_line(make_ckpt, tmp_path):
    path = damaged_copy(make_ckpt("pg1_untied", "hub", image_size=28), tmp_path)
    (path / "tokenizer.json").write_text('{"model": ')
    assert caption_error(path, tmp_path).startswith(f"error: cannot read {path / 'tokenizer.json'}: ")


def test_a_weights_file_larger_than_memory_says_it_could_not_be_mapped(make_ckpt, tmp_path):
    """A file larger than RAM and swap together cannot be mapped (kept sparse here: no disk is used)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("the kernel maps any size when it always overcommits")
    path = damaged_copy(make_ckpt("pg1_untied", "hub", image_size=28), tmp_path)
    size = 2 * (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + _swap_bytes())
    header = json.dumps({"vision_tower.vision_model.head.big": {"dtype": "U8", "shape": [size],
                                                                "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    big = path / "zz-big.safetensors"
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    os.truncate(big, 8 + len(header) + size)
    gb = f"{big.stat().st_size / (1 << 30):.1f} GB"
    with pytest.raises(VlmbatchError, match=re.escape(f"{path}: zz-big.safetensors could not be memory-mapped: "
                                                      f"the file is {gb}, ") + r"\d+\.\d GB of memory available"):
        check_weights(resolve_checkpoint(str(path)))
    assert "could not be memory-mapped" in caption_error(path, tmp_path)


def _swap_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1]) * 1024
    return 0
