"""PaliGemma inputs: image → normalized pixels; prompt → `<image>`×N `<bos>` prompt `\\n` token ids.

Matches transformers' `PaliGemmaProcessor`: bicubic resize to the model's square size, rescale by
1/255, normalize with mean 0.5 / std 0.5; tokenization with the checkpoint's own `tokenizer.json`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from vlmbatch.errors import VlmbatchError
from vlmbatch.model.config import PaliGemmaConfig
from vlmbatch.sources.images import resize_square

# Detection and segmentation outputs are made of these; they are ordinary text in PaliGemma's answers.
_KEPT_SPECIAL = re.compile(r"<loc\d{4}>|<seg\d{3}>")


@dataclass(frozen=True)
class Batch:
    """Right-padded prompts: ids [B, T], lengths [B]."""

    ids: torch.Tensor
    lengths: torch.Tensor


class Processor:
    def __init__(self, tokenizer: Tokenizer, cfg: PaliGemmaConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_size = cfg.vision.image_size
        self._skip_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special and not _KEPT_SPECIAL.fullmatch(added.content)
        ) | {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id}

    @classmethod
    def from_dir(cls, path: Path, cfg: PaliGemmaConfig) -> "Processor":
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise VlmbatchError(f"no tokenizer.json in {path}")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
            raise VlmbatchError(f"cannot read {file}: {exc}; if a download was interrupted, delete the file "
                                "and fetch it again") from None
        return cls(tokenizer, cfg)

    # -- images ---------------------------------------------------------------------------------
    # Split in two so workers ship 8-bit pixels (4x smaller than float32) and normalization runs
    # where the model is; both halves together equal the reference's float32 arithmetic bit for bit.
    @staticmethod
    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] → float32 [B, 3, S, S] in [-1, 1] (rescale 1/255, mean 0.5, std 0.5)."""
        scaled = pixels.to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)
        return ((scaled - 0.5) / 0.5).permute(0, 3, 1, 2)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images → the model's float32 input [B, 3, S, S]."""
        return self.normalize(torch.from_numpy(np.stack([resize_square(image, self.image_size) for image in images])))

    # -- text -----------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """`<image>`×N `<bos>` prompt `\\n`. The image and bos tokens are added by id: the reference
        builds the same string, and added tokens split the text, so the ids are identical."""
        text_ids = self.tokenizer.encode(prompt + "\n", add_special_tokens=False).ids
        return [self.cfg.image_token_id] * self.cfg.num_image_tokens + [self.cfg.bos_token_id] + text_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self._skip_ids], skip_special_tokens=False)

    def collate(self, prompts: list[list[int]]) -> Batch:
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.full((len(prompts), int(lengths.max())), self.cfg.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        return Batch(ids=ids, lengths=lengths)
