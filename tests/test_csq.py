"""CSQ gates and formula, hardening, initialization, budget regularizer, beta schedule,
the activation quantizer and the STE baseline: unit tests, no training."""
import math

import pytest
import torch
import torch.nn as nn

from mixq.train import quant
from mixq.train.methods import csq, ste
from mixq.train.methods.csq import CSQ, initial_bits
from mixq.train.methods.ste import STEUniform

N = quant.N_BITS


def logits(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, *shape, generator=g, dtype=dtype, requires_grad=True) for _ in range(2)]


def by_hand(pos, neg, mask, s, beta, bit_beta=None):
    """The paper's formula, one bit plane at a time (bit_beta: the bit gates' own temperature)."""
    bit_beta = beta if bit_beta is None else bit_beta
    w = 0
    for b in range(N):
        digit = torch.sigmoid(bit_beta * pos[b]) - torch.sigmoid(bit_beta * neg[b])
        w = w + digit * 2 ** b * torch.sigmoid(beta * mask[b])
    return s / (2 ** N - 1) * w


def csq_conv(seed=0, cin=3, cout=4, k=3, **kw):
    torch.manual_seed(seed)
    return csq.CSQConv2d.from_float(nn.Conv2d(cin, cout, k), kw.get("init_logit", 2.0), kw.get("mask_init", 0.5),
                                      kw.get("init_bits"))


def set_mask(layer, kept):
    with torch.no_grad():
        layer.bit_mask_logits.copy_(torch.tensor([0.7 if b in kept else -0.7 for b in range(N)]))


# ----------------------------------------------------------------------------- the weight formula
@pytest.mark.parametrize("shape,bit_beta", [((4, 3, 3, 3), 2.5), ((5, 7), 2.5), ((5, 7), 0.8)])
def test_fused_weight_equals_the_formula_and_its_autograd_gradient(shape, bit_beta):
    pos, neg = logits(shape)
    mask = torch.randn(8, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(2.5, dtype=torch.float64)
    bit_beta = torch.tensor(bit_beta, dtype=torch.float64)
    fused = csq._CSQWeight.apply(pos, neg, mask, s, beta, bit_beta)
    ref = by_hand(pos, neg, mask, s, beta, bit_beta)
    assert torch.allclose(fused, ref, rtol=1e-12, atol=1e-15)
    assert torch.allclose(csq.csq_formula(pos, neg, mask, s, beta, bit_beta), ref, rtol=1e-12, atol=1e-15)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fused, (pos, neg, mask, s), g), torch.autograd.grad(ref, (pos, neg, mask, s), g)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *a: csq._CSQWeight.apply(*a, beta, bit_beta), (pos, neg, mask, s))


def test_no_rounding_in_the_weight_path():
    """The relaxed weight is smooth in every logit: a tiny logit change moves it a tiny,
    non-zero amount (a rounding/STE path would be piecewise constant)."""
    layer = csq_conv()
    w0 = layer.csq_weight().detach().clone()
    with torch.no_grad():
        layer.bit_logits_pos[3] += 1e-3
    dw = (layer.csq_weight().detach() - w0).abs()
    assert 0 < dw.max() < 1e-2


def test_gates_become_unit_steps_as_beta_grows():
    layer = csq_conv(init_bits=4)
    set_mask(layer, {1, 4, 6})
    with torch.no_grad():                      # keep every logit away from 0, as after training
        for p in (layer.bit_logits_pos, layer.bit_logits_neg):
            p.copy_(torch.where(p >= 0, p.clamp_min(0.05), p.clamp_max(-0.05)))
    hard = layer.hard_weight()
    errs = []
    for beta in (1.0, 10.0, 200.0, 1e4):
        layer.beta.fill_(beta)
        errs.append(float((layer.csq_weight().detach() - hard).abs().max()))
    assert errs == sorted(errs, reverse=True) and errs[0] > 1e-2 and errs[-1] < 1e-6


# ----------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("kept", [{7, 6, 5}, {7, 3}, {0, 1, 2, 3, 4, 5, 6, 7}, {2}, {1, 4, 6}])
def test_hardening_gives_integers_times_the_scale_exactly(kept):
    layer = csq_conv(seed=len(kept), init_bits=8)
    with torch.no_grad():                      # random digits, including both planes set (digit 0)
        layer.bit_logits_pos.copy_(torch.randn_like(layer.bit_logits_pos))
        layer.bit_logits_neg.copy_(torch.randn_like(layer.bit_logits_neg))
    set_mask(layer, kept)
    q, scale = layer.integer_weight()
    info = layer.bit_info()
    assert q.dtype == torch.int64 and info.kept == sorted(kept) and info.precision == len(kept)
    assert info.storage_bits == max(kept) - min(kept) + 2
    assert int(q.abs().max()) <= 2 ** (info.storage_bits - 1) - 1
    layer.hard = True
    w = layer.csq_weight().detach()
    assert torch.equal(w, (scale * q.double()).float())          # exact: float32 scale * small int
    assert torch.equal(w, layer.hard_weight())
    # the integers are the kept digits, shifted by the lowest kept bit
    digits = (layer.bit_logits_pos >= 0).long() - (layer.bit_logits_neg >= 0).long()
    expect = sum(digits[b] * 2 ** (b - min(kept)) for b in kept)
    assert torch.equal(q, expect)


def test_negative_scale_is_reported_positive():
    layer = csq_conv()
    with torch.no_grad():
        layer.scale.neg_()
    q, scale = layer.integer_weight()
    assert scale > 0
    assert torch.equal(layer.hard_weight(), (scale * q.double()).float())


def test_frozen_mask_is_an_exact_step_and_gets_no_gradient():
    layer = csq_conv()
    set_mask(layer, {5, 6, 7})
    layer.freeze_mask(True)
    layer.beta.fill_(1.0)
    w = layer.csq_weight()
    pos, neg = layer.bit_logits_pos, layer.bit_logits_neg
    kept = torch.tensor([b in {5, 6, 7} for b in range(N)], dtype=torch.float32)
    expect = layer.scale / 255 * torch.tensordot(2.0 ** torch.arange(N) * kept, torch.sigmoid(pos) - torch.sigmoid(neg), dims=1)
    assert torch.allclose(w, expect, rtol=1e-6, atol=1e-7)
    w.sum().backward()
    assert layer.bit_mask_logits.grad is None and layer.bit_logits_pos.grad is not None


# ----------------------------------------------------------------------------- initialization
@pytest.mark.parametrize("cls, make", [(csq.CSQConv2d, lambda: nn.Conv2d(16, 32, 3)), (csq.CSQLinear, lambda: nn.Linear(64, 10))])
def test_init_from_float_weights_starts_where_the_float_model_is(cls, make):
    torch.manual_seed(0)
    m = make()
    w = m.weight.detach().clone()
    full = cls.from_float(_copy(m), 2.0, 0.5)                 # all 8 bits: the relaxed weight is w to 8 bits
    assert full.kept_bits() == list(range(N))
    assert float((full.csq_weight().detach() - w).norm() / w.norm()) < 0.01
    for k in (2, 3, 4):
        layer = cls.from_float(_copy(m), 2.0, 0.5, k)
        assert layer.kept_bits() == list(range(N - k, N))
        relaxed_err = float((layer.csq_weight().detach() - w).norm() / w.norm())
        assert relaxed_err < 0.12, (k, relaxed_err)
        # the hard weight is a k-bit rounding of w: k magnitude bits, close in direction
        q, _ = layer.integer_weight()
        assert int(q.abs().max()) <= 2 ** k - 1
        hard = layer.hard_weight()
        cos = float((hard * w).sum() / hard.norm() / w.norm())
        assert cos > {2: 0.95, 3: 0.99, 4: 0.997}[k], (k, cos)
    # the bit logits are +-init_logit: an unset digit has both planes at -c (contributes 0)
    assert set(full.bit_logits_pos.unique().tolist()) <= {-2.0, 2.0}
    both = (full.bit_logits_pos > 0) & (full.bit_logits_neg > 0)
    assert not both.any()


def _copy(m):
    c = type(m)(*([m.in_channels, m.out_channels, m.kernel_size] if isinstance(m, nn.Conv2d) else [m.in_features, m.out_features]))
    c.load_state_dict(m.state_dict())
    return c


def test_initial_bits_average_to_the_target():
    params = [100, 5000, 20000, 400, 30]
    for target in (1, 2, 2.4, 3, 3.6, 4, 8):
        bits = initial_bits(target, params)
        assert abs(sum(bits) / len(bits) - target) <= 0.5 / len(bits) + 1e-9
        assert all(0 <= b <= 8 for b in bits)
    assert initial_bits(2.4, params) == [3, 2, 2, 2, 3]       # the extra bits go to the smallest layers
    assert initial_bits(3.6, params) == [4, 3, 3, 4, 4]


# ----------------------------------------------------------------------------- the method
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def prepared(target=3.0, epochs=10, finetune=4):
    torch.manual_seed(0)
    method = CSQ(8, target, epochs, finetune, lam=0.01, beta_max=200.0)
    return method.prepare(TwoLayer()), method


def test_prepare_swaps_layers_and_starts_at_the_budget():
    model, method = prepared(target=3.0)
    assert isinstance(model.conv, csq.CSQConv2d) and isinstance(model.fc, csq.CSQLinear)
    assert isinstance(model.relu, quant.ActQuant)
    assert method.avg_precision() == 3.0
    assert [r["precision"] for r in method.export_bits()] == [3, 3]


def test_regularizer_is_the_papers_budget_term_and_can_be_negative():
    model, method = prepared(target=3.0)
    method.on_step(2.5)
    set_mask(model.conv, {7, 6, 5, 4, 3})          # 5 bits
    set_mask(model.fc, {7})                        # 1 bit: average 3 = target
    assert float(method.regularizer().detach()) == 0.0
    set_mask(model.fc, {7, 6, 5})                  # average 4: one bit over budget
    beta = method.beta
    gates = sum(torch.sigmoid(beta * l.bit_mask_logits).sum() for l in (model.conv, model.fc))
    reg = method.regularizer()
    assert math.isclose(float(reg.detach()), 0.01 * (4 - 3) * float(gates.detach()), rel_tol=1e-6)
    reg.backward()
    assert (model.fc.bit_mask_logits.grad > 0).all()           # descent lowers every mask logit
    for l in (model.conv, model.fc):
        l.bit_mask_logits.grad = None
    set_mask(model.conv, {7})
    set_mask(model.fc, {7})                        # average 1: below budget
    reg = method.regularizer()
    assert float(reg.detach()) < 0
    reg.backward()
    assert (model.conv.bit_mask_logits.grad < 0).all()         # descent grows precision back


def test_beta_anneals_exponentially_then_rewinds_for_finetune():
    model, method = prepared(epochs=10, finetune=4)
    betas = {}
    for t in (0, 2.5, 5, 9.99, 10, 12, 13.999):
        method.on_step(t)
        betas[t] = method.beta
        assert float(model.conv.beta) == pytest.approx(method.beta)
        assert bool(model.conv.mask_frozen) == (t >= 10)
    assert betas[0] == 1.0 and betas[10] == 1.0                                  # beta0 = 1, rewound
    assert betas[5] == pytest.approx(200 ** 0.5) and betas[2.5] == pytest.approx(200 ** 0.25)
    assert betas[9.99] == pytest.approx(200, rel=0.01) and betas[13.999] == pytest.approx(200, rel=0.01)
    assert float(method.regularizer().detach()) == 0.0                                    # mask frozen


def test_harden_switches_every_layer_to_its_integer_weights():
    model, method = prepared()
    x = torch.rand(2, 1, 8, 8)
    model.train()
    model(x)                                       # activation clips initialize
    model.eval()
    method.harden(True)
    y = model(x)
    w_conv = model.conv.csq_weight()
    q, s = model.conv.integer_weight()
    assert torch.equal(w_conv, (s * q.double()).float())
    method.harden(False)
    assert not torch.equal(model(x), y)


# ----------------------------------------------------------------------------- activations
def test_pact_quantizer_matches_its_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2
    for bits in (2, 4, 8):
        alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = quant._PACTQuant.apply(x1, alpha, 2 ** bits - 1), quant.pact_reference(x2, alpha, 2 ** bits - 1)
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert len(torch.unique(a)) <= 2 ** bits and float(a.detach().min()) == 0 and float(a.detach().max()) <= 1.3 + 1e-12
        g = torch.randn_like(a)
        for u, v in zip(torch.autograd.grad(a, (x1, alpha), g), torch.autograd.grad(b, (x2, alpha), g)):
            assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)


def test_act_quant_initializes_its_clip_once_in_training():
    aq = quant.ActQuant(4)
    aq.train()
    x = torch.rand(1000) * 3
    aq(x)
    alpha = float(aq.alpha.detach())
    assert 2.9 < alpha <= 3.0 and bool(aq.initialized)
    aq(x * 10)
    assert float(aq.alpha.detach()) == alpha
    assert torch.equal(quant.ActQuant(32)(x - 1), torch.relu(x - 1))


# ----------------------------------------------------------------------------- STE baseline
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ste_uniform_layers_are_fixed_precision_integers(bits):
    torch.manual_seed(0)
    method = STEUniform(8, bits)
    model = method.prepare(TwoLayer())
    assert isinstance(model.conv, ste.STEConv2d)
    q, s = model.conv.integer_weight()
    assert int(q.abs().max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(model.conv.ste_weight().detach(), (s * q.double()).float())
    assert [r["storage_bits"] for r in method.export_bits()] == [bits, bits]
    # straight-through: gradients reach the float weight
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_min_layer_bits_guard_lifts_the_best_dropped_bits_while_the_mask_can_move():
    model, method = prepared(epochs=10, finetune=4)
    assert method.mask_init == 0.2
    with torch.no_grad():
        model.conv.bit_mask_logits.copy_(torch.tensor([-0.3, -0.1, -0.5, -0.2, -1.0, -1.0, -1.0, -1.0]))
    method.on_step(3.0)
    assert model.conv.kept_bits() == [1] and float(model.conv.bit_mask_logits[1].detach()) == pytest.approx(0.2)
    assert float(model.conv.bit_mask_logits[0].detach()) == pytest.approx(-0.3)  # the others untouched
    method.min_layer_bits = 2
    method.on_step(3.5)
    assert model.conv.kept_bits() == [1, 3]
    with torch.no_grad():
        model.conv.bit_mask_logits.copy_(torch.tensor([-1.0, -0.9, -1.2, -1.3, -1.4, -1.5, -1.6, -1.7]))
    method.on_step(10.0)                                               # the step that freezes the mask
    assert model.conv.kept_bits() == [0, 1] and bool(model.conv.mask_frozen)
    # ... and the budget is settled on the other layer: 2 layers x target 3 = 6 bits
    assert len(model.fc.kept_bits()) == 4 and bool(model.fc.mask_frozen)
    with torch.no_grad():
        model.conv.bit_mask_logits.fill_(-1.0)
    method.on_step(11.0)                                               # frozen: left as it is
    assert model.conv.kept_bits() == []
    method.min_layer_bits = 0
    method.on_step(4.0)                                                # guard off: the paper's rule
    assert model.conv.kept_bits() == []


# ----------------------------------------------------------------------------- the zoo
def _zoo_check(name, input_shape, n_layers):
    from mixq.train.config import TrainConfig, build
    cfg = TrainConfig(model=name, input_shape=input_shape, target_bits=3, csq_init="budget")
    model, method = build(cfg)
    # every conv/linear is quantized, every ReLU is an ActQuant, every avg pool is followed by one
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, nn.ReLU)]
    assert len(method.layers()) == n_layers and method.avg_precision() == pytest.approx(3, abs=0.5 / n_layers)
    x = torch.randn(2, *input_shape)
    model.input_quant.calibrate(x)
    model.train()
    loss = model(x).logsumexp(1).sum() + method.regularizer()
    loss.backward()
    assert all(layer.bit_logits_pos.grad is not None and layer.bit_mask_logits.grad is not None for layer in method.layers())


@pytest.mark.parametrize("name, shape, n", [("digits-cnn", (1, 8, 8), 5), ("resnet20", (3, 32, 32), 22)])
def test_zoo_models_quantize_every_layer_and_train(name, shape, n):
    _zoo_check(name, shape, n)


@pytest.mark.slow
@pytest.mark.parametrize("name, shape, n", [("vgg19bn", (3, 32, 32), 17), ("resnet18", (3, 64, 64), 21),
                                            ("resnet50", (3, 64, 64), 54)])
def test_big_zoo_models_quantize_every_layer_and_train(name, shape, n):
    _zoo_check(name, shape, n)


def test_frozen_flag_follows_a_loaded_state_dict():
    layer = csq_conv()
    layer.freeze_mask(True)
    other = csq_conv(seed=1)
    assert not other.frozen
    other.load_state_dict(layer.state_dict())
    assert other.frozen and torch.equal(other.csq_weight(), layer.csq_weight())


# ----------------------------------------------------------------------------- convergence
def test_beta_saturates_and_the_mask_hardens_without_a_rewind():
    torch.manual_seed(0)
    method = CSQ(8, 3.0, 10, 0, lam=0.01, beta_max=200.0, beta_saturate=0.5, mask_hard_at=0.8)
    model = method.prepare(TwoLayer())
    method.on_step(2.5)
    assert method.beta == pytest.approx(200 ** 0.5) and not model.conv.frozen
    method.on_step(5.0)
    assert method.beta == pytest.approx(200)
    method.on_step(7.99)
    assert not model.conv.frozen
    method.on_step(8.0)                                   # mask final: exact steps, beta stays at its max
    assert model.conv.frozen and model.fc.frozen and method.beta == pytest.approx(200)
    assert float(method.regularizer().detach()) == 0.0
    # every layer shares one beta tensor, filled once per step
    assert model.conv.beta is model.fc.beta and float(model.conv.beta) == pytest.approx(200)


def test_bit_gates_stay_soft_while_the_mask_is_searched_then_anneal():
    """--bit-beta-soft: m_p, m_n at a constant temperature while the mask is searched (the
    mask's beta on its way to beta_max), then from the step the mask is final geometrically
    to beta_max over half the remaining search, then at beta_max; the weight and the
    undecided count use the bits' temperature."""
    torch.manual_seed(0)
    method = CSQ(8, 3.0, 10, 0, lam=0.01, beta_max=200.0, mask_hard_at=0.6, bit_beta_soft=2.0)
    model = method.prepare(TwoLayer())
    method.on_step(0.0)
    assert method.bit_beta == pytest.approx(2.0) and method.beta == pytest.approx(1.0)
    method.on_step(5.0)
    assert method.beta == pytest.approx(200 ** 0.5) and method.bit_beta == pytest.approx(2.0)
    assert model.conv.bit_beta is model.fc.bit_beta and float(model.conv.bit_beta) == pytest.approx(2.0)
    assert not model.conv.frozen
    layer = model.conv
    want = csq.csq_formula(layer.bit_logits_pos, layer.bit_logits_neg, layer.bit_mask_logits, layer.scale,
                           layer.beta, layer.bit_beta)
    assert torch.allclose(layer.csq_weight(), want)
    assert not torch.allclose(layer.csq_weight(), csq.csq_formula(layer.bit_logits_pos, layer.bit_logits_neg,
                              layer.bit_mask_logits, layer.scale, layer.beta))
    with torch.no_grad():                   # a bit logit decided at beta but not at the bit temperature
        layer.bit_logits_pos.fill_(1.0)
    und = layer.undecided()
    assert float(und[0]) == float(und[1]) / 2          # every m_p of a kept plane: |2 * 1| < 3
    method.on_step(6.0)                                # the mask final: the bits start to anneal
    assert model.conv.frozen and method.bit_beta == pytest.approx(2.0)
    method.on_step(7.0)                                # half of the anneal (the first half of the phase)
    assert method.bit_beta == pytest.approx(2.0 * 100 ** 0.5)
    method.on_step(8.0)                                # the anneal done: beta_max for the phase's second half
    assert method.bit_beta == pytest.approx(200.0)
    method.on_step(9.9999)                             # the search's last step: every gate at beta_max
    assert method.beta == pytest.approx(200, rel=1e-3) and method.bit_beta == pytest.approx(200, rel=1e-3)


def test_a_search_too_short_for_the_bit_anneal_is_warned_about_when_training_starts(tmp_path, capsys):
    """The anneal's steps: search epochs x steps per epoch x the phase with the mask final x
    BIT_ANNEAL. Below csq.MIN_ANNEAL_STEPS (a 10-step anneal collapsed to chance) `mixq train`
    says so on stderr, once, and trains anyway; the paper's one beta has no anneal."""
    from mixq.train.config import TrainConfig
    from mixq.train.loop import train
    method = CSQ(8, 3.0, 6, 0, mask_hard_at=0.8, bit_beta_soft=2.0)
    assert method.anneal_steps(16) == pytest.approx(9.6)
    assert len(method.advice(16)) == 1 and "10 optimizer steps" in method.advice(16)[0]
    assert method.advice(32) == []                                  # 19.2 steps
    assert CSQ(8, 3.0, 6, 0, mask_hard_at=1.0, bit_beta_soft=None).advice(1) == []
    train(TrainConfig(epochs=1, train_subset=256, batch_size=128), str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert err.count("mixq train: warning: the bit gates anneal over 0 optimizer steps") == 1, err
    assert (tmp_path / "run" / "metrics.json").exists()


def test_paper_bits_follow_beta_and_csq_uniform_anneals_its_bits_like_csq():
    """bit_beta_soft None (the paper recipe): one temperature for every gate. csq-uniform: its
    mask is final from the first step, its bits soft until --mask-hard-at, then annealed."""
    from mixq.train.methods import CSQUniform
    method = CSQ(8, 3.0, 10, 0, lam=0.01, beta_max=200.0, mask_hard_at=1.0, bit_beta_soft=None)
    method.prepare(TwoLayer())
    for t in (0.0, 3.0, 9.0):
        method.on_step(t)
        assert method.bit_beta == pytest.approx(method.beta) == pytest.approx(200 ** (t / 10))
    uniform = CSQUniform(8, weight_bits=4, epochs=10, bit_beta_soft=2.0, mask_hard_at=0.5)
    model = uniform.prepare(TwoLayer())
    uniform.on_step(0.0)
    assert model.conv.frozen and uniform.bit_beta == pytest.approx(2.0)
    uniform.on_step(4.9)
    assert uniform.bit_beta == pytest.approx(2.0)
    uniform.on_step(6.25)
    assert uniform.bit_beta == pytest.approx(20.0)
    uniform.on_step(9.0)
    assert uniform.bit_beta == pytest.approx(200.0)


def test_the_mask_becomes_final_on_budget_dropping_the_most_marginal_bits():
    model, method = prepared(target=3.0)
    with torch.no_grad():
        model.conv.bit_mask_logits.copy_(torch.tensor([-0.5, 0.01, 0.3, 0.4, 0.02, 0.6, 0.7, 0.8]))   # 7 kept
        model.fc.bit_mask_logits.copy_(torch.tensor([-0.9, -0.8, -0.7, -0.6, -0.5, 0.03, 0.5, 0.9]))  # 3 kept
    method.meet_budget()                                   # 10 kept > 2 x 3: drop the 4 smallest >= 0
    assert model.conv.kept_bits() == [3, 5, 6, 7] and model.fc.kept_bits() == [6, 7]
    assert float(model.conv.bit_mask_logits[3].detach()) == pytest.approx(0.4)        # kept logits untouched
    assert float(model.conv.bit_mask_logits[1].detach()) < 0
    with torch.no_grad():
        model.fc.bit_mask_logits.copy_(torch.tensor([-0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.1, 0.9]))  # 1 kept
    method.meet_budget()                                   # 5 kept < 6: the largest dropped logit comes back
    assert model.fc.kept_bits() == [6, 7] and model.conv.kept_bits() == [3, 5, 6, 7]


def test_undecided_counts_gates_not_yet_a_step():
    layer = csq_conv(cin=1, cout=1, k=1)
    with torch.no_grad():
        layer.beta.fill_(10.0)
        layer.bit_mask_logits.copy_(torch.tensor([-1.0, -0.1, 0.1, 0.2, 0.5, 1.0, 1.0, 1.0]))  # |10 m| < 3: 3 masks
        layer.bit_logits_pos.fill_(1.0)
        layer.bit_logits_neg.fill_(-1.0)
        layer.bit_logits_pos[7] = 0.05                     # one undecided digit in a kept plane
        layer.bit_logits_pos[0] = 0.0                      # ... and one in a dropped plane: not counted
    u = layer.undecided().tolist()
    assert u == [1.0, 2.0 * 6, 3.0, 8.0]               # 6 kept planes x (m_p, m_n) x 1 weight
    layer.freeze_mask(True)
    assert layer.undecided().tolist()[2] == 0.0


def test_csq_uniform_keeps_the_top_planes_under_a_frozen_mask():
    from mixq.train.methods import CSQUniform
    torch.manual_seed(0)
    method = CSQUniform(8, weight_bits=4, epochs=5)
    model = method.prepare(TwoLayer())
    method.on_step(0.0)
    for layer in (model.conv, model.fc):
        assert layer.kept_bits() == [5, 6, 7] and layer.frozen
        assert layer.bit_info().storage_bits == 4
        q, _ = layer.integer_weight()
        assert int(q.abs().max()) <= 7
    assert float(method.regularizer().detach()) == 0.0
    method.on_step(4.9)
    assert method.beta == pytest.approx(200 ** (4.9 / 5))      # annealed over all the epochs


def test_fixed_shortcuts_stay_8_bit_outside_the_budget():
    from mixq.train.config import TrainConfig, build
    model, method = build(TrainConfig(model="resnet20", input_shape=(3, 32, 32), fixed_shortcuts=True, target_bits=2,
                                       csq_init="budget"))
    rows = method.export_bits()
    fixed = [r for r in rows if r["fixed"]]
    assert [r["name"] for r in fixed] == ["layers.3.shortcut.0", "layers.6.shortcut.0"]
    assert all(r["precision"] == 8 for r in fixed) and len(method.layers()) == 20
    assert method.avg_precision() == 2.0
    method.on_step(1.0)
    assert all(m.frozen for n, m in quant.quant_layers(method.model) if "shortcut" in n)


def test_a_training_step_never_waits_on_the_host(monkeypatch):
    """No .item() / bool() / .tolist() in the step (schedule, guard, regularizer, forward,
    backward, optimizer): on a GPU each of those would stall the stream."""
    from mixq.train.config import TrainConfig
    from mixq.train.loop import make_optimizers
    model, method = prepared(target=3.0)
    x = torch.rand(8, 1, 8, 8)
    model.train()
    model(x)                                               # activation clips initialize (once, before training)
    opts = make_optimizers(model, TrainConfig())

    def stall(*a, **k):
        raise AssertionError("host sync in the training step")
    for name in ("item", "__bool__", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, stall)
    for t in (1.0, 1.5):
        method.on_step(t)
        loss = model(x).logsumexp(1).mean() + method.regularizer()
        for o in opts.values():
            o.zero_grad()
        loss.backward()
        for o in opts.values():
            o.step()


def test_bit_logit_bound_projects_the_bit_logits_after_each_step():
    torch.manual_seed(0)
    method = CSQ(8, 3.0, 10, 0, bit_logit_bound=1.0)
    model = method.prepare(TwoLayer())
    with torch.no_grad():
        model.conv.bit_logits_pos.mul_(3.0)                # |m| = 6
        mask = model.conv.bit_mask_logits.clone()
    hard = model.conv.integer_weight()[0]
    method.after_step()
    for layer in (model.conv, model.fc):
        for p in (layer.bit_logits_pos, layer.bit_logits_neg):
            assert float(p.detach().abs().max()) == 1.0
    assert torch.equal(model.conv.bit_mask_logits, mask)    # the mask logits are not bounded
    assert torch.equal(hard, model.conv.integer_weight()[0])        # signs kept: the same hardened weight


def test_a_checkpoint_config_with_the_retired_bit_beta_max_still_loads():
    from mixq.train.config import TrainConfig
    from mixq.train.errors import ConfigError
    old = {**TrainConfig().to_dict(), "bit_beta_max": 20.0}
    assert TrainConfig.from_dict(old).bit_beta_soft == 2.0
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "bit_beta_maxx": 20.0})
