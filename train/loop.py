"""The training loop (`train`: the epoch loop itself is one function, _train), then the run directory.

RUN_DIR/checkpoint.pt   model, config, optimizer state, history (train.checkpoint; written
                        atomically per epoch, and once more with the run's metrics at the end)
RUN_DIR/metrics.json    accuracy of the hardened model (and, with the `mixq train` command,
                        under integer simulation), bits, compression, per-layer table
RUN_DIR/history.csv     per epoch: loss, accuracy, beta, precision (avg and per layer)
RUN_DIR/precision.png   per-layer precision over epochs;  RUN_DIR/bits.png final bit-widths
RUN_DIR/sensitivity.json, .png   mixed methods: the loss change when one layer loses or gains a
                        bit (train.sensitivity), measured after the rest is written

Under torchrun (WORLD_SIZE > 1) every process trains on its DistributedSampler shard with the
model wrapped in DistributedDataParallel; `--batch-size` is per process (as in torchvision's
references), only rank 0 evaluates and writes. The method code does not know about it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mixq import data as datasets
from mixq import fsio
from mixq.train import quant, sensitivity
from mixq.train.budget import layer_facts, measures
from mixq.train.checkpoint import TRAINING_FACTS, config_facts, resume_state, restore_model, save_checkpoint
from mixq.train.config import TrainConfig, build
from mixq.train.errors import TrainError
from mixq.train.methods import METHODS
from mixq.train.methods.base import bit_summary
from mixq.train.surgery import check_activations

CHECK_EVERY = 50        # steps between host reads of the non-finite-loss flag


# ----------------------------------------------------------------------------- plumbing
@dataclass
class Proc:
    """This process's place in a (possibly single-process) run."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name}: not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    return dev


def start_process(cfg: TrainConfig) -> Proc:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Proc(device=pick_device(cfg.device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Proc(dist.get_rank(), dist.get_world_size(), device)


@torch.no_grad()
def predict(model, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) over a loader, on CPU."""
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


# ----------------------------------------------------------------------------- optimization
def make_optimizers(model, cfg: TrainConfig) -> dict:
    """Optimizers on one cosine schedule.

    --recipe paper: one SGD (momentum 0.9, weight decay) over every parameter, bit and mask
    logits included, as the paper and the authors' code train CSQ.

    mixq: SGD (Nesterov momentum, lr) for the float parameters (weights, BN, CSQ scales, PACT
    clips) and for the CSQ bit-mask logits m_B (no weight decay on the latter: decay would
    pull the gates to 1/2). The mask moves by plain gradient steps as in the paper, so the
    budget term and the task loss weigh against each other by their true magnitudes, and a
    mask logit that has left the gate's transition region (|beta * m_B| >> 1) stops moving.
    The bit logits m_p, m_n use --bit-optimizer at --bit-lr: "sgd" (no decay) has the same
    property; "adam" normalizes each element's step, so every bit plane moves at the same rate
    whatever its 2^b factor, but a saturated gate's vanishing gradient is normalized back to a
    full step, so a decided digit can still flip late in the search.

    Which parameters are bit logits (or BSQ's bit planes: "bits") and which are gates (CSQ's
    mask logits) is the method's to say (Method.bit_params, gate_params)."""
    params = list(model.named_parameters())
    if cfg.recipe == "paper":
        return {"sgd": torch.optim.SGD([p for _, p in params], lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)}
    role = cfg.method_class().param_role
    bits = [p for n, p in params if role(n) == "bits"]
    masks = [p for n, p in params if role(n) == "gates"]
    decay = [p for n, p in params if role(n) is None and p.ndim > 1]
    rest = [p for n, p in params if role(n) is None and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest + masks, "weight_decay": 0.0}]
    if bits and cfg.bit_optimizer == "sgd":
        groups.append({"params": bits, "weight_decay": 0.0, "lr": cfg.bit_lr})
    opts = {"sgd": torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)}
    if bits and cfg.bit_optimizer == "adam":
        opts["adam"] = torch.optim.Adam(bits, lr=cfg.bit_lr, fused=True)
    return opts


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up (--lr-warmup-epochs), then cosine decay over the search phase,
    restarted for the finetune phase (its beta restarts too)."""
    search = cfg.search() * steps_per_epoch
    warm = cfg.lr_warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if step < search:
        t, span = step - warm, search - warm
    elif not cfg.finetune():
        return 0.0                                      # after the last step: nothing left to train
    else:
        t, span = step - search, cfg.finetune() * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * min(t / max(span, 1), 1.0)))


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, out_dir: str, resume: bool = False, evaluate=None, check=None) -> dict:
    """Train `cfg` into the run directory `out_dir` (resume: continue its checkpoint); returns
    metrics.json's content (None on the other processes under torchrun).

    check(model, method, cfg), when given, vets the freshly built model before any training
    (and before the warm-up's): the `mixq train` command dry-runs freeze there, so a net with
    ops freeze cannot take is refused in one message naming them all. Without it, the train
    stage's own check applies (surgery.check_activations: activations left float).

    evaluate(model, cfg, spec) -> dict, when given, adds measurements of the finished, hardened
    model (on the CPU) to metrics.json, before the bit figures; the warm-up sub-run gets it
    too. It is how the `mixq train` command (mixq/train_command.py) adds the accuracy of the
    integer program (mixq.intsim): a callback, not an import, because the train stage comes
    before freeze and imports nothing of it, and not a second pass after train() returns,
    because metrics.json is then written once, complete (it also marks a finished run, e.g.
    a finished warm-up), and the checkpoint carries those facts to freeze."""
    # Saturated CSQ gates make denormal floats (sig(-100) ~ 4e-44; tiny gradients squared in
    # Adam's second moment); x86 handles those 10-100x slower. Flushing them to zero changes
    # nothing that matters numerically and makes Adam on the bit logits ~8x faster. The mode is
    # per thread: OpenMP workers inherit it only if they start after this line, as they do in
    # `mixq train` (here, before any parallel torch op of the process).
    cfg.validate()
    # one run per directory (rank 0 holds it under torchrun), released when the run ends,
    # however it ends: explicitly, because a reference cycle through _train's frame would keep
    # it until the garbage collector runs (`mixq sweep` trains many runs in one process)
    lock = fsio.DirLock(Path(out_dir), TrainError) if os.environ.get("RANK", "0") == "0" else None
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, out_dir, resume, evaluate, check)
    finally:
        torch.set_flush_denormal(False)
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, out_dir: str, resume: bool = False, evaluate=None, check=None) -> dict:
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    sub_runs = cfg.method_class().sub_runs(cfg)
    # a run killed during its warm-up or a sub-run has no checkpoint of its own yet: it resumes that
    warming = (cfg.warmup_epochs or sub_runs) and not ckpt_path.exists()
    state = resume_state(ckpt_path, cfg) if resume and not warming else None
    init = warm_up(cfg, out, evaluate, check) if state is None and cfg.warmup_epochs else cfg.init_from
    subs = {name: sub_run(sub, out / name, evaluate, check) for name, sub in sub_runs.items()}
    proc = start_process(cfg)
    spec = datasets.load(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed, cfg.input_size)
    cfg.num_classes, cfg.input_shape, cfg.classes = spec.num_classes, spec.input_shape, spec.classes
    torch.manual_seed(cfg.seed)
    calib = datasets.calibration_images(spec)
    if state is None:
        model, method = build(cfg, init)
        if check is not None:
            check(model, method, cfg)
        else:
            check_activations(model, cfg.act_bits, cfg.model)
        calibrate(model, calib[0], cfg)
        set_budget(model, method, cfg, calib[0])      # an infeasible --budget stops here, before any report
        start_epoch, history = 0, []
        if proc.main:
            clear_reports(out)
    else:
        model, method, _ = restore_model(state, ckpt_path)
        set_budget(model, method, cfg, calib[0])
        start_epoch, history = state["epoch"] + 1, state["history"]
    method.attach_data(*calib)
    method.before_training(subs)
    model.to(proc.device)
    # under DDP the mask logits are unused parameters while the mask is frozen (finetune)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if proc.world > 1 else model
    train_loader, reseed = make_train_loader(spec, cfg, proc)
    test_loader = torch.utils.data.DataLoader(spec.test, 512, num_workers=spec.workers)
    probe_loader = test_loader      # the per-epoch rows before the last: all test images, or the first N
    if cfg.history_test_images and cfg.history_test_images < len(spec.test):
        # a fixed random sample, not the first N: an image folder's test split is sorted by
        # class, so its first 2000 CIFAR-10 images are two classes (the study's early history
        # rows measured airplanes and cars only)
        pick = torch.randperm(len(spec.test), generator=torch.Generator().manual_seed(cfg.seed))
        probe = torch.utils.data.Subset(spec.test, sorted(pick[:cfg.history_test_images].tolist()))
        probe_loader = torch.utils.data.DataLoader(probe, 512, num_workers=spec.workers)
    steps = len(train_loader)
    if proc.main and state is None:
        for line in method.advice(steps):
            print(f"mixq train: warning: {line}", file=sys.stderr)
    opts = make_optimizers(model, cfg)
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps, cfg)) for k, o in opts.items()}
    if state is not None:
        restore_optimizers(opts, scheds, state, ckpt_path)
    forward = compiled(net, cfg)

    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.method} {cfg.model}", unit="epoch",
               initial=start_epoch, total=cfg.epochs, disable=not proc.main)
    for epoch in bar:
        reseed(epoch)
        net.train()
        method.harden(False)
        t0 = time.time()
        loss_sum, reg_sum = train_epoch(forward, method, train_loader, opts, scheds, cfg, epoch, spec.augment, proc,
                                        ckpt_path)
        if proc.main:
            row = epoch_report(model, method, test_loader if epoch == cfg.epochs - 1 else probe_loader, proc.device, epoch, steps, loss_sum, reg_sum,
                               time.time() - t0, opts["sgd"])
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.1f}", bits=f"{row['avg_precision']:.2f}")
            save_checkpoint(ckpt_path, model, cfg, epoch, history, opts, scheds)
            write_history(out, history)                  # to follow a long run as it goes
        if proc.world > 1:
            dist.barrier()
    metrics = None
    if proc.main:
        model.cpu()
        method.harden(True)
        metrics = summarize(model, method, cfg, history, spec, evaluate)
        # the last checkpoint again, with the facts freeze records for deploy
        save_checkpoint(ckpt_path, model, cfg, cfg.epochs - 1, history, opts, scheds,
                        {k: metrics.get(k) for k in TRAINING_FACTS})
        write_reports(out, metrics, history)
        if method.mixed:        # why the method allocated its bits: RUN/sensitivity.{json,png}
            result = sensitivity.measure(model, method, *calib)
            sensitivity.write(out, result, sensitivity.title_of(cfg, result))
    if proc.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def train_epoch(forward, method, loader, opts: dict, scheds: dict, cfg: TrainConfig, epoch: int, augment=None,
                proc: Proc = Proc(), ckpt_path: Path | None = None) -> tuple[float, float]:
    """One epoch of steps: the method's per-epoch and per-step hooks, its task loss (cross
    entropy; SDQ's with distillation) plus its regularizer, every optimizer and scheduler
    stepped. Returns the summed loss and regularizer. `mixq train` and the Python API's fit
    (mixq.api) both train with it."""
    method.on_epoch(epoch)                          # per-epoch work (BSQ: precision; CLADO: allocation)
    steps = len(loader)
    # loss and regularizer sums and the first non-finite step stay on the device: the step
    # never waits for the host; they are read every CHECK_EVERY steps and at the epoch's end
    sums = torch.zeros(2, device=proc.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=proc.device)
    for step, (x, y) in enumerate(tqdm(loader, leave=False, unit="batch", disable=not proc.main)):
        method.on_step(epoch + step / steps)        # per-step schedule (CSQ: beta)
        x, y = x.to(proc.device, non_blocking=True), y.to(proc.device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        reg = method.regularizer().to(proc.device)
        with autocast(cfg, proc.device):
            logits = forward(x)
        loss = method.task_loss(logits.float(), y, x) + reg
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            check_finite(first_bad, epoch, ckpt_path, proc)
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        for k in opts:
            opts[k].step()
            scheds[k].step()
        method.after_step()
        sums += torch.stack([loss.detach(), reg.detach().float()])
    loss_sum, reg_sum = sums.tolist()
    return loss_sum, reg_sum


def warm_up(cfg: TrainConfig, out: Path, evaluate=None, check=None) -> str:
    """The warm-up sub-run in RUN/warmup: 8-bit STE weights (from --init-from, or the zoo's
    initialization) trained for --warmup-epochs; its float weights start the CSQ/BSQ run. A
    finished warm-up is reused, a killed one resumed."""
    warm = replace(cfg, method="ste-uniform", weight_bits=8, epochs=cfg.warmup_epochs,
                   finetune_epochs=None, warmup_epochs=0)
    return sub_run(warm, out / "warmup", evaluate, check)


def sub_run(cfg: TrainConfig, wdir: Path, evaluate=None, check=None) -> str:
    """Train `cfg` in `wdir` before the run that needs it (the warm-up; a method's sub_runs):
    a finished one (its metrics.json) is reused, a killed one resumed. Returns its checkpoint.
    Called before the run's own process group starts: a sub-run under torchrun is a run of
    its own, which ends its process group when it finishes."""
    if not (wdir / "metrics.json").exists():
        train(cfg, str(wdir), resume=(wdir / "checkpoint.pt").exists(), evaluate=evaluate, check=check)
    return str(wdir / "checkpoint.pt")


class ResidentBatches:
    """The training batches of an in-memory dataset (digits, CIFAR-10) held on the training
    device: one index permutation per epoch, then each batch is one gather there. No
    DataLoader collation, no host-to-device copy per step."""

    def __init__(self, x, y, batch_size: int, gen: torch.Generator, drop_last: bool, device):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.gen, self.drop_last = batch_size, gen, drop_last

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.gen).to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def make_train_loader(spec, cfg: TrainConfig, proc: Proc):
    """The shuffled training batches (sharded under DDP) and reseed(epoch): every random stream
    of an epoch (order, augmentation) is a function of (seed, epoch), so a resumed run repeats
    the epochs it has not done yet exactly."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if proc.world > 1:
        sampler = torch.utils.data.DistributedSampler(spec.train, proc.world, proc.rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    drop_last = len(spec.train) // proc.world > cfg.batch_size
    resident = datasets.resident_tensors(spec.train) if proc.world == 1 else None
    if resident is not None:
        loader = ResidentBatches(*resident, cfg.batch_size, gen, drop_last, proc.device)
    else:
        loader = torch.utils.data.DataLoader(spec.train, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                                             generator=gen, drop_last=drop_last, num_workers=spec.workers,
                                             pin_memory=proc.device.type == "cuda", persistent_workers=spec.workers > 0)

    def reseed(epoch: int):
        torch.manual_seed(cfg.seed * 100003 + epoch * 101 + proc.rank)     # augmentation
        gen.manual_seed(cfg.seed * 100003 + epoch)                         # order
        if sampler is not None:
            sampler.set_epoch(epoch)
    return loader, reseed


def restore_optimizers(opts: dict, scheds: dict, state: dict, ckpt_path: Path):
    try:
        for k in opts:
            opts[k].load_state_dict(state["optimizers"][k])
            scheds[k].load_state_dict(state["schedulers"][k])
    except (KeyError, ValueError, RuntimeError) as e:
        raise TrainError(f"{ckpt_path}: optimizer state does not match the model ({str(e)[:120]})") from None


REPORTS = ("checkpoint.pt", "metrics.json", "history.csv", "precision.png", "bits.png") + sensitivity.FILES


def clear_reports(out: Path):
    """A fresh run into an old run directory: remove the old run's files first, so the
    directory never mixes two runs (e.g. an old metrics.json beside a new, unfinished run)."""
    for name in REPORTS:
        (out / name).unlink(missing_ok=True)


def calibrate(model, x, cfg: TrainConfig):
    """Input scale and activation clips from the same first 2048 training images on every
    process (under DDP, rank 0's copy is broadcast anyway). This is the model's first forward:
    a model that cannot take the data set's images (digits-cnn's one input channel on RGB
    images, a user model's fixed size) is one line here, before any epoch."""
    model.input_quant.calibrate(x)
    model.train()
    with torch.no_grad():
        try:
            model(x[:256])      # ActQuant initializes its clip from the first batch it sees
        except RuntimeError as e:       # torch's shape errors
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise TrainError(f"--model {cfg.model} does not take --dataset {cfg.dataset}'s images "
                             f"{tuple(cfg.input_shape)}: {msg}") from None


def check_finite(first_bad, epoch, ckpt_path, proc):
    """Stop on the first non-finite loss of the epoch (first_bad: its step, or -1)."""
    bad = first_bad.clone()
    if proc.world > 1:      # every rank must stop together, or the others hang in all-reduce
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    step = int(bad)
    if step >= 0:
        kept = f"last good checkpoint kept at {ckpt_path}" if ckpt_path and ckpt_path.exists() else "no checkpoint was written yet"
        raise TrainError(f"loss is nan at epoch {epoch} step {step}: training stopped, {kept} "
                         "(try a smaller --lr or --bit-lr)")


def compiled(net, cfg: TrainConfig):
    """The training forward: the model itself, or torch.compile'd (--compile)."""
    if not cfg.compile:
        return net
    try:
        return torch.compile(net)
    except Exception as e:  # torch raises many types when no compiler backend is usable
        raise TrainError(f"--compile: torch.compile is not usable here ({type(e).__name__}: {str(e)[:120]})") from None


def autocast(cfg: TrainConfig, device: torch.device):
    """--amp bf16: convolutions and matmuls in bfloat16 (CSQ's weight synthesis and PACT stay
    fp32: methods.csq.CSQMixin.csq_weight runs with autocast off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")


def accuracy(model, loader, device) -> float:
    pred, labels = predict(model, loader, device)
    return 100.0 * float((pred == labels).double().mean())


def epoch_report(model, method, test_loader, device, epoch, steps, loss_sum, reg_sum, seconds, sgd) -> dict:
    """One history row. `accuracy` is the hardened network (every gate a unit step: what
    freeze exports); a relaxing method (CSQ) also reports the relaxed network it trains and
    the share of its gates not yet a step."""
    method.harden(True)
    hard = accuracy(model, test_loader, device)
    method.harden(False)
    relaxed = accuracy(model, test_loader, device) if method.relaxes else None
    layers = method.export_bits()
    counted = [r for r in layers if not r.get("fixed")]
    params = sum(r["params"] for r in counted)
    return {"epoch": epoch, "loss": loss_sum / steps, "regularizer": reg_sum / steps,
            "accuracy": hard, "relaxed_accuracy": relaxed,
            **(method.undecided() if method.relaxes else {"undecided_bits": None, "undecided_masks": None}),
            "beta": getattr(method, "beta", None), "bit_beta": getattr(method, "bit_beta", None), "lr": sgd.param_groups[0]["lr"],
            "avg_precision": sum(r["precision"] for r in counted) / len(counted),
            "avg_precision_weighted": sum(r["params"] * r["precision"] for r in counted) / params,
            "seconds": round(seconds, 3), **{f"prec:{r['name']}": r["precision"] for r in layers}}


# ----------------------------------------------------------------------------- reports
def set_budget(model, method, cfg, images):
    """What each quantized layer's bits cost (train.budget.layer_facts, from one image of the
    whole model; layers named as the method names them) and the mixed method's --budget,
    handed to the method (Method.set_budget)."""
    facts = layer_facts(model, quant.quant_layers(method.model), images, cfg.act_bits, method.fixed_names())
    method.set_budget(facts, cfg.budget_spec())


def summarize(model, method, cfg, history, spec, evaluate=None) -> dict:
    """metrics.json: the run (config_facts), the last epoch's accuracies, evaluate()'s
    measurements, the bit figures (methods.base.bit_summary), the schedule, the layers."""
    layers = method.export_bits()
    last = history[-1] if history else {}
    return {
        **config_facts(cfg),
        "accuracy": last.get("accuracy"), "relaxed_accuracy": last.get("relaxed_accuracy"),
        "undecided_bits": last.get("undecided_bits"), "undecided_masks": last.get("undecided_masks"),
        **(evaluate(model, cfg, spec) if evaluate else {}), "test_images": len(spec.test), "train_images": len(spec.train),
        **bit_summary(layers), **(measures(layers, method.facts) if method.facts else {}),
        "epochs": len(history), "search_epochs": cfg.search(), "finetune_epochs": cfg.finetune(),
        "mask_final_epoch": method.bits_final_epoch(),
        "warmup_epochs": cfg.warmup_epochs, "init_from": cfg.init_from, "seed": cfg.seed,
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
        "layers": layers,
    }


def write_reports(out: Path, metrics: dict, history: list):
    fsio.write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n", TrainError)
    write_history(out, history)
    plot(out, metrics, history)


def write_history(out: Path, history: list):
    rows = io.StringIO(newline="")
    w = csv.DictWriter(rows, list(history[0]) if history else [])
    w.writeheader()
    w.writerows(history)
    fsio.write_text(out / "history.csv", rows.getvalue(), TrainError)


def plot(out: Path, metrics: dict, history: list):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"] for r in metrics["layers"]]
    fig, (ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True, height_ratios=(3, 2))
    epochs = [h["epoch"] + 1 for h in history]
    for n in names:
        ax.plot(epochs, [h[f"prec:{n}"] for h in history], lw=1, alpha=0.6, label=n if len(names) <= 12 else None)
    ax.plot(epochs, [h["avg_precision"] for h in history], "k", lw=2.5, label="average")
    if METHODS[metrics["method"]].mixed:
        ax.axhline(metrics["target_bits"], color="r", ls="--", lw=1, label="target")
        if metrics["finetune_epochs"]:
            ax.axvline(metrics["search_epochs"] + 0.5, color="gray", ls=":", lw=1, label="mask frozen (finetune)")
    if metrics.get("mask_final_epoch") is not None:
        for a in (ax, acc_ax):
            a.axvline(metrics["mask_final_epoch"], color="gray", ls="--", lw=1,
                      label="mask final" if a is ax else None)
    ax.set(ylabel="precision (kept bits)", ylim=(-0.2, 8.5),
           title=f"{metrics['method']} {metrics['model']}: per-layer precision, accuracy, undecided gates")
    ax.legend(fontsize=7, ncol=2)
    acc_ax.plot(epochs, [h["accuracy"] for h in history], "b", lw=2, label="hardened accuracy")
    if any(h.get("relaxed_accuracy") is not None for h in history):
        acc_ax.plot(epochs, [h["relaxed_accuracy"] for h in history], "c--", lw=1.5, label="relaxed accuracy")
        und = acc_ax.twinx()
        und.plot(epochs, [h["undecided_bits"] for h in history], color="orange", lw=1, label="undecided bit gates %")
        und.plot(epochs, [h["undecided_masks"] for h in history], color="m", lw=1, label="undecided mask gates %")
        und.set(ylabel="undecided gates % (|beta m| < 3)", ylim=(-2, 102))
        und.legend(fontsize=7, loc="center right")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy %", ylim=(0, 100))
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fsio.save_png(fig, out / "precision.png", TrainError)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    x = range(len(names))
    ax.bar(x, [r["storage_bits"] for r in metrics["layers"]], color="#cbd5e8", label="storage bits (span + sign)")
    ax.bar(x, [r["precision"] for r in metrics["layers"]], color="#386cb0", label="precision (kept bits)")
    ax.set_xticks(list(x), names, rotation=70, fontsize=7)
    acc = metrics["accuracy"]
    ax.set(ylabel="bits", title=f"final bit-widths: avg {metrics['avg_bits']:.2f}, acc "
           + (f"{acc:.2f}%" if acc is not None else "n/a"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fsio.save_png(fig, out / "bits.png", TrainError)

