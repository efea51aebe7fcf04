"""PaliGemma configuration, parsed from a Hugging Face `config.json`.

Published configs leave out most fields and rely on the Gemma / SigLIP defaults; those defaults live
here, in one place, so a config that says only `"model_type": "gemma2"` still builds the right model.
"""

from __future__ import annotations

import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
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

    def __post_init__(self):
        _check_values(self, "vision_config.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision_config.image_size {self.image_size} is smaller than its patch_size "
                             f"{self.patch_size}")

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

    def __post_init__(self):
        _check_values(self, "text_config.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config.num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"text_config.layer_types names {len(self.layer_types)} layers, num_hidden_layers "
                             f"is {self.num_hidden_layers}")
        unknown = [kind for kind in self.layer_types if kind not in LAYER_TYPES]
        if unknown:
            raise ValueError(f"text_config.layer_types: unknown {_short(unknown[0])} "
                             f"(expected {' or '.join(LAYER_TYPES)})")

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

    def __post_init__(self):
        _check_values(self, "")
        for name in _TOKEN_IDS:
            if getattr(self, name) >= self.text.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary "
                                 f"(text_config.vocab_size {self.text.vocab_size})")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PaliGemmaConfig":
        _check_object(raw, "the config")
        if raw.get("model_type", "paligemma") != "paligemma":
            raise ValueError(f"not a PaliGemma config: model_type is {raw.get('model_type')!r}")
        text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
        _check_object(text_raw, "text_config")
        _check_object(vision_raw, "vision_config")
        text = _parse_text(text_raw)
        vision = _parse_vision(vision_raw)
        tie = next((v for v in (raw.get("tie_word_embeddings"), text_raw.get("tie_word_embeddings")) if v is not None),
                   True)
        return cls(
            vision=vision,
            text=text,
            image_token_id=raw.get("image_token_id", raw.get("image_token_index", 257152)),
            bos_token_id=_first(raw.get("bos_token_id", text_raw.get("bos_token_id", 2))),
            eos_token_id=_first(raw.get("eos_token_id", text_raw.get("eos_token_id", 1))),
            pad_token_id=_first(raw.get("pad_token_id", text_raw.get("pad_token_id", 0))),
            tie_word_embeddings=tie,
        )


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) and value else value


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
    _check_object(rope, "text_config.rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}")
    values["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", TextConfig.rope_theta))
    if model_type == "gemma2":
        layers = values.get("num_hidden_layers", TextConfig.num_hidden_layers)
        # A count of the wrong type makes no default list here: TextConfig names the key instead.
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(_int_or_zero(layers))
        ]
        values["layer_types"] = tuple(types) if isinstance(types, list) else types
    else:
        values["layer_types"] = ()
        values["sliding_window"] = None
    _check_activation(raw.get("hidden_activation") or raw.get("hidden_act"))
    return TextConfig(**values)


def _check_activation(name: str | None) -> None:
    # Every PaliGemma uses the tanh approximation of GELU; Gemma's legacy "gelu" means the same.
    if name is not None and name not in GELU_TANH_NAMES:
        raise ValueError(f"unsupported activation {name!r}")


# -- validation: every value of a config, checked once, here -------------------------------------------
# A bad config.json (a layer count written as text, a zero patch size) is refused with a line naming its
# key, not met later as an exception from inside the model.
LAYER_TYPES = ("sliding_attention", "full_attention")
_TOKEN_IDS = ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id")  # may be 0; sizes may not


def _check_object(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__} {_short(value)}")


def _check_values(config: Any, section: str) -> None:
    """Each field of `config` (a config dataclass) against its annotation: integers positive (token ids
    non-negative), numbers positive and finite, stored as floats."""
    for item in fields(config):
        value, hint = getattr(config, item.name), _hints(type(config))[item.name]
        key = f"{section}{item.name}"
        if value is None and type(None) in typing.get_args(hint):
            continue
        options = typing.get_args(hint) if isinstance(hint, UnionType) else (hint,)
        kind = next(t for t in options if t is not type(None))
        kind = typing.get_origin(kind) or kind  # tuple[str, ...] is checked as a tuple
        if kind is int:
            least = 0 if item.name in _TOKEN_IDS else 1
            if not _is_int(value) or value < least:
                raise ValueError(f"{key} must be a {'non-negative' if least == 0 else 'positive'} integer, "
                                 f"got {_short(value)}")
        elif kind is float:
            if not (_is_int(value) or isinstance(value, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {_short(value)}")
            object.__setattr__(config, item.name, float(value))
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {_short(value)}")
        elif kind in (str, tuple) and not isinstance(value, kind):
            raise ValueError(f"{key} must be a {'string' if kind is str else 'list'}, got {_short(value)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_zero(value: Any) -> int:
    return value if _is_int(value) else 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
