"""Position-wise feed-forward blocks.

FeedForward (Vaswani et al. 2017, eq. 2):  FFN(x) = W2 act(W1 x + b1) + b2, act = ReLU or GELU.
SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), used by LLaMA:

    SwiGLU(x) = W_down (SiLU(W_gate x) * (W_up x))

Parameter names (``gate_proj``, ``up_proj``, ``down_proj``) follow the Hugging Face Llama layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
