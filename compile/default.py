"""The default lowering: every op kind in the graph's NCHW layout, one TIR kernel per op.

Each op becomes one kernel built with TE/topi through `ctx.emit_kernel` (BlockBuilder.emit_te);
compile/schedule.py gives it a generic CPU schedule later. Its integer semantics are exactly
those of the golden interpreter (`mixq.graph`, docs/integer-contract.md):

    conv2d / linear   int32 accumulation of the (int8|uint8) input times the (int8|int16)
                      weight, + int32 bias; then either raw int32 or requantized:
    requantization    y = clip((acc * M + 2^(s-1)) >> s, 0, 2^bits - 1) in int64, -> uint8
                      (out_signed: clip to +-(2^(bits-1) - 1), -> int8; graph.out_range)
    add               sum_i rq(x_i, M_i, s_i) in int64, clip, -> uint8 (or int8)
    avgpool           zero-padded int32 window sum, rq, clip
    maxpool           max over zero-padded windows (zero, not -inf: the contract's padding)
    flatten           reshape NCHW -> N(CHW)
    concat            each input requantized and clipped, joined along the channels
    lut               y = table[x + offset], the table a constant (graph.np_lut)

Weights, biases and multipliers are NumPy arrays baked into the library as constants (sub-byte
weights arrive unpacked from `graph.load`, so the wrong-results `int4` dtype never appears).
Every op kind has a lowering here, so any op another strategy declines ends here.
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx, topi

from mixq import graph as G
from mixq.compile.registry import register


# ----------------------------------------------------------------------------- arithmetic
def per_channel(values, channels: int, dtype) -> np.ndarray:
    """A multiplier/shift array with 1 or `channels` values -> exactly `channels` values."""
    v = np.asarray(values).astype(np.int64).reshape(-1)
    return np.broadcast_to(v, (channels,)).astype(dtype)


def requant_constants(multiplier, shift, channels: int) -> tuple[relax.Constant, relax.Constant, relax.Constant]:
    """(M, 2^(s-1), s) as int64 constants, one per channel: rq's rounding term is computed
    here once instead of per element."""
    m = per_channel(multiplier, channels, np.int64)
    s = per_channel(shift, channels, np.int64)
    return (relax.const(m, "int64"), relax.const(np.left_shift(np.int64(1), s - 1), "int64"),
            relax.const(s, "int64"))


def _rq(acc64, m, r, s, c):
    """graph.rq for one element: (x * M + 2^(s-1)) >> s, x int64, channel index c."""
    return (acc64 * m[c] + r[c]) >> s[c]


def _clip_out(y64, attrs: dict):
    """graph.clip_out: the output's clip and dtype (uint8, or int8 with out_signed)."""
    lo, hi, dtype = G.out_range(attrs)
    return te.max(te.min(y64, tirx.const(hi, "int64")), tirx.const(lo, "int64")).astype(dtype)


# ----------------------------------------------------------------------------- conv / linear
def _finish_te(acc, bias, req, attrs: dict):
    """acc (int32) + bias -> raw int32, or requantized uint8 (int8) when `req` holds (M, R, S)."""
    def raw(*i):
        return acc(*i) + bias[i[1]]

    if req is None:
        return te.compute(acc.shape, raw, name="raw")
    m, r, s = req

    def requant(*i):
        x = acc(*i).astype("int64") + bias[i[1]].astype("int64")
        return _clip_out(_rq(x, m, r, s, i[1]), attrs)
    return te.compute(acc.shape, requant, name="requant")


def _weight_layer_args(op: G.Op):
    channels = op.arrays["weight"].shape[0]
    args = [relax.const(op.arrays["weight"]), relax.const(op.arrays["bias"].astype(np.int32), "int32")]
    if "multiplier" in op.arrays:
        args += requant_constants(op.arrays["multiplier"], op.arrays["shift"], channels)
    return args


@register("conv2d", "default")
def lower_conv2d(ctx, op: G.Op, inputs):
    a = op.attrs
    stride, padding, groups = a["stride"], a["padding"], a.get("groups", 1)

    def conv(x, w, b, *req):
        acc = topi.nn.conv(x, w, stride, padding, 1, groups, "NCHW", "OIHW", out_dtype="int32")
        return _finish_te(acc, b, req or None, a)
    return ctx.emit_kernel(conv, inputs[0], *_weight_layer_args(op), name=op.name)


@register("linear", "default")
def lower_linear(ctx, op: G.Op, inputs):
    def linear(x, w, b, *req):
        acc = topi.nn.dense(x, w, out_dtype="int32")
        return _finish_te(acc, b, req or None, op.attrs)
    return ctx.emit_kernel(linear, inputs[0], *_weight_layer_args(op), name=op.name)


# ----------------------------------------------------------------------------- add / pools
@register("add", "default")
def lower_add(ctx, op: G.Op, inputs):
    channels = ctx.tensor(op.inputs[0]).shape[0]
    consts = []
    for i in range(len(inputs)):
        consts += requant_constants(op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"], channels)
    k = len(inputs)

    def add(*args):
        xs, req = args[:k], args[k:]

        def body(*i):
            total = None
            for j, x in enumerate(xs):
                m, r, s = req[3 * j:3 * j + 3]
                term = _rq(x(*i).astype("int64"), m, r, s, i[1])
                total = term if total is None else total + term
            return _clip_out(total, op.attrs)
        return te.compute(xs[0].shape, body, name="add")
    return ctx.emit_kernel(add, *inputs, *consts, name=op.name)


def _zero_padded_windows(x, kernel: int, stride: int, padding: int, name: str):
    """(padded x, output shape, reduce axes ry, rx): windows padded with zeros (the contract)."""
    xp = topi.nn.pad(x, [0, 0, padding, padding], [0, 0, padding, padding], pad_value=0) if padding else x
    n, c, h, w = x.shape
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    ry = te.reduce_axis((0, kernel), name=f"{name}_ry")
    rx = te.reduce_axis((0, kernel), name=f"{name}_rx")
    return xp, (n, c, ho, wo), ry, rx


@register("avgpool", "default")
def lower_avgpool(ctx, op: G.Op, inputs):
    a = op.attrs
    channels = ctx.tensor(op.inputs[0]).shape[0]
    m, r, s = requant_constants(op.arrays["multiplier"], op.arrays["shift"], channels)
    # window sums fit int32 easily (8-bit values, small windows); graph.value_bounds bounds them
    k, stride, padding = a["kernel"], a["stride"], a.get("padding", 0)

    def avgpool(x, m, r, s):
        xp, shape, ry, rx = _zero_padded_windows(x, k, stride, padding, "pool")
        total = te.compute(shape, lambda b, c, i, j: te.sum(
            xp[b, c, i * stride + ry, j * stride + rx].astype("int32"), axis=[ry, rx]), name="window_sum")
        return te.compute(shape, lambda b, c, i, j: _clip_out(
            _rq(total[b, c, i, j].astype("int64"), m, r, s, c), a), name="avgpool")
    return ctx.emit_kernel(avgpool, inputs[0], m, r, s, name=op.name)


@register("maxpool", "default")
def lower_maxpool(ctx, op: G.Op, inputs):
    a = op.attrs
    k, stride, padding = a["kernel"], a["stride"], a.get("padding", 0)

    def maxpool(x):
        xp, shape, ry, rx = _zero_padded_windows(x, k, stride, padding, "pool")
        return te.compute(shape, lambda b, c, i, j: te.max(
            xp[b, c, i * stride + ry, j * stride + rx], axis=[ry, rx]), name="maxpool")
    return ctx.emit_kernel(maxpool, inputs[0], name=op.name)


@register("flatten", "default")
def lower_flatten(ctx, op: G.Op, inputs):
    features = int(np.prod(ctx.tensor(op.inputs[0]).shape))
    return ctx.bb.emit(relax.op.reshape(inputs[0], (ctx.batch, features)))


@register("concat", "default")
def lower_concat(ctx, op: G.Op, inputs):
    """Each input requantized and clipped (graph.np_concat), then joined along the channels."""
    consts, k = [], len(inputs)
    for i in range(k):
        consts += requant_constants(op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"],
                                    ctx.tensor(op.inputs[i]).shape[0])

    def concat(*args):
        xs, req = args[:k], args[k:]

        def part(j):
            x, (m, r, s) = xs[j], req[3 * j:3 * j + 3]
            return te.compute(x.shape, lambda *i: _clip_out(_rq(x(*i).astype("int64"), m, r, s, i[1]), op.attrs),
                              name=f"requant{j}")
        return topi.concatenate([part(j) for j in range(k)], axis=1)
    return ctx.emit_kernel(concat, *inputs, *consts, name=op.name)


@register("lut", "default")
def lower_lut(ctx, op: G.Op, inputs):
    """graph.np_lut: one gather from the constant table, indexed by the input plus -lo."""
    table = op.arrays["table"]
    offset = G.lut_offset(ctx.tensor(op.inputs[0]).dtype, len(table))

    def lut(x, t):
        return te.compute(x.shape, lambda *i: t[x(*i).astype("int32") + offset], name="lut")
    return ctx.emit_kernel(lut, inputs[0], relax.const(table, str(table.dtype)), name=op.name)
