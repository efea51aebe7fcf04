"""The VQ-VAE mask decoder against a NumPy reference written from big_vision's flax definition."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.detection.vae import MaskDecoder, fingerprint, load_vae
from vlmbatch.errors import VlmbatchError

DIM = 24  # codebook vectors (vae-oid.npz: 512); small keeps the reference quick
CONVS = {"decoder.0": (128, DIM, 1), **{f"decoder.{b}.net.{i}": (128, 128, k) for b in (2, 3)
                                       for i, k in ((0, 3), (2, 3), (4, 1))}, "decoder.12": (1, 16, 1)}
TRANSPOSED = {"decoder.4": (128, 128), "decoder.6": (128, 64), "decoder.8": (64, 32), "decoder.10": (32, 16)}


def random_vae(seed: int = 0) -> dict[str, np.ndarray]:
    """big_vision's vae-oid.npz names and PyTorch layouts (conv [out, in, kh, kw], transposed conv
    [in, out, kh, kw]), random weights scaled so activations stay near 1; an encoder tensor as well,
    which the decoder does not use."""
    rng = np.random.default_rng(seed)
    arrays = {"_vq_vae._embedding": rng.normal(size=(128, DIM)).astype(np.float32),
              "encoder.0.weight": rng.normal(size=(16, 1, 3, 3)).astype(np.float32)}
    for name, (c_out, c_in, k) in CONVS.items():
        arrays[f"{name}.weight"] = (rng.normal(size=(c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
        arrays[f"{name}.bias"] = rng.normal(scale=0.1, size=c_out).astype(np.float32)
    for name, (c_in, c_out) in TRANSPOSED.items():
        arrays[f"{name}.weight"] = (rng.normal(size=(c_in, c_out, 4, 4)) / np.sqrt(c_in * 4)).astype(np.float32)
        arrays[f"{name}.bias"] = rng.normal(scale=0.1, size=c_out).astype(np.float32)
    return arrays


def write_random_vae(path, seed: int = 0):
    np.savez(path, **random_vae(seed))
    return path


# -- the reference: flax's NHWC convs, kernels as big_vision's _get_params makes them ---------------
def _hwio(weight: np.ndarray) -> np.ndarray:
    return np.transpose(weight, (2, 3, 1, 0)).astype(np.float64)  # what big_vision's `transp` does


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, pad: int) -> np.ndarray:
    """flax nn.Conv (cross-correlation), x [B, H, W, I], kernel [kh, kw, I, O]."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))  # [B, H', W', I, kh, kw]
    return np.einsum("bhwiyx,yxio->bhwo", windows, kernel) + bias


def _conv_transpose(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """flax nn.ConvTranspose(kernel 4, strides 2, padding 2, transpose_kernel=True): the input dilated
    by the stride, padded by 2, correlated with the kernel flipped in space and its channel axes
    swapped (the given kernel is [kh, kw, O, I])."""
    b, h, w, c = x.shape
    dilated = np.zeros((b, 2 * h - 1, 2 * w - 1, c))
    dilated[:, ::2, ::2] = x
    flipped = np.swapaxes(kernel[::-1, ::-1], 2, 3)
    return _conv(dilated, flipped, bias, pad=2)


def reference_decode(arrays: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    conv = lambda v, name, pad: _conv(v, _hwio(arrays[f"{name}.weight"]), arrays[f"{name}.bias"], pad)  # noqa: E731
    x = arrays["_vq_vae._embedding"].astype(np.float64)[codes.reshape(-1)].reshape(len(codes), 4, 4, -1)
    x = relu(conv(x, "decoder.0", 0))
    for block in ("decoder.2.net", "decoder.3.net"):
        y = relu(conv(x, f"{block}.0", 1))
        y = relu(conv(y, f"{block}.2", 1))
        x = x + conv(y, f"{block}.4", 0)
    for name in TRANSPOSED:
        x = relu(_conv_transpose(x, _hwio(arrays[f"{name}.weight"]), arrays[f"{name}.bias"]))
    return conv(x, "decoder.12", 0)[..., 0]


# -- tests ------------------------------------------------------------------------------------------
def test_decoder_matches_the_reference(tmp_path):
    arrays = random_vae(seed=1)
    decoder = load_vae(write_random_vae(tmp_path / "vae-oid.npz", seed=1))
    codes = np.array([list(range(16)), [127, 0, 5, 9, 64, 3, 3, 3, 100, 101, 7, 8, 1, 2, 126, 50]])
    got = decoder(torch.from_numpy(codes)).numpy()
    want = reference_decode(arrays, codes)
    assert got.shape == want.shape == (2, 64, 64)
    assert np.abs(want).max() > 0.1 and np.abs(want[0] - want[1]).max() > 0.1  # a real signal, code dependent
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_state_dict_names_are_big_visions():
    names = set(MaskDecoder(128, DIM).state_dict())
    assert names == set(random_vae()) - {"encoder.0.weight"}


def test_convert_vae_round_trip(tmp_path):
    npz = write_random_vae(tmp_path / "vae-oid.npz", seed=2)
    result = CliRunner().invoke(app, ["convert-vae", str(npz), str(tmp_path / "vae.safetensors")])
    assert result.exit_code == 0, result.output
    from_npz, from_safetensors = load_vae(npz), load_vae(tmp_path / "vae.safetensors")
    assert fingerprint(from_npz) == fingerprint(from_safetensors)
    codes = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_npz(codes), from_safetensors(codes))
    assert fingerprint(load_vae(write_random_vae(tmp_path / "other.npz", seed=3))) != fingerprint(from_npz)


def test_bad_vae_files_are_one_line(tmp_path):
    arrays = random_vae()
    np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "decoder.6.bias"})
    np.savez(tmp_path / "shape.npz", **{**arrays, "decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)})
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 64)
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    cases = {"other.npz": "no _vq_vae._embedding codebook", "missing.npz": "decoder.6.bias is missing",
             "shape.npz": "decoder.8.weight is float32 [64, 32, 3, 3], expected float [64, 32, 4, 4]",
             "garbage.npz": "cannot read VAE weights", "garbage.safetensors": "cannot read VAE weights",
             "plain.npy": "must be an .npz"}
    for name, message in cases.items():
        with pytest.raises(VlmbatchError, match=re.escape(message)):
            load_vae(tmp_path / name)


def test_pickle_is_never_loaded(tmp_path):
    """An npz whose codebook needs pickle is refused, not unpickled."""
    arrays = {**random_vae(), "_vq_vae._embedding": np.array([[object()]], dtype=object)}
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(VlmbatchError, match="cannot read VAE weights .*allow_pickle"):
        load_vae(tmp_path / "evil.npz")


def test_convert_vae_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    for args in (["bad.npz", "out.safetensors"], ["absent.npz", "out.safetensors"]):
        result = CliRunner().invoke(app, ["convert-vae", *(str(tmp_path / a) for a in args)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out.safetensors").exists()
    write_random_vae(tmp_path / "good.npz")
    result = CliRunner().invoke(app, ["convert-vae", str(tmp_path / "good.npz"), str(tmp_path / "out.npz")])
    assert result.exit_code == 2 and "writes a .safetensors file" in result.output
