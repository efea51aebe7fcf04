"""PaliGemma configuration, parsed from a Hugging Face `config.json`.

Published configs leave out most fields and rely on the Gemma / SigLIP defaults; those defaults live
here, in one place, so a config that says only `"model_type": "gemma2"` still builds the right model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP So400m/14, as PaliGemma uses it (no pooling head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    model_type: str = "gemma"
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Gemma 2 only; None disables each feature.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for global attention."""
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


# Gemma 2 differs from Gemma in these defaults (transformers' Gemma2Config); Gemma's are the dataclass's.
_GEMMA2_DEFAULTS = {
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
}


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 257152
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PaliGemmaConfig":
        if raw.get("model_type", "paligemma") != "paligemma":
            raise ValueError(f"not a PaliGemma config: model_type is {raw.get('model_type')!r}")
        text = _parse_text(raw.get("text_config") or {})
        vision = _parse_vision(raw.get("vision_config") or {})
        text_raw = raw.get("text_config") or {}
        tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", True))
        return cls(
            vision=vision,
            text=text,
            image_token_id=raw.get("image_token_id", raw.get("image_token_index", 257152)),
            bos_token_id=_first(raw.get("bos_token_id", text_raw.get("bos_token_id", 2))),
            eos_token_id=_first(raw.get("eos_token_id", text_raw.get("eos_token_id", 1))),
            pad_token_id=_first(raw.get("pad_token_id", text_raw.get("pad_token_id", 0))),
            tie_word_embeddings=bool(tie),
        )


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names and v is not None}


def _parse_vision(raw: dict[str, Any]) -> VisionConfig:
    values = _known(VisionConfig, raw)
    if "image_size" not in values and raw.get("num_image_tokens"):
        # Some published configs give only the token count; the side follows from the patch grid.
        side = math.isqrt(int(raw["num_image_tokens"]))
        values["image_size"] = side * values.get("patch_size", VisionConfig.patch_size)
    _check_activation(raw.get("hidden_act"))
    return VisionConfig(**values)


def _parse_text(raw: dict[str, Any]) -> TextConfig:
    model_type = raw.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise ValueError(f"unsupported PaliGemma text model_type {model_type!r} (expected gemma or gemma2)")
    values = {**(_GEMMA2_DEFAULTS if model_type == "gemma2" else {}), **_known(TextConfig, raw)}
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
    values["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", TextConfig.rope_theta)))
    if model_type == "gemma2":
        layers = values.get("num_hidden_layers", TextConfig.num_hidden_layers)
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
        ]
        values["layer_types"] = tuple(types)
    else:
        values["layer_types"] = ()
        values["sliding_window"] = None
    _check_activation(raw.get("hidden_activation") or raw.get("hidden_act"))
    return TextConfig(**values)


def _check_activation(name: str | None) -> None:
    # Every PaliGemma uses the tanh approximation of GELU; Gemma's legacy "gelu" means the same.
    if name is not None and name not in GELU_TANH_NAMES:
        raise ValueError(f"unsupported activation {name!r}")
