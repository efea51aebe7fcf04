"""The VQ-VAE mask decoder of PaliGemma's segmentation: 16 codes → a 64x64 mask, in PyTorch.

The architecture is big_vision's (evaluators/proj/paligemma/transfers/segmentation.py): the codes pick
codebook vectors laid out as a 4x4 grid, then a 1x1 conv to 128 channels, two residual blocks (3x3,
3x3, 1x1 convs), four stride-2 transposed convs (128, 64, 32, 16 channels: 4 → 64 pixels), a 1x1
conv to one channel; ReLU after every layer but the last. Values are in about [-1, 1]; > 0 is the
mask. Weights: big_vision's `vae-oid.npz` (PyTorch layouts and names), or a safetensors copy of it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmbatch.errors import VlmbatchError

GRID = 4  # the 16 codes are a 4x4 grid, row by row
MASK_SIZE = 64
WIDTH = 128  # channels of the 1x1 conv and the residual blocks
UPSAMPLE_CHANNELS = (WIDTH, WIDTH, WIDTH // 2, WIDTH // 4, WIDTH // 8)  # in and out of each transposed conv
EMBEDDING = "_vq_vae._embedding"


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class _Codebook(nn.Module):
    def __init__(self, codes: int, dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.zeros(codes, dim))


class MaskDecoder(nn.Module):
    """Submodules named so that the state dict's names are the npz's (decoder.N..., _vq_vae._embedding)."""

    def __init__(self, codes: int = 128, dim: int = 512):
        super().__init__()
        self._vq_vae = _Codebook(codes, dim)
        up, channels = [], UPSAMPLE_CHANNELS
        for c_in, c_out in zip(channels, channels[1:]):  # PyTorch's padding 1 is flax's padding 2 here
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(nn.Conv2d(dim, WIDTH, 1), nn.ReLU(), _ResBlock(WIDTH), _ResBlock(WIDTH),
                                     *up, nn.Conv2d(channels[-1], 1, 1))

    @torch.inference_mode()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 16] (0..127) → masks [B, 64, 64] float32."""
        vectors = self._vq_vae._embedding[codes]  # [B, 16, dim]
        grid = vectors.reshape(len(codes), GRID, GRID, -1).permute(0, 3, 1, 2)
        return self.decoder(grid)[:, 0]


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a VAE file: an .npz (read without pickle) or a .safetensors; one line if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise VlmbatchError(f"VAE weights not found: {path}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        if path.suffix == ".npz":  # object arrays would need pickle: refused (a ValueError)
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        if path.suffix == ".safetensors":
            return load_file(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, SafetensorError) as exc:
        raise VlmbatchError(f"cannot read VAE weights {path}: {' '.join(str(exc).split())}") from None
    raise VlmbatchError(f"VAE weights must be an .npz (big_vision's vae-oid.npz) or a .safetensors, got {path}")


def decoder_from_arrays(arrays: dict[str, np.ndarray], name: str = "VAE weights") -> MaskDecoder:
    """A float32 MaskDecoder holding the decoder tensors of `arrays` (the encoder's, if any, are not needed);
    one line naming the first tensor that is missing or of the wrong shape."""
    codebook = arrays.get(EMBEDDING)
    if codebook is None or codebook.ndim != 2:
        raise VlmbatchError(f"{name}: no {EMBEDDING} codebook [codes, dim]: not PaliGemma's mask VAE (vae-oid.npz)")
    decoder = MaskDecoder(*codebook.shape)
    state = {}
    for key, expected in decoder.state_dict().items():
        array = arrays.get(key)
        if array is None:
            raise VlmbatchError(f"{name}: tensor {key} is missing: not PaliGemma's mask VAE (vae-oid.npz)")
        if tuple(array.shape) != tuple(expected.shape) or not np.issubdtype(array.dtype, np.floating):
            raise VlmbatchError(f"{name}: tensor {key} is {array.dtype} {list(array.shape)}, expected float "
                                f"{list(expected.shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    decoder.load_state_dict(state)
    return decoder.eval()


def load_vae(path: str | os.PathLike) -> MaskDecoder:
    return decoder_from_arrays(read_arrays(path), str(path))


def fingerprint(decoder: MaskDecoder) -> str:
    """A hash of the decoder's weights: an .npz and its safetensors copy resume one another's output."""
    digest = hashlib.sha256()
    for key, tensor in sorted(decoder.state_dict().items()):
        digest.update(key.encode() + str(tuple(tensor.shape)).encode() + tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def convert_vae(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Write the decoder's tensors of `source` (vae-oid.npz) to the safetensors file `target`, under the
    same names; returns how many. Checked first: a file that is not the VAE writes nothing."""
    from safetensors.torch import save_file

    target = Path(target)
    if target.suffix != ".safetensors":
        raise VlmbatchError(f"convert-vae writes a .safetensors file, got {target}")
    state = load_vae(source).state_dict()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(partial))
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise VlmbatchError(f"cannot write {target}: {exc.strerror or exc}") from None
    return len(state)
