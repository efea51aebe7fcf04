"""CPU fast paths for the token-wise layers: a linear layer, the tanh GELU, and MLPs in row slices.

Each computes the same function as the plain torch op and is used only on a CPU; on a GPU the model
runs the plain ops. All were measured on the benchmark's 2-core CPUs (eval/README.md):

- `Linear` with oneDNN (`use_onednn`): torch multiplies float32 matrices with MKL, which on AMD
  processors does not use AVX-512. oneDNN picks its kernels by instruction set, not vendor: on a
  2-core AMD EPYC (Zen 5) its products with the weight prepacked in its blocked layout ran 2.3-3.4x
  faster than MKL's, from a decode step's 16 rows (296 against 87 GFLOP/s) to a prefill's 4,000
  (380 against 130-165); the vision tower and a prefill took half the time. On a 2-core AVX2-only
  AMD EPYC (Zen 3) the gap is small: 1.0-1.8x (mostly 1.05-1.3x) over the model's shapes from 16 to
  4,096 rows, whole runs 2-4 % faster. oneDNN can also apply an MLP's GELU, or its gate product,
  as it writes a product (`Linear.gelu_tanh`, `Linear.times`), sparing a pass over the wide
  intermediate. For the product, that pass costs 11-18 % of the time on Zen 5; its GELU, on Zen 3,
  made the GELU's products 40-70 % slower than the plain product followed by `gelu_tanh`. So
  `choose_cpu_matmul` times the three ways ("torch", "onednn", "onednn+gelu") on one GELU product
  and takes the fastest. All accumulate in float32; their results differ in the last bits, as two
  BLAS libraries' do.
- `Linear` without it: a decode step multiplies a few rows (one per live sequence) by each weight
  matrix. MKL is 20-35 % faster at that product taken weight-major, W·xᵀ, than as x·Wᵀ. Each output
  is the same dot product either way; in the shapes tried, the bits were identical for 1 and for
  13-64 rows and differed in the last place for 2-8 rows.
- `gelu_tanh`: ½x(1 + tanh u) equals x·σ(2u), and torch's vectorised sigmoid is much faster than its
  tanh: the four passes over the tensor (2u/x, 2u, σ, ·x) cost 55-60 % of
  `F.gelu(approximate="tanh")` on Zen 3 (a six-pass form before it: 40 % on Zen 5, 95-110 % on
  Zen 3). Both are within 6e-7 of the float64 value; for negative inputs, where 1 + tanh u cancels,
  this form keeps more relative precision than torch's.
- `in_row_blocks`: an MLP's intermediate activation is 4-8x wider than its input: for a batch of
  prompts (16 x 266 tokens x 2048 floats) it is tens of MB, far out of cache, and the activation and
  the next matmul each stream it through memory again. In slices of ~1,000 tokens it stays in cache
  from one matmul to the next (vision tower about 36 → 32 ms per image). Each token's row goes
  through the same kernels either way: bit-identical, which the tests check.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CPU_ROW_BLOCK = 1024
FEW_ROWS = 64  # at most this many rows: weight-major product
# Who multiplies a float32 model's linear layers on a CPU: MKL ("torch"), oneDNN with the GELU
# after the product ("onednn"), or oneDNN applying it as it writes the product ("onednn+gelu").
CPU_MATMULS = ("auto", "onednn+gelu", "onednn", "torch")
_TWO_C = 2 * math.sqrt(2 / math.pi)  # tanh GELU: u = c (x + 0.044715 x³)
_TWO_C_TENSOR = torch.tensor(_TWO_C)


def in_row_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a token-wise fn ([..., D] → [..., D']), computed CPU_ROW_BLOCK tokens at a time on a CPU."""
    if x.device.type != "cpu" or x.numel() <= CPU_ROW_BLOCK * x.shape[-1]:
        return fn(x)
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(part) for part in flat.split(CPU_ROW_BLOCK)]).view(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) with two CPU fast paths: a weight
    prepacked for oneDNN (`pack`), or else W·xᵀ for few rows."""

    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, once packed
    fused_gelu: bool = True  # packed: oneDNN applies `gelu_tanh`'s activation as it writes the product

    def pack(self, keep_weight: bool = False, fused_gelu: bool = True) -> None:
        """Hand the (float32, CPU) weight to oneDNN in its blocked layout. The plain weight is released
        unless `keep_weight` (a tied head shares it with the embedding): it stays a meta tensor that
        keeps its shape, and any use of it fails loudly. Inference only; `unpack` restores it."""
        # The layout is chosen for products of CPU_ROW_BLOCK rows (an MLP's slice); it serves any row count.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), CPU_ROW_BLOCK)
        self.fused_gelu = fused_gelu
        if not keep_weight:
            self.weight = nn.Parameter(self.weight.detach().to("meta"), requires_grad=False)

    def unpack(self) -> None:
        if self.packed is not None:
            if self.weight.is_meta:
                self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
            self.packed = None

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu_tanh(self(x)); packed with `fused_gelu`, oneDNN applies it as it writes the product."""
        if self.packed is not None and self.fused_gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "tanh")
        return gelu_tanh(self(x))

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """self(x) * other (same shape); packed, oneDNN multiplies as it writes the product."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "mul")
        return self(x).mul_(other)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]:
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).t()
        out = torch.mm(self.weight, rows) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, rows)
        return out.t().contiguous().view(*x.shape[:-1], self.out_features)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def choose_cpu_matmul(choice: str = "auto", device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32) -> str:
    """Who multiplies the linear layers of a model on `device` in `dtype` (see CPU_MATMULS): only a
    float32 model on a CPU has the choice; elsewhere it is torch's. "auto" times the three on one
    GELU product (`cpu_matmul_timings`) and takes the fastest; the others are taken as they are."""
    if choice not in CPU_MATMULS:
        raise ValueError(f"unknown CPU matmul {choice!r} (use {', '.join(CPU_MATMULS)})")
    if device.type != "cpu" or dtype != torch.float32:
        return "torch"
    if choice == "torch" or (choice == "auto" and not onednn_available()):
        return "torch"
    if not onednn_available():
        raise ValueError("oneDNN matmuls were asked for, but this torch build has no oneDNN (mkldnn) linear op")
    if choice != "auto":
        return choice
    timings = cpu_matmul_timings()
    return min(timings, key=timings.get)


@torch.inference_mode()
def cpu_matmul_timings(rows: int = 256, d_in: int = 512, d_out: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Seconds for gelu_tanh of one [rows, d_in] x [d_in, d_out] float32 product, each way of
    CPU_MATMULS but auto (best of `repeats` each after a warm-up, taken in turns so that a change in
    the machine's speed weighs on all alike). ~70 ms. MKL over the best oneDNN: 2.4-3.2 on an AVX-512
    AMD processor (Zen 5), 1.1-1.5 on an AVX2 one (Zen 3), whose oneDNN GELU was the slowest of all."""
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: gelu_tanh(torch.mm(x, w.t())),
        "onednn": lambda: gelu_tanh(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")),
        "onednn+gelu": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu", [], "tanh"),
    }
    best = dict.fromkeys(ways, math.inf)
    for round_ in range(repeats + 1):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def use_onednn(model: nn.Module, fused_gelu: bool = True) -> int:
    """Pack every `Linear` of a float32 CPU model for oneDNN (see `Linear.pack`); a weight another
    module also holds (a tied LM head) is kept. Returns how many were packed."""
    shared = {id(p) for module in model.modules() if not isinstance(module, Linear)
              for p in module.parameters(recurse=False)}
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.packed is None]
    for linear in linears:
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32:
            raise ValueError("oneDNN packing is for float32 weights on the CPU")
        linear.pack(keep_weight=id(linear.weight) in shared, fused_gelu=fused_gelu)
    return len(linears)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation ("gelu_pytorch_tanh"), as x·σ(2u) on a CPU in inference."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    # 2u = x·2c(1 + 0.044715 x²); four passes, in place on one fresh tensor
    u = torch.addcmul(_TWO_C_TENSOR, x, x, value=_TWO_C * 0.044715)
    return u.mul_(x).sigmoid_().mul_(x)
