"""PaliGemma: SigLIP features → linear projector → placed at the `<image>` tokens of a Gemma prompt.

Image features enter the decoder unscaled; text embeddings are scaled by sqrt(hidden). The prompt is
the prefix (bidirectional attention), generated tokens the suffix (causal), see `gemma.Step`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmbatch.model.blocks import Linear
from vlmbatch.model.config import PaliGemmaConfig
from vlmbatch.model.gemma import GemmaDecoder, KVCache, Step
from vlmbatch.model.siglip import SiglipVisionTower


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.text = GemmaDecoder(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.text.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.weight.dtype

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
        step = Step.for_prefill(rows, lengths, ids.shape[1], self.text.windows)
        hidden = self.text(self.embed_prompt(ids, image_features), cache, step, last=lengths - 1)
        return self.logits(hidden[:, 0])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cols: torch.Tensor, cache: KVCache, width: int | None = None) -> torch.Tensor:
        """Append tokens[i] to cache row i at column cols[i]; return float32 logits [B, V].
        `width` bounds the columns attended to (at least max(cols) + 1; default the whole cache)."""
        step = Step.for_decode(cols, width or cache.max_len, self.text.windows)
        hidden = self.text(self.text.embed(tokens[:, None]), cache, step)
        return self.logits(hidden[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.cfg.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
