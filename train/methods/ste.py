"""The paper's fixed-precision baseline: uniform symmetric weights with a straight-through
estimator (STE-uniform, --method ste-uniform --weight-bits K). Its layers are CLADO's too."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.train.errors import ConfigError
from mixq.train.methods.base import Method, Option
from mixq.train.quant import BitInfo, float_twin, round_ste


class STEMixin:
    """Fixed-precision symmetric weights, q = clip(round(w/s), -(2^(k-1)-1), 2^(k-1)-1), STE.

    per_channel: one scale per output channel (a vector) instead of one per layer; freeze folds
    it into the per-channel requantization multipliers the contract already has, so the integer
    program is unchanged in kind. Depthwise layers, whose channels' ranges differ widely, are
    what it is for (--per-channel; ste-uniform and clado)."""

    def _init_ste(self, bits: int, per_channel: bool = False):
        self.weight_bits = bits
        w = self.weight.detach().abs()
        wmax = w.reshape(len(w), -1).max(1).values if per_channel else w.max()
        self.scale = nn.Parameter(wmax.clamp_min(1e-8) / self.qmax)

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def _scale_view(self, s):
        """A per-channel scale broadcast over the weight's other dims; a per-layer one as is."""
        return s.view((-1,) + (1,) * (self.weight.ndim - 1)) if s.ndim else s

    def ste_weight(self):
        # LSQ's gradient scale 1/sqrt(numel * qmax), numel the weights one scale covers: the
        # scale's gradient sums over them, and unscaled it throws the scale around at the
        # weights' learning rate.
        g = 1.0 / math.sqrt(self.weight.numel() / max(self.scale.numel(), 1) * self.qmax)
        a = self.scale.abs()
        s = self._scale_view(a.detach() + (a * g - (a * g).detach()) + 1e-12)  # value: exactly |scale|; gradient: g
        return round_ste(torch.clamp(self.weight / s, -self.qmax, self.qmax)) * s

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(range(self.weight_bits - 1))

    @torch.no_grad()
    def integer_weight(self, bits: int | None = None, scale=None):
        """(q, s) with ste_weight() == s * q exactly: the same float32 scale and rounding; s a
        float, or a list of floats (one per output channel) with per-channel scales. `bits`,
        `scale`: the weights at those storage bits and that scale instead (CLADO's moves)."""
        qmax = self.qmax if bits is None else 2 ** (bits - 1) - 1
        s = (self.scale if scale is None else scale).detach().abs() + 1e-12
        q = torch.clamp(torch.round(self.weight.detach() / self._scale_view(s)), -qmax, qmax).long()
        return q.cpu(), (s.cpu().double().tolist() if s.ndim else float(s))


class STEConv2d(STEMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, bits: int, per_channel: bool = False):
        q = float_twin(cls, m)
        q._init_ste(bits, per_channel)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.ste_weight(), self.bias)


class STELinear(STEMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, bits: int, per_channel: bool = False):
        q = float_twin(cls, m)
        q._init_ste(bits, per_channel)
        return q

    def forward(self, x):
        return F.linear(x, self.ste_weight(), self.bias)


# Convolutions only: a classifier's int32 logits are ranked as integers, which needs one scale
# for every class (freeze refuses per-class scales there), and depthwise convs are what per-
# channel scales are for.
PER_CHANNEL = Option("per_channel", False, "ste-uniform, clado: one weight scale per output channel of each conv "
                     "instead of one per layer (depthwise layers quantize poorly per tensor; linear layers keep "
                     "one); CSQ and BSQ keep the paper's per-layer scale")


class STEUniform(Method):
    """Fixed-precision QAT with a straight-through estimator (the paper's Table IV baseline)."""
    name = "ste-uniform"
    options = (PER_CHANNEL,)

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.weight_bits, cfg.per_channel)

    @classmethod
    def check_options(cls, cfg):
        if cfg.per_channel and cfg.method not in ("ste-uniform", "clado"):
            raise ConfigError(f"--per-channel: for ste-uniform and clado; --method {cfg.method} keeps one "
                              "weight scale per layer")

    def __init__(self, act_bits: int, weight_bits: int, per_channel: bool = False):
        super().__init__(act_bits)
        self.weight_bits, self.per_channel = weight_bits, per_channel

    def convert(self, m):
        if isinstance(m, torch.nn.Conv2d):
            return STEConv2d.from_float(m, self.weight_bits, self.per_channel)
        return STELinear.from_float(m, self.weight_bits)        # see PER_CHANNEL: linear layers per layer

