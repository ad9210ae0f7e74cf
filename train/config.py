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
from mixq.train.methods import CSQ, CSQUniform, STEUniform

METHODS = {m.name: m for m in (CSQ, BSQ, CLADO, STEUniform, CSQUniform)}
MIXED = ("csq", "bsq", "clado")         # methods that search per-layer bits under --target-bits
FIXED = ("ste-uniform", "csq-uniform")  # one precision, --weight-bits, for every layer
RECIPES = ("mixq", "paper")


@dataclass
class TrainConfig:
    model: str = "digits-cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "csq"
    recipe: str = "mixq"            # "paper": the CSQ paper's settings (see recipe_defaults)
    target_bits: float = 3.0
    weight_bits: int = 8            # ste-uniform, csq-uniform only
    act_bits: int = 8
    epochs: int = 30                # all of training; CSQ: search, then finetune
    finetune_epochs: int | None = None   # of those, with the bits fixed (None: csq 0, bsq/clado a third)
    lr: float = 0.05                # SGD (Nesterov momentum) for weights, BN, CSQ scales, PACT clips
    lr_warmup_epochs: int = 0       # linear learning-rate warm-up (the paper's ImageNet recipe: 5)
    bit_optimizer: str = "adam"     # CSQ bit logits m_p, m_n: "adam" or "sgd" (see loop.make_optimizers)
    bit_lr: float = 0.1             # their learning rate
    batch_size: int = 64
    weight_decay: float = 5e-4
    lam: float = 0.01
    beta_max: float = 200.0
    bit_beta_max: float | None = 20.0    # CSQ: the bit gates' final temperature (None: beta_max, one beta)
    beta_saturate: float = 1.0      # CSQ: beta reaches beta_max at this fraction of the search
    mask_hard_at: float = 0.8       # CSQ: the mask is an exact step from this fraction of the search
    csq_init: str = "full"          # CSQ: "full" (all 8 bits, then prune) or "budget" (start at the target)
    init_logit: float = 2.0         # |bit logit| derived from the float weight
    bit_logit_bound: float = 2.0    # CSQ: keep bit logits in [-B, B] (0: unbounded)
    mask_init: float = 0.2          # |initial bit-mask logits m_B| (see CSQ.prepare)
    min_layer_bits: int = 1         # CSQ guard: every layer keeps >= this many bits (0: off)
    fixed_shortcuts: bool = False   # CSQ: downsampling shortcuts stay 8-bit, out of the budget
    init_from: str | None = None    # float weights to start from: a mixq checkpoint or a state dict
    warmup_epochs: int = 0          # csq/bsq: first train 8-bit STE weights this long (RUN/warmup)
    seed: int = 0
    device: str = "auto"
    train_subset: int | None = None
    test_subset: int | None = None
    history_test_images: int | None = None   # per-epoch history rows: the first N test images (last epoch: all)
    compile: bool = False           # torch.compile the model for training
    amp: str = "off"                # "bf16": autocast convolutions to bfloat16 (CSQ weights stay fp32)
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
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return 0 if self.method == "csq" else self.epochs // 3

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
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe}: unknown (choose from: {', '.join(RECIPES)})")
        if self.bit_optimizer not in ("adam", "sgd"):
            raise ValueError(f"--bit-optimizer {self.bit_optimizer}: must be adam or sgd")
        if self.csq_init not in ("budget", "full"):
            raise ValueError(f"--csq-init {self.csq_init}: must be budget or full")
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"--amp {self.amp}: must be off or bf16")
        if self.bit_logit_bound < 0:
            raise ValueError(f"--bit-logit-bound {self.bit_logit_bound}: must be >= 0 (0: unbounded)")
        if self.bit_beta_max is not None and not self.bit_beta_max >= 1:
            raise ValueError(f"--bit-beta-max {self.bit_beta_max}: must be >= 1")
        if not 0 < self.beta_saturate <= 1:
            raise ValueError(f"--beta-saturate {self.beta_saturate}: must be in (0, 1]")
        if not 0 <= self.mask_hard_at <= 1:
            raise ValueError(f"--mask-hard-at {self.mask_hard_at}: must be in [0, 1]")
        if self.lr_warmup_epochs < 0 or self.lr_warmup_epochs >= max(self.search(), 1):
            raise ValueError(f"--lr-warmup-epochs {self.lr_warmup_epochs}: must be >= 0 and shorter than the search")
        if not 2 <= self.weight_bits <= 8:
            raise ValueError(f"--weight-bits {self.weight_bits}: must be 2..8")
        if not self.init_logit > 0 or not self.mask_init >= 0:
            raise ValueError(f"--init-logit {self.init_logit} must be > 0 and --mask-init {self.mask_init} >= 0")
        if self.min_layer_bits < 0 or self.min_layer_bits > 8:
            raise ValueError(f"--min-layer-bits {self.min_layer_bits}: must be 0..8")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.method not in ("csq", "bsq")):
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must be >= 0, and is for csq and bsq "
                             "(clado warms up by itself, ste-uniform trains its weights directly)")
        if self.history_test_images is not None and self.history_test_images < 1:
            raise ValueError(f"--history-test-images {self.history_test_images}: must be >= 1")
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
        fixed = shortcut_layers(net) if cfg.fixed_shortcuts else ()
        method = CSQ(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam, cfg.beta_max,
                     cfg.init_logit, cfg.mask_init, cfg.min_layer_bits, cfg.csq_init, cfg.beta_saturate,
                     cfg.mask_hard_at, fixed, cfg.bit_logit_bound, cfg.bit_beta_max)
    elif cfg.method == "csq-uniform":
        method = CSQUniform(cfg.act_bits, cfg.weight_bits, cfg.epochs, cfg.beta_max, cfg.init_logit,
                            cfg.beta_saturate, cfg.bit_logit_bound, cfg.bit_beta_max)
    elif cfg.method == "bsq":
        method = BSQ(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune(), cfg.lam)
    elif cfg.method == "clado":
        method = CLADO(cfg.act_bits, cfg.target_bits, cfg.search(), cfg.finetune())
    else:
        method = STEUniform(cfg.act_bits, cfg.weight_bits)
    model = quant.QuantModel(method.prepare(net))
    surgery.check_activations(model, cfg.act_bits, cfg.model)
    return model, method


def shortcut_layers(net) -> tuple:
    """Names of the convolutions on ResNet downsampling shortcuts (`shortcut` in the CIFAR
    ResNets, `downsample` in torchvision's), as quant_layers names them."""
    return tuple(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and any(p in ("shortcut", "downsample") for p in n.split(".")))


# The CSQ paper's recipe (Xiao et al., DAC 2023, Sec. IV-A, and the authors' code
# lawsonX/CSQ for what the text leaves open). Epochs per model: the paper's; digits-cnn is
# not in the paper and keeps mixq's length.
PAPER_EPOCHS = {"resnet20": (600, 0), "vgg19bn": (300, 0), "resnet18": (300, 100), "resnet50": (300, 100)}


def recipe_defaults(recipe: str, model: str, dataset: str) -> dict:
    """The config values a recipe sets (the user's explicit options override them)."""
    if recipe != "paper":
        return {}
    imagenet = dataset == "imagenet"
    epochs, finetune = PAPER_EPOCHS.get(model, (TrainConfig.epochs, 0))
    return {
        "epochs": epochs, "finetune_epochs": finetune,
        "lr": 0.1, "bit_optimizer": "sgd", "bit_lr": 0.1,           # SGD 0.1, cosine, on everything
        "weight_decay": 1e-4 if imagenet else 5e-4, "lr_warmup_epochs": 5 if imagenet else 0,
        "batch_size": 256, "lam": 0.01, "beta_max": 200.0, "beta_saturate": 1.0, "mask_hard_at": 1.0,
        "csq_init": "full", "mask_init": 0.0, "init_logit": 1.0,  # all 8 bits, every gate at 1/2
        "min_layer_bits": 0, "fixed_shortcuts": True, "warmup_epochs": 0, "init_from": None,
        "bit_logit_bound": 0.0, "bit_beta_max": None,             # no box on the logits, one beta
    }


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
