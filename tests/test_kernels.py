"""Fast integer kernels (mixq.compile.kernels, packed, x86, arm): every fast path compiled and compared with
the golden NumPy interpreter (mixq.graph.run) on random graphs that exercise its corners:
signed network input (+128 shift), 9-bit weights (two int8 parts), channel counts that are not
multiples of 16, stride/padding/1x1 shortcuts, residual adds fused into a conv and standalone,
pools, a non-trivial flatten, sub-8-bit activations, odd batch sizes; on VNNI and on the AVX2
fallback; aarch64 sdot/udot code under qemu (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from mixq import graph as G

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from mixq.compile import build, kernels, x86  # noqa: E402
from mixq.compile.registry import Unsupported  # noqa: E402

VNNI_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
AVX2_TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def host_has(feature: str) -> bool:
    from tvm.target import codegen
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return bool(codegen.target_has_features(feature, host))


needs_vnni = pytest.mark.skipif(not host_has("avx512vnni"), reason="host CPU has no AVX512-VNNI")
needs_avx2 = pytest.mark.skipif(not host_has("avx2"), reason="host CPU has no AVX2")


# ----------------------------------------------------------------------------- graph builder
class Builder:
    """Random integer graphs that obey the contract (mixq.graph) with outputs spread over the
    activation range, so that requantization, clipping and rounding are all exercised."""

    def __init__(self, shape, seed=0, input_dtype="int8"):
        self.rng = np.random.default_rng(seed)
        self.ops, self.tensors = [], {}
        bits = 8
        self.input = G.TensorInfo("input", tuple(shape), input_dtype, bits, 0.05)
        self.tensors["input"] = self.input
        self.max = {"input": 127 if input_dtype == "int8" else 255}

    def _multiplier(self, real, n):
        return G.quantize_multiplier(real * self.rng.uniform(0.5, 1.5, n), "t")

    def _add_tensor(self, name, shape, dtype, bits):
        self.tensors[name] = G.TensorInfo(name, tuple(shape), dtype, bits, 1.0)

    def conv(self, src, cout, k=3, stride=1, padding=1, wbits=8, out_bits=8, raw=False, kind="conv2d", groups=1):
        name = f"{kind}{len(self.ops)}"
        t = self.tensors[src]
        cin = t.shape[0]
        wmax = (1 << (wbits - 1)) - 1
        wshape = (cout, cin // groups, k, k) if kind == "conv2d" else (cout, cin)
        w = self.rng.integers(-wmax, wmax + 1, wshape)
        w[self.rng.random(wshape) < 0.3] = 0
        w[0].flat[0] = wmax                         # reach the storage range's edge
        fan_in = int(np.prod(wshape[1:]))
        typical = np.sqrt(fan_in) * wmax * self.max[src] / 2.0
        arrays = {"weight": w.astype(G.container_dtype(wbits)),
                  "bias": self.rng.integers(-int(typical), int(typical) + 1, cout).astype(np.int32)}
        attrs = {"storage_bits": wbits}
        if kind == "conv2d":
            attrs.update(stride=stride, padding=padding, groups=groups)
            h = (t.shape[1] + 2 * padding - k) // stride + 1
            shape = (cout, h, (t.shape[2] + 2 * padding - k) // stride + 1)
        else:
            shape = (cout,)
        if raw:
            dtype, bits = "int32", 32
            self.max[name] = fan_in * wmax * self.max[src] + int(np.abs(arrays["bias"]).max())
        else:
            arrays["multiplier"], arrays["shift"] = self._multiplier((1 << out_bits) / (2 * typical), cout)
            attrs["out_bits"] = out_bits
            dtype, bits = "uint8", out_bits
            self.max[name] = (1 << out_bits) - 1
        self.ops.append(G.Op(name, kind, [src], name, attrs, arrays))
        self._add_tensor(name, shape, dtype, bits)
        return name

    def linear(self, src, cout, **kw):
        return self.conv(src, cout, kind="linear", **kw)

    def add(self, *srcs, out_bits=8):
        name = f"add{len(self.ops)}"
        c = self.tensors[srcs[0]].shape[0]
        arrays = {}
        for i, s in enumerate(srcs):
            arrays[f"multiplier{i}"], arrays[f"shift{i}"] = self._multiplier((1 << out_bits) / (len(srcs) * self.max[s]), c)
        self.ops.append(G.Op(name, "add", list(srcs), name, {"out_bits": out_bits}, arrays))
        self._add_tensor(name, self.tensors[srcs[0]].shape, "uint8", out_bits)
        self.max[name] = (1 << out_bits) - 1
        return name

    def pool(self, src, kind, kernel, stride, padding=0, out_bits=8):
        name = f"{kind}{len(self.ops)}"
        c, h, w = self.tensors[src].shape
        shape = (c, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        attrs = {"kernel": kernel, "stride": stride, "padding": padding}
        arrays = {}
        if kind == "avgpool":
            attrs["out_bits"] = out_bits
            arrays["multiplier"], arrays["shift"] = G.quantize_multiplier(np.array([1.0 / kernel ** 2]), name)
            bits = out_bits
        else:
            bits = self.tensors[src].bits
        self.ops.append(G.Op(name, kind, [src], name, attrs, arrays))
        self._add_tensor(name, shape, "uint8" if kind == "avgpool" else self.tensors[src].dtype, bits)
        self.max[name] = self.max[src]
        return name

    def flatten(self, src):
        name = f"flatten{len(self.ops)}"
        t = self.tensors[src]
        self.ops.append(G.Op(name, "flatten", [src], name, {}, {}))
        self._add_tensor(name, (int(np.prod(t.shape)),), t.dtype, t.bits)
        self.max[name] = self.max[src]
        return name

    def graph(self, output) -> G.IntGraph:
        return G.IntGraph("test", self.input, output, self.ops, self.tensors, {})


def digits_like(seed=0, input_dtype="int8"):
    """The digits CNN's shape: 1 input channel (4-wide blocks), global pool, 10-way linear."""
    b = Builder((1, 8, 8), seed, input_dtype)
    x = b.conv("input", 32, wbits=5)
    x = b.conv(x, 32, wbits=4)
    x = b.conv(x, 64, stride=2, wbits=9)
    x = b.pool(x, "avgpool", 4, 4)
    return b.graph(b.linear(b.flatten(x), 10, wbits=7, raw=True))


def resnet_like(seed=1):
    """Residual blocks (identity and 1x1 shortcut), 9-bit and 2-bit layers, 24 channels,
    a three-way add of uint8 tensors, maxpool, 4-bit activations, flatten of a 2x2 map."""
    b = Builder((3, 12, 12), seed)
    stem = b.conv("input", 16, wbits=9)
    y = b.conv(stem, 16, wbits=3)
    y = b.conv(y, 16, wbits=2, raw=True)
    block1 = b.add(y, stem)                                  # fused: raw conv + uint8 identity
    y = b.conv(block1, 24, stride=2, wbits=6)
    y = b.conv(y, 24, wbits=9, raw=True)
    sc = b.conv(block1, 24, k=1, stride=2, padding=0, wbits=5, raw=True)
    block2 = b.add(y, sc)                                    # fused: two raw convs
    a = b.conv(block2, 24, k=1, padding=0, out_bits=4)
    c = b.conv(block2, 24, out_bits=4)
    three = b.add(a, c, block2, out_bits=4)                  # standalone add
    m = b.pool(three, "maxpool", 3, 2, padding=1)            # 6x6 -> 3x3
    m = b.pool(m, "avgpool", 2, 1)                           # 3x3 -> 2x2
    f = b.flatten(m)                                         # 96 features in NCHW order
    h = b.linear(f, 20, wbits=8)
    return b.graph(b.linear(h, 10, wbits=9, raw=True))


def random_input(graph, batch, seed=0):
    rng = np.random.default_rng(seed)
    lo = -127 if graph.input.dtype == "int8" else 0
    hi = 127 if graph.input.dtype == "int8" else 255
    return rng.integers(lo, hi + 1, (batch, *graph.input.shape)).astype(graph.input.dtype)


def compile_fast(graph, batch, target, tune_db=None, tune_trials=0):
    """(executable, info) from `mixq compile`'s entry point with the fast path allowed."""
    return build.build_library(graph, tvm.target.Target(target), "auto",
                               {"batch": batch, "tune_db": tune_db, "tune_trials": tune_trials})


def run_compiled(graph, batch, target, x, tune_db=None):
    ex, report = compile_fast(graph, batch, target, tune_db)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), report


# ----------------------------------------------------------------------------- numpy-only
def test_weight_parts_rebuild_9bit_weights_exactly():
    w = np.arange(-255, 256).reshape(1, -1, 1, 1)
    parts = kernels.weight_parts(w)
    assert len(parts) == 2
    assert all(p.min() >= -128 and p.max() <= 127 for p in parts)
    assert np.array_equal(2 * parts[0] + parts[1], w)
    assert len(kernels.weight_parts(np.array([[-127, 127]]))) == 1
    with pytest.raises(Unsupported):
        kernels.weight_parts(np.array([[256]]))


def test_packed_weight_layout_matches_the_conv_index():
    rng = np.random.default_rng(0)
    w = rng.integers(-255, 256, (20, 6, 3, 3))
    pw = kernels.pack_conv_weight(w, in_block=4)                 # 2 parts, O 20 -> 32, C 6 -> 8
    assert pw.shape == (2 * 2, 2, 3, 3, 1, 16, 4) and pw.dtype == np.int8
    hi, lo = kernels.weight_parts(w)
    for o, c, kh, kw in [(0, 0, 0, 0), (19, 5, 2, 1), (7, 4, 1, 2)]:
        oc, ob, ic, icb = o // 16, o % 16, c // 4, c % 4
        assert pw[oc * 2, ic, kh, kw, icb // 4, ob, icb % 4] == hi[o, c, kh, kw]
        assert pw[oc * 2 + 1, ic, kh, kw, icb // 4, ob, icb % 4] == lo[o, c, kh, kw]
    assert not pw[1 * 2, :, :, :, :, 4:].any()          # padded output channels are zero
    assert not pw[:, 1, :, :, :, :, 2:].any()            # padded input channels are zero


# ----------------------------------------------------------------------------- compiled
def digits_like_uint8_input():
    return digits_like(seed=2, input_dtype="uint8")


@needs_vnni
@pytest.mark.parametrize("make_graph,batch", [(digits_like, 1), (digits_like, 3), (resnet_like, 2),
                                              (digits_like_uint8_input, 2)])
def test_vnni_program_is_bit_exact(make_graph, batch):
    g = make_graph()
    x = random_input(g, batch)
    got, report = run_compiled(g, batch, VNNI_TARGET, x)
    assert report["strategy"] == "x86-vnni"
    want = G.run(g, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


@needs_vnni
def test_any_batch_program_is_bit_exact():
    """batch=None compiles a symbolic batch: one library for batch 1 and larger batches."""
    g = resnet_like(seed=4)
    ex, _ = compile_fast(g, None, VNNI_TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for batch in (1, 5):
        x = random_input(g, batch, seed=batch)
        assert np.array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(g, x)), batch


@needs_avx2
def test_avx2_fallback_is_bit_exact():
    g = resnet_like(seed=3)
    x = random_input(g, 2, seed=3)
    got, report = run_compiled(g, 2, AVX2_TARGET, x)
    assert report["strategy"] == "x86-avx2"
    assert np.array_equal(got, G.run(g, x))


@needs_vnni
def test_extreme_values_stay_exact():
    """All-max inputs against max-magnitude weights: the accumulators' worst case."""
    b = Builder((3, 6, 6), seed=5)
    x = b.conv("input", 16, wbits=9)
    y = b.conv(x, 32, wbits=8, raw=True)
    g = b.graph(y)
    for w in (g.ops[0].arrays["weight"], g.ops[1].arrays["weight"]):
        w[...] = np.where(np.arange(w.size).reshape(w.shape) % 2, 1, -1) * np.abs(w).max()
    for value in (-127, 127):
        xin = np.full((1, 3, 6, 6), value, np.int8)
        got, _ = run_compiled(g, 1, VNNI_TARGET, xin)
        assert np.array_equal(got, G.run(g, xin))


def test_unsupported_graphs_are_refused_with_a_reason():
    """The fast path refuses an op it cannot run exactly, with the reason; that op takes the
    default lowering, the others stay on the fast path (test_compile.py checks such mixed
    programs bit for bit). A CPU without the instructions gets no fast path at all."""
    g = digits_like()
    g.ops[1].attrs["groups"] = 2
    _, info = build.lower_module(g, tvm.target.Target(VNNI_TARGET), "auto", {"batch": 1}, log=lambda m: None)
    assert info["lowerings"][g.ops[1].name] == "default" and "grouped" in info["fallbacks"][g.ops[1].name]
    assert info["lowerings"][g.ops[0].name] == "packed"
    with pytest.raises(Unsupported, match="AVX"):
        x86.isa_for(tvm.target.Target({"kind": "llvm", "mcpu": "core2"}))


# ----------------------------------------------------------------------------- mixed programs
def mixed_residual(seed=21):
    """Fast-path ops around ops only the default lowering takes, so tensors change layout
    both ways inside the network: a maxpool of the signed input (int8, packed with the input's
    offset for the next conv), a grouped conv between packed convs, a residual add fused into
    a packed conv whose other branch comes from the default lowering, a packed add of a raw
    int32 tensor from the default lowering."""
    b = Builder((3, 10, 10), seed)
    m = b.pool("input", "maxpool", 2, 1)                 # default: pool of the network input
    x = b.conv(m, 16, wbits=5)                           # packed, on an int8 NCHW tensor packed here
    d = b.conv(x, 16, wbits=4, groups=4)                 # default: grouped
    y = b.conv(d, 16, wbits=3, raw=True)                 # packed raw conv, computes the add ...
    r = b.add(y, d)                                      # ... whose other branch is d, packed
    z = b.conv(r, 16, wbits=6, groups=2, raw=True)       # default: grouped, raw int32
    s = b.add(z, r)                                      # packed AddKernel of a packed int32 tensor
    p = b.pool(s, "avgpool", 3, 3)
    return b.graph(b.linear(b.flatten(p), 10, wbits=6, raw=True)), {
        m: "default", x: "packed", d: "default", y: "packed", r: "packed", z: "default", s: "packed"}


def offset_pools(seed=22):
    """Average pools of an int8 tensor that the default lowering made (stored with offset 128 on
    x86): a 7-bit output fits the storage, an 8-bit one does not and takes the default kernel."""
    b = Builder((16, 6, 6), seed)
    m = b.pool("input", "maxpool", 3, 1, padding=1)
    a7 = b.pool(m, "avgpool", 2, 2, out_bits=7)
    a8 = b.pool(m, "avgpool", 2, 2, out_bits=8)
    s = b.add(b.conv(a7, 16, raw=True), b.conv(a8, 16, raw=True))
    return b.graph(b.linear(b.flatten(s), 10, wbits=8, raw=True)), {m: "default", a7: "packed", a8: "default"}


@needs_vnni
@pytest.mark.parametrize("make_graph", [mixed_residual, offset_pools])
@pytest.mark.parametrize("batch", [None, 2])
def test_mixed_fast_and_default_program_is_bit_exact(make_graph, batch):
    g, expected = make_graph()
    G.validate(g)
    ex, info = compile_fast(g, batch, VNNI_TARGET)
    assert info["strategy"] == "x86-vnni" and info["batch"] == batch
    lowered = {op.output: info["lowerings"][op.name] for op in g.ops}
    assert {name: lowered[name] for name in expected} == expected
    assert set(info["fallbacks"]) == {op.name for op in g.ops if lowered[op.output] == "default"}
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for n in ((1, 5) if batch is None else (batch,)):
        x = random_input(g, n, seed=n)
        got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(g, x)
        assert got.dtype == want.dtype and np.array_equal(got, want), n


# ----------------------------------------------------------------------------- aarch64
AARCH64_SDOT = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
AARCH64_NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def test_aarch64_kernels_use_sdot():
    """Without a board: the generated aarch64 code of a conv kernel is made of sdot."""
    import re

    target = tvm.target.Target(AARCH64_SDOT)
    mod, report = build.lower_module(digits_like(), target, "auto", {"batch": 1})
    assert report["strategy"] == "arm-sdot"
    conv = next(gv for gv in mod.get_global_vars() if "ConvKernel" in gv.name_hint)
    lib = tvm.compile(tvm.IRModule({"main": mod[conv].with_attr("global_symbol", "main")}), target)
    asm = lib.mod.inspect_source("asm")
    assert len(re.findall(r"\bsdot\b", asm)) >= 4


@pytest.fixture(scope="module")
def arm_board():
    import shutil
    import socket

    from mixq.runtime import arm_board as board_mod
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        handle = board_mod.start(port)
    except board_mod.BoardUnavailable as e:
        pytest.skip(f"emulated aarch64 board unavailable: {e}")
    yield handle
    handle.stop()
    handle.log_path.unlink(missing_ok=True)


def run_on_board(board, lib_path, x) -> np.ndarray:
    """main(x) of an exported library on the board. The board's RPC server serves one session
    at a time, so the session is dropped (and collected) before returning."""
    import gc
    remote = board.connect()
    remote.upload(str(lib_path))
    vm = relax.VirtualMachine(remote.load_module(lib_path.name), remote.cpu())
    out = vm["main"](tvm.runtime.tensor(x, remote.cpu())).numpy()
    del vm, remote
    gc.collect()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", [AARCH64_SDOT, AARCH64_NEON], ids=["sdot", "neon"])
def test_aarch64_program_is_bit_exact_on_the_board(arm_board, tmp_path, target):
    import tvm.support.cc

    g = resnet_like(seed=7)
    x = random_input(g, 2, seed=7)
    ex, report = compile_fast(g, 2, target)
    lib_path = tmp_path / "model.so"
    ex.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    assert np.array_equal(run_on_board(arm_board, lib_path, x), G.run(g, x)), report["strategy"]
    g = digits_like_uint8_input()                 # uint8 input: stored as x - 128 for sdot
    x = random_input(g, 3, seed=8)
    ex, report = compile_fast(g, None, target)
    lib_path = tmp_path / "model_any_batch.so"
    ex.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    assert np.array_equal(run_on_board(arm_board, lib_path, x), G.run(g, x)), report["strategy"]


def odd_width_graphs():
    """Default-lowered kernels whose output rows are 3, 5, 6 and 7 wide (avgpool of the
    signed input, a default conv and add): the widths where the generic schedule's row
    vectors are not all 16, 8 or 4 lanes."""
    graphs = []
    for w in (3, 5, 6, 7):
        b = Builder((4, 4, 2 * w), seed=w)
        graphs.append(b.graph(b.pool("input", "avgpool", 2, 2)))
        b = Builder((8, 4, w), seed=w, input_dtype="uint8")
        x = b.conv("input", 8)
        graphs.append(b.graph(b.add(x, b.conv(x, 8))))
    return graphs


def vectorized_extents(mod) -> list[int]:
    """The extents of the vectorized loops of every PrimFunc, read from its TVMScript."""
    import re
    from tvm import tirx
    return [int(n) for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
            for n in re.findall(r"T\.vectorized\((?:T\.int\d+\()?(\d+)", f.script())]


def test_generic_schedule_vectorizes_only_power_of_two_lanes():
    """LLVM's aarch64 backend miscompiled the 3-lane vectors the generic schedule made of a
    3-wide output row (an avgpool was wrong in half its outputs on the board): every vector
    is now 2, 4, 8 or 16 lanes, and a 6-wide row still gets 2-lane vectors."""
    target = tvm.target.Target(AARCH64_NEON)
    found = set()
    for g in odd_width_graphs():
        mod, _ = build.lower_module(g, target, "default", log=lambda line: None)
        found.update(vectorized_extents(mod))
    assert found and found <= {2, 4, 8, 16}, found
    assert 2 in found


@pytest.mark.slow
def test_odd_width_default_kernels_are_exact_on_the_board(arm_board, tmp_path):
    import tvm.support.cc

    for i, g in enumerate(odd_width_graphs()):
        x = random_input(g, 2, seed=i)
        ex, _ = build.build_library(g, tvm.target.Target(AARCH64_NEON), "default", log=lambda line: None)
        lib_path = tmp_path / f"odd{i}.so"
        ex.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
        assert np.array_equal(run_on_board(arm_board, lib_path, x), G.run(g, x)), g.ops[0].name


# ----------------------------------------------------------------------------- tuning
@needs_vnni
def test_tuning_records_are_reused_and_stay_exact(tmp_path):
    b = Builder((16, 8, 8), seed=11)
    g = b.graph(b.conv("input", 32, wbits=9))
    db_dir = tmp_path / "tune-db"
    compile_fast(g, 1, VNNI_TARGET, db_dir, tune_trials=4)
    records = (db_dir / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 2, "expected the hand schedule's baseline record plus tuning trials"
    x = random_input(g, 1, seed=11)
    got, report = run_compiled(g, 1, VNNI_TARGET, x, db_dir)
    assert report["tuned_kernels"] == 1
    assert np.array_equal(got, G.run(g, x))
    compile_fast(g, 1, VNNI_TARGET, db_dir, tune_trials=4)               # same shapes: nothing to do
    assert (db_dir / "database_tuning_record.json").read_text().splitlines() == records
    got, report = run_compiled(g, None, VNNI_TARGET, x, db_dir)          # any-batch build: same loops
    assert report["tuned_kernels"] == 1 and np.array_equal(got, G.run(g, x))


@pytest.mark.slow
def test_aarch64_tuning_measures_on_the_board(arm_board, tmp_path):
    """--tune for aarch64: candidates cross-compiled here, timed on the board over RPC."""
    import tvm.support.cc

    b = Builder((16, 6, 6), seed=13)
    g = b.graph(b.conv("input", 16, wbits=9))
    target = tvm.target.Target(AARCH64_SDOT)
    db_dir = tmp_path / "tune-db"
    build.lower_module(g, target, "auto", {"batch": 1, "tune_trials": 2, "tune_db": db_dir,
                                           "tune_board": arm_board.address})
    assert (db_dir / "database_tuning_record.json").read_text().strip(), "no candidate ran on the board"
    ex, report = compile_fast(g, 1, AARCH64_SDOT, db_dir)
    assert report["tuned_kernels"] == 1
    lib_path = tmp_path / "tuned.so"
    ex.export_library(str(lib_path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    x = random_input(g, 1, seed=13)
    assert np.array_equal(run_on_board(arm_board, lib_path, x), G.run(g, x))


# ----------------------------------------------------------------------------- mixq compile
def mixq_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "mixq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@needs_vnni
def test_mixq_compile_takes_the_fast_path(tmp_path):
    import json
    frozen = tmp_path / "frozen"
    G.save(digits_like(), frozen)
    target = json.dumps(VNNI_TARGET)
    r = mixq_cli("compile", frozen, "--target", target, "--batch", 2, "--out", tmp_path / "build")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "build" / "deploy.json").read_text())
    assert record["strategy"] == "x86-vnni" and record["entry"]["batch"] == 2
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "build" / "model.so")), tvm.cpu())
    x = random_input(G.load(frozen), 2)
    assert np.array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(G.load(frozen), x))
    r = mixq_cli("compile", frozen, "--target", target, "--tune", 4, "--out", tmp_path / "b2")
    assert r.returncode == 2 and "--tune-db" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = mixq_cli("compile", frozen, "--target", target, "--batch", 0, "--out", tmp_path / "b3")
    assert r.returncode == 2 and "--batch 0" in r.stderr
