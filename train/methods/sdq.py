"""SDQ as a peer of CSQ: stochastic differentiable quantization between adjacent bit-widths.

Huang, Shen, Li, Liu, Hu, Wicaksana, Xing, Cheng, "SDQ: Stochastic Differentiable Quantization
with Mixed Precision", ICML 2022 (arXiv 2206.04459). What was read of the paper here is its
abstract (../shared/papers/sdq-icml2022-abstract.txt): "Differentiable Bitwidth Parameters
(DBPs) are employed as the probability factors in stochastic quantization between adjacent
bitwidth choices. After the optimal MPQ strategy is acquired, we further train our network with
Entropy-aware Bin Regularization and knowledge distillation." The paper's equations (its
stochastic quantizer, its bit-width regularization, its rule for the final bits, its EBR and
distillation losses) were not available to this implementation: every formula below is mixq's
reading of those sentences, a mixq decision, stated as such.

Search (the first --epochs minus --finetune-epochs). Every layer's weight is the symmetric
uniform quantizer at k storage bits (the sign counted, as --weight-bits counts it) over a learned
clip c, the rounding passed straight through:

    Q_k(w) = s_k * clamp(round(w / s_k), -(2^(k-1) - 1), 2^(k-1) - 1),   s_k = c / (2^(k-1) - 1)

A layer holds a pair of adjacent bit-widths (b, b - 1) and its DBP p in [0, 1]. Each training
step draws, per layer, Q_b(w) with probability p, else Q_{b-1}(w); the gradient to p is that of
the expected weight, d w_q / d p = Q_b(w) - Q_{b-1}(w) (stochastic_weight). Every layer starts
at b = 8, p = 1 (7 magnitude bits, the STE ceiling); when p reaches 0 the layer is at b - 1 for
sure and its pair moves down, (b - 1, b - 2) with p = 1: the same weight, one bit lower reachable
(down to 2 storage bits; a pair never moves up). The DBPs train as CSQ's mask logits do: SGD at
--lr without weight decay, so the budget term and the task loss weigh against each other by
their true sizes (Adam's normalized steps moved every DBP at one pace, whatever its layer's cost).

Budget term (mixq's): the layers' expected bits, b - 1 + p, in the --budget's measure
(train.budget.Costs: bits, size or bops), against an allowance that falls from every layer at 8
bits to the budget over the first 70 % of the search (as mixq's BSQ schedule does). With e the
excess over the allowance in bits per layer (Costs.excess; 0 when under it) and L the number of
layers, the term is --sdq-lambda * L / 2 * e^2: each DBP is pushed down with lambda * e * its
layer's share of the cost (1 under bits=T; CSQ's lambda * excess * share), harder the further
the search lags, and not at all under the allowance, where the task loss alone moves the DBPs.

Bits fixed (mixq's rule) when the search ends: each layer takes the more probable of its pair
(b if p >= 1/2, else b - 1); over the budget, the layer whose expected bits support its bits least
per unit of cost saved loses one, until the budget holds; under it, the layer whose expected bits
lean most above its bits gains one while the budget still holds (so the run ends within the
budget and close below it).

Fixed-bit phase (the --finetune-epochs): the weights train at those bits (STE, the clip learned
with LSQ's gradient scale) with
  - EBR, mixq's: bin regularization (each quantization bin's weights pulled together onto their
    level: the squared distance of the bin's mean from the level plus the bin's variance, in
    units of the layer's step), each bin weighted by its share of the entropy of the layer's
    quantized weights, -p_k log p_k / H (p_k the share of weights in bin k), so the bins that
    carry the information weigh most and empty ones nothing; mean over layers, times --ebr-weight;
  - distillation from a float teacher (--teacher CKPT: float weights of the same model, as
    --init-from takes them; or --teacher-epochs N: a sub-run in RUN/teacher trains one first,
    8-bit STE weights and float activations, whose float weights make the teacher): the task loss
    becomes (1 - a) CE + a T^2 KL(softmax(t / T) || softmax(z / T)), a = --kd-weight,
    T = --kd-temperature, t the teacher's logits, z the student's. Without a teacher, CE.

Activations stay at --act-bits, as for the other methods: mixq searches the weights' bits.

Departures from the paper: none can be named against its equations, which were not read; what
is mixq's own beyond the abstract's sentences is all of the above: the per-layer draw and the
expectation's gradient, the pair moving down and never up, the budget term with its allowance
schedule, the rule fixing the bits (most probable, then the budget met and filled), the EBR
formula (bin regularization weighted by entropy shares), the distillation loss's form and
defaults, and a teacher made by a short 8-bit STE run."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq.models import build_model, model_source
from mixq.train.budget import Costs
from mixq.train.errors import ConfigError
from mixq.train.floatweights import load_float_weights
from mixq.train.methods.base import Method, Option
from mixq.train.quant import BitInfo, float_twin, round_ste

TOP_BITS = 8            # storage bits every layer starts the search at: 7 magnitude bits, the STE ceiling
LOW_BITS = 2            # the fewest: one magnitude bit and the sign
REACH = 0.7             # the budget term's allowance reaches the budget at this share of the search
CLIP_EPS = 1e-12        # keeps a clip learned to 0 from dividing by 0
TOP_LEVEL = 2 ** (TOP_BITS - 1) - 1     # bins of EBR: levels -127..127 cover every bit-width


# ----------------------------------------------------------------------------- the formulas
def uniform_weight(w: torch.Tensor, clip: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Q_k(w) = s_k * clamp(round(w / s_k), -(2^(k-1)-1), 2^(k-1)-1), s_k = (clip + eps) / (2^(k-1)-1),
    k = bits storage bits; round passed straight through."""
    qmax = 2.0 ** (bits - 1) - 1
    step = (clip + CLIP_EPS) / qmax
    return round_ste(torch.clamp(w / step, -qmax, qmax)) * step


def stochastic_weight(w, clip, bits, prob, draw) -> torch.Tensor:
    """The search's weight: Q_b(w) if draw < prob (the DBP), else Q_{b-1}(w); draw is one uniform
    sample in [0, 1) for the layer. Its value is exactly the one drawn; its gradient to the DBP is
    that of the expectation prob Q_b + (1 - prob) Q_{b-1}: Q_b(w) - Q_{b-1}(w)."""
    upper, lower = uniform_weight(w, clip, bits), uniform_weight(w, clip, bits - 1)
    return torch.where(draw < prob, upper, lower) + (prob - prob.detach()) * (upper - lower)


def entropy_bin_regularizer(w: torch.Tensor, step: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """mixq's EBR of one layer, in units of its step s (held constant: a growing step would
    shrink every bin's spread for free): u = w / s falls in bin k = clamp(round(u), +-qmax);
    sum_k h_k / H * ((mean_k(u) - k)^2 + var_k(u)), h_k = -p_k log p_k, p_k the share of the
    layer's weights in bin k, H = sum_k h_k (a layer all in one bin: that bin alone). A weight
    beyond the clip counts at the edge of the last bin, +-(qmax + 1/2): the clip, which the task
    loss learns, sets the range, not this term."""
    u = torch.clamp((w / step.detach()).flatten(), -qmax - 0.5, qmax + 0.5)
    index = (torch.clamp(torch.round(u.detach()), -qmax, qmax) + TOP_LEVEL).long()
    bins = u.new_zeros(2 * TOP_LEVEL + 1)
    count = bins.index_add(0, index, torch.ones_like(u))
    size = count.clamp_min(1)
    mean = bins.index_add(0, index, u) / size
    var = bins.index_add(0, index, (u - mean[index]) ** 2) / size
    share = count / u.numel()
    entropy = torch.where(count > 0, -share * torch.log(share.clamp_min(1e-30)), bins)
    weight = entropy + 1e-6 * (count > 0)               # the 1e-6: a single occupied bin still counts
    levels = torch.arange(-TOP_LEVEL, TOP_LEVEL + 1, device=u.device, dtype=u.dtype)
    return (weight / weight.sum() * ((mean - levels) ** 2 + var)).sum()


# ----------------------------------------------------------------------------- the layers
class SDQMixin:
    """A uniform weight quantizer with a pair of adjacent bit-widths (`bits` = b, b - 1) and its
    DBP (`bit_prob`) while searching; one bit-width (`bits`) once fixed. Buffers, so a checkpoint
    carries the search's state."""

    @classmethod
    def from_float(cls, m):
        """The layer (SDQConv2d, SDQLinear) of the float layer m, at the start of the search."""
        q = float_twin(cls, m)
        q._init_sdq()
        return q

    def _init_sdq(self):
        device = self.weight.device
        self.clip = nn.Parameter(self.weight.detach().abs().max().clamp_min(1e-8).reshape(()).clone())
        self.bit_prob = nn.Parameter(torch.ones((), device=device))
        self.register_buffer("bits", torch.tensor(TOP_BITS, device=device))
        self.register_buffer("searching", torch.tensor(True, device=device))
        self._searching = True          # mirrors the buffer: no device sync per step
        self.hard = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "searching" in self._buffers:          # not while from_float copies the float layer
            self._searching = bool(self.searching)

    def _clip(self, bits: torch.Tensor) -> torch.Tensor:
        """|clip|, with LSQ's gradient scale 1/sqrt(numel * qmax) on the step carried over to the
        clip c = qmax * step: qmax^1.5 / sqrt(numel) (the value is exactly |clip|)."""
        g = (2.0 ** (bits - 1) - 1) ** 1.5 / math.sqrt(self.weight.numel())
        a = self.clip.abs()
        return a.detach() + (a * g - (a * g).detach())

    def chosen_bits(self) -> torch.Tensor:
        """The bits the layer is evaluated and frozen at: the fixed ones; while searching, the
        more probable of its pair (b if the DBP >= 1/2, else b - 1)."""
        if not self._searching:
            return self.bits
        return self.bits - (self.bit_prob.detach() < 0.5).long()

    def expected_bits(self) -> torch.Tensor:
        """Expected storage bits, b - 1 + DBP (differentiable in the DBP); the fixed bits once fixed."""
        return self.bits - 1 + self.bit_prob if self._searching else self.bits.float()

    def sdq_weight(self):
        if self._searching and self.training and not self.hard:
            draw = torch.rand((), device=self.weight.device)
            return stochastic_weight(self.weight, self._clip(self.bits), self.bits, self.bit_prob, draw)
        bits = self.chosen_bits()
        return uniform_weight(self.weight, self._clip(bits), bits)

    @torch.no_grad()
    def move_down(self):
        """After a step: the DBP back into [0, 1]; at 0 (b - 1 for sure) the pair becomes (b - 1, b - 2)
        with DBP 1, the same weight (not below 2 storage bits). Tensor ops: no device sync."""
        self.bit_prob.clamp_(0, 1)
        down = (self.bit_prob <= 0) & (self.bits > LOW_BITS + 1)
        self.bits.sub_(down.long())
        self.bit_prob.copy_(torch.where(down, torch.ones_like(self.bit_prob), self.bit_prob))

    @torch.no_grad()
    def fix(self, bits: int):
        self.bits.fill_(bits)
        self.searching.fill_(False)
        self._searching = False

    def bin_regularizer(self) -> torch.Tensor:
        qmax = 2.0 ** (self.bits - 1) - 1
        return entropy_bin_regularizer(self.weight, (self.clip.abs() + CLIP_EPS) / qmax, qmax)

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept(range(int(self.chosen_bits()) - 1))

    @torch.no_grad()
    def integer_weight(self, bits: int | None = None):
        """(q, s) with sdq_weight() == s * q exactly when not drawing: the same float32 step and
        rounding (at `bits` storage bits instead of the chosen ones: the sensitivity moves)."""
        bits = self.chosen_bits() if bits is None else self.bits.new_tensor(bits)
        qmax = 2.0 ** (bits - 1) - 1
        step = (self.clip.detach().abs() + CLIP_EPS) / qmax
        q = torch.clamp(torch.round(self.weight.detach() / step), -qmax, qmax).long()
        return q.cpu(), float(step)


    def one_bit_fewer(self):
        """(q, scale) at one storage bit fewer, the float weight re-quantized over the same clip
        as SDQ's lower bit-width of a pair is; None at its fewest (LOW_BITS)."""
        bits = int(self.chosen_bits())
        return self.integer_weight(bits - 1) if bits > LOW_BITS else None

    def one_bit_more(self):
        """(q, scale) at one storage bit more, likewise; None at its most (TOP_BITS)."""
        bits = int(self.chosen_bits())
        return self.integer_weight(bits + 1) if bits < TOP_BITS else None


class SDQConv2d(SDQMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.sdq_weight(), self.bias)


class SDQLinear(SDQMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.sdq_weight(), self.bias)


# ----------------------------------------------------------------------------- the method
def load_teacher(path: str, model: str, num_classes: int) -> nn.Module:
    """The float zoo (or user) net `model` with the float weights of `path`, in eval mode, frozen."""
    net = build_model(model, num_classes, model_source(model))
    load_float_weights(net, path, model, "--teacher")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class SDQ(Method):
    """Search with DBPs between adjacent bit-widths, bits fixed, then EBR and distillation (module docstring)."""
    name = "sdq"
    mixed = True
    needs_finetune = True
    max_storage = TOP_BITS
    gate_params = ("bit_prob",)     # SGD at --lr without weight decay, as CSQ's mask logits
    options = (
        Option("sdq_lambda", 1.0, "sdq: budget-term strength on the DBPs' expected cost over the allowance"),
        Option("ebr_weight", 0.1, "sdq: entropy-aware bin regularization strength, fixed-bit phase"),
        Option("kd_weight", 0.5, "sdq: share of the distillation loss in the fixed-bit phase (with a teacher)"),
        Option("kd_temperature", 1.0, "sdq: distillation temperature"),
        Option("teacher", None, "sdq: float teacher for distillation: a mixq checkpoint of the same model keeping "
               "float weights (ste-uniform, clado, sdq) or the net's plain state dict", kind=str),
        Option("teacher_epochs", 0, "sdq: first train a float teacher for N epochs in RUN/teacher (8-bit STE "
               "weights, float activations; reused if finished)"),
    )

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.sdq_lambda, cfg.ebr_weight,
                   cfg.kd_weight, cfg.kd_temperature, cfg.teacher, (cfg.model, cfg.num_classes))

    @classmethod
    def check_options(cls, cfg):
        ours = cfg.method == cls.name
        if (cfg.teacher or cfg.teacher_epochs) and not ours:
            flag = "--teacher" if cfg.teacher else "--teacher-epochs"
            raise ConfigError(f"{flag}: for sdq (--method {cfg.method} trains without a teacher)")
        if cfg.teacher_epochs < 0:
            raise ConfigError(f"--teacher-epochs {cfg.teacher_epochs}: must be >= 0")
        if cfg.teacher and cfg.teacher_epochs:
            raise ConfigError(f"--teacher {cfg.teacher} and --teacher-epochs {cfg.teacher_epochs}: give one of them")
        if cfg.teacher and not Path(cfg.teacher).is_file():
            raise ConfigError(f"--teacher {cfg.teacher}: no such file")
        if cfg.sdq_lambda < 0 or cfg.ebr_weight < 0:
            raise ConfigError(f"--sdq-lambda {cfg.sdq_lambda} and --ebr-weight {cfg.ebr_weight}: must be >= 0")
        if not 0 <= cfg.kd_weight <= 1:
            raise ConfigError(f"--kd-weight {cfg.kd_weight}: must be in [0, 1]")
        if not cfg.kd_temperature > 0:
            raise ConfigError(f"--kd-temperature {cfg.kd_temperature}: must be > 0")

    @staticmethod
    def default_finetune(epochs: int) -> int:
        return epochs // 3

    @classmethod
    def sub_runs(cls, cfg) -> dict:
        """--teacher-epochs N: the teacher's run, 8-bit STE weights and float activations."""
        if cfg.method != cls.name or not cfg.teacher_epochs:
            return {}
        return {"teacher": replace(cfg, method="ste-uniform", weight_bits=8, act_bits=32, epochs=cfg.teacher_epochs,
                                   finetune_epochs=None, warmup_epochs=0, budget=None, teacher=None,
                                   teacher_epochs=0)}

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 1.0, ebr_weight: float = 0.1, kd_weight: float = 0.5, kd_temperature: float = 1.0,
                 teacher: str | None = None, model_spec: tuple = ("digits-cnn", 10)):
        super().__init__(act_bits)
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.ebr_weight = lam, ebr_weight
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.teacher_path, self.model_spec = teacher, model_spec     # (model name, classes): the teacher's net
        self.teacher = None
        self.progress = 0.0             # the (fractional) epoch of the last step

    def convert(self, m):
        return (SDQConv2d if isinstance(m, nn.Conv2d) else SDQLinear).from_float(m)

    @property
    def fixed(self) -> bool:
        """The bits are fixed (the search is over; read back from the layers on resume)."""
        return not self.layers()[0]._searching

    def _costs(self) -> Costs:
        """The budget (set by the loop; bits=--target-bits for a model prepared outside it)."""
        if self.costs is None:
            self.costs = Costs.mean_bits(self.target, len(self.layers()))
        return self.costs

    def before_training(self, sub_runs: dict):
        """The float teacher, from --teacher or the teacher sub-run (again on resume). `mixq train`
        calls this; the Python API's fit does not: there SDQ trains without a teacher."""
        path = self.teacher_path or sub_runs.get("teacher")
        if path:
            self.teacher = load_teacher(path, *self.model_spec)

    def on_epoch(self, epoch: int):
        if epoch >= self.epochs and not self.fixed:
            self.fix_bits()

    def on_step(self, epoch: float):
        self.progress = epoch

    def allowance(self) -> float:
        """What the budget term allows now: from every layer at 8 bits down to the budget, reached
        at REACH of the search."""
        costs = self._costs()
        full = costs.measure([(TOP_BITS - 1, TOP_BITS)] * len(costs.per_bit))
        t = min(1.0, self.progress / max(REACH * self.epochs, 1e-9))
        return full - (full - costs.budget.value) * t

    def regularizer(self):
        layers = self.layers()
        if self.fixed:
            if not self.ebr_weight:
                return torch.zeros((), device=layers[0].clip.device)
            return self.ebr_weight * torch.stack([layer.bin_regularizer() for layer in layers]).mean()
        costs = self._costs()
        expected = torch.stack([layer.expected_bits() for layer in layers])
        over = torch.relu(costs.excess(costs.measure_tensor(expected - 1, expected)) - costs.excess(self.allowance()))
        return self.lam * len(layers) / 2 * over ** 2

    def task_loss(self, logits, y, x):
        ce = F.cross_entropy(logits, y)
        if self.teacher is None or not self.fixed or not self.kd_weight:
            return ce
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            t = self.teacher(x).float()
        temp = self.kd_temperature
        kd = F.kl_div(F.log_softmax(logits / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                      log_target=True) * temp * temp
        return (1 - self.kd_weight) * ce + self.kd_weight * kd

    def after_step(self):
        if not self.fixed:
            for layer in self.layers():
                layer.move_down()

    @torch.no_grad()
    def fix_bits(self):
        """The search's end (module docstring): the more probable bits of each pair, then the
        budget met, then filled while it holds."""
        layers, costs = self.layers(), self._costs()
        bits = [int(layer.chosen_bits()) for layer in layers]
        expected = [float(layer.expected_bits()) for layer in layers]

        def fits(i=None, d=0):
            return costs.fits([(b - 1 + d * (j == i), b + d * (j == i)) for j, b in enumerate(bits)])

        while not fits():
            lower = [i for i, b in enumerate(bits) if b > LOW_BITS]
            if not lower:
                break
            i = min(lower, key=lambda i: (expected[i] - bits[i] + 1) / costs.per_bit[i])
            bits[i] -= 1
        while True:
            higher = [i for i, b in enumerate(bits) if b < TOP_BITS and fits(i, 1)]
            if not higher:
                break
            i = max(higher, key=lambda i: expected[i] - bits[i])
            bits[i] += 1
        for layer, b in zip(layers, bits):
            layer.fix(b)

    def harden(self, hard: bool = True):
        for layer in self.layers():
            layer.hard = hard
