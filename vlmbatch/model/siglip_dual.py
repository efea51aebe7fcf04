"""SigLIP as a dual encoder: an image-text match score for a caption, no reference captions needed.

The vision side is PaliGemma's SigLIP tower (`siglip.SiglipVisionTower`) with the attention-pooling
(MAP) head PaliGemma drops; the text side is a second SigLIP encoder over token + position embeddings,
pooled at the last position (the checkpoints were trained on texts padded to a fixed length, so that
position is always the same), then a linear head. SigLIP's sigmoid loss makes
`sigmoid(exp(logit_scale) · cos + logit_bias)` a match probability per (image, text) pair.

Module names are the Hugging Face checkpoints' own (`vision_model.head.probe`,
`text_model.embeddings.token_embedding.weight`, `logit_scale`, …), so loading renames nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmbatch.model.blocks import Linear
from vlmbatch.model.config import (
    VisionConfig,
    _check_activation,
    _check_object,
    _check_values,
    _known,
)
from vlmbatch.model.siglip import SiglipEncoder, SiglipMLP, SiglipVisionTower

# transformers' SiglipVisionConfig defaults (SigLIP B/16 at 224 px): published configs leave them out.
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 224, "patch_size": 16}


@dataclass(frozen=True)
class SiglipTextConfig:
    """The text tower; the defaults are transformers' SiglipTextConfig's (SigLIP B/16)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None  # None: hidden_size

    def __post_init__(self):
        _check_values(self, "text_config.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text_config.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:  # the encoder blocks read it, as they do VisionConfig's
        return self.hidden_size // self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        return self.projection_size or self.hidden_size


@dataclass(frozen=True)
class SiglipDualConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(**_VISION_DEFAULTS))
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)

    def __post_init__(self):
        if self.text.embed_dim != self.vision.hidden_size:
            raise ValueError(f"the towers' embeddings differ in size: text {self.text.embed_dim} "
                             f"(text_config.projection_size), vision {self.vision.hidden_size}")

    @classmethod
    def from_json_file(cls, path: str | Path) -> SiglipDualConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SiglipDualConfig:
        """A `model_type: siglip` config.json; anything else is refused with what it is."""
        _check_object(raw, "the config")
        kind = raw.get("model_type")
        if kind != "siglip":
            found = f"a PaliGemma model (model_type {kind!r})" if kind == "paligemma" else f"model_type {kind!r}"
            raise ValueError(f"not a SigLIP dual encoder: config.json describes {found}, not model_type 'siglip'")
        text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
        _check_object(text_raw, "text_config")
        _check_object(vision_raw, "vision_config")
        if vision_raw.get("vision_use_head") is False:
            raise ValueError("vision_config.vision_use_head is false: the checkpoint has no pooling head, so "
                             "no image embedding to score with")
        for section in (text_raw, vision_raw):
            _check_activation(section.get("hidden_act"))
        return cls(vision=VisionConfig(**{**_VISION_DEFAULTS, **_known(VisionConfig, vision_raw)}),
                   text=SiglipTextConfig(**_known(SiglipTextConfig, text_raw)))


class SiglipPoolingHead(nn.Module):
    """Multihead attention pooling: one learned query (`probe`) attends over the patch features, then a
    residual MLP. Parameters named as `torch.nn.MultiheadAttention`'s, which the checkpoints store."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.probe = nn.Parameter(torch.empty(1, 1, d))
        self.attention = nn.Module()
        self.attention.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))  # q, k, v stacked
        self.attention.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.attention.out_proj = Linear(d, d)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        w, bias = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = F.linear(self.probe, w[:d], bias[:d]).expand(b, 1, d)
        k, v = F.linear(x, w[d:], bias[d:]).chunk(2, dim=-1)
        q, k, v = (y.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        pooled = self.attention.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d))
        return (pooled + self.mlp(self.layernorm(pooled)))[:, 0]


class SiglipPooledVision(SiglipVisionTower):
    """pixels [B, 3, S, S] → one embedding per image [B, hidden] (unnormalized)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.head = SiglipPoolingHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(pixel_values))


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class SiglipTextTower(nn.Module):
    """Padded token ids [B, T] → one embedding per text [B, projection_size] (unnormalized). No attention
    mask: the checkpoints were trained with the padding attended to, and pooled at the last position."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.embeddings = SiglipTextEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)  # the vision tower's blocks; they read the same config fields
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        last = self.final_layer_norm(self.encoder(self.embeddings(ids)))[:, -1]
        return self.head(last)


class SiglipDualEncoder(nn.Module):
    def __init__(self, cfg: SiglipDualConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipPooledVision(cfg.vision)
        self.text_model = SiglipTextTower(cfg.text)
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))

    @torch.inference_mode()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] → unit-length float32 embeddings [B, D]. Computed once per image,
        however many captions it has."""
        return F.normalize(self.vision_model(pixel_values).float(), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids padded to the trained length [B, T] → unit-length float32 embeddings [B, D]."""
        return F.normalize(self.text_model(ids).float(), dim=-1)

    @torch.inference_mode()
    def score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(match probability, cosine) of unit embeddings paired along their last dimension, broadcasting
        the rest: [N, D] with [N, D] scores N pairs, [N, 1, D] with [M, D] all N×M."""
        cos = (image_embeds * text_embeds).sum(-1)
        return torch.sigmoid(self.logits(cos)), cos

    @torch.inference_mode()
    def logits(self, cos: torch.Tensor) -> torch.Tensor:
        """transformers' `logits_per_image`: exp(logit_scale) · cos + logit_bias, in float32."""
        return cos * self.logit_scale.float().exp() + self.logit_bias.float()
