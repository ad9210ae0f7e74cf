"""The integer contract op by op: the golden NumPy interpreter (mixq.graph) against plain
Python-integer loops written from docs/integer-contract.md, and the torch integer simulation
(mixq.intsim) against the golden interpreter. Plus requantization constants, bit packing,
save/load/validate and the overflow proof on hand-made graphs."""
import json
import shutil

import numpy as np
import pytest
import torch

from mixq import graph as G, intsim

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- references
def ref_rq(v: int, m: int, s: int) -> int:
    """(v * M + 2^(s-1)) >> s with Python's unbounded ints (>> floors, like the contract)."""
    return (v * m + (1 << (s - 1))) >> s


def ref_conv_acc(x, w, stride, pad, groups):
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    og = o // groups
    out = np.zeros((n, o, ho, wo), dtype=object)
    for b in range(n):
        for oc in range(o):
            g = oc // og
            for i in range(ho):
                for j in range(wo):
                    acc = 0
                    for ic in range(cg):
                        for di in range(k):
                            for dj in range(k):
                                yy, xx = i * stride + di - pad, j * stride + dj - pad
                                if 0 <= yy < h and 0 <= xx < wd:
                                    acc += int(x[b, g * cg + ic, yy, xx]) * int(w[oc, ic, di, dj])
                    out[b, oc, i, j] = acc
    return out


def ref_finish(acc, bias, mult=None, shift=None, out_bits=None, signed=False):
    """acc + bias, then rq + clip per channel (axis 1) when a multiplier is given: to
    0..2^bits - 1, or (signed) to -(2^(bits-1) - 1)..2^(bits-1) - 1."""
    lo, hi = (-((1 << (out_bits - 1)) - 1), (1 << (out_bits - 1)) - 1) if signed else (0, (1 << (out_bits or 1)) - 1)
    out = np.empty(acc.shape, dtype=np.int64)
    for idx in np.ndindex(acc.shape):
        c = idx[1]
        v = int(acc[idx]) + int(bias[c])
        if mult is not None:
            v = min(max(ref_rq(v, int(mult[c]), int(shift[c])), lo), hi)
        out[idx] = v
    return out


def ref_pool(x, k, stride, pad, reduce):
    n, c, h, w = x.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((n, c, ho, wo), dtype=np.int64)
    for b, ch, i, j in np.ndindex(n, c, ho, wo):
        vals = []
        for di in range(k):
            for dj in range(k):
                yy, xx = i * stride + di - pad, j * stride + dj - pad
                inside = 0 <= yy < h and 0 <= xx < w
                vals.append(int(x[b, ch, yy, xx]) if inside else 0)   # zero padding
        out[b, ch, i, j] = reduce(vals)
    return out


def requant_arrays(channels, rng=RNG, negative=True):
    """Per-channel (M, s) spanning the full range: shifts 1 and 62 included, negative M."""
    m = rng.integers(1, 2**31 - 1, size=channels, dtype=np.int64)
    if negative:
        m[::3] *= -1
    s = rng.integers(20, 40, size=channels)
    s[0], s[-1] = 1, 62
    m[0] = rng.integers(-3, 4)           # shift 1 only makes sense with a small multiplier
    return m.astype(np.int32), s.astype(np.int32)


def golden_and_sim(op, *xs):
    """Run one op in the golden interpreter and in the torch simulation; they must agree."""
    gold = G._NUMPY_OPS[op.kind](op, *xs)
    arrays = {k: torch.from_numpy(v.astype(np.int64)) for k, v in op.arrays.items()}
    sim = intsim.TORCH_OPS[op.kind](op, arrays, *[torch.from_numpy(x) for x in xs]).numpy()
    assert sim.dtype == gold.dtype and np.array_equal(sim, gold), f"{op.kind}: intsim != golden"
    return gold


# ----------------------------------------------------------------------------- arithmetic
def test_rq_matches_python_ints_at_the_extremes():
    x = np.array([[0, 1, -1, 2**31 - 1, -(2**31), 12345, -12345, 7]], dtype=np.int64).T.repeat(4, 1)
    m = np.array([2**31 - 1, -(2**31 - 1), 1, -1], dtype=np.int32)
    s = np.array([62, 62, 1, 1], dtype=np.int32)
    got = G.rq(x, m, s)
    want = np.array([[ref_rq(int(v), int(m[c]), int(s[c])) for c in range(4)] for v in x[:, 0]])
    assert np.array_equal(got, want)
    sim = intsim.rq(torch.from_numpy(x), torch.from_numpy(m.astype(np.int64)), torch.from_numpy(s.astype(np.int64)))
    assert np.array_equal(sim.numpy(), want)


def test_rq_rounds_ties_up_and_floors_negatives():
    # x * M / 2^s = k + 1/2 exactly: the contract rounds half up (towards +inf), also below 0.
    x = np.array([[1], [3], [5], [-1], [-3], [-5], [2], [-2]], dtype=np.int64)
    got = G.rq(x, np.array([1], dtype=np.int32), np.array([1], dtype=np.int32))[:, 0]
    assert got.tolist() == [1, 2, 3, 0, -1, -2, 1, -1]       # 0.5->1, 1.5->2, 2.5->3, -0.5->0, -1.5->-1, -2.5->-2
    # negative multiplier: (3 * -1 + 1) >> 1 = -1
    assert G.rq(np.array([[3]]), np.array([-1], dtype=np.int32), np.array([1], dtype=np.int32))[0, 0] == -1


@pytest.mark.parametrize("real", [1.0, 0.5, 0.7071, 1e-3, 3.3e-7, 0.999999999, 123.456, 2.0**20, -0.25, -1e-5])
def test_quantize_multiplier_is_accurate(real):
    m, s = G.quantize_multiplier(np.array([real]))
    m, s = int(m[0]), int(s[0])
    assert 1 <= s <= 62 and abs(m) <= 2**31 - 1
    assert (m < 0) == (real < 0)
    if s < 62:                                   # normalized: full 31-bit mantissa
        assert 2**30 <= abs(m) < 2**31
    assert abs(m / 2.0**s - real) <= 2.0**-31 * abs(real) + 2.0**-(s + 1)


def test_quantize_multiplier_edges():
    m, s = G.quantize_multiplier(np.array([0.0, 2.0**-70, 2.0**-40]))
    assert m.tolist()[:2] == [0, 0] and s.tolist()[1] == 62
    assert m[2] / 2.0 ** s[2] == 2.0**-40              # tiny but representable at shift 62
    m, s = G.quantize_multiplier(np.array([2.0**29]))
    assert m[0] / 2.0 ** s[0] == 2.0**29
    with pytest.raises(G.GraphError, match="layer 'big'.*too large"):
        G.quantize_multiplier(np.array([2.0**31]), "big")
    with pytest.raises(G.GraphError, match="non-finite"):
        G.quantize_multiplier(np.array([np.nan]), "nan")
    assert G.quantize_multiplier(np.array([1.0]))[0].dtype == np.int32


def test_quantize_input_rounds_half_to_even_and_clips():
    t = G.TensorInfo("input", (5,), "int8", 8, 0.5)
    x = np.array([[0.25, 0.75, -0.25, 100.0, -100.0]], dtype=np.float32)    # x/scale = .5, 1.5, -.5, 200, -200
    assert G.quantize_input(t, x).tolist() == [[0, 2, 0, 127, -127]]
    assert intsim.quantize_input(t, torch.from_numpy(x)).tolist() == [[0, 2, 0, 127, -127]]
    u = G.TensorInfo("input", (3,), "uint8", 4, 1.0)
    assert G.quantize_input(u, np.array([[-3.0, 7.4, 99.0]])).tolist() == [[0, 7, 15]]


# ----------------------------------------------------------------------------- ops
CONV_CASES = [  # (in dtype, C, O, k, stride, pad, groups, storage bits, requant)
    ("int8", 3, 4, 3, 1, 1, 1, 8, True),
    ("uint8", 4, 6, 3, 2, 1, 2, 5, True),
    ("uint8", 4, 4, 3, 1, 0, 4, 2, True),       # depthwise, 1 kept bit -> storage 2
    ("uint8", 3, 5, 1, 2, 0, 1, 9, False),      # 9-bit weights (int16), raw int32 output
    ("int8", 2, 3, 5, 3, 2, 1, 4, False),
]


@pytest.mark.parametrize("dtype,c,o,k,stride,pad,groups,sb,requant", CONV_CASES)
def test_conv2d_matches_loops(dtype, c, o, k, stride, pad, groups, sb, requant):
    rng = np.random.default_rng(c * 100 + o * 10 + k)
    x = (rng.integers(-127, 128, size=(2, c, 7, 6)) if dtype == "int8"
         else rng.integers(0, 256, size=(2, c, 7, 6))).astype(dtype)
    lim = (1 << (sb - 1)) - 1
    w = rng.integers(-lim, lim + 1, size=(o, c // groups, k, k)).astype(G.container_dtype(sb))
    acc = ref_conv_acc(x, w, stride, pad, groups)
    span = np.abs(acc.astype(np.float64)).max(axis=(0, 2, 3)) + 1
    bias = (rng.uniform(-0.5, 0.5, size=o) * span).astype(np.int32)
    arrays = {"weight": w, "bias": bias}
    attrs = {"stride": stride, "padding": pad, "groups": groups, "storage_bits": sb}
    if requant:   # map each channel's accumulators onto ~[-60, 120] steps; every third channel negated
        real = rng.uniform(60, 120, size=o) / span * np.where(np.arange(o) % 3 == 1, -1, 1)
        arrays["multiplier"], arrays["shift"] = G.quantize_multiplier(real)
        attrs["out_bits"] = 6
    op = G.Op("conv", "conv2d", ["x"], "y", attrs, arrays)
    got = golden_and_sim(op, x)
    want = ref_finish(acc, bias, arrays.get("multiplier"),
                      arrays.get("shift"), attrs.get("out_bits"))
    assert got.dtype == (np.uint8 if requant else np.int32)
    assert np.array_equal(got.astype(np.int64), want)
    if requant:   # the test data reaches both clip bounds and values in between
        assert got.min() == 0 and got.max() == 63 and len(np.unique(got)) > 3


@pytest.mark.parametrize("kind,groups", [("conv2d", 1), ("conv2d", 4), ("linear", 1)])
def test_a_signed_output_is_clipped_symmetrically_to_int8(kind, groups):
    """out_signed (a linear bottleneck's output): clip to +-(2^(bits-1) - 1), int8; -2^(bits-1)
    never occurs, as for the network input."""
    rng = np.random.default_rng(11 + groups)
    c, o = 4, 8
    x = rng.integers(-127, 128, size=(2, c, 5, 5) if kind == "conv2d" else (3, c)).astype(np.int8)
    w = rng.integers(-7, 8, size=(o, c // groups, 3, 3) if kind == "conv2d" else (o, c)).astype(np.int8)
    acc = ref_conv_acc(x, w, 1, 1, groups) if kind == "conv2d" else \
        np.array([[sum(int(a) * int(b) for a, b in zip(row, wr)) for wr in w] for row in x], dtype=object)
    span = np.abs(acc.astype(np.float64)).max(axis=tuple(i for i in range(acc.ndim) if i != 1)) + 1
    bias = (rng.uniform(-0.3, 0.3, size=o) * span).astype(np.int32)
    real = rng.uniform(20, 40, size=o) / span                      # past both clip bounds
    m, sh = G.quantize_multiplier(real)
    attrs = {"storage_bits": 4, "out_bits": 5, "out_signed": True}
    if kind == "conv2d":
        attrs.update(stride=1, padding=1, groups=groups)
    op = G.Op("q", kind, ["x"], "y", attrs, {"weight": w, "bias": bias, "multiplier": m, "shift": sh})
    got = golden_and_sim(op, x)
    want = ref_finish(acc, bias, m, sh, 5, signed=True)
    assert got.dtype == np.int8 and np.array_equal(got.astype(np.int64), want)
    assert got.min() == -15 and got.max() == 15 and len(np.unique(got)) > 5


def test_a_signed_add_sums_signed_branches_into_int8():
    rng = np.random.default_rng(5)
    a = rng.integers(-127, 128, size=(2, 3, 4, 4)).astype(np.int8)               # a signed activation
    b = rng.integers(-(2**16), 2**16, size=(2, 3, 4, 4)).astype(np.int32)        # a raw conv branch
    (ma, sa), (mb, sb) = G.quantize_multiplier(np.full(3, 0.6)), G.quantize_multiplier(np.full(3, 2.0**-10))
    op = G.Op("add", "add", ["a", "b"], "y", {"out_bits": 8, "out_signed": True},
              {"multiplier0": ma, "shift0": sa, "multiplier1": mb, "shift1": sb})
    got = golden_and_sim(op, a, b)
    want = np.empty(a.shape, dtype=np.int64)
    for idx in np.ndindex(a.shape):
        ch = idx[1]
        total = ref_rq(int(a[idx]), int(ma[ch]), int(sa[ch])) + ref_rq(int(b[idx]), int(mb[ch]), int(sb[ch]))
        want[idx] = min(max(total, -127), 127)
    assert got.dtype == np.int8 and np.array_equal(got.astype(np.int64), want)
    assert (got < 0).any() and (got > 0).any()


@pytest.mark.parametrize("signed", [False, True])
def test_concat_requantizes_each_part_then_joins_channels(signed):
    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, size=(2, 3, 4, 5)).astype(np.uint8)
    b = rng.integers(-127, 128, size=(2, 2, 4, 5)).astype(np.int8)
    (ma, sa), (mb, sb) = G.quantize_multiplier(np.array([0.7])), G.quantize_multiplier(np.array([1.3]))
    attrs = {"out_bits": 6, **({"out_signed": True} if signed else {})}
    op = G.Op("cat", "concat", ["a", "b"], "y", attrs, {"multiplier0": ma, "shift0": sa, "multiplier1": mb, "shift1": sb})
    got = golden_and_sim(op, a, b)
    lo, hi = (-31, 31) if signed else (0, 63)
    want = np.empty((2, 5, 4, 5), dtype=np.int64)
    for idx in np.ndindex(want.shape):
        n, c, i, j = idx
        v = ref_rq(int(a[n, c, i, j]), int(ma[0]), int(sa[0])) if c < 3 else ref_rq(int(b[n, c - 3, i, j]), int(mb[0]), int(sb[0]))
        want[idx] = min(max(v, lo), hi)
    assert got.dtype == (np.int8 if signed else np.uint8) and np.array_equal(got.astype(np.int64), want)
    assert (got == hi).any() and (got == lo).any()


@pytest.mark.parametrize("in_dtype,in_bits,signed,out_bits", [("int8", 8, True, 8), ("int8", 3, False, 4),
                                                               ("uint8", 8, False, 8), ("uint8", 2, True, 3)])
def test_lut_looks_up_every_input_value(in_dtype, in_bits, signed, out_bits):
    """y = table[x - lo]: an int8 input's 2^bits - 1 values start at -(2^(bits-1) - 1), a uint8
    input's 2^bits at 0; the table is hardswish of the input grid, rounded to the output's."""
    lo, hi = (-((1 << (in_bits - 1)) - 1), (1 << (in_bits - 1)) - 1) if in_dtype == "int8" else (0, (1 << in_bits) - 1)
    out_lo, out_hi = (-((1 << (out_bits - 1)) - 1), (1 << (out_bits - 1)) - 1) if signed else (0, (1 << out_bits) - 1)
    s_in, s_out = 4.0 / max(hi, 1), 3.0 / out_hi
    table = []
    for v in range(lo, hi + 1):                     # written from the contract: one entry per input value
        real = v * s_in
        hswish = real * min(max(real + 3, 0), 6) / 6
        table.append(min(max(round(hswish / s_out), out_lo), out_hi))
    table = np.array(table, dtype=np.int8 if signed else np.uint8)
    attrs = {"out_bits": out_bits, **({"out_signed": True} if signed else {}), "function": "Hardswish()"}
    op = G.Op("act", "lut", ["x"], "y", attrs, {"table": table})
    x = np.arange(lo, hi + 1).repeat(3).reshape(-1, 3)[RNG.permutation(hi - lo + 1)]     # every value, NC
    x = np.concatenate([x, RNG.integers(lo, hi + 1, size=(5, 3))]).astype(in_dtype).reshape(-1, 3, 1, 1)
    got = golden_and_sim(op, x)
    want = np.array([table[int(v) - lo] for v in x.ravel()]).reshape(x.shape)
    assert got.dtype == table.dtype and np.array_equal(got, want)
    assert len(np.unique(got)) > 1


def lut_graph(in_dtype="int8", in_bits=8, signed=True, out_bits=8) -> G.IntGraph:
    lo, hi = (-((1 << (in_bits - 1)) - 1), (1 << (in_bits - 1)) - 1) if in_dtype == "int8" else (0, (1 << in_bits) - 1)
    out_dtype = "int8" if signed else "uint8"
    out_hi = (1 << (out_bits - 1)) - 1 if signed else (1 << out_bits) - 1
    t = {"input": G.TensorInfo("input", (2, 3, 3), in_dtype, in_bits, 0.05),
         "act": G.TensorInfo("act", (2, 3, 3), out_dtype, out_bits, 0.05)}
    table = np.clip(np.arange(lo, hi + 1) // 2, -out_hi if signed else 0, out_hi).astype(out_dtype)
    attrs = {"out_bits": out_bits, **({"out_signed": True} if signed else {})}
    return G.IntGraph("lut", t["input"], "act", [G.Op("act", "lut", ["input"], "act", attrs, {"table": table})], t, {})


def test_lut_validation_names_the_table_and_the_ranges(tmp_path):
    G.validate(lut_graph())
    G.save(lut_graph("uint8", 4, False, 3), tmp_path / "f")
    g = G.load(tmp_path / "f")
    assert g.ops[0].arrays["table"].dtype == np.uint8 and g.ops[0].arrays["table"].shape == (16,)
    x = np.arange(16, dtype=np.uint8).repeat(18)[:2 * 18].reshape(2, 2, 3, 3)
    assert np.array_equal(G.run(g, x), np.minimum(x // 2, 7))
    cases = {
        r"array 'table' must be int8 of shape \(255,\).*int8 input of 8 bits, -127\.\.127":
            lambda g: g.ops[0].arrays.__setitem__("table", g.ops[0].arrays["table"][:-1]),
        r"array 'table' must be int8": lambda g: g.ops[0].arrays.__setitem__("table", g.ops[0].arrays["table"].astype(np.int32)),
        r"table entries must be in the output range -3\.\.3": lambda g: g.ops[0].attrs.__setitem__("out_bits", 3)
                                                               or setattr(g.tensors["act"], "bits", 3),
        r"output tensor must be int8": lambda g: setattr(g.tensors["act"], "dtype", "uint8"),
        r"array 'table' must be": lambda g: g.ops[0].arrays.pop("table"),
    }
    for message, breaks in cases.items():
        g = lut_graph()
        breaks(g)
        with pytest.raises(G.GraphError, match=message):
            G.validate(g)


@pytest.mark.parametrize("dtype,requant", [("int8", True), ("uint8", False)])
def test_linear_matches_loops(dtype, requant):
    rng = np.random.default_rng(7)
    x = rng.integers(-127 if dtype == "int8" else 0, 128, size=(3, 20)).astype(dtype)
    w = rng.integers(-7, 8, size=(5, 20)).astype(np.int8)
    bias = rng.integers(-300, 300, size=5).astype(np.int32)
    arrays = {"weight": w, "bias": bias}
    attrs = {"storage_bits": 4}
    if requant:
        arrays["multiplier"], arrays["shift"] = requant_arrays(5, rng)
        attrs["out_bits"] = 8
    op = G.Op("fc", "linear", ["x"], "y", attrs, arrays)
    got = golden_and_sim(op, x)
    acc = np.array([[sum(int(a) * int(b) for a, b in zip(row, wr)) for wr in w] for row in x], dtype=object)
    want = ref_finish(acc, bias, arrays.get("multiplier"), arrays.get("shift"), attrs.get("out_bits"))
    assert np.array_equal(got.astype(np.int64), want)


def test_add_requantizes_each_branch_then_sums_and_clips():
    rng = np.random.default_rng(3)
    c = 6
    a = rng.integers(0, 256, size=(2, c, 3, 3)).astype(np.uint8)                 # activation branch
    b = rng.integers(-(2**20), 2**20, size=(2, c, 3, 3)).astype(np.int32)        # raw int32 branch
    d = rng.integers(0, 16, size=(2, c, 3, 3)).astype(np.uint8)                  # third, 4-bit branch
    arrays = {}
    for i in range(3):
        m, s = requant_arrays(c, rng)
        if i == 0:
            m, s = m[:1], s[:1]                                                   # one value for all channels
        arrays[f"multiplier{i}"], arrays[f"shift{i}"] = m, s
    op = G.Op("add", "add", ["a", "b", "d"], "y", {"out_bits": 5}, arrays)
    got = golden_and_sim(op, a, b, d)
    want = np.empty(a.shape, dtype=np.int64)
    for idx in np.ndindex(a.shape):
        ch = idx[1]
        total = sum(ref_rq(int(t[idx]), int(arrays[f"multiplier{i}"][ch if arrays[f"multiplier{i}"].size > 1 else 0]),
                           int(arrays[f"shift{i}"][ch if arrays[f"shift{i}"].size > 1 else 0]))
                    for i, t in enumerate((a, b, d)))
        want[idx] = min(max(total, 0), 31)
    assert got.dtype == np.uint8 and np.array_equal(got.astype(np.int64), want)
    assert 0 < (got == 31).mean() < 1 and (got == 0).any()


@pytest.mark.parametrize("k,stride,pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (5, 5, 0)])
def test_avgpool_sums_windows_with_zero_padding(k, stride, pad):
    rng = np.random.default_rng(k * 10 + pad)
    x = rng.integers(0, 256, size=(2, 3, 5, 5)).astype(np.uint8)
    m, s = G.quantize_multiplier(np.array([1.0 / (k * k)]))
    op = G.Op("pool", "avgpool", ["x"], "y", {"kernel": k, "stride": stride, "padding": pad, "out_bits": 8},
              {"multiplier": m, "shift": s})
    got = golden_and_sim(op, x)
    sums = ref_pool(x, k, stride, pad, sum)
    want = np.vectorize(lambda v: min(max(ref_rq(int(v), int(m[0]), int(s[0])), 0), 255))(sums)
    assert np.array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("bits", [8, 5])
def test_a_signed_avgpool_keeps_negative_averages_and_clips_symmetrically(bits):
    """out_signed: the average of an int8 map (a Hardswish's) clipped to +-(2^(bits-1) - 1), int8."""
    rng = np.random.default_rng(bits)
    x = rng.integers(-127, 128, size=(2, 3, 6, 6)).astype(np.int8)
    m, s = G.quantize_multiplier(np.array([3.0 / 4]))          # 3 x the mean of a 2x2 window: some clip
    op = G.Op("pool", "avgpool", ["x"], "y", {"kernel": 2, "stride": 2, "padding": 0, "out_bits": bits,
                                              "out_signed": True}, {"multiplier": m, "shift": s})
    got = golden_and_sim(op, x)
    hi = (1 << (bits - 1)) - 1
    want = np.vectorize(lambda v: min(max(ref_rq(int(v), int(m[0]), int(s[0])), -hi), hi))(ref_pool(x, 2, 2, 0, sum))
    assert got.dtype == np.int8 and np.array_equal(got.astype(np.int64), want)
    assert (got < 0).any() and (got == -hi).any() and (got == hi).any()


@pytest.mark.parametrize("dtype,k,stride,pad", [("uint8", 2, 2, 0), ("uint8", 3, 2, 1), ("int8", 3, 2, 1), ("int8", 2, 1, 1)])
def test_maxpool_pads_with_zero(dtype, k, stride, pad):
    rng = np.random.default_rng(k + pad)
    lo = -127 if dtype == "int8" else 0
    x = rng.integers(lo, 128, size=(2, 3, 6, 5)).astype(dtype)
    if dtype == "int8":
        x[0, 0] = -5                      # all negative: the zero padding shows at the border
    op = G.Op("mp", "maxpool", ["x"], "y", {"kernel": k, "stride": stride, "padding": pad})
    got = golden_and_sim(op, x)
    assert got.dtype == x.dtype and np.array_equal(got.astype(np.int64), ref_pool(x, k, stride, pad, max))


def test_flatten_is_row_major():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    got = golden_and_sim(G.Op("f", "flatten", ["x"], "y"), x)
    assert got.shape == (2, 12) and got[1].tolist() == list(range(12, 24))


def test_float64_gemm_is_exact_at_the_proven_bound():
    """The golden conv/linear accumulate in float64: exact because freeze proves |acc| < 2^31.
    A worst case at that bound (255 * 255 * 33000 ~ 2^31) still matches integer arithmetic."""
    x = np.full((1, 33000), 255, dtype=np.uint8)
    w = np.full((2, 33000), 255, dtype=np.int16)
    w[1, ::2] = -255
    op = G.Op("fc", "linear", ["x"], "y", {"storage_bits": 9}, {"weight": w, "bias": np.array([7, -7], dtype=np.int32)})
    got = golden_and_sim(op, x)
    assert 255 * 255 * 33000 + 7 < 2**31 and got.tolist() == [[255 * 255 * 33000 + 7, -7]]


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 10))
def test_pack_round_trips_every_storage_width(bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = np.concatenate([np.arange(lo, hi + 1), RNG.integers(lo, hi + 1, size=1001)])
    buf = G.pack_bits(q, bits)
    assert len(buf) == -(-len(q) * bits // 8)               # ceil(n * bits / 8): no padding beyond a byte
    assert np.array_equal(G.unpack_bits(buf, bits, len(q)), q)


def test_pack_layout_is_little_endian_twos_complement():
    assert G.pack_bits(np.array([1, -1, 0, -2]), 2) == bytes([0b10_00_11_01])
    assert G.pack_bits(np.array([-8, 7]), 4) == bytes([0x78])
    with pytest.raises(G.GraphError, match="truncated"):
        G.unpack_bits(b"\x00", 4, 3)


# ----------------------------------------------------------------------------- graphs on disk
def tiny_graph(weight_bits=3, fan_in=4, wvalue=None, act_bits=8) -> G.IntGraph:
    """input int8[1,fan_in,1,1] -> conv 1x1 (requant) -> flatten -> linear (raw int32)."""
    rng = np.random.default_rng(0)
    lim = (1 << (weight_bits - 1)) - 1
    w1 = rng.integers(-lim, lim + 1, size=(4, fan_in, 1, 1)) if wvalue is None else np.full((4, fan_in, 1, 1), wvalue)
    m, s = G.quantize_multiplier(np.full(4, 0.01))
    t = {
        "input": G.TensorInfo("input", (fan_in, 1, 1), "int8", 8, 0.1),
        "c1": G.TensorInfo("c1", (4, 1, 1), "uint8", act_bits, 0.05),
        "flat": G.TensorInfo("flat", (4,), "uint8", act_bits, 0.05),
        "fc": G.TensorInfo("fc", (3,), "int32", 32, [0.01] * 3),
    }
    ops = [
        G.Op("c1", "conv2d", ["input"], "c1",
             {"stride": 1, "padding": 0, "groups": 1, "storage_bits": weight_bits, "precision": weight_bits - 1,
              "kept_bits": list(range(weight_bits - 1)), "out_bits": act_bits},
             {"weight": w1.astype(G.container_dtype(weight_bits)), "bias": np.arange(4, dtype=np.int32),
              "multiplier": m, "shift": s}),
        G.Op("flat", "flatten", ["c1"], "flat"),
        G.Op("fc", "linear", ["flat"], "fc", {"storage_bits": 2, "precision": 1, "kept_bits": [0]},
             {"weight": rng.integers(-1, 2, size=(3, 4)).astype(np.int8), "bias": np.zeros(3, dtype=np.int32)}),
    ]
    return G.IntGraph("tiny", t["input"], "fc", ops, t, {})


def test_save_load_round_trip_and_bytes(tmp_path):
    g = tiny_graph(weight_bits=3, fan_in=8)
    G.save(g, tmp_path / "f")
    h = G.load(tmp_path / "f")
    x = RNG.integers(-127, 128, size=(5, 8, 1, 1)).astype(np.int8)
    assert np.array_equal(G.run(g, x), G.run(h, x))
    for a, b in zip(g.ops, h.ops):
        assert a.arrays.keys() == b.arrays.keys()
        for k in a.arrays:
            assert a.arrays[k].dtype == b.arrays[k].dtype and np.array_equal(a.arrays[k], b.arrays[k])
    assert (tmp_path / "f/arrays/c1.weight.bin").stat().st_size == 4 * 8 * 3 // 8     # 3 bits each
    manifest = json.loads((tmp_path / "f/manifest.json").read_text())
    assert manifest["format_version"] == G.FORMAT_VERSION and manifest["ops"][0]["arrays"]["weight"]["packed_bits"] == 3
    assert not list(tmp_path.glob(".f.*"))                                               # no temp dirs left


def test_save_replaces_only_frozen_dirs(tmp_path):
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(G.GraphError, match="not a frozen model directory"):
        G.save(tiny_graph(), precious)
    assert (precious / "checkpoint.pt").read_bytes() == b"x"
    G.save(tiny_graph(weight_bits=3), tmp_path / "f")
    G.save(tiny_graph(weight_bits=5), tmp_path / "f")                                  # replaces a frozen model
    assert G.load(tmp_path / "f").ops[0].attrs["storage_bits"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "run"]


def _manifest_edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_load_rejects_damaged_models(tmp_path):
    G.save(tiny_graph(), tmp_path / "good")

    def damaged(name):
        d = tmp_path / name
        shutil.copytree(tmp_path / "good", d)
        return d

    d = damaged("truncated")
    f = d / "arrays/c1.bias.bin"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(G.GraphError, match=r"c1\.bias\.bin.*truncated"):
        G.load(d)
    d = damaged("flipped")
    f = d / "arrays/fc.weight.bin"
    f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:])
    with pytest.raises(G.GraphError, match=r"fc\.weight\.bin.*sha256"):
        G.load(d)
    d = damaged("escape")
    _manifest_edit(d, lambda m: m["ops"][0]["arrays"]["bias"].update(file="../good/arrays/c1.bias.bin"))
    with pytest.raises(G.GraphError, match="outside arrays"):
        G.load(d)
    d = damaged("shift")   # a manifest edit that breaks the contract is caught by validate
    _manifest_edit(d, lambda m: m["ops"][2]["inputs"].__setitem__(0, "c1"))
    with pytest.raises(G.GraphError, match="op 'fc'"):
        G.load(d)
    d = damaged("keys")
    _manifest_edit(d, lambda m: m["ops"][0].pop("attrs"))
    with pytest.raises(G.GraphError, match="malformed manifest"):
        G.load(d)
    with pytest.raises(G.GraphError, match="no such file"):
        G.load(tmp_path / "nothing")


def test_validate_names_the_broken_op():
    cases = {
        "shifts must be in": lambda g: g.ops[0].arrays.__setitem__("shift", np.zeros(4, dtype=np.int32)),
        "exceed 3 storage bits": lambda g: g.ops[0].arrays["weight"].__setitem__((0, 0, 0, 0), 4),
        "not defined by an earlier op": lambda g: g.ops.reverse(),
        "output shape": lambda g: setattr(g.tensors["fc"], "shape", (4,)),
        "bias must be int32": lambda g: g.ops[2].arrays.__setitem__("bias", np.zeros(3, dtype=np.int64)),
        "out_bits": lambda g: g.ops[0].attrs.__setitem__("out_bits", 9),
    }
    for message, breaks in cases.items():
        g = tiny_graph()
        G.validate(g)
        breaks(g)
        with pytest.raises(G.GraphError, match=message):
            G.validate(g)


def test_overflow_proof_refuses_and_names_the_layer():
    # 9-bit weights of magnitude 255 and int8 inputs up to 127: fan-in 70000 -> |acc| <= 2.27e9 > 2^31.
    g = tiny_graph(weight_bits=9, fan_in=70000, wvalue=255)
    with pytest.raises(G.GraphError, match=r"layer 'c1': int32 accumulator can overflow.*9-bit weights, fan-in 70000"):
        G.value_bounds(g)
    # Same fan-in, small actual weights: the bit-width bound is too loose, the exact L1 bound proves it safe.
    g = tiny_graph(weight_bits=9, fan_in=70000, wvalue=1)
    assert G.value_bounds(g)["accumulators"]["c1"] == 70000 * 127 + 3
    # A small layer is proved from bit-widths and fan-in alone.
    assert G.value_bounds(tiny_graph(weight_bits=3, fan_in=4))["accumulators"]["c1"] == 4 * 127 * 3 + 3


def test_residual_bound_is_per_channel():
    # Channel 0 of the int32 branch is dead (M = 0, shift 1); channel 1 scales 2^31-1 by ~2^-20.
    # A bound mixing channel 1's multiplier with channel 0's shift would claim overflow.
    t = {
        "input": G.TensorInfo("input", (2, 1, 1), "int8", 8, 0.1),
        "c": G.TensorInfo("c", (2, 1, 1), "int32", 32, [0.1, 0.1]),
        "y": G.TensorInfo("y", (2, 1, 1), "uint8", 8, 0.1),
    }
    big = np.full((2, 2, 1, 1), 0, dtype=np.int8)
    ops = [
        G.Op("c", "conv2d", ["input"], "c",
             {"stride": 1, "padding": 0, "groups": 1, "storage_bits": 8, "precision": 7,
              "kept_bits": list(range(7))},
             {"weight": big, "bias": np.array([0, 2**31 - 1], dtype=np.int32)}),
        G.Op("y", "add", ["c", "input"], "y", {"out_bits": 8},
             {"multiplier0": np.array([0, 2**30], dtype=np.int32), "shift0": np.array([1, 31], dtype=np.int32),
              "multiplier1": np.array([2**30], dtype=np.int32), "shift1": np.array([30], dtype=np.int32)}),
    ]
    g = G.IntGraph("res", t["input"], "y", ops, t, {})
    # per channel: ch0 0 + 127 = 127, ch1 round((2^31-1) / 2) + 127
    assert G.value_bounds(g)["accumulators"]["y"] == ((2**31 - 1) * 2**30 + 2**30) // 2**31 + 127


def test_run_checks_its_input():
    g = tiny_graph()
    with pytest.raises(G.GraphError, match="input must be int8"):
        G.run(g, np.zeros((1, 4, 1, 1), dtype=np.uint8))
    with pytest.raises(G.GraphError, match="input shape"):
        G.run(g, np.zeros((1, 5, 1, 1), dtype=np.int8))
