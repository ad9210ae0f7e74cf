"""Frozen integer graph -> Relax IRModule: one lowering function per op kind, in one table.

The IRModule has one function, `main(x: [n, C, H, W] int8|uint8) -> logits`, with a symbolic
batch `n` (one library serves batch 1 for latency and large batches for throughput). Every op
becomes one TIR kernel built with TE/topi through `BlockBuilder.emit_te`; its integer
semantics are exactly those of the golden interpreter (`mixq.graph`, docs/integer-contract.md):

    conv2d / linear   int32 accumulation of the (int8|uint8) input times the (int8|int16)
                      weight, + int32 bias; then either raw int32 or requantized:
    requantization    y = clip((acc * M + 2^(s-1)) >> s, 0, 2^bits - 1) in int64, -> uint8
    add               sum_i rq(x_i, M_i, s_i) in int64, clip, -> uint8
    avgpool           zero-padded int32 window sum, rq, clip
    maxpool           max over zero-padded windows (zero, not -inf: the contract's padding)
    flatten           reshape NCHW -> N(CHW)

Weights, biases and multipliers are NumPy arrays baked into the library as constants (sub-byte
weights arrive unpacked from `graph.load`, so the wrong-results `int4` dtype never appears).

Extending: a lowering is `fn(ctx, op, inputs) -> relax.Expr`, registered with `@register(kind,
name, applies=...)`; for each op the first registered lowering whose `applies(ctx, op)` is true
and that does not raise `Unsupported` is used (`register(..., first=True)` puts a faster one
ahead of the defaults here, e.g. a target-specific kernel in compile/x86.py or compile/arm.py).
`ctx` carries the BlockBuilder, the target and its CPU features, the batch and the value bounds
of every tensor (`graph.value_bounds`), so a lowering can choose a strategy per op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from mixq import graph as G


class Unsupported(Exception):
    """A lowering cannot handle this op (on this target); the next registered one is tried."""


class LoweringError(ValueError):
    """No registered lowering handles an op of the graph."""


# ----------------------------------------------------------------------------- context
@dataclass
class LoweringContext:
    bb: relax.BlockBuilder
    graph: G.IntGraph
    target: tvm.target.Target
    batch: object                      # tirx.Var (symbolic) or int
    bounds: dict                       # tensor name -> max |value| (static proof)
    values: dict = field(default_factory=dict)   # tensor name -> relax.Expr
    chosen: dict = field(default_factory=dict)   # op name -> name of the lowering used

    def tensor(self, name: str) -> G.TensorInfo:
        return self.graph.tensors[name]

    def emit_kernel(self, te_fn: Callable, *args, name: str):
        """One TIR kernel from a TE function, named after the op (readable in profiles)."""
        return self.bb.emit_te(te_fn, *args, primfunc_name_hint=_kernel_name(name))


def _kernel_name(op_name: str) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in op_name)


# ----------------------------------------------------------------------------- registry
@dataclass
class Lowering:
    kind: str
    name: str
    fn: Callable
    applies: Callable


LOWERINGS: dict[str, list[Lowering]] = {kind: [] for kind in G.OP_KINDS}


def register(kind: str, name: str, applies: Callable | None = None, first: bool = False):
    """Decorator: register `fn(ctx, op, inputs) -> relax.Expr` for ops of `kind`."""
    if kind not in LOWERINGS:
        raise KeyError(f"unknown op kind '{kind}' (known: {', '.join(LOWERINGS)})")

    def deco(fn):
        entry = Lowering(kind, name, fn, applies or (lambda ctx, op: True))
        LOWERINGS[kind] = [lw for lw in LOWERINGS[kind] if lw.name != name]
        if first:
            LOWERINGS[kind].insert(0, entry)
        else:
            LOWERINGS[kind].append(entry)
        return fn
    return deco


def lower_op(ctx: LoweringContext, op: G.Op) -> relax.Expr:
    reasons = []
    for lw in LOWERINGS.get(op.kind, []):
        if not lw.applies(ctx, op):
            continue
        try:
            out = lw.fn(ctx, op, [ctx.values[name] for name in op.inputs])
        except Unsupported as e:
            reasons.append(f"{lw.name}: {e}")
            continue
        ctx.chosen[op.name] = lw.name
        return out
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise LoweringError(f"op '{op.name}' ({op.kind}): no lowering for target "
                        f"{ctx.target.kind.name}{why}")


def lower_graph(graph: G.IntGraph, target: tvm.target.Target, batch=None) -> tuple[tvm.IRModule, dict]:
    """Relax module with `main(x) -> output` for `graph`; `batch=None` means symbolic.

    Returns (module, {op name: lowering used})."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64") if batch is None else batch
    t_in = graph.input
    x = relax.Var("x", relax.TensorType((n, *t_in.shape), t_in.dtype))
    ctx = LoweringContext(bb, graph, target, n, G.value_bounds(graph)["tensors"])
    with bb.function("main", [x]):
        with bb.dataflow():
            ctx.values[t_in.name] = x
            for op in graph.ops:
                ctx.values[op.output] = lower_op(ctx, op)
            out = bb.emit_output(ctx.values[graph.output])
        bb.emit_func_output(out)
    return bb.get(), ctx.chosen


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


def _clip_u8(y64, bits: int):
    hi = tirx.const((1 << bits) - 1, "int64")
    return te.max(te.min(y64, hi), tirx.const(0, "int64")).astype("uint8")


# ----------------------------------------------------------------------------- conv / linear
def _finish_te(acc, bias, req, out_bits: int | None):
    """acc (int32) + bias -> raw int32, or requantized uint8 when `req` holds (M, R, S)."""
    def raw(*i):
        return acc(*i) + bias[i[1]]

    if req is None:
        return te.compute(acc.shape, raw, name="raw")
    m, r, s = req

    def requant(*i):
        x = acc(*i).astype("int64") + bias[i[1]].astype("int64")
        return _clip_u8(_rq(x, m, r, s, i[1]), out_bits)
    return te.compute(acc.shape, requant, name="requant")


def _weight_layer_args(op: G.Op):
    channels = op.arrays["weight"].shape[0]
    args = [relax.const(op.arrays["weight"]), relax.const(op.arrays["bias"].astype(np.int32), "int32")]
    if "multiplier" in op.arrays:
        args += requant_constants(op.arrays["multiplier"], op.arrays["shift"], channels)
    return args


@register("conv2d", "default")
def lower_conv2d(ctx: LoweringContext, op: G.Op, inputs):
    a = op.attrs
    stride, padding, groups = a["stride"], a["padding"], a.get("groups", 1)
    out_bits = a.get("out_bits")

    def conv(x, w, b, *req):
        acc = topi.nn.conv(x, w, stride, padding, 1, groups, "NCHW", "OIHW", out_dtype="int32")
        return _finish_te(acc, b, req or None, out_bits)
    return ctx.emit_kernel(conv, inputs[0], *_weight_layer_args(op), name=op.name)


@register("linear", "default")
def lower_linear(ctx: LoweringContext, op: G.Op, inputs):
    out_bits = op.attrs.get("out_bits")

    def linear(x, w, b, *req):
        acc = topi.nn.dense(x, w, out_dtype="int32")
        return _finish_te(acc, b, req or None, out_bits)
    return ctx.emit_kernel(linear, inputs[0], *_weight_layer_args(op), name=op.name)


# ----------------------------------------------------------------------------- add / pools
@register("add", "default")
def lower_add(ctx: LoweringContext, op: G.Op, inputs):
    channels = ctx.tensor(op.inputs[0]).shape[0]
    consts = []
    for i in range(len(inputs)):
        consts += requant_constants(op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"], channels)
    out_bits, k = op.attrs["out_bits"], len(inputs)

    def add(*args):
        xs, req = args[:k], args[k:]

        def body(*i):
            total = None
            for j, x in enumerate(xs):
                m, r, s = req[3 * j:3 * j + 3]
                term = _rq(x(*i).astype("int64"), m, r, s, i[1])
                total = term if total is None else total + term
            return _clip_u8(total, out_bits)
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
def lower_avgpool(ctx: LoweringContext, op: G.Op, inputs):
    a = op.attrs
    channels = ctx.tensor(op.inputs[0]).shape[0]
    m, r, s = requant_constants(op.arrays["multiplier"], op.arrays["shift"], channels)
    # window sums fit int32 easily (8-bit values, small windows); graph.value_bounds bounds them
    k, stride, padding, out_bits = a["kernel"], a["stride"], a.get("padding", 0), a["out_bits"]

    def avgpool(x, m, r, s):
        xp, shape, ry, rx = _zero_padded_windows(x, k, stride, padding, "pool")
        total = te.compute(shape, lambda b, c, i, j: te.sum(
            xp[b, c, i * stride + ry, j * stride + rx].astype("int32"), axis=[ry, rx]), name="window_sum")
        return te.compute(shape, lambda b, c, i, j: _clip_u8(
            _rq(total[b, c, i, j].astype("int64"), m, r, s, c), out_bits), name="avgpool")
    return ctx.emit_kernel(avgpool, inputs[0], m, r, s, name=op.name)


@register("maxpool", "default")
def lower_maxpool(ctx: LoweringContext, op: G.Op, inputs):
    a = op.attrs
    k, stride, padding = a["kernel"], a["stride"], a.get("padding", 0)

    def maxpool(x):
        xp, shape, ry, rx = _zero_padded_windows(x, k, stride, padding, "pool")
        return te.compute(shape, lambda b, c, i, j: te.max(
            xp[b, c, i * stride + ry, j * stride + rx], axis=[ry, rx]), name="maxpool")
    return ctx.emit_kernel(maxpool, inputs[0], name=op.name)


@register("flatten", "default")
def lower_flatten(ctx: LoweringContext, op: G.Op, inputs):
    features = int(np.prod(ctx.tensor(op.inputs[0]).shape))
    return ctx.bb.emit(relax.op.reshape(inputs[0], (ctx.batch, features)))
