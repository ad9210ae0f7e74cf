"""Freeze end to end: a trained digits model, CIFAR-10 ResNet-20 with forced bit mixes, the
zoo's bigger structures, and every way a user can hand freeze bad input."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixq import cli, data, graph as G, intsim, models
from mixq.freeze import FreezeError, freeze_model
from mixq.train import quant
from mixq.train.methods import csq
from mixq.train.config import TrainConfig, build
from mixq.train.checkpoint import load_checkpoint, restore_model

from conftest import CIFAR, forced_model, needs_cifar

def hardened_model(run_dir: Path):
    model, method, cfg = restore_model(load_checkpoint(run_dir / "checkpoint.pt"))
    method.harden(True)
    return model.eval(), cfg


def digits_test():
    return data.test_arrays(data.load("digits"))


def no_leftovers(parent: Path):
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- trained_digits, trained
def test_digits_golden_equals_integer_simulation(trained_digits):
    g = G.load(trained_digits["frozen"])
    x, _ = digits_test()
    gold = G.run_batched(g, G.quantize_input(g.input, x))
    assert gold.dtype == np.int32 and gold.shape == (len(x), 10)
    assert np.array_equal(intsim.IntSim(g).logits(torch.from_numpy(x)).numpy(), gold)
    # the trained model's own integer simulation (frozen in memory) is the same program
    model, cfg = hardened_model(trained_digits["run"])
    assert np.array_equal(intsim.IntSim.from_model(model, cfg.input_shape).logits(torch.from_numpy(x)).numpy(), gold)


def test_digits_integer_accuracy_tracks_fake_quant(trained_digits, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(trained_digits["frozen"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    x, y = digits_test()
    assert res["images"] == len(y) == trained_digits["metrics"]["test_images"]
    model, _ = hardened_model(trained_digits["run"])
    with torch.no_grad():
        fake_quant = model(torch.from_numpy(x)).argmax(1).numpy()
    g = G.load(trained_digits["frozen"])
    integer = G.run_batched(g, G.quantize_input(g.input, x)).argmax(1)
    agreement = 100.0 * float((fake_quant == integer).mean())
    print(f"\ndigits: fake-quant {trained_digits['metrics']['accuracy']:.2f}% integer {res['accuracy']:.2f}% "
          f"agreement {agreement:.2f}%")
    assert res["accuracy"] == pytest.approx(100.0 * float((integer == y).mean()))
    # a model that predicts one class agrees with anything: the comparison needs a trained model
    assert trained_digits["metrics"]["accuracy"] >= 30.0, "the default digits run did not learn (a train/ problem)"
    assert abs(res["accuracy"] - trained_digits["metrics"]["accuracy"]) <= 0.3
    if trained_digits["metrics"].get("int_accuracy") is not None:   # train's in-memory integer simulation = the artifact
        assert trained_digits["metrics"]["int_accuracy"] == pytest.approx(res["accuracy"])
    assert agreement >= 99.0


def test_the_manifest_records_the_training_run(trained_digits, tmp_path):
    """meta.training: what deploy reports of the run, from the finished run's checkpoint; a
    checkpoint without those metrics (an older mixq's, or a run stopped early) gives what it holds."""
    from mixq.train.checkpoint import TRAINING_FACTS
    m = trained_digits["metrics"]
    assert G.load(trained_digits["frozen"]).meta["training"] == {k: m.get(k) for k in TRAINING_FACTS}
    ckpt = torch.load(trained_digits["run"] / "checkpoint.pt", weights_only=True)
    del ckpt["metrics"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert cli.main(["freeze", str(tmp_path / "old.pt"), "--out", str(tmp_path / "frozen")]) == 0
    facts = G.load(tmp_path / "frozen").meta["training"]
    assert {k: facts[k] for k in ("method", "target_bits", "avg_bits", "storage_bits", "accuracy", "relaxed_accuracy", "epochs")} == \
        {k: m[k] for k in ("method", "target_bits", "avg_bits", "storage_bits", "accuracy", "relaxed_accuracy", "epochs")}
    assert facts["int_accuracy"] is None


def test_freeze_is_deterministic_and_bytes_track_bits(trained_digits, tmp_path):
    assert cli.main(["freeze", str(trained_digits["run"] / "checkpoint.pt"), "--out", str(tmp_path / "again")]) == 0
    first = sorted(p.relative_to(trained_digits["frozen"]) for p in trained_digits["frozen"].rglob("*"))
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*"))
    assert first == second
    for rel in first:
        if (trained_digits["frozen"] / rel).is_file():
            assert (trained_digits["frozen"] / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    # per-layer bits in the manifest are the trained model's (one source of truth: bit_info)
    manifest = json.loads((trained_digits["frozen"] / "manifest.json").read_text())
    ops = {o["name"]: o for o in manifest["ops"]}
    layers = trained_digits["metrics"]["layers"]
    ideal = actual = 0
    for row in layers:
        op = ops[row["name"]] if row["name"] in ops else ops["net." + row["name"]]   # names may omit QuantModel's "net."
        for key in ("precision", "storage_bits", "kept_bits"):
            assert op["attrs"][key] == row[key], (row["name"], key)
        ideal += row["params"] * row["storage_bits"] / 8
        actual += (trained_digits["frozen"] / op["arrays"]["weight"]["file"]).stat().st_size
    assert abs(actual - ideal) <= 0.03 * ideal + len(layers)
    assert "pickle" not in (trained_digits["frozen"] / "manifest.json").read_text()


def test_inspect_reports_layers_and_sizes(trained_digits, capsys):
    capsys.readouterr()
    assert cli.main(["inspect", str(trained_digits["frozen"])]) == 0
    table = capsys.readouterr().out
    assert cli.main(["inspect", str(trained_digits["frozen"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    on_disk = sum(p.stat().st_size for p in (trained_digits["frozen"] / "arrays").iterdir())
    assert info["bytes"] == on_disk
    assert info["params"] == trained_digits["metrics"]["params"]
    assert info["float32_bytes"] > 4 * info["params"] and info["compression"] == pytest.approx(info["float32_bytes"] / on_disk)
    assert info["storage_bits_per_weight"] == pytest.approx(trained_digits["metrics"]["storage_bits"], rel=0.03)
    for row in trained_digits["metrics"]["layers"]:
        assert row["name"].removeprefix("net.") in table
    assert "compression" in table and f"{on_disk:,}" in table


# ----------------------------------------------------------------------------- bad input
class SoftmaxCNN(nn.Module):
    """A layer freeze has no rule for: softmax over the channels (not elementwise, so no table)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.Softmax(dim=1)
        self.fc = nn.Linear(4 * 64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class WideLinear(nn.Module):
    """Fan-in 90000: with 9-bit weights of magnitude 255 and int8 inputs the int32 accumulator can overflow."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(300 * 300, num_classes)

    def forward(self, x):
        return self.fc(self.flat(x))


def write_checkpoint(path: Path, cfg: TrainConfig, model) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0}, path)
    return path


def test_bad_checkpoints_fail_in_one_line_without_output(trained_digits, tmp_path, capsys, monkeypatch, cli_error):
    out = tmp_path / "frozen"
    # a checkpoint whose config names another model than its weights
    ckpt = torch.load(trained_digits["run"] / "checkpoint.pt", weights_only=True)
    ckpt["config"].update(model="resnet20", dataset="cifar10", input_shape=[3, 32, 32])
    torch.save(ckpt, tmp_path / "other.pt")
    err = cli_error(["freeze", str(tmp_path / "other.pt"), "--out", str(out)])
    assert "other.pt" in err and "does not match its model config" in err
    # not a checkpoint at all
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "junk.pt" in cli_error(["freeze", str(tmp_path / "junk.pt"), "--out", str(out)])
    # an unsupported layer type, named (mixq train refuses to train it: the weights are built here
    # with float activations, the same parameters, and saved under an 8-bit config)
    monkeypatch.setitem(models.MODELS, "softmax-cnn", SoftmaxCNN)
    cfg = TrainConfig(model="softmax-cnn")
    ckpt = write_checkpoint(tmp_path / "softmax/checkpoint.pt", cfg, build(replace(cfg, act_bits=32))[0])
    err = cli_error(["freeze", str(ckpt), "--out", str(out)])
    assert "layer 'net.act' (Softmax) is not supported by freeze" in err
    # a model whose accumulator could overflow, named
    monkeypatch.setitem(models.MODELS, "wide-linear", WideLinear)
    cfg = TrainConfig(model="wide-linear", input_shape=(1, 300, 300))
    model = build(cfg)[0]
    with torch.no_grad():
        model.net.fc.bit_logits_pos.fill_(1.0)
        model.net.fc.bit_logits_neg.fill_(-1.0)
        model.net.fc.bit_mask_logits.fill_(1.0)
    ckpt = write_checkpoint(tmp_path / "wide/checkpoint.pt", cfg, model)
    err = cli_error(["freeze", str(ckpt), "--out", str(out)])
    assert "'net.fc'" in err and "overflow" in err and "fan-in 90000" in err
    assert not out.exists() and no_leftovers(tmp_path)


def test_existing_frozen_dir_is_replaced_only_on_success(trained_digits, tmp_path, capsys, monkeypatch, cli_error):
    out = tmp_path / "frozen"
    assert cli.main(["freeze", str(trained_digits["run"] / "checkpoint.pt"), "--out", str(out)]) == 0
    before = G.manifest_sha256(out)
    monkeypatch.setitem(models.MODELS, "softmax-cnn", SoftmaxCNN)
    cfg = TrainConfig(model="softmax-cnn")
    ckpt = write_checkpoint(tmp_path / "softmax/checkpoint.pt", cfg, build(replace(cfg, act_bits=32))[0])
    cli_error(["freeze", str(ckpt), "--out", str(out)])
    assert G.manifest_sha256(out) == before
    # a directory that is not a frozen model is never overwritten
    err = cli_error(["freeze", str(trained_digits["run"] / "checkpoint.pt"), "--out", str(trained_digits["run"])])
    assert "refusing to overwrite" in err and (trained_digits["run"] / "checkpoint.pt").exists()
    # success replaces it: the same run with the classifier's bits all dropped is another artifact
    ck = torch.load(trained_digits["run"] / "checkpoint.pt", weights_only=True)
    model, _, cfg = restore_model(ck)
    with torch.no_grad():
        model.net.fc.bit_mask_logits.fill_(-1.0)       # drop every bit of the classifier
    ck["model"] = model.state_dict()
    torch.save(ck, tmp_path / "changed.pt")
    assert cli.main(["freeze", str(tmp_path / "changed.pt"), "--out", str(out)]) == 0
    assert G.manifest_sha256(out) != before and G.load(out).op("net.fc").attrs["storage_bits"] == 1
    assert no_leftovers(tmp_path)


def test_damaged_frozen_dirs_fail_in_one_line(trained_digits, tmp_path, capsys, cli_error):
    manifest = json.loads((trained_digits["frozen"] / "manifest.json").read_text())
    weight_file = manifest["ops"][1]["arrays"]["weight"]["file"]
    d = tmp_path / "truncated"
    shutil.copytree(trained_digits["frozen"], d)
    f = d / weight_file
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    err = cli_error(["eval", str(d)])
    assert Path(weight_file).name in err and "truncated" in err
    d = tmp_path / "modified"
    shutil.copytree(trained_digits["frozen"], d)
    f = d / weight_file
    raw = bytearray(f.read_bytes())
    raw[0] ^= 0xFF
    f.write_bytes(bytes(raw))
    for cmd in ("eval", "inspect"):
        err = cli_error([cmd, str(d)])
        assert Path(weight_file).name in err and "sha256" in err
    err = cli_error(["eval", str(tmp_path / "missing")])
    assert "manifest.json" in err


def test_freeze_model_names_unsupported_layers():
    def quant_model(net):
        return quant.QuantModel(net).eval()

    model = quant_model(nn.Sequential(quant.ActQuant(8), nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(FreezeError, match=r"layer 'net\.1' \(Conv2d\) has float weights"):
        freeze_model(model, "float-conv", (1, 8, 8))

    class FunctionalSoftmax(nn.Module):
        def forward(self, x):
            return torch.nn.functional.softmax(x, 1)

    with pytest.raises(FreezeError, match=r"operation 'softmax' \(F.softmax in 'net'\) is not supported"):
        freeze_model(quant_model(FunctionalSoftmax()), "fsoftmax", (1, 8, 8))
    conv = csq.CSQConv2d.from_float(nn.Conv2d(1, 2, 3), 2.0, 0.5)
    conv2 = csq.CSQConv2d.from_float(nn.Conv2d(2, 2, 3), 2.0, 0.5)
    with pytest.raises(FreezeError, match=r"layer 'net\.1'.*missing activation quantizer"):
        freeze_model(quant_model(nn.Sequential(conv, conv2)), "no-act", (1, 8, 8))
    model = quant_model(nn.Sequential(csq.CSQConv2d.from_float(nn.Conv2d(1, 2, 3), 2.0, 0.5), quant.ActQuant(32)))
    with pytest.raises(FreezeError, match=r"layer 'net\.1'.*float"):
        freeze_model(model, "float-act", (1, 8, 8))
    head = csq.CSQLinear.from_float(nn.Linear(4, 3), 2.0, 0.5)
    model = quant_model(nn.Sequential(nn.Flatten(), head, nn.BatchNorm1d(3)))
    with torch.no_grad():
        model.net[2].weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
    with pytest.raises(FreezeError, match=r"layer 'net\.1'.*scales"):
        freeze_model(model, "bn-head", (1, 2, 2))


# ----------------------------------------------------------------------------- table activations
TABLE_ACTS = [nn.Hardswish(), nn.Hardsigmoid(), nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid(), nn.Tanh(),
              nn.LeakyReLU(0.2), nn.ELU(0.5), nn.Mish(), nn.SELU(), nn.CELU(2.0), nn.Softplus(2.0), nn.Hardtanh(-1.0, 2.0)]


@pytest.mark.parametrize("act", TABLE_ACTS, ids=repr)
def test_an_activation_freezes_as_the_table_training_computes(act):
    """conv + BN + act + a linear head, through mq.prepare (surgery: a SignedQuant after the BN,
    the activation's own quantizer after it): one lut op whose table is the hardened model's own
    quantized activation of every input value, and whose program computes the model's logits."""
    from mixq import api as mq
    x, _ = digits_test()
    x = torch.from_numpy(x)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), act, nn.Flatten(), nn.Linear(6 * 64, 10))
    q = mq.prepare(net, epochs=1, example_input=x[:256])
    q.harden(True)
    q.eval()
    g = mq.freeze(q)
    assert [o.kind for o in g.ops] == ["conv2d", "lut", "flatten", "linear"]
    conv, lut = g.ops[0], g.ops[1]
    unsigned = isinstance(act, (nn.Hardsigmoid, nn.Sigmoid, nn.Softplus))
    assert conv.attrs["out_signed"] and lut.attrs.get("out_signed", False) is not unsigned
    assert g.tensors[lut.output].dtype == ("uint8" if unsigned else "int8") and lut.attrs["function"] == repr(act)
    # the table == what training computes: the module and its quantizer on the input grid (float32)
    s_in, s_out = g.tensors[conv.output].scale, g.tensors[lut.output].scale
    grid = torch.arange(-127, 128, dtype=torch.float32) * float(q.model.net[1][1].scale())
    with torch.no_grad():
        trained = torch.round(q.model.net[2](grid) / s_out).numpy()
    table = lut.arrays["table"].astype(np.int64)
    assert np.isclose(s_in, q.model.net[1][1].scale()) and np.abs(table - trained).max() <= 1
    assert (table != trained).sum() <= 1                           # float32 vs float64 near a tie, at most
    assert len(np.unique(table)) > 30
    with torch.no_grad():
        fake = q(x).numpy()
    real = G.run_batched(g, G.quantize_input(g.input, x.numpy())) * np.asarray(g.tensors[g.output].scale)
    assert np.abs(real - fake).max() <= 0.02 * np.abs(fake).max() and (real.argmax(1) == fake.argmax(1)).mean() >= 0.98


def test_a_table_activation_without_a_quantizer_after_it_is_named():
    conv = csq.CSQConv2d.from_float(nn.Conv2d(1, 2, 3), 2.0, 0.5)
    head = csq.CSQLinear.from_float(nn.Linear(72, 3), 2.0, 0.5)
    model = quant.QuantModel(nn.Sequential(conv, quant.SignedQuant(8), nn.Hardswish(), nn.Flatten(), head)).eval()
    with pytest.raises(FreezeError, match=r"layer 'net\.3': its input is activation 'net\.2' \(Hardswish\) with no quantizer"):
        freeze_model(model, "no-quant", (1, 8, 8))
    model = quant.QuantModel(nn.Sequential(nn.Hardswish(), quant.SignedQuant(8), conv, quant.SignedQuant(8),
                                           nn.Flatten(), head)).eval()
    g = freeze_model(model, "on-the-input", (1, 8, 8))
    assert [o.kind for o in g.ops] == ["lut", "conv2d", "flatten", "linear"] and g.ops[0].arrays["table"].shape == (255,)


# ----------------------------------------------------------------------------- random-weight zoo models
MIXES = {   # activation bits, kept bit sets cycled over the layers
    "a8-noncontiguous-1bit": (8, [{7, 3}, {5}, set(range(8)), {0, 1, 2, 3}, {6, 7}]),
    "a4-sparse": (4, [{6, 2}, {7, 5, 1}, {4}, {3, 4, 5, 6}]),
    "a2-mixed": (2, [{7}, {1, 6}, set(range(4, 8)), set(), {0, 7}]),
}


_CIFAR_TEST = {}


def cifar_images(n: int = 200) -> np.ndarray:
    """The first n CIFAR-10 test images, loaded once (via mixq.data's decoded cache)."""
    if "x" not in _CIFAR_TEST:
        _CIFAR_TEST["x"] = data.test_arrays(data.load("cifar10", str(CIFAR)), n)[0]
    return _CIFAR_TEST["x"]


def resnet20_stem(model, x) -> np.ndarray:
    """The fake-quant ResNet-20's stem (conv1, bn1, ActQuant) output, as integers."""
    net = model.net
    with torch.no_grad():
        y = net.relu(net.bn1(net.conv1(model.input_quant(torch.from_numpy(x)))))
        return torch.round(y / ((net.relu.alpha.abs() + 1e-8) / net.relu.levels)).numpy().astype(np.int64)


@needs_cifar
@pytest.mark.parametrize("mix", list(MIXES))
def test_resnet20_cifar_bit_mixes_golden_equals_simulation(mix, tmp_path):
    act_bits, kept_sets = MIXES[mix]
    x = cifar_images()
    model = forced_model("resnet20", (3, 32, 32), act_bits, kept_sets, x[:32])
    g = freeze_model(model, "resnet20", (3, 32, 32))
    # storage bits = span + sign; 2^lowest kept bit folded into the scale
    for op, (_, layer) in zip([o for o in g.ops if "weight" in o.arrays], quant.quant_layers(model)):
        kept = sorted(layer.kept_bits())
        want = kept[-1] - kept[0] + 2 if kept else 1
        assert op.attrs["storage_bits"] == want and op.attrs["kept_bits"] == kept and op.attrs["precision"] == len(kept)
        if kept:   # only sums of d_b * 2^(b - lowest), d_b in {-1, 0, 1}, over kept b can appear
            values = np.zeros(1, dtype=np.int64)
            for b in kept:
                values = np.unique(np.concatenate([values + d * (1 << (b - kept[0])) for d in (-1, 0, 1)]))
            assert np.isin(op.arrays["weight"], values).all()
    assert any(o.kind == "add" and len(o.inputs) == 2 for o in g.ops)
    G.save(g, tmp_path / "f")
    h = G.load(tmp_path / "f")
    for a, b in zip(g.ops, h.ops):
        assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    xq = G.quantize_input(h.input, x)
    gold, env = G.run(h, xq, keep=True)
    assert np.array_equal(intsim.IntSim(h)(xq).numpy(), gold)
    # The integer program computes the model's function. The stem (conv, BN with negative
    # gammas, forced bits) matches the fake-quant model except where the int32 bias rounding
    # moves a value across a rounding boundary (docs/integer-contract.md, "Fidelity").
    stem = env[g.ops[0].output].astype(np.int64)
    fq_stem = resnet20_stem(model, x)
    assert (stem != fq_stem).mean() < 0.01 and np.abs(stem - fq_stem).max() <= 1
    if act_bits == 8:
        with torch.no_grad():
            fake_quant = model(torch.from_numpy(x)).argmax(1).numpy()
        assert (fake_quant == gold.argmax(1)).mean() >= 0.95


def test_walker_handles_maxpool_downsample_and_bottleneck():
    """vgg19bn (5 max pools), resnet18 (3x3/2 max pool with padding, 1x1 downsample shortcuts)
    and resnet50 (bottleneck blocks) freeze, and their integer programs match the simulation."""
    rng = np.random.default_rng(0)
    for name, size, convs, adds in (("vgg19bn", 32, 16, 0), ("resnet18", 64, 20, 8), ("resnet50", 32, 53, 16)):
        x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
        model = forced_model(name, (3, size, size), 8, None, x)
        g = freeze_model(model, name, (3, size, size))
        kinds = [o.kind for o in g.ops]
        assert "maxpool" in kinds and kinds.count("conv2d") == convs and kinds.count("add") == adds, name
        # a downsample shortcut is a conv whose raw int32 output meets the main branch in an add
        raw = {o.output for o in g.ops if o.kind == "conv2d" and g.tensors[o.output].dtype == "int32"}
        assert sum(1 for o in g.ops if o.kind == "add" and len(set(o.inputs) & raw) == 2) == {"vgg19bn": 0, "resnet18": 3, "resnet50": 4}[name]
        xq = G.quantize_input(g.input, x)
        assert np.array_equal(G.run(g, xq), intsim.IntSim(g)(xq).numpy()), name


def test_mobilenetv2_freezes_with_signed_bottlenecks_and_depthwise_convs():
    """MobileNetV2 (CIFAR-10 variant, torchvision's definition): 17 inverted residual blocks, each
    ending in a signed activation (the projection's output, or its residual sum with no ReLU), 17
    depthwise convs; the integer program matches the simulation bit for bit."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    model = forced_model("mobilenetv2", (3, 32, 32), 8, None, x)
    g = freeze_model(model, "mobilenetv2", (3, 32, 32))
    convs = [o for o in g.ops if o.kind == "conv2d"]
    signed = [o for o in g.ops if o.attrs.get("out_signed")]
    assert len(convs) == 52 and sum(o.attrs["groups"] > 1 for o in convs) == 17
    assert len(signed) == 17 and {o.kind for o in signed} == {"conv2d", "add"}
    assert all(g.tensors[o.output].dtype == "int8" for o in signed)
    xq = G.quantize_input(g.input, x)
    assert np.array_equal(G.run(g, xq), intsim.IntSim(g)(xq).numpy())


def test_torchvision_mobilenetv2_weights_load_with_init_from(tmp_path):
    from torchvision.models import mobilenet_v2

    from mixq.models import build_model
    from mixq.train.config import load_float_weights
    torch.manual_seed(0)
    state = mobilenet_v2(num_classes=1000).state_dict()
    torch.save(state, tmp_path / "tv.pt")
    net = build_model("mobilenetv2-imagenet", 1000)
    load_float_weights(net, str(tmp_path / "tv.pt"), "mobilenetv2-imagenet")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_zero_gamma_channels_freeze_as_constants_bit_exact():
    """A BN channel with gamma = 0 (pruned, zero_init_residual) outputs its beta whatever the
    input: it freezes to that constant exactly, under a ReLU and as a residual branch, instead
    of a 0/0 bias cast to INT32_MIN and a false overflow refusal."""
    x, _ = digits_test()
    model = forced_model("digits-cnn", (1, 8, 8), 8, None, x[:64])
    bn, act = model.net.features[1], model.net.features[2]
    with torch.no_grad():
        bn.weight[:4] = 0
        bn.bias[:4] = torch.tensor([0.0, 0.3, -0.2, 100.0])        # 0, a level, below 0, above the clip
    g = freeze_model(model, "digits-cnn", (1, 8, 8))
    xq = G.quantize_input(g.input, x)
    gold, env = G.run(g, xq, keep=True)
    assert np.array_equal(intsim.IntSim(g)(xq).numpy(), gold)
    with torch.no_grad():       # the fake-quant model's first activation, as integers
        y = model.net.features[:3](model.input_quant(torch.from_numpy(x)))
        fq = torch.round(y / ((act.alpha.abs() + 1e-8) / act.levels)).numpy().astype(np.int64)
    stem = env[g.ops[0].output].astype(np.int64)
    assert np.array_equal(stem[:, :4], fq[:, :4])
    assert [int(v) for v in stem[0, :4, 0, 0]] == [0, round(0.3 / act.scale()), 0, act.levels]
    # zero_init_residual: a whole residual branch is the constant beta, requantized per branch
    rng = np.random.default_rng(0)
    xr = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    model = forced_model("resnet20", (3, 32, 32), 8, None, xr)
    block = model.net.layers[3]
    with torch.no_grad():
        block.bn2.weight.zero_()
    g = freeze_model(model, "resnet20", (3, 32, 32))
    xq = G.quantize_input(g.input, xr)
    gold, env = G.run(g, xq, keep=True)
    assert np.array_equal(intsim.IntSim(g)(xq).numpy(), gold)
    raw = g.op("net.layers.3.conv2")
    add = next(o for o in g.ops if raw.output in o.inputs)
    i = add.inputs.index(raw.output)
    level = G.rq(env[raw.output], add.arrays[f"multiplier{i}"], add.arrays[f"shift{i}"])
    want = np.rint(block.bn2.bias.detach().double().numpy() / block.relu2.scale())
    assert np.array_equal(level, np.broadcast_to(want.reshape(1, -1, 1, 1), level.shape)) and want.any()


def test_nan_or_inf_never_reaches_an_integer_cast():
    x, _ = digits_test()
    for where, bad in (("net.fc", lambda m: m.net.fc.bias), ("net.features.1", lambda m: m.net.features[1].running_var)):
        model = forced_model("digits-cnn", (1, 8, 8), 8, None, x[:64])
        with torch.no_grad():
            bad(model)[1] = float("nan")
        with pytest.raises(FreezeError, match=rf"layer '{where}'.*NaN or inf"):
            freeze_model(model, "digits-cnn", (1, 8, 8))
