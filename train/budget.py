"""A mixed method's budget, in one of three measures, and what each layer's bits cost in it.

    bits=T    the papers' measure: mean precision (kept bits) over the searched layers; what
              --target-bits T means, and the default
    size=KIB  packed weight bytes: sum over layers of params x storage bits / 8, in KiB (the
              figure `mixq inspect` prints); storage bits = span of the kept bits + sign
    bops=G    bit operations: sum over layers of MACs x storage bits x input activation bits,
              in 10^9 (HAWQ-V3's and AIMET's measure of compute)

Every measure is a sum over layers of a per-layer weight times that layer's bits
(`Costs.per_bit`): 1/L of its precision for bits, params/8192 or MACs * act bits / 1e9 of its
storage bits for size and bops. Layers outside the search (CSQ's --fixed-shortcuts) count in
size and bops at their fixed bits and not in the mean of bits, as in the paper.

A method's budget term reads the budget through `Costs`: `excess(...)` is how far over the
budget an allocation is in "bits per unit of cost" (for bits=T exactly mean precision - T, so
CSQ's and BSQ's terms are the paper's there), `weights()` the per-layer factor of the term
(1 for every layer under bits=T, the layer's share of the cost otherwise)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq.train.errors import ConfigError

MEASURES = {"bits": "mean kept bits per layer", "size": "KiB of packed weights",
            "bops": "10^9 bit operations (MACs x weight bits x activation bits)"}
SIGN = 1                    # storage bits = magnitude bits (precision, when contiguous) + sign


@dataclass(frozen=True)
class Budget:
    measure: str
    value: float

    @classmethod
    def parse(cls, text: str, option: str = "--budget") -> "Budget":
        measure, sep, value = str(text).partition("=")
        if not sep or measure not in MEASURES:
            raise ConfigError(f"{option} {text}: expected bits=T, size=KIB or bops=G")
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"{option} {text}: '{value}' is not a number") from None
        if not v > 0:
            raise ConfigError(f"{option} {text}: must be > 0")
        if measure == "bits" and v > 8:
            raise ConfigError(f"{option} {text}: mean precision must be in (0, 8]")
        return cls(measure, v)

    def __str__(self) -> str:
        return f"{self.measure}={self.value:g}"


@dataclass(frozen=True)
class LayerFacts:
    """What a quantized layer's bits cost: its weights, its multiply-adds per image and the
    bits of the activation it reads."""
    name: str
    params: int
    macs: int
    act_bits: int
    fixed: bool = False         # outside the search (held at fixed_bits storage bits)
    fixed_bits: int = 9


def layer_facts(model, quant_layers, x, act_bits: int, fixed=()) -> list:
    """LayerFacts of `quant_layers` ([(name, module)]) from one forward pass of `model` on x
    (one image is enough): MACs from the output size, the input activation's bits from where
    it comes (the network input's quantizer: its own bits; anything else: act_bits)."""
    input_quant = getattr(model, "input_quant", None)
    seen, net_input = {}, {}
    hooks = []
    if input_quant is not None:
        hooks.append(input_quant.register_forward_hook(lambda m, i, o: net_input.setdefault("t", o)))
    shapes = {name: tuple(m.integer_weight()[0].shape) for name, m in quant_layers}     # BSQ has no .weight
    for name, m in quant_layers:
        def hook(mod, inputs, out, name=name):
            o, per_output = shapes[name][0], math.prod(shapes[name][1:])  # in_channels/groups x kh x kw
            macs = (out[0].numel() if out.dim() > 2 else o) * per_output
            from_input = "t" in net_input and inputs[0] is net_input["t"]
            seen[name] = (macs, getattr(input_quant, "bits", 8) if from_input else act_bits)
        hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [LayerFacts(name, math.prod(shapes[name]), *seen.get(name, (0, act_bits)), name in fixed)
            for name, m in quant_layers]


class Costs:
    """A budget and the facts of the layers it spans. An allocation is a list of (precision,
    storage bits) per searched layer, in the order of `searched`; the fixed layers add their
    constant share (size and bops only)."""

    def __init__(self, budget: Budget, facts: list):
        self.budget, self.facts = budget, list(facts)
        self.searched = [f for f in self.facts if not f.fixed]
        n = len(self.searched)
        if budget.measure == "bits":
            self.per_bit = [1.0 / n] * n
            self.fixed_measure = 0.0
        else:
            cost = (lambda f: f.params / 8192) if budget.measure == "size" else (lambda f: f.macs * f.act_bits / 1e9)
            self.per_bit = [cost(f) for f in self.searched]
            self.fixed_measure = sum(cost(f) * f.fixed_bits for f in self.facts if f.fixed)
        self.searched_cost = sum(self.per_bit)          # the measure's change for one bit in every searched layer
        self._weights = [c * n / self.searched_cost for c in self.per_bit]

    @classmethod
    def mean_bits(cls, target: float, n: int) -> "Costs":
        """bits=target over n layers: the budget of a method prepared outside the training loop
        (which knows no layer's facts), the papers' own."""
        return cls(Budget("bits", target), [LayerFacts(str(i), 0, 0, 0) for i in range(n)])

    @property
    def is_bits(self) -> bool:
        return self.budget.measure == "bits"

    def bits(self, precision: int, storage: int) -> int:
        """The bits a layer is counted with: precision under bits=T, storage bits otherwise."""
        return precision if self.is_bits else storage

    def measure(self, alloc) -> float:
        """The budget's measure of an allocation [(precision, storage bits)] of the searched layers."""
        return self.fixed_measure + sum(c * self.bits(p, s) for c, (p, s) in zip(self.per_bit, alloc))

    def measure_tensor(self, precision: torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
        """measure() on per-layer tensors, without a host sync (CSQ's budget term, every step);
        bits=T: precision.mean(), the paper's expression."""
        if self.is_bits:
            return precision.float().mean()
        return (storage.float() * storage.new_tensor(self.per_bit, dtype=torch.float32)).sum() + self.fixed_measure

    def excess(self, value):
        """(measure - budget) in bits per layer: mean precision - T under bits=T, the cost-
        weighted mean of storage bits over what the budget allows under size and bops."""
        if self.is_bits:
            return value - self.budget.value
        return (value - self.budget.value) / self.searched_cost

    def uniform_bits(self) -> float:
        """The bits every searched layer could have at the budget (bits=T: T; else storage
        bits, fractional)."""
        if self.is_bits:
            return self.budget.value
        return (self.budget.value - self.fixed_measure) / self.searched_cost

    def weights(self) -> list:
        """Per-layer factor of a budget term summed over the searched layers: 1 under bits=T,
        the layer's share of the cost (mean 1) under size and bops."""
        return list(self._weights)

    def fits(self, alloc) -> bool:
        return self.measure(alloc) <= self.budget.value * (1 + 1e-9)

    def check_feasible(self, max_storage: int, what: str = "--budget"):
        """ConfigError when no allocation of 1..8 kept bits per searched layer meets the budget:
        below every layer at 1 bit (storage 2) or above every layer at its most (storage
        max_storage: 9 when CSQ keeps all 8 bits, 8 for the STE-based methods)."""
        n = len(self.searched)
        lo, hi = self.measure([(1, 2)] * n), self.measure([(max_storage - 1, max_storage)] * n)
        unit = {"bits": "bits", "size": "KiB", "bops": "GBOPs"}[self.budget.measure]
        if self.budget.value < lo * (1 - 1e-9):
            raise ConfigError(f"{what} {self.budget}: below what 1 bit in every layer needs ({lo:.4g} {unit})")
        if self.budget.value > hi * (1 + 1e-9):
            raise ConfigError(f"{what} {self.budget}: above what {max_storage - 1} bits in every layer need "
                              f"({hi:.4g} {unit}); nothing to search")


def measures(rows: list, facts: list) -> dict:
    """metrics.json's three measures of a finished run's layer report (layer_report rows with
    precision and storage_bits): avg_bits (paper), weight_kib, gbops."""
    by_name = {f.name: f for f in facts}
    kib = sum(r["params"] * r["storage_bits"] for r in rows) / 8192
    gbops = sum(by_name[r["name"]].macs * by_name[r["name"]].act_bits * r["storage_bits"]
                for r in rows if r["name"] in by_name) / 1e9
    return {"weight_kib": kib, "gbops": gbops if facts else None}
