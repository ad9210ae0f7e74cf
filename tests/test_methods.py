"""The method interface from the outside: a method added the documented way (README "Adding a
method": one file with its layers and its Method subclass, plus one register() line) trains,
reports its bits and freezes like the built-in ones; the registry's options and optimizer roles."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixq import cli, graph as G
from mixq.train import methods
from mixq.train.config import TrainConfig
from mixq.train.methods import METHODS, Method, register
from mixq.train.quant import BitInfo


# ----------------------------------------------------------------------------- the toy method's file
class ToyMixin:
    """Weights in {-3s, ..., 3s}, s = max|w| / 3: two magnitude bits (kept bits {0, 1}), three
    storage bits, with a straight-through gradient to the float weight."""

    def step(self):
        return self.weight.detach().abs().max().clamp_min(1e-8) / 3

    def toy_weight(self):
        q = torch.clamp(torch.round(self.weight / self.step()), -3, 3) * self.step()
        return self.weight + (q - self.weight).detach()

    def bit_info(self) -> BitInfo:
        return BitInfo.from_kept([0, 1])

    @torch.no_grad()
    def integer_weight(self):
        return torch.clamp(torch.round(self.weight / self.step()), -3, 3).long().cpu(), float(self.step())


class ToyConv2d(ToyMixin, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.toy_weight(), self.bias)


class ToyLinear(ToyMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.toy_weight(), self.bias)


class Toy(Method):
    name = "toy"

    @classmethod
    def from_config(cls, cfg, net):
        return cls(cfg.act_bits)

    def convert(self, m):
        if isinstance(m, nn.Conv2d):
            q = ToyConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              m.groups, m.bias is not None)
        else:
            q = ToyLinear(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        return q


@pytest.fixture
def registry():
    """The registry as it was before the test (a test's methods are gone after it)."""
    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)


# ----------------------------------------------------------------------------- tests
def test_a_method_added_the_documented_way_trains_and_freezes(registry, tmp_path, capsys):
    register(Toy)                                          # the one registry line
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "toy", "--epochs", "1", "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == "toy" and m["epochs"] == 1 and m["weight_bits"] == 8
    assert {r["storage_bits"] for r in m["layers"]} == {3} and m["avg_bits"] == 2.0
    assert m["accuracy"] > 30.0, m                           # one epoch on digits: well above chance (10%)
    assert m["int_accuracy"] is not None and m["int_agreement"] >= 95.0, m
    assert cli.main(["freeze", str(run / "checkpoint.pt"), "--out", str(tmp_path / "frozen")]) == 0
    g = G.load(tmp_path / "frozen")
    assert g.meta["training"]["method"] == "toy" and g.meta["training"]["int_accuracy"] == m["int_accuracy"]
    weights = [op.arrays["weight"] for op in g.ops if "weight" in op.arrays]
    assert weights and all(set(w.flatten().tolist()) <= set(range(-3, 4)) for w in weights)
    # it is a choice of --method, and gone once unregistered
    capsys.readouterr()
    METHODS.pop("toy")
    assert cli.main(["train", "--method", "toy", "--out", str(tmp_path / "r2")]) == 2
    assert "choose from: csq, bsq, clado, sdq, ste-uniform, csq-uniform" in capsys.readouterr().err


def test_a_registered_name_is_not_taken_over(registry):
    class Other(Toy):
        name = "csq"
    with pytest.raises(ValueError, match="'csq' is registered already"):
        register(Other)


def test_options_a_method_adds_after_the_config_is_built_are_refused(registry):
    class WithOption(Toy):
        name = "with-option"
        options = (methods.Option("toy_levels", 3, "toy: levels"),)
    with pytest.raises(ValueError, match="must be registered before TrainConfig"):
        register(WithOption)


def test_shared_options_are_one_field_and_one_flag():
    opts = methods.options()
    assert opts["lam"].cli_flag == "--lambda"
    assert opts["lam"].help == "csq: budget regularizer strength; bsq: group-Lasso strength"
    assert {"lam", "beta_max", "mask_hard_at", "csq_init", "fixed_shortcuts"} <= set(TrainConfig.__dataclass_fields__)


def test_each_method_names_the_parameters_its_bit_optimizer_trains():
    from mixq.train.config import build
    from mixq.train.loop import make_optimizers
    for name, n_bit_params in (("csq", 10), ("bsq", 10), ("clado", 0), ("sdq", 0), ("ste-uniform", 0),
                               ("csq-uniform", 10)):
        cfg = TrainConfig(method=name, weight_bits=4)
        model, _ = build(cfg)
        opts = make_optimizers(model, cfg)
        bits = opts["adam"].param_groups[0]["params"] if "adam" in opts else []
        assert len(bits) == n_bit_params, name                   # m_p, m_n (or p, n planes) of 5 layers
        roles = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if METHODS[name].param_role(n) == "bits"}
        assert roles == set(METHODS[name].bit_params), name
