"""mixq compile: TVM programs == the golden interpreter, the build directory, the error paths.

Fuzzed graphs come from tests/graphgen.py; they are compiled in-process (no RPC) and compared
with `mixq.graph.run` integer for integer. The end-to-end digits and CIFAR checks through RPC
are in test_deploy.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import importgraph
from mixq import graph as G

ROOT = Path(__file__).resolve().parents[1]
ELF_MACHINE_AARCH64 = 0xB7
ELF_MACHINE_X86_64 = 0x3E
FUZZ_SEEDS = list(range(8))


@pytest.fixture(scope="module")
def host_target():
    from mixq.compile import build
    return build.make_target(build.host_target_config())


def compile_and_run(graph: G.IntGraph, target, inputs: list[np.ndarray], strategy="default"):
    """Outputs of the compiled program (in this process, on the CPU) for each input batch."""
    import tvm
    from tvm import relax

    from mixq.compile import build
    ex, info = build.build_library(graph, target, strategy, log=lambda line: None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in inputs], info


def elf_machine(path) -> int:
    head = Path(path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


# ----------------------------------------------------------------------------- lowering table
def test_every_op_kind_has_a_default_lowering():
    from mixq.compile import lower, registry
    assert lower.LOWERINGS is registry.LOWERINGS
    assert {kind for kind, strategy in registry.LOWERINGS if strategy == "default"} == set(G.OP_KINDS)
    assert {kind for kind, strategy in registry.LOWERINGS if strategy == "packed"} == set(G.OP_KINDS)


@pytest.fixture
def registry_snapshot():
    """Lowerings a test registers are gone after it."""
    from mixq.compile import registry
    saved = dict(registry.LOWERINGS)
    yield registry
    registry.LOWERINGS.clear()
    registry.LOWERINGS.update(saved)


def test_a_registered_lowering_is_tried_first_and_may_decline(host_target, registry_snapshot, graphgen):
    from mixq.compile import lower
    register, Unsupported = registry_snapshot.register, registry_snapshot.Unsupported
    g = graphgen.random_graph(1)
    last = g.ops[-1]
    default_fn = registry_snapshot.LOWERINGS[(last.kind, "default")].fn
    seen = []

    def declines(ctx, op, inputs):
        seen.append((op.name, ctx.target, len(inputs), ctx.bounds[op.inputs[0]]))
        raise Unsupported("not on this target")

    register(last.kind, "declines")(declines)
    lowered = lower.lower_graph(g, host_target, "declines")
    assert lowered.chosen[last.name] == "default"
    assert lowered.fallbacks[last.name] == "not on this target"
    name, target, n_inputs, bound = seen[-1]
    assert name == last.name and target is host_target and n_inputs == len(last.inputs) and bound > 0
    register(last.kind, "takes")(default_fn)
    assert lower.lower_graph(g, host_target, "takes").chosen[last.name] == "takes"


# The README's "Adding an op", done the documented way: one lowering function, one registry
# line. This one computes the residual add with Relax's own elementwise operators instead of
# a TE kernel (TVM legalizes them when it builds the library).
def lower_add_with_relax_ops(ctx, op, inputs):
    from tvm import relax

    from mixq.compile.default import per_channel
    shape = ctx.tensor(op.inputs[0]).shape
    channel = (1, shape[0]) + (1,) * (len(shape) - 1)          # broadcasts over N, H, W

    def const(values, dtype="int64"):
        return relax.const(per_channel(values, shape[0], np.int64).reshape(channel), dtype)
    total = None
    for i, x in enumerate(inputs):
        m, s = op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"]
        rounding = np.left_shift(np.int64(1), per_channel(s, shape[0], np.int64) - 1)
        term = relax.op.right_shift(relax.op.add(relax.op.multiply(relax.op.astype(x, "int64"), const(m)),
                                                 const(rounding)), const(s))
        total = term if total is None else relax.op.add(total, term)
    lo, hi, dtype = G.out_range(op.attrs)                    # uint8, or int8 with out_signed
    clipped = relax.op.minimum(relax.op.maximum(total, relax.const(np.int64(lo), "int64")),
                               relax.const(np.int64(hi), "int64"))
    return ctx.bb.emit(relax.op.astype(clipped, dtype))


@pytest.mark.parametrize("seed", [0, 1])
def test_an_op_lowering_added_the_documented_way_is_used_and_bit_exact(seed, host_target, registry_snapshot, graphgen):
    registry_snapshot.register("add", "relax-ops")(lower_add_with_relax_ops)
    g = graphgen.random_graph(seed)
    adds = [op.name for op in g.ops if op.kind == "add"]
    assert adds
    inputs = [graphgen.random_input(g, 1, seed), graphgen.random_input(g, 6, seed + 1)]
    outs, info = compile_and_run(g, host_target, inputs, strategy="relax-ops")
    assert info["strategy"] == "relax-ops"
    assert {name: info["lowerings"][name] for name in adds} == {name: "relax-ops" for name in adds}
    assert {s for name, s in info["lowerings"].items() if name not in adds} == {"default"}
    for x, got in zip(inputs, outs):
        want = G.run(g, x)
        assert got.dtype == want.dtype and np.array_equal(got, want), f"seed {seed}, batch {len(x)}"


# ----------------------------------------------------------------------------- imports
def test_compile_modules_import_no_cycle_and_nothing_from_runtime():
    """Counting imports inside functions: compile/ is a DAG and the stage before runtime/."""
    graph = importgraph.import_graph(ROOT)
    modules = {m for m in graph if m.startswith("mixq.compile.") or m == "mixq.compile"}
    assert {"mixq.compile.registry", "mixq.compile.lower", "mixq.compile.packed", "mixq.compile.kernels",
            "mixq.compile.build"} <= modules
    assert "mixq.compile.packed" in graph["mixq.compile.lower"]        # edges are found at all
    assert "mixq.compile.tune" in graph["mixq.compile.build"]          # ... also inside functions
    assert importgraph.find_cycle(graph, modules) is None, importgraph.find_cycle(graph, modules)
    assert not importgraph.imports_from(graph, modules, "mixq.runtime")


def test_import_graph_helper_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\nmixq = "mixq"\n"mixq.compile" = "compile"\n')
    (tmp_path / "mixq").mkdir()
    (tmp_path / "compile").mkdir()
    (tmp_path / "mixq" / "__init__.py").write_text("")
    (tmp_path / "compile" / "__init__.py").write_text("")
    (tmp_path / "compile" / "a.py").write_text("from . import b\nimport mixq\n")
    (tmp_path / "compile" / "b.py").write_text("def f():\n    from mixq.compile.c import g\n")
    (tmp_path / "compile" / "c.py").write_text("if True:\n    from .a import x\n")
    graph = importgraph.import_graph(tmp_path)
    assert graph["mixq.compile.a"] == {"mixq.compile.b", "mixq"}
    assert graph["mixq.compile.b"] == {"mixq.compile.c"} and graph["mixq.compile.c"] == {"mixq.compile.a"}
    cycle = importgraph.find_cycle(graph, [m for m in graph if m.startswith("mixq.compile")])
    assert cycle == ["mixq.compile.a", "mixq.compile.b", "mixq.compile.c", "mixq.compile.a"]
    assert importgraph.imports_from(graph, ["mixq.compile.a"], "mixq.compile") == {("mixq.compile.a", "mixq.compile.b")}


# ----------------------------------------------------------------------------- bit-exactness
def test_fuzz_seeds_cover_every_op_kind_and_both_residual_shapes(graphgen):
    graphs = [graphgen.random_graph(s) for s in FUZZ_SEEDS]
    kinds = {op.kind for g in graphs for op in g.ops}
    assert kinds == set(G.OP_KINDS)
    add_inputs = {tuple(g.tensors[i].dtype for i in op.inputs) for g in graphs for op in g.ops if op.kind == "add"}
    assert ("int32", "uint8") in add_inputs and ("int32", "int32") in add_inputs and ("int32", "int8") in add_inputs
    # a signed linear (a signed network output) is rare here: test_kernels' signed_bottleneck has one
    signed = {op.kind for g in graphs for op in g.ops if op.attrs.get("out_signed")}
    assert {"conv2d", "add", "concat"} <= signed, signed
    bits = {op.attrs["storage_bits"] for g in graphs for op in g.ops if "storage_bits" in op.attrs}
    assert min(bits) <= 3 and max(bits) >= 8


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_random_graph_is_bit_exact(seed, host_target, graphgen):
    g = graphgen.random_graph(seed)
    inputs = [graphgen.random_input(g, 1, seed), graphgen.random_input(g, 9, seed + 1000)]
    outs, _ = compile_and_run(g, host_target, inputs)
    for x, got in zip(inputs, outs):
        want = G.run(g, x)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, batch {len(x)}")


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_random_graph_on_the_fast_path_is_bit_exact(seed, host_target, graphgen):
    """`--strategy auto`: the packed fast path for every op it takes (when the host has one),
    the default lowering for the others (grouped convs, pools of the network input, per-channel
    avgpool multipliers...), layouts converted between them."""
    g = graphgen.random_graph(seed)
    inputs = [graphgen.random_input(g, 1, seed), graphgen.random_input(g, 9, seed + 1000)]
    outs, info = compile_and_run(g, host_target, inputs, strategy="auto")
    for x, got in zip(inputs, outs):
        want = G.run(g, x)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, batch {len(x)}, {info['strategy']}")
    if info["strategy"] != "default":
        assert set(info.get("fallbacks", {})) == {op for op, s in info["lowerings"].items() if s == "default"}
        # signed conv, linear and add outputs stay on it (grouped convs aside: those need dot-product
        # instructions; concat and lut take the default lowering whatever their sign)
        signed = [op.name for op in g.ops if op.attrs.get("out_signed") and op.attrs.get("groups", 1) == 1
                  and op.kind in ("conv2d", "linear", "add")]
        assert all(info["lowerings"][name] == "packed" for name in signed), info.get("fallbacks")


def test_fuzz_seeds_mix_fast_path_and_default_ops(host_target, graphgen):
    from mixq.compile import lower
    if lower.isa_for(host_target) is None:
        pytest.skip("the host CPU has no packed fast path")
    strategies = [set(lower.lower_graph(graphgen.random_graph(s), host_target).chosen.values()) for s in FUZZ_SEEDS]
    assert {"packed"} in strategies and {"packed", "default"} in strategies


def _graph(input_t: G.TensorInfo, ops: list, out: str, tensors: list) -> G.IntGraph:
    g = G.IntGraph("handmade", input_t, out, ops, {t.name: t for t in [input_t, *tensors]}, {})
    G.validate(g)
    return g


def test_maxpool_on_a_signed_input_pads_with_zero(host_target):
    """The contract pads pooling windows with 0, not -inf: visible on negative inputs only."""
    x_t = G.TensorInfo("x", (2, 4, 4), "int8", 8, 1.0)
    y_t = G.TensorInfo("y", (2, 3, 3), "int8", 8, 1.0)
    g = _graph(x_t, [G.Op("pool", "maxpool", ["x"], "y", {"kernel": 2, "stride": 2, "padding": 1})], "y", [y_t])
    x = -np.arange(1, 2 * 2 * 16 + 1, dtype=np.int8).reshape(2, 2, 4, 4)   # all negative
    (got,), _ = compile_and_run(g, host_target, [x])
    want = G.run(g, x)
    assert (want[:, :, 0, 0] == 0).all()         # a corner window holds 3 padded zeros
    np.testing.assert_array_equal(got, want)


def test_requantization_extremes_are_exact(host_target):
    """Multipliers near 2^31, shifts 1..62, negative multipliers, ties at .5, clipping both ends."""
    channels = 8
    x_t = G.TensorInfo("x", (4, 3, 3), "uint8", 8, 1.0)
    y_t = G.TensorInfo("y", (channels, 3, 3), "uint8", 8, 1.0)
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, size=(channels, 4, 1, 1)).astype(np.int8)
    mult = np.array([2**31 - 1, -(2**31 - 1), 1, -1, 2**30, 3, 2**31 - 1, 12345], dtype=np.int32)
    shift = np.array([62, 31, 1, 1, 31, 2, 40, 13], dtype=np.int32)
    bias = np.array([2**20, -(2**20), 1, -1, 0, 2, -3, 7], dtype=np.int32)
    op = G.Op("conv", "conv2d", ["x"], "y",
              {"stride": 1, "padding": 0, "groups": 1, "storage_bits": 8, "out_bits": 8},
              {"weight": w, "bias": bias, "multiplier": mult, "shift": shift})
    g = _graph(x_t, [op], "y", [y_t])
    x = rng.integers(0, 256, size=(16, 4, 3, 3)).astype(np.uint8)
    x[0] = 255
    x[1] = 0
    (got,), _ = compile_and_run(g, host_target, [x])
    want = G.run(g, x)
    assert 0 in want and 255 in want and len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want)


def test_table_lookups_lower_to_a_gather_and_are_bit_exact(host_target):
    """lut ops on an int8 input (the table's middle entry is 0), on a uint8 conv output, and on a
    flat NC tensor, every table entry used; the fast path declines them (the default takes them)."""
    rng = np.random.default_rng(3)
    T = G.TensorInfo
    tensors = [T("a", (3, 5, 5), "int8", 6, 1.0), T("c", (4, 5, 5), "uint8", 8, 1.0), T("b", (4, 5, 5), "int8", 8, 1.0),
               T("f", (100,), "int8", 8, 1.0), T("u", (100,), "uint8", 3, 1.0), T("fc", (3,), "int32", 32, [1.0] * 3)]
    m, s = G.quantize_multiplier(np.full(4, 0.02))
    ops = [
        G.Op("a", "lut", ["x"], "a", {"out_bits": 6, "out_signed": True},
             {"table": rng.integers(-31, 32, size=255).astype(np.int8)}),
        G.Op("c", "conv2d", ["a"], "c", {"stride": 1, "padding": 1, "groups": 1, "storage_bits": 8, "out_bits": 8},
             {"weight": rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8),
              "bias": rng.integers(-500, 500, size=4).astype(np.int32), "multiplier": m, "shift": s}),
        G.Op("b", "lut", ["c"], "b", {"out_bits": 8, "out_signed": True}, {"table": rng.integers(-127, 128, size=256).astype(np.int8)}),
        G.Op("f", "flatten", ["b"], "f"),
        G.Op("u", "lut", ["f"], "u", {"out_bits": 3}, {"table": rng.integers(0, 8, size=255).astype(np.uint8)}),
        G.Op("fc", "linear", ["u"], "fc", {"storage_bits": 8},
             {"weight": rng.integers(-127, 128, size=(3, 100)).astype(np.int8), "bias": np.zeros(3, dtype=np.int32)}),
    ]
    g = _graph(T("x", (3, 5, 5), "int8", 8, 1.0), ops, "fc", tensors)
    x = rng.integers(-127, 128, size=(40, 3, 5, 5)).astype(np.int8)
    x.reshape(-1)[:255] = np.arange(-127, 128)                    # every input value at least once
    want, env = G.run(g, x, keep=True)
    assert len(np.unique(env["c"])) > 100
    for strategy in ("default", "auto"):
        (got, got1), info = compile_and_run(g, host_target, [x, x[:1]], strategy)
        np.testing.assert_array_equal(got, want, err_msg=strategy)
        np.testing.assert_array_equal(got1, want[:1], err_msg=strategy)
        assert {info["lowerings"][name] for name in "abu"} == {"default"}
        if info["strategy"] != "default":
            assert "table lookup" in info["fallbacks"]["a"]


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def frozen_random(tmp_path_factory, graphgen) -> Path:
    path = tmp_path_factory.mktemp("frozen") / "frozen"
    G.save(graphgen.random_graph(2), path)
    return path


def test_compile_writes_a_self_contained_build_dir(frozen_random, tmp_path, mixq, graphgen):
    import tvm
    from tvm import relax

    out = tmp_path / "build"
    r = mixq("compile", frozen_random, "--target", "host", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "compiled" in r.stdout
    rec = json.loads((out / "deploy.json").read_text())
    assert rec["frozen_manifest_sha256"] == G.manifest_sha256(frozen_random) == G.manifest_sha256(out / "frozen")
    assert rec["arch"] == "x86_64" or rec["arch"] == os.uname().machine
    assert rec["target"]["kind"] == "llvm" and rec["target"]["mcpu"]
    assert rec["tvm_version"] == tvm.__version__ and rec["compile_seconds"] > 0
    g = G.load(out / "frozen")
    assert rec["input"] == {"name": g.input.name, "dtype": g.input.dtype, "bits": g.input.bits,
                            "scale": g.input.scale, "shape": list(g.input.shape)}
    assert rec["output"]["dtype"] == g.tensors[g.output].dtype
    assert rec["library_bytes"] == (out / "model.so").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    x = graphgen.random_input(g, 5, 3)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(g, x))


def test_aarch64_cross_compile_gives_an_aarch64_elf(frozen_random, tmp_path, mixq):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)")
    out = tmp_path / "build-arm"
    r = mixq("compile", frozen_random, "--target", "aarch64", "--out", out)
    assert r.returncode == 0, r.stderr
    assert elf_machine(out / "model.so") == ELF_MACHINE_AARCH64
    rec = json.loads((out / "deploy.json").read_text())
    assert rec["arch"] == "aarch64" and rec["cross_compiler"] == "aarch64-linux-gnu-g++"
    assert rec["target"]["mtriple"] == "aarch64-linux-gnu"


@pytest.mark.parametrize("target, message", [
    ("foo", "--target 'foo': unknown target"),
    ('{"kind": "llvm", "bogus": 1}', "Unknown config option 'bogus'"),
    ('{"kind": "cuda"}', "kind 'cuda' is not supported"),
    ("{not json", "not valid JSON"),
])
def test_bad_target_is_one_line_error(frozen_random, tmp_path, target, message, mixq):
    r = mixq("compile", frozen_random, "--target", target, "--out", tmp_path / "b")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_missing_cross_compiler_names_the_debian_package(frozen_random, tmp_path, mixq):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    r = mixq("compile", frozen_random, "--target", "aarch64", "--out", tmp_path / "b", env=env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert "aarch64-linux-gnu-g++" in r.stderr and "g++-aarch64-linux-gnu" in r.stderr
    assert not (tmp_path / "b").exists()


def test_refuses_to_overwrite_a_directory_that_is_not_a_build(frozen_random, tmp_path, mixq):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = mixq("compile", frozen_random, "--out", out)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_corrupt_frozen_model_is_one_line_error(frozen_random, tmp_path, mixq):
    bad = tmp_path / "frozen"
    shutil.copytree(frozen_random, bad)
    victim = sorted((bad / "arrays").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = mixq("compile", bad, "--out", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and victim.name in r.stderr, r.stderr
