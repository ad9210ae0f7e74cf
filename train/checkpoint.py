"""The checkpoint: what a run leaves for --resume and for freeze.

RUN_DIR/checkpoint.pt   {"model", "config", "epoch", "optimizers", "schedulers", "history"}, for a
                        user model its source ("model_source": models.model_source), and,
                        once the run has finished, "metrics": its training facts (TRAINING_FACTS,
                        what freeze records in the frozen manifest for deploy to report)
                        (loads with torch.load(weights_only=True); written atomically per epoch)

`restore_model` is the one path from a checkpoint back to (model, method, config), used by
--resume and freeze alike. Checkpoints without "metrics" (a run stopped mid-way, or written
before the metrics were kept in it) still load; training_facts then tells what they hold."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mixq import fsio
from mixq.train.budget import measures
from mixq.train.config import DERIVED, TrainConfig, build
from mixq.train.errors import TrainError
from mixq.train.methods.base import bit_summary

CHECKPOINT_KEYS = {"model", "config", "epoch"}
RESUME_KEYS = CHECKPOINT_KEYS | {"optimizers", "schedulers", "history"}
# metrics.json keys that travel with the trained model: checkpoint -> frozen manifest -> deploy report
TRAINING_FACTS = ("method", "recipe", "target_bits", "budget", "weight_bits", "act_bits", "avg_bits", "storage_bits",
                  "weight_kib", "gbops", "accuracy", "relaxed_accuracy", "int_accuracy", "int_agreement", "test_images", "epochs")


def load_checkpoint(path) -> dict:
    """Read a mixq checkpoint; one-line error for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise TrainError(f"{path}: not a readable mixq checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise TrainError(f"{path}: not a mixq checkpoint (missing model/config/epoch)")
    return ckpt


def restore_model(ckpt: dict, path="checkpoint"):
    """Rebuild (model, method, config) from a checkpoint: the one path used by resume and freeze."""
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model, method = build(cfg, source=ckpt.get("model_source"))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError, KeyError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{path}: checkpoint does not match its model config ({msg[:200]})") from None
    return model, method, cfg


def resume_state(ckpt_path: Path, cfg: TrainConfig) -> dict:
    if not ckpt_path.exists():
        raise TrainError(f"--resume: {ckpt_path} does not exist (nothing to resume)")
    state = load_checkpoint(ckpt_path)
    if not RESUME_KEYS <= set(state):
        raise TrainError(f"{ckpt_path}: not resumable (no optimizer state: not written by mixq train)")
    differ = config_difference(state, cfg, ckpt_path)
    if differ:
        raise TrainError(f"{ckpt_path}: --resume with a different configuration than the run's ({differ})")
    return state


def config_difference(ckpt: dict, cfg: TrainConfig, ckpt_path="checkpoint") -> str | None:
    """"OPTION: run has X, now Y" for the first option in which the run that wrote `ckpt` was
    configured otherwise than `cfg` (the device may differ; what the data set sets is not
    compared); None when the configurations agree (--resume, and `mixq sweep` finding a run)."""
    try:
        saved = TrainConfig.from_dict(ckpt["config"]).to_dict()
    except (ValueError, TypeError) as e:
        raise TrainError(f"{ckpt_path}: checkpoint config is not a mixq config ({e})") from None
    wanted = cfg.to_dict()
    for d in (saved, wanted):   # `mixq train` stores --data-dir absolute; runs from before kept it as typed
        d["data_dir"] = os.path.abspath(d["data_dir"]) if d["data_dir"] else d["data_dir"]
    derived = {"device"} | DERIVED         # device may change; the others come from the data
    differ = [k for k in wanted if k not in derived and saved[k] != wanted[k]]
    return f"{differ[0]}: run has {saved[differ[0]]!r}, now {wanted[differ[0]]!r}" if differ else None


def save_checkpoint(path: Path, model, cfg: TrainConfig, epoch: int, history: list, opts: dict, scheds: dict,
                    metrics: dict | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.torch_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "config": cfg.to_dict(), "epoch": epoch, "history": history,
                     "optimizers": {k: o.state_dict() for k, o in opts.items()},
                     "schedulers": {k: s.state_dict() for k, s in scheds.items()},
                     **({"metrics": metrics} if metrics is not None else {}),
                     **({"model_source": model.source} if getattr(model, "source", None) else {})}, path, TrainError)


def config_facts(cfg: TrainConfig) -> dict:
    """The run's identity as metrics.json starts: model, data, method, budget, activation bits."""
    mixed = cfg.method_class().mixed
    return {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method, "recipe": cfg.recipe,
            "target_bits": cfg.target_bits if mixed else cfg.weight_bits,
            "budget": str(cfg.budget_spec()) if mixed else None,
            "weight_bits": cfg.weight_bits if not mixed else None, "act_bits": cfg.act_bits}


def training_facts(ckpt: dict, cfg: TrainConfig, method) -> dict:
    """TRAINING_FACTS of the run that wrote `ckpt`: the finished run's metrics it carries, else
    what the checkpoint itself holds (its last epoch's accuracy, its layers' bits; no integer
    accuracy: that is measured when a run finishes)."""
    if isinstance(ckpt.get("metrics"), dict):
        return {k: ckpt["metrics"].get(k) for k in TRAINING_FACTS}
    history = ckpt.get("history") or []
    last = history[-1] if history else {}
    layers = method.export_bits()
    known = {**config_facts(cfg), **bit_summary(layers), **(measures(layers, method.facts) if method.facts else {}),
             "accuracy": last.get("accuracy"),
             "relaxed_accuracy": last.get("relaxed_accuracy"), "epochs": len(history) or None}
    return {k: known.get(k) for k in TRAINING_FACTS}
