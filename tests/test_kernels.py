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

# CPUs whose features every AVX512-VNNI host has (Intel from Cascade Lake, AMD from Zen 4): a newer
# model's (sapphirerapids: AVX-VNNI, AVX512-FP16) let LLVM emit instructions Zen 4 lacks, and the
# tests died of SIGILL there
VNNI_TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
AVX2_TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
# + VBMI (Ice Lake on, Zen 4): depthwise convs take the 4-tap vpermb + vpdpbusd intrinsic
VBMI_TARGET = {**VNNI_TARGET, "mattr": ["+avx512vbmi"]}


def host_has(feature: str) -> bool:
    from tvm.target import codegen
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return bool(codegen.target_has_features(feature, host))


needs_vnni = pytest.mark.skipif(not host_has("avx512vnni"), reason="host CPU has no AVX512-VNNI")
needs_avx2 = pytest.mark.skipif(not host_has("avx2"), reason="host CPU has no AVX2")
needs_vbmi = pytest.mark.skipif(not (host_has("avx512vnni") and host_has("avx512vbmi")),
                                reason="host CPU has no AVX512-VNNI with VBMI")


# ----------------------------------------------------------------------------- graph builder
class Builder:
    """Random integer graphs that obey the contract (mixq.graph) with outputs spread over the
    activation range, so that requantization, clipping and rounding are all exercised."""

    def __init__(self, shape, seed=0, input_dtype="int8", bits=8):
        self.rng = np.random.default_rng(seed)
        self.ops, self.tensors = [], {}
        self.input = G.TensorInfo("input", tuple(shape), input_dtype, bits, 0.05)
        self.tensors["input"] = self.input
        self.max = {"input": (1 << (bits - 1)) - 1 if input_dtype == "int8" else (1 << bits) - 1}

    def _multiplier(self, real, n):
        return G.quantize_multiplier(real * self.rng.uniform(0.5, 1.5, n), "t")

    def _add_tensor(self, name, shape, dtype, bits):
        self.tensors[name] = G.TensorInfo(name, tuple(shape), dtype, bits, 1.0)

    def conv(self, src, cout, k=3, stride=1, padding=1, wbits=8, out_bits=8, raw=False, kind="conv2d", groups=1,
             signed=False):
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
            dtype, bits = ("int8" if signed else "uint8"), out_bits
            self.max[name] = (1 << (out_bits - 1)) - 1 if signed else (1 << out_bits) - 1
            if signed:
                attrs["out_signed"] = True
        self.ops.append(G.Op(name, kind, [src], name, attrs, arrays))
        self._add_tensor(name, shape, dtype, bits)
        return name

    def linear(self, src, cout, **kw):
        return self.conv(src, cout, kind="linear", **kw)

    def add(self, *srcs, out_bits=8, signed=False):
        name = f"add{len(self.ops)}"
        c = self.tensors[srcs[0]].shape[0]
        arrays = {}
        for i, s in enumerate(srcs):
            arrays[f"multiplier{i}"], arrays[f"shift{i}"] = self._multiplier((1 << out_bits) / (len(srcs) * self.max[s]), c)
        attrs = {"out_bits": out_bits, **({"out_signed": True} if signed else {})}
        self.ops.append(G.Op(name, "add", list(srcs), name, attrs, arrays))
        self._add_tensor(name, self.tensors[srcs[0]].shape, "int8" if signed else "uint8", out_bits)
        self.max[name] = (1 << (out_bits - 1)) - 1 if signed else (1 << out_bits) - 1
        return name

    def pool(self, src, kind, kernel, stride, padding=0, out_bits=8, signed=False):
        name = f"{kind}{len(self.ops)}"
        c, h, w = self.tensors[src].shape
        shape = (c, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        attrs = {"kernel": kernel, "stride": stride, "padding": padding}
        arrays = {}
        dtype = self.tensors[src].dtype
        if kind == "avgpool":
            attrs.update(out_bits=out_bits, **({"out_signed": True} if signed else {}))
            arrays["multiplier"], arrays["shift"] = G.quantize_multiplier(np.array([1.0 / kernel ** 2]), name)
            bits, dtype = out_bits, "int8" if signed else "uint8"
        else:
            bits = self.tensors[src].bits
        self.ops.append(G.Op(name, kind, [src], name, attrs, arrays))
        self._add_tensor(name, shape, dtype, bits)
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
    t = graph.input
    hi = (1 << (t.bits - 1)) - 1 if t.dtype == "int8" else (1 << t.bits) - 1
    lo = -hi if t.dtype == "int8" else 0
    return rng.integers(lo, hi + 1, (batch, *t.shape)).astype(t.dtype)


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
    """The fast path refuses an op it cannot run well, with the reason; that op takes the
    default lowering, the others stay on the fast path (test_compile.py checks such mixed
    programs bit for bit). A CPU without the instructions gets no fast path at all."""
    b = Builder((3, 8, 8))
    x = b.conv("input", 16, wbits=5)
    m = b.conv(x, 32, wbits=4, groups=16)                # depthwise with channel multiplier 2
    g = b.graph(b.conv(m, 16))
    lines = []
    _, info = build.lower_module(g, tvm.target.Target(VNNI_TARGET), "auto", {"batch": 1}, log=lines.append)
    assert info["lowerings"][m] == "default" and info["lowerings"][x] == "packed"
    why = info["fallbacks"][m]
    assert "depthwise conv with channel multiplier 2" in why and "16x its multiply-adds" in why, why
    assert lines == [f"fast path: used (x86-vnni) for 2 of 3 ops; default lowering for {why}"]
    with pytest.raises(Unsupported, match="AVX"):
        x86.isa_for(tvm.target.Target({"kind": "llvm", "mcpu": "core2"}))


# ----------------------------------------------------------------------------- mixed programs
def mixed_residual(seed=21):
    """Fast-path ops around ops only the default lowering takes, so tensors change layout
    both ways inside the network: a maxpool of the signed input (int8, packed with the input's
    offset for the next conv), grouped convs the fast path declines between packed convs
    (channel multiplier 2: 16x the multiply-adds on the packed kernel), a depthwise conv of a
    tensor the default lowering made, a residual add fused into a packed conv whose other branch
    comes from the default lowering, a packed add of a raw int32 tensor from the default
    lowering."""
    b = Builder((3, 10, 10), seed)
    m = b.pool("input", "maxpool", 2, 1)                 # default: pool of the network input
    x = b.conv(m, 16, wbits=5)                           # packed, on an int8 NCHW tensor packed here
    d = b.conv(x, 32, wbits=4, groups=16)                # default: channel multiplier 2
    dw = b.conv(d, 32, wbits=7, groups=32)               # packed depthwise, of d packed here
    y = b.conv(dw, 32, wbits=3, raw=True)                # packed raw conv, computes the add ...
    r = b.add(y, d)                                      # ... whose other branch is d, packed
    q = b.conv(r, 16, k=1, padding=0, wbits=5)           # packed
    z = b.conv(q, 32, wbits=6, groups=16, raw=True)      # default: channel multiplier 2, raw int32
    s = b.add(z, r)                                      # packed AddKernel of a packed int32 tensor
    p = b.pool(s, "avgpool", 3, 3)
    return b.graph(b.linear(b.flatten(p), 10, wbits=6, raw=True)), {
        m: "default", x: "packed", d: "default", dw: "packed", y: "packed", r: "packed", q: "packed",
        z: "default", s: "packed"}


def offset_pools(seed=22):
    """Average pools of an int8 tensor that the default lowering made (stored with offset 128 on
    x86): their outputs are unsigned activations, stored without the input's offset, so an 8-bit
    one fits the storage as a 7-bit one does."""
    b = Builder((16, 6, 6), seed)
    m = b.pool("input", "maxpool", 3, 1, padding=1)
    a7 = b.pool(m, "avgpool", 2, 2, out_bits=7)
    a8 = b.pool(m, "avgpool", 2, 2, out_bits=8)
    s = b.add(b.conv(a7, 16, raw=True), b.conv(a8, 16, raw=True))
    return b.graph(b.linear(b.flatten(s), 10, wbits=8, raw=True)), {m: "default", a7: "packed", a8: "packed"}


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


# ----------------------------------------------------------------------------- depthwise / grouped
# (channels, (height, width), stride, padding, input bits, weight storage bits, output): a
# depthwise 3x3 conv (groups = channels) of the uint8 output of a packed 1x1 conv (so 16-channel
# blocks even for 8 channels), requantized to 8 or 5 bits, raw int32, or raw into a residual add
# with its input that the conv's epilogue computes ("add")
DEPTHWISE_CASES = [
    (8, (7, 7), 1, 1, 8, 8, "requant"),
    (16, (9, 7), 2, 1, 4, 9, "requant"),
    (24, (11, 9), 1, 0, 2, 5, "raw"),
    (40, (7, 9), 2, 0, 8, 12, "requant"),
    (40, (9, 9), 1, 1, 6, 8, "add"),
    (24, (5, 11), 2, 1, 3, 16, "raw"),
]


def depthwise_graph(channels, hw, stride, padding, in_bits, wbits, out, seed=0):
    b = Builder((channels, *hw), seed, "uint8")
    x = b.conv("input", channels, k=1, padding=0, wbits=6, out_bits=in_bits)
    y = b.conv(x, channels, stride=stride, padding=padding, wbits=wbits, groups=channels, raw=out != "requant",
               out_bits=5 if in_bits < 8 else 8)
    return b.graph(b.add(y, x) if out == "add" else y), y


# (in channels, out channels, groups, stride, padding): grouped 3x3 convs of a packed conv's
# output; the output chunks' windows of input chunks (kernels.group_window) differ
GROUPED_CASES = [
    (32, 32, 2, 1, 1),          # 16 -> 16 per group: one chunk each
    (32, 64, 4, 2, 1),          # 8 -> 16: an output chunk reads half an input chunk
    (24, 24, 3, 2, 0),          # 8 -> 8: two groups per output chunk, a partial chunk
    (48, 48, 3, 1, 1),
    (16, 16, 8, 1, 1),          # 2 -> 2: 8x the multiply-adds, the most the fast path takes
]


def grouped_graph(cin, cout, groups, stride, padding, seed=0):
    b = Builder((cin, 7, 9), seed, "uint8")
    x = b.conv("input", cin, k=1, padding=0, wbits=5)
    y = b.conv(x, cout, stride=stride, padding=padding, wbits=7, groups=groups)
    return b.graph(y), y


def depthwise_chain(seed=31):
    """Depthwise and grouped convs in one network: straight on the signed input (packed with
    its offset: the padding is the stored zero), 9- and 12-bit weights, stride 2 without
    padding, a raw depthwise conv with a residual add fused into it, a grouped conv, a depthwise
    conv of 8 channels, then pooling and a linear layer."""
    b = Builder((24, 9, 9), seed)
    a = b.conv("input", 24, wbits=9, groups=24, out_bits=5)
    c = b.conv(a, 24, stride=2, padding=0, wbits=12, groups=24)
    c = b.conv(c, 40, k=1, padding=0, wbits=6)
    d = b.conv(c, 40, wbits=4, groups=40, raw=True)
    e = b.add(d, c)
    f = b.conv(e, 40, wbits=7, groups=5)
    h = b.conv(b.conv(f, 8, k=1, padding=0), 8, stride=2, groups=8)
    return b.graph(b.linear(b.flatten(b.pool(h, "avgpool", 2, 2)), 10, wbits=8, raw=True))


DOT_PRODUCT_ISAS = ("x86-vnni", "arm-sdot")      # grouped convs on the fast path need them


def expected_lowering(op, strategy: str) -> str:
    """Where an op of these tests goes: grouped convs other than depthwise ones need
    dot-product instructions, the fast path takes everything else."""
    grouped = op.kind == "conv2d" and op.attrs.get("groups", 1) > 1 and op.arrays["weight"].shape[1] > 1
    return "default" if grouped and strategy not in DOT_PRODUCT_ISAS else "packed"


def assert_on_the_fast_path(g, info, mod=None):
    """Every op of `g` took the packed lowering, but grouped convs on an ISA without dot
    products (declined, with that reason); with `mod`, its depthwise convs are DepthwiseKernels."""
    for op in g.ops:
        assert info["lowerings"][op.name] == expected_lowering(op, info["strategy"]), (op.name, info)
    declined = {op.name for op in g.ops if info["lowerings"][op.name] == "default"}
    assert set(info.get("fallbacks", {})) == declined, info.get("fallbacks")
    assert all("without dot-product instructions" in info["fallbacks"][name] for name in declined)
    if mod is not None:
        depthwise = sum(1 for op in g.ops if op.kind == "conv2d" and op.attrs["groups"] == op.arrays["weight"].shape[0]
                        and op.arrays["weight"].shape[1] == 1)
        names = [gv.name_hint for gv in mod.get_global_vars()]
        assert 0 < depthwise and sum(n.endswith("_DepthwiseKernel") for n in names) >= 1, names


@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(VBMI_TARGET, marks=needs_vbmi, id="vbmi"),
                                    pytest.param(AVX2_TARGET, marks=needs_avx2, id="avx2")])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "c{}-{}x{}-s{}-p{}-a{}-w{}-{}".format(c[0], *c[1], *c[2:]))
def test_depthwise_conv_is_bit_exact_on_the_fast_path(case, target):
    g, name = depthwise_graph(*case)
    x = random_input(g, 2, seed=case[0])
    got, info = run_compiled(g, 2, target, x)
    assert info["lowerings"][name] == "packed"
    assert_on_the_fast_path(g, info)
    want = G.run(g, x)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def four_tap_kernels(mod) -> dict:
    """{name: uses the 4-tap intrinsic} of a lowered module's DepthwiseKernels."""
    return {gv.name_hint: "permvar" in f.script() for gv, f in mod.functions_items()
            if gv.name_hint.endswith("_DepthwiseKernel")}


def test_depthwise_takes_four_taps_where_weights_fit_int8():
    """With VBMI a depthwise conv of int8 weights and a kernel of at most 4 columns goes 4 taps
    to a vpdpbusd (vpermb lines the pixels up); 9- to 16-bit weights keep the int16 kernel, and
    so does every depthwise conv without VBMI."""
    for case in DEPTHWISE_CASES:
        g, name = depthwise_graph(*case)
        wide = case[5] > 8
        for target, four in ((VBMI_TARGET, not wide), (VNNI_TARGET, False)):
            mod, _ = build.lower_module(g, tvm.target.Target(target), "auto", {"batch": 2})
            assert set(four_tap_kernels(mod).values()) == {four}, (case, target)
    w = np.zeros((16, 1, 5, 5), dtype=np.int64)
    assert kernels.four_taps_fit(w[:, :, :4, :4], "uint8", x86.VNNI_VBMI)
    assert not kernels.four_taps_fit(w, "uint8", x86.VNNI_VBMI)                 # 5 columns
    assert not kernels.four_taps_fit(w[:, :, :3, :3] + 128, "uint8", x86.VNNI_VBMI)
    assert not kernels.four_taps_fit(w[:, :, :3, :3], "uint8", x86.VNNI)


@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(AVX2_TARGET, marks=needs_avx2, id="avx2")])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: "{}-{}-g{}-s{}-p{}".format(*c))
def test_grouped_conv_is_bit_exact(case, target):
    """On the fast path with VNNI; on AVX2 the default lowering (the packed conv's int32
    multiply-adds are no faster there), with the reason."""
    g, name = grouped_graph(*case)
    x = random_input(g, 2, seed=case[2])
    got, info = run_compiled(g, 2, target, x)
    assert info["lowerings"][name] == ("packed" if target is VNNI_TARGET else "default")
    assert_on_the_fast_path(g, info)
    assert np.array_equal(got, G.run(g, x))


@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(AVX2_TARGET, marks=needs_avx2, id="avx2")])
def test_depthwise_conv_of_a_few_input_channels_is_bit_exact(target):
    """An RGB-like input is packed in 4-channel blocks, not the DepthwiseKernel's 16: its
    depthwise conv is a grouped ConvKernel (VNNI), or the default lowering (AVX2)."""
    b = Builder((3, 7, 9), seed=41, input_dtype="uint8", bits=6)
    y = b.conv("input", 3, stride=2, groups=3, wbits=9)
    g = b.graph(b.conv(y, 16, k=1, padding=0))
    x = random_input(g, 2, seed=41)
    got, info = run_compiled(g, 2, target, x)
    assert info["lowerings"][y] == ("packed" if target is VNNI_TARGET else "default"), info
    if target is AVX2_TARGET:
        assert "depthwise conv of 4-channel blocks on x86-avx2" in info["fallbacks"][y]
    assert np.array_equal(got, G.run(g, x))


@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(VBMI_TARGET, marks=needs_vbmi, id="vbmi")])
def test_depthwise_network_is_bit_exact_at_any_batch(target):
    g = depthwise_chain()
    G.validate(g)
    lines = []
    mod, info = build.lower_module(g, tvm.target.Target(target), "auto", {"batch": None}, log=lines.append)
    assert_on_the_fast_path(g, info, mod)
    assert lines == ["fast path: used (x86-vnni) for 11 of 11 ops (4 depthwise convs, 1 grouped conv)"]
    if target is VBMI_TARGET:       # the 4- and 7-bit ones, not the 9- and 12-bit ones
        assert sorted(four_tap_kernels(mod).values()) == [False, False, True, True]
    ex, _ = compile_fast(g, None, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for batch in (1, 3):
        x = random_input(g, batch, seed=batch)
        assert np.array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(g, x)), batch


def test_group_windows_cover_each_output_channels_group():
    """kernels.group_window: the input chunks an output chunk reads hold its channels' groups,
    and the packed weights put each weight where the ConvKernel's index reads it."""
    rng = np.random.default_rng(0)
    for cin, cout, groups, block in [(32, 32, 2, 16), (32, 64, 4, 16), (24, 24, 3, 16), (16, 16, 8, 16),
                                     (8, 8, 2, 4), (40, 40, 5, 16), (64, 64, 64, 16), (96, 96, 3, 16)]:
        width, per, step = kernels.group_window(cin, cout, groups, block)
        w = rng.integers(-127, 128, (cout, cin // groups, 1, 1))
        pw = kernels.pack_grouped_weight(w, groups, block, (width, per, step))
        assert pw.shape[:2] == (kernels.chunks(cout), width)
        dense = np.zeros((cout, cin), np.int64)               # the weights the packed kernel applies
        for o in range(cout):
            start = o // 16 // per * step
            for j in range(width * block):
                ch = start * block + j
                if ch < cin:
                    dense[o, ch] = pw[o // 16, j // block, 0, 0, (j % block) // 4, o % 16, j % 4]
                else:
                    assert pw[o // 16, j // block, 0, 0, (j % block) // 4, o % 16, j % 4] == 0
        og, cg = cout // groups, cin // groups
        want = np.zeros((cout, cin), np.int64)
        for o in range(cout):
            want[o, o // og * cg:(o // og + 1) * cg] = w[o, :, 0, 0]
        assert np.array_equal(dense, want), (cin, cout, groups)
    assert kernels.group_window(64, 64, 64, 16) == (1, 1, 1)          # depthwise: its own chunk
    assert kernels.group_window(32, 64, 4, 16) == (1, 2, 1)


# ----------------------------------------------------------------------------- signed activations
def signed_bottleneck(seed=51, input_dtype="int8"):
    """Signed (int8, out_signed) activations everywhere a MobileNetV2 has them and more, every
    op on the fast path: signed outputs of a 3x3 conv, a 1x1 projection, a depthwise conv, a
    residual add fused into a 1x1 conv's epilogue (a signed branch) and into a depthwise one's
    (a signed and an unsigned branch: two offsets), a standalone add of a signed and an
    unsigned tensor, and a linear layer (the network output); signed tensors read by a conv, a
    depthwise conv, a maxpool (zero padding: not -inf for negative values), an avgpool (a signed
    output: the average of a signed map), a flatten of a 2x2 map and a linear layer. 24
    channels: padded blocks."""
    b = Builder((8, 10, 10), seed, input_dtype)
    s0 = b.conv("input", 24, wbits=6, signed=True)                   # 3x3, 4-channel input blocks
    e = b.conv(s0, 48, k=1, padding=0, wbits=5)                       # expansion of a signed tensor
    d = b.conv(e, 48, groups=48, wbits=7)
    y = b.conv(d, 24, k=1, padding=0, wbits=6, raw=True)              # projection, computes ...
    r1 = b.add(y, s0, signed=True)                                    # ... this signed residual sum
    p = b.conv(r1, 24, k=1, padding=0, wbits=4, out_bits=6, signed=True)
    u = b.conv(r1, 24, k=1, padding=0, wbits=5, out_bits=7)
    s = b.add(p, u, out_bits=7, signed=True)                          # standalone, offsets differ
    dw = b.conv(s, 24, groups=24, wbits=8, raw=True)                  # depthwise of a signed tensor ...
    r2 = b.add(dw, s, u, signed=True)                                 # ... with this add in its epilogue
    dws = b.conv(r2, 24, stride=2, groups=24, wbits=9, out_bits=5, signed=True)
    m = b.pool(dws, "maxpool", 3, 1, padding=1)
    q = b.conv(m, 32, stride=2, out_bits=7, signed=True)
    a = b.pool(q, "avgpool", 2, 1, out_bits=7, signed=True)
    z = b.conv(a, 16, k=1, padding=0, signed=True)
    return b.graph(b.linear(b.flatten(z), 10, wbits=7, signed=True))


def signed_bottleneck_uint8_input():
    return signed_bottleneck(seed=52, input_dtype="uint8")


@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(AVX2_TARGET, marks=needs_avx2, id="avx2")])
@pytest.mark.parametrize("make_graph", [signed_bottleneck, signed_bottleneck_uint8_input])
def test_signed_activations_are_bit_exact_on_the_fast_path(make_graph, target):
    """Every op packed (none declined), the int8 output bit-exact at batch 1 and 3 (one
    any-batch library) and at a fixed batch 2."""
    g = make_graph()
    G.validate(g)
    assert sum(bool(op.attrs.get("out_signed")) for op in g.ops) == 10
    for batch, runs in ((None, (1, 3)), (2, (2,))):
        lines = []
        mod, info = build.lower_module(g, tvm.target.Target(target), "auto", {"batch": batch}, log=lines.append)
        assert set(info["lowerings"].values()) == {"packed"} and "fallbacks" not in info, info
        assert lines == [f"fast path: used ({info['strategy']}) for 17 of 17 ops (3 depthwise convs)"]
        ex, _ = compile_fast(g, batch, target)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        for n in runs:
            x = random_input(g, n, seed=n)
            got, want = vm["main"](tvm.runtime.tensor(x)).numpy(), G.run(g, x)
            assert got.dtype == want.dtype == np.int8 and np.array_equal(got, want), (batch, n)


def test_signed_outputs_are_stored_as_the_signed_input_is(monkeypatch):
    """The packed values' storage: x86 stores a signed activation as x + 128 in uint8 (an
    unsigned one as it is), aarch64 sdot as it is in int8 (an unsigned one as a - 128), an
    avgpool's output by its own signedness; max_abs bounds the stored values."""
    from mixq.compile import lower
    g = signed_bottleneck()
    seen = {}
    real = lower.lower_op

    def spy(ctx, op, strategies):
        real(ctx, op, strategies)
        seen[op.output] = ctx.values[op.output]
    monkeypatch.setattr(lower, "lower_op", spy)
    for target, signed, unsigned in ((VNNI_TARGET, ("uint8", 128), ("uint8", 0)),
                                     (AARCH64_SDOT, ("int8", 0), ("int8", -128))):
        seen.clear()
        lower.lower_graph(g, tvm.target.Target(target), batch=1)
        for op in g.ops:
            t = g.tensors[op.output]
            if t.dtype == "int32":
                continue
            layout, v = seen[op.output]
            assert layout == "packed" and (v.dtype, v.offset) == (signed if t.dtype == "int8" else unsigned), op.name
            hi = (1 << (t.bits - 1)) - 1 if t.dtype == "int8" else (1 << t.bits) - 1
            lo = -hi if t.dtype == "int8" else 0
            assert v.max_abs == max(abs(lo + v.offset), abs(hi + v.offset)), op.name


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
    g = signed_bottleneck()                       # int8 activations: as they are for sdot, + 128 for neon
    x = random_input(g, 3, seed=9)
    ex, report = compile_fast(g, None, target)
    assert set(report["lowerings"].values()) == {"packed"}, report
    lib_path = tmp_path / "signed_any_batch.so"
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


@pytest.mark.parametrize("target", [AARCH64_SDOT, AARCH64_NEON], ids=["sdot", "neon"])
def test_packed_depthwise_kernels_vectorize_only_power_of_two_lanes(target):
    """The depthwise and grouped kernels on aarch64: 16-lane vectors (the channel block), never
    the odd widths LLVM's aarch64 backend miscompiled, whatever the rows' widths (9, 4, 2)."""
    g = depthwise_chain()
    mod, info = build.lower_module(g, tvm.target.Target(target), "auto", {"batch": 1}, log=lambda line: None)
    assert_on_the_fast_path(g, info, mod)
    depthwise = {gv: f for gv, f in mod.functions_items() if gv.name_hint.endswith("_DepthwiseKernel")}
    found = set(vectorized_extents(tvm.IRModule(depthwise)))
    assert found and found <= {2, 4, 8, 16}, found
    found = set(vectorized_extents(mod))
    assert found and found <= {2, 4, 8, 16}, found


@pytest.mark.slow
@pytest.mark.parametrize("target", [AARCH64_SDOT, AARCH64_NEON], ids=["sdot", "neon"])
def test_aarch64_depthwise_and_grouped_convs_are_bit_exact_on_the_board(arm_board, tmp_path, target):
    """DepthwiseKernel (int16 multiply-adds, smlal) and grouped ConvKernels (sdot; with plain
    NEON grouped convs take the default lowering) run on the emulated board: a network of them
    at any batch, the cases of the x86 tests at batch 2 in one library each."""
    import tvm.support.cc

    cc = tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++")
    g = depthwise_chain()
    ex, report = compile_fast(g, None, target)
    assert_on_the_fast_path(g, report)
    ex.export_library(str(tmp_path / "chain.so"), fcompile=cc)
    x = random_input(g, 3, seed=3)
    assert np.array_equal(run_on_board(arm_board, tmp_path / "chain.so", x), G.run(g, x)), report["strategy"]
    for i, case in enumerate(DEPTHWISE_CASES + GROUPED_CASES):
        g, name = depthwise_graph(*case) if len(case) == 7 else grouped_graph(*case)
        ex, report = compile_fast(g, 2, target)
        assert_on_the_fast_path(g, report)
        ex.export_library(str(tmp_path / f"case{i}.so"), fcompile=cc)
        x = random_input(g, 2, seed=i)
        assert np.array_equal(run_on_board(arm_board, tmp_path / f"case{i}.so", x), G.run(g, x)), (case, report["strategy"])


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
@pytest.mark.parametrize("target", [pytest.param(VNNI_TARGET, marks=needs_vnni, id="vnni"),
                                    pytest.param(VBMI_TARGET, marks=needs_vbmi, id="vbmi")])
def test_tuning_records_are_reused_and_stay_exact(tmp_path, target):
    b = Builder((16, 8, 8), seed=11)
    g = b.graph(b.conv(b.conv("input", 32, wbits=9), 32, groups=32))     # a ConvKernel, a DepthwiseKernel (4 taps: vbmi)
    db_dir = tmp_path / "tune-db"
    compile_fast(g, 1, target, db_dir, tune_trials=4)
    records = (db_dir / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 2, "expected the hand schedule's baseline record plus tuning trials"
    x = random_input(g, 1, seed=11)
    got, report = run_compiled(g, 1, target, x, db_dir)
    assert report["tuned_kernels"] == 2
    assert np.array_equal(got, G.run(g, x))
    compile_fast(g, 1, target, db_dir, tune_trials=4)               # same shapes: nothing to do
    assert (db_dir / "database_tuning_record.json").read_text().splitlines() == records
    got, report = run_compiled(g, None, target, x, db_dir)          # any-batch build: same loops
    assert report["tuned_kernels"] == 2 and np.array_equal(got, G.run(g, x))


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
