"""Test-data factory: tiny PaliGemma checkpoints, a Gemma-style tokenizer and real photos.

Everything here is deterministic, builds in seconds on a CPU and needs no network.
The checkpoints are random-weight models that have the *exact* architecture and
on-disk layout of the real google/paligemma-* and paligemma2-* releases, only
tiny, so our loader and engine can be compared token-for-token against
transformers (which is a test-only oracle for this project).

Import from tests with ``from factory import ...`` (``tests/conftest.py`` puts
this directory on ``sys.path``).
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

#: Gemma's fixed low ids; the real PaliGemma tokenizer has exactly these (0..4).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
#: SentencePiece-style byte-fallback pieces, in the model vocab (not added tokens).
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
#: PaliGemma's detection / segmentation tokens (same strings as the reference processor).
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
IMAGE_TOKEN = "<image>"
#: Size of the learned BPE part (single characters + merges, specials excluded).
BPE_PIECES = 400

_SUBJECTS = [
    "a cat", "a small dog", "two dogs", "a man", "a woman", "a child", "an astronaut",
    "a red car", "a bus", "a motorcycle", "a rocket", "a cup of coffee", "a bird",
    "a group of people", "an old coin", "the moon", "a galaxy", "a horse", "a train",
    "a plate of food", "a bicycle", "a boat", "a tree", "a building", "a clock",
]
_VERBS = [
    "sitting on", "standing next to", "lying on", "parked in front of", "flying over",
    "walking along", "looking at", "resting near", "floating above", "in the middle of",
]
_PLACES = [
    "a wooden table", "the grass", "a busy street", "the beach", "a white wall",
    "the snow", "a blue sky", "a dark room", "the water", "a city park", "the road",
    "a kitchen counter", "a field of flowers", "the stars",
]
_EXTRA = [
    "caption en", "caption es", "caption fr", "caption de", "describe en", "answer en",
    "question en", "detect cat", "detect dog ; person", "segment car", "ocr", "cap en",
    "what is in the image?", "what color is the car?", "how many people are there?",
    "where is the cat?", "who is in the picture?", "is there a dog in the photo?",
    "which animal is this?", "why is the sky blue?", "when was this photo taken?",
    "what is the man holding?", "what is on the table?", "yes", "no", "one", "two",
    "three", "four", "five", "red", "green", "blue", "black", "white", "yellow", "brown",
    "A close-up photo of a grey cat, 2 eyes and 1 nose.", "The image shows: stars & dust!",
    "Un gato sentado en la mesa.", "Une tasse de café sur la table.",
    "Ein Hund läuft über die Straße.",
]


def _corpus() -> list[str]:
    """A few hundred caption/question-like sentences (deterministic, inline)."""
    sentences = []
    for i, subject in enumerate(_SUBJECTS):
        for j in range(len(_VERBS)):
            verb = _VERBS[(i + j) % len(_VERBS)]
            place = _PLACES[(i * 3 + j) % len(_PLACES)]
            sentences.append(f"{subject} {verb} {place}")
            if j % 3 == 0:
                sentences.append(f"A photo of {subject} {verb} {place}.")
    return sentences + _EXTRA


@functools.lru_cache(maxsize=1)
def _train_bpe_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces/merges on the inline corpus, SentencePiece style ("▁" marks spaces)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Only for training: cut before each "▁" so merges never span two words.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + BPE_PIECES,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    pieces = [piece for piece, _ in vocab if piece not in SPECIAL_TOKENS]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges


def build_tokenizer():
    """The raw ``tokenizers.Tokenizer``, laid out like the real PaliGemma tokenizer.json.

    ids: 0-4 ``<pad> <eos> <bos> <unk> <mask>``; 5-260 byte pieces; then learned BPE pieces;
    then added tokens ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>`` (not
    special, so ``skip_special_tokens`` keeps them, as for the real model) and finally
    ``<image>`` (special), which is the last id, as 257152 is in the real one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    pieces, merges = _train_bpe_pieces()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # no dummy prefix, like Gemma
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_TOKENS + SEG_TOKENS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return tok


def make_tokenizer(out_dir: Path, image_size: int = 224, patch_size: int = 14) -> None:
    """Write tokenizer + PaliGemma processor files into ``out_dir``.

    Produces tokenizer.json (loadable by ``tokenizers.Tokenizer.from_file``),
    tokenizer_config.json, special_tokens_map.json, processor_config.json (what
    transformers 5 writes) and preprocessor_config.json (what the hub ships), both
    with ``image_seq_length`` = (image_size // patch_size)**2, so that
    ``PaliGemmaProcessor.from_pretrained(out_dir)`` / ``AutoTokenizer`` work.
    """
    from transformers import (
        GemmaTokenizerFast,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )
    from transformers.image_utils import PILImageResampling

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok = GemmaTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False,
    )
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
    processor.save_pretrained(out_dir)
    # The processor switched add_bos_token off on the tokenizer (it inserts <bos> as
    # text itself), which rewrote tokenizer.json's post-processor without <bos>.
    # transformers 5 ignores add_bos_token in tokenizer_config.json when a
    # tokenizer.json exists, so the post-processor is the only truth: re-save it with
    # "<bos> $A", as in the hub's tokenizer.json.
    hf_tok.add_bos_token = True
    hf_tok.save_pretrained(out_dir)
    _write_hub_style_configs(out_dir, image_processor.to_dict())


def _write_hub_style_configs(out_dir: Path, image_processor: dict) -> None:
    """Add the files transformers 5 no longer writes but the hub checkpoints ship.

    * preprocessor_config.json: the flat image-processor config (5.x nests it in
      processor_config.json instead);
    * special_tokens_map.json;
    * ``add_bos_token: true`` / ``add_eos_token: false`` in tokenizer_config.json
      (5.x neither writes nor reads them when tokenizer.json exists; for realism only).
    """
    preprocessor = {**image_processor, "processor_class": "PaliGemmaProcessor"}
    _write_json(out_dir / "preprocessor_config.json", preprocessor)
    _write_json(out_dir / "special_tokens_map.json", {
        "additional_special_tokens": [IMAGE_TOKEN],
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    })
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=True, add_eos_token=False)
    _write_json(config_path, config)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def tokenizer_ids(out_dir: Path) -> dict[str, int]:
    """``{"pad", "eos", "bos", "unk", "image", "newline", "vocab_size"}`` read back from tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))
    ids = {name: tok.token_to_id(f"<{name}>") for name in ("pad", "eos", "bos", "unk", "image")}
    ids["newline"] = tok.encode("\n", add_special_tokens=False).ids[0]
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

VARIANTS = ("pg1_tied", "pg1_untied", "pg2")
LAYOUTS = ("transformers", "hub", "memory")
PATCH_SIZE = 14

_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               patch_size=PATCH_SIZE, vision_use_head=False)
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             head_dim=16, intermediate_size=128, hidden_act="gelu_pytorch_tanh",
             max_position_embeddings=8192)
#: Gemma2 extras (PaliGemma 2); the soft-caps are Gemma2Config's defaults, spelled out.
_GEMMA2 = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
               query_pre_attn_scalar=16, sliding_window=4096)


def make_config(variant: str, image_size: int = 224, tokenizer_dir: Path | None = None, **overrides):
    """A tiny ``PaliGemmaConfig`` for ``variant`` (see :data:`VARIANTS`).

    ``overrides`` replace text-config fields (``sliding_window=8``,
    ``num_hidden_layers=4``); prefix a key with ``vision_`` for the SigLIP config
    (``vision_num_hidden_layers=3``); keys only SigLIP has (``layer_norm_eps``) go
    there unprefixed. ``image_size`` is a separate argument (it also sets the
    processor's image_seq_length).
    Token ids come from the factory tokenizer; vocab_size = tokenizer size, so the
    ``<image>`` id (the last one) is inside the vocab, as in the real checkpoints.
    """
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        PaliGemmaConfig,
        SiglipVisionConfig,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    ids = tokenizer_ids(tokenizer_dir) if tokenizer_dir else _default_tokenizer_ids()
    tied = variant == "pg1_tied"
    text = dict(_TEXT, vocab_size=ids["vocab_size"], pad_token_id=ids["pad"], eos_token_id=ids["eos"],
                bos_token_id=ids["bos"], tie_word_embeddings=tied)
    vision = dict(_VISION, image_size=image_size)
    if variant == "pg2":
        text.update(_GEMMA2)
    text_config_cls = Gemma2Config if variant == "pg2" else GemmaConfig
    for key, value in overrides.items():
        target, field = _override_target(key, text_config_cls)
        (vision if target == "vision" else text)[field] = value
    if "head_dim" in overrides and variant == "pg2" and "query_pre_attn_scalar" not in overrides:
        text["query_pre_attn_scalar"] = text["head_dim"]
    text_config = text_config_cls(**text)
    return PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision).to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=ids["image"],
        vocab_size=ids["vocab_size"],
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        tie_word_embeddings=tied,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )


def _override_target(key: str, text_config_cls) -> tuple[str, str]:
    """Route an override to ("text"|"vision", field name); reject unknown fields.

    Unknown fields would be stored silently and can change behaviour (transformers
    builds sliding-window masks whenever the text config has ``sliding_window``,
    which breaks a Gemma-1 model).
    """
    from transformers import SiglipVisionConfig

    vision_fields = set(SiglipVisionConfig().to_dict())
    text_fields = set(text_config_cls().to_dict()) | {"rope_theta"}
    if key.startswith("vision_") and key[len("vision_"):] in vision_fields:
        return "vision", key[len("vision_"):]
    if key in text_fields:
        return "text", key
    if key in vision_fields:
        return "vision", key
    raise ValueError(f"{key!r} is not a {text_config_cls.__name__} or SiglipVisionConfig field")


_TOKENIZER_IDS_CACHE: dict[str, int] = {}


def _default_tokenizer_ids() -> dict[str, int]:
    """Ids of the (deterministic) factory tokenizer, computed once per process."""
    if not _TOKENIZER_IDS_CACHE:
        tok = build_tokenizer()
        _TOKENIZER_IDS_CACHE.update({name: tok.token_to_id(f"<{name}>")
                                     for name in ("pad", "eos", "bos", "unk", "image")})
        _TOKENIZER_IDS_CACHE["newline"] = tok.encode("\n", add_special_tokens=False).ids[0]
        _TOKENIZER_IDS_CACHE["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return dict(_TOKENIZER_IDS_CACHE)


def build_model(variant: str, image_size: int = 224, seed: int = 0, eos_boost: float | None = None,
                tokenizer_dir: Path | None = None, device: str = "cpu", **overrides):
    """A random-weight ``PaliGemmaForConditionalGeneration`` (float32, eval mode), built and drawn on
    ``device`` (a 3B model takes minutes to draw on a small CPU, a second on a GPU; the weights
    depend on the device's random generator, so a checkpoint is deterministic per device kind)."""
    from transformers import PaliGemmaForConditionalGeneration

    config = make_config(variant, image_size=image_size, tokenizer_dir=tokenizer_dir, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = PaliGemmaForConditionalGeneration(config).to(torch.float32).eval()
    if variant == "pg2":
        # Gemma 2 caps its attention logits, which only transformers' eager attention does. Before 5.21
        # transformers chose SDPA for Gemma 2 by default and silently dropped the cap (5.21 stopped
        # offering SDPA for it). Asked for by name, the oracle caps under any release, the GPU
        # machine's 5.17 included.
        model.set_attn_implementation({"text_config": "eager"})
    _randomize(model, seed)
    if eos_boost is not None:
        _boost_eos(model, eos_boost, config.text_config.eos_token_id)
    return model


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter with a wide spread so greedy outputs differ per image.

    transformers' init (std 0.02) makes a tiny random model collapse to one repeated
    token. Here: weights N(0, 0.15); Gemma RMSNorm scales N(0, 0.1) (they multiply
    by 1 + w); SigLIP LayerNorm scales 1 + N(0, 0.1); biases N(0, 0.02).
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def draw(param, std, mean=0.0):
        param.copy_(mean + std * torch.randn(param.shape, generator=gen, device=gen.device))

    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    draw(param, 0.1, mean=1.0) if name == "weight" else draw(param, 0.02)
                elif "norm" in module_name.rsplit(".", 1)[-1]:  # Gemma RMSNorm: x * (1 + w)
                    draw(param, 0.1)
                elif name == "bias":
                    draw(param, 0.02)
                else:
                    draw(param, 0.15)


def _boost_eos(model, factor: float, eos_id: int) -> None:
    """Multiply the ``<eos>`` row of the output projection by ``factor``.

    The EOS logit is ``h . w_eos``; scaling the row scales that logit's spread, so
    EOS wins only on the steps where it is large and positive, which differ per
    image and step: greedy output lengths then vary, like real captions. With a tied
    head this also scales the ``<eos>`` input embedding (EOS is never fed back
    before a sequence stops, so prefix outputs are unchanged).
    """
    with torch.no_grad():
        model.lm_head.weight[eos_id] *= factor


@dataclass(frozen=True)
class Ckpt:
    """A checkpoint directory plus the HF model whose weights it holds.

    ``hf`` is the transformers oracle (float32, eval). Fixtures share one instance
    per session: do not modify ``hf`` or the files under ``path``.
    """

    path: Path
    hf: "transformers.PaliGemmaForConditionalGeneration"  # noqa: F821
    variant: str
    layout: str = "transformers"
    image_size: int = 224

    @property
    def ids(self) -> dict[str, int]:
        return tokenizer_ids(self.path)

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2

    def processor(self):
        """A fresh reference ``PaliGemmaProcessor`` loaded from ``path``."""
        from transformers import PaliGemmaProcessor

        return PaliGemmaProcessor.from_pretrained(self.path)


def make_checkpoint(out_dir: Path, variant: str, layout: str = "transformers", image_size: int = 224,
                    seed: int = 0, shards: int = 1, eos_boost: float | None = None, **overrides):
    """Write a complete tiny checkpoint directory; return the HF model it holds.

    ``out_dir`` gets config.json, safetensors weights (one file, or ``shards``
    files + model.safetensors.index.json) and the tokenizer/processor files.

    Tensor names by ``layout`` (``N`` = layer index):

    * ``"transformers"``: exactly what transformers 5.23 ``save_pretrained`` writes.
      It reverts its load-time renaming to the *legacy* Llava-style prefixes, but
      does NOT re-add SigLIP's ``vision_model.`` level (5.x drops it on load), so it
      differs from the hub files:
      ``vision_tower.embeddings.{patch_embedding,position_embedding}.*``,
      ``vision_tower.encoder.layers.N.*``, ``vision_tower.post_layernorm.*``,
      ``multi_modal_projector.linear.{weight,bias}``,
      ``language_model.model.{embed_tokens.weight,layers.N.*,norm.weight}``,
      ``language_model.lm_head.weight`` (untied only); plus generation_config.json.
    * ``"hub"``: the google/paligemma-* files: as above but
      ``vision_tower.vision_model.*``; config.json with the 4.x spellings the hub
      files use (``torch_dtype``, ``rope_theta``; no ``use_bidirectional_attention``).
    * ``"memory"``: ``model.state_dict()`` names: ``model.vision_tower.*``,
      ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``.

    A tied model never stores ``lm_head.weight`` (it is the embedding matrix).
    ``eos_boost``: see :func:`_boost_eos`; ``overrides``: see :func:`make_config`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir, image_size=image_size, patch_size=PATCH_SIZE)
    model = build_model(variant, image_size=image_size, seed=seed, eos_boost=eos_boost,
                        tokenizer_dir=out_dir, **overrides)
    if layout == "transformers":
        model.save_pretrained(out_dir)
        if shards > 1:
            _reshard(out_dir, shards)
    else:
        # What save_pretrained writes (it also fills in architectures and dtype).
        config = json.loads(model.config.to_json_string())
        config.update(architectures=[type(model).__name__], dtype="float32")
        if layout == "hub":
            config = _legacy_hub_config(config)
        _write_json(out_dir / "config.json", config)
        _save_tensors(out_dir, _renamed_state_dict(model, layout), shards)
    return model


def _renamed_state_dict(model, layout: str) -> dict[str, torch.Tensor]:
    """The model's tensors under ``layout``'s names (tied lm_head left out)."""
    tied = model.config.tie_word_embeddings
    hub_prefixes = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if layout == "hub":
            old, new = next((o, n) for o, n in hub_prefixes if name.startswith(o))
            name = new + name[len(old):]
        tensors[name] = tensor.detach().clone().contiguous()
    return tensors


def _legacy_hub_config(config: dict) -> dict:
    """Re-spell a 5.x config dict the way the (4.x-era) hub config.json files do."""
    config = json.loads(json.dumps(config))
    for part in (config, config["text_config"], config["vision_config"]):
        if "dtype" in part:
            part["torch_dtype"] = part.pop("dtype")
    text = config["text_config"]
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rope.get("rope_theta", 10000.0)
    text.pop("use_bidirectional_attention", None)
    return config


def _save_tensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors, or ``shards`` files + index, with the {"format": "pt"} metadata."""
    from safetensors.torch import save_file

    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"{shards} shards for {len(names)} tensors")
    weight_map = {}
    for k, chunk in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        part = {names[i]: tensors[names[i]] for i in chunk}
        save_file(part, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _reshard(out_dir: Path, shards: int) -> None:
    """Split a single model.safetensors into ``shards`` files, names unchanged."""
    from safetensors.torch import load_file

    single = out_dir / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    _save_tensors(out_dir, tensors, shards)


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, in shard order."""
    return sorted(Path(ckpt_dir).glob("*.safetensors"))


def drop_tensor(ckpt_dir: Path, name_substring: str) -> str:
    """Rewrite the checkpoint without the first tensor whose name contains
    ``name_substring`` (index.json kept consistent); return the dropped name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in safetensors_files(ckpt_dir):
        with safe_open(str(file), "pt") as f:
            names = list(f.keys())
            victim = next((n for n in names if name_substring in n), None)
            if victim is None:
                continue
            kept = {n: f.get_tensor(n) for n in names if n != victim}
            metadata = f.metadata()
        save_file(kept, str(file), metadata=metadata)
        index = Path(ckpt_dir) / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"].pop(victim, None)
            _write_json(index, data)
        return victim
    raise KeyError(f"no tensor name contains {name_substring!r} in {ckpt_dir}")


def make_bin_checkpoint(out_dir: Path, variant: str = "pg1_untied", image_size: int = 28, seed: int = 0):
    """A checkpoint with only a pickled ``pytorch_model.bin`` (no safetensors), which
    our loader must refuse (unpickling runs arbitrary code). Returns the HF model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir, image_size=image_size, patch_size=PATCH_SIZE)
    model = build_model(variant, image_size=image_size, seed=seed, tokenizer_dir=out_dir)
    model.config.save_pretrained(out_dir)
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    return model


# ---------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------

#: Real photographs shipped inside scikit-image's wheel (no download needed).
PHOTO_FILES = {
    "astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
    "rocket": "rocket.jpg", "hubble": "hubble_deep_field.jpg", "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg", "camera": "camera.png", "moon": "moon.png", "coins": "coins.png",
    "ihc": "ihc.png",
}
_PHOTO_CACHE: dict[str, Image.Image] = {}


def photo_dir() -> Path:
    """scikit-image's bundled data folder (located without importing skimage.data)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is needed for the test photos (pip install scikit-image)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def real_photos() -> dict[str, Image.Image]:
    """``name -> PIL image`` in the file's own mode (``camera``, ``moon``, ``coins``
    are greyscale "L"). Fresh copies each call, so callers may mutate them."""
    if not _PHOTO_CACHE:
        for name, file in PHOTO_FILES.items():
            with Image.open(photo_dir() / file) as img:
                img.load()
                _PHOTO_CACHE[name] = img.copy()
    return {name: img.copy() for name, img in _PHOTO_CACHE.items()}


def distinct_photos(n: int, size: int = 320) -> list[Image.Image]:
    """``n`` different ``size``x``size`` RGB photos, deterministically derived from
    the real ones by crops at different offsets / scales, flips and rotations."""
    sources = [img.convert("RGB") for img in real_photos().values()]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        k = i // len(sources)  # how many times this source was used already
        w, h = src.size
        side = max(16, int(min(w, h) * (0.9 - 0.07 * (k % 8))))
        x = (k * 37) % (w - side + 1)
        y = (k * 53) % (h - side + 1)
        img = src.crop((x, y, x + side, y + side))
        if k % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.rotate(90 * ((k // 2) % 4), expand=True)
        out.append(img.resize((size, size), Image.Resampling.BICUBIC))
    return out


def photo_variants(tmp_dir: Path) -> dict[str, Path]:
    """Real photos written in the Pillow modes / formats a loader must cope with."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    photos = real_photos()
    rgb = photos["chelsea"].convert("RGB")
    grey = photos["camera"].convert("L")
    paths = {}

    def save(key, img, file, **kw):
        paths[key] = tmp_dir / file
        img.save(paths[key], **kw)

    save("rgb_jpeg", rgb, "rgb.jpg", quality=90)
    save("l_png", grey, "grey.png")
    save("la_png", Image.merge("LA", (grey, _gradient_alpha(grey.size))), "grey_alpha.png")
    palette = photos["coffee"].convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("p_png_transparency", palette, "palette.png", transparency=0)
    rgba = photos["astronaut"].convert("RGBA")
    rgba.putalpha(_gradient_alpha(rgba.size))
    save("rgba_png", rgba, "rgba.png")
    save("cmyk_jpeg", photos["rocket"].convert("CMYK"), "cmyk.jpg")
    grey16 = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)  # full 16-bit range
    save("i16_png", grey16, "grey16.png")
    save("exif_rotated_jpeg", photos["motorcycle"].convert("RGB"), "rotated.jpg", exif=_exif_orientation(6))
    save("webp", photos["coffee"].convert("RGB"), "coffee.webp")
    frames = [rgb.resize((160, 120)), rgb.resize((160, 120)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated_gif", frames[0], "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("tiny_1x1_png", rgb.resize((1, 1)), "tiny.png")
    save("extreme_aspect_png", rgb.resize((4000, 3)), "wide.png")
    save("uppercase_ext_jpg", photos["astronaut"].convert("RGB"), "UPPER.JPG", format="JPEG")
    return paths


def _gradient_alpha(size: tuple[int, int]) -> Image.Image:
    """An "L" alpha channel fading left to right (partly transparent, never all 0)."""
    w, h = size
    ramp = np.linspace(30, 255, w, dtype=np.float32)
    return Image.fromarray(np.tile(ramp, (h, 1)).astype(np.uint8), mode="L")


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation; 6 = display rotated 90 degrees clockwise
    return exif.tobytes()


def broken_images(tmp_dir: Path) -> dict[str, Path]:
    """Files a loader must reject cleanly (error record, never a crash or a hang)."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    real_photos()["chelsea"].convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    paths = {
        "truncated_jpeg": tmp_dir / "truncated.jpg",
        "empty_jpg": tmp_dir / "empty.jpg",
        "text_as_png": tmp_dir / "not_an_image.png",
        "decompression_bomb": tmp_dir / "bomb.png",
    }
    paths["truncated_jpeg"].write_bytes(data[: int(len(data) * 0.4)])
    paths["empty_jpg"].write_bytes(b"")
    paths["text_as_png"].write_text("this is not a PNG file\n")
    _write_bomb_png(paths["decompression_bomb"])
    return paths


#: 14000^2 = 196M pixels > 2 x Pillow's default MAX_IMAGE_PIXELS (89.5M):
#: Image.open raises DecompressionBombError (not just a warning).
BOMB_SIDE = 14000


def _write_bomb_png(path: Path, side: int = BOMB_SIDE) -> None:
    """A 1-bit all-zero PNG of side x side: ~25 KB on disk, never decoded here.

    Written by hand (zlib-compressed scanlines streamed in chunks) because asking
    Pillow to build it would allocate the whole image.
    """
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000))
    idat += comp.compress(row * (side % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------
# SigLIP dual encoders (image-text match scores)
# ---------------------------------------------------------------------------

#: How a SigLIP checkpoint ships its tokenizer: "json", a Gemma-style tokenizer.json closing each text
#: with <eos>, GemmaTokenizer's config (SigLIP 2's kind; transformers pads it on the left); "siglip2", the
#: same named Siglip2Tokenizer (which transformers also lowercases); "spiece", a SentencePiece unigram
#: spiece.model and SiglipTokenizer's config (SigLIP's kind: </s> as pad and eos, canonicalized text).
SIGLIP_TOKENIZERS = ("json", "siglip2", "spiece")
#: A trained SigLIP B/16's logit scale (exp: ~117) and bias, so that the test logits have real magnitudes.
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = 4.77, -12.9


def _siglip_spiece(out_dir: Path) -> Path:
    """A ~200-piece SentencePiece unigram model trained on the inline corpus (ids 0-2: <pad> </s> <unk>,
    as in SigLIP's T5-style vocabulary); characters outside the corpus become <unk>."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=300, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    path = Path(out_dir) / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def make_siglip_tokenizer(out_dir: Path, kind: str = "json", image_size: int = 56) -> dict[str, int]:
    """Write a SigLIP checkpoint's tokenizer and processor files into ``out_dir`` (``kind``: see
    :data:`SIGLIP_TOKENIZERS`), loadable by ``SiglipProcessor.from_pretrained``; plus the flat
    preprocessor_config.json the hub ships. Returns ``{"vocab_size", "pad", "eos"}``."""
    from transformers import (
        GemmaTokenizerFast,
        SiglipImageProcessor,
        SiglipProcessor,
        SiglipTokenizer,
    )
    from transformers.image_utils import PILImageResampling

    if kind not in SIGLIP_TOKENIZERS:
        raise ValueError(f"unknown SigLIP tokenizer kind {kind!r}; expected one of {SIGLIP_TOKENIZERS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind in ("json", "siglip2"):
        from tokenizers import processors

        tok = build_tokenizer()
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
        hf_tok = GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                    unk_token="<unk>", model_max_length=64)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    else:
        hf_tok = SiglipTokenizer(str(_siglip_spiece(out_dir)), model_max_length=64)
        vocab_size = hf_tok.vocab_size
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    SiglipProcessor(image_processor=image_processor, tokenizer=hf_tok).save_pretrained(out_dir)
    _write_json(out_dir / "preprocessor_config.json", {**image_processor.to_dict(), "processor_class": "SiglipProcessor"})
    if kind == "siglip2":
        config = json.loads((out_dir / "tokenizer_config.json").read_text())
        _write_json(out_dir / "tokenizer_config.json", {**config, "tokenizer_class": "Siglip2Tokenizer"})
    return {"vocab_size": vocab_size, "pad": hf_tok.pad_token_id, "eos": hf_tok.eos_token_id}


def make_siglip_checkpoint(out_dir: Path, seed: int = 0, tokenizer: str = "json", image_size: int = 56,
                           patch_size: int = PATCH_SIZE, text: dict | None = None, vision: dict | None = None):
    """Write a tiny random SigLIP dual-encoder checkpoint (``SiglipModel.save_pretrained``: config.json with
    text_config / vision_config, model.safetensors with ``vision_model.*``, ``text_model.*``,
    ``logit_scale``, ``logit_bias``) with its tokenizer (:func:`make_siglip_tokenizer`); return the HF model.

    Vision: 32 wide, 2 layers, 2 heads, with the attention-pooling head. Text: 48 wide, 4 heads, 2 layers,
    64 positions, projected to 32 (the vision width), as a real checkpoint's towers meet. ``text`` and
    ``vision`` replace fields of each config. Weights as :func:`_randomize` draws them; logit scale and
    bias those of a trained model (:data:`SIGLIP_LOGIT_SCALE`).
    """
    from transformers import SiglipConfig, SiglipModel

    ids = make_siglip_tokenizer(out_dir, tokenizer, image_size=image_size)
    text_config = {"vocab_size": ids["vocab_size"], "hidden_size": 48, "intermediate_size": 96,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
                   "projection_size": 32, "pad_token_id": ids["pad"], "eos_token_id": ids["eos"], "bos_token_id": None}
    vision_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "image_size": image_size, "patch_size": patch_size}
    config = SiglipConfig(text_config={**text_config, **(text or {})}, vision_config={**vision_config, **(vision or {})})
    torch.manual_seed(seed)
    model = SiglipModel(config).to(torch.float32).eval()
    _randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_LOGIT_SCALE)
        model.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    model.save_pretrained(out_dir)
    return model


def make_scripted_checkpoint(out_dir: Path, script: str, image_size: int = 28, seed: int = 0) -> "Ckpt":
    """A tiny pg1_untied checkpoint (transformers layout) whose greedy answer to any prompt is `script`,
    then ``<eos>``: how tests make the random model write ``<loc>``/``<seg>`` answers.

    The answer's tokens (with the prompt's final ``\\n`` first) get one-hot input embeddings so large that
    the residual stream at a position is its own token's, whatever the layers add; the output head,
    zero elsewhere, maps each of them to its successor with a logit of about 6-11 (varied, so
    log-probs differ per token, from about -1 to near 0). The tokens of `script` must be distinct, and fewer than the hidden size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir, image_size=image_size, patch_size=PATCH_SIZE)
    model = build_model("pg1_untied", image_size=image_size, seed=seed, tokenizer_dir=out_dir)
    ids = tokenizer_ids(out_dir)
    chain = [ids["newline"], *build_tokenizer().encode(script, add_special_tokens=False).ids, ids["eos"]]
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    hidden = embed.shape[1]
    if len(set(chain)) != len(chain) or len(chain) > hidden:
        raise ValueError(f"script tokens must be distinct and fewer than {hidden}: {chain}")
    with torch.no_grad():
        head.zero_()
        for k, (token, successor) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, k] = 100.0
            # RMSNorm makes the one-hot state sqrt(hidden) * (1 + w_k) ~ 8 at dimension k.
            head[successor, k] = (6.0 + 2.5 * (k % 3)) / hidden ** 0.5
    model.save_pretrained(out_dir)
    return Ckpt(out_dir, model, "pg1_untied", "transformers", image_size)
