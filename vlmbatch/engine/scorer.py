"""SigLIP image-text scores for captions, beside the caption engine: `Scorer` holds the dual encoder.

An image is embedded once, however many captions (languages) it has; texts are embedded in batches.
The weights are checked against their headers when the scorer is made, and loaded when first needed,
so a run with nothing left to score loads nothing.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from vlmbatch.model.loading import resolve_checkpoint
from vlmbatch.model.processor import Processor
from vlmbatch.model.siglip_dual import SiglipDualEncoder
from vlmbatch.model.siglip_dual_loading import SiglipInputs, check_weights, dual_config, load_dual_encoder

TEXT_BATCH = 64  # texts embedded together: a text is 64 tokens, so 64 of them cost about one image


class Scorer:
    """The checkpoint `model` (a Hub id or a folder) as a scorer on `device`."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype | None = None, cpu_matmul: str = "torch"):
        self.checkpoint = resolve_checkpoint(model)
        self.config = dual_config(self.checkpoint)  # a checkpoint that is no dual encoder stops here, in one line
        self.parameters = check_weights(self.checkpoint, self.config)  # what its weights will take, counted
        self.inputs = SiglipInputs.from_checkpoint(self.checkpoint, self.config)
        self.fingerprint = self.checkpoint.fingerprint()
        self.device, self.dtype, self._cpu_matmul = device, dtype, cpu_matmul

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @cached_property
    def model(self) -> SiglipDualEncoder:
        return load_dual_encoder(self.checkpoint, self.device, self.dtype, cpu_matmul=self._cpu_matmul)

    def image_embeds(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images [S, S, 3] at `image_size` (as the decode workers make them) → unit embeddings [N, D]."""
        return self.model.image_embeds(Processor.normalize(torch.from_numpy(np.stack(pixels))).to(self.device))

    def score(self, image_embeds: torch.Tensor, texts: list[str]) -> list[tuple[float, float]]:
        """(match probability, cosine) of each `texts[i]` with `image_embeds[i]`."""
        ids = self.inputs.text_ids(texts).to(self.device)
        text_embeds = torch.cat([self.model.text_embeds(ids[i:i + TEXT_BATCH]) for i in range(0, len(ids), TEXT_BATCH)])
        prob, cos = self.model.score(image_embeds, text_embeds)
        return list(zip(prob.tolist(), cos.tolist()))
