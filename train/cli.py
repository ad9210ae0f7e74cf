"""`mixq train` options -> TrainConfig -> train.loop.train."""
from __future__ import annotations

import json

from mixq.train.config import TrainConfig


def add_arguments(p):
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="digits-cnn | resnet20 | vgg19bn | resnet18 | resnet50")
    p.add_argument("--dataset", default=d.dataset, help="digits (bundled) | cifar10 | imagenet")
    p.add_argument("--data-dir", default=None, help="dataset location (cifar10: ImageFolder dir or .tar.gz)")
    p.add_argument("--method", default=d.method, help="csq | bsq | clado (mixed precision under --target-bits) | ste-uniform (fixed --weight-bits)")
    p.add_argument("--target-bits", type=float, default=d.target_bits,
                   help="csq/bsq/clado budget: mean kept (magnitude) bits per layer, in (0, 8]")
    p.add_argument("--weight-bits", type=int, default=d.weight_bits,
                   help="ste-uniform: bits per weight incl. sign (2..8)")
    p.add_argument("--act-bits", type=int, default=d.act_bits, help="activation bits 2..8, or 32 (float)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="all training epochs (csq/bsq/clado: search + finetune)")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="csq/bsq/clado: the last N of --epochs train with the bits fixed (default: a third)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (weights, BN, scales, clips)")
    p.add_argument("--bit-lr", type=float, default=d.bit_lr, help="CSQ: Adam learning rate of the bit logits (the mask logits use --lr)")
    p.add_argument("--init-logit", type=float, default=d.init_logit, help="CSQ: |bit logit| derived from the float weights")
    p.add_argument("--mask-init", type=float, default=d.mask_init, help="CSQ: |initial bit-mask logits| (+ on the bits a layer starts with, - below)")
    p.add_argument("--min-layer-bits", type=int, default=d.min_layer_bits,
                   help="CSQ guard: every layer keeps at least this many bits (0: off, the paper's plain rule)")
    p.add_argument("--init-from", default=None,
                   help="start from these float weights: a mixq checkpoint of the same model (ste-uniform, "
                        "clado) or the net's plain state dict (e.g. torchvision weights)")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="csq/bsq: first train 8-bit STE weights for N epochs (RUN/warmup), then start from them")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process under torchrun")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam, help="csq: budget regularizer strength; bsq: group-Lasso strength")
    p.add_argument("--beta-max", type=float, default=d.beta_max, help="CSQ: final gate temperature")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-subset", type=int, default=None, help="train on N random images (quick runs)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")


def run(args) -> int:
    from mixq.train.loop import train
    keys = set(TrainConfig.__dataclass_fields__) - {"num_classes", "input_shape"}
    cfg = TrainConfig(**{k: getattr(args, k) for k in keys})
    m = train(cfg, args.out, resume=args.resume)
    if m is not None:           # under torchrun only rank 0 has the metrics
        keys = ("accuracy", "int_accuracy", "avg_bits", "avg_bits_weighted", "storage_bits", "compression")
        print(json.dumps({k: m[k] for k in keys}))
    return 0
