"""Quantized drop-in layers: CSQ weight layers, a uniform STE baseline, PACT activations.

Every quantized weight layer answers `integer_weight()` (exact integers + scale) and
`bit_info()` (kept bit positions, paper precision, storage bits): the one place where a
layer's bit-width is computed. Freeze reads only those two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

N_BITS = 8
UNDECIDED = 3.0         # |beta * logit| below this: the gate is not yet a step (see CSQMixin.undecided)


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


class _PACTQuant(torch.autograd.Function):
    """PACT (Choi et al. 2018): out = round(clip(x, 0, a) / s) * s, s = a / levels, with PACT's
    straight-through gradients: dx = 1 inside (0, a), 0 outside; da = 1 where x > a.

    One function instead of autograd's chain of ops (relu, min, div, round, STE add, mul): it
    keeps only x for the backward pass, and both passes use torch's fused elementwise kernels
    (hardtanh_backward is exactly "grad inside (0, a)"), so quantized activations cost about
    one extra pass over the tensor instead of a dozen."""

    @staticmethod
    def forward(ctx, x, alpha, levels: int):
        scale = alpha / levels
        if x.device.type == "cpu":
            out = torch.clamp(x, 0.0, float(alpha))     # scalar bounds: the fast kernel on CPU
        else:
            out = torch.minimum(F.relu(x), alpha)
        out.div_(scale).round_().mul_(scale)
        ctx.save_for_backward(x, alpha)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        if x.device.type == "cpu":
            a = float(alpha)
            grad_x = torch.ops.aten.hardtanh_backward(grad, x, 0.0, a)
            grad_alpha = torch.ops.aten.threshold_backward(grad, x, a).sum()
        else:
            grad_x = grad * ((x > 0) & (x < alpha))
            grad_alpha = (grad * (x > alpha)).sum()
        return grad_x, grad_alpha.reshape(alpha.shape), None


def pact_reference(x, alpha, levels: int):
    """PACT written with autograd ops (the clip as PACT's 0.5 (|x| - |x - a| + a), the rounding
    straight-through): what _PACTQuant is tested against."""
    y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
    scale = (alpha / levels).detach()
    return round_ste(y / scale) * scale


class ActQuant(nn.Module):
    """ReLU + uniform unsigned quantization with a learnable clip (PACT). bits=32: plain ReLU.

    The clip alpha is initialized from the first batch it sees in training mode (99.9th
    percentile), so the same default works after BN-normalized convs and after pooling."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(6.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.ready = False

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def scale(self) -> float:
        return float(self.alpha.detach().abs()) / self.levels

    def forward(self, x):
        if self.bits >= 32:
            return F.relu(x)
        if self.training and not self.ready and not bool(self.initialized):
            with torch.no_grad():
                v = F.relu(x.detach()).flatten()
                q = torch.quantile(v[torch.randperm(v.numel(), device=v.device)[:100000]].float(), 0.999)
                self.alpha.fill_(max(float(q), 1e-3))
                self.initialized.fill_(True)
        self.ready = self.ready or self.training          # checked the buffer once: no sync per step
        return _PACTQuant.apply(x, self.alpha.abs() + 1e-8, self.levels)

    def extra_repr(self):
        return f"bits={self.bits}"


# ----------------------------------------------------------------------------- CSQ weights
_BIT_VALUES = {}


def _bit_values(like: torch.Tensor) -> torch.Tensor:
    """[1, 2, 4, ..., 128] on like's device and dtype (cached: it is needed every step)."""
    key = (like.device, like.dtype)
    if key not in _BIT_VALUES:
        _BIT_VALUES[key] = (2.0 ** torch.arange(N_BITS, dtype=torch.float64)).to(like.device, like.dtype)
    return _BIT_VALUES[key]


def _planes(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-bit [8] vector shaped to broadcast against [8, *weight.shape]."""
    return v.view(-1, *[1] * ndim)


def _signed_digits(v: torch.Tensor) -> torch.Tensor:
    """Binary digits of an integer tensor |v| < 256, [8, *shape] int8, each with v's sign."""
    mag = v.abs().to(torch.int32)
    bits = ((mag.unsqueeze(0) >> _planes(torch.arange(N_BITS, dtype=torch.int32, device=v.device), v.ndim)) & 1)
    return bits.to(torch.int8) * torch.sign(v).unsqueeze(0).to(torch.int8)


def best_clip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The clip c minimizing ||w - Q(w)||^2 for Q: round |w|/c to `bits` magnitude bits,
    saturating at c (sign kept). A coarse grid over fractions of max|w| is plenty."""
    wmax = w.abs().max().clamp_min(1e-8)
    if bits >= N_BITS or bits <= 0:
        return wmax
    levels = 2 ** bits - 1
    mag = w.abs().flatten()
    if mag.numel() > 65536:                 # a strided sample estimates the error just as well
        mag = mag[:: mag.numel() // 65536]
    best, best_err = wmax, None
    for frac in torch.linspace(0.05, 1.0, 40):
        c = wmax * frac
        q = torch.clamp(torch.round(mag / c * levels), max=levels) * c / levels
        err = ((mag - q) ** 2).sum()
        if best_err is None or err < best_err:
            best, best_err = c, err
    return best


class _CSQWeight(torch.autograd.Function):
    """The relaxed CSQ weight and its exact gradient.

        W = s/(2^n-1) * sum_b (sig(beta*m_p[b]) - sig(beta*m_n[b])) * 2^b * sig(beta*m_B[b])

    Mathematically the same as letting autograd differentiate the formula (tests/test_csq.py
    checks it against that), but the two [8, *weight.shape] sigmoids are computed once per step
    and are the only [8, ...] tensors kept for the backward pass (autograd would also keep
    their difference): a CSQ step stays close to a float step in time and memory."""

    @staticmethod
    def forward(ctx, pos_logits, neg_logits, mask_logits, scale, beta, bit_beta):
        pos = torch.sigmoid(bit_beta * pos_logits)
        neg = torch.sigmoid(bit_beta * neg_logits)
        gate = torch.sigmoid(beta * mask_logits)
        ctx.save_for_backward(pos, neg, gate, scale, beta, bit_beta)
        plane_weight = scale / (2 ** N_BITS - 1) * _bit_values(gate) * gate      # [8]
        return torch.tensordot(plane_weight, pos, dims=1) - torch.tensordot(plane_weight, neg, dims=1)

    @staticmethod
    def backward(ctx, grad_w):
        pos, neg, gate, scale, beta, bit_beta = ctx.saved_tensors
        need_pos, need_neg, need_mask, need_scale, _, _ = ctx.needs_input_grad
        unit = scale / (2 ** N_BITS - 1) * _bit_values(gate)                    # s/(2^n-1) * 2^b
        grad_digits = grad_w.unsqueeze(0) * _planes(unit * gate * bit_beta, grad_w.ndim)
        sigmoid_backward = torch.ops.aten.sigmoid_backward                     # grad * sig * (1 - sig)
        grad_pos = sigmoid_backward(grad_digits, pos) if need_pos else None
        grad_neg = sigmoid_backward(grad_digits, neg).neg_() if need_neg else None
        grad_mask = grad_scale = None
        if need_mask or need_scale:
            flat = grad_w.reshape(-1)
            grad_plane = pos.reshape(N_BITS, -1) @ flat - neg.reshape(N_BITS, -1) @ flat   # dL/d(plane b's weight)
            grad_mask = grad_plane * unit * beta * gate * (1 - gate)
            grad_scale = ((grad_plane * _bit_values(gate) * gate).sum() / (2 ** N_BITS - 1)).reshape(scale.shape)
        return grad_pos, grad_neg, grad_mask, grad_scale, None, None


def csq_formula(pos_logits, neg_logits, mask_logits, scale, beta, bit_beta=None):
    """The CSQ weight written out plainly, differentiated by autograd: the reference the fused
    _CSQWeight is tested against."""
    bit_beta = beta if bit_beta is None else bit_beta
    bits = torch.sigmoid(bit_beta * pos_logits) - torch.sigmoid(bit_beta * neg_logits)
    coef = _bit_values(bits) * torch.sigmoid(beta * mask_logits)
    return scale / (2 ** N_BITS - 1) * torch.tensordot(coef, bits, dims=1)


class CSQMixin:
    """Bi-level continuous sparsification of the weight's bit representation (CSQ, DAC'23).

    W = s/(2^n-1) * sum_b (sig(beta*m_p[b]) - sig(beta*m_n[b])) * 2^b * sig(beta*m_B[b])
    No rounding and no straight-through estimator: the gates become exact unit steps as
    beta -> inf, and `hard` evaluates that limit (and so does a frozen mask for its gates)."""

    def _init_csq(self, init_logit: float, mask_init: float, init_bits: int | None = None):
        """Bit logits, mask logits and scale from the float weight w.

        Each element's magnitude is written with 8 bits, v = round(min(|w| / clip, 1) * 255),
        as digits d_b in {-1, 0, 1} (sign of w folded in): set digits get logit +init_logit in
        the plane of their sign, every other logit is -init_logit, so at any beta an unset
        digit contributes sig(-c) - sig(-c) = 0 exactly.

        init_bits=None: all 8 bits kept (m_B = +mask_init), clip = max|w|: the relaxed weight
        is the 8-bit rounding of w. (mask_init = 0 is the paper code's start: every gate at 1/2,
        every bit counted as kept.)
        init_bits=k < 8: the layer starts at a k-bit budget. The top k bits hold w rounded to
        k bits with the clip that minimizes the k-bit rounding error; the low 8-k bits hold the
        signed remainder. m_B = +mask_init on the top k bits, -mask_init below, so the hard
        weight is the best k-bit rounding of w and the relaxed weight (low bits half-gated)
        still approximates w itself.

        The scale s is the least-squares fit of the relaxed weight at beta = 1 to w: the model
        starts where the float model is."""
        w = self.weight.detach().float()
        shape = w.shape
        del self.weight                                   # the weight is derived, not stored
        k = N_BITS if init_bits is None else int(min(max(init_bits, 0), N_BITS))
        low = N_BITS - k
        clip = best_clip(w, k)
        v = torch.round(torch.clamp(w.abs() / clip, max=1.0) * (2 ** N_BITS - 1))
        top = torch.clamp(torch.round(v / 2 ** low), max=2 ** k - 1) * 2 ** low
        digits = _signed_digits(top) + _signed_digits(v - top)          # [8, *shape] in {-1,0,1}
        digits *= torch.sign(w).unsqueeze(0).to(torch.int8)
        c = float(init_logit)
        self.bit_logits_pos = nn.Parameter(torch.where(digits > 0, c, -c).to(torch.float32))
        self.bit_logits_neg = nn.Parameter(torch.where(digits < 0, c, -c).to(torch.float32))
        mask = torch.where(torch.arange(N_BITS, device=w.device) >= low, 1.0, -1.0) * float(mask_init)
        self.bit_mask_logits = nn.Parameter(mask)
        with torch.no_grad():
            relaxed = csq_formula(self.bit_logits_pos, self.bit_logits_neg, mask, torch.tensor(1.0), torch.tensor(1.0))
            fit = (relaxed * w).sum() / (relaxed * relaxed).sum().clamp_min(1e-30)
        self.scale = nn.Parameter(fit.clamp_min(1e-8).reshape(()).float())
        self.register_buffer("beta", torch.tensor(1.0, device=w.device))
        self.register_buffer("mask_frozen", torch.tensor(False, device=w.device))
        self.bit_beta = None      # bit-gate temperature when it differs from beta (not saved: set every step)
        self.frozen = False       # mirrors the mask_frozen buffer without a device sync per step
        self.hard = False

    def freeze_mask(self, frozen: bool):
        self.mask_frozen.fill_(frozen)
        self.frozen = frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.frozen = bool(self.mask_frozen)

    def kept_mask(self) -> torch.Tensor:
        """[8] bool: the bit positions the layer keeps, m_B[b] >= 0 (the paper's hard count)."""
        return self.bit_mask_logits.detach() >= 0

    def csq_weight(self):
        # fp32 whatever the autocast context (--amp bf16 casts the conv, not the synthesis)
        with torch.autocast(self.bit_logits_pos.device.type, enabled=False):
            return self._csq_weight()

    def _csq_weight(self):
        if self.hard:
            return self.hard_weight()
        if self.frozen:
            # finetune: the mask is a fixed unit step, the bit logits keep their sigmoids
            frozen = torch.where(self.kept_mask(), 1e4, -1e4)      # sig(beta * +-1e4) == 1 / 0 exactly
            return _CSQWeight.apply(self.bit_logits_pos, self.bit_logits_neg, frozen, self.scale, self.beta, self.bit_temperature())
        return _CSQWeight.apply(self.bit_logits_pos, self.bit_logits_neg, self.bit_mask_logits, self.scale, self.beta,
                                self.bit_temperature())

    def bit_temperature(self) -> torch.Tensor:
        """The temperature of the bit gates sig(beta_b * m_p), sig(beta_b * m_n): beta itself
        (the paper), or the tensor CSQ.on_epoch points `bit_beta` to (--bit-beta-max)."""
        return self.beta if self.bit_beta is None else self.bit_beta

    def hard_weight(self) -> torch.Tensor:
        """beta -> inf: every gate a unit step. Equals scale * q of integer_weight() exactly."""
        q, step = self._hard_integers()
        return step * q.to(step.dtype)

    def _hard_integers(self):
        digits = (self.bit_logits_pos.detach() >= 0).long() - (self.bit_logits_neg.detach() >= 0).long()
        coef = torch.where(self.kept_mask(), 2 ** torch.arange(N_BITS, device=digits.device), 0)
        return torch.tensordot(coef, digits, dims=1), (self.scale.detach() / (2 ** N_BITS - 1))

    def mask_penalty(self):
        """sum_b sig(beta * m_B[b]): the layer's term of the CSQ budget regularizer."""
        return torch.sigmoid(self.beta * self.bit_mask_logits).sum()

    @torch.no_grad()
    def undecided(self) -> torch.Tensor:
        """[undecided bit logits, bit logits, undecided mask logits, mask logits] as a float
        tensor (no host sync): a gate is undecided while |beta * m| < UNDECIDED, i.e. its
        sigmoid is still between 0.047 and 0.953, so hardening it would move the weight. Bit
        logits count only in the planes the mask keeps (the others are gated off in the
        hardened weight); a frozen mask counts as decided."""
        beta, bit_beta = self.beta, self.bit_temperature()
        kept = _planes(self.kept_mask(), self.bit_logits_pos.ndim - 1)
        open_bits = lambda m: ((bit_beta * m).abs() < UNDECIDED) & kept
        bits = (open_bits(self.bit_logits_pos).sum() + open_bits(self.bit_logits_neg).sum()).float()
        n_bits = 2.0 * kept.sum() * self.bit_logits_pos[0].numel()
        if self.frozen:
            masks = torch.zeros((), device=beta.device)
        else:
            masks = ((beta * self.bit_mask_logits).abs() < UNDECIDED).sum().float()
        return torch.stack([bits, n_bits.float(), masks, torch.tensor(float(N_BITS), device=beta.device)])

    def kept_bits(self) -> list:
        return [b for b, k in enumerate(self.kept_mask().tolist()) if k]

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(self.kept_bits())

    @torch.no_grad()
    def integer_weight(self):
        """Hardened weight as exact integers: W_hard = scale * q, with 2^lowest kept bit folded
        into the scale (the float32 scale times an 8-bit integer is exact in float64)."""
        q, step = self._hard_integers()
        kept = self.kept_bits()
        low = kept[0] if kept else 0
        scale = float(step) * 2 ** low
        q = q >> low
        if scale < 0:                                     # s is trainable; keep the scale positive
            q, scale = -q, -scale
        return q.cpu(), scale


class CSQConv2d(CSQMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, init_logit: float, mask_init: float, init_bits: int | None = None):
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, device=m.weight.device)
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._init_csq(init_logit, mask_init, init_bits)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.csq_weight(), self.bias)


class CSQLinear(CSQMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, init_logit: float, mask_init: float, init_bits: int | None = None):
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device)
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._init_csq(init_logit, mask_init, init_bits)
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
