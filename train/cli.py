"""`mixq train` options -> TrainConfig -> train.loop.train.

Options left out take the --recipe's value (train.config.recipe_defaults), else TrainConfig's
default: the options a user gives always win over the recipe."""
from __future__ import annotations

import argparse
import json

from mixq.train.config import TrainConfig, recipe_defaults


def add_arguments(p):
    p.argument_default = argparse.SUPPRESS          # unset options: recipe, then TrainConfig default
    p.add_argument("--model", help="digits-cnn | resnet20 | vgg19bn | resnet18 | resnet50")
    p.add_argument("--dataset", help="digits (bundled) | cifar10 | imagenet")
    p.add_argument("--data-dir", help="dataset location (cifar10: ImageFolder dir or .tar.gz)")
    p.add_argument("--method", help="csq | bsq | clado (mixed precision under --target-bits) | "
                   "ste-uniform | csq-uniform (fixed --weight-bits)")
    p.add_argument("--recipe", help="mixq (default) | paper: the CSQ paper's settings (from scratch, SGD 0.1 cosine on every "
                        "parameter, batch 256, all 8 bits at start, mask logits 0, the paper's epochs per model, "
                        "8-bit shortcuts out of the bit count); options given explicitly override it")
    p.add_argument("--target-bits", type=float, help="csq/bsq/clado budget: mean kept (magnitude) bits per layer, in (0, 8]")
    p.add_argument("--weight-bits", type=int, help="ste-uniform, csq-uniform: bits per weight incl. sign (2..8)")
    p.add_argument("--act-bits", type=int, help="activation bits 2..8, or 32 (float)")
    p.add_argument("--epochs", type=int, help="all training epochs (csq/bsq/clado: search + finetune)")
    p.add_argument("--finetune-epochs", type=int, help="csq/bsq/clado: the last N of --epochs train with the bits fixed (default: csq 0, "
                        "bsq/clado a third); csq rewinds beta for them (the paper's ImageNet finetune)")
    p.add_argument("--lr", type=float, help="SGD learning rate (weights, BN, scales, clips, mask logits)")
    p.add_argument("--lr-warmup-epochs", type=int, help="linear learning-rate warm-up epochs")
    p.add_argument("--bit-optimizer", help="CSQ: adam | sgd for the bit logits m_p, m_n")
    p.add_argument("--bit-lr", type=float, help="CSQ: learning rate of the bit logits m_p, m_n")
    p.add_argument("--beta-saturate", type=float, help="CSQ: beta reaches --beta-max at this fraction of the search (1: the last epoch)")
    p.add_argument("--mask-hard-at", type=float, help="CSQ: from this fraction of the search on, the bit mask is an exact step (1: never)")
    p.add_argument("--csq-init", help="CSQ: full (default: all 8 bits kept, precision then prunes to the target, as "
                   "in the paper) | budget (every layer starts at the target)")
    p.add_argument("--fixed-shortcuts", action="store_true",
                   help="CSQ: ResNet downsampling shortcuts stay 8-bit, outside the budget and the bit count")
    p.add_argument("--init-logit", type=float, help="CSQ: |bit logit| derived from the float weights")
    p.add_argument("--bit-logit-bound", type=float, help="CSQ: keep the bit logits in [-B, B] (0: unbounded)")
    p.add_argument("--mask-init", type=float, help="CSQ: |initial bit-mask logits| (+ on the bits a layer starts with, - below)")
    p.add_argument("--min-layer-bits", type=int, help="CSQ guard: every layer keeps at least this many bits (0: off, the paper's plain rule)")
    p.add_argument("--init-from",
                   help="start from these float weights: a mixq checkpoint of the same model (ste-uniform, "
                        "clado) or the net's plain state dict (e.g. torchvision weights)")
    p.add_argument("--warmup-epochs", type=int, help="csq/bsq: first train 8-bit STE weights for N epochs (RUN/warmup), then start from them")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int, help="per process under torchrun")
    p.add_argument("--lambda", dest="lam", type=float, help="csq: budget regularizer strength; bsq: group-Lasso strength")
    p.add_argument("--beta-max", type=float, help="CSQ: final gate temperature")
    p.add_argument("--bit-beta-max", type=float,
                   help="CSQ: final temperature of the bit gates m_p, m_n on the same curve (default: --beta-max)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--amp", help="off | bf16: autocast convolutions (CSQ weights stay fp32)")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-subset", type=int, help="train on N random images (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images")
    p.add_argument("--history-test-images", type=int,
                   help="history.csv rows before the last epoch evaluate on the first N test images "
                        "(a long run's per-epoch evaluation is then cheap); the last epoch and metrics.json use all")
    p.add_argument("--out", required=True, default=None, help="run directory")
    p.add_argument("--resume", action="store_true", default=False, help="continue from RUN_DIR/checkpoint.pt")


def run(args) -> int:
    from mixq.train.loop import train
    keys = set(TrainConfig.__dataclass_fields__) - {"num_classes", "input_shape"}
    given = {k: v for k, v in vars(args).items() if k in keys}
    d = TrainConfig()
    preset = recipe_defaults(given.get("recipe", d.recipe), given.get("model", d.model), given.get("dataset", d.dataset))
    cfg = TrainConfig(**{**preset, **given})
    m = train(cfg, args.out, resume=args.resume)
    if m is not None:           # under torchrun only rank 0 has the metrics
        keys = ("accuracy", "relaxed_accuracy", "int_accuracy", "avg_bits", "paper_comp", "storage_bits", "compression")
        print(json.dumps({k: m[k] for k in keys}))
    return 0
