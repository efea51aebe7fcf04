"""CPU fast paths for the token-wise layers: a linear layer, the tanh GELU, and MLPs in row slices.

Each computes the function of the plain torch op and is used only on a CPU (a GPU runs the plain ops):
- `Linear` through oneDNN with the weight prepacked: torch's float32 products go to MKL, which leaves
  AVX-512 unused on AMD processors; oneDNN picks kernels by instruction set, and can apply an MLP's
  GELU or gate product as it writes the product. `choose_cpu_matmul` times the ways on one product.
- `Linear` without it takes a decode step's few rows weight-major (W·xᵀ), which MKL does faster.
- `gelu_tanh` as x·σ(2u): the same function, and torch's vectorised sigmoid is faster than its tanh.
- `in_row_blocks`: an MLP in slices of ~1,000 tokens keeps its wide intermediate in cache.
Figures: eval/RESULTS.md.
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
