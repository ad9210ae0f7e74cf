"""`mixq train` options -> TrainConfig -> train.loop.train.

Options left out take the --recipe's value (train.config.recipe_defaults), else TrainConfig's
default: the options a user gives always win over the recipe. The common options are listed
here; each method's own come from its file (Method.options, via the registry)."""
from __future__ import annotations

import argparse
import json
import os

from mixq.train import methods
from mixq.train.config import DERIVED, TrainConfig, recipe_defaults
from mixq.train.methods import METHODS


def add_arguments(p):
    p.argument_default = argparse.SUPPRESS          # unset options: recipe, then TrainConfig default
    mixed = [n for n, m in METHODS.items() if m.mixed]
    fixed = [n for n, m in METHODS.items() if not m.mixed]
    p.add_argument("--model", help="digits-cnn | resnet20 | vgg19bn | mobilenetv2 | resnet18 | resnet50 | mobilenetv2-imagenet (the zoo), or your own: "
                   "FILE.py:FUNCTION or package.module:FUNCTION, FUNCTION(num_classes) returning a float nn.Module")
    p.add_argument("--dataset", help="digits (bundled) | cifar10 | imagenet | folder (your own images: "
                   "--data-dir with train/ and val/ or test/, one subfolder per class, and --input-size)")
    p.add_argument("--data-dir", help="dataset location (cifar10: ImageFolder dir or .tar.gz; folder: DIR with "
                   "train/ and val/ or test/); kept in the checkpoint as an absolute path, for deploy")
    p.add_argument("--input-size", help="--dataset folder: H or HxW, the size its images are resized "
                   "to (e.g. 32 or 48x64); the model's input is then (3, H, W)")
    p.add_argument("--method", help=f"{' | '.join(mixed)} (mixed precision under --target-bits) | "
                   f"{' | '.join(fixed)} (fixed --weight-bits)")
    p.add_argument("--recipe", help="mixq (default) | paper: the CSQ paper's settings (from scratch, SGD 0.1 cosine on every "
                        "parameter, batch 256, all 8 bits at start, mask logits 0, the paper's epochs per model, "
                        "8-bit shortcuts out of the bit count); options given explicitly override it")
    p.add_argument("--target-bits", type=float, help=f"{'/'.join(mixed)} budget: mean kept (magnitude) bits per layer, in (0, 8]")
    p.add_argument("--budget", help=f"{'/'.join(mixed)} budget in one of three measures: bits=T (the same as "
                   "--target-bits T, the default), size=KIB (KiB of packed weights: params x storage bits / 8), "
                   "bops=G (10^9 x MACs x weight bits x activation bits)")
    p.add_argument("--weight-bits", type=int, help=f"{', '.join(fixed)}: bits per weight incl. sign (2..8)")
    p.add_argument("--act-bits", type=int, help="activation bits 2..8, or 32 (float)")
    p.add_argument("--epochs", type=int, help=f"all training epochs ({'/'.join(mixed)}: search + finetune)")
    p.add_argument("--finetune-epochs", type=int, help=f"{'/'.join(mixed)}: the last N of --epochs train with the bits "
                        "fixed (default: csq 0, bsq/clado/sdq a third); csq rewinds beta for them (the paper's ImageNet finetune)")
    p.add_argument("--lr", type=float, help="SGD learning rate (weights, BN, scales, clips, CSQ's mask logits, SDQ's DBPs)")
    p.add_argument("--lr-warmup-epochs", type=int, help="linear learning-rate warm-up epochs")
    p.add_argument("--bit-optimizer", help="adam | sgd for the bit parameters (CSQ's bit logits m_p, m_n; BSQ's bit planes)")
    p.add_argument("--bit-lr", type=float, help="learning rate of the bit parameters (CSQ's bit logits m_p, m_n; "
                   "BSQ's bit planes)")
    p.add_argument("--init-from",
                   help="start from these float weights: a mixq checkpoint of the same model (ste-uniform, "
                        "clado) or the net's plain state dict (e.g. torchvision weights)")
    warm = "/".join(n for n, m in METHODS.items() if m.warm_start)
    p.add_argument("--warmup-epochs", type=int, help=f"{warm}: first train 8-bit STE weights for N epochs (RUN/warmup), then start from them")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int, help="per process under torchrun")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--amp", help="off | bf16: autocast convolutions (CSQ weights stay fp32)")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-subset", type=int, help="train on N random images (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images")
    p.add_argument("--history-test-images", type=int,
                   help="history.csv rows before the last epoch evaluate on N test images drawn once (seeded) "
                        "(a long run's per-epoch evaluation is then cheap); the last epoch and metrics.json use all")
    group = p.add_argument_group("method options (train/methods/*.py)")
    for o in methods.options().values():
        if o.type is bool:
            group.add_argument(o.cli_flag, dest=o.name, action="store_true", help=o.help)
        else:
            group.add_argument(o.cli_flag, dest=o.name, type=o.type, help=o.help)
    p.add_argument("--out", required=True, default=None, help="run directory")
    p.add_argument("--resume", action="store_true", default=False, help="continue from RUN_DIR/checkpoint.pt")


def config(args) -> TrainConfig:
    """The TrainConfig of the options given (args), over the recipe's, over the defaults."""
    keys = set(TrainConfig.__dataclass_fields__) - DERIVED
    given = {k: v for k, v in vars(args).items() if k in keys}
    if given.get("data_dir"):       # freeze, deploy and --resume may run from another directory
        given["data_dir"] = os.path.abspath(given["data_dir"])
    d = TrainConfig()
    preset = recipe_defaults(given.get("recipe", d.recipe), given.get("model", d.model), given.get("dataset", d.dataset))
    return TrainConfig(**{**preset, **given})


def run(args, evaluate=None, check=None) -> int:
    """Train; print the headline metrics. evaluate, check: see train.loop.train."""
    from mixq.train.loop import train
    m = train(config(args), args.out, resume=args.resume, evaluate=evaluate, check=check)
    if m is not None:           # under torchrun only rank 0 has the metrics
        keys = ("accuracy", "relaxed_accuracy", "int_accuracy", "avg_bits", "paper_comp", "storage_bits", "compression",
                "weight_kib", "gbops")
        print(json.dumps({k: m.get(k) for k in keys}))
    return 0
