"""Training configuration (one small dataclass) and the one function that builds a model
from it, used by training, --resume and freeze alike."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mixq.models import build_model
from mixq.train import quant
from mixq.train.methods import CSQ, METHODS, STEUniform


@dataclass
class TrainConfig:
    model: str = "digits-cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    method: str = "csq"
    target_bits: float = 3.0
    weight_bits: int = 8            # ste-uniform only
    act_bits: int = 8
    epochs: int = 40
    finetune_epochs: int = 0
    lr: float = 0.05
    batch_size: int = 64
    weight_decay: float = 5e-4
    lam: float = 0.01
    beta_max: float = 200.0
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

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: unknown (choose from: {', '.join(METHODS)})")
        if not 0 < self.target_bits <= 8:
            raise ValueError(f"--target-bits {self.target_bits}: must be in (0, 8]")
        if not (2 <= self.act_bits <= 8 or self.act_bits == 32):
            raise ValueError(f"--act-bits {self.act_bits}: must be 2..8, or 32 for float activations")
        if not 2 <= self.weight_bits <= 8:
            raise ValueError(f"--weight-bits {self.weight_bits}: must be 2..8")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.finetune_epochs < 0:
            raise ValueError("--finetune-epochs must be >= 0")


def build(cfg: TrainConfig):
    """(QuantModel, method) for a config; weights are whatever the builder initializes."""
    net = build_model(cfg.model, cfg.num_classes)
    if cfg.method == "csq":
        method = CSQ(cfg.act_bits, cfg.target_bits, cfg.epochs, cfg.finetune_epochs, cfg.lam, cfg.beta_max)
    else:
        method = STEUniform(cfg.act_bits, cfg.weight_bits)
    model = quant.QuantModel(method.prepare(net))
    return model, method
