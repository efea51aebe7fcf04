"""SigLIP dual-encoder inputs, as the checkpoint was trained and as transformers prepares them.

Text: truncated and padded to the text tower's length (64 in every release) with the checkpoint's pad
token, since the tower pools the last position. Two tokenizer files exist: `tokenizer.json` (SigLIP 2's
Gemma tokenizer), run by `tokenizers` as the file says, and `spiece.model` (SigLIP), run by
`sentencepiece` the way transformers' `SiglipTokenizer` runs it: special tokens split off first, each
piece of text canonicalized (lowercased, ASCII punctuation removed, whitespace collapsed and stripped)
and encoded behind the unknown token, whose pieces are then dropped, and `</s>` appended.

Images: `SiglipImageProcessor`'s bicubic resize to the square input size, rescale by 1/255, mean 0.5 /
std 0.5, the same steps as PaliGemma's and the same code.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmbatch.errors import VlmbatchError
from vlmbatch.model.processor import Processor
from vlmbatch.sources.images import resize_square

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPACE = "▁"  # SentencePiece's word boundary
# The image processing implemented here; a preprocessor_config.json asking for other steps is refused.
_IMAGE_STEPS = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images → the vision tower's float32 input [B, 3, size, size]."""
    return Processor.normalize(torch.from_numpy(np.stack([resize_square(image, size) for image in images])))


def check_image_processing(path: Path, size: int) -> None:
    """Refuse a checkpoint whose image processor config asks for other preprocessing than `pixel_values`'."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        config = _read_json(file)
        config = config.get("image_processor", config) if name == "processor_config.json" else config
        wanted = {**_IMAGE_STEPS, "size": {"height": size, "width": size}}
        differ = [f"{key} {config[key]!r} (expected {value!r})" for key, value in wanted.items()
                  if key in config and not _same(config[key], value)]
        if differ:
            raise VlmbatchError(f"{file}: image preprocessing other than SigLIP's: {', '.join(differ)}")


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and abs(value - expected) < 1e-9
    if isinstance(expected, list):
        return isinstance(value, list) and len(value) == len(expected) and all(map(_same, value, expected))
    return value == expected


class SiglipTextProcessor:
    """Texts → token ids [B, length], each row truncated, closed and padded as in training."""

    def __init__(self, encode_one, length: int):
        self._encode_one = encode_one
        self.length = length

    @classmethod
    def from_dir(cls, path: Path, length: int) -> SiglipTextProcessor:
        path = Path(path)
        config = _tokenizer_config(path)
        if (path / "tokenizer.json").is_file():
            return cls(_json_tokenizer(path / "tokenizer.json", config, length), length)
        if (path / "spiece.model").is_file():
            return cls(_SentencePiece(path / "spiece.model", config, length), length)
        raise VlmbatchError(f"no tokenizer in {path}: expected tokenizer.json or spiece.model")

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self._encode_one(text) for text in texts], dtype=torch.long)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (what transformers reads), token entries as strings."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (path / name).is_file():
            config.update(_read_json(path / name))
    return {key: value["content"] if isinstance(value, dict) and "content" in value else value
            for key, value in config.items()}


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmbatchError(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise VlmbatchError(f"{file} is not a JSON object")
    return data


# Tokenizer classes transformers pads on the left unless tokenizer_config.json says otherwise (SigLIP 2's
# Gemma tokenizer among them: its texts then end in the <eos> the tower pools).
_LEFT_PADDING_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")


def _padding_side(config: dict[str, Any]) -> str:
    default = "left" if config.get("tokenizer_class") in _LEFT_PADDING_CLASSES else "right"
    side = config.get("padding_side") or default
    if side not in ("left", "right"):
        raise VlmbatchError(f"tokenizer_config.json: padding_side {side!r} is neither left nor right")
    return side


def _json_tokenizer(file: Path, config: dict[str, Any], length: int):
    """tokenizer.json with its normalizer and post-processor, truncation and padding set as transformers'
    `padding="max_length", truncation=True` sets them; `Siglip2Tokenizer` also lowercases first."""
    from tokenizers import Tokenizer, normalizers

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception for every malformed file)
        raise VlmbatchError(f"cannot read {file}: {exc}; if a download was interrupted, delete the file "
                            "and fetch it again") from None
    pad = config.get("pad_token")
    pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
    if pad_id is None:
        raise VlmbatchError(f"{file.parent}: the tokenizer has no pad token (pad_token {pad!r}), and SigLIP "
                            "pads every text to its full length")
    if config.get("tokenizer_class") == "Siglip2Tokenizer" and tokenizer.normalizer is not None:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), tokenizer.normalizer])
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(direction=_padding_side(config), pad_id=pad_id, pad_token=pad, length=length)
    return lambda text: tokenizer.encode(text).ids


class _SentencePiece:
    """`spiece.model` run as transformers' SiglipTokenizer runs it (see the module docstring)."""

    def __init__(self, file: Path, config: dict[str, Any], length: int):
        import sentencepiece  # only SigLIP (1) checkpoints need it

        if config.get("legacy") is False:
            raise VlmbatchError(f"{file.parent}: tokenizer_config.json sets legacy: false (no dummy prefix), "
                                "which vlmbatch does not implement for spiece.model")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(file))
        except (OSError, RuntimeError) as exc:
            raise VlmbatchError(f"cannot read {file}: {exc}") from None
        self.lower = config.get("do_lower_case", True)
        self.length, self.side = length, _padding_side(config)
        eos, unk, pad = (config.get(key, default) for key, default in
                         (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>")))
        decoder = config.get("added_tokens_decoder") or {}
        added = {entry["content"]: int(i) for i, entry in decoder.items()}
        extra = [e["content"] if isinstance(e, dict) else e
                 for e in config.get("additional_special_tokens") or config.get("extra_special_tokens") or []]
        self.special = {eos, unk, pad, *extra} | {entry["content"] for entry in decoder.values() if entry.get("special")}
        self.added = {token: added.get(token, self.sp.piece_to_id(token)) for token in self.special | added.keys()}
        self.eos_id, self.pad_id, self.unk = self.added[eos], self.added[pad], unk
        self.unk_pieces = len(self.sp.encode(unk))
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")

    def __call__(self, text: str) -> list[int]:
        pieces: list[str] = []
        for chunk in self.split.split(_SPACE + text.replace(_SPACE, " ")):
            if chunk:
                pieces.extend([chunk] if chunk in self.added else self._pieces(chunk))
        if len(pieces) > 1 and pieces[0] == _SPACE and pieces[1] in self.special:
            pieces = pieces[1:]  # a lone "▁" before a leading special token
        ids = [self.added.get(p, self.sp.piece_to_id(p)) for p in pieces][: self.length - 1]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        padding = [self.pad_id] * (self.length - len(ids))
        return padding + ids if self.side == "left" else ids + padding

    def _pieces(self, text: str) -> list[str]:
        text = text.lower() if self.lower else text
        text = re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()
        pieces = self.sp.encode(self.unk + text, out_type=str)
        return pieces[self.unk_pieces:] if len(pieces) >= self.unk_pieces else pieces
