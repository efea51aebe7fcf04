"""CPU fast paths for the token-wise layers: a linear layer, the tanh GELU, and MLPs in row slices.

Each computes the same function as the plain torch op and is used only on a CPU; on a GPU the model
runs the plain ops. All three were measured on the benchmark's 2-core CPU (eval/README.md):

- `Linear`: a decode step multiplies a few rows (one per live sequence) by each weight matrix. MKL is
  20-35 % faster at that product taken weight-major, W·xᵀ, than as x·Wᵀ. Each output is the same dot
  product either way; in the shapes tried, the bits were identical for 1 and for 13-64 rows and
  differed in the last place for 2-8 rows.
- `gelu_tanh`: ½x(1 + tanh u) equals x·σ(2u), and torch's vectorised sigmoid is about 3x faster than
  its tanh, so the activation costs about 40 % of `F.gelu(approximate="tanh")`. Both are within
  6e-7 of the float64 value; for negative inputs, where 1 + tanh u cancels, this form keeps more
  relative precision than torch's.
- `in_row_blocks`: an MLP's intermediate activation is 4-8x wider than its input: for a batch of
  prompts (16 x 266 tokens x 2048 floats) it is tens of MB, far out of cache, and the activation and
  the next matmul each stream it through memory again. In slices of ~1,000 tokens it stays in cache
  from one matmul to the next (vision tower about 36 → 32 ms per image). Each token's row goes
  through the same kernels either way: bit-identical, which the tests check.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CPU_ROW_BLOCK = 1024
FEW_ROWS = 64  # at most this many rows: weight-major product
_TWO_C = 2 * math.sqrt(2 / math.pi)  # tanh GELU: u = c (x + 0.044715 x³)


def in_row_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a token-wise fn ([..., D] → [..., D']), computed CPU_ROW_BLOCK tokens at a time on a CPU."""
    if x.device.type != "cpu" or x.numel() <= CPU_ROW_BLOCK * x.shape[-1]:
        return fn(x)
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(part) for part in flat.split(CPU_ROW_BLOCK)]).view(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) that takes W·xᵀ for few rows on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]:
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).t()
        out = torch.mm(self.weight, rows) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, rows)
        return out.t().contiguous().view(*x.shape[:-1], self.out_features)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation ("gelu_pytorch_tanh"), as x·σ(2u) on a CPU in inference."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    u = x * x  # 2u = 2c·x·(1 + 0.044715 x²), in place on one fresh tensor
    u.mul_(_TWO_C * 0.044715).add_(_TWO_C).mul_(x)
    return u.sigmoid_().mul_(x)
