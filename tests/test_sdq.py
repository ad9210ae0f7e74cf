"""SDQ (train/methods/sdq.py): its formulas against twins written out by hand (the stochastic
weight and its gradient to the DBP, the entropy-aware bin regularizer, the distillation loss),
the pair moving down, the bits fixed within the budget, the budget term, the teacher options'
one-line errors, and small digits runs: a distilled run that freezes to exactly its integer
simulation and resumes across the fixing of its bits to identical metrics; the slow test
compiles and deploys it bit-exact."""
import csv
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq import cli
from mixq.train import budget as B, loop, quant
from mixq.train.checkpoint import load_checkpoint, restore_model
from mixq.train.config import TrainConfig, build
from mixq.train.methods import sdq

from conftest import golden_matches_intsim

SMALL = ["--epochs", "5", "--finetune-epochs", "2", "--train-subset", "400", "--budget", "size=22"]


def q_by_hand(w: float, clip: float, bits: int) -> float:
    """The uniform quantizer, one weight at a time: step clip / (2^(k-1) - 1), rounding half to even."""
    qmax = 2 ** (bits - 1) - 1
    step = (clip + sdq.CLIP_EPS) / qmax
    return step * min(max(round(w / step), -qmax), qmax)


def dq_dclip_by_hand(w: float, clip: float, bits: int) -> float:
    """d Q / d clip with the rounding straight through: (round(u) - u) / qmax inside the clip,
    sign(u) beyond it (Q = +-clip there)."""
    qmax = 2 ** (bits - 1) - 1
    u = w / ((clip + sdq.CLIP_EPS) / qmax)
    return (round(u) - u) / qmax if abs(u) <= qmax else math.copysign(1.0, u)


# ----------------------------------------------------------------------------- the stochastic weight
@pytest.mark.parametrize("bits, prob, draw", [(5, 0.3, 0.1), (5, 0.3, 0.7), (3, 0.9, 0.95), (8, 1.0, 0.5)])
def test_stochastic_weight_is_the_drawn_quantizer_with_the_expectations_gradient(bits, prob, draw):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(40, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    clip = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(prob, dtype=torch.float64, requires_grad=True)
    out = sdq.stochastic_weight(w, clip, torch.tensor(bits), p, torch.tensor(draw, dtype=torch.float64))
    upper = [q_by_hand(x, 0.45, bits) for x in w.tolist()]
    lower = [q_by_hand(x, 0.45, bits - 1) for x in w.tolist()]
    drawn, k = (upper, bits) if draw < prob else (lower, bits - 1)
    assert out.tolist() == pytest.approx(drawn, abs=1e-15)
    grad_out = torch.randn(40, generator=g, dtype=torch.float64)
    gw, gclip, gp = torch.autograd.grad(out, (w, clip, p), grad_out)
    # DBP: the gradient of the expected weight p Q_b + (1 - p) Q_{b-1}, whichever was drawn
    assert float(gp) == pytest.approx(sum(d * (a - b) for d, a, b in zip(grad_out.tolist(), upper, lower)))
    # weights: straight through inside the drawn quantizer's clip, 0 beyond it
    qmax = 2 ** (k - 1) - 1
    inside = [abs(x / ((0.45 + sdq.CLIP_EPS) / qmax)) <= qmax for x in w.tolist()]
    assert gw.tolist() == pytest.approx([d * i for d, i in zip(grad_out.tolist(), inside)])
    dclip = [dq_dclip_by_hand(x, 0.45, k) for x in w.tolist()]
    assert float(gclip) == pytest.approx(sum(d * c for d, c in zip(grad_out.tolist(), dclip)))


def sdq_conv(seed=0, cin=3, cout=4):
    torch.manual_seed(seed)
    return sdq.SDQConv2d.from_float(nn.Conv2d(cin, cout, 3))


def test_a_layer_draws_once_per_step_and_scales_the_clips_gradient_as_lsq():
    layer = sdq_conv()
    with torch.no_grad():
        layer.bits.fill_(5)
        layer.bit_prob.fill_(0.4)
    torch.manual_seed(7)
    draw = torch.rand(())
    torch.manual_seed(7)
    w = layer.sdq_weight()
    want = sdq.stochastic_weight(layer.weight, layer.clip.abs(), layer.bits, layer.bit_prob, draw)
    assert torch.equal(w, want)
    gw = torch.randn_like(w)
    got = torch.autograd.grad(w, layer.clip, gw)[0]
    plain = torch.autograd.grad(want, layer.clip, gw)[0]
    g = (2 ** 4 - 1) ** 1.5 / math.sqrt(layer.weight.numel())        # qmax of the pair's upper bits
    assert float(got) == pytest.approx(float(plain) * g, rel=1e-5)
    # not training, or hardened: the more probable bits (b - 1 here, DBP < 1/2), no draw
    layer.eval()
    assert torch.equal(layer.sdq_weight(), sdq.uniform_weight(layer.weight, layer.clip.abs(), torch.tensor(4)))


def test_the_pair_moves_down_when_the_dbp_reaches_zero_keeping_the_weight():
    layer = sdq_conv(1)
    layer.eval()
    with torch.no_grad():
        layer.bits.fill_(6)
        layer.bit_prob.fill_(-0.03)                 # an SGD step past 0
    before = layer.sdq_weight().detach().clone()
    layer.move_down()
    assert int(layer.bits) == 5 and float(layer.bit_prob.detach()) == 1.0
    assert torch.equal(layer.sdq_weight(), before) and int(layer.chosen_bits()) == 5
    assert float(layer.expected_bits().detach()) == 5.0
    with torch.no_grad():
        layer.bits.fill_(sdq.LOW_BITS + 1)          # the lowest pair (3, 2): it stays, at 2 bits
        layer.bit_prob.fill_(-0.5)
    layer.move_down()
    assert int(layer.bits) == 3 and float(layer.bit_prob.detach()) == 0.0 and int(layer.chosen_bits()) == 2
    with torch.no_grad():
        layer.bit_prob.fill_(1.7)
    layer.move_down()
    assert float(layer.bit_prob.detach()) == 1.0 and int(layer.bits) == 3


@pytest.mark.parametrize("bits, prob", [(8, 1.0), (5, 0.2), (3, 0.0), (4, 0.5)])
def test_integer_weight_is_exact_at_the_chosen_bits(bits, prob):
    layer = sdq_conv(2)
    with torch.no_grad():
        layer.bits.fill_(bits)
        layer.bit_prob.fill_(prob)
        layer.clip.mul_(0.6)                        # some weights beyond the clip
    layer.hard = True
    chosen = bits - (prob < 0.5)
    q, scale = layer.integer_weight()
    assert int(q.abs().max()) == 2 ** (chosen - 1) - 1
    assert torch.equal(layer.sdq_weight().detach(), q.float() * torch.tensor(scale, dtype=torch.float32))
    info = layer.bit_info()
    assert info.storage_bits == chosen and info.precision == chosen - 1 and info.kept == list(range(chosen - 1))


# ----------------------------------------------------------------------------- EBR
def ebr_by_hand(w: torch.Tensor, step: float, qmax: int) -> torch.Tensor:
    """Bin by bin: the weights (in steps, clipped to the last bin's edge) of each level, their
    mean's squared distance from it plus their variance, weighted by the bin's share of the entropy."""
    u = torch.clamp(w.flatten() / step, -qmax - 0.5, qmax + 0.5)
    levels = torch.clamp(torch.round(u.detach()), -qmax, qmax)
    terms, entropies = [], []
    for k in range(-qmax, qmax + 1):
        members = u[levels == k]
        if len(members):
            p = len(members) / len(u)
            entropies.append(-p * math.log(p))
            terms.append((members.mean() - k) ** 2 + ((members - members.mean()) ** 2).mean())
    if sum(entropies) == 0:
        return terms[0]
    return sum(h / sum(entropies) * t for h, t in zip(entropies, terms))


@pytest.mark.parametrize("qmax, spread", [(1, 0.6), (3, 1.0), (7, 2.5), (127, 40.0)])
def test_entropy_bin_regularizer_matches_the_bins_by_hand(qmax, spread):
    g = torch.Generator().manual_seed(qmax)
    w = (torch.randn(300, generator=g, dtype=torch.float64) * spread * 0.1).requires_grad_()
    step = torch.tensor(0.1, dtype=torch.float64)
    got = sdq.entropy_bin_regularizer(w, step, torch.tensor(float(qmax), dtype=torch.float64))
    want = ebr_by_hand(w, 0.1, qmax)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0], rtol=1e-4, atol=1e-9)


def test_ebr_of_one_occupied_bin_and_of_exact_levels():
    w = torch.full((50,), 0.004, dtype=torch.float64)
    w[::2] = -0.003
    step, qmax = torch.tensor(0.1, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    assert float(sdq.entropy_bin_regularizer(w, step, qmax)) == pytest.approx(float(ebr_by_hand(w, 0.1, 3)))
    on_levels = torch.tensor([-0.3, -0.1, 0.0, 0.0, 0.1, 0.2], dtype=torch.float64)
    assert float(sdq.entropy_bin_regularizer(on_levels, step, qmax)) == pytest.approx(0.0, abs=1e-20)


# ----------------------------------------------------------------------------- the method
def value(t: torch.Tensor) -> float:
    return float(t.detach())


def digits_sdq(budget="size=20", **kw):
    cfg = TrainConfig(method="sdq", budget=budget, **kw)
    model, method = build(cfg)
    facts = B.layer_facts(model, quant.quant_layers(method.model), torch.zeros(2, 1, 8, 8), cfg.act_bits)
    method.set_budget(facts, cfg.budget_spec())
    return model, method


def test_the_budget_term_pushes_each_dbp_with_its_share_of_the_cost_while_over_the_allowance():
    _, method = digits_sdq()
    layers, costs = method.layers(), method.costs
    assert value(method.regularizer()) == 0.0               # at the start every layer is at the allowance
    method.on_step(method.epochs * sdq.REACH)              # the allowance is the budget now
    assert method.allowance() == pytest.approx(20.0)
    reg = method.regularizer()
    expected = [value(layer.expected_bits()) for layer in layers]
    over = costs.excess(costs.measure([(b - 1, b) for b in expected])) - costs.excess(20.0)
    assert value(reg) == pytest.approx(method.lam * len(layers) / 2 * over ** 2, rel=1e-5)
    grads = torch.autograd.grad(reg, [layer.bit_prob for layer in layers])
    want = [method.lam * over * w for w in costs.weights()]
    assert [float(g) for g in grads] == pytest.approx(want, rel=1e-5)
    method.fix_bits()
    assert value(method.regularizer()) > 0 and method.fixed                 # now EBR
    method.ebr_weight = 0.0
    assert value(method.regularizer()) == 0.0


def test_bits_are_fixed_to_the_more_probable_then_within_the_budget():
    _, method = digits_sdq("size=20")
    layers = method.layers()
    pairs = [(8, 0.9), (6, 0.3), (4, 0.6), (3, 0.2), (8, 0.7)]        # chosen: 8, 5, 4, 2, 8
    with torch.no_grad():
        for layer, (b, p) in zip(layers, pairs):
            layer.bits.fill_(b)
            layer.bit_prob.fill_(p)
    assert [int(layer.chosen_bits()) for layer in layers] == [8, 5, 4, 2, 8]
    method.fix_bits()
    rows = method.export_bits()
    kib = sum(r["params"] * r["storage_bits"] for r in rows) / 8192
    # 8,5,4,2,8 is 24.5 KiB: the bit least supported by its DBP per KiB it saves goes, until 20 holds:
    # features.6 twice (expected bits 3.6 of 4, then of 3, 2.25 KiB a bit), then features.3 (5.3 of 5)
    assert [r["storage_bits"] for r in rows] == [8, 4, 2, 2, 8] and kib == pytest.approx(18.90625)
    assert all(not layer._searching and not bool(layer.searching) for layer in layers)
    # under a roomy budget the layers leaning up gain bits while it holds
    _, method = digits_sdq("size=30")
    with torch.no_grad():
        for layer, (b, p) in zip(method.layers(), pairs):
            layer.bits.fill_(b)
            layer.bit_prob.fill_(p)
    method.fix_bits()
    rows = method.export_bits()
    kib = sum(r["params"] * r["storage_bits"] for r in rows) / 8192
    assert [r["storage_bits"] for r in rows] == [8, 7, 5, 2, 8] and 30.0 - 36864 / 8192 < kib <= 30.0


def test_distillation_loss_is_the_mix_of_cross_entropy_and_the_tempered_kl():
    _, method = digits_sdq(kd_weight=0.3, kd_temperature=2.0)
    torch.manual_seed(0)
    method.teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y, z = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    assert float(method.task_loss(z, y, x)) == pytest.approx(float(F.cross_entropy(z, y)))   # searching: CE
    method.fix_bits()
    with torch.no_grad():
        t = method.teacher(x)
    p_t, log_s = F.softmax(t / 2, 1), F.log_softmax(z / 2, 1)
    kl = sum(float((p_t[i] * (torch.log(p_t[i]) - log_s[i])).sum()) for i in range(8)) / 8
    want = 0.7 * float(F.cross_entropy(z, y)) + 0.3 * 4 * kl
    assert float(method.task_loss(z, y, x)) == pytest.approx(want, rel=1e-5)


def test_teacher_options_are_checked_before_training(tmp_path, cli_error):
    out = tmp_path / "run"
    missing = tmp_path / "teacher.pt"
    err = cli_error(["train", "--method", "sdq", "--teacher", str(missing), "--out", str(out)])
    assert f"--teacher {missing}: no such file" in err
    assert not out.exists() or not any(out.iterdir())
    torch.save({}, missing)
    assert "--teacher: for sdq" in cli_error(["train", "--teacher", str(missing), "--out", str(out)])
    assert "--teacher-epochs: for sdq" in cli_error(["train", "--method", "bsq", "--teacher-epochs", "2",
                                                     "--out", str(out)])
    assert "give one of them" in cli_error(["train", "--method", "sdq", "--teacher", str(missing),
                                            "--teacher-epochs", "2", "--out", str(out)])
    assert "--kd-weight 1.5: must be in [0, 1]" in cli_error(["train", "--method", "sdq", "--kd-weight", "1.5",
                                                              "--out", str(out)])
    # a teacher of another model: one line, before the first epoch
    other = TrainConfig(model="resnet20", method="ste-uniform")
    model, _ = build(other)
    torch.save({"model": model.state_dict(), "config": other.to_dict(), "epoch": 0}, missing)
    err = cli_error(["train", "--method", "sdq", "--teacher", str(missing), "--out", str(out)])
    assert "a checkpoint of model 'resnet20', not 'digits-cnn'" in err
    assert not (out / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- digits end to end
@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A small SDQ run on digits under size=22 with a one-epoch float teacher (RUN/teacher)."""
    run = tmp_path_factory.mktemp("sdq") / "run"
    assert cli.main(["train", "--method", "sdq", *SMALL, "--teacher-epochs", "1", "--out", str(run)]) == 0
    return run, json.loads((run / "metrics.json").read_text())


def test_a_distilled_run_meets_its_budget_and_freezes_to_its_integer_simulation(distilled, tmp_path):
    run, m = distilled
    assert m["method"] == "sdq" and m["budget"] == "size=22"
    assert 0.9 * 22 <= m["weight_kib"] <= 22, m["layers"]
    teacher = json.loads((run / "teacher/metrics.json").read_text())
    assert teacher["method"] == "ste-uniform" and teacher["act_bits"] == 32 and teacher["epochs"] == 1
    model, method, cfg = restore_model(load_checkpoint(run / "checkpoint.pt"))
    assert method.fixed
    assert [r["storage_bits"] for r in method.export_bits()] == [r["storage_bits"] for r in m["layers"]]
    assert cli.main(["freeze", str(run / "checkpoint.pt"), "--out", str(tmp_path / "frozen")]) == 0
    assert golden_matches_intsim(tmp_path / "frozen", model, method, cfg) == pytest.approx(m["int_accuracy"])


def test_a_run_killed_after_its_bits_were_fixed_resumes_to_identical_metrics(distilled, tmp_path, monkeypatch):
    ref, _ = distilled
    run = tmp_path / "run"
    real = loop.write_history
    fixed_at = 5 - 2                                        # the first fixed-bit epoch

    def kill_after_fixing(out, history):
        real(out, history)
        if len(history) == fixed_at + 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, "write_history", kill_after_fixing)
    args = ["train", "--method", "sdq", *SMALL, "--teacher-epochs", "1", "--out", str(run)]
    (run / "teacher").mkdir(parents=True)                   # the finished teacher is reused, not retrained
    for name in ("checkpoint.pt", "metrics.json"):
        (run / "teacher" / name).write_bytes((ref / "teacher" / name).read_bytes())
    assert cli.main(args) == 130                            # interrupted
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == fixed_at
    monkeypatch.setattr(loop, "write_history", real)
    assert cli.main(args + ["--resume"]) == 0
    assert comparable(run) == comparable(ref)


def comparable(run):
    """metrics.json and history.csv without the seconds they took."""
    m = json.loads((run / "metrics.json").read_text())
    m.pop("train_seconds")
    with open(run / "history.csv") as f:
        return m, [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_a_distilled_run_compiles_and_deploys_bit_exact(distilled, mixq):
    run, m = distilled
    for args in (["freeze", run / "checkpoint.pt", "--out", run / "frozen-deploy"],
                 ["compile", run / "frozen-deploy", "--target", "host", "--out", run / "build"],
                 ["deploy", run / "build", "--dataset", "digits", "--no-progress"]):
        r = mixq(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run / "build/report.json").read_text())
    assert report["bit_exact"] is True and report["mismatches"] == 0 and report["images_checked"] == 360
    assert report["accuracy"] == pytest.approx(m["int_accuracy"])


def test_the_dbps_train_as_csqs_mask_logits_by_sgd_without_weight_decay():
    cfg = TrainConfig(method="sdq")
    model, _ = build(cfg)
    opts = loop.make_optimizers(model, cfg)
    dbps = {id(p) for n, p in model.named_parameters() if n.endswith("bit_prob")}
    assert len(dbps) == 5 and set(opts) == {"sgd"}
    group = [g for g in opts["sgd"].param_groups if dbps & {id(p) for p in g["params"]}]
    assert len(group) == 1 and group[0]["weight_decay"] == 0.0 and dbps <= {id(p) for p in group[0]["params"]}
