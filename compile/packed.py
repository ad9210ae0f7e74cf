"""The fast path's lowerings: ops on packed NCHW16c tensors and int8 dot-product instructions.

Registered under the strategy "packed" for every op kind; compile/lower.py tries them first when
the target has a `PackedISA` (compile/x86.py: AVX512-VNNI vpdpbusd, AVX2 fallback;
compile/arm.py: NEON sdot, plain NEON fallback). The kernels themselves are compile/kernels.py.

A packed tensor is a `PackedValue` [N, C/block, H, W, block] (8-bit, or int32 for a raw conv
output that feeds a residual add), so consecutive packed ops never change layout. The layout
"packed" converts from and to the graph's NCHW (`pack`, `unpack`, registered below): the
network input is packed before the first packed op and the output unpacked after the last,
and so is every tensor that passes between a packed op and one another strategy lowered.

- conv2d / linear: one ConvKernel; the bias absorbs the input's offset (sum (x + off) w =
  sum x w + off sum w). A raw conv whose only use is a residual add waits (`pending`) and is
  emitted with the add fused into its epilogue (`_fused_main` picks which branch).
  A depthwise conv (groups = C = O) is a DepthwiseKernel; on an ISA with dot-product
  instructions another grouped conv is a ConvKernel whose output chunks each read the window
  of input chunks holding their groups, when that is at most MAX_GROUPED_WASTE times the conv's
  multiply-adds (beyond that, e.g. a depthwise conv with a channel multiplier: 16x, and on
  x86-avx2 or arm-neon, the default lowering takes it).
- add / avgpool / maxpool / flatten: AddKernel, PoolKernel, FlattenKernel (a flatten of a
  1x1 map is free).
- concat and lut (a table lookup) decline: the default lowering takes them.
A signed output (out_signed: a linear bottleneck's projection conv or residual sum) is clipped
symmetrically and stored as the signed network input is (`_activation`: x86 x + 128 in uint8,
sdot as it is in int8); the PackedValue carries that offset, which every consumer takes.
Every int32 intermediate is bounded statically here (`_accumulator_bound`); an op outside what
the kernels handle exactly raises Unsupported with the reason (and takes the default lowering).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tvm import relax

from mixq import graph as G
from mixq.compile.kernels import (BLOCK, AddKernel, ConvKernel, DepthwiseKernel, FlattenKernel, PackInputKernel,
                                  PoolKernel, UnpackOutputKernel, channel_blocks, chunks, group_window,
                                  four_taps_fit, pack_conv_weight, pack_depthwise_weight, pack_grouped_weight,
                                  weight_parts)
from mixq.compile.registry import Unsupported, register, register_layout

PACKED = "packed"
INT32_MAX = 2**31 - 1
MAX_GROUPED_WASTE = 8       # a grouped conv on ConvKernel may do this many times its multiply-adds
                            # (bench/depthwise.py --grouped, VNNI: 8x was still faster than the
                            # default kernel, 16x not always)


# ----------------------------------------------------------------------------- values
@dataclass(eq=False)
class PackedValue:
    """A graph tensor as it lives in the program: packed [N, C/block, H, W, block]. Its Relax
    var is emitted on first use of `var` (`emit`), so a lowering that declines an op after
    looking at its inputs has emitted nothing."""
    dtype: str              # storage dtype: uint8 | int8 | int32
    channels: int
    height: int
    width: int
    block: int
    max_abs: int            # static bound of |stored value| (for accumulator proofs)
    offset: int = 0         # stored = value + offset
    emit: Callable | None = None
    pending: tuple | None = None    # (conv op, its input): a raw conv waiting for its add
    _var: object = None

    @property
    def var(self):
        if self._var is None:
            self._var = self.emit()
            self.emit = self.pending = None
        return self._var

    @property
    def flat(self) -> bool:
        return self.height == 1 and self.width == 1

    def shape(self, batch):
        return (batch, chunks(self.channels, self.block), self.height, self.width, self.block)


def _now(v: PackedValue) -> PackedValue:
    v.var   # noqa: B018  (emits it here, in graph order)
    return v


def _isa(ctx):
    if ctx.isa is None:
        raise Unsupported("the target has no int8 dot-product instructions")
    return ctx.isa


def _accumulator_bound(parts, max_input, bias) -> int:
    """Largest |value| of the int32 chain acc_0, 2 acc_0 + acc_1, ..., + bias over channels."""
    o = parts[0].shape[0]
    bound = np.zeros(o, dtype=np.int64)
    for p in parts:
        bound = 2 * bound + np.abs(p).reshape(o, -1).sum(axis=1) * max_input
    return int((bound + np.abs(bias)).max())


def _stored_max(lo: int, hi: int, offset: int) -> int:
    """max |stored value| for values in [lo, hi]."""
    return max(abs(lo + offset), abs(hi + offset))


def _value_range(dtype: str, bits: int) -> tuple[int, int]:
    """[lo, hi] of an 8-bit tensor's values (the contract: int8 symmetric, uint8 from 0)."""
    if dtype == "int8":
        return -(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _fits(isa, lo: int, hi: int, offset: int) -> bool:
    """Values in [lo, hi] + offset fit the ISA's activation dtype."""
    dlo, dhi = (0, 255) if isa.act_dtype == "uint8" else (-128, 127)
    return dlo <= lo + offset and hi + offset <= dhi


def _activation(isa, op: G.Op, bits: int, signed: bool) -> tuple[int, int]:
    """(offset, max |stored value|) of an 8-bit output `op`'s kernel stores: an unsigned
    activation with the ISA's activation offset, a signed one (out_signed) with the signed
    network input's (`PackedISA.out_offset`); Unsupported when it does not fit the ISA's
    activation dtype (never with x86's or aarch64's offsets, 2..8 bits signed, 1..8 unsigned)."""
    lo, hi = _value_range("int8" if signed else "uint8", bits)
    offset = isa.out_offset(signed)
    if not _fits(isa, lo, hi, offset):
        raise Unsupported(f"layer '{op.name}': {'signed ' if signed else ''}{bits}-bit output stored as "
                          f"{isa.act_dtype} with offset {offset}")
    return offset, _stored_max(lo, hi, offset)


def _check_bound(op_name, bound, what):
    if bound > INT32_MAX:
        raise Unsupported(f"layer '{op_name}': {what} can exceed int32 (bound {bound})")


# ----------------------------------------------------------------------------- layout
def pack(ctx, name: str, x) -> PackedValue:
    """NCHW tensor `name` (Relax expression x) -> packed; 8-bit values stored with the ISA's
    offset for their dtype (the network input's rule), int32 as they are."""
    isa, t = _isa(ctx), ctx.tensor(name)
    is_input = name == ctx.graph.input.name
    if t.dtype not in ("int8", "uint8", "int32") or len(t.shape) not in (1, 3) or (is_input and (
            t.dtype == "int32" or len(t.shape) != 3)):
        what = "input" if is_input else f"tensor '{name}'"
        raise Unsupported(f"{what} {t.dtype}{list(t.shape)} is not an NCHW image")
    c, h, w = (*t.shape, 1, 1) if len(t.shape) == 1 else t.shape
    block = BLOCK if c > 8 else 4           # tiny channel counts (RGB, gray): 4-wide blocks
    if t.dtype == "int32":
        stored, offset, max_abs = "int32", 0, INT32_MAX
    else:
        offset = isa.input_offset(t.dtype)
        lo, hi = _value_range(t.dtype, t.bits)
        stored = isa.act_dtype
        if not _fits(isa, lo, hi, offset):
            raise Unsupported(f"{t.dtype} network input on {isa.name}" if is_input
                              else f"{t.dtype} tensor '{name}' on {isa.name}")
        max_abs = _stored_max(lo, hi, offset)
    kernel = PackInputKernel((ctx.kernel_batch, c, h, w), t.dtype, block, stored, offset)
    v = PackedValue(stored, c, h, w, block, max_abs, offset)

    def emit():
        x4 = x if len(t.shape) == 3 else ctx.bb.emit(relax.op.reshape(x, (ctx.batch, c, 1, 1)))
        return ctx.call_kernel(kernel, [x4], v.shape(ctx.kernel_batch), stored,
                               "packed_input" if is_input else f"{name}_packed")
    v.emit = emit
    return v


def unpack(ctx, name: str, v: PackedValue):
    """Packed tensor `name` -> NCHW (or NC when the graph's tensor is flat) in the graph's dtype."""
    t = ctx.tensor(name)
    flat = len(t.shape) == 1
    n = ctx.kernel_batch
    shape = (n, v.channels) if flat else (n, v.channels, v.height, v.width)
    kernel = UnpackOutputKernel((n, v.channels, v.height, v.width), v.dtype, v.block, flat, t.dtype, v.offset)
    return ctx.call_kernel(kernel, [v.var], shape, t.dtype, "output" if name == ctx.graph.output else f"{name}_nchw")


register_layout(PACKED, unpack, pack)


# ----------------------------------------------------------------------------- conv / linear
def _fused_main(ctx, add_op):
    """The raw conv feeding `add_op` that computes the add in its epilogue: the last one
    produced, used by nothing else (the other branches are ready by then)."""
    ops = {op.output: op for op in ctx.graph.ops}
    candidates = [name for name in add_op.inputs
                  if name in ops and ops[name].kind in ("conv2d", "linear")
                  and "multiplier" not in ops[name].arrays
                  and len(ctx.consumers(name)) == 1 and name != ctx.graph.output]
    if not candidates:
        return None
    order = {op.output: i for i, op in enumerate(ctx.graph.ops)}
    return max(candidates, key=order.get)


def _rq_consts(add_op, i, channels):
    return [relax.const(channel_blocks(add_op.arrays[f"multiplier{i}"], channels)),
            relax.const(channel_blocks(add_op.arrays[f"shift{i}"], channels, fill=1))]


def _out_hw(op, src):
    if op.kind == "linear":
        return 1, 1
    k, s, p = op.arrays["weight"].shape[-1], op.attrs["stride"], op.attrs["padding"]
    return (src.height + 2 * p - k) // s + 1, (src.width + 2 * p - k) // s + 1


def _weights(op, src: PackedValue, w, isa):
    """(make(batch, stride, padding, out, out_bits, extras, out_signed) -> kernel, () -> its packed
    weights, the weights' int8 parts as the accumulator bound sees them) for conv/linear `op`
    on `src` with `isa`: a `DepthwiseKernel` for a depthwise conv (groups = C = O) of 16-channel blocks,
    else a `ConvKernel`, a grouped conv reading a window of input chunks per output chunk
    (`group_window`) when that costs at most MAX_GROUPED_WASTE times its multiply-adds and
    the ISA has dot-product instructions (without them, x86-avx2 and arm-neon, the packed
    conv's int32 multiply-adds were no faster than the default kernel's even at 1x:
    bench/depthwise.py --target avx2 --grouped)."""
    o, c, k, _ = w.shape
    groups = op.attrs.get("groups", 1) if op.kind == "conv2d" else 1
    if groups > 1 and c == 1 and o == groups and src.block == BLOCK:
        four = four_taps_fit(w, src.dtype, isa)

        def make_depthwise(batch, stride, padding, out, out_bits, extras, out_signed):
            return DepthwiseKernel(isa, batch, src.dtype, chunks(o), src.height, src.width, k, stride, padding,
                                   src.offset, out, out_bits, extras, out_signed, four)
        return make_depthwise, (lambda: pack_depthwise_weight(w, four)), [w]     # int16 or int8: one part
    parts = weight_parts(w)
    if groups == 1:
        width, window = chunks(c, src.block), ()
        packed = lambda: pack_conv_weight(w, src.block)
    else:
        if c == 1:          # a depthwise conv of 4-channel blocks (<= 8 channels packed from NCHW), or:
            kind = f"a depthwise conv of {src.block}-channel blocks" if o == groups else \
                f"a depthwise conv with channel multiplier {o // groups}"
        else:
            kind = f"a grouped conv ({groups} groups of {c} -> {o // groups} channels)"
        if isa.intrin is None:
            raise Unsupported(f"layer '{op.name}': {kind} on {isa.name}: without dot-product instructions "
                              "the packed conv is no faster than the default one")
        width, per, step = group_window(src.channels, o, groups, src.block)
        waste = width * src.block / c
        if waste > MAX_GROUPED_WASTE:
            raise Unsupported(f"layer '{op.name}': {kind} would do {waste:.0f}x its multiply-adds on the "
                              f"packed kernel (at most {MAX_GROUPED_WASTE}x)")
        window = (chunks(src.channels, src.block), per, step)
        packed = lambda: pack_grouped_weight(w, groups, src.block, (width, per, step))

    def make(batch, stride, padding, out, out_bits, extras, out_signed):
        return ConvKernel(isa, batch, src.dtype, width, src.block, src.height, src.width, chunks(o), k, stride,
                          padding, src.offset, len(parts), out, out_bits, extras, window, out_signed)
    return make, packed, parts


def _conv(ctx, op, src: PackedValue, add_op=None, branches=()) -> PackedValue:
    """Packed conv/linear `op` of `src`, emitted on first use of its var; with `add_op`, the
    residual add it feeds computed in its epilogue (`branches`: the add's inputs, packed)."""
    isa = _isa(ctx)
    if src.dtype == "int32":
        raise Unsupported(f"layer '{op.name}': input is a raw int32 tensor")
    if src.dtype != isa.act_dtype:
        raise Unsupported(f"layer '{op.name}': {src.dtype} input on {isa.name}")
    w = op.arrays["weight"].astype(np.int64)
    if op.kind == "linear":
        if not src.flat:
            raise Unsupported(f"layer '{op.name}': linear on a {src.height}x{src.width} image")
        w = w.reshape(*w.shape, 1, 1)
        stride, padding, groups = 1, 0, 1
    else:
        stride, padding, groups = op.attrs["stride"], op.attrs["padding"], op.attrs.get("groups", 1)
    o, c, k, _ = w.shape
    if c * groups != src.channels:
        raise Unsupported(f"layer '{op.name}': {c * groups} input channels, tensor has {src.channels}")
    # sum (x + off) w = sum x w + off sum w, so the kernel's bias is bias - off sum w
    bias = op.arrays["bias"].astype(np.int64) - src.offset * w.reshape(o, -1).sum(axis=1)
    make, packed_weight, parts = _weights(op, src, w, isa)
    _check_bound(op.name, _accumulator_bound(parts, src.max_abs, bias), "the accumulator")
    requant = add_op is not None or "multiplier" in op.arrays
    out_bits = (add_op or op).attrs.get("out_bits", 8)
    signed = requant and bool((add_op or op).attrs.get("out_signed", False))
    extras, others, out_name = (), [], op.output
    if add_op is not None:
        i = add_op.inputs.index(op.output)
        ho, wo = _out_hw(op, src)
        for j, (name, other) in enumerate(zip(add_op.inputs, branches)):
            if j == i:
                continue
            if (other.block, other.channels, other.height, other.width) != (BLOCK, o, ho, wo):
                raise Unsupported(f"layer '{add_op.name}': branch '{name}' does not match")
            others.append((j, other))
            extras += ((other.dtype, other.offset),)
        out_name = add_op.output
    kernel = make(ctx.kernel_batch, stride, padding, "requant" if requant else "raw", out_bits, extras, signed)
    ho, wo = kernel.out_hw
    if requant:
        offset, max_abs = _activation(isa, add_op or op, out_bits, signed)
        v = PackedValue(isa.act_dtype, o, ho, wo, BLOCK, max_abs, offset)
    else:
        v = PackedValue("int32", o, ho, wo, BLOCK, INT32_MAX)

    def emit():
        if add_op is not None:
            i = add_op.inputs.index(op.output)
            mult, shift = add_op.arrays[f"multiplier{i}"], add_op.arrays[f"shift{i}"]
        elif requant:
            mult, shift = op.arrays["multiplier"], op.arrays["shift"]
        if kernel.folds_bias:     # bias * M + 2^(s-1), as the kernel takes it
            s = np.asarray(shift, dtype=np.int64)
            folded = bias * np.asarray(mult, dtype=np.int64) + np.left_shift(np.int64(1), s - 1)
            bias_const = relax.const(channel_blocks(folded, o, dtype="int64"), "int64")
        else:
            bias_const = relax.const(channel_blocks(bias, o))
        args = [src.var, relax.const(packed_weight()), bias_const]
        if requant:
            args += [relax.const(channel_blocks(mult, o)), relax.const(channel_blocks(shift, o, fill=1))]
        for j, other in others:
            args += [other.var] + _rq_consts(add_op, j, o)
        return ctx.call_kernel(kernel, args, v.shape(ctx.kernel_batch), v.dtype, out_name)
    v.emit = emit
    return v


@register("linear", "packed", layout=PACKED)
@register("conv2d", "packed", layout=PACKED)
def lower_conv(ctx, op: G.Op, inputs):
    v = _conv(ctx, op, inputs[0])
    users = ctx.consumers(op.output)
    if len(users) == 1 and users[0].kind == "add" and _fused_main(ctx, users[0]) == op.output:
        v.pending = (op, inputs[0])     # emitted with its add (lower_add), or alone when that declines
        return v
    return _now(v)


# ----------------------------------------------------------------------------- add / pools
@register("add", "packed", layout=PACKED)
def lower_add(ctx, op: G.Op, inputs):
    isa = _isa(ctx)
    if ctx.graph.input.name in op.inputs:
        raise Unsupported(f"layer '{op.name}': {op.kind} of the network input")
    pending = next((v for v in inputs if v.pending is not None), None)
    if pending is not None:
        conv_op, src = pending.pending
        try:
            return _now(_conv(ctx, conv_op, src, add_op=op, branches=inputs))
        except Unsupported:
            pass                        # the conv on its own, then this add
    first = inputs[0]
    if any((v.channels, v.height, v.width, v.block) != (first.channels, first.height, first.width, BLOCK)
           for v in inputs):
        raise Unsupported(f"layer '{op.name}': add of differently shaped tensors")
    bits, signed = op.attrs["out_bits"], bool(op.attrs.get("out_signed", False))
    offset, max_abs = _activation(isa, op, bits, signed)
    kernel = AddKernel(first.shape(ctx.kernel_batch), tuple((v.dtype, v.offset) for v in inputs), bits,
                       isa.act_dtype, offset, signed)
    out = PackedValue(isa.act_dtype, first.channels, first.height, first.width, BLOCK, max_abs, offset)

    def emit():
        args = []
        for i, v in enumerate(inputs):
            args += [v.var] + _rq_consts(op, i, first.channels)
        return ctx.call_kernel(kernel, args, out.shape(ctx.kernel_batch), out.dtype, op.output)
    out.emit = emit
    return _now(out)


@register("maxpool", "packed", layout=PACKED)
@register("avgpool", "packed", layout=PACKED)
def lower_pool(ctx, op: G.Op, inputs):
    isa = _isa(ctx)
    if ctx.graph.input.name in op.inputs:
        raise Unsupported(f"layer '{op.name}': {op.kind} of the network input")
    src = inputs[0]
    if src.dtype == "int32":
        raise Unsupported(f"layer '{op.name}': pooling of a raw int32 tensor")
    a = op.attrs
    k, s, p = a["kernel"], a["stride"], a.get("padding", 0)
    ho, wo = (src.height + 2 * p - k) // s + 1, (src.width + 2 * p - k) // s + 1
    if src.dtype != isa.act_dtype:
        raise Unsupported(f"layer '{op.name}': {src.dtype} input on {isa.name}")
    consts = []
    if op.kind == "avgpool":
        if np.size(op.arrays["multiplier"]) != 1 or np.size(op.arrays["shift"]) != 1:
            raise Unsupported(f"layer '{op.name}': per-channel avgpool multiplier")
        # unsigned, or signed (out_signed), whatever the input (a signed one: window sum - offset * k^2)
        signed = bool(a.get("out_signed", False))
        offset, bound = _activation(isa, op, a["out_bits"], signed)
        _check_bound(op.name, src.max_abs * k * k, "the window sum")
        consts = [relax.const(np.asarray(op.arrays["multiplier"], np.int32).reshape(1)),
                  relax.const(np.asarray(op.arrays["shift"], np.int32).reshape(1))]
    else:
        offset, bound, signed = src.offset, src.max_abs, False
    kernel = PoolKernel(op.kind, src.shape(ctx.kernel_batch), src.dtype, src.offset, k, s, p, a.get("out_bits", 8),
                        offset, signed)
    v = PackedValue(src.dtype, src.channels, ho, wo, src.block, bound, offset)
    v.emit = lambda: ctx.call_kernel(kernel, [src.var] + consts, v.shape(ctx.kernel_batch), v.dtype, op.output)
    return _now(v)


@register("flatten", "packed", layout=PACKED)
def lower_flatten(ctx, op: G.Op, inputs):
    _isa(ctx)
    src = inputs[0]
    if src.dtype == "int32":
        raise Unsupported(f"layer '{op.name}': flatten of a raw int32 tensor")
    if src.flat and src.block == BLOCK:     # [N, C/16, 1, 1, 16] is already NCHW order
        return src
    feat = src.channels * src.height * src.width
    kernel = FlattenKernel((ctx.kernel_batch, src.channels, src.height, src.width), src.dtype, src.block,
                           src.offset)
    v = PackedValue(src.dtype, feat, 1, 1, BLOCK, src.max_abs, src.offset)
    v.emit = lambda: ctx.call_kernel(kernel, [src.var], v.shape(ctx.kernel_batch), v.dtype, op.output)
    return _now(v)


@register("concat", "packed", layout=PACKED)
def lower_concat(ctx, op: G.Op, inputs):
    raise Unsupported(f"layer '{op.name}': channel concatenation (default lowering)")


@register("lut", "packed", layout=PACKED)
def lower_lut(ctx, op: G.Op, inputs):
    raise Unsupported(f"layer '{op.name}': table lookup (default lowering)")
