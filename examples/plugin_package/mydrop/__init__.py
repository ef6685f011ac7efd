"""Gaussian dropout (Srivastava et al. 2014, section 10) as a dropcluster plugin.

Each activation is multiplied by noise drawn from N(1, p / (1 - p)): the mean and the variance
of inverted Bernoulli dropout at rate p, without zeros. Importing this module registers it as
``"gaussian_dropout"``, before the head like the paper's Dropout (``"group4_inner"``), shown as
"Gaussian dropout" in reports.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dropcluster.models import Placement
from dropcluster.nn import check_drop_rate
from dropcluster.plugins import register_regularizer

__all__ = ["GaussianDropout", "gaussian_dropout"]


def gaussian_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``x`` (any shape, floating) times N(1, p / (1 - p)) noise in training; ``x`` in eval."""
    if not training or p == 0.0:
        return x
    noise = torch.randn_like(x) * (p / (1.0 - p)) ** 0.5 + 1.0
    return x * noise


class GaussianDropout(nn.Module):
    """The module form of :func:`gaussian_dropout`; ``p`` in [0, 1)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        check_drop_rate(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


register_regularizer(
    "gaussian_dropout",
    GaussianDropout,
    placement=Placement("group4_inner"),
    display_name="Gaussian dropout",
)
