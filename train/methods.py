"""Mixed-precision methods: small objects with one narrow interface.

    prepare(model)      swap float layers for the method's quantized layers (in place)
    on_epoch(epoch)     per-epoch schedule (CSQ: beta annealing, finetune phase)
    regularizer()       extra loss term (a tensor; 0 when the method has none)
    export_bits()       per-layer bit report, from each layer's bit_info()
    harden()            switch to the exact integer weights used for evaluation and freeze
    attach_data(x, y)   the calibration images (first training images), for methods that measure
    after_step()        after each optimizer step (BSQ: keep bit planes in [0, 2])

Adding a method is one file with its layers and its Method subclass (train/bsq.py,
train/clado.py), registered in train/config.py's METHODS."""
from __future__ import annotations

import torch

from mixq.train import quant


def layer_report(model) -> list:
    rows = []
    for name, layer in quant.quant_layers(model):
        info = layer.bit_info()
        q, _ = layer.integer_weight()
        rows.append({"name": name, "params": int(q.numel()), "kept_bits": info.kept,
                     "precision": info.precision, "storage_bits": info.storage_bits})
    return rows


class Method:
    name = "base"

    def __init__(self, act_bits: int):
        self.act_bits = act_bits
        self.model = None

    def prepare(self, model):
        self.model = quant.swap_layers(model, self.convert, self.act_bits)
        return self.model

    def convert(self, module):
        raise NotImplementedError

    def layers(self):
        return [m for _, m in quant.quant_layers(self.model)]

    def on_epoch(self, epoch: int):
        pass

    def regularizer(self):
        return torch.zeros(())

    def export_bits(self) -> list:
        return layer_report(self.model)

    def harden(self, hard: bool = True):
        pass

    def state(self) -> dict:
        return {}

    def attach_data(self, x, y):
        pass

    def after_step(self):
        pass


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
    zeros and a plain CNN is dead. If fewer than k mask logits are >= 0, the largest negative
    ones are set to +margin (where kept bits start): not to 0, where the gate is most
    sensitive and the lifted bit would keep flickering, and late in the search (large beta)
    soak up most of the budget term's push. k = 0 disables the guard."""
    logits = layer.bit_mask_logits
    missing = k - int((logits >= 0).sum())
    if missing > 0:
        order = torch.argsort(torch.where(logits >= 0, -float("inf"), logits), descending=True)
        logits[order[:missing]] = margin


class CSQ(Method):
    """CSQ (Xiao et al., DAC 2023): bi-level continuous sparsification of weight bits.

    Weight: quant.CSQMixin, W = s/(2^n-1) sum_b (sig(beta m_p[b]) - sig(beta m_n[b])) 2^b sig(beta m_B[b]).

    Budget: lambda * (avg_precision - target) * sum_layers sum_b sig(beta * m_B[b]), with
    avg_precision the unweighted mean over layers of the hard count of kept bits
    (m_B[b] >= 0), so a model below budget is pushed to grow precision back.

    Temperature: beta = beta_max^(t/T), t the (fractional) epoch of the search phase, T its
    length. The loop calls on_epoch(epoch + step/steps) before every step, so beta grows
    smoothly per step instead of jumping 30% per epoch (on a small data set with few epochs a
    jump visibly shakes the gates); sampled at whole epochs it is the paper's curve. beta
    starts at beta0 = 1 and reaches beta_max at the end of the search; the finetune phase
    freezes the bit mask (exact unit steps), rewinds beta to 1 and anneals it again.

    Initialization (the choice that decides whether a weak budget term meets the budget):
    every layer starts *at* the budget, with initial_bits(target) bits per layer whose mean is
    the target. The layer's bit logits hold its float weight rounded to that many bits (best
    clip) in the top bit planes plus the rounding remainder in the low planes; m_B = +mask_init
    on the kept planes, -mask_init below. The relaxed weight at beta = 1 approximates the float
    weight (the dropped planes are half on), the hard weight is its best k-bit rounding, and
    the budget term only has to arbitrate bits moving between layers. Starting from all 8 bits
    (m_B = +c everywhere, or the paper code's 0) instead, every mask logit crosses zero at once
    when the budget term first bites; on digits that overshoots to ~1 bit and the run
    does not recover in a few dozen epochs.

    Guard (min_layer_bits, default 1; 0 turns it off): see keep_min_bits."""
    name = "csq"

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 0.01, beta_max: float = 200.0, init_logit: float = 2.0,
                 mask_init: float = 0.2, min_layer_bits: int = 1):
        super().__init__(act_bits)
        self.min_layer_bits = min_layer_bits
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.beta_max = lam, beta_max
        self.init_logit, self.mask_init = init_logit, mask_init
        self.beta, self.mask_frozen = 1.0, False

    def prepare(self, model):
        # swap_layers converts Conv2d/Linear in named_modules order: the same order as here
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        self._init_bits = iter(initial_bits(self.target, [m.weight.numel() for m in layers]))
        return super().prepare(model)

    def convert(self, m):
        cls = quant.CSQConv2d if isinstance(m, torch.nn.Conv2d) else quant.CSQLinear
        return cls.from_float(m, self.init_logit, self.mask_init, next(self._init_bits))

    def on_epoch(self, epoch: float):
        finetune = epoch >= self.epochs
        t, span = (epoch - self.epochs, self.finetune_epochs) if finetune else (epoch, self.epochs)
        self.beta = float(self.beta_max ** min(t / max(span, 1), 1.0))
        self.mask_frozen = finetune
        layers = self.layers()
        if self.min_layer_bits and not layers[0].frozen:      # while the mask can move, and as it is frozen
            short = (self.precision_counts() < self.min_layer_bits).nonzero().flatten().tolist()   # one sync
            for i in short:
                keep_min_bits(layers[i], self.min_layer_bits, self.mask_init)
        for layer in layers:
            layer.beta.fill_(self.beta)
            layer.freeze_mask(finetune)

    def precision_counts(self) -> torch.Tensor:
        """Kept bits per layer (hard count), as a tensor: no host sync in the training step."""
        return torch.stack([layer.kept_mask().sum() for layer in self.layers()])

    def avg_precision(self) -> float:
        return float(self.precision_counts().float().mean())

    def regularizer(self):
        layers = self.layers()
        if self.mask_frozen:
            return torch.zeros((), device=layers[0].scale.device)
        delta = self.precision_counts().float().mean() - self.target
        return self.lam * delta * torch.stack([layer.mask_penalty() for layer in layers]).sum()

    def harden(self, hard: bool = True):
        for layer in self.layers():
            layer.hard = hard

    def state(self) -> dict:
        return {"beta": self.beta, "avg_precision": self.avg_precision()}


class STEUniform(Method):
    """Fixed-precision QAT with a straight-through estimator (the paper's Table IV baseline)."""
    name = "ste-uniform"

    def __init__(self, act_bits: int, weight_bits: int):
        super().__init__(act_bits)
        self.weight_bits = weight_bits

    def convert(self, m):
        cls = quant.STEConv2d if isinstance(m, torch.nn.Conv2d) else quant.STELinear
        return cls.from_float(m, self.weight_bits)

