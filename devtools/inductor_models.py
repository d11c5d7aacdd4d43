"""The models the Inductor cache tests and the cold-start benchmark compile.

Classes live at module level: Dynamo's caching precompile pickles guards that
name the model's class, and a class defined inside a function cannot be named
(torch 2.13 then fails the compile with a TypeError).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """Three convolutions with BatchNorm/GroupNorm, ReLU/SiLU/GELU, pooling and a
    linear head: about 20 s of Inductor compile on 2 CPU cores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.norm2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.conv3, self.norm3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.avg_pool2d(F.silu(self.norm2(self.conv2(x))), 2)
        x = F.gelu(self.norm3(self.conv3(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(name: str) -> tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """The model in eval mode with fixed weights, and a deterministic input for a batch size."""
    torch.manual_seed(0)
    if name == "tiny":  # a small MLP: cheap to compile, for tests
        model: nn.Module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        return model.eval(), lambda batch: torch.linspace(-1, 1, batch * 16).reshape(batch, 16)
    if name != "cnn":
        raise ValueError(f"unknown model {name!r}: use 'tiny' or 'cnn'")
    cnn = SmallCNN()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for norm in (cnn.norm1, cnn.norm3):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return cnn.eval(), lambda batch: torch.linspace(-2, 2, batch * 3 * 32 * 32).reshape(batch, 3, 32, 32)
