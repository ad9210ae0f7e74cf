"""BSQ and CLADO, CSQ's peers on the same pipeline: their layers' formulas and exact integers,
BSQ's re-quantization and precision adjustment, CLADO's program solver, and each method end to
end on digits (budget met, frozen integer program == trained model's integer simulation)."""
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixq import cli, data, graph as G, intsim
from mixq.train.budget import Costs
from mixq.train.methods import bsq, clado
from mixq.train.config import TrainConfig
from mixq.train.checkpoint import load_checkpoint, restore_model
from mixq.train_command import train

from conftest import golden_matches_intsim


def bsq_layer(seed=0, shape=(6, 3, 3, 3)):
    torch.manual_seed(seed)
    return bsq.BSQConv2d.from_float(nn.Conv2d(shape[1], shape[0], shape[2], bias=False))


# ----------------------------------------------------------------------------- BSQ layers
def test_bsq_starts_at_the_8bit_rounding_of_the_float_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, bias=False)
    layer = bsq.BSQConv2d.from_float(conv)
    w = conv.weight.detach()
    s = w.abs().max()
    assert torch.equal(layer.bsq_weight().detach(), torch.round(w / s * 255) * (s / 255))
    assert layer.bit_info().kept == list(range(8)) and layer.bit_info().storage_bits == 9
    assert set(layer.bit_planes_pos.unique().tolist()) <= {0.0, 1.0}


def test_bsq_weight_is_the_rounded_plane_sum_with_a_straight_through_gradient():
    layer = bsq_layer()
    with torch.no_grad():
        layer.bit_planes_pos.uniform_(0, 2)
        layer.bit_planes_neg.uniform_(0, 2)
        layer.requantize(2, 5)                              # span [2, 5]: 4 magnitude bits
        layer.bit_planes_pos.add_(torch.rand_like(layer.bit_planes_pos) * 0.4)   # continuous again
    w = layer.bsq_weight()
    coef = torch.tensor([0, 0, 1, 2, 4, 8, 0, 0], dtype=torch.float32)
    v = torch.tensordot(coef, layer.bit_planes_pos - layer.bit_planes_neg, dims=1)
    step = layer.scale.abs() / 255 * 4
    want = torch.clamp(torch.round(v), -15, 15) * step
    assert torch.equal(w.detach(), want.detach())
    # straight through round, zero gradient where clipped
    w.sum().backward()
    inside = (torch.round(v).abs() <= 15).float()
    assert torch.allclose(layer.bit_planes_pos.grad[3], 2 * step.detach() * inside)
    assert torch.all(layer.bit_planes_pos.grad[0] == 0) and torch.all(layer.bit_planes_pos.grad[7] == 0)


def test_bsq_integer_weight_is_exact_and_within_its_span():
    layer = bsq_layer(1)
    with torch.no_grad():
        layer.bit_planes_pos.uniform_(0, 2)
        layer.bit_planes_neg.uniform_(0, 2)
        layer.requantize(3, 6)
    q, scale = layer.integer_weight()
    assert q.abs().max() <= 15 and (q != 0).any()
    # the forward's float32 weight is q times the returned scale (a float32 value), in float32
    assert torch.equal(layer.bsq_weight().detach(), q.float() * torch.tensor(scale, dtype=torch.float32))
    info = layer.bit_info()
    assert info.kept == [3, 4, 5, 6] and info.precision == 4 and info.storage_bits == 5


def test_requantize_writes_binary_planes_and_rounds_to_the_new_span():
    layer = bsq_layer(2)
    q8, _ = layer.integer_weight()                          # span [0, 7]
    layer.requantize(0, 7)
    assert torch.equal(layer.integer_weight()[0], q8)       # same span: nothing changes
    assert set(layer.bit_planes_neg.unique().tolist()) <= {0.0, 1.0}
    layer.requantize(2, 6)                                  # drop bit 7 (clip) and bits 0-1 (round)
    q, _ = layer.integer_weight()
    want = torch.clamp(torch.div(q8 + 2, 4, rounding_mode="floor"), -31, 31)
    assert torch.equal(q, want)


def test_group_lasso_is_the_sum_of_plane_norms_over_the_span():
    layer = bsq_layer(3)
    layer.requantize(1, 4)
    p, n = layer.bit_planes_pos.detach(), layer.bit_planes_neg.detach()
    want = sum(torch.sqrt((p[b] ** 2).sum() + (n[b] ** 2).sum()) for b in range(1, 5))
    assert torch.allclose(layer.group_lasso(), want)


def test_precision_adjustment_drops_empty_planes_first_and_keeps_one_bit():
    method = bsq.BSQ(8, target_bits=1.0, epochs=10)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    method.prepare(net)
    conv, fc = method.layers()
    with torch.no_grad():                                   # conv: only bits 2..3 used
        conv.bit_planes_pos.zero_()
        conv.bit_planes_neg.zero_()
        conv.bit_planes_pos[2:4] = 1.0
    method.adjust(allowed=8.0)                              # schedule allows all; empty planes still go
    assert conv.span() == (2, 3)
    assert fc.span() == (0, 7)
    method.adjust(allowed=1.0)
    assert conv.span()[1] == conv.span()[0] and fc.span()[1] == fc.span()[0]


# ----------------------------------------------------------------------------- CLADO
def toy_program(n, choices, seed):
    rng = np.random.default_rng(seed)
    diag = {(i, p): float(rng.uniform(0, 1) * 2.0 ** -p) for i in range(n) for p in choices}
    cross = {(i, j, p, q): float(rng.normal(0, 0.05) * 2.0 ** -(p + q) * 4)
             for i in range(n) for j in range(i + 1, n) for p in choices for q in choices}
    return diag, cross


def program_cost(b, diag, cross):
    n = len(b)
    return sum(diag[i, b[i]] for i in range(n)) + sum(cross[i, j, b[i], b[j]] for i in range(n) for j in range(i + 1, n))


def test_clado_solver_is_exact_on_small_programs():
    choices = [1, 2, 3, 4, 5]
    for seed in range(5):
        diag, cross = toy_program(4, choices, seed)
        got = clado.solve(diag, cross, 4, choices, Costs.mean_bits(3.0, 4))
        best = min((b for b in itertools.product(choices, repeat=4) if sum(b) <= 12),
                   key=lambda b: program_cost(b, diag, cross))
        assert list(best) == got


def test_clado_cross_terms_change_the_choice():
    # two layers, budget 2 bits on average: alone, each prefers the other to drop; the pair term
    # makes (1, 3) much worse than (3, 1)
    choices = [1, 2, 3]
    diag = {(0, 1): 1.0, (0, 2): 0.5, (0, 3): 0.0, (1, 1): 0.9, (1, 2): 0.6, (1, 3): 0.0}
    cross = {(0, 1, p, q): 0.0 for p in choices for q in choices}
    assert clado.solve(diag, cross, 2, choices, Costs.mean_bits(2.0, 2)) == [3, 1]
    cross[0, 1, 3, 1] = 5.0
    assert clado.solve(diag, cross, 2, choices, Costs.mean_bits(2.0, 2)) == [1, 3]


def test_clado_large_programs_meet_the_budget_and_beat_uniform():
    choices = clado.candidates(3.0)
    n = 9                                                      # 5^9 > 200k: greedy + exchange
    diag, cross = toy_program(n, choices, 7)
    got = clado.solve(diag, cross, n, choices, Costs.mean_bits(3.0, n))
    assert sum(got) <= 3 * n and all(b in choices for b in got)
    assert program_cost(got, diag, cross) <= program_cost([3] * n, diag, cross) + 1e-12


# ----------------------------------------------------------------------------- end to end on digits
@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("peers")
    runs = {}
    for method in ("bsq", "clado"):
        run = base / method
        runs[method] = (run, train(TrainConfig(method=method), str(run)))
    return runs


@pytest.mark.parametrize("method", ["bsq", "clado"])
def test_peer_meets_the_budget_on_digits_and_freezes_exactly(method, peer_runs, tmp_path):
    run, m = peer_runs[method]
    n = len(m["layers"])
    assert m["method"] == method and m["target_bits"] == 3.0
    assert 3.0 - max(0.15, 1 / n) - 1e-9 <= m["avg_bits"] <= 3.0 + 1e-9, m["layers"]
    if method == "bsq":
        # CLADO may rightly choose one precision for every layer: its allocation is the exact
        # argmin of its measured sensitivities (test_clado_solver_is_exact_on_small_programs), and
        # on digits-cnn the uniform 3 bits is that argmin on some hosts (an Intel CI host) and not
        # on others (float sums differ); BSQ's pruning always leaves the layers apart here
        assert len({tuple(r["kept_bits"]) for r in m["layers"]}) > 1, "expected a mixed-precision result"
    assert m["accuracy"] >= 95.0 and m["int_accuracy"] >= m["accuracy"] - 1.0
    # the checkpoint restores to the same bits; freeze's golden program == integer simulation
    model, meth, cfg = restore_model(load_checkpoint(run / "checkpoint.pt"))
    assert [r["kept_bits"] for r in meth.export_bits()] == [r["kept_bits"] for r in m["layers"]]
    assert cli.main(["freeze", str(run / "checkpoint.pt"), "--out", str(tmp_path / "frozen")]) == 0
    g = G.load(tmp_path / "frozen")
    assert [op.attrs["kept_bits"] for op in g.ops if "weight" in op.arrays] == [r["kept_bits"] for r in m["layers"]]
    assert golden_matches_intsim(tmp_path / "frozen", model, meth, cfg) == pytest.approx(m["int_accuracy"])


def test_clado_resume_after_allocation_keeps_it(tmp_path):
    args = ["--method", "clado", "--epochs", "4", "--finetune-epochs", "2", "--train-subset", "400"]
    run = tmp_path / "run"
    assert cli.main(["train", *args, "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    _, method, _ = restore_model(ckpt)
    method.attach_data(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert method.done, "the allocation is part of the checkpoint"
    bits = [layer.weight_bits for layer in method.layers()]
    assert bits != [clado.WARMUP_BITS] * len(bits)


def test_peer_option_errors_are_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--method", "bsq", "--epochs", "3", "--finetune-epochs", "0",
                     "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method bsq needs >= 1 search and >= 1 finetune epoch" in err


def test_report_puts_the_peers_side_by_side(peer_runs, tmp_path, capsys):
    runs = [str(peer_runs[m][0]) for m in ("bsq", "clado")]
    capsys.readouterr()
    assert cli.main(["report", *runs, "--md", str(tmp_path / "t.md"), "--png", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    assert "bsq" in out and "clado" in out and "accuracy %" in out
    md = (tmp_path / "t.md").read_text().splitlines()
    assert len(md) == 4 and md[2].startswith("| bsq | bsq | 3.00 | 3.00 |")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    assert cli.main(["report", *runs, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, m in zip(rows, ("bsq", "clado")):
        metrics = peer_runs[m][1]
        assert row["accuracy"] == metrics["accuracy"] and row["avg_bits"] == metrics["avg_bits"]
        assert row["weight_kib"] == pytest.approx(metrics["params"] * metrics["storage_bits"] / 8192)
    # a directory that is not a run: one line naming it
    assert cli.main(["report", runs[0], str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}: no metrics.json" in err


# ----------------------------------------------------------------------------- per-channel scales
def test_per_channel_ste_weights_are_exact_integers_times_one_scale_per_channel():
    from mixq.train.methods.ste import STEConv2d
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 0, 6).view(6, 1, 1, 1))     # channel ranges 100x apart
    layer = STEConv2d.from_float(conv, 3, per_channel=True)
    q, scale = layer.integer_weight()
    assert isinstance(scale, list) and len(scale) == 6 and q.abs().max() <= 3
    want = q.float() * torch.tensor(scale, dtype=torch.float32).view(6, 1, 1, 1)
    assert torch.equal(layer.ste_weight().detach(), want)
    assert all((q[c] != 0).any() for c in range(6))         # per tensor, the small channels round to 0
    per_tensor = STEConv2d.from_float(conv, 3).integer_weight()[0]
    assert (per_tensor[0] == 0).all()
    # clado's per-channel clip search: one clip per channel, each within its channel's range
    clip = clado.quant.best_clip(conv.weight, 2, per_channel=True)
    assert clip.shape == (6,) and (clip <= conv.weight.abs().reshape(6, -1).max(1).values + 1e-6).all()


@pytest.mark.parametrize("method", ["ste-uniform", "clado"])
def test_per_channel_scales_train_and_freeze_exactly(method, tmp_path):
    from mixq.freeze import freeze_checkpoint
    run = tmp_path / "run"
    extra = ["--finetune-epochs", "1"] if method == "clado" else ["--weight-bits", "4"]
    assert cli.main(["train", "--method", method, "--per-channel", "--epochs", "3", "--train-subset", "400",
                     *extra, "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["int_agreement"] >= 97.0, m
    g = freeze_checkpoint(str(run / "checkpoint.pt"), str(tmp_path / "frozen"))
    convs = [o for o in g.ops if o.kind == "conv2d"]
    assert convs and all(isinstance(o.attrs["weight_scale"], list) and len(o.attrs["weight_scale"]) == o.arrays["weight"].shape[0]
                         for o in convs)
    assert all(isinstance(o.attrs["weight_scale"], float) for o in g.ops if o.kind == "linear")    # logits: one scale
    x = data.test_arrays(data.load("digits"))[0][:64]
    xq = G.quantize_input(g.input, x)
    assert np.array_equal(G.run(g, xq), intsim.IntSim(g)(xq).numpy())


def test_per_channel_is_refused_for_csq(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--method", "csq", "--per-channel", "--out", str(tmp_path / "r")]) == 2
    assert "--per-channel: for ste-uniform and clado; --method csq keeps one weight scale per layer" in capsys.readouterr().err
