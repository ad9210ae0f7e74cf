"""Per-layer sensitivity (train/sensitivity.py): each method's one-bit moves on its layers, the
method-independent rule, and RUN/sensitivity.json of a real run checked against an independent
measurement, without changing the run."""
import hashlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq import cli, data
from mixq.train import quant, sensitivity
from mixq.train.checkpoint import load_checkpoint, restore_model
from mixq.train.methods import bsq, clado, csq


def csq_layer(kept, seed=0):
    torch.manual_seed(seed)
    layer = csq.CSQConv2d.from_float(nn.Conv2d(3, 6, 3, bias=False), init_logit=2.0, mask_init=0.2)
    with torch.no_grad():
        layer.bit_mask_logits.copy_(torch.tensor([1.0 if b in kept else -1.0 for b in range(8)]))
        layer.bit_logits_pos.uniform_(-2, 2)
        layer.bit_logits_neg.uniform_(-2, 2)
    return layer


def weight(q_scale):
    q, scale = q_scale
    return q.double() * (torch.tensor(scale, dtype=torch.float64).view(-1, 1, 1, 1) if isinstance(scale, list) else scale)


def test_csq_moves_a_bit_by_its_mask_gate():
    layer = csq_layer({2, 3, 4})
    hard = lambda kept: weight(layer.integer_weight(torch.tensor([b in kept for b in range(8)])))
    assert torch.equal(weight(layer.one_bit_fewer()), hard({3, 4}))       # the lowest kept bit cut off
    assert torch.equal(weight(layer.one_bit_more()), hard({1, 2, 3, 4}))  # the bit below, its trained digits
    assert torch.allclose(weight(layer.integer_weight()), layer.hard_weight().double())
    assert not torch.equal(hard({1, 2, 3, 4}), hard({2, 3, 4}))
    # from bit 0 the extra bit is the lowest shut one: above the span, or a gap in a kept set
    # spanning all 8 bits (the paper recipe's masks); at the edges there is no move
    for kept, opened in (({0, 1}, 2), ({0, 3, 7}, 1)):
        assert torch.equal(weight(csq_layer(kept).one_bit_more()), weight(csq_layer(kept).integer_weight(
            torch.tensor([b in kept | {opened} for b in range(8)]))))
    assert csq_layer({5}).one_bit_fewer() is None and csq_layer(set(range(8))).one_bit_more() is None


def test_bsq_removes_its_bottom_plane_as_its_adjustment_does_and_adds_one_from_its_planes():
    torch.manual_seed(0)
    layer = bsq.BSQConv2d.from_float(nn.Conv2d(3, 6, 3, bias=False))
    with torch.no_grad():
        layer.requantize(2, 5)
        layer.bit_planes_pos.add_(torch.rand_like(layer.bit_planes_pos) * 0.6)     # continuous, as in training
    fewer, more = layer.one_bit_fewer(), layer.one_bit_more()
    v, qmax = layer._digits_sum()
    assert more[1] == pytest.approx(layer.integer_weight()[1] / 2)
    assert torch.equal(more[0], torch.clamp(torch.round(2 * v), -31, 31).long())
    before = layer.integer_weight()
    layer.requantize(3, 5)                                  # what BSQ does to drop the plane
    assert torch.equal(weight(fewer), weight(layer.integer_weight()))
    assert not torch.equal(weight(fewer), weight(before))
    layer.requantize(0, 7)
    assert layer.one_bit_more() is None
    layer.requantize(4, 4)
    assert layer.one_bit_fewer() is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_clado_moves_a_bit_as_set_bits_switches_precision(per_channel):
    torch.manual_seed(0)
    layer = clado.CLADOConv2d.from_float(nn.Conv2d(3, 6, 3, bias=False), per_channel=per_channel)
    layer.set_bits(4)
    fewer, more = layer.one_bit_fewer(), layer.one_bit_more()
    for bits, move in ((3, fewer), (5, more)):
        layer.set_bits(bits)
        assert torch.equal(weight(move), weight(layer.integer_weight()))
    layer.set_bits(2)
    assert layer.one_bit_fewer() is None
    layer.set_bits(clado.WARMUP_BITS)
    assert layer.one_bit_more() is None


def test_sdq_moves_a_bit_by_requantizing_its_float_weight_at_the_next_bit_width():
    from mixq.train.methods import sdq
    torch.manual_seed(0)
    layer = sdq.SDQConv2d.from_float(nn.Conv2d(3, 6, 3, bias=False)).eval()
    layer.fix(4)
    fewer, more = layer.one_bit_fewer(), layer.one_bit_more()
    for bits, move in ((3, fewer), (5, more)):
        layer.fix(bits)                 # the layer fixed at that bit-width holds exactly the move's integers
        q, scale = layer.integer_weight()
        assert torch.equal(move[0], q) and move[1] == scale
        assert torch.equal(layer.sdq_weight().detach(), q.float() * torch.tensor(scale, dtype=torch.float32))
    assert fewer[0].abs().max() <= 3 and more[0].abs().max() <= 15
    layer.fix(sdq.LOW_BITS)
    assert layer.one_bit_fewer() is None and layer.one_bit_more() is not None
    layer.fix(sdq.TOP_BITS)
    assert layer.one_bit_more() is None
    assert sensitivity.rule(layer)["plus"].startswith("at one storage bit more")


def test_a_layer_without_moves_gets_the_generic_rule():
    class Plain(nn.Module):         # a method's layer that knows nothing of sensitivity
        def __init__(self, q, scale, storage):
            super().__init__()
            self.q, self.scale, self.storage = q, scale, storage

        def integer_weight(self):
            return self.q, self.scale

        def bit_info(self):
            return quant.BitInfo.from_kept(range(self.storage - 1))

    q, scale = sensitivity.variant(Plain(torch.tensor([-7, -6, -5, -1, 0, 1, 2, 3, 6, 7]), 0.5, 4), more=False)
    assert q.tolist() == [-3, -3, -3, -1, 0, 1, 1, 2, 3, 3] and scale == 1.0       # half away from zero, clipped
    assert sensitivity.variant(Plain(torch.tensor([1]), 0.5, 4), more=True) is None
    assert sensitivity.variant(Plain(torch.tensor([1]), 0.5, 2), more=False) is None       # 1 magnitude bit
    assert sensitivity.rule(Plain(torch.tensor([1]), 0.5, 4)) == sensitivity.GENERIC_RULE


def test_a_run_writes_its_sensitivity_and_it_is_what_an_independent_measurement_gives(trained_digits, tmp_path):
    run = trained_digits["run"]
    result = json.loads((run / "sensitivity.json").read_text())
    assert (run / "sensitivity.png").stat().st_size > 10_000
    layers = trained_digits["metrics"]["layers"]
    assert result["images"] == sensitivity.SENSITIVITY_IMAGES and result["method"] == "csq"
    assert [r["name"] for r in result["layers"]] == [r["name"] for r in layers]
    assert [r["bits"] for r in result["layers"]] == [r["precision"] for r in layers]
    assert set(result["rule"]) == {"minus", "plus"} and "mask gate" in result["rule"]["minus"]
    for r in result["layers"]:
        assert set(r) == {"name", "bits", "storage_bits", "params", "loss_minus_one", "loss_plus_one",
                          "delta_minus", "delta_plus"}
        assert (r["delta_minus"] is None) == (r["bits"] == 1)
        assert (r["delta_plus"] is None) == (r["bits"] == 8)
        if r["delta_minus"] is not None:
            assert r["delta_minus"] == pytest.approx(r["loss_minus_one"] - result["base_loss"])
    # a 2-bit layer: losing a bit hurts more than gaining one helps or hurts
    two = [r for r in result["layers"] if r["bits"] == 2]
    assert two and all(r["delta_minus"] > abs(r["delta_plus"]) for r in two)

    # independently: the checkpoint's model with one layer's lowest kept mask gate shut (CSQ's
    # own move, done to the model itself), its loss on the first training images
    ckpt = load_checkpoint(run / "checkpoint.pt")
    model, method, cfg = restore_model(ckpt)
    spec = data.load(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed)
    x, y = data.calibration_images(spec, sensitivity.SENSITIVITY_IMAGES)
    row = max(two, key=lambda r: r["delta_minus"])
    layer = dict(quant.quant_layers(method.model))[row["name"]]
    with torch.no_grad():
        layer.bit_mask_logits[layer.kept_bits()[0]] = -1.0
    method.harden(True)
    model.eval()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) == pytest.approx(row["loss_minus_one"], rel=1e-5)

    # `mixq sensitivity RUN` measures it again from the checkpoint: the same figures, and the
    # run's other outputs untouched
    digest = {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in ("checkpoint.pt", "metrics.json", "history.csv")}
    assert cli.main(["sensitivity", str(run)]) == 0
    assert json.loads((run / "sensitivity.json").read_text()) == result
    assert digest == {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in digest}


def test_measuring_changes_nothing_in_the_model(trained_digits):
    model, method, cfg = restore_model(load_checkpoint(trained_digits["run"] / "checkpoint.pt"))
    method.harden(True)
    x = torch.randn(64, *cfg.input_shape)
    y = torch.randint(0, 10, (64,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    sensitivity.measure(model, method, x, y, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for _, m in quant.quant_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_sensitivity_errors_are_one_line(cli_error, tmp_path, trained_digits):
    assert "no such checkpoint" in cli_error(["sensitivity", str(tmp_path)])
