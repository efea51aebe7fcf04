"""PaliGemma in plain PyTorch: SigLIP vision tower + linear projector + Gemma / Gemma 2 decoder."""

from vlmbatch.model.config import PaliGemmaConfig, TextConfig, VisionConfig
from vlmbatch.model.paligemma import PaliGemma

__all__ = ["PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig"]
