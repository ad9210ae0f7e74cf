"""Training configuration (one small dataclass) and the one function that builds a model
from it, used by training, --resume and freeze alike.

TrainConfig's fields are the options every method shares (below) plus the options each
registered method declares in its own file (train/methods/*.py, `Method.options`): a checkpoint's
"config" is the flat dict of all of them (to_dict/from_dict)."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields

from mixq.models import build_model, model_source
from mixq.train import methods, quant, surgery
from mixq.train.errors import ConfigError
from mixq.train.floatweights import load_float_weights
from mixq.train.methods import METHODS

RECIPES = ("mixq", "paper")
DERIVED = {"num_classes", "input_shape", "classes"}      # config fields the data set sets, no option
# options of earlier versions a checkpoint may still record; read and ignored (its run then
# resumes under today's schedule): bit_beta_max, CSQ's bit-gate temperature curve until the
# soft bit gates (bit_beta_soft) replaced it
RETIRED = {"bit_beta_max"}


@dataclass
class CommonConfig:
    """The options of every run; TrainConfig adds the methods' own."""
    model: str = "digits-cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "csq"
    recipe: str = "mixq"            # "paper": the CSQ paper's settings (see recipe_defaults)
    target_bits: float = 3.0        # mixed methods (csq, bsq, clado): mean kept bits per layer
    budget: str | None = None       # mixed methods: bits=T | size=KIB | bops=G (train/budget.py); None: bits=target_bits
    weight_bits: int = 8            # fixed-precision methods (ste-uniform, csq-uniform)
    act_bits: int = 8
    epochs: int = 30                # all of training; mixed methods: search, then finetune
    finetune_epochs: int | None = None   # of those, with the bits fixed (None: the method's default)
    lr: float = 0.05                # SGD (Nesterov momentum) for weights, BN, scales, PACT clips, gates
    lr_warmup_epochs: int = 0       # linear learning-rate warm-up (the paper's ImageNet recipe: 5)
    bit_optimizer: str = "adam"     # the methods' bit parameters: "adam" or "sgd" (see loop.make_optimizers)
    bit_lr: float = 0.1             # their learning rate
    batch_size: int = 64
    weight_decay: float = 5e-4
    init_from: str | None = None    # float weights to start from: a mixq checkpoint or a state dict
    warmup_epochs: int = 0          # warm-startable methods (csq, bsq): first 8-bit STE weights (RUN/warmup)
    seed: int = 0
    device: str = "auto"
    train_subset: int | None = None
    test_subset: int | None = None
    history_test_images: int | None = None   # per-epoch history rows: N test images drawn once (last epoch: all)
    compile: bool = False           # torch.compile the model for training
    amp: str = "off"                # "bf16": autocast convolutions to bfloat16 (CSQ weights stay fp32)
    input_size: tuple | None = None         # --dataset folder: (H, W) its images are resized to (required there)
    num_classes: int = 10                   # these three come from the data set (train.loop sets them)
    input_shape: tuple = (1, 8, 8)
    classes: tuple | None = None            # class names in label order, where the data set names them

    SEQUENCES = ("input_size", "input_shape", "classes")    # tuples here, lists in to_dict()

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in self.SEQUENCES:
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in RETIRED}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        for k in cls.SEQUENCES:
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def method_class(self) -> type:
        return METHODS[self.method]

    def finetune(self) -> int:
        """Epochs with the bits fixed after the search (CSQ: mask frozen, beta rewound; BSQ:
        precision fixed; CLADO: at the allocated bits); 0 for a fixed-precision method."""
        method = self.method_class()
        if not method.mixed:
            return 0
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return method.default_finetune(self.epochs)

    def budget_spec(self):
        """The mixed methods' budget (train.budget.Budget): --budget, else bits=--target-bits."""
        from mixq.train.budget import Budget
        return Budget.parse(self.budget) if self.budget else Budget("bits", self.target_bits)

    def search(self) -> int:
        """Epochs of the search phase (all of them for a method without a finetune phase)."""
        return self.epochs - self.finetune()

    def validate(self):
        """ConfigError (or, for --input-size, DataError) naming the first bad option; also turns
        input_size into the (H, W) pair it means ("32" -> (32, 32))."""
        from mixq.data import DATASETS, input_size_for
        from mixq.models import MODELS, is_user_model
        if self.model not in MODELS and not is_user_model(self.model):
            raise ConfigError(f"--model {self.model}: unknown model '{self.model}' (choose from: {', '.join(MODELS)}, "
                              "or FILE.py:FUNCTION or package.module:FUNCTION for your own)")
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset}: unknown dataset '{self.dataset}' (choose from: {', '.join(DATASETS)})")
        self.input_size = input_size_for(self.dataset, self.input_size)
        self.validate_options()

    def validate_options(self):
        """Everything validate() checks but the model and dataset names (the Python API trains
        a module and loaders it is handed)."""
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method}: unknown (choose from: {', '.join(METHODS)})")
        if not 0 < self.target_bits <= 8:
            raise ConfigError(f"--target-bits {self.target_bits}: must be in (0, 8]")
        if self.budget is not None:
            if not self.method_class().mixed:
                raise ConfigError(f"--budget {self.budget}: for the mixed methods "
                                  f"({', '.join(n for n, m in METHODS.items() if m.mixed)}); "
                                  f"--method {self.method} takes --weight-bits")
            self.budget_spec()
        if not (2 <= self.act_bits <= 8 or self.act_bits == 32):
            raise ConfigError(f"--act-bits {self.act_bits}: must be 2..8, or 32 for float activations")
        if self.recipe not in RECIPES:
            raise ConfigError(f"--recipe {self.recipe}: unknown (choose from: {', '.join(RECIPES)})")
        if self.bit_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"--bit-optimizer {self.bit_optimizer}: must be adam or sgd")
        if self.amp not in ("off", "bf16"):
            raise ConfigError(f"--amp {self.amp}: must be off or bf16")
        for method in METHODS.values():     # every method's options, whichever method trains
            method.check_options(self)
        if self.lr_warmup_epochs < 0 or self.lr_warmup_epochs >= max(self.search(), 1):
            raise ConfigError(f"--lr-warmup-epochs {self.lr_warmup_epochs}: must be >= 0 and shorter than the search")
        if not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"--weight-bits {self.weight_bits}: must be 2..8")
        if self.warmup_epochs < 0 or (self.warmup_epochs and not self.method_class().warm_start):
            warm = " and ".join(n for n, m in METHODS.items() if m.warm_start)
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs}: must be >= 0, and is for {warm} "
                              "(the others warm up by themselves or train their float weights directly)")
        if self.history_test_images is not None and self.history_test_images < 1:
            raise ConfigError(f"--history-test-images {self.history_test_images}: must be >= 1")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.finetune_epochs is not None and not 0 <= self.finetune_epochs < self.epochs:
            raise ConfigError(f"--finetune-epochs {self.finetune_epochs}: must be >= 0 and less than "
                              f"--epochs {self.epochs} (the finetune epochs are part of them)")
        if self.method_class().needs_finetune and (self.finetune() < 1 or self.search() < 1):
            raise ConfigError(f"--method {self.method} needs >= 1 search and >= 1 finetune epoch (its bits are "
                              f"set when the finetune starts): got --epochs {self.epochs}, --finetune-epochs {self.finetune()}")


# TrainConfig: the common fields, then every registered method's options (methods.options()).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(o.name, o.type, dataclasses.field(default=o.default)) for o in methods.options(seal=True).values()],
    bases=(CommonConfig,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "A training run's configuration: CommonConfig's fields and the methods' options."


def build(cfg: TrainConfig, init_weights: str | None = None, source: dict | None = None):
    """(QuantModel, method) for a config; weights are whatever the builder initializes, or the
    float weights of `init_weights` (see load_float_weights) before the method converts them.
    A user model (--model FILE.py:FUNCTION) is built from `source` (a checkpoint's record) when
    given, else from its file; the model carries that record (`model.source`) for the checkpoint."""
    source = source or model_source(cfg.model)
    net = build_model(cfg.model, cfg.num_classes, source)
    if init_weights:
        load_float_weights(net, init_weights, cfg.model)
    net = surgery.insert_signed_quantizers(surgery.one_module_per_activation(net), cfg.act_bits)
    method = cfg.method_class().from_config(cfg, net)
    model = quant.QuantModel(method.prepare(net))
    model.source = source
    return model, method


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
        "bit_logit_bound": 0.0, "bit_beta_soft": None,            # no box on the logits, one beta
    }
