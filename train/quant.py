"""Quantized drop-in layers: CSQ weight layers, a uniform STE baseline, PACT activations.

Every quantized weight layer answers `integer_weight()` (exact integers + scale) and
`bit_info()` (kept bit positions, paper precision, storage bits): the one place where a
layer's bit-width is computed. Freeze reads only those two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

N_BITS = 8
_TWO_POW = 2.0 ** torch.arange(N_BITS, dtype=torch.float32)


@dataclass
class BitInfo:
    kept: list            # kept bit positions, ascending (CSQ may keep e.g. [3, 7])
    precision: int        # paper's precision: number of kept mask bits
    storage_bits: int     # honest bits per weight: span of kept bits + sign

    @classmethod
    def from_kept(cls, kept):
        kept = sorted(int(b) for b in kept)
        span = kept[-1] - kept[0] + 1 if kept else 0
        return cls(kept, len(kept), span + 1)


def round_ste(x):
    return x + (torch.round(x) - x).detach()


# ----------------------------------------------------------------------------- activations
class InputQuant(nn.Module):
    """The network input, quantized once to signed 8 bit with a fixed, calibrated scale."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.tensor(1.0 / 127))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor):
        self.scale.fill_(max(float(x.abs().max()), 1e-8) / (2 ** (self.bits - 1) - 1))

    def forward(self, x):
        qmax = 2 ** (self.bits - 1) - 1
        return torch.clamp(torch.round(x / self.scale), -qmax, qmax) * self.scale


class ActQuant(nn.Module):
    """ReLU + uniform unsigned quantization with a learnable clip (PACT). bits=32: plain ReLU.

    The clip alpha is initialized from the first batch it sees (99.9th percentile), so the
    same default works after BN-normalized convs and after pooling."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(6.0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def scale(self) -> float:
        return float(self.alpha.detach().abs()) / self.levels

    def forward(self, x):
        if self.bits >= 32:
            return F.relu(x)
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                v = F.relu(x.detach()).flatten()
                q = torch.quantile(v[torch.randperm(v.numel(), device=v.device)[:100000]].float(), 0.999)
                self.alpha.fill_(max(float(q), 1e-3))
                self.initialized.fill_(True)
        alpha = self.alpha.abs() + 1e-8
        y = torch.minimum(F.relu(x), alpha)          # PACT clip: d/d alpha = 1 above the clip
        scale = alpha / self.levels
        return round_ste(y / scale) * scale

    def extra_repr(self):
        return f"bits={self.bits}"


# ----------------------------------------------------------------------------- CSQ weights
class CSQMixin:
    """Bi-level continuous sparsification of the weight's bit representation (CSQ, DAC'23).

    W = s/(2^n-1) * sum_b (sig(beta*m_p[b]) - sig(beta*m_n[b])) * 2^b * sig(beta*m_B[b])
    No rounding and no straight-through estimator: the gates become exact unit steps as
    beta -> inf, and `hard` evaluates that limit."""

    def _init_csq(self, init_logit: float, mask_init: float):
        w = self.weight.detach()
        shape = w.shape
        del self.weight                                   # the weight is derived, not stored
        smax = w.abs().max().clamp_min(1e-8)
        q = torch.round(w.abs() / smax * (2 ** N_BITS - 1)).to(torch.int64)
        bits = ((q.unsqueeze(0) >> torch.arange(N_BITS).view(-1, *[1] * len(shape))) & 1).bool()
        pos = bits & (w > 0).unsqueeze(0)
        neg = bits & (w < 0).unsqueeze(0)
        c = init_logit
        self.bit_logits_pos = nn.Parameter(torch.where(pos, c, -c).float())
        self.bit_logits_neg = nn.Parameter(torch.where(neg, c, -c).float())
        self.bit_mask_logits = nn.Parameter(torch.full((N_BITS,), float(mask_init)))
        # At beta=1 a kept bit contributes (sig(c) - sig(-c)) * sig(mask_init), not 1: scale s
        # up by that factor so the relaxed weight starts equal to the float weight.
        relax = (torch.sigmoid(torch.tensor(c)) - torch.sigmoid(torch.tensor(-c))) * torch.sigmoid(torch.tensor(mask_init))
        self.scale = nn.Parameter((smax / relax).reshape(()))
        self.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("mask_frozen", torch.tensor(False))
        self.hard = False

    def mask_gates(self):
        if self.hard or bool(self.mask_frozen):
            return (self.bit_mask_logits >= 0).float()
        return torch.sigmoid(self.beta * self.bit_mask_logits)

    def csq_weight(self):
        if self.hard:
            bits = (self.bit_logits_pos >= 0).float() - (self.bit_logits_neg >= 0).float()
        else:
            bits = torch.sigmoid(self.beta * self.bit_logits_pos) - torch.sigmoid(self.beta * self.bit_logits_neg)
        coef = _TWO_POW.to(bits.device) * self.mask_gates()
        return self.scale / (2 ** N_BITS - 1) * torch.tensordot(coef, bits, dims=1)

    def mask_penalty(self):
        """sum_b sig(beta * m_B[b]): the layer's term of the CSQ budget regularizer."""
        return torch.sigmoid(self.beta * self.bit_mask_logits).sum()

    def kept_bits(self) -> list:
        return [b for b in range(N_BITS) if float(self.bit_mask_logits[b].detach()) >= 0]

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(self.kept_bits())

    @torch.no_grad()
    def integer_weight(self):
        """Hardened weight as exact integers: W = scale * q, with 2^lowest kept bit folded in."""
        bits = (self.bit_logits_pos >= 0).long() - (self.bit_logits_neg >= 0).long()
        kept = self.kept_bits()
        coef = torch.tensor([(1 << b) if b in kept else 0 for b in range(N_BITS)], device=bits.device)
        q = torch.tensordot(coef, bits, dims=1)
        low = kept[0] if kept else 0
        return (q >> low).cpu(), float(self.scale) / (2 ** N_BITS - 1) * 2 ** low


class CSQConv2d(CSQMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, init_logit: float, mask_init: float):
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, device=m.weight.device)
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._init_csq(init_logit, mask_init)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.csq_weight(), self.bias)


class CSQLinear(CSQMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, init_logit: float, mask_init: float):
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device)
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._init_csq(init_logit, mask_init)
        return q

    def forward(self, x):
        return F.linear(x, self.csq_weight(), self.bias)


# ----------------------------------------------------------------------------- STE baseline
class STEMixin:
    """Fixed-precision symmetric weights, q = clip(round(w/s), -(2^(k-1)-1), 2^(k-1)-1), STE."""

    def _init_ste(self, bits: int):
        self.weight_bits = bits
        self.scale = nn.Parameter(self.weight.detach().abs().max().clamp_min(1e-8) / self.qmax)

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    def ste_weight(self):
        s = self.scale.abs() + 1e-12
        return round_ste(torch.clamp(self.weight / s, -self.qmax, self.qmax)) * s

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(range(self.weight_bits - 1))

    @torch.no_grad()
    def integer_weight(self):
        s = float(self.scale.abs()) + 1e-12
        q = torch.clamp(torch.round(self.weight / s), -self.qmax, self.qmax).long()
        return q.cpu(), s


class STEConv2d(STEMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, bits: int):
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, device=m.weight.device)
        q.load_state_dict(m.state_dict())
        q._init_ste(bits)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.ste_weight(), self.bias)


class STELinear(STEMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, bits: int):
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device)
        q.load_state_dict(m.state_dict())
        q._init_ste(bits)
        return q

    def forward(self, x):
        return F.linear(x, self.ste_weight(), self.bias)


QUANT_LAYERS = (CSQConv2d, CSQLinear, STEConv2d, STELinear)


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized weight layer, in definition order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "integer_weight")]


# ----------------------------------------------------------------------------- model surgery
def swap_layers(model: nn.Module, convert, act_bits: int) -> nn.Module:
    """Replace Conv2d/Linear via `convert(module)`, ReLU by ActQuant, and follow every
    average pool with an ActQuant so its output is an integer tensor too."""
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear)) and not hasattr(child, "integer_weight"):
            setattr(model, name, convert(child))
        elif isinstance(child, nn.ReLU):
            setattr(model, name, ActQuant(act_bits))
        elif isinstance(child, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            setattr(model, name, nn.Sequential(child, ActQuant(act_bits)))
        else:
            swap_layers(child, convert, act_bits)
    return model


class QuantModel(nn.Module):
    """A zoo model behind the int8 input quantizer: the unit that is trained and frozen."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.input_quant = InputQuant()
        self.net = net

    def forward(self, x):
        return self.net(self.input_quant(x))
