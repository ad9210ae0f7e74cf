"""--budget in the three measures (train/budget.py): parsing, each layer's costs, the measures
of an allocation, the one-line refusal of a budget nothing can meet, CSQ's last settling of
the mask under a size budget, and each mixed method ending on a size budget on digits, with
metrics.json and `mixq inspect` reporting all three measures."""
import json

import pytest
import torch

from mixq import cli
from mixq.train import budget as B, quant
from mixq.train.config import TrainConfig, build
from mixq.train.errors import ConfigError


def digits_cnn(method="csq", **kw):
    cfg = TrainConfig(method=method, **kw)
    model, m = build(cfg)
    facts = B.layer_facts(model, quant.quant_layers(m.model), torch.zeros(2, 1, 8, 8), cfg.act_bits)
    return model, m, facts


@pytest.mark.parametrize("text, why", [("size", "expected bits=T"), ("mass=3", "expected bits=T"),
                                       ("size=abc", "not a number"), ("size=-2", "must be > 0"),
                                       ("bits=9", "in \\(0, 8\\]")])
def test_bad_budgets_are_refused_with_the_option_named(text, why):
    with pytest.raises(ConfigError, match=f"--budget {text}: .*{why}"):
        B.Budget.parse(text)


def test_budgets_parse():
    assert B.Budget.parse("size=20") == B.Budget("size", 20.0)
    assert str(B.Budget.parse("bops=0.05")) == "bops=0.05"
    assert TrainConfig(target_bits=2.5).budget_spec() == B.Budget("bits", 2.5)
    assert TrainConfig(budget="size=20").budget_spec() == B.Budget("size", 20.0)


def test_layer_facts_of_the_digits_cnn():
    _, _, facts = digits_cnn(act_bits=4)
    # conv 1->32 3x3 (pad 1) on 8x8, conv 32->32 on 8x8, conv 32->64 on 4x4, 64->64 on 4x4, fc 64->10
    assert [f.name for f in facts] == ["features.0", "features.3", "features.6", "features.9", "fc"]
    assert [f.params for f in facts] == [288, 9216, 18432, 36864, 640]
    assert [f.macs for f in facts] == [32 * 64 * 9, 32 * 64 * 288, 64 * 16 * 288, 64 * 16 * 576, 640]
    assert [f.act_bits for f in facts] == [8, 4, 4, 4, 4]      # the first reads the 8-bit input


def test_measures_of_an_allocation():
    _, _, facts = digits_cnn()
    alloc = [(3, 4), (2, 3), (2, 3), (1, 2), (4, 6)]          # (precision, storage bits); fc: a gap
    bits = B.Costs(B.Budget("bits", 3), facts)
    size = B.Costs(B.Budget("size", 20), facts)
    bops = B.Costs(B.Budget("bops", 0.02), facts)
    assert bits.measure(alloc) == pytest.approx(12 / 5)
    assert size.measure(alloc) == pytest.approx((288 * 4 + 9216 * 3 + 18432 * 3 + 36864 * 2 + 640 * 6) / 8192)
    assert bops.measure(alloc) == pytest.approx(sum(f.macs * f.act_bits * s for f, (_, s) in zip(facts, alloc)) / 1e9)
    assert bits.weights() == [1.0] * 5
    w = size.weights()
    assert sum(w) == pytest.approx(5) and w[3] == pytest.approx(2 * w[2]) and w[0] < w[4] < w[1]
    assert size.excess(size.measure(alloc)) == pytest.approx(
        (size.measure(alloc) - 20) / (sum(f.params for f in facts) / 8192))
    assert bits.excess(2.4) == pytest.approx(-0.6)
    # a budget nothing meets: below 1 bit (storage 2) everywhere, above 8 (storage 9)
    with pytest.raises(ConfigError, match=r"--budget size=10: below what 1 bit in every layer needs \(15.98 KiB\)"):
        B.Costs(B.Budget("size", 10), facts).check_feasible(9)
    with pytest.raises(ConfigError, match="--budget size=80: above what 8 bits"):
        B.Costs(B.Budget("size", 80), facts).check_feasible(9)
    B.Costs(B.Budget("size", 20), facts).check_feasible(9)


def test_csq_settles_the_mask_on_a_size_budget():
    """meet_budget under size=20: at most 20 KiB and within one edge bit of the biggest layer
    below; kept bits are only ever dropped at a span's edge, and no layer loses its last bit."""
    _, m, facts = digits_cnn(budget="size=20")
    m.set_budget(facts, B.Budget("size", 20))
    torch.manual_seed(0)
    for layer in m.layers():
        layer.bit_mask_logits.data.copy_(torch.randn(8) * 0.5 + 0.3)
    before = [layer.kept_mask().clone() for layer in m.layers()]
    m.meet_budget()
    rows = m.export_bits()
    kib = sum(r["params"] * r["storage_bits"] for r in rows) / 8192
    assert 20 - 36864 * 2 / 8192 <= kib <= 20, rows
    assert all(r["precision"] >= 1 for r in rows)
    for k0, layer in zip(before, m.layers()):
        k1 = layer.kept_mask()
        dropped = (k0 & ~k1).nonzero().flatten().tolist()
        assert all(b < min(k1.nonzero().flatten().tolist()) or b > max(k1.nonzero().flatten().tolist())
                   for b in dropped), "a dropped bit inside the span saves no storage"


def test_budget_is_for_mixed_methods_and_csq_init_budget_takes_bits(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--method", "ste-uniform", "--budget", "size=20", "--out", str(tmp_path / "a")]) == 2
    assert "--budget size=20: for the mixed methods" in capsys.readouterr().err
    assert cli.main(["train", "--budget", "size=20", "--csq-init", "budget", "--epochs", "1",
                     "--out", str(tmp_path / "b")]) == 2
    assert "--csq-init budget" in capsys.readouterr().err


def test_an_infeasible_budget_stops_before_training(tmp_path, capsys):
    capsys.readouterr()
    run = tmp_path / "run"
    assert cli.main(["train", "--budget", "size=12", "--epochs", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget size=12: below what 1 bit in every layer needs" in err
    assert not (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()


@pytest.mark.parametrize("method", ["csq", "bsq", "clado", "sdq"])
def test_each_mixed_method_ends_on_a_size_budget(method, tmp_path, capsys):
    """A short run (small scale: the README has the full one) on --budget size=22: packed weights
    between 90 % and 102 % of it (sdq, which fixes its bits within the budget: at most 100 %), the three measures in metrics.json and in `mixq inspect`."""
    run = tmp_path / method
    args = ["train", "--method", method, "--budget", "size=22", "--epochs", "6", "--train-subset", "600",
            "--out", str(run)]
    if method != "csq":
        args += ["--finetune-epochs", "2"]
    assert cli.main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["budget"] == "size=22"
    assert 0.9 * 22 <= m["weight_kib"] <= (22 if method == "sdq" else 1.02 * 22), m["layers"]
    assert m["weight_kib"] == pytest.approx(sum(r["params"] * r["storage_bits"] for r in m["layers"]) / 8192)
    assert m["gbops"] > 0 and m["avg_bits"] > 0
    assert cli.main(["freeze", str(run / "checkpoint.pt"), "--out", str(run / "frozen")]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(run / "frozen"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["weight_kib"] == pytest.approx(m["weight_kib"]) and s["gbops"] == pytest.approx(m["gbops"])
    assert s["avg_bits"] == pytest.approx(m["avg_bits"])
