"""Shared test settings, helpers and fixtures.

CIFAR: the real CIFAR-10 archive, named by MIXQ_CIFAR10; by default the workplace's
`../shared/data/cifar10-jpeg.tar.gz` beside the repository. Tests that need it skip, with the
path in the reason, when it is absent.

Fixtures: `cli_error` and `run_error` (the CLI in this process, failing with exit 2 and one
error line), `mixq` (the CLI in a subprocess), `mixq_train` (the argv of `mixq train` in a
subprocess), `trained_digits` (the session's one default CSQ run on digits, frozen),
`graphgen` (tests/graphgen.py, random integer graphs), `study` (bench/study.py), and
`nan_loss_at` (a NaN training loss at a chosen step). Helpers: `forced_model` (a random-weight
zoo model with forced bits, calibrated and hardened for freezing), `golden_matches_intsim` (a
frozen digits model computes exactly what its trained model does under integer simulation).

pytest puts this directory on sys.path (its default "prepend" import mode), so test modules
import `conftest`, `graphgen` and `importgraph` (the package's import graph) directly."""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CIFAR = Path(os.environ.get("MIXQ_CIFAR10")
             or Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")
needs_cifar = pytest.mark.skipif(not CIFAR.exists(), reason=f"{CIFAR} not present (set MIXQ_CIFAR10)")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli_error(capsys):
    """cli_error(argv) -> stderr: the CLI, run in this process, must fail with exit 2 and
    exactly one line on stderr (no traceback)."""
    def run(argv) -> str:
        capsys.readouterr()
        from mixq import cli
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err
    return run


@pytest.fixture
def run_error(capsys):
    """run_error(argv) -> the error line: a failure during training, exit 2, the progress bars,
    then one error line, no traceback."""
    def run(argv) -> str:
        capsys.readouterr()
        from mixq import cli
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        last = err.rstrip("\n").split("\n")[-1]
        assert "Traceback" not in err and last.startswith("mixq train: error: "), err
        return last
    return run


def run_mixq(*args, timeout=1800, env=None) -> subprocess.CompletedProcess:
    """`mixq ARGS...` in a subprocess (text output captured)."""
    return subprocess.run([sys.executable, "-m", "mixq.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def mixq():
    """mixq(*args, timeout=1800, env=None) -> CompletedProcess: the CLI in a subprocess."""
    return run_mixq


@pytest.fixture(scope="session")
def mixq_train():
    """mixq_train(*args) -> argv: `mixq train ARGS...` for subprocess.run / Popen."""
    def argv(*args) -> list:
        return [sys.executable, "-m", "mixq.cli", "train", *map(str, args)]
    return argv


# ----------------------------------------------------------------------------- shared runs and data
@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> dict:
    """One default-config CSQ run on digits as `mixq train` makes it (metrics with the integer
    accuracy), frozen through the CLI, per test session: {run, frozen, metrics}."""
    from mixq import cli
    from mixq.train.config import TrainConfig
    from mixq.train_command import train
    base = tmp_path_factory.mktemp("digits")
    train(TrainConfig(), str(base / "run"))
    assert cli.main(["freeze", str(base / "run/checkpoint.pt"), "--out", str(base / "frozen")]) == 0
    return {"run": base / "run", "frozen": base / "frozen",
            "metrics": json.loads((base / "run/metrics.json").read_text())}


@pytest.fixture(scope="session")
def graphgen():
    """tests/graphgen.py: random_graph(seed), random_input(graph, n, seed)."""
    import graphgen as module
    return module


@pytest.fixture(scope="session")
def study():
    """bench/study.py (the CSQ study's bookkeeping), loaded from its file."""
    spec = importlib.util.spec_from_file_location("study", REPO / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forced_model(name: str, input_shape, act_bits: int, kept_sets, calib, seed: int = 0):
    """A zoo model with random weights, random BN with some negative gammas, and activation
    clips / BN statistics calibrated on `calib` (one training-mode forward), hardened for
    freezing. kept_sets: CSQ layers with their kept bit sets forced (cycling over the layers);
    None: 4-bit ste-uniform layers (cheap to build: no per-bit logits), for structure tests."""
    import torch
    import torch.nn as nn

    from mixq.train import quant
    from mixq.train.config import TrainConfig, build
    torch.manual_seed(seed)
    method_name = "csq" if kept_sets else "ste-uniform"
    cfg = TrainConfig(model=name, method=method_name, weight_bits=4, act_bits=act_bits, num_classes=10,
                      input_shape=tuple(input_shape))
    model, method = build(cfg)
    model.input_quant.calibrate(torch.from_numpy(calib))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None                       # running stats = this batch's
            with torch.no_grad():
                sign = torch.where(torch.rand_like(m.weight) < 0.2, -1.0, 1.0)
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5) * sign)
                m.bias.copy_(torch.randn_like(m.bias) * 0.2)
    for i, (_, layer) in enumerate(quant.quant_layers(model) if kept_sets else []):
        kept = kept_sets[i % len(kept_sets)]
        with torch.no_grad():
            layer.bit_mask_logits.copy_(torch.tensor([1.0 if b in kept else -1.0 for b in range(8)]))
    method.harden(True)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calib))
    return model.eval()


def golden_matches_intsim(frozen, model, method, cfg) -> float:
    """Freeze's golden program in `frozen` computes on the digits test split exactly the logits
    of the trained model (hardened) under integer simulation; returns its accuracy (%)."""
    import numpy as np
    import torch

    from mixq import data, graph as G, intsim
    g = G.load(frozen)
    x, y = data.test_arrays(data.load("digits"))
    gold = G.run_batched(g, G.quantize_input(g.input, x))
    method.harden(True)
    sim = intsim.IntSim.from_model(model.eval(), cfg.input_shape).logits(torch.from_numpy(x)).numpy()
    assert np.array_equal(sim, gold)
    return 100.0 * float((gold.argmax(1) == y).mean())


# ----------------------------------------------------------------------------- fault injection
@pytest.fixture
def nan_loss_at(monkeypatch):
    """nan_loss_at(step): in training runs in this process, the loss becomes NaN at global step
    `step` (0-based, counted from the next run's first step). The training step computes the
    task loss with one F.cross_entropy call and nothing else in a digits CSQ run calls it, so
    that call, patched, is the step counter."""
    import torch.nn.functional as F
    real = F.cross_entropy

    def inject(step: int):
        calls = itertools.count()

        def cross_entropy(*args, **kwargs):
            loss = real(*args, **kwargs)
            return loss * float("nan") if next(calls) == step else loss
        monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    return inject
