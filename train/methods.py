"""Mixed-precision methods: small objects with one narrow interface.

    prepare(model)      swap float layers for the method's quantized layers (in place)
    on_epoch(epoch)     per-epoch schedule (CSQ: beta annealing, finetune phase)
    regularizer()       extra loss term (a tensor; 0 when the method has none)
    export_bits()       per-layer bit report, from each layer's bit_info()
    harden()            switch to the exact integer weights used for evaluation and freeze

Adding a method (BSQ, SDQ, CLADO, ...) is one class here plus its layers in quant.py."""
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


class CSQ(Method):
    """CSQ (Xiao et al., DAC 2023): bi-level continuous sparsification of weight bits.

    beta follows beta_max^(t/T) over the search epochs, t counted per epoch, so the last
    search epoch trains at beta_max; the finetune phase freezes the bit mask, rewinds beta
    to 1 and anneals it again. The budget term is
        lambda * (avg_precision - target) * sum_layers sum_b sig(beta * m_B[b])
    with avg_precision the mean over layers of the hard count of kept mask bits, so a model
    below budget is pushed to grow precision back."""
    name = "csq"

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 0.01, beta_max: float = 200.0, init_logit: float = 2.0,
                 mask_init: float = 0.5):
        super().__init__(act_bits)
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.beta_max = lam, beta_max
        self.init_logit, self.mask_init = init_logit, mask_init
        self.beta = 1.0

    def convert(self, m):
        cls = quant.CSQConv2d if isinstance(m, torch.nn.Conv2d) else quant.CSQLinear
        return cls.from_float(m, self.init_logit, self.mask_init)

    def layers(self):
        return [m for _, m in quant.quant_layers(self.model)]

    def on_epoch(self, epoch: int):
        finetune = epoch >= self.epochs
        span, t = (self.finetune_epochs, epoch - self.epochs) if finetune else (self.epochs, epoch)
        self.beta = float(self.beta_max ** (t / max(span - 1, 1)))
        for layer in self.layers():
            layer.beta.fill_(self.beta)
            layer.mask_frozen.fill_(finetune)

    def avg_precision(self) -> float:
        layers = self.layers()
        return sum(layer.bit_info().precision for layer in layers) / len(layers)

    def regularizer(self):
        layers = self.layers()
        if bool(layers[0].mask_frozen):
            return torch.zeros((), device=layers[0].scale.device)
        delta = self.avg_precision() - self.target
        return self.lam * delta * sum(layer.mask_penalty() for layer in layers)

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


METHODS = {"csq": CSQ, "ste-uniform": STEUniform}
