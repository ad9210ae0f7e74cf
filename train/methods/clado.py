"""CLADO as a peer of CSQ: bit allocation from measured cross-layer sensitivities.

Deng, Wang, Ding, Sun, Zhang, Chu, Xie, "Mixed-Precision Quantization with Cross-Layer
Dependencies" (CLADO, 2023). A sensitivity-based method rather than a trained bit mask:

1. warm-up: train the network with 8-bit (7 magnitude bits) STE weights for the search epochs;
2. measure on a fixed calibration batch (the first 256 training images, eval mode) the loss
   change of quantizing layer i alone to precision b, Omega_ii(b) = L(i:b) - L, and of every
   pair, Omega_ij(b, b') = L(i:b, j:b') - L(i:b) - L(j:b') + L (the cross-layer term that sets
   CLADO apart from per-layer methods such as HAWQ);
3. choose per-layer precisions minimizing sum_i Omega_ii(b_i) + sum_{i<j} Omega_ij(b_i, b_j)
   subject to the budget: mean precision <= --target-bits (the same budget CSQ's avg_bits
   reports), or --budget size=KIB / bops=G (train/budget.py);
4. finetune at those precisions (STE) for the finetune epochs.

Departures: the paper solves the integer quadratic program with a solver (CVXPY/Gurobi) over
a model-size budget; here the candidates are the 5 precisions around the budget's uniform
precision and the program is solved exactly by enumeration when there are <= 200k
assignments, otherwise by local search (moving bits between layer pairs) from a greedy descent
and from the most uniform assignment, keeping the better (the optimum is not guaranteed for
big nets). The default budget is the mean precision per layer, as for CSQ and BSQ, so the
three compare on one number; --budget size=KIB is the paper's own kind. A layer's scale at
precision b is the clip minimizing its weights' rounding error
(quant.best_clip), both when measuring and when switching."""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mixq.train import quant
from mixq.train.budget import Costs
from mixq.train.methods.base import Method
from mixq.train.methods.ste import PER_CHANNEL, STEConv2d, STELinear

WARMUP_BITS = 8                 # storage bits during warm-up: 7 magnitude bits, the STE ceiling
CALIBRATION_IMAGES = 256


class CLADOMixin:
    """An STE layer whose bit-width is a buffer, so a checkpoint carries the allocation."""

    def _init_clado(self):
        self.register_buffer("bits", torch.tensor(self.weight_bits, device=self.weight.device))
        self.register_buffer("searched", torch.tensor(False, device=self.weight.device))

    @torch.no_grad()
    def fitted_scale(self, bits: int) -> torch.Tensor:
        """The scale at `bits` storage bits that best fits the current weights (quant.best_clip)."""
        return quant.best_clip(self.weight.detach(), bits - 1, self.scale.ndim > 0) / (2 ** (bits - 1) - 1)

    def set_bits(self, bits: int):
        """Switch to `bits` storage bits with the scale that best fits the current weights."""
        with torch.no_grad():
            self.weight_bits = int(bits)
            self.bits.fill_(int(bits))
            self.scale.copy_(self.fitted_scale(bits))

    def at_bits(self, bits: int):
        """(q, scale) of the weights at `bits` storage bits as set_bits would make them (the
        layer itself unchanged); a per-channel scale is a list."""
        return self.integer_weight(bits, self.fitted_scale(bits))

    # one bit fewer or more, as CLADO switches a layer's precision (train/sensitivity.py)
    def one_bit_fewer(self):
        """(q, scale) one magnitude bit lower, re-fitted as CLADO switches precision (set_bits);
        None at one magnitude bit."""
        return self.at_bits(self.weight_bits - 1) if self.weight_bits > 2 else None

    def one_bit_more(self):
        """(q, scale) one magnitude bit higher, likewise; None at CLADO's ceiling (WARMUP_BITS)."""
        return self.at_bits(self.weight_bits + 1) if self.weight_bits < WARMUP_BITS else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "bits" in self._buffers:               # not while from_float copies the float layer
            self.weight_bits = int(self.bits)

    @classmethod
    def from_float(cls, m, bits: int = WARMUP_BITS, per_channel: bool = False):
        q = super().from_float(m, bits, per_channel)          # STEConv2d / STELinear
        q._init_clado()
        return q


class CLADOConv2d(CLADOMixin, STEConv2d):
    pass


class CLADOLinear(CLADOMixin, STELinear):
    pass


def candidates(target: float) -> list:
    """Five precisions (magnitude bits, 1..7) around the target."""
    lo = max(1, min(int(target) - 2, 7 - 4))
    return list(range(lo, lo + 5))


def solve(diag: dict, cross: dict, n: int, choices: list, costs: Costs) -> list:
    """argmin over assignments b (precisions within the budget `costs`) of
    sum_i diag[i, b_i] + sum_{i<j} cross[i, j, b_i, b_j]."""
    def fits(b):
        return costs.fits([(p, p + 1) for p in b])

    def cost(b):
        return sum(diag[i, b[i]] for i in range(n)) + sum(cross[i, j, b[i], b[j]] for i in range(n) for j in range(i + 1, n))

    if len(choices) ** n <= 200_000:
        feasible = [b for b in itertools.product(choices, repeat=n) if fits(b)]
        return list(min(feasible, key=cost)) if feasible else [min(choices)] * n
    saving = costs.per_bit
    b = [max(choices)] * n                        # greedy: lower the bit whose cost rises least per unit saved
    while not fits(b):
        base = cost(b)
        moves = [((cost(b[:i] + [lower] + b[i + 1:]) - base) / (saving[i] * (b[i] - lower)), i, lower)
                 for i in range(n) for lower in [c for c in choices if c < b[i]][-1:]]
        if not moves:
            break
        _, i, lower = min(moves)
        b[i] = lower
    # the most uniform assignment within the budget is the other start
    even = [max([c for c in choices if fits([c] * n)] or [min(choices)])] * n
    starts = [b] + ([even] if fits(even) else [])
    return min((exchange(s, cost, choices, fits) for s in starts), key=cost)


def exchange(b: list, cost, choices: list, fits) -> list:
    """Local search: move 1 or 2 bits from one layer to another while the cost falls and the
    budget holds."""
    b, best, improved = list(b), cost(b), True
    while improved:
        improved = False
        for i, j in itertools.permutations(range(len(b)), 2):
            for d in (1, 2):
                if b[i] + d in choices and b[j] - d in choices:
                    trial = list(b)
                    trial[i] += d
                    trial[j] -= d
                    if not fits(trial):
                        continue
                    c = cost(trial)
                    if c < best - 1e-12:
                        b, best, improved = trial, c, True
    return b


class CLADO(Method):
    name = "clado"
    mixed = True
    needs_finetune = True
    max_storage = WARMUP_BITS
    options = (PER_CHANNEL,)

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.per_channel)

    @staticmethod
    def default_finetune(epochs: int) -> int:
        return epochs // 3

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 per_channel: bool = False):
        super().__init__(act_bits)
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.per_channel = per_channel
        self.calibration = None
        self.done = False               # allocated (also read back from the layers on resume)

    def convert(self, m):
        if isinstance(m, nn.Conv2d):
            return CLADOConv2d.from_float(m, per_channel=self.per_channel)
        return CLADOLinear.from_float(m)                        # ste.PER_CHANNEL: linear layers per layer

    def attach_data(self, x, y):
        self.calibration = (x[:CALIBRATION_IMAGES], y[:CALIBRATION_IMAGES])
        self.done = bool(self.layers()[0].searched)

    def on_epoch(self, epoch: int):
        if epoch >= self.epochs and self.finetune_epochs and not self.done:
            self.allocate()
            self.done = True

    @torch.no_grad()
    def allocate(self):
        layers = self.layers()
        costs = self.costs or Costs.mean_bits(self.target, len(layers))
        uniform = costs.uniform_bits() - (0 if costs.is_bits else 1)       # as a precision
        n, choices = len(layers), candidates(uniform)
        device = layers[0].weight.device
        x, y = (t.to(device) for t in self.calibration)
        was_training = self.model.training
        self.model.eval()
        warm = [layer.scale.detach().clone() for layer in layers]
        scales = {(i, p): layer.fitted_scale(p + 1) for i, layer in enumerate(layers) for p in choices}

        def use(i, p, scale):
            layers[i].weight_bits = p + 1
            layers[i].scale.copy_(scale)

        def loss(setting: dict) -> float:
            for i, p in setting.items():
                use(i, p, scales[i, p])
            value = float(F.cross_entropy(self.model(x), y))
            for i in setting:
                use(i, WARMUP_BITS - 1, warm[i])
            return value

        base = loss({})
        single = {(i, p): loss({i: p}) for i in range(n) for p in choices}
        diag = {(i, p): single[i, p] - base for i in range(n) for p in choices}
        cross = {}
        pairs = [(i, j, p, q) for i in range(n) for j in range(i + 1, n) for p in choices for q in choices]
        for i, j, p, q in tqdm(pairs, desc="clado: cross-layer sensitivities", unit="eval", leave=False):
            cross[i, j, p, q] = loss({i: p, j: q}) - single[i, p] - single[j, q] + base
        precisions = solve(diag, cross, n, choices, costs)
        if dist.is_initialized():       # every rank takes rank 0's choice (GPU sums may differ)
            t = torch.tensor(precisions, device=device)
            dist.broadcast(t, 0)
            precisions = t.tolist()
        for layer, p in zip(layers, precisions):
            layer.set_bits(p + 1)
            layer.searched.fill_(True)
        self.model.train(was_training)
