"""What every method's quantized model shares: PACT activations, the int8 input quantizer, layer
surgery, the bit report type, and the QuantModel that is trained and frozen.

The quantized weight layers are each method's own (train/methods/*.py). Every one answers
`integer_weight()` (exact integers + scale) and `bit_info()` (kept bit positions, paper
precision, storage bits): the one place where a layer's bit-width is computed. Freeze reads
only those two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

N_BITS = 8


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


class _ClipQuant(nn.Module):
    """An activation quantizer's clip alpha: fixed (clip=c, a buffer) or learned (PACT) and set
    from the first batch seen in training mode (99.9th percentile of `_magnitude(x)`), so the
    same default works after BN-normalized convs and after pooling. ActQuant and SignedQuant
    differ only in levels, magnitude and rounding function."""

    def __init__(self, bits: int = 8, clip: float | None = None):
        super().__init__()
        self.bits = bits
        self.fixed = clip is not None
        if self.fixed:
            self.register_buffer("alpha", torch.tensor(float(clip)))
        else:
            self.alpha = nn.Parameter(torch.tensor(6.0))
        self.register_buffer("initialized", torch.tensor(self.fixed))
        self.ready = False

    @property
    def levels(self) -> int:
        raise NotImplementedError

    def scale(self) -> float:
        return float(self.alpha.detach().abs()) / self.levels

    def _magnitude(self, x):
        raise NotImplementedError

    def _init_clip(self, x):
        if self.training and not self.ready and not bool(self.initialized):
            with torch.no_grad():
                v = self._magnitude(x.detach()).flatten()
                q = torch.quantile(v[torch.randperm(v.numel(), device=v.device)[:100000]].float(), 0.999)
                self.alpha.fill_(max(float(q), 1e-3))
                self.initialized.fill_(True)
        self.ready = self.ready or self.training          # checked the buffer once: no sync per step


class ActQuant(_ClipQuant):
    """ReLU + uniform unsigned quantization with a learnable clip (PACT). bits=32: plain ReLU.

    clip=c (what an nn.ReLU6, F.relu6 or clamp(0, c) becomes): the clip is that fixed c, a
    buffer, not learned, so the quantized activation keeps the float net's function."""

    def __init__(self, bits: int = 8, clip: float | None = None):
        super().__init__(bits, clip)

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def _magnitude(self, x):
        return F.relu(x)

    def forward(self, x):
        if self.bits >= 32:
            return torch.clamp(x, 0.0, float(self.alpha)) if self.fixed else F.relu(x)
        self._init_clip(x)
        return _PACTQuant.apply(x, self.alpha.abs() + 1e-8, self.levels)

    def extra_repr(self):
        return f"bits={self.bits}" + (f", clip={float(self.alpha):g} (fixed)" if self.fixed else "")


class _SymmetricQuant(torch.autograd.Function):
    """PACT's clip made symmetric: out = round(clip(x, -a, a) / s) * s, s = a / levels; gradients
    straight through inside (-a, a), and da = sign(x) where |x| >= a."""

    @staticmethod
    def forward(ctx, x, alpha, levels: int):
        scale = alpha / levels
        out = torch.maximum(torch.minimum(x, alpha), -alpha).div(scale).round().mul(scale)
        ctx.save_for_backward(x, alpha)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        inside = x.abs() < alpha
        return grad * inside, (grad * torch.sign(x) * ~inside).sum().reshape(alpha.shape), None


class SignedQuant(_ClipQuant):
    """A signed activation: symmetric uniform quantization to int8 (+-(2^(bits-1) - 1) levels)
    with a learned clip. What a value gets that reaches a conv, linear or pool without passing a
    ReLU: MobileNetV2's linear bottleneck (a projection conv + BN, a residual add with no ReLU
    after it). Inserted by train.surgery.insert_signed_quantizers; bits=32: identity."""

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _magnitude(self, x):
        return x.abs()

    def forward(self, x):
        if self.bits >= 32:
            return x
        self._init_clip(x)
        return _SymmetricQuant.apply(x, self.alpha.abs() + 1e-8, self.levels)

    def extra_repr(self):
        return f"bits={self.bits}, signed"


# ----------------------------------------------------------------------------- shared by methods
def best_clip(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """The clip c minimizing ||w - Q(w)||^2 for Q: round |w|/c to `bits` magnitude bits,
    saturating at c (sign kept). A coarse grid over fractions of max|w| is plenty.
    per_channel: one clip per output channel (dim 0), a vector."""
    mag = w.detach().abs().reshape(len(w), -1) if per_channel else w.detach().abs().reshape(1, -1)
    wmax = mag.max(1).values.clamp_min(1e-8)
    if bits >= N_BITS or bits <= 0:
        return wmax if per_channel else wmax[0]
    levels = 2 ** bits - 1
    if mag.shape[1] > 65536:                # a strided sample estimates the error just as well
        mag = mag[:, :: mag.shape[1] // 65536]
    best, best_err = wmax.clone(), torch.full_like(wmax, float("inf"))
    for frac in torch.linspace(0.05, 1.0, 40):
        c = (wmax * frac)[:, None]
        q = torch.clamp(torch.round(mag / c * levels), max=levels) * c / levels
        err = ((mag - q) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, c[:, 0], best), torch.where(better, err, best_err)
    return best if per_channel else best[0]


def float_twin(cls, m: nn.Module) -> nn.Module:
    """A `cls` layer (a method's Conv2d or Linear subclass) with the geometry, device and float
    weights of `m`: what every method's from_float starts from, before adding its parameters."""
    if isinstance(m, nn.Conv2d):
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.bias is not None, device=m.weight.device)
    else:
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device)
    q.load_state_dict(m.state_dict())
    return q


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized weight layer, in definition order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "integer_weight")]


# ----------------------------------------------------------------------------- model surgery
def relu_clip(m: nn.Module):
    """(True, clip) for a ReLU-like activation module, clip None (learned) for nn.ReLU, the fixed
    clip for nn.ReLU6 and nn.Hardtanh(0, c); (False, None) for anything else."""
    if isinstance(m, nn.ReLU):
        return True, None
    if isinstance(m, nn.Hardtanh) and m.min_val == 0 and m.max_val > 0:      # nn.ReLU6 is one
        return True, float(m.max_val)
    return False, None


# Elementwise activations other than a ReLU: each is computed on a quantized input, so freeze
# makes it a table over the input's integer values (graph op `lut`), computed by the module itself.
TABLE_ACTIVATIONS = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                     nn.Mish, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh)
_NONNEGATIVE = (nn.Hardsigmoid, nn.Sigmoid, nn.Softplus)


def table_activation(m: nn.Module) -> bool:
    """An activation module freeze computes as a table lookup (a ReLU-like one is an ActQuant instead)."""
    return isinstance(m, TABLE_ACTIVATIONS) and not relu_clip(m)[0]


AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def signed_table_output(m: nn.Module) -> bool:
    """Whether table activation `m`'s values may be negative (table_output_quantizer)."""
    return not (isinstance(m, _NONNEGATIVE) or isinstance(m, nn.Hardtanh) and m.min_val >= 0)


def table_output_quantizer(m: nn.Module, act_bits: int) -> nn.Module:
    """The quantizer after a table activation, which gives the table its output scale. A function
    whose values are never negative (sigmoid, hardsigmoid, softplus; a Hardtanh(a > 0, b)) gets an
    unsigned ActQuant: all 2^bits levels on its range instead of half of them, and a learned clip,
    because where the values lie (a sigmoid's mostly well inside (0, 1), or saturated) matters more
    than the bound of the range, as for a ReLU. Any other (Hardswish, SiLU, GELU, Mish, LeakyReLU,
    ELU: slightly negative; tanh: symmetric) a SignedQuant: the contract has no zero point, so a
    range like Hardswish's [-0.375, inf) costs one bit of resolution, but its negative part survives."""
    return SignedQuant(act_bits) if signed_table_output(m) else ActQuant(act_bits)


def swap_layers(model: nn.Module, convert, act_bits: int) -> nn.Module:
    """Replace Conv2d/Linear via `convert(module)`, ReLU (ReLU6, Hardtanh(0, c): fixed clip) by
    ActQuant, follow every average pool with an ActQuant (a SignedQuant where surgery marked it
    `signed_output`: its input may be negative) and every other activation (Hardswish,
    GELU, sigmoid...: `table_activation`) with its quantizer (`table_output_quantizer`), so their
    outputs are integer tensors too. Functional activations and modules used twice are made
    modules, one per use, first (train.surgery.one_module_per_activation); a table activation's
    input gets a SignedQuant there where it may be negative (insert_signed_quantizers)."""
    for name, child in list(model.named_children()):
        relu, clip = relu_clip(child)
        if isinstance(child, (nn.Conv2d, nn.Linear)) and not hasattr(child, "integer_weight"):
            setattr(model, name, convert(child))
        elif relu:
            setattr(model, name, ActQuant(act_bits, clip))
        elif isinstance(child, AVG_POOLS):     # signed: surgery marks it
            after = SignedQuant(act_bits) if getattr(child, "signed_output", False) else ActQuant(act_bits)
            setattr(model, name, nn.Sequential(child, after))
        elif table_activation(child):
            setattr(model, name, nn.Sequential(child, table_output_quantizer(child, act_bits)))
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
