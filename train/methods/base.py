"""What a quantization method is to the training loop: a small object with a narrow interface.

A method is one file in train/methods/ holding its quantized layers (drop-in nn.Modules that
answer `integer_weight()` and `bit_info()`, all freeze reads), its options and its Method
subclass, registered with one line in train/methods/__init__.py. The loop calls:

    prepare(model)      swap float layers for the method's quantized layers (in place)
    attach_data(x, y)   the calibration images (first training images), for methods that measure
    on_epoch(epoch)     at the start of every epoch (BSQ: re-quantize and adjust precision;
                        CLADO: allocate the bits when the search ends)
    on_step(epoch)      before every training step, `epoch` fractional (epoch + step/steps)
                        (CSQ: beta annealing, the mask becoming final, the min-bits guard)
    regularizer()       extra loss term (a tensor; 0 when the method has none)
    task_loss(logits, y, x)   the loss the regularizer is added to (cross entropy; SDQ: with
                        distillation from its float teacher once its bits are fixed)
    after_step()        after each optimizer step (CSQ: box on the bit logits; BSQ: keep bit
                        planes in [0, 2])
    set_budget(facts, budget)   before training (and on resume): what each layer's bits cost
                        (train.budget.layer_facts); a mixed method's budget (--budget) as
                        `self.costs` (train.budget.Costs), checked feasible
    before_training(sub_runs)   before the first epoch (and on resume): the checkpoints of the
                        runs `sub_runs(cfg)` asked for, trained first (SDQ: its float teacher)
    harden(hard)        switch to the exact integer weights used for evaluation and freeze
    export_bits()       per-layer bit report, from each layer's bit_info()
    advice(steps)       warnings about valid settings known to fail, printed when training starts

and reads from the class: `name` (--method NAME), `mixed` (searches per-layer bits under
--target-bits, else one --weight-bits for every layer), `options` (the TrainConfig fields and
`mixq train` flags it adds), `from_config(cfg, net)`, `check_options(cfg)`, the optimizer roles
of its parameters (`bit_params`, `gate_params`), `warm_start`, `needs_finetune`,
`default_finetune(epochs)` and `sub_runs(cfg)`."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mixq.train import quant
from mixq.train.budget import Costs


@dataclass(frozen=True)
class Option:
    """A training option a method adds: a TrainConfig field `name` and the `mixq train` flag
    --NAME-WITH-DASHES (or `flag`). A bool option is a switch (store_true). Methods that read
    the same option each declare it, with the same default; their help texts are joined.
    `kind`: the value's type where the default (None) does not tell it."""
    name: str
    default: object
    help: str
    flag: str | None = None
    kind: type | None = None

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def layer_report(model) -> list:
    rows = []
    for name, layer in quant.quant_layers(model):
        info = layer.bit_info()
        q, _ = layer.integer_weight()
        rows.append({"name": name, "params": int(q.numel()), "kept_bits": info.kept,
                     "precision": info.precision, "storage_bits": info.storage_bits})
    return rows


def bit_summary(layers: list) -> dict:
    """The bit figures of a layer_report (metrics.json): `avg_bits` is the paper's average
    precision (kept mask bits, mean over the searched layers; a fixed 8-bit shortcut is not
    counted) and `paper_comp` the paper's Comp = 32 / avg_bits; `storage_bits` is the honest
    bits per weight over every layer (span + sign, weighted by size) and `compression` =
    32 / storage_bits."""
    counted = [r for r in layers if not r.get("fixed")]
    params = sum(r["params"] for r in layers)
    storage = sum(r["params"] * r["storage_bits"] for r in layers) / params
    avg_bits = sum(r["precision"] for r in counted) / len(counted)
    return {"avg_bits": avg_bits, "paper_comp": 32.0 / avg_bits if avg_bits else None,
            "avg_bits_weighted": sum(r["params"] * r["precision"] for r in counted) / sum(r["params"] for r in counted),
            "storage_bits": storage, "compression": 32.0 / storage, "params": params}


class Method:
    name = "base"
    mixed = False           # searches per-layer bits under --target-bits (else --weight-bits everywhere)
    relaxes = False         # CSQ: the trained (relaxed) network differs from the hardened one
    options: tuple = ()     # Options this method reads (besides the common TrainConfig fields)
    # Optimizer roles of the method's parameters, by attribute name (train.loop.make_optimizers):
    # `bit_params` are trained by --bit-optimizer at --bit-lr, `gate_params` by SGD without weight
    # decay; every other parameter by SGD, with weight decay on weights (ndim > 1). --recipe paper
    # trains everything with one SGD.
    bit_params: tuple = ()
    gate_params: tuple = ()
    max_storage = 9         # a layer's storage bits at its most (8 kept bits + sign; STE-based: 8)
    warm_start = False      # may start from an 8-bit STE warm-up (--warmup-epochs)
    needs_finetune = False  # its bits are set when the finetune starts: >= 1 search and finetune epoch

    def __init__(self, act_bits: int):
        self.act_bits = act_bits
        self.model = None
        self.facts = None       # train.budget.LayerFacts per quantized layer (set_budget)
        self.costs = None       # mixed methods: train.budget.Costs of --budget (set_budget)

    # -- from the configuration --------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, net):
        """The method for a TrainConfig, before prepare(net)."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, cfg):
        """ConfigError (train.errors) for a bad value of one of this method's options; run for
        every registered method, whichever one trains."""

    @staticmethod
    def default_finetune(epochs: int) -> int:
        """Finetune epochs (bits fixed) when --finetune-epochs is not given; mixed methods only."""
        return 0

    @classmethod
    def sub_runs(cls, cfg) -> dict:
        """Runs to train before this one, each a TrainConfig by name: the loop trains each in
        RUN/NAME (reused when finished, resumed when killed) and hands their checkpoints to
        before_training. SDQ's --teacher-epochs: its float teacher."""
        return {}

    @classmethod
    def param_role(cls, param_name: str) -> str | None:
        """"bits", "gates" or None (a plain weight, bias, BN or clip parameter)."""
        attr = param_name.rsplit(".", 1)[-1]
        return "bits" if attr in cls.bit_params else "gates" if attr in cls.gate_params else None

    # -- during training -----------------------------------------------------------------
    def prepare(self, model):
        self.model = quant.swap_layers(model, self.convert, self.act_bits)
        return self.model

    def convert(self, module):
        raise NotImplementedError

    def layers(self):
        return [m for _, m in quant.quant_layers(self.model)]

    def attach_data(self, x, y):
        pass

    def fixed_names(self) -> tuple:
        """Quantized layers outside the search and the bit count (CSQ's --fixed-shortcuts)."""
        return ()

    def set_budget(self, facts: list, budget):
        """The layers' costs (train.budget.layer_facts, quant_layers order) and, for a mixed
        method, its budget (train.budget.Budget) as `self.costs`; ConfigError when no
        allocation can meet it."""
        self.facts = facts
        if self.mixed:
            self.costs = Costs(budget, facts)
            self.costs.check_feasible(self.max_storage)

    def before_training(self, sub_runs: dict):
        """Before the first epoch, and again on resume: {name: checkpoint path} of sub_runs()."""

    def on_epoch(self, epoch: int):
        pass

    def on_step(self, epoch: float):
        pass

    def regularizer(self):
        return torch.zeros(())

    def task_loss(self, logits, y, x):
        """The training loss of a batch (images x, labels y) before the regularizer is added."""
        return F.cross_entropy(logits, y)

    def after_step(self):
        pass

    def harden(self, hard: bool = True):
        pass

    def export_bits(self) -> list:
        return layer_report(self.model)

    def advice(self, steps_per_epoch: int) -> list:
        """Warnings about settings that are valid but known to fail (one line each), printed
        once when training starts: e.g. a search too short for CSQ's bit anneal."""
        return []

    def bits_final_epoch(self) -> float | None:
        """The (fractional) search epoch from which the bits no longer change, when that is
        before the search's end (CSQ's --mask-hard-at); None otherwise."""
        return None


# ----------------------------------------------------------------------------- the registry
METHODS: dict = {}              # --method name -> Method subclass, in registration order
_config_options: set | None = None   # option names TrainConfig was built with (see options())


def register(cls: type) -> type:
    """Make a Method subclass trainable as `--method cls.name`. Its options become TrainConfig
    fields and `mixq train` flags when registered before mixq.train.config builds TrainConfig
    (the registry lines in train/methods/__init__.py are); a method registered later may only
    read options that already exist."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method '{cls.name}' is registered already ({METHODS[cls.name].__qualname__})")
    new = {o.name for o in cls.options} - _config_options if _config_options is not None else set()
    if new:
        raise ValueError(f"method '{cls.name}': options {sorted(new)} must be registered before TrainConfig "
                         "is built (in train/methods/__init__.py)")
    METHODS[cls.name] = cls
    return cls


def options(seal: bool = False) -> dict:
    """name -> Option over the registered methods (help texts of a shared option joined).
    seal=True: TrainConfig is being built from them; later methods add no new ones."""
    global _config_options
    merged = {}
    for cls in METHODS.values():
        for o in cls.options:
            if o.name not in merged:
                merged[o.name] = o
                continue
            m = merged[o.name]
            if (m.default, m.type, m.cli_flag) != (o.default, o.type, o.cli_flag):
                raise ValueError(f"option '{o.name}': methods declare it with different defaults or flags")
            if o.help not in m.help.split("; "):
                merged[o.name] = replace(m, help=f"{m.help}; {o.help}")
    if seal:
        _config_options = set(merged)
    return merged
