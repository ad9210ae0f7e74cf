"""BSQ as a peer of CSQ: bit-level sparsity with a straight-through estimator.

Yang, Duan, Chen, Li, "BSQ: Exploring Bit-Level Sparsity for Mixed-Precision Neural Network
Quantization", ICLR 2021. Each layer's weight is written as 8 bit planes p[b], n[b] of
continuous values in [0, 2] (positive and negative part), kept bit span [lo, hi]:

    W = s/(2^8-1) * 2^lo * clip(round(sum_{b=lo..hi} (p[b] - n[b]) * 2^(b-lo)), +-(2^(hi-lo+1)-1))

with `round` passed straight through (the STE CSQ avoids), and a bit-level group Lasso,
alpha * sum_layers (params_l / params) * sum_b ||[p[b]; n[b]]||_2, pushes whole planes to 0.
At every epoch boundary of the search the planes are re-quantized to {0, 1} (the rounded
integer written again in binary) and precision is adjusted: a plane that is zero in every
weight is removed; the top one lowers the precision, the bottom one moves 2^lo into the scale
(BSQ's "re-quantization and precision adjustment"). The kept bits stay one contiguous span,
so precision = hi - lo + 1 and storage bits = precision + sign. The finetune phase keeps the
precision fixed and trains on (the paper's last phase).

Departure, so that BSQ and CSQ are compared on one budget: the paper picks alpha per run and
reports the precision it lands on. Here the budget (`--target-bits`, or `--budget` in size or
bops: train/budget.py) steers it: the group Lasso is on only while the model is over the
budget, and the precision adjustment follows a schedule from 8 bits down to the budget,
reached at 70% of the search. When the group Lasso has not emptied enough planes by then (a
few dozen epochs are far fewer than the paper's hundreds), the edge planes whose removal
raises the loss on a calibration batch (the first 128 training images) least per unit of the
budget's measure are removed. Every layer keeps >= 1 bit."""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.train.budget import Costs
from mixq.train.methods.base import Method, Option
from mixq.train.quant import N_BITS, BitInfo, float_twin, round_ste

LEVELS = 2 ** N_BITS - 1
CALIBRATION_IMAGES = 128        # first training images; the loss that ranks planes to remove


class BSQMixin:
    def _init_bsq(self):
        """8-bit planes of the float weight: q = round(w / max|w| * 255), s = max|w|, so the
        starting weight is w rounded to 8 bits."""
        w = self.weight.detach().float()
        del self.weight                                   # derived from the planes, not stored
        s = w.abs().max().clamp_min(1e-8)
        q = torch.round(w / s * LEVELS).long()
        self.scale = nn.Parameter(s.reshape(()).clone())
        self.bit_planes_pos = nn.Parameter(binary_planes(q.clamp(min=0)))
        self.bit_planes_neg = nn.Parameter(binary_planes((-q).clamp(min=0)))
        self.register_buffer("kept_low", torch.tensor(0, device=w.device))
        self.register_buffer("kept_high", torch.tensor(N_BITS - 1, device=w.device))
        self._span = (0, N_BITS - 1)      # mirrors the buffers: no device sync per step

    def span(self) -> tuple[int, int]:
        return self._span

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "kept_low" in self._buffers:           # not while from_float copies the float layer
            self._span = (int(self.kept_low), int(self.kept_high))

    def _digits_sum(self):
        lo, hi = self.span()
        coef = torch.zeros(N_BITS, device=self.scale.device)
        coef[lo:hi + 1] = 2.0 ** torch.arange(hi - lo + 1, device=self.scale.device)
        diff = self.bit_planes_pos - self.bit_planes_neg
        return torch.tensordot(coef, diff, dims=1), (1 << (hi - lo + 1)) - 1

    def step(self) -> torch.Tensor:
        """The weight of one integer step: s/255 * 2^lo (float32, as in the forward)."""
        return self.scale.abs() / LEVELS * 2 ** self._span[0]

    def bsq_weight(self):
        v, qmax = self._digits_sum()
        return torch.clamp(round_ste(v), -qmax, qmax) * self.step()

    @torch.no_grad()
    def integer_weight(self):
        v, qmax = self._digits_sum()
        q = torch.clamp(torch.round(v), -qmax, qmax).long()
        return q.cpu(), float(self.step().detach())

    def bit_info(self) -> BitInfo:
        lo, hi = self.span()
        return BitInfo.from_kept(range(lo, hi + 1))

    def group_lasso(self):
        """sum_b ||[p[b]; n[b]]||_2 over the kept planes."""
        lo, hi = self.span()
        planes = torch.cat([self.bit_planes_pos[lo:hi + 1].flatten(1), self.bit_planes_neg[lo:hi + 1].flatten(1)], 1)
        return planes.norm(dim=1).sum()

    @torch.no_grad()
    def clamp_planes(self):
        self.bit_planes_pos.clamp_(0, 2)
        self.bit_planes_neg.clamp_(0, 2)

    def _set_span(self, lo: int, hi: int):
        self.kept_low.fill_(lo)
        self.kept_high.fill_(hi)
        self._span = (lo, hi)

    @torch.no_grad()
    def requantize(self, lo: int, hi: int):
        """Write the current integer weight again as {0, 1} planes over the span [lo, hi]
        (clipping to its range, rounding to its lowest bit), keeping the scale."""
        q = respan(self.integer_weight()[0] << self._span[0], lo, hi).to(self.scale.device)
        self.bit_planes_pos.copy_(binary_planes(q.clamp(min=0)))
        self.bit_planes_neg.copy_(binary_planes((-q).clamp(min=0)))
        self._set_span(lo, hi)

    # one bit fewer or more, as BSQ moves a plane (train/sensitivity.py measures what each costs)
    @torch.no_grad()
    def one_bit_fewer(self):
        """(q, scale) with the bottom plane removed as BSQ's precision adjustment removes one:
        the integer weight rounded onto the span one plane narrower (respan); None at one plane."""
        lo, hi = self.span()
        if lo == hi:
            return None
        q = respan(self.integer_weight()[0] << lo, lo + 1, hi) >> (lo + 1)
        return q, float(self.scale.detach().abs() / LEVELS * 2 ** (lo + 1))

    @torch.no_grad()
    def one_bit_more(self):
        """(q, scale) with one plane more: below the span where there is one (half the step: the
        continuous planes' sum, which the forward rounds to the span, rounded one plane finer),
        else above it (the same step, twice the range); None with all 8 planes kept."""
        lo, hi = self.span()
        v, qmax = self._digits_sum()
        wider = 2 * qmax + 1
        if lo > 0:
            q = torch.clamp(torch.round(2 * v), -wider, wider)
            return q.long().cpu(), float(self.scale.detach().abs() / LEVELS * 2 ** (lo - 1))
        if hi < N_BITS - 1:
            return torch.clamp(torch.round(v), -wider, wider).long().cpu(), float(self.step().detach())
        return None

    @torch.no_grad()
    def removal_cost(self, lo: int, hi: int) -> float:
        """Relative L2 change of the weight if the span became [lo, hi] (0: the planes dropped are empty)."""
        q = self.integer_weight()[0] << self._span[0]
        return float((respan(q, lo, hi) - q).double().norm() / q.double().norm().clamp_min(1e-12))


def respan(q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integers q (in units of s/255) on the span [lo, hi]: rounded half up to a multiple of
    2^lo, clipped to +-(2^(hi-lo+1) - 1) * 2^lo."""
    step = 1 << lo
    qmax = (1 << (hi - lo + 1)) - 1
    return torch.div(q + (step >> 1), step, rounding_mode="floor").clamp(-qmax, qmax) << lo


def binary_planes(mag: torch.Tensor) -> torch.Tensor:
    """[8, *shape] float {0, 1}: the binary digits of a non-negative integer tensor < 256."""
    bits = torch.arange(N_BITS, device=mag.device).view(-1, *[1] * mag.ndim)
    return ((mag.unsqueeze(0) >> bits) & 1).float()


class BSQConv2d(BSQMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d):
        q = float_twin(cls, m)
        q._init_bsq()
        return q

    def forward(self, x):
        return self._conv_forward(x, self.bsq_weight(), self.bias)


class BSQLinear(BSQMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear):
        q = float_twin(cls, m)
        q._init_bsq()
        return q

    def forward(self, x):
        return F.linear(x, self.bsq_weight(), self.bias)


class BSQ(Method):
    """Search (group Lasso + precision adjustment each epoch), then finetune at fixed precision."""
    name = "bsq"
    mixed = True
    warm_start = True
    needs_finetune = True
    bit_params = ("bit_planes_pos", "bit_planes_neg")      # --bit-optimizer at --bit-lr
    options = (Option("lam", 0.01, "bsq: group-Lasso strength", flag="--lambda"),)

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam)

    @staticmethod
    def default_finetune(epochs: int) -> int:
        return epochs // 3

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 0.01, reach: float = 0.7):
        super().__init__(act_bits)
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.reach = lam, reach
        self.epoch = 0
        self.calibration = None

    def convert(self, m):
        return (BSQConv2d if isinstance(m, nn.Conv2d) else BSQLinear).from_float(m)

    def _costs(self) -> Costs:
        """The budget (set by the loop; bits=--target-bits for a model prepared outside it)."""
        if self.costs is None:
            self.costs = Costs.mean_bits(self.target, len(self.layers()))
        return self.costs

    def measure(self) -> float:
        """The budget's measure of the layers' current spans."""
        return self._costs().measure([(i.precision, i.storage_bits) for i in (l.bit_info() for l in self.layers())])

    def allowed(self, epoch: int) -> float:
        """The measure the schedule allows after the adjustment at `epoch`: from all 8 planes
        kept down to the budget, reached at `reach` of the search (bits=T: 8 -> T)."""
        t = min(1.0, epoch / max(1.0, self.reach * self.epochs))
        costs = self._costs()
        full = costs.measure([(N_BITS, N_BITS + 1)] * len(costs.per_bit))
        return full - (full - costs.budget.value) * t

    def on_epoch(self, epoch: int):
        self.epoch = epoch
        if 0 < epoch <= self.epochs:
            self.adjust(self.allowed(epoch))

    def attach_data(self, x, y):
        self.calibration = (x[:CALIBRATION_IMAGES], y[:CALIBRATION_IMAGES])

    @torch.no_grad()
    def adjust(self, allowed: float):
        """Re-quantize every layer to {0, 1} planes; drop empty edge planes while over the
        budget; then, down to `allowed`, the edge planes whose removal raises the loss on the
        calibration batch least per unit of the budget's measure saved (bits=T: every plane
        saves the same, so simply least): every candidate is measured once per round and the
        cheapest ones go, at most one per layer per round (a round costs two forward passes
        per layer, not two per layer per bit removed)."""
        layers = self.layers()
        costs = self._costs()
        for layer in layers:
            layer.requantize(*layer.span())
        budget = costs.budget.value * (1 + 1e-9)
        while self.measure() > budget:
            options = [(i, cand) for i, layer in enumerate(layers) if layer.span()[1] > layer.span()[0]
                       for cand in ((layer.span()[0], layer.span()[1] - 1), (layer.span()[0] + 1, layer.span()[1]))]
            if not options:
                break                                   # every layer is down to one bit
            empty = [(i, cand) for i, cand in options if layers[i].removal_cost(*cand) == 0]
            if empty:
                i, cand = empty[0]
                layers[i].requantize(*cand)
                continue
            target = max(allowed, costs.budget.value) * (1 + 1e-9)
            if self.measure() <= target:
                break
            base = self.loss_if(layers[0], None)        # the calibration loss as it is
            saving = [costs.per_bit[i] for i in range(len(layers))]
            ranked = sorted(options, key=lambda o: (self.loss_if(layers[o[0]], o[1]) - base) / saving[o[0]])
            done = set()
            for i, cand in ranked:
                if self.measure() <= target:
                    break
                if i not in done:
                    layers[i].requantize(*cand)
                    done.add(i)
        if not costs.is_bits and allowed <= costs.budget.value * (1 + 1e-9):
            self.fill(layers, costs)

    @torch.no_grad()
    def fill(self, layers, costs):
        """Under size or bops one plane of a big layer can be a fifth of the budget, so the last
        removal may land well below it: while the budget holds, every layer in turn, cheapest
        first, gets one more plane (below its span: an empty plane, a finer step the finetune
        can use). bits=T needs none: every plane costs the same, the removals land on it."""
        order = sorted(range(len(layers)), key=lambda i: costs.per_bit[i])
        grew = True
        while grew:
            grew = False
            for i in order:
                lo, hi = layers[i].span()
                if hi - lo + 1 >= N_BITS:
                    continue
                alloc = [(info.precision, info.storage_bits) for info in (layer.bit_info() for layer in layers)]
                alloc[i] = (alloc[i][0] + 1, alloc[i][1] + 1)
                if costs.fits(alloc):
                    layers[i].requantize(*((lo - 1, hi) if lo > 0 else (lo, hi + 1)))
                    grew = True

    def loss_if(self, layer, span) -> float:
        """Calibration loss with `layer` re-quantized to `span` (then restored; span None: the
        loss as it is); without calibration data, the relative L2 change of the layer's weights."""
        if self.calibration is None:
            return 0.0 if span is None else layer.removal_cost(*span)
        saved = (layer.span(), layer.bit_planes_pos.clone(), layer.bit_planes_neg.clone())
        if span is not None:
            layer.requantize(*span)
        device = layer.scale.device
        was_training = self.model.training
        self.model.eval()
        x, y = self.calibration
        value = float(F.cross_entropy(self.model(x.to(device)), y.to(device)))
        self.model.train(was_training)
        (lo, hi), pos, neg = saved
        layer.bit_planes_pos.copy_(pos)
        layer.bit_planes_neg.copy_(neg)
        layer._set_span(lo, hi)
        return value

    def regularizer(self):
        layers = self.layers()
        if self.epoch >= self.epochs or self.measure() <= self._costs().budget.value * (1 + 1e-9):  # finetune, or at budget
            return torch.zeros((), device=layers[0].scale.device)
        params = [layer.bit_planes_pos[0].numel() for layer in layers]
        total = sum(params)
        return self.lam * sum(p / total * layer.group_lasso() for p, layer in zip(params, layers))

    def after_step(self):
        for layer in self.layers():
            layer.clamp_planes()
