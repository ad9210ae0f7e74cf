"""The paper's fixed-precision baseline: uniform symmetric weights with a straight-through
estimator (STE-uniform, --method ste-uniform --weight-bits K). Its layers are CLADO's too."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.train.methods.base import Method
from mixq.train.quant import BitInfo, float_twin, round_ste


class STEMixin:
    """Fixed-precision symmetric weights, q = clip(round(w/s), -(2^(k-1)-1), 2^(k-1)-1), STE."""

    def _init_ste(self, bits: int):
        self.weight_bits = bits
        self.scale = nn.Parameter(self.weight.detach().abs().max().clamp_min(1e-8) / self.qmax)

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def ste_weight(self):
        # LSQ's gradient scale 1/sqrt(numel * qmax): the scale's gradient sums over every
        # weight, and unscaled it throws the scale around at the weights' learning rate.
        g = 1.0 / math.sqrt(self.weight.numel() * self.qmax)
        a = self.scale.abs()
        s = a.detach() + (a * g - (a * g).detach()) + 1e-12   # value: exactly |scale|; gradient: g
        return round_ste(torch.clamp(self.weight / s, -self.qmax, self.qmax)) * s

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(range(self.weight_bits - 1))

    @torch.no_grad()
    def integer_weight(self):
        """(q, s) with ste_weight() == s * q exactly: the same float32 scale and rounding."""
        s = self.scale.detach().abs() + 1e-12
        q = torch.clamp(torch.round(self.weight.detach() / s), -self.qmax, self.qmax).long()
        return q.cpu(), float(s)


class STEConv2d(STEMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, bits: int):
        q = float_twin(cls, m)
        q._init_ste(bits)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.ste_weight(), self.bias)


class STELinear(STEMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, bits: int):
        q = float_twin(cls, m)
        q._init_ste(bits)
        return q

    def forward(self, x):
        return F.linear(x, self.ste_weight(), self.bias)


class STEUniform(Method):
    """Fixed-precision QAT with a straight-through estimator (the paper's Table IV baseline)."""
    name = "ste-uniform"

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.weight_bits)

    def __init__(self, act_bits: int, weight_bits: int):
        super().__init__(act_bits)
        self.weight_bits = weight_bits

    def convert(self, m):
        cls = STEConv2d if isinstance(m, torch.nn.Conv2d) else STELinear
        return cls.from_float(m, self.weight_bits)

