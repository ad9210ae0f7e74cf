"""A user's own model through the CLI: `--model FILE.py:FUNCTION` / `package.module:FUNCTION`
(models.build_model), its source kept in the checkpoint so freeze and --resume rebuild it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

NET = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


def small_net(num_classes):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class Separable(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()

    def forward(self, x):
        x = self.act(self.bn1(self.dw(x)))
        return self.act(self.bn2(self.pw(x)))           # one ReLU6 module, two places


class RichNet(nn.Module):
    """What the zoo has not: a linear bottleneck with a residual add (MobileNetV2's), depthwise-
    separable blocks, ReLU6, functional relu, clamp and pools, a view, an MLP head."""

    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.res = Bottleneck(16, 16, 2, 1)
        self.b1 = Separable(16, 32, 1)
        self.b2 = Separable(32, 32, 2)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.b2(self.b1(self.res(F.max_pool2d(x, 2))))
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.clamp(self.fc1(x), 0, 6))


def rich_net(num_classes):
    return RichNet(num_classes)


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual: expand 1x1, depthwise 3x3, linear projection 1x1 (no
    activation after it, nor after the residual add)."""

    def __init__(self, c_in, c_out, expand, stride):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def bottleneck_net(num_classes):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        Bottleneck(16, 16, 4, 1), Bottleneck(16, 16, 4, 1), Bottleneck(16, 24, 2, 2),
        nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands joined by torch.cat."""

    def __init__(self, c_in, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(c_in, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


def squeeze_net(num_classes):
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), Fire(16, 8, 16), Fire(32, 8, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class HardswishBlock(nn.Module):
    """MobileNetV3's inverted residual without squeeze-excitation: expand 1x1 + BN + F.hardswish,
    depthwise 3x3 + BN + nn.Hardswish, linear projection 1x1 + BN, a residual add."""

    def __init__(self, c_in, c_out, expand, stride):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.Hardswish())
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.project(self.dw(F.hardswish(self.expand(x))))
        return x + y if self.use_res else y


def hardswish_net(num_classes):
    """MobileNetV3-style: a Hardswish stem, two SE-free blocks, a 1x1 conv, its classifier's
    Linear-Hardswish-Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        HardswishBlock(16, 16, 3, 1), HardswishBlock(16, 24, 3, 2),
        nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.Hardswish(), nn.Linear(64, num_classes))


def not_a_module(num_classes):
    return "a string"
'''


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def assert_export_agrees(got, real):
    """The QDQ export's contract (docs/integer-contract.md, "ONNX export"): ONNX Runtime
    requantizes in float32 rounding half to even, so an activation can land one step off the
    integer rq; the logits are the integer program's up to float rounding everywhere else.
    (A one-step difference before a table lookup moved one image's logits by 0.04.)"""
    assert (got.argmax(1) == real.argmax(1)).mean() >= 0.99
    assert (np.abs(got - real) > 1e-3).mean() < 0.02
    assert np.abs(got - real).max() <= 0.05 * np.abs(real).max()


def test_a_model_file_trains_and_deploys_bit_exact_after_the_file_is_gone(tmp_path, mixq):
    """RichNet (a linear bottleneck with a residual add, depthwise, ReLU6 twice, functional
    relu/clamp/pools, view, MLP head) end to end."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mixq.cli", "train", "--model", "mynet.py:rich_net", "--epochs", "10",
                        "--out", str(run)], cwd=src, capture_output=True, text=True, env=env, timeout=600)
    ok(r)
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "mynet.py:rich_net" and len(m["layers"]) == 10
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["model_source"] == {"spec": "mynet.py:rich_net", "file": "mynet.py", "text": NET}
    shutil.rmtree(src)              # freeze, compile and deploy rebuild the net from the checkpoint
    ok(mixq("freeze", run / "checkpoint.pt", "--out", frozen))
    ok(mixq("compile", frozen, "--out", build))
    out = ok(mixq("deploy", build, "--no-progress"))
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out
    deployed = json.loads((build / "report.json").read_text())
    assert deployed["bit_exact"] is True and deployed["accuracy"] == deployed["reference_accuracy"]
    assert deployed["accuracy"] == pytest.approx(deployed["trained_int_accuracy"])        # 325/360, two float roundings


def test_a_package_module_model_is_imported_by_name(tmp_path, mixq):
    pkg = tmp_path / "lib" / "usernets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cnn.py").write_text(NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "lib")}
    ok(mixq("train", "--model", "usernets.cnn:small_net", "--epochs", "1", "--out", tmp_path / "run", env=env))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["model_source"] == {"spec": "usernets.cnn:small_net", "module": "usernets.cnn"}


@pytest.mark.parametrize("spec, message", [
    ("missing.py:small_net", "--model missing.py:small_net: cannot read missing.py (FileNotFoundError)"),
    ("{net}:nothing", "mynet.py has no function 'nothing'"),
    ("{net}:not_a_module", "not_a_module(num_classes) returned str, not a torch nn.Module"),
    ("no_such_package_xyz.cnn:net", "cannot import no_such_package_xyz.cnn (ModuleNotFoundError"),
    ("resnet21", "unknown model 'resnet21' (choose from: digits-cnn, resnet20"),
])
def test_a_bad_model_spec_is_one_line_before_training(tmp_path, cli_error, spec, message):
    (tmp_path / "mynet.py").write_text(NET)
    spec = spec.format(net=tmp_path / "mynet.py")
    err = cli_error(["train", "--model", spec, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_functional_activations_and_shared_modules_become_one_quantizer_per_place():
    from mixq.models import build_model
    from mixq.train import quant
    from mixq.train.methods.ste import STEUniform
    from mixq.train.surgery import one_module_per_activation
    ns = {}
    exec(NET, ns)
    torch.manual_seed(0)
    net = ns["rich_net"](10).eval()
    keys = set(net.state_dict())
    x = torch.randn(4, 1, 8, 8)
    before = net(x)
    net = one_module_per_activation(net)
    assert torch.equal(net(x), before) and set(net.state_dict()) == keys       # same function, same weights
    added = {n: type(m).__name__ for n, m in net.named_modules() if n.rsplit(".", 1)[-1] in
             ("relu", "max_pool2d", "adaptive_avg_pool2d", "clamp", "act_1")}
    assert added == {"relu": "ReLU", "max_pool2d": "MaxPool2d", "adaptive_avg_pool2d": "AdaptiveAvgPool2d",
                     "clamp": "ReLU6", "b1.act_1": "ReLU6", "b2.act_1": "ReLU6"}, added
    model = quant.QuantModel(STEUniform(8, 4).prepare(net))
    acts = {n: m for n, m in model.named_modules() if isinstance(m, quant.ActQuant)}
    assert len(acts) == 9              # relu, the bottleneck's 2 ReLU6, 2 x 2 ReLU6 uses, the pool's, clamp(0, 6)
    assert sorted(n for n, m in acts.items() if m.fixed) == ["net.b1.act", "net.b1.act_1", "net.b2.act",
                                                             "net.b2.act_1", "net.clamp", "net.res.conv.2",
                                                             "net.res.conv.5"]
    assert all(float(m.alpha) == 6.0 and "alpha" not in dict(m.named_parameters()) for m in acts.values() if m.fixed)
    # a net that needs no rewrite comes back as it is: every zoo net
    for name in ("digits-cnn", "resnet20"):
        zoo = build_model(name, 10)
        assert one_module_per_activation(zoo) is zoo


class TableActs(torch.nn.Module):
    """Table activations as functions (with arguments), as a method, and one module used twice."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1, self.conv2, self.conv3 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(4 * 36, 10)

    def forward(self, x):
        F = torch.nn.functional
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.sigmoid(F.leaky_relu(self.conv2(x), 0.2))
        x = F.elu(F.gelu(self.conv3(x), approximate="tanh").tanh(), alpha=0.5)
        return self.fc(torch.flatten(self.act(x), 1))


def test_table_activations_become_modules_with_their_arguments_and_get_quantizers():
    from mixq.train import quant, surgery
    from mixq.train.methods.ste import STEUniform
    torch.manual_seed(0)
    net = TableActs().eval()
    x = torch.randn(3, 1, 8, 8)
    before = net(x)
    net = surgery.insert_signed_quantizers(surgery.one_module_per_activation(net), 32)
    assert torch.equal(net(x), before)                      # the same function: the module computes the call
    made = {n: repr(m) for n, m in net.named_modules() if n in ("sigmoid", "leaky_relu", "gelu", "tanh", "elu", "act_1")}
    assert made == {"act_1": "Hardswish()", "leaky_relu": "LeakyReLU(negative_slope=0.2)", "sigmoid": "Sigmoid()",
                    "gelu": "GELU(approximate='tanh')", "tanh": "Tanh()", "elu": "ELU(alpha=0.5)"}, made
    # a SignedQuant before each activation whose input may be negative: after BN, after the convs
    assert sorted(n for n, m in net.named_modules() if isinstance(m, quant.SignedQuant)) == ["bn1.1", "conv2.1", "conv3.1"]
    model = quant.QuantModel(STEUniform(8, 4).prepare(net))
    after = {n.removeprefix("net."): type(m[1]).__name__ for n, m in model.named_modules()
             if isinstance(m, torch.nn.Sequential) and quant.table_activation(m[0])}
    assert after == {"act": "SignedQuant", "act_1": "SignedQuant", "leaky_relu": "SignedQuant", "sigmoid": "ActQuant",
                     "gelu": "SignedQuant", "tanh": "SignedQuant", "elu": "SignedQuant"}, after
    assert surgery.unquantized_activations(model) == []


def test_an_average_pool_is_signed_where_its_input_may_be_negative():
    """The pool's quantizer: SignedQuant after a Hardswish, a linear bottleneck (conv + BN), the
    network input, a pool of one of those (through a maxpool); ActQuant after a ReLU or a sigmoid."""
    import torch.nn as nn

    from mixq.train import quant, surgery
    from mixq.train.methods.ste import STEUniform

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = (nn.Conv2d(1, 4, 3, padding=1) for _ in range(3))
            self.bn, self.hs, self.relu, self.sig = nn.BatchNorm2d(4), nn.Hardswish(), nn.ReLU(), nn.Sigmoid()
            self.p_hs, self.p_bn, self.p_in, self.p_in2, self.p_relu, self.p_sig = (nn.AvgPool2d(2) for _ in range(6))
            self.p_again, self.mp = nn.AdaptiveAvgPool2d(1), nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 16 + 16 + 1, 10)     # 8x8 input: four 4-channel 4x4 maps, a 1-channel one, 1x1

        def forward(self, x):
            parts = [self.p_hs(self.hs(self.c1(x))), self.p_bn(self.bn(self.c2(x))), self.p_in(x),
                     self.p_again(self.mp(self.p_in2(x))), self.p_relu(self.relu(self.c3(x))),
                     self.p_sig(self.sig(self.c3(x)))]
            return self.fc(torch.cat([p.flatten(1) for p in parts], 1))

    net = surgery.insert_signed_quantizers(Pools(), 8)
    model = quant.QuantModel(STEUniform(8, 4).prepare(net))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    after = {n.removeprefix("net."): type(m[1]).__name__ for n, m in model.named_modules()
             if isinstance(m, nn.Sequential) and isinstance(m[0], (nn.AvgPool2d, nn.AdaptiveAvgPool2d))}
    assert after == {"p_hs": "SignedQuant", "p_bn": "SignedQuant", "p_in": "SignedQuant", "p_in2": "SignedQuant",
                     "p_again": "SignedQuant", "p_relu": "ActQuant", "p_sig": "ActQuant"}, after


def test_linear_bottlenecks_get_signed_quantizers_where_no_relu_follows():
    from mixq.train import quant
    from mixq.train.surgery import insert_signed_quantizers
    ns = {}
    exec(NET, ns)
    torch.manual_seed(0)
    net = ns["bottleneck_net"](10).eval()
    x = torch.randn(3, 1, 8, 8)
    before = net(x)
    net = insert_signed_quantizers(net, 32)              # 32 bits: identity, same function
    assert torch.equal(net(x), before)
    signed = sorted(n for n, m in net.named_modules() if isinstance(m, quant.SignedQuant))
    # the two residual blocks' sums (their add is the block's output) and the last block's projection BN
    assert signed == ["3.1", "4.1", "5.conv.7.1"], signed


def test_a_linear_bottleneck_deploys_bit_exact_with_signed_activations(tmp_path, mixq):
    (tmp_path / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok(mixq("train", "--model", str(tmp_path / "mynet.py") + ":bottleneck_net", "--epochs", "8", "--out", run, env=env))
    m = json.loads((run / "metrics.json").read_text())
    assert m["accuracy"] > 50 and m["int_accuracy"] > 50, m
    ok(mixq("freeze", run / "checkpoint.pt", "--out", frozen))
    manifest = json.loads((frozen / "manifest.json").read_text())
    tensors = {t["name"]: t for t in manifest["tensors"]} if isinstance(manifest["tensors"], list) else manifest["tensors"]
    signed_ops = [op for op in manifest["ops"] if op["attrs"].get("out_signed")]
    assert sorted(op["kind"] for op in signed_ops) == ["add", "add", "conv2d"], signed_ops
    assert all(tensors[op["output"]]["dtype"] == "int8" for op in signed_ops)
    compiled = ok(mixq("compile", frozen, "--out", build))
    assert "fast path: used" in compiled and "default lowering" not in compiled, compiled    # signed ops too
    out = ok(mixq("deploy", build, "--no-progress"))
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out


def test_a_concatenation_of_relu_outputs_deploys_bit_exact(tmp_path, mixq):
    """SqueezeNet's fire modules: torch.cat of two ReLU branches gets a ReLU after it (its
    ActQuant sets the one output scale), freeze emits a concat op; ONNX export agrees."""
    from mixq import data, graph as G, onnx_export
    from mixq.train.surgery import one_module_per_activation
    ns = {}
    exec(NET, ns)
    net = one_module_per_activation(ns["squeeze_net"](10))
    assert sorted(n for n, m in net.named_modules() if n.endswith("cat_relu")) == ["2.cat_relu", "3.cat_relu"]
    (tmp_path / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok(mixq("train", "--model", str(tmp_path / "mynet.py") + ":squeeze_net", "--epochs", "6", "--out", run, env=env))
    ok(mixq("freeze", run / "checkpoint.pt", "--out", frozen))
    g = G.load(frozen)
    assert [o.kind for o in g.ops].count("concat") == 2
    x = data.test_arrays(data.load("digits"))[0][:100]
    from test_onnx import golden_real_logits, ort_logits
    assert_export_agrees(ort_logits(onnx_export.export(g, False), x), golden_real_logits(g, x))
    ok(mixq("compile", frozen, "--out", build))
    out = ok(mixq("deploy", build, "--no-progress"))
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out


def test_a_hardswish_net_trains_freezes_and_deploys_bit_exact(tmp_path, mixq):
    """MobileNetV3-style (conv + BN + Hardswish, SE-free inverted residuals, F.hardswish, a
    Linear-Hardswish-Linear head): each Hardswish a lut op between signed quantizers; the integer
    program's accuracy is the hardened model's within a point; ONNX export agrees."""
    from mixq import data, graph as G, onnx_export
    (tmp_path / "mynet.py").write_text(NET)
    run, frozen, build = tmp_path / "run", tmp_path / "frozen", tmp_path / "build"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok(mixq("train", "--model", str(tmp_path / "mynet.py") + ":hardswish_net", "--epochs", "15", "--out", run, env=env))
    m = json.loads((run / "metrics.json").read_text())
    # measured (one thread, seeds 0 / 1): 95.83 / 96.39 % hardened, 95.83 / 95.83 % integer,
    # 100 / 99.17 % agreement; 8 epochs are too few for CSQ's anneal (it warns) and gave 82-84 %
    # with 97 % agreement on an AMD host
    assert m["accuracy"] > 80 and abs(m["int_accuracy"] - m["accuracy"]) <= 1.0 and m["int_agreement"] >= 98, m
    ok(mixq("freeze", run / "checkpoint.pt", "--out", frozen))
    g = G.load(frozen)
    luts = [o for o in g.ops if o.kind == "lut"]
    assert len(luts) == 7 and {o.attrs["function"] for o in luts} == {"Hardswish()"}
    assert all(g.tensors[o.inputs[0]].dtype == g.tensors[o.output].dtype == "int8" for o in luts)
    # the global pool averages a Hardswish (negative down to -0.375): a signed average, not clipped at 0
    (pool,) = [o for o in g.ops if o.kind == "avgpool"]
    assert pool.attrs.get("out_signed") and g.tensors[pool.inputs[0]].dtype == g.tensors[pool.output].dtype == "int8"
    x = data.test_arrays(data.load("digits"))[0]
    from test_onnx import golden_real_logits, ort_logits
    assert_export_agrees(ort_logits(onnx_export.export(g, False), x), golden_real_logits(g, x))
    compiled = ok(mixq("compile", frozen, "--out", build))
    assert "fast path: used" not in compiled or "table lookup (default lowering)" in compiled, compiled
    out = ok(mixq("deploy", build, "--no-progress"))
    assert "bit-exact vs golden interpreter: yes (360 images)" in out, out
