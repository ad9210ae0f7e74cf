"""`mixq export-onnx`: a standard QDQ ONNX model that ONNX Runtime runs and that agrees with
the golden interpreter."""
import json
import shutil

import numpy as np
import pytest

from mixq import cli, data, graph as G, onnx_export
from mixq.freeze import freeze_model
from conftest import forced_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def ort_logits(model_or_path, x: np.ndarray) -> np.ndarray:
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def golden_real_logits(g: G.IntGraph, x: np.ndarray) -> np.ndarray:
    return G.run_batched(g, G.quantize_input(g.input, x)) * np.asarray(g.tensors[g.output].scale)


def weight_types(model) -> dict:
    """layer -> ONNX element type name of its stored weights."""
    out = {}
    for t in model.graph.initializer:
        for suffix in ("_weight_q", "_weight_float"):
            if t.name.endswith(suffix):
                out[t.name[: -len(suffix)]] = onnx.TensorProto.DataType.Name(t.data_type)
    return out


def test_digits_export_runs_in_onnxruntime_and_agrees(trained_digits, tmp_path, capsys):
    g = G.load(trained_digits["frozen"])
    x, y = data.test_arrays(data.load("digits"))
    gold = G.run_batched(g, G.quantize_input(g.input, x)).argmax(1)
    sizes = {}
    for name, extra in (("auto", []), ("int8", ["--no-int4"])):
        path = tmp_path / f"{name}.onnx"
        assert cli.main(["export-onnx", str(trained_digits["frozen"]), str(path), *extra]) == 0
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "AveragePool"} <= ops
        types = weight_types(model)
        int4 = name == "auto" and onnx_export.int4_supported()
        for op in g.ops:
            if "weight" in op.arrays:
                bits = op.attrs["storage_bits"]
                want = "INT4" if int4 and bits <= 4 else "INT8" if bits <= 8 else "INT16" if int4 else "FLOAT"
                assert types[op.name] == want, (op.name, bits)
        assert model.opset_import[0].version == (21 if int4 else 13)
        pred = ort_logits(str(path), x).argmax(1)
        agreement = 100.0 * float((pred == gold).mean())
        print(f"\nORT ({name}, opset {model.opset_import[0].version}) vs golden on {len(x)} digits images: "
              f"{agreement:.2f}% agree; ORT top-1 {100.0 * (pred == y).mean():.2f}%, golden {100.0 * (gold == y).mean():.2f}%")
        assert agreement >= 99.0
        sizes[name] = path.stat().st_size
    if onnx_export.int4_supported() and any(op.attrs.get("storage_bits", 9) <= 4 for op in g.ops):
        assert sizes["auto"] < sizes["int8"]


def test_resnet20_export_matches_the_integer_program():
    """Residual adds, raw int32 branches, negative BN gammas, 1-bit / 9-bit / {7,3} layers, 4-bit activations."""
    x = np.random.default_rng(0).normal(size=(48, 3, 32, 32)).astype(np.float32)
    for act_bits, kept in ((4, [{7, 3}, {5}, set(range(8)), {6, 2}]), (8, [{4, 5, 6, 7}, {7, 3}, {0}])):
        model = forced_model("resnet20", (3, 32, 32), act_bits, kept, x[:32])
        g = freeze_model(model, "resnet20", (3, 32, 32))
        exported = onnx_export.export(g)
        real = golden_real_logits(g, x)
        got = ort_logits(exported, x)
        assert (got.argmax(1) == real.argmax(1)).mean() >= 0.99
        assert np.abs(got - real).max() <= 0.05 * np.abs(real).max()


def handmade_graph() -> G.IntGraph:
    """Ops freeze rarely emits: maxpool with padding on the int8 input (zero padding), zero and
    negative multipliers, 3-bit outputs, an add of a raw int32 and a uint8 branch, padded avgpool."""
    rng = np.random.default_rng(5)
    T = G.TensorInfo
    t = {"input": T("input", (2, 8, 8), "int8", 8, 0.02),
         "mp": T("mp", (2, 4, 4), "int8", 8, 0.02),
         "c1": T("c1", (4, 4, 4), "uint8", 3, 0.1),
         "c2": T("c2", (4, 4, 4), "int32", 32, [0.0007, 0.0011, 0.0005, 0.0009]),
         "sum": T("sum", (4, 4, 4), "uint8", 8, 0.04),
         "pool": T("pool", (4, 2, 2), "uint8", 8, 0.03),
         "flat": T("flat", (16,), "uint8", 8, 0.03),
         "fc": T("fc", (5,), "int32", 32, [0.004] * 5)}
    m1, s1 = G.quantize_multiplier(np.array([0.021, -0.013, 0.0, 0.017]))
    ma, sa = G.quantize_multiplier(np.array([0.0007, 0.0011, 0.0005, 0.0009]) / 0.04)
    mb, sb = G.quantize_multiplier(np.array([0.1 / 0.04]))
    mp_, sp = G.quantize_multiplier(np.array([0.04 / 9 / 0.03]))
    ops = [
        G.Op("mp", "maxpool", ["input"], "mp", {"kernel": 3, "stride": 2, "padding": 1}),
        G.Op("c1", "conv2d", ["mp"], "c1", {"stride": 1, "padding": 1, "groups": 1, "storage_bits": 4, "out_bits": 3},
             {"weight": rng.integers(-7, 8, size=(4, 2, 3, 3)).astype(np.int8),
              "bias": rng.integers(-200, 200, size=4).astype(np.int32), "multiplier": m1, "shift": s1}),
        G.Op("c2", "conv2d", ["mp"], "c2", {"stride": 1, "padding": 0, "groups": 2, "storage_bits": 9},
             {"weight": rng.integers(-255, 256, size=(4, 1, 1, 1)).astype(np.int16),
              "bias": rng.integers(-2000, 2000, size=4).astype(np.int32)}),
        G.Op("sum", "add", ["c2", "c1"], "sum", {"out_bits": 8},
             {"multiplier0": ma, "shift0": sa, "multiplier1": mb, "shift1": sb}),
        G.Op("pool", "avgpool", ["sum"], "pool", {"kernel": 3, "stride": 2, "padding": 1, "out_bits": 8},
             {"multiplier": mp_, "shift": sp}),
        G.Op("flat", "flatten", ["pool"], "flat"),
        G.Op("fc", "linear", ["flat"], "fc", {"storage_bits": 3},
             {"weight": rng.integers(-3, 4, size=(5, 16)).astype(np.int8), "bias": np.zeros(5, dtype=np.int32)}),
    ]
    return G.IntGraph("handmade", t["input"], "fc", ops, t, {})


def test_handmade_graph_export_is_exact_up_to_float_rounding():
    g = handmade_graph()
    G.validate(g)
    x = np.random.default_rng(1).normal(scale=1.5, size=(64, 2, 8, 8)).astype(np.float32)
    x[:, :, 0, :] = -1.0                       # negative border rows: zero padding is visible to the maxpool
    for int4 in (True, False):
        got = ort_logits(onnx_export.export(g, int4), x)
        real = golden_real_logits(g, x)
        assert np.abs(got - real).max() <= 0.004 * 3, int4       # at most ~3 fc weight steps on one image
        assert (np.abs(got - real) > 1e-4).mean() < 0.02


def test_table_lookups_export_as_integer_gathers_bit_exact():
    """lut ops (on the int8 input, then on a flattened int8 tensor into uint8) are Gathers of the
    integer tables: ONNX Runtime's output is the golden interpreter's, bit for bit."""
    rng = np.random.default_rng(2)
    T = G.TensorInfo
    t = {"input": T("input", (2, 4, 4), "int8", 8, 1 / 16), "a": T("a", (2, 4, 4), "int8", 7, 0.05),
         "f": T("f", (32,), "int8", 7, 0.05), "b": T("b", (32,), "uint8", 4, 0.1)}
    ops = [G.Op("a", "lut", ["input"], "a", {"out_bits": 7, "out_signed": True},
                {"table": rng.integers(-63, 64, size=255).astype(np.int8)}),
           G.Op("f", "flatten", ["a"], "f"),
           G.Op("b", "lut", ["f"], "b", {"out_bits": 4}, {"table": rng.integers(0, 16, size=127).astype(np.uint8)})]
    g = G.IntGraph("luts", t["input"], "b", ops, t, {})
    G.validate(g)
    q = rng.integers(-130, 131, size=(64, 2, 4, 4))                  # beyond the range too: the input clip
    q.reshape(-1)[:255] = np.arange(-127, 128)
    x = (q / 16).astype(np.float32)                                   # exact multiples of the scale
    model = onnx_export.export(g, False)
    assert [n.op_type for n in model.graph.node].count("Gather") == 2
    got = ort_logits(model, x)                                        # DequantizeLinear(b): b * float32(0.1)
    want = G.run(g, G.quantize_input(g.input, x))
    assert np.array_equal(got, want.astype(np.float32) * np.float32(0.1))
    assert len(np.unique(want)) == 16


def test_int4_needs_onnxruntime_1_19(monkeypatch, trained_digits, tmp_path):
    monkeypatch.setattr(ort, "__version__", "1.18.1")
    assert not onnx_export.int4_supported()
    path = tmp_path / "old.onnx"
    assert cli.main(["export-onnx", str(trained_digits["frozen"]), str(path)]) == 0
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 13 and "INT4" not in weight_types(model).values()
    monkeypatch.setattr(ort, "__version__", "1.19.0")
    assert onnx_export.int4_supported() == hasattr(onnx.TensorProto, "INT4")


def test_export_is_atomic_and_errors_are_one_line(trained_digits, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert cli.main(["export-onnx", str(trained_digits["frozen"]), str(out)]) == 0
    before = out.read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(trained_digits["frozen"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    f = bad / m["ops"][0]["arrays"]["bias"]["file"]
    f.write_bytes(f.read_bytes()[:-1])
    capsys.readouterr()
    assert cli.main(["export-onnx", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err
    assert out.read_bytes() == before
    assert cli.main(["export-onnx", str(trained_digits["frozen"]), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "model.onnx"]
