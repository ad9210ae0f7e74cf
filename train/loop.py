"""`mixq train`: the whole training loop, one screen, then the run directory.

RUN_DIR/checkpoint.pt   {"model", "config", "epoch", "optimizer", "scheduler", "history"}
                        (loads with torch.load(weights_only=True); written atomically per epoch)
RUN_DIR/metrics.json    accuracy of the hardened model, bits, compression, per-layer table
RUN_DIR/history.csv     per epoch: loss, accuracy, beta, precision (avg and per layer)
RUN_DIR/precision.png   per-layer precision over epochs;  RUN_DIR/bits.png final bit-widths
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mixq import data as datasets
from mixq.train.config import TrainConfig, build


class TrainError(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name}: not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    return dev


def atomic_save(obj, path: Path):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def load_checkpoint(path) -> dict:
    """Read a mixq checkpoint; one-line error for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise TrainError(f"{path}: not a readable mixq checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch"} <= set(ckpt):
        raise TrainError(f"{path}: not a mixq checkpoint (missing model/config/epoch)")
    return ckpt


def restore_model(ckpt: dict, path="checkpoint"):
    """Rebuild (model, method, config) from a checkpoint: the one path used by resume and freeze."""
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model, method = build(cfg)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0]
        raise TrainError(f"{path}: checkpoint does not match its model config ({msg[:200]})") from None
    return model, method, cfg


def train(cfg: TrainConfig, out_dir: str, resume: bool = False) -> dict:
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = pick_device(cfg.device)
    spec = datasets.load(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed)
    cfg.num_classes, cfg.input_shape = spec.num_classes, spec.input_shape

    torch.manual_seed(cfg.seed)
    start_epoch, history, state = 0, [], None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        if saved.to_dict() != {**cfg.to_dict(), "device": saved.device}:
            raise TrainError(f"{ckpt_path}: --resume with a different configuration than the run's")
        model, method, _ = restore_model(state, ckpt_path)
        start_epoch, history = state["epoch"] + 1, state["history"]
    else:
        model, method = build(cfg)
        calib = torch.stack([spec.train[i][0] for i in range(min(len(spec.train), 2048))])
        model.input_quant.calibrate(calib)
    model.to(device)

    total_epochs = cfg.epochs + (cfg.finetune_epochs if cfg.method == "csq" else 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(spec.train, cfg.batch_size, shuffle=True, generator=gen, drop_last=len(spec.train) > cfg.batch_size)
    test_loader = torch.utils.data.DataLoader(spec.test, 512)
    # No weight decay on bit logits, scales and clips: decay would pull the gates to 1/2.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "bit_" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "bit_" not in n)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)
    steps = total_epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    bar = tqdm(range(start_epoch, total_epochs), desc=f"{cfg.method} {cfg.model}", unit="epoch", initial=start_epoch, total=total_epochs)
    for epoch in bar:
        torch.manual_seed(cfg.seed * 100003 + epoch)   # augmentation/init RNG: same with or without resume
        gen.manual_seed(cfg.seed * 100003 + epoch)      # shuffle order
        method.on_epoch(epoch)
        model.train()
        method.harden(False)
        loss_sum, t0 = 0.0, time.time()
        for step, (x, y) in enumerate(train_loader):
            x, y = x.to(device), y.to(device)
            if spec.augment is not None:
                x = spec.augment(x)
            loss = F.cross_entropy(model(x), y) + method.regularizer().to(device)
            if not torch.isfinite(loss):
                raise TrainError(f"loss is {loss.item()} at epoch {epoch} step {step}; training stopped, "
                                 f"last good checkpoint kept at {ckpt_path}" if ckpt_path.exists() else
                                 f"loss is {loss.item()} at epoch {epoch} step {step}; training stopped (no checkpoint yet)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        method.harden(True)
        acc = evaluate(model, test_loader, device)
        layers = method.export_bits()
        row = {"epoch": epoch, "loss": loss_sum / len(train_loader), "accuracy": acc,
               "beta": getattr(method, "beta", None), "avg_precision": sum(r["precision"] for r in layers) / len(layers),
               "seconds": time.time() - t0, **{f"prec:{r['name']}": r["precision"] for r in layers}}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{acc:.1f}", bits=f"{row['avg_precision']:.2f}")
        atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "config": cfg.to_dict(), "epoch": epoch, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "history": history}, ckpt_path)
    model.cpu()
    method.harden(True)
    metrics = summarize(model, method, cfg, history, spec)
    write_reports(out, metrics, history)
    return metrics


def summarize(model, method, cfg, history, spec) -> dict:
    layers = method.export_bits()
    params = sum(r["params"] for r in layers)
    storage = sum(r["params"] * r["storage_bits"] for r in layers) / params
    return {
        "model": cfg.model, "dataset": cfg.dataset, "method": cfg.method,
        "target_bits": cfg.target_bits if cfg.method == "csq" else cfg.weight_bits, "act_bits": cfg.act_bits,
        "accuracy": history[-1]["accuracy"] if history else None, "test_images": len(spec.test),
        "avg_bits": sum(r["precision"] for r in layers) / len(layers),
        "avg_bits_weighted": sum(r["params"] * r["precision"] for r in layers) / params,
        "storage_bits": storage, "compression": 32.0 / storage, "params": params,
        "epochs": len(history), "layers": layers,
    }


def write_reports(out: Path, metrics: dict, history: list):
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    keys = list(history[0]) if history else []
    tmp = out / f".history.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")
    plot(out, metrics, history)


def plot(out: Path, metrics: dict, history: list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"] for r in metrics["layers"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    epochs = [h["epoch"] for h in history]
    for n in names:
        ax.plot(epochs, [h[f"prec:{n}"] for h in history], lw=1, alpha=0.6)
    ax.plot(epochs, [h["avg_precision"] for h in history], "k", lw=2.5, label="average")
    ax.set(xlabel="epoch", ylabel="precision (kept bits)", title=f"{metrics['method']} {metrics['model']}: per-layer precision")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "precision.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    x = range(len(names))
    ax.bar(x, [r["storage_bits"] for r in metrics["layers"]], color="#cbd5e8", label="storage bits (span + sign)")
    ax.bar(x, [r["precision"] for r in metrics["layers"]], color="#386cb0", label="precision (kept bits)")
    ax.set_xticks(list(x), names, rotation=70, fontsize=7)
    ax.set(ylabel="bits", title=f"final bit-widths: avg {metrics['avg_bits']:.2f}, acc {metrics['accuracy']:.2f}%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bits.png", dpi=110)
    plt.close(fig)
