"""PaliGemma: SigLIP features → linear projector → placed at the `<image>` tokens of a Gemma prompt.

Image features enter the decoder unscaled; text embeddings are scaled by sqrt(hidden). The prompt is
the prefix (bidirectional attention), generated tokens the suffix (causal), see `gemma.Step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmbatch.model.blocks import Linear
from vlmbatch.model.config import PaliGemmaConfig
from vlmbatch.model.gemma import GemmaDecoder, KVCache, Step
from vlmbatch.model.siglip import SiglipVisionTower


@dataclass
class Prompts:
    """Prompts to prefill: right-padded ids [B, T], their lengths [B], image features [B, N, hidden],
    and the cache rows they go to [B]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    image_features: torch.Tensor
    rows: torch.Tensor


@dataclass
class NextTokens:
    """One token for each of cache rows 0..n-1: tokens [n] at cache columns cols [n]; attention reads
    columns [0, width) (default: the whole cache)."""

    tokens: torch.Tensor
    cols: torch.Tensor
    width: int | None = None


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVisionTower(cfg.vision)
        self.projector = Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.text = GemmaDecoder(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.text.embed_tokens.weight

    # The embedding, never packed for oneDNN (blocks.use_onednn), says where the model lives.
    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype

    def allocate_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.cfg.text, slots, max_len, self.device, self.dtype)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] pixels → [B, num_image_tokens, text hidden] features, ready to merge."""
        return self.projector(self.vision(pixel_values.to(self.dtype)))

    def embed_prompt(self, ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        is_image = ids == self.cfg.image_token_id
        # The image token may lie outside the text vocabulary; its embedding is replaced anyway.
        x = self.text.embed(ids.masked_fill(is_image, 0))
        return x.masked_scatter(is_image[..., None], image_features.to(x.dtype))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, image_features: torch.Tensor,
                cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """Write right-padded prompts `ids` [B, T] into cache `rows`; return float32 logits [B, V]
        of each prompt's last real token."""
        return self.step(cache, prompts=Prompts(ids, lengths, image_features, rows))[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cols: torch.Tensor, cache: KVCache, width: int | None = None) -> torch.Tensor:
        """Append tokens[i] to cache row i at column cols[i]; return float32 logits [B, V].
        `width` bounds the columns attended to (at least max(cols) + 1; default the whole cache)."""
        return self.step(cache, decode=NextTokens(tokens, cols, width))[1]

    @torch.inference_mode()
    def step(self, cache: KVCache, prompts: Prompts | None = None,
             decode: NextTokens | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One forward pass over new prompts, the next tokens of rows 0..n-1, or both at once (see
        `gemma.Step`); float32 logits of each prompt's last real token [B, V] and of each next token
        [n, V], None for a part not given."""
        step = Step.build(
            self.text.windows,
            prefill=None if prompts is None else (prompts.rows, prompts.lengths, prompts.ids.shape[1]),
            decode=None if decode is None else (decode.cols, decode.width or cache.max_len))
        parts = []
        if prompts is not None:
            parts.append(self.embed_prompt(prompts.ids, prompts.image_features).flatten(0, 1))
        if decode is not None:
            parts.append(self.text.embed(decode.tokens))
        logits = self.logits(self.text(torch.cat(parts) if len(parts) > 1 else parts[0], cache, step))
        b = step.prompt_rows
        return (logits[:b] if prompts is not None else None), (logits[b:] if decode is not None else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.cfg.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
