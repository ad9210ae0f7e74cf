"""Per-layer sensitivity of a finished mixed run: how far the loss on the calibration images
moves when one layer has one bit fewer, or one bit more, and every other layer is as it is.

    RUN/sensitivity.json   {"method", "images", "base_loss", "rule", "layers": [{"name", "bits",
                           "storage_bits", "params", "loss_minus_one", "loss_plus_one",
                           "delta_minus", "delta_plus"}]}
    RUN/sensitivity.png    the two loss changes per layer, above the bits the method allocated

`mixq train` writes both at the end of every run of a mixed method (after metrics.json and the
last checkpoint, which it does not change); `mixq sensitivity RUN` measures them again from
RUN/checkpoint.pt. A user reads in them why a method allocated the bits it did: a layer whose
delta_minus is large is where a bit is expensive to take away, one whose delta_plus is clearly
negative is where one more bit would have paid.

What "one bit fewer" or "more" is, is the method's own move of a bit, answered by its layer
(`one_bit_fewer()`, `one_bit_more()`: (q, scale) of the layer re-quantized, or None where the
move does not exist): CSQ shuts the gate of its lowest kept bit (the plane is cut off, as CSQ's
mask drops it) or opens one more, with the digits its bit logits hold there; BSQ
removes its bottom plane as its precision adjustment does (the integers rounded onto the
narrower span) or adds the plane below its span from its continuous planes (above, at bit 0);
CLADO switches the layer as it switches precision (the scale re-fitted, quant.best_clip);
SDQ re-quantizes its float weight at one storage bit fewer or more over its learned clip. A
layer that answers neither (a method added later) gets the method-independent rule: its
integer weight rounded half away from zero to half the levels at twice the step for one bit
fewer, and no entry for one bit more (its integers hold nothing finer). `bits` is the layer's
precision (kept bits); a layer at 1 bit has no minus entry, one at its method's most bits no
plus entry (null).

Measured on the hardened model in eval mode, on the first SENSITIVITY_IMAGES training images
(data.calibration_images: the ones training calibrates on and the methods measure on), as the
mean cross entropy. The model is not changed: each variant is one forward pass with that
layer's forward computing with the variant's weight, restored afterwards."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mixq import data as datasets
from mixq import fsio
from mixq.train import quant
from mixq.train.checkpoint import load_checkpoint, restore_model
from mixq.train.errors import TrainError

SENSITIVITY_IMAGES = 256
FILES = ("sensitivity.json", "sensitivity.png")
GENERIC_RULE = {"minus": "the integer weight rounded half away from zero to half the levels at twice the step",
                "plus": "none (the integers hold nothing finer)"}


def generic_one_bit_fewer(layer):
    """(q, scale) of a layer that has no one_bit_fewer() of its own: its integers rounded to one
    magnitude bit fewer, half away from zero, at twice the step; None at one magnitude bit."""
    q, scale = layer.integer_weight()
    k = layer.bit_info().storage_bits - 1
    if k <= 1:
        return None
    qmax = 2 ** (k - 1) - 1
    half = torch.sign(q) * torch.div(q.abs() + 1, 2, rounding_mode="floor")
    return half.clamp(-qmax, qmax), ([2 * s for s in scale] if isinstance(scale, list) else 2 * scale)


def variant(layer, more: bool):
    """(q, scale) of the layer with one bit more or fewer (the method's move, see above), or None."""
    move = getattr(layer, "one_bit_more" if more else "one_bit_fewer", None)
    if move is not None:
        return move()
    return None if more else generic_one_bit_fewer(layer)


def as_weight(layer, q: torch.Tensor, scale) -> torch.Tensor:
    """scale * q as the layer's float32 weight (a per-channel scale, a list, along dim 0)."""
    q = q.to(torch.float32)
    if isinstance(scale, list):
        return q * torch.tensor(scale, dtype=torch.float32).view(-1, *[1] * (q.ndim - 1))
    return q * torch.tensor(scale, dtype=torch.float32)


def rule(layer) -> dict:
    """{"minus", "plus"}: what one bit fewer and one bit more are for this layer (the first
    sentence of its moves' docstrings, without the "(q, scale)" they start with)."""
    text = lambda move: " ".join(move.__doc__.split()).removeprefix("(q, scale) ").split("; None")[0]
    moves = {key: getattr(type(layer), name, None) for key, name in (("minus", "one_bit_fewer"), ("plus", "one_bit_more"))}
    return {key: text(move) if move is not None else GENERIC_RULE[key] for key, move in moves.items()}


@torch.no_grad()
def loss_with(model, layer, weight: torch.Tensor | None, x, y) -> float:
    """Mean cross entropy of `model` on (x, y) with `layer` computing with `weight` (None: as it is)."""
    if weight is not None:
        if isinstance(layer, nn.Conv2d):
            layer.forward = lambda inp: layer._conv_forward(inp, weight, layer.bias)
        else:
            layer.forward = lambda inp: F.linear(inp, weight, layer.bias)
    try:
        return float(F.cross_entropy(model(x), y))
    finally:
        if weight is not None:
            del layer.forward           # the class's forward again


@torch.no_grad()
def measure(model, method, x, y, images: int = SENSITIVITY_IMAGES, progress: bool = True) -> dict:
    """sensitivity.json's content for a hardened model: base loss and, per searched layer, the
    loss with one bit fewer and one bit more (see the module docstring)."""
    x, y = x[:images], y[:images]
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    method.harden(True)
    try:
        base = loss_with(model, None, None, x, y)
        fixed = set(method.fixed_names())
        layers = [(n, m) for n, m in quant.quant_layers(method.model) if n not in fixed]
        rows = []
        for name, layer in tqdm(layers, desc="sensitivity", unit="layer", leave=False, disable=not progress):
            info = layer.bit_info()
            losses = {}
            for more in (False, True):
                v = variant(layer, more)
                losses[more] = None if v is None else loss_with(model, layer, as_weight(layer, *v).to(device), x, y)
            rows.append({"name": name, "bits": info.precision, "storage_bits": info.storage_bits,
                         "params": int(layer.integer_weight()[0].numel()),
                         "loss_minus_one": losses[False], "loss_plus_one": losses[True],
                         "delta_minus": None if losses[False] is None else losses[False] - base,
                         "delta_plus": None if losses[True] is None else losses[True] - base})
    finally:
        model.train(was_training)
    return {"method": method.name, "images": int(len(y)), "base_loss": base,
            "rule": rule(layers[0][1]) if layers else GENERIC_RULE, "layers": rows}


def write(out: Path, result: dict, title: str = ""):
    """RUN/sensitivity.json and RUN/sensitivity.png."""
    out = Path(out)
    fsio.write_text(out / "sensitivity.json", json.dumps(result, indent=1) + "\n", TrainError)
    plot(result, out / "sensitivity.png", title)


def plot(result: dict, path: Path, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["layers"]
    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, (ax, bits_ax) = plt.subplots(2, 1, figsize=(max(7.0, 0.42 * len(rows) + 2), 6.5), sharex=True,
                                      height_ratios=(3, 1.3))
    for offset, key, color, label in ((-0.2, "delta_minus", "#d95f02", "one bit fewer"),
                                      (0.2, "delta_plus", "#1b9e77", "one bit more")):
        ax.bar([i + offset for i in x], [r[key] or 0.0 for r in rows], 0.4, color=color, label=label)
        for i, r in zip(x, rows):
            if r[key] is None:          # no such move (1 bit, or the method's most bits)
                ax.text(i + offset, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color=color)
    deltas = [abs(r[k]) for r in rows for k in ("delta_minus", "delta_plus") if r[k]]
    ax.set_yscale("symlog", linthresh=max(min(deltas, default=1e-3), 1e-4))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel(f"loss change, {result['images']} calibration images", fontsize=9)
    ax.set_title(title or f"{result['method']}: per-layer sensitivity (base loss {result['base_loss']:.3f})",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    bits_ax.bar(x, [r["storage_bits"] for r in rows], color="#cbd5e8", label="storage bits (span + sign)")
    bits_ax.bar(x, [r["bits"] for r in rows], color="#386cb0", label="precision (kept bits)")
    bits_ax.set(ylabel="allocated bits")
    bits_ax.set_xticks(list(x), names, rotation=70, fontsize=7)
    bits_ax.legend(fontsize=7)
    fig.tight_layout()
    fsio.save_png(fig, path, TrainError)


def for_run(run_dir, progress: bool = True) -> dict:
    """Measure a finished mixed run again from RUN/checkpoint.pt on the same calibration images
    (its dataset, subset and seed, as recorded), and write RUN/sensitivity.{json,png}."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt.get("metrics"), dict):
        raise TrainError(f"{ckpt_path}: the run has not finished (sensitivity is measured at its final bits)")
    model, method, cfg = restore_model(ckpt, ckpt_path)
    if not method.mixed:
        raise TrainError(f"{run_dir}: a --method {cfg.method} run has one precision for every layer; "
                         "sensitivity is measured for the mixed methods")
    spec = datasets.load(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed, cfg.input_size)
    x, y = datasets.calibration_images(spec, SENSITIVITY_IMAGES)
    result = measure(model, method, x, y, progress=progress)
    write(run_dir, result, title_of(cfg, result))
    return result


def title_of(cfg, result: dict) -> str:
    return (f"{cfg.method} {cfg.model}, budget {cfg.budget_spec()}: per-layer sensitivity\n"
            f"loss change when one layer loses or gains a bit (base loss {result['base_loss']:.3f})")


# ----------------------------------------------------------------------------- command
def add_arguments(p):
    p.add_argument("run", help="a run directory of a mixed method (RUN/checkpoint.pt from mixq train)")


def run(args) -> int:
    result = for_run(args.run)
    worst = sorted((r for r in result["layers"] if r["delta_minus"] is not None), key=lambda r: -r["delta_minus"])
    print(f"base loss {result['base_loss']:.4f} on {result['images']} calibration images; most sensitive to one bit "
          f"fewer: " + ", ".join(f"{r['name']} ({r['bits']} bits, {r['delta_minus']:+.4f})" for r in worst[:3]))
    print(f"-> {Path(args.run) / 'sensitivity.json'}, {Path(args.run) / 'sensitivity.png'}")
    return 0
