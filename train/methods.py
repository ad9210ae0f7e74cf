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

import math

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
    relaxes = False         # CSQ: the trained (relaxed) network differs from the hardened one

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
    zeros and a plain CNN is dead. Of the k largest mask logits, those below 0 are set to
    +margin (where kept bits start): not to 0, where the gate is most sensitive and the lifted
    bit would keep flickering. Tensor ops only (no host sync): it runs every step. k = 0
    disables the guard."""
    logits = layer.bit_mask_logits
    top = logits.topk(k).indices
    logits[top] = torch.where(logits[top] < 0, torch.full_like(logits[top], margin), logits[top])


class CSQ(Method):
    """CSQ (Xiao et al., DAC 2023): bi-level continuous sparsification of weight bits.

    Weight: quant.CSQMixin, W = s/(2^n-1) sum_b (sig(beta m_p[b]) - sig(beta m_n[b])) 2^b sig(beta m_B[b]).

    Budget: lambda * (avg_precision - target) * sum_layers sum_b sig(beta * m_B[b]), with
    avg_precision the unweighted mean over layers of the hard count of kept bits
    (m_B[b] >= 0), so a model below budget is pushed to grow precision back.

    Temperature: beta = beta_max^(t / (saturate * T)) capped at beta_max, t the (fractional)
    epoch of the search, T its length: the loop calls on_epoch(epoch + step/steps) before every
    step, so beta grows smoothly per step; with saturate = 1 and sampled at whole epochs it is
    the paper's curve (beta_max reached at the last search epoch). One beta tensor is shared by
    every layer and filled once per step. The optional finetune phase (the paper's ImageNet
    recipe) freezes the mask, rewinds beta to 1 and anneals it again. `bit_beta_max` (mixq's
    default 20; None: the paper's one beta) gives the bit gates their own temperature, see
    bit_schedule.

    Convergence (the search must end with the hardened network equal to the relaxed one):
    `mask_hard_at` < 1 turns the mask into exact unit steps for the last part of the search,
    with no beta rewind and no budget term (the precision is final from there), so the bit
    logits spend those epochs at high beta under the mask they will be frozen with; the
    budget term, which counts kept bits with a hard threshold, otherwise keeps pushing the
    marginal bit back and forth across m_B = 0, where its gate is half open. See README
    ("Why the search converges") for the measurements behind the defaults.

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
    relaxes = True

    def __init__(self, act_bits: int, target_bits: float, epochs: int, finetune_epochs: int = 0,
                 lam: float = 0.01, beta_max: float = 200.0, init_logit: float = 2.0,
                 mask_init: float = 0.2, min_layer_bits: int = 1, init: str = "budget",
                 beta_saturate: float = 1.0, mask_hard_at: float = 1.0, fixed_layers=(),
                 bit_logit_bound: float = 0.0, bit_beta_max: float | None = None):
        super().__init__(act_bits)
        self.bit_beta_max = bit_beta_max
        self.bit_logit_bound = bit_logit_bound
        self.min_layer_bits = min_layer_bits
        self.target, self.epochs, self.finetune_epochs = target_bits, epochs, finetune_epochs
        self.lam, self.beta_max = lam, beta_max
        self.init_logit, self.mask_init, self.init = init_logit, mask_init, init
        self.beta_saturate, self.mask_hard_at = beta_saturate, mask_hard_at
        self.fixed_layers = tuple(fixed_layers)
        self.beta, self.mask_frozen = 1.0, False
        self._beta = None           # the one beta tensor every layer's `beta` buffer points to
        self._bit_beta = None       # --bit-beta-max: the one bit-gate temperature tensor (layer.bit_beta)
        self.bit_beta = 1.0

    def prepare(self, model):
        # swap_layers converts Conv2d/Linear in named_modules order: the same order as here
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        searched = [m.weight.numel() for n, m in layers if n not in self.fixed_layers]
        bits = iter(initial_bits(self.target, searched)) if self.init == "budget" else None
        self._init_bits = iter([None if n in self.fixed_layers or bits is None else next(bits) for n, _ in layers])
        model = super().prepare(model)
        # the layer lists, once: on_epoch and after_step run every step
        named = quant.quant_layers(model)
        self._all = [m for _, m in named]
        self._searched = [m for n, m in named if n not in self.fixed_layers]
        self._bit_logits = [p for m in self._all for p in (m.bit_logits_pos, m.bit_logits_neg)]
        for name, layer in named:
            if name in self.fixed_layers:
                layer.freeze_mask(True)
        return model

    def convert(self, m):
        cls = quant.CSQConv2d if isinstance(m, torch.nn.Conv2d) else quant.CSQLinear
        return cls.from_float(m, self.init_logit, self.mask_init, next(self._init_bits))

    def layers(self):
        """The searched layers (the fixed ones are not in the budget or the bit count)."""
        return self._searched

    def all_layers(self):
        return self._all

    def schedule(self, epoch: float, beta_max: float | None = None) -> tuple[float, bool]:
        """(beta, mask hard) at a fractional epoch; beta_max: another final temperature on the
        same curve (the bit gates' with --bit-beta-max)."""
        beta_max = self.beta_max if beta_max is None else beta_max
        if epoch >= self.epochs:                            # finetune: beta rewound, mask frozen
            t = (epoch - self.epochs) / max(self.finetune_epochs, 1)
            return float(beta_max ** min(t, 1.0)), True
        t = epoch / max(self.epochs * self.beta_saturate, 1e-9)
        return float(beta_max ** min(t, 1.0)), epoch >= self.mask_hard_at * self.epochs

    def bit_schedule(self, epoch: float) -> float:
        """The bit gates' temperature. With --bit-beta-max B_b (mixq's default, 20): the same
        curve to B_b while the mask is searched, then from where it is to beta_max at the end
        of the search (geometrically over the phase with the mask final), so every gate ends
        at the paper's beta_max. Why: beta_b * m_p is what decides whether a digit can still
        learn; with |m| <= 2 (--bit-logit-bound) and beta -> 200, the digits are steps from
        beta ~ 6 on, a third of the way into the search, and a short run stops learning there
        (README, "Why the search converges"). The mask keeps the paper's curve: it must be
        near a step when it becomes final. In the finetune phase (mask frozen, beta rewound)
        the bits follow beta."""
        if self.bit_beta_max is None or epoch >= self.epochs:
            return self.schedule(epoch)[0]
        h = self.mask_hard_at * self.epochs
        if epoch < h or self.mask_hard_at >= 1:
            return self.schedule(epoch, self.bit_beta_max)[0]
        start = self.schedule(h, self.bit_beta_max)[0]
        u = (epoch - h) / (self.epochs - h)
        return float(start * (self.beta_max / start) ** u)

    def on_epoch(self, epoch: float):
        self.beta, hard = self.schedule(epoch)
        layers = self.all_layers()
        if self._beta is None or self._beta.device != layers[0].scale.device:
            self._beta = layers[0].beta.new_tensor(self.beta)
            for layer in layers:
                layer._buffers["beta"] = self._beta
            if self.bit_beta_max is not None:
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
        """At the step the mask becomes final: kept bits in all = floor(target * layers), so the
        average precision lands within one layer's step below the target. The budget term
        counts bits with a hard threshold and so holds the count within a bit or two of the
        target, flickering; this settles the last of it by the paper's own measure of how
        marginal a bit is: over budget, the kept bit with the smallest mask logit goes (never a
        layer's last bit, nor one the guard keeps); under, the dropped bit with the largest
        comes back. Those logits sit next to 0, so the relaxed network hardly moves."""
        layers = self.layers()
        want = math.floor(self.target * len(layers) + 1e-6)
        logits = torch.stack([layer.bit_mask_logits for layer in layers])            # [L, 8]
        kept = logits >= 0
        while int(kept.sum()) > want:
            movable = kept & (kept.sum(1, keepdim=True) > max(self.min_layer_bits, 1))
            if not movable.any():
                break
            i = int(torch.where(movable, logits, float("inf")).argmin())
            kept.view(-1)[i] = False
        while int(kept.sum()) < want:
            i = int(torch.where(kept, -float("inf"), logits).argmax())
            kept.view(-1)[i] = True
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

    def regularizer(self):
        layers = self.layers()
        if self.mask_frozen:
            return torch.zeros((), device=layers[0].scale.device)
        delta = self.precision_counts().float().mean() - self.target
        return self.lam * delta * torch.stack([layer.mask_penalty() for layer in layers]).sum()

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


class CSQUniform(CSQ):
    """The paper's Table IV "CSQ-Uniform": the bit-level relaxation of Eq. (3) at a fixed
    precision, no bit mask. `weight_bits` K counts the sign as --weight-bits does, so every
    layer keeps its top K-1 bit planes under a frozen (exact step) mask; there is no budget
    term. The top K-1 of 8 planes are the paper's K-1-bit representation with the scale
    multiplied by 2^(9-K)(2^(K-1)-1)/255, which s absorbs."""
    name = "csq-uniform"

    def __init__(self, act_bits: int, weight_bits: int, epochs: int, beta_max: float = 200.0,
                 init_logit: float = 2.0, beta_saturate: float = 1.0, bit_logit_bound: float = 0.0,
                 bit_beta_max: float | None = None):
        super().__init__(act_bits, weight_bits - 1, epochs, 0, 0.0, beta_max, init_logit, 1.0, 0,
                         "budget", beta_saturate, 0.0, (), bit_logit_bound, bit_beta_max)

    def regularizer(self):
        return torch.zeros((), device=self.layers()[0].scale.device)


class STEUniform(Method):
    """Fixed-precision QAT with a straight-through estimator (the paper's Table IV baseline)."""
    name = "ste-uniform"

    def __init__(self, act_bits: int, weight_bits: int):
        super().__init__(act_bits)
        self.weight_bits = weight_bits

    def convert(self, m):
        cls = quant.STEConv2d if isinstance(m, torch.nn.Conv2d) else quant.STELinear
        return cls.from_float(m, self.weight_bits)

