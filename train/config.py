"""Training configuration (one small dataclass) and the one function that builds a model
from it, used by training, --resume and freeze alike."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mixq.models import build_model
from mixq.train import quant, surgery
from mixq.train.bsq import BSQ
from mixq.train.clado import CLADO
from mixq.train.methods import CSQ, STEUniform

METHODS = {m.name: m for m in (CSQ, BSQ, CLADO, STEUniform)}
MIXED = ("csq", "bsq", "clado")         # methods that search per-layer bits under --target-bits


@dataclass
class TrainConfig:
    model: str = "digits-cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "csq"
    target_bits: float = 3.0
    weight_bits: int = 8            # ste-uniform only
    act_bits: int = 8
    epochs: int = 30                # all of training; CSQ: search, then finetune
    finetune_epochs: int | None = None   # CSQ: of those, with the mask frozen (None: a third)
    lr: float = 0.05                # SGD (Nesterov momentum) for weights, BN, CSQ scales, PACT clips
    bit_lr: float = 0.02            # Adam for the CSQ bit logits m_p, m_n (see loop.make_optimizers)
    batch_size: int = 64
    weight_decay: float = 5e-4
    lam: float = 0.01
    beta_max: float = 200.0
    init_logit: float = 2.0         # |bit logit| derived from the float weight
    mask_init: float = 0.2          # |initial bit-mask logits m_B| (see CSQ.prepare)
    min_layer_bits: int = 1         # CSQ guard: every layer keeps >= this many bits (0: off)
    init_from: str | None = None    # float weights to start from: a mixq checkpoint or a state dict
    warmup_epochs: int = 0          # csq/bsq: first train 8-bit STE weights this long (RUN/warmup)
    seed: int = 0
    device: str = "auto"
    train_subset: int | None = None
    test_subset: int | None = None
    num_classes: int = 10
    input_shape: tuple = (1, 8, 8)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "input_shape" in d:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)

    def finetune(self) -> int:
        """Epochs with the bits fixed after the search (CSQ: mask frozen, beta rewound; BSQ:
        precision fixed; CLADO: at the allocated bits); 0 for ste-uniform."""
        if self.method not in MIXED:
            return 0
        return self.epochs // 3 if self.finetune_epochs is None else self.finetune_epochs

    def search(self) -> int:
        """Epochs of the search phase (all of them for a method without a finetune phase)."""
        return self.epochs - self.finetune()

    def validate(self):
        from mixq.data import DATASETS
        from mixq.models import MODELS
        if self.model not in MODELS:
            raise ValueError(f"--model {self.model}: unknown model '{self.model}' (choose from: {', '.join(MODELS)})")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset}: unknown dataset '{self.dataset}' (choose from: {', '.join(DATASETS)})")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: unknown (choose from: {', '.join(METHODS)})")
        if not 0 < self.target_bits <= 8:
            raise ValueError(f"--target-bits {self.target_bits}: must be in (0, 8]")
        if not (2 <= self.act_bits <= 8 or self.act_bits == 32):
            raise ValueError(f"--act-bits {self.act_bits}: must be 2..8, or 32 for float activations")
        if not 2 <= self.weight_bits <= 8:
            raise ValueError(f"--weight-bits {self.weight_bits}: must be 2..8")
        if not self.init_logit > 0 or not self.mask_init >= 0:
            raise ValueError(f"--init-logit {self.init_logit} must be > 0 and --mask-init {self.mask_init} >= 0")
        if self.min_layer_bits < 0 or self.min_layer_bits > 8:
            raise ValueError(f"--min-layer-bits {self.min_layer_bits}: must be 0..8")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.method not in ("csq", "bsq")):
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must be >= 0, and is for csq and bsq "
                             "(clado warms up by itself, ste-uniform trains its weights directly)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.finetune_epochs is not None and not 0 <= self.finetune_epochs < self.epochs:
            raise ValueError(f"--finetune-epochs {self.finetune_epochs}: must be >= 0 and less than "
                             f"--epochs {self.epochs} (the finetune epochs are part of them)")
        if self.method in ("bsq", "clado") and (self.finetune() < 1 or self.search() < 1):
            raise ValueError(f"--method {self.method} needs >= 1 search and >= 1 finetune epoch (its bits are "
                             f"set when the finetune starts): got --epochs {self.epochs}, --finetune-epochs {self.finetune()}")


def build(cfg: TrainConfig, init_weights: str | None = None):
    """(QuantModel, method) for a config; weights are whatever the builder initializes, or the
    float weights of `init_weights` (see load_float_weights) before the method converts them."""
    net = build_model(cfg.model, cfg.num_classes)
    if init_weights:
        load_float_weights(net, init_weights, cfg.model)
    if cfg.method == "csq":
        method = CSQ(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam, cfg.beta_max,
                     cfg.init_logit, cfg.mask_init, cfg.min_layer_bits)
    elif cfg.method == "bsq":
        method = BSQ(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam)
    elif cfg.method == "clado":
        method = CLADO(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune())
    else:
        method = STEUniform(cfg.act_bits, cfg.weight_bits)
    model = quant.QuantModel(method.prepare(net))
    surgery.check_activations(model, cfg.act_bits, cfg.model)
    return model, method


def load_float_weights(net, path: str, model_name: str):
    """Float weights (conv/linear weights and biases, batch norm) into the zoo net `net`, from
    a mixq checkpoint of the same model (any method keeping float weights: ste-uniform, clado)
    or a plain state dict of the net (e.g. torchvision's resnet18/50 weights for
    `net.load_state_dict`). Every conv/linear weight must be there with its shape."""
    if not Path(path).is_file():
        raise ValueError(f"--init-from {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise ValueError(f"--init-from {path}: not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and {"model", "config"} <= set(state):        # a mixq checkpoint
        other = state["config"].get("model") if isinstance(state["config"], dict) else None
        if other != model_name:
            raise ValueError(f"--init-from {path}: a checkpoint of model '{other}', not '{model_name}'")
        state = {k[len("net."):]: v for k, v in state["model"].items() if k.startswith("net.")}
    if not isinstance(state, dict):
        raise ValueError(f"--init-from {path}: not a state dict")
    own = net.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            key = f"{name}.weight"
            if key not in state:
                raise ValueError(f"--init-from {path}: no float weight for layer '{name}' (a CSQ or BSQ "
                                 "checkpoint keeps no float weights)")
    loaded = {k: v for k, v in state.items() if k in own}
    for k, v in loaded.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"--init-from {path}: '{k}' has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
    net.load_state_dict(loaded, strict=False)
