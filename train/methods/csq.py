"""CSQ (Xiao et al., DAC 2023): bi-level continuous sparsification of weight bits; and the
paper's Table IV "CSQ-Uniform" (the same relaxation at one fixed precision, no mask).

One file, as every method: the quantized layers (CSQConv2d, CSQLinear: CSQMixin's relaxed weight
and its fused gradient), the options `mixq train` adds for them, which parameters the bit
optimizer trains, and the Method subclasses. README "Why the search converges" has the
measurements behind the defaults."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.train import quant
from mixq.train.budget import Costs
from mixq.train.errors import ConfigError
from mixq.train.methods.base import Method, Option
from mixq.train.quant import N_BITS, BitInfo, best_clip, float_twin

UNDECIDED = 3.0         # |beta * logit| below this: the gate is not yet a step (see CSQMixin.undecided)
# the bit gates' anneal from --bit-beta-soft to --beta-max takes this share of the phase with the
# mask final; they are at beta_max for the rest (CSQ.bit_schedule)
BIT_ANNEAL = 0.5
# fewer optimizer steps than this in that anneal and the hardened network may not follow the soft
# one. Measured (ResNet-20, CIFAR-10, 2048 images, 6 epochs): 10 steps (batch 128) collapsed to
# chance at the anneal (9.8 % hardened, 9.6 % relaxed); 19 (batch 64) and 38 (batch 32) did not
# (33.2 / 33.8 %, 39.8 / 39.6 %)
MIN_ANNEAL_STEPS = 19


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
        if "mask_frozen" in self._buffers:        # not while from_float copies the float layer
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
        (the paper), or the tensor CSQ.on_step points `bit_beta` to (--bit-beta-soft)."""
        return self.beta if self.bit_beta is None else self.bit_beta

    def hard_weight(self) -> torch.Tensor:
        """beta -> inf: every gate a unit step. Equals scale * q of integer_weight() exactly."""
        q, step = self._hard_integers()
        return step * q.to(step.dtype)

    def _hard_integers(self, kept=None):
        """(integers in units of the 8-bit step, that step) of the hardened weight with the
        bit positions `kept` ([8] bool; default: the mask's)."""
        kept = self.kept_mask() if kept is None else kept
        digits = (self.bit_logits_pos.detach() >= 0).long() - (self.bit_logits_neg.detach() >= 0).long()
        coef = torch.where(kept, 2 ** torch.arange(N_BITS, device=digits.device), 0)
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
    def integer_weight(self, kept=None):
        """Hardened weight as exact integers: W_hard = scale * q, with 2^lowest kept bit folded
        into the scale (the float32 scale times an 8-bit integer is exact in float64).
        kept ([8] bool): the layer with those bit positions kept instead of the mask's."""
        kept = self.kept_mask() if kept is None else kept
        q, step = self._hard_integers(kept)
        positions = kept.nonzero().flatten().tolist()
        low = positions[0] if positions else 0
        scale = float(step) * 2 ** low
        q = q >> low
        if scale < 0:                                     # s is trainable; keep the scale positive
            q, scale = -q, -scale
        return q.cpu(), scale

    # one bit fewer or more, as CSQ moves a bit (train/sensitivity.py measures what each costs)
    @torch.no_grad()
    def one_bit_fewer(self):
        """(q, scale) with the lowest kept bit dropped (its mask gate shut: the plane's digits
        are cut off, not rounded, as when CSQ's mask drops it); None at one kept bit."""
        kept = self.kept_mask().clone()
        positions = kept.nonzero().flatten().tolist()
        if len(positions) <= 1:
            return None
        kept[positions[0]] = False
        return self.integer_weight(kept)

    @torch.no_grad()
    def one_bit_more(self):
        """(q, scale) with one more bit opened, with the digits its bit logits hold there (they
        learn little under a shut gate): the bit below the lowest kept one (a finer step) or, when
        that is bit 0, the lowest shut bit (a gap in the kept set, or the bit above it); None when
        all 8 bits are kept."""
        kept = self.kept_mask().clone()
        positions = kept.nonzero().flatten().tolist()
        if not positions or len(positions) == N_BITS:
            return None
        kept[positions[0] - 1 if positions[0] > 0 else int((~kept).nonzero()[0])] = True
        return self.integer_weight(kept)


class CSQConv2d(CSQMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, init_logit: float, mask_init: float, init_bits: int | None = None):
        q = float_twin(cls, m)
        q._init_csq(init_logit, mask_init, init_bits)
        return q

    def forward(self, x):
        return self._conv_forward(x, self.csq_weight(), self.bias)


class CSQLinear(CSQMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, init_logit: float, mask_init: float, init_bits: int | None = None):
        q = float_twin(cls, m)
        q._init_csq(init_logit, mask_init, init_bits)
        return q

    def forward(self, x):
        return F.linear(x, self.csq_weight(), self.bias)


# ----------------------------------------------------------------------------- the method
def _span_ends(kept: torch.Tensor):
    """([L, 1] lowest, [L, 1] highest kept bit, the [8] bit index) of a [L, 8] bool mask (none kept: 8, -1)."""
    idx = torch.arange(kept.shape[1], device=kept.device)
    lo = torch.where(kept, idx, kept.shape[1]).amin(1, keepdim=True)
    hi = torch.where(kept, idx, -1).amax(1, keepdim=True)
    return lo, hi, idx


def _storage(kept: torch.Tensor) -> torch.Tensor:
    """[L] storage bits (span of the kept bits + sign; 1 for a layer with none) of a [L, 8] bool mask."""
    lo, hi, _ = _span_ends(kept)
    return (hi - lo + 1).clamp(min=0).squeeze(1) + 1


def _next_to_span(kept: torch.Tensor) -> torch.Tensor:
    """[L, 8] bool: the bit just below and just above each layer's span of kept bits."""
    lo, hi, idx = _span_ends(kept)
    return ~kept & ((idx == lo - 1) | (idx == hi + 1))


def _allocation(kept: torch.Tensor) -> list:
    """[(precision, storage bits)] per layer of a [L, 8] bool mask (train.budget.Costs)."""
    return list(zip(kept.sum(1).tolist(), _storage(kept).tolist()))


def initial_bits(target: float, params: list) -> list:
    """Bits each layer starts with so that their unweighted mean is the target (to the nearest
    whole bit in total): floor(target) everywhere, one more for the smallest layers."""
    n = len(params)
    total = min(max(round(target * n), 0), 8 * n)
    base = total // n
    extra = set(sorted(range(n), key=lambda i: (params[i], i))[:total - base * n])
    return [base + (i in extra) for i in range(n)]


@torch.no_grad()
def keep_min_bits(layer, k: int, margin: float):
    """Guard, not part of the paper's formula: a layer keeps at least k bits. A BN-followed
    layer's last bit is a pure scale factor, invisible to the task loss while its gate is
    soft, so the budget term can switch it off for free; the hardened layer is then all
    zeros and a plain CNN is dead. Of the k largest mask logits, those below 0 are set to
    +margin (where kept bits start): not to 0, where the gate is most sensitive and the lifted
    bit would keep flickering. Tensor ops only (no host sync): it runs every step. k = 0
    disables the guard."""
    logits = layer.bit_mask_logits
    top = logits.topk(k).indices
    logits[top] = torch.where(logits[top] < 0, torch.full_like(logits[top], margin), logits[top])


class CSQ(Method):
    """CSQ (Xiao et al., DAC 2023): bi-level continuous sparsification of weight bits.

    Weight: CSQMixin, W = s/(2^n-1) sum_b (sig(beta m_p[b]) - sig(beta m_n[b])) 2^b sig(beta m_B[b]).

    Budget: lambda * (avg_precision - target) * sum_layers sum_b sig(beta * m_B[b]), with
    avg_precision the unweighted mean over layers of the hard count of kept bits
    (m_B[b] >= 0), so a model below budget is pushed to grow precision back.

    Temperature: beta = beta_max^(t / (saturate * T)) capped at beta_max, t the (fractional)
    epoch of the search, T its length: the loop calls on_step(epoch + step/steps) before every
    step, so beta grows smoothly per step; with saturate = 1 and sampled at whole epochs it is
    the paper's curve (beta_max reached at the last search epoch). One beta tensor is shared by
    every layer and filled once per step. The optional finetune phase (the paper's ImageNet
    recipe) freezes the mask, rewinds beta to 1 and anneals it again. `bit_beta_soft` (mixq's
    default 2; None: the paper's one beta) gives the bit gates their own temperature: soft
    while the mask is searched, annealed to beta_max once it is final, see bit_schedule.

    Convergence (the search must end with the hardened network equal to the relaxed one):
    the search has two phases. Until `mask_hard_at` (0.8 of it) the mask is searched and the
    bit gates are soft (bit_beta_soft): the relaxed network learns. From there the mask is
    exact unit steps, with no beta rewind and no budget term (the precision is final), and
    the bit gates anneal to beta_max, so the digits harden under the mask they will be frozen
    with while the undecided ones still adapt; the budget term, which counts kept bits with a
    hard threshold, would otherwise keep pushing the marginal bit back and forth across
    m_B = 0, where its gate is half open. See README ("Why the search converges") for the
    measurements behind the defaults.

    Initialization: `init="full"` (the default, and the paper code's): all 8 bits kept, every
    m_B = mask_init (0.2; 0 in the paper recipe: every gate at 1/2), the bit logits the float
    weight's 8-bit digits; the budget term then prunes precision to the target, and layers
    compete for bits: on CIFAR-10 ResNet-20 the first conv and the classifier keep 6 bits and
    the wide late convs 2 (README). `init="budget"`: every layer starts *at* the budget, with
    initial_bits(target) bits per layer whose mean is the target, the float weight rounded to
    that many bits (best clip) in the top planes plus the remainder below, m_B = +mask_init on
    the kept planes, -mask_init below. The budget term is then 0 from the start and only the
    task loss moves the mask: in short runs it hardly does, and the result is uniform.

    Guard (min_layer_bits, default 1; 0 turns it off): see keep_min_bits. Layers named in
    `fixed_layers` (the paper recipe's ResNet downsampling shortcuts) keep all 8 bits with a
    frozen mask and are left out of the bit count and the budget."""
    name = "csq"
    mixed = True
    mask_searched = True        # csq-uniform: the mask is final (an exact step) from the first step
    relaxes = True
    warm_start = True
    bit_params = ("bit_logits_pos", "bit_logits_neg")   # --bit-optimizer at --bit-lr
    gate_params = ("bit_mask_logits",)                 # SGD without weight decay (decay would pull the gates to 1/2)
    options = (
        Option("lam", 0.01, "csq: budget regularizer strength", flag="--lambda"),
        Option("beta_max", 200.0, "CSQ: final gate temperature"),
        Option("bit_beta_soft", 2.0, "CSQ: temperature of the bit gates m_p, m_n while the mask is searched; "
               "from --mask-hard-at on they anneal from it to --beta-max (--recipe paper: one temperature, "
               "beta, for all gates)"),
        Option("beta_saturate", 1.0, "CSQ: beta reaches --beta-max at this fraction of the search (1: the last epoch)"),
        Option("mask_hard_at", 0.8, "CSQ: from this fraction of the search on, the bit mask is an exact step and "
               "the bit gates anneal to --beta-max (csq-uniform, no mask: the bits' anneal) (1: never)"),
        Option("csq_init", "full", "CSQ: full (default: all 8 bits kept, precision then prunes to the target, as "
               "in the paper) | budget (every layer starts at the target)"),
        Option("init_logit", 2.0, "CSQ: |bit logit| derived from the float weights"),
        Option("bit_logit_bound", 2.0, "CSQ: keep the bit logits in [-B, B] (0: unbounded)"),
        Option("mask_init", 0.2, "CSQ: |initial bit-mask logits| (+ on the bits a layer starts with, - below)"),
        Option("min_layer_bits", 1, "CSQ guard: every layer keeps at least this many bits (0: off, the paper's plain rule)"),
        Option("fixed_shortcuts", False, "CSQ: ResNet downsampling shortcuts stay 8-bit, outside the budget and the bit count"),
    )

    @classmethod
    def from_config(cls, cfg, net):
        fixed = shortcut_layers(net) if cfg.fixed_shortcuts else ()
        return cls(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam, cfg.beta_max,
                   cfg.init_logit, cfg.mask_init, cfg.min_layer_bits, cfg.csq_init, cfg.beta_saturate,
                   cfg.mask_hard_at, fixed, cfg.bit_logit_bound, cfg.bit_beta_soft)

    @classmethod
    def check_options(cls, cfg):
        if cfg.csq_init not in ("budget", "full"):
            raise ConfigError(f"--csq-init {cfg.csq_init}: must be budget or full")
        if cfg.bit_logit_bound < 0:
            raise ConfigError(f"--bit-logit-bound {cfg.bit_logit_bound}: must be >= 0 (0: unbounded)")
        if cfg.bit_beta_soft is not None and not 0 < cfg.bit_beta_soft <= cfg.beta_max:
            raise ConfigError(f"--bit-beta-soft {cfg.bit_beta_soft}: must be in (0, --beta-max]")
        if not 0 < cfg.beta_saturate <= 1:
            raise ConfigError(f"--beta-saturate {cfg.beta_saturate}: must be in (0, 1]")
        if not 0 <= cfg.mask_hard_at <= 1:
            raise ConfigError(f"--mask-hard-at {cfg.mask_hard_at}: must be in [0, 1]")
        if not cfg.init_logit > 0 or not cfg.mask_init >= 0:
            raise ConfigError(f"--init-logit {cfg.init_logit} must be > 0 and --mask-init {cfg.mask_init} >= 0")
        if cfg.min_layer_bits < 0 or cfg.min_layer_bits > 8:
            raise ConfigError(f"--min-layer-bits {cfg.min_layer_bits}: must be 0..8")

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 0.01, beta_max: float = 200.0, init_logit: float = 2.0,
                 mask_init: float = 0.2, min_layer_bits: int = 1, init: str = "budget",
                 beta_saturate: float = 1.0, mask_hard_at: float = 1.0, fixed_layers=(),
                 bit_logit_bound: float = 0.0, bit_beta_soft: float | None = None):
        super().__init__(act_bits)
        self.bit_beta_soft = bit_beta_soft
        self.bit_logit_bound = bit_logit_bound
        self.min_layer_bits = min_layer_bits
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.beta_max = lam, beta_max
        self.init_logit, self.mask_init, self.init = init_logit, mask_init, init
        self.beta_saturate, self.mask_hard_at = beta_saturate, mask_hard_at
        self.fixed_layers = tuple(fixed_layers)
        self.beta, self.mask_frozen = 1.0, False
        self._beta = None           # the one beta tensor every layer's `beta` buffer points to
        self._bit_beta = None       # --bit-beta-soft: the one bit-gate temperature tensor (layer.bit_beta)
        self.bit_beta = 1.0
        self._cost_weights = None   # the budget term's per-layer weights (size, bops), on the device

    def fixed_names(self) -> tuple:
        return self.fixed_layers

    def set_budget(self, facts, budget):
        if budget.measure == "bits":
            self.target = budget.value
        elif self.init == "budget":
            raise ConfigError(f"--budget {budget}: --csq-init budget starts every layer at a mean precision; "
                              "use --budget bits=T with it, or --csq-init full (the default)")
        super().set_budget(facts, budget)

    def prepare(self, model):
        # swap_layers converts Conv2d/Linear in named_modules order: the same order as here
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        searched = [m.weight.numel() for n, m in layers if n not in self.fixed_layers]
        bits = iter(initial_bits(self.target, searched)) if self.init == "budget" else None
        self._init_bits = iter([None if n in self.fixed_layers or bits is None else next(bits) for n, _ in layers])
        model = super().prepare(model)
        # the layer lists, once: on_step and after_step run every step
        named = quant.quant_layers(model)
        self._all = [m for _, m in named]
        self._searched = [m for n, m in named if n not in self.fixed_layers]
        self._bit_logits = [p for m in self._all for p in (m.bit_logits_pos, m.bit_logits_neg)]
        for name, layer in named:
            if name in self.fixed_layers:
                layer.freeze_mask(True)
        return model

    def convert(self, m):
        cls = CSQConv2d if isinstance(m, torch.nn.Conv2d) else CSQLinear
        return cls.from_float(m, self.init_logit, self.mask_init, next(self._init_bits))

    def layers(self):
        """The searched layers (the fixed ones are not in the budget or the bit count)."""
        return self._searched

    def all_layers(self):
        return self._all

    def schedule(self, epoch: float) -> tuple[float, bool]:
        """(beta, mask hard) at a fractional epoch."""
        if epoch >= self.epochs:                            # finetune: beta rewound, mask frozen
            t = (epoch - self.epochs) / max(self.finetune_epochs, 1)
            return float(self.beta_max ** min(t, 1.0)), True
        t = epoch / max(self.epochs * self.beta_saturate, 1e-9)
        hard = not self.mask_searched or epoch >= self.mask_hard_at * self.epochs
        return float(self.beta_max ** min(t, 1.0)), hard

    def bit_schedule(self, epoch: float) -> float:
        """The bit gates' temperature. With --bit-beta-soft B_s (mixq's default, 2): B_s while
        the mask is searched, then geometrically from B_s to beta_max over the first half
        (BIT_ANNEAL) of the phase with the mask final (from --mask-hard-at to the end of the
        search), and beta_max for its second half, so every gate ends at the paper's beta_max
        and the hardened network is the relaxed one. At beta_max a digit still in the gate's
        transition region (|m| < 3 / 200) takes full normalized steps of 200 x lr in beta * m,
        and leaves it in a few steps; annealing to the last step left 0.05-0.17 % of the bit
        gates undecided on digits, and the hardened net 1.1 points (4 of 360 images) below the
        relaxed one in 2 of 6 runs; with the second half at beta_max, 0.006-0.03 %. Why the
        bits are soft first: the digits learn only while their gates are soft. With |m| <= 2 (--bit-logit-bound) a gate is a step
        (|beta_b * m| > 3) from beta_b ~ 1.5 on, and the gradient through a saturated sigmoid,
        sig'(beta_b * m) ~ e^-(beta_b * m), falls below Adam's epsilon (1e-8) from beta_b ~ 8:
        the digit never moves again. On the paper's curve that is 40 % into the search, and a
        short run stops learning there (the training loss of a 20-epoch ResNet-20 run was flat
        from epoch 9 on). At B_s = 2 the relaxed network trains as well as 4-bit STE; the
        anneal then hardens it while the undecided digits still adapt (README, "Why the search
        converges"). The mask keeps the paper's curve: it must be near a step when it becomes
        final. Without --bit-beta-soft (the paper), or with the mask never final
        (--mask-hard-at 1), and in the finetune phase (mask frozen, beta rewound), the bits
        follow beta."""
        window = self.anneal_window()
        if window is None or epoch >= self.epochs:
            return self.schedule(epoch)[0]
        start, length = window
        if epoch < start:
            return float(self.bit_beta_soft)
        u = min((epoch - start) / length, 1.0)
        return float(self.bit_beta_soft * (self.beta_max / self.bit_beta_soft) ** u)

    def anneal_window(self) -> tuple[float, float] | None:
        """(first epoch, epochs) of the bit gates' anneal (bit_schedule): from the step the mask is
        final, BIT_ANNEAL of the rest of the search; None when the bits follow beta."""
        if self.bit_beta_soft is None or self.mask_hard_at >= 1:
            return None
        start = self.mask_hard_at * self.epochs
        return start, (self.epochs - start) * BIT_ANNEAL

    def anneal_steps(self, steps_per_epoch: int) -> float | None:
        """Optimizer steps in the bit gates' anneal; None without one."""
        window = self.anneal_window()
        return None if window is None else window[1] * steps_per_epoch

    def advice(self, steps_per_epoch: int) -> list:
        steps = self.anneal_steps(steps_per_epoch)
        if steps is None or steps >= MIN_ANNEAL_STEPS:
            return []
        return [f"the bit gates anneal over {steps:.0f} optimizer steps ({self.epochs} search epochs x "
                f"{steps_per_epoch} steps x {1 - self.mask_hard_at:g} with the mask final x {BIT_ANNEAL}); "
                f"searches with fewer than {MIN_ANNEAL_STEPS} there have collapsed to chance: "
                "more epochs or a smaller --batch-size (README, 'Why the search converges')"]

    def on_step(self, epoch: float):
        self.beta, hard = self.schedule(epoch)
        layers = self.all_layers()
        if self._beta is None or self._beta.device != layers[0].scale.device:
            self._beta = layers[0].beta.new_tensor(self.beta)
            for layer in layers:
                layer._buffers["beta"] = self._beta
            if self.bit_beta_soft is not None:
                self._bit_beta = self._beta.new_tensor(1.0)
                for layer in layers:
                    layer.bit_beta = self._bit_beta
        self._beta.fill_(self.beta)
        self.bit_beta = self.bit_schedule(epoch)
        if self._bit_beta is not None:
            self._bit_beta.fill_(self.bit_beta)
        if self.min_layer_bits and not self.mask_frozen:     # while the mask can move, and as it is frozen
            for layer in self.layers():
                keep_min_bits(layer, self.min_layer_bits, max(self.mask_init, 0.2))
        if hard != self.mask_frozen:
            if hard and self.lam:
                self.meet_budget()
            for layer in self.layers():
                layer.freeze_mask(hard)
            self.mask_frozen = hard

    @torch.no_grad()
    def meet_budget(self):
        """At the step the mask becomes final: the budget met exactly, within one bit's step
        (bits=T: kept bits in all = floor(T * layers)). The budget term counts bits with a hard
        threshold and so holds the measure within a bit or two of the budget, flickering; this
        settles the last of it by the paper's own measure of how marginal a bit is: over
        budget, the kept bit with the smallest mask logit goes among those whose removal lowers
        the measure (never a layer's last bit, nor one the guard keeps; under size and bops
        only a bit at the edge of a layer's span lowers its storage); under budget, the dropped
        bit with the largest logit comes back while the measure stays within the budget (under
        size and bops one next to its layer's span: a bit inside it costs nothing and stays as
        the search left it, one further out would widen the span over dropped bits).
        Those logits sit next to 0, so the relaxed network hardly moves."""
        layers = self.layers()
        logits = torch.stack([layer.bit_mask_logits for layer in layers])            # [L, 8]
        kept = logits >= 0
        costs = self.costs or Costs.mean_bits(self.target, len(layers))    # prepared outside the loop: bits=T
        fits = lambda k: costs.fits(_allocation(k))                   # noqa: E731
        measure = lambda k: costs.measure(_allocation(k))             # noqa: E731
        while not fits(kept):
            movable = kept & (kept.sum(1, keepdim=True) > max(self.min_layer_bits, 1))
            if not costs.is_bits:
                now = measure(kept)
                for i in torch.nonzero(movable.view(-1)).flatten().tolist():
                    trial = kept.clone()
                    trial.view(-1)[i] = False
                    movable.view(-1)[i] = measure(trial) < now
            if not movable.any():
                break
            i = int(torch.where(movable, logits, float("inf")).argmin())
            kept.view(-1)[i] = False
        while True:                     # under budget: the best dropped bit that still fits comes back
            back = ~kept if costs.is_bits else _next_to_span(kept)
            added = False
            for i in torch.argsort(torch.where(back, logits, -float("inf")).view(-1), descending=True).tolist():
                if not back.view(-1)[i]:
                    break
                trial = kept.clone()
                trial.view(-1)[i] = True
                if fits(trial) and measure(trial) > measure(kept):
                    kept, added = trial, True
                    break
            if not added:
                break
        margin = max(self.mask_init, 0.2)
        for layer, k, m in zip(layers, kept, logits):
            layer.bit_mask_logits.copy_(torch.where(k == (m >= 0), m, torch.where(k, margin, -margin)))

    @torch.no_grad()
    def after_step(self):
        """--bit-logit-bound B: project the bit logits m_p, m_n back into [-B, B] after each
        step (0: unbounded). Not a change of the formula: a box constraint on its parameters.
        Adam's normalized steps keep pushing a digit that is right further into saturation,
        so unbounded |m| grows without limit and a digit that should flip later needs as many
        steps back; bounded, any digit is at most B/lr steps from flipping while |beta*m| still
        grows with beta to B*beta_max at the end of the search."""
        if self.bit_logit_bound:
            b = self.bit_logit_bound
            torch._foreach_clamp_min_(self._bit_logits, -b)
            torch._foreach_clamp_max_(self._bit_logits, b)

    def precision_counts(self) -> torch.Tensor:
        """Kept bits per layer (hard count), as a tensor: no host sync in the training step."""
        return torch.stack([layer.kept_mask().sum() for layer in self.layers()])

    def avg_precision(self) -> float:
        return float(self.precision_counts().float().mean())

    def storage_counts(self) -> torch.Tensor:
        """Storage bits per layer (span of the kept bits + sign), as a tensor: no host sync."""
        return _storage(torch.stack([layer.kept_mask() for layer in self.layers()]))

    def regularizer(self):
        """The paper's budget term, lam * (avg precision - T) * sum_layers sum_b sig(beta m_B[b]);
        under --budget size or bops, (avg precision - T) becomes the measure's excess in bits
        per layer (train.budget.Costs.excess) and each layer's sum is weighted by its share of
        the measure's cost, so a bit of a big layer weighs what it costs."""
        layers = self.layers()
        if self.mask_frozen:
            return torch.zeros((), device=layers[0].scale.device)
        penalties = torch.stack([layer.mask_penalty() for layer in layers])
        if self.costs is None or self.costs.is_bits:
            delta = self.precision_counts().float().mean() - self.target
            return self.lam * delta * penalties.sum()
        if self._cost_weights is None or self._cost_weights.device != penalties.device:
            self._cost_weights = penalties.new_tensor(self.costs.weights())
        delta = self.costs.excess(self.costs.measure_tensor(None, self.storage_counts()))
        return self.lam * delta * (penalties * self._cost_weights).sum()

    def harden(self, hard: bool = True):
        for layer in self.all_layers():
            layer.hard = hard

    def undecided(self) -> dict:
        """Share (%) of bit and mask gates not yet a step (|beta * m| < 3), over all layers."""
        u = torch.stack([layer.undecided() for layer in self.all_layers()]).sum(0).tolist()
        return {"undecided_bits": 100.0 * u[0] / max(u[1], 1), "undecided_masks": 100.0 * u[2] / max(u[3], 1)}

    def export_bits(self) -> list:
        rows = super().export_bits()
        for r in rows:
            r["fixed"] = r["name"] in self.fixed_layers
        return rows

    def bits_final_epoch(self) -> float | None:
        return self.epochs * self.mask_hard_at if self.mask_hard_at < 1 else None


class CSQUniform(CSQ):
    """The paper's Table IV "CSQ-Uniform": the bit-level relaxation of Eq. (3) at a fixed
    precision, no bit mask. `weight_bits` K counts the sign as --weight-bits does, so every
    layer keeps its top K-1 bit planes under a frozen (exact step) mask; there is no budget
    term. The top K-1 of 8 planes are the paper's K-1-bit representation with the scale
    multiplied by 2^(9-K)(2^(K-1)-1)/255, which s absorbs. The bit gates follow CSQ's
    bit_schedule: soft (--bit-beta-soft) until --mask-hard-at, then annealed to --beta-max."""
    name = "csq-uniform"
    mixed = False
    mask_searched = False
    warm_start = False
    options = tuple(o for o in CSQ.options if o.name in ("beta_max", "bit_beta_soft", "mask_hard_at", "beta_saturate",
                                                        "init_logit", "bit_logit_bound"))

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.weight_bits, cfg.epochs, cfg.beta_max, cfg.init_logit, cfg.beta_saturate,
                   cfg.bit_logit_bound, cfg.bit_beta_soft, cfg.mask_hard_at)

    def __init__(self, act_bits: int, weight_bits: int, epochs: int, beta_max: float = 200.0,
                 init_logit: float = 2.0, beta_saturate: float = 1.0, bit_logit_bound: float = 0.0,
                 bit_beta_soft: float | None = None, mask_hard_at: float = 1.0):
        super().__init__(act_bits, weight_bits - 1, epochs, 0, 0.0, beta_max, init_logit, 1.0, 0,
                         "budget", beta_saturate, mask_hard_at, (), bit_logit_bound, bit_beta_soft)

    def regularizer(self):
        return torch.zeros((), device=self.layers()[0].scale.device)

    def bits_final_epoch(self) -> float | None:
        return None                     # the mask is final from the start


def shortcut_layers(net) -> tuple:
    """Names of the convolutions on ResNet downsampling shortcuts (`shortcut` in the CIFAR
    ResNets, `downsample` in torchvision's), as quant_layers names them."""
    return tuple(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and any(p in ("shortcut", "downsample") for p in n.split(".")))


