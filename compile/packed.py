"""The fast path of `mixq compile`: the whole integer graph in a packed NCHW16c layout, with
int8 dot-product instructions; shared by x86 (mixq.compile.x86: AVX512-VNNI vpdpbusd, AVX2
fallback) and aarch64 (mixq.compile.arm: NEON sdot, plain NEON fallback).

Every activation between ops is a packed tensor [N, C/16, H, W, 16] (8-bit, or int32 for a
raw conv output that feeds a residual add), so nothing changes layout inside the network:
the input is packed once and the output unpacked once. Kernels, one PrimFunc per distinct
shape (identical layers share it):

    pack_input   NCHW int8/uint8 -> packed 8-bit
    conv         8-bit x int8 -> int32 accumulators, `lanes` output x 4 input channels per
                 dot-product instruction (a TensorIR intrinsic); the epilogue (bias, int64
                 requantization, ReLU clip, a residual add's other branches) is fused.
                 Linear layers are 1x1 convs on a 1x1 image.
    add / avgpool / maxpool / flatten / unpack_output   small kernels

Weights are packed at compile time (NumPy, `pack_conv_weight`) into [O/16 * P, C/b, K, K,
b/4, 16, 4]. Everything stays exact; the tricks that keep it so:
- Stored values carry an offset (stored = value + offset) so that the instruction's operand
  types fit: x86 (u8 x s8) stores the signed network input as x + 128; aarch64 (sdot, s8 x
  s8) stores activations as a - 128. A conv subtracts offset * sum(w) from its bias, pads
  with the stored zero (= offset), and every other consumer subtracts the offset.
- 9-bit weights (CSQ kept all 8 bits, |w| <= 255, int16 arrays) are split into two int8
  parts, w = 2 * (w >> 1) + (w & 1); the epilogue combines the two accumulators.
- Channel counts are padded to 16 with zero weights, zero bias and zero multiplier.
- Every int32 intermediate is bounded statically at lowering (`_accumulator_bound`).

`lower_fast` is `mixq compile`'s entry (compile/build.py): it picks the strategy from the
target's CPU features and returns None for targets or graphs outside this path (which then
take the per-op default lowering). A batch of None compiles a symbolic batch. Tuning
(mixq.compile.tune) searches the hand schedule's tile sizes and loop order with MetaSchedule,
so every candidate stays tensorized and exact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir import Schedule

from mixq import graph as G

BLOCK = 16                       # channels per packed block
INT32_MAX = 2**31 - 1


class Unsupported(Exception):
    """The graph (or target) is outside the packed fast path; the message says why."""


@dataclass(frozen=True)
class Strategy:
    """How a target runs the packed kernels."""
    name: str                    # "x86-vnni", "x86-avx2", "arm-sdot", "arm-neon"
    intrin: str | None           # TensorIR intrinsic for a (lanes x 4) int8 dot product, or
                                 # None: LLVM vectorizes exact int32 multiply-adds instead
    lanes: int                   # output channels per intrinsic call
    act_dtype: str               # storage of 8-bit activations: "uint8" or "int8"
    act_offset: int              # stored activation = value + act_offset
    input_offsets: tuple         # ((graph input dtype, offset), ...)
    accumulators: int = 16       # vector accumulators a conv tile aims for (hand schedule)

    def input_offset(self, dtype: str) -> int:
        return dict(self.input_offsets)[dtype]


# ----------------------------------------------------------------------------- helpers
def _dims(shape):
    """A kernel's shape with batch None (the symbolic batch) as a TIR variable."""
    return tuple(te.var("n", "int64") if d is None else d for d in shape)


def _chunks(channels: int, block: int = BLOCK) -> int:
    return -(-channels // block)


def _i64(v):
    return v.astype("int64")


def _rq(x64, mult, shift):
    """(x * M + 2^(s-1)) >> s in int64, as mixq.graph.rq."""
    s = _i64(shift)
    return (x64 * _i64(mult) + (tirx.const(1, "int64") << (s - 1))) >> s


def _store(y64, bits: int, dtype: str, offset: int):
    """clip(y, 0, 2^bits - 1) + offset in the storage dtype."""
    y = te.max(te.min(y64, tirx.const((1 << bits) - 1, "int64")), tirx.const(0, "int64"))
    return (y + offset).astype(dtype) if offset else y.astype(dtype)


def _value(x, offset: int):
    """Stored tensor element -> its int64 value."""
    return _i64(x) - offset if offset else _i64(x)


def _per_channel(values, channels: int, fill=0, dtype="int32") -> np.ndarray:
    """Per-channel vector -> [C/16, 16], padded channels set to `fill`."""
    v = np.full(_chunks(channels) * BLOCK, fill, dtype=np.int64)
    v[:channels] = np.broadcast_to(np.asarray(values, dtype=np.int64), (channels,))
    return v.astype(dtype).reshape(-1, BLOCK)


def weight_parts(w: np.ndarray) -> list[np.ndarray]:
    """Integer weights -> int8 parts with w = sum_p parts[p] * 2^(P-1-p) (exact)."""
    w = w.astype(np.int64)
    if np.abs(w).max(initial=0) <= 127:
        return [w]
    if np.abs(w).max() > 255:
        raise Unsupported(f"weights up to {int(np.abs(w).max())} need more than 9 bits")
    return [w >> 1, w & 1]      # hi in [-128, 127], lo in {0, 1}


def pack_conv_weight(w: np.ndarray, in_block: int) -> np.ndarray:
    """[O, C, K, K] integers -> int8 [O/16 * P, C/in_block, K, K, in_block/4, 16, 4], zero
    padded; chunk oc * P + p holds part p of output channels oc*16 .. oc*16+15."""
    parts = weight_parts(w)
    o, c, kh, kw = w.shape
    oc, ic = _chunks(o), _chunks(c, in_block)
    out = np.zeros((oc * BLOCK, len(parts), ic * in_block, kh, kw), dtype=np.int8)
    for p, part in enumerate(parts):
        out[:o, p, :c] = part
    out = out.reshape(oc, BLOCK, len(parts), ic, in_block // 4, 4, kh, kw)
    out = out.transpose(0, 2, 3, 6, 7, 4, 1, 5)          # oc, p, ic, kh, kw, icf, ob, ics
    return np.ascontiguousarray(out.reshape(oc * len(parts), *out.shape[2:]))


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


def _check_bound(op_name, bound, what):
    if bound > INT32_MAX:
        raise Unsupported(f"layer '{op_name}': {what} can exceed int32 (bound {bound})")


# ----------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class ConvKernel:
    """Packed conv2d: [N, C/b, H, W, b] 8-bit x packed weights -> [N, O/16, Ho, Wo, 16].

    out "requant": clip(rq(acc + bias, M, s) + sum_j rq(extra_j, M_j, s_j)) + act_offset;
    out "raw":     acc + bias as int32 (feeds a residual add that is not fused here).
    `acc` sums stored inputs; the lowering folds the input offset into the bias."""
    tunable = True          # class attribute (not a field): MetaSchedule tunes these
    strategy: Strategy
    batch: int | None       # None: any batch (a symbolic dimension)
    in_dtype: str
    in_chunks: int
    in_block: int
    height: int
    width: int
    out_chunks: int
    kernel: int
    stride: int
    padding: int
    pad_value: int          # the stored zero of the input (its offset)
    parts: int              # 1, or 2 for 9-bit weights
    out: str                # "requant" | "raw"
    out_bits: int
    extras: tuple = ()      # (dtype, offset) of fused residual addends

    @property
    def out_hw(self):
        f = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1
        return f(self.height), f(self.width)

    @property
    def macs(self) -> int:
        ho, wo = self.out_hw
        return ((self.batch or 1) * self.out_chunks * BLOCK * ho * wo * self.in_chunks * self.in_block
                * self.kernel ** 2 * self.parts)

    def tensors(self):
        (n,), b, k, s, p = _dims((self.batch,)), self.in_block, self.kernel, self.stride, self.padding
        st = self.strategy
        ho, wo = self.out_hw
        data = te.placeholder((n, self.in_chunks, self.height, self.width, b), self.in_dtype, name="data")
        weight = te.placeholder((self.out_chunks * self.parts, self.in_chunks, k, k, b // 4, BLOCK, 4),
                                "int8", name="weight")
        pc = (self.out_chunks, BLOCK)
        bias = te.placeholder(pc, "int32", name="bias")
        if p:
            pad = topi.nn.pad(data, (0, 0, p, p, 0), (0, 0, p, p, 0), pad_value=self.pad_value, name="pad")
        else:
            pad = data
        ico = te.reduce_axis((0, self.in_chunks), "ico")
        kh = te.reduce_axis((0, k), "kh")
        kw = te.reduce_axis((0, k), "kw")
        icf = te.reduce_axis((0, b // 4), "icf")
        ics = te.reduce_axis((0, 4), "ics")
        acc = te.compute(
            (n, self.out_chunks * self.parts, ho, wo, BLOCK),
            lambda i, oc, oh, ow, ob: te.sum(
                pad[i, ico, oh * s + kh, ow * s + kw, icf * 4 + ics].astype("int32")
                * weight[oc, ico, kh, kw, icf, ob, ics].astype("int32"),
                axis=[ico, kh, kw, icf, ics]),
            name="conv")
        args = [data, weight, bias]
        if self.out == "requant":
            mult = te.placeholder(pc, "int32", name="mult")
            shift = te.placeholder(pc, "int32", name="shift")
            args += [mult, shift]
        extras = []
        for j, (dtype, offset) in enumerate(self.extras):
            extras.append((te.placeholder((n, self.out_chunks, ho, wo, BLOCK), dtype, name=f"extra{j}"),
                           te.placeholder(pc, "int32", name=f"mult{j}"),
                           te.placeholder(pc, "int32", name=f"shift{j}"), offset))
            args += list(extras[-1][:3])

        def epilogue(i, oc, oh, ow, ob):
            # int32 is enough (bounds checked at lowering) and lets LLVM multiply 32x32->64
            a = acc[i, oc * self.parts, oh, ow, ob]
            for part in range(1, self.parts):
                a = a * 2 + acc[i, oc * self.parts + part, oh, ow, ob]
            a = a + bias[oc, ob]
            if self.out == "raw":
                return a
            y = _rq(_i64(a), mult[oc, ob], shift[oc, ob])
            for x, m, sh, offset in extras:
                y = y + _rq(_value(x[i, oc, oh, ow, ob], offset), m[oc, ob], sh[oc, ob])
            return _store(y, self.out_bits, st.act_dtype, st.act_offset)

        out = te.compute((n, self.out_chunks, ho, wo, BLOCK), epilogue, name="epilogue")
        return args + [out]

    # -- schedule ---------------------------------------------------------------------
    ORDERS = ("ic-outer", "k-outer")        # reduction loop orders (design-space sketches)

    def default_tiles(self):
        """(oc_inner, oh_inner, ow_inner): output-channel chunks, rows and columns computed per
        register tile, about `strategy.accumulators` vector accumulators: enough independent
        dot products to hide their latency, few enough to stay in registers. Two rows per
        tile reuse each weight vector twice as often (measured best on ResNet-20's layers)."""
        ho, wo = self.out_hw
        per_pixel = self.parts * BLOCK // self.strategy.lanes      # vectors per pixel and chunk
        oh_inner = 2 if ho % 2 == 0 else 1
        oc_inner = 2 if self.out_chunks % 2 == 0 and self.parts == 1 else 1     # parts act as chunks
        room = max(1, self.strategy.accumulators // (oh_inner * oc_inner * per_pixel))
        ow_inner = max(d for d in range(1, min(wo, room) + 1) if wo % d == 0)
        return oc_inner, oh_inner, ow_inner

    def design_space(self, sch: Schedule) -> list:
        """MetaSchedule's search space: one sketch per reduction order, tile sizes sampled."""
        sketches = []
        for order in self.ORDERS:
            s = sch.copy()
            self.schedule(s, tiles="sample", order=order)
            sketches.append(s)
        return sketches

    def schedule(self, sch: Schedule, tiles=None, order="ic-outer"):
        """The hand schedule (tiles=None: `default_tiles`); tiles="sample" makes the tile
        sizes MetaSchedule decisions.

        One parallel task per oh_inner output rows, for each image: it pads the input rows it
        needs into a small thread-local buffer (no separate padding pass), then walks
        output-channel chunks and column tiles; a tile keeps parts x oc_inner x oh_inner x
        ow_inner x 16/lanes vector accumulators while the reduction runs, then the fused
        epilogue writes them."""
        st = self.strategy
        conv = sch.get_sblock("conv")
        n, oc, oh, ow, ob, ico, kh, kw, icf, ics = sch.get_loops(conv)
        oc, part = sch.split(oc, [None, self.parts])
        if tiles == "sample":
            oco, oci = sch.split(oc, sch.sample_perfect_tile(oc, n=2, max_innermost_factor=4))
            oho, ohi = sch.split(oh, sch.sample_perfect_tile(oh, n=2, max_innermost_factor=2))
            owo, owi = sch.split(ow, sch.sample_perfect_tile(ow, n=2, max_innermost_factor=16))
        else:
            oc_inner, oh_inner, ow_inner = tiles or self.default_tiles()
            oco, oci = sch.split(oc, [None, oc_inner])
            oho, ohi = sch.split(oh, [None, oh_inner])
            owo, owi = sch.split(ow, [None, ow_inner])
        obo, obi = sch.split(ob, [None, st.lanes])
        reduction = (ico, kh, kw, icf) if order == "ic-outer" else (kh, kw, ico, icf)
        # images inside the row tasks, not fused with them: a symbolic batch cannot be fused
        # (tensorize needs affine bindings), and one loop nest serves both
        sch.reorder(oho, n, oco, owo, *reduction, part, oci, ohi, owi, obo, obi, ics)
        sch.reverse_compute_at(sch.get_sblock("epilogue"), owo, preserve_unit_loops=True)
        row = n
        if self.out_hw[0] > 1:      # one task: don't wake the thread pool
            sch.parallel(oho)
        if self.padding:
            pad = sch.get_sblock("pad")
            sch.compute_at(pad, row, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(pad)[-1])
        if st.intrin is None:       # exact int32 multiply-adds, LLVM picks the instructions
            sch.reorder(ics, obi)
            sch.vectorize(obi)
            sch.unroll(ics)
        init = sch.decompose_reduction(conv, reduction[0])
        if st.intrin is not None:
            sch.tensorize(obi, st.intrin)
        for loop in (obo, owi, ohi, oci, part):
            sch.unroll(loop)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(sch.get_sblock("epilogue"))[-1])
        return sch


@dataclass(frozen=True)
class PackInputKernel:
    """NCHW int8/uint8 -> packed, stored = x + offset (padded channels hold the stored zero)."""
    shape: tuple            # N, C, H, W
    dtype: str
    block: int
    out_dtype: str
    offset: int

    def tensors(self):
        n, c, h, w = _dims(self.shape)
        x = te.placeholder((n, c, h, w), self.dtype, name="x")

        def f(i, cc, y, z, cb):
            ch = cc * self.block + cb
            v = (x[i, te.min(ch, c - 1), y, z].astype("int32") + self.offset).astype(self.out_dtype)
            return te.if_then_else(ch < c, v, tirx.const(self.offset, self.out_dtype))
        out = te.compute((n, _chunks(c, self.block), h, w, self.block), f, name="pack")
        return [x, out]

    def schedule(self, sch, tiles=None):
        _schedule_elementwise(sch, sch.get_sblock("pack"))
        return sch


@dataclass(frozen=True)
class UnpackOutputKernel:
    """Packed [N, C/b, H, W, b] -> NCHW (or NC when flat) values in the graph's dtype."""
    shape: tuple            # N, C, H, W of the real tensor
    dtype: str              # stored dtype
    block: int
    flat: bool
    out_dtype: str
    offset: int

    def tensors(self):
        n, c, h, w = _dims(self.shape)
        x = te.placeholder((n, _chunks(c, self.block), h, w, self.block), self.dtype, name="x")
        value = lambda v: (_value(v, self.offset)).astype(self.out_dtype) if self.offset else v.astype(self.out_dtype)
        if self.flat:
            out = te.compute((n, c), lambda i, ch: value(x[i, ch // self.block, 0, 0, ch % self.block]),
                             name="unpack")
        else:
            out = te.compute((n, c, h, w), lambda i, ch, y, z: value(x[i, ch // self.block, y, z, ch % self.block]),
                             name="unpack")
        return [x, out]

    def schedule(self, sch, tiles=None):
        return sch                      # a few hundred bytes: not worth a schedule


@dataclass(frozen=True)
class FlattenKernel:
    """Packed [N, C/b, H, W, b] -> flat packed [N, F/16, 1, 1, 16], F = C*H*W in NCHW order."""
    shape: tuple
    dtype: str
    block: int
    pad_value: int

    def tensors(self):
        n, c, h, w = _dims(self.shape)
        feat = c * h * w
        x = te.placeholder((n, _chunks(c, self.block), h, w, self.block), self.dtype, name="x")

        def f(i, fc, y, z, fb):
            flat = te.min(fc * BLOCK + fb, feat - 1)
            ch, r = flat // (h * w), flat % (h * w)
            v = x[i, ch // self.block, r // w, r % w, ch % self.block]
            return te.if_then_else(fc * BLOCK + fb < feat, v, tirx.const(self.pad_value, self.dtype))
        out = te.compute((n, _chunks(feat), 1, 1, BLOCK), f, name="flatten")
        return [x, out]

    def schedule(self, sch, tiles=None):
        return sch


@dataclass(frozen=True)
class AddKernel:
    """y = clip(sum_i rq(x_i, M_i, s_i), 0, 2^bits - 1) on packed tensors."""
    shape: tuple            # packed shape
    inputs: tuple           # (dtype, offset) per input
    out_bits: int
    out_dtype: str
    out_offset: int

    def tensors(self):
        shape = _dims(self.shape)
        pc = (self.shape[1], BLOCK)
        ins = [(te.placeholder(shape, d, name=f"x{i}"), te.placeholder(pc, "int32", name=f"mult{i}"),
                te.placeholder(pc, "int32", name=f"shift{i}"), off) for i, (d, off) in enumerate(self.inputs)]

        def f(i, c, y, z, b):
            total = None
            for x, m, s, off in ins:
                r = _rq(_value(x[i, c, y, z, b], off), m[c, b], s[c, b])
                total = r if total is None else total + r
            return _store(total, self.out_bits, self.out_dtype, self.out_offset)
        out = te.compute(shape, f, name="add")
        return [t for group in ins for t in group[:3]] + [out]

    def schedule(self, sch, tiles=None):
        _schedule_elementwise(sch, sch.get_sblock("add"))
        return sch


@dataclass(frozen=True)
class PoolKernel:
    """avgpool (window sum, rq, clip) or maxpool on packed 8-bit tensors, zero padding."""
    kind: str               # avgpool | maxpool
    shape: tuple            # packed input shape
    dtype: str
    offset: int             # stored = value + offset, input and output alike
    kernel: int
    stride: int
    padding: int
    out_bits: int

    def tensors(self):
        n, cc, h, w, b = _dims(self.shape)
        k, s, p = self.kernel, self.stride, self.padding
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        x = te.placeholder((n, cc, h, w, b), self.dtype, name="x")
        xp = topi.nn.pad(x, (0, 0, p, p, 0), (0, 0, p, p, 0), pad_value=self.offset, name="pad") if p else x
        ry, rx = te.reduce_axis((0, k), "ry"), te.reduce_axis((0, k), "rx")
        if self.kind == "maxpool":          # max commutes with the offset
            out = te.compute((n, cc, ho, wo, b), lambda i, c, y, z, cb: te.max(
                xp[i, c, y * s + ry, z * s + rx, cb], axis=[ry, rx]), name="pool")
            return [x, out]
        mult = te.placeholder((1,), "int32", name="mult")
        shift = te.placeholder((1,), "int32", name="shift")
        total = te.compute((n, cc, ho, wo, b), lambda i, c, y, z, cb: te.sum(
            xp[i, c, y * s + ry, z * s + rx, cb].astype("int32"), axis=[ry, rx]), name="pool")
        corr = self.offset * k * k
        out = te.compute(total.shape, lambda *idx: _store(_rq(_i64(total[idx]) - corr, mult[0], shift[0]),
                                                          self.out_bits, self.dtype, self.offset),
                         name="pool_rq")
        return [x, mult, shift, out]

    def schedule(self, sch, tiles=None):
        pool = sch.get_sblock("pool")
        loops = sch.get_loops(pool)
        outer = sch.fuse(*loops[:3])
        if _worth_threads(self.shape):
            sch.parallel(outer)
        if self.kind == "avgpool":
            sch.reverse_compute_at(sch.get_sblock("pool_rq"), sch.get_loops(pool)[0])
        if self.padding:
            sch.compute_inline(sch.get_sblock("pad"))
        return sch


PARALLEL_MIN_ELEMENTS = 1 << 15      # below this, waking the thread pool costs more than it saves


def _worth_threads(shape) -> bool:
    if any(d is None or not isinstance(d, (int, tirx.IntImm)) for d in shape):
        return True                       # symbolic batch: could be large
    return int(np.prod([int(d) for d in shape])) >= PARALLEL_MIN_ELEMENTS


def _schedule_elementwise(sch: Schedule, block):
    loops = sch.get_loops(block)
    extents = [sch.get(loop).extent for loop in loops]
    outer = sch.fuse(*loops[:3])
    if _worth_threads(extents):
        sch.parallel(outer)
    inner = sch.fuse(*sch.get_loops(block)[1:])
    _, vec = sch.split(inner, [None, BLOCK])
    sch.vectorize(vec)


def prim_func(kernel) -> tirx.PrimFunc:
    """The kernel's unscheduled PrimFunc: the workload MetaSchedule keys its records by."""
    return te.create_prim_func(kernel.tensors()).with_attr("global_symbol", "main")


def is_tunable(kernel) -> bool:
    return getattr(kernel, "tunable", False)


def scheduled(kernel, target, database=None, tuned_batch: int = 1) -> tuple[tirx.PrimFunc, str]:
    """(PrimFunc, "tuned" | "hand"): the best tuning record's schedule when the database has
    one, else the hand schedule. Records are for a fixed batch; a symbolic-batch kernel takes
    the schedule tuned at `tuned_batch` (its loops are the same, only the batch extent
    differs)."""
    mod = tvm.IRModule({"main": prim_func(kernel)})
    if database is not None and is_tunable(kernel):
        key = kernel if kernel.batch is not None else dataclasses.replace(kernel, batch=tuned_batch)
        record = database.query_tuning_record(tvm.IRModule({"main": prim_func(key)}), target, "main")
        if record is not None:
            sch = Schedule(mod)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            return sch.mod["main"], "tuned"
    sch = Schedule(mod)
    kernel.schedule(sch)
    return sch.mod["main"], "hand"


# ----------------------------------------------------------------------------- lowering
@dataclass
class PackedValue:
    """A graph tensor as it lives in the program: packed [N, C/block, H, W, block]."""
    var: relax.Var
    dtype: str              # storage dtype: uint8 | int8 | int32
    channels: int
    height: int
    width: int
    block: int
    max_abs: int            # static bound of |stored value| (for accumulator proofs)
    offset: int = 0         # stored = value + offset

    @property
    def flat(self) -> bool:
        return self.height == 1 and self.width == 1

    def shape(self, batch):
        return (batch, _chunks(self.channels, self.block), self.height, self.width, self.block)


class PackedLowering:
    """IntGraph -> Relax IRModule `main(x: int8[N, C, H, W]) -> int32 logits` on packed kernels.

    After build(): `kernels` maps each distinct kernel to its GlobalVar, `uses` counts calls,
    `schedules` says "tuned" or "hand" per kernel."""

    def __init__(self, graph: G.IntGraph, batch: int | None, strategy: Strategy, target, database=None,
                 tuned_batch: int = 1):
        self.graph, self.batch, self.target, self.database = graph, batch, target, database
        self.tuned_batch = batch or tuned_batch
        self.n = tirx.Var("n", "int64") if batch is None else batch    # Relax's batch dimension
        self.strategy = strategy
        self.bb = relax.BlockBuilder()
        self.kernels, self.schedules, self.uses = {}, {}, {}
        self.values = {}            # tensor name -> PackedValue
        self.consumers = {}
        for op in graph.ops:
            for name in op.inputs:
                self.consumers.setdefault(name, []).append(op)
        self._check_supported()

    # -- analysis ------------------------------------------------------------------------
    def _check_supported(self):
        g = self.graph
        if g.input.dtype not in ("int8", "uint8") or len(g.input.shape) != 3:
            raise Unsupported(f"input {g.input.dtype}{list(g.input.shape)} is not an NCHW image")
        for op in g.ops:
            if op.kind not in ("conv2d", "linear", "add", "avgpool", "maxpool", "flatten"):
                raise Unsupported(f"layer '{op.name}': op kind '{op.kind}'")
            if op.kind == "conv2d" and op.attrs.get("groups", 1) != 1:
                raise Unsupported(f"layer '{op.name}': grouped convolution")
            if g.input.name in op.inputs and op.kind not in ("conv2d", "linear", "flatten"):
                raise Unsupported(f"layer '{op.name}': {op.kind} of the network input")

    def _fused_main(self, add_op):
        """The raw conv feeding `add_op` that computes the add in its epilogue: the last one
        produced, used by nothing else (the other branches are ready by then)."""
        ops = {op.output: op for op in self.graph.ops}
        candidates = [name for name in add_op.inputs
                      if name in ops and ops[name].kind in ("conv2d", "linear")
                      and "multiplier" not in ops[name].arrays
                      and len(self.consumers.get(name, [])) == 1 and name != self.graph.output]
        if not candidates:
            return None
        order = {op.output: i for i, op in enumerate(self.graph.ops)}
        return max(candidates, key=order.get)

    # -- emission ------------------------------------------------------------------------
    def _call(self, kernel, args, out_shape, out_dtype, name):
        gv = self.kernels.get(kernel)
        if gv is None:
            func, how = scheduled(kernel, self.target, self.database, self.tuned_batch)
            fname = f"k{len(self.kernels)}_{type(kernel).__name__}"
            func = func.with_attrs({"global_symbol": fname, "tirx.is_scheduled": True})
            gv = self.bb.add_func(func, fname)
            self.kernels[kernel], self.schedules[kernel] = gv, how
        self.uses[kernel] = self.uses.get(kernel, 0) + 1
        out_shape = tuple(self.n if d is None else d for d in out_shape)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, out_dtype)),
                            name_hint=name.replace(".", "_"))

    def build(self) -> tvm.IRModule:
        g = self.graph
        x = relax.Var("x", relax.TensorType((self.n, *g.input.shape), g.input.dtype))
        fused = {}                  # raw conv output -> the add computed in its epilogue
        for op in g.ops:
            if op.kind == "add":
                main = self._fused_main(op)
                if main is not None:
                    fused[main] = op
        producer = {op.output: op for op in g.ops}
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                self._emit_input(x)
                for op in g.ops:
                    if op.output in fused:
                        continue            # emitted with its add
                    if op.kind in ("conv2d", "linear"):
                        self._emit_conv(op)
                    elif op.kind == "add":
                        main = next((m for m, a in fused.items() if a is op), None)
                        if main is not None:
                            self._emit_conv(producer[main], add_op=op)
                        else:
                            self._emit_add(op)
                    elif op.kind in ("avgpool", "maxpool"):
                        self._emit_pool(op)
                    elif op.kind == "flatten":
                        self._emit_flatten(op)
                out = self.bb.emit_output(self._emit_output())
            self.bb.emit_func_output(out)
        return self.bb.get()

    def _emit_input(self, x):
        gi, st = self.graph.input, self.strategy
        c, h, w = gi.shape
        block = BLOCK if c > 8 else 4           # tiny channel counts (RGB, gray): 4-wide blocks
        offset = st.input_offset(gi.dtype)
        if gi.dtype == "int8":
            lo, hi = -(1 << (gi.bits - 1)) + 1, (1 << (gi.bits - 1)) - 1
        else:
            lo, hi = 0, (1 << gi.bits) - 1
        stored = "uint8" if lo + offset >= 0 else "int8"
        if stored != st.act_dtype or not -128 <= lo + offset <= hi + offset <= 255:
            raise Unsupported(f"{gi.dtype} network input on {st.name}")
        kernel = PackInputKernel((self.batch, c, h, w), gi.dtype, block, stored, offset)
        v = PackedValue(None, stored, c, h, w, block, _stored_max(lo, hi, offset), offset)
        v.var = self._call(kernel, [x], v.shape(self.batch), stored, "packed_input")
        self.values[gi.name] = v

    def _emit_conv(self, op, add_op=None):
        st = self.strategy
        src = self.values[op.inputs[0]]
        if src.dtype == "int32":
            raise Unsupported(f"layer '{op.name}': input is a raw int32 tensor")
        w = op.arrays["weight"].astype(np.int64)
        if op.kind == "linear":
            if not src.flat:
                raise Unsupported(f"layer '{op.name}': linear on a {src.height}x{src.width} image")
            w = w.reshape(*w.shape, 1, 1)
            stride, padding = 1, 0
        else:
            stride, padding = op.attrs["stride"], op.attrs["padding"]
        o, c, k, _ = w.shape
        if c != src.channels:
            raise Unsupported(f"layer '{op.name}': {c} input channels, tensor has {src.channels}")
        # sum (x + off) w = sum x w + off sum w, so the kernel's bias is bias - off sum w
        bias = op.arrays["bias"].astype(np.int64) - src.offset * w.reshape(o, -1).sum(axis=1)
        parts = weight_parts(w)
        _check_bound(op.name, _accumulator_bound(parts, src.max_abs, bias), "the accumulator")
        requant = add_op is not None or "multiplier" in op.arrays
        out_bits = (add_op or op).attrs.get("out_bits", 8)
        args = [src.var, relax.const(pack_conv_weight(w, src.block)), relax.const(_per_channel(bias, o))]
        extras, out_name = (), op.output
        if add_op is not None:
            i = add_op.inputs.index(op.output)
            args += self._rq_consts(add_op, i, o)
            ho, wo = self._out_hw(op, src)
            for j, name in enumerate(add_op.inputs):
                if j == i:
                    continue
                other = self.values[name]
                if (other.block, other.channels, other.height, other.width) != (BLOCK, o, ho, wo):
                    raise Unsupported(f"layer '{add_op.name}': branch '{name}' does not match")
                args += [other.var] + self._rq_consts(add_op, j, o)
                extras += ((other.dtype, other.offset),)
            out_name = add_op.output
        elif requant:
            args += [relax.const(_per_channel(op.arrays["multiplier"], o)),
                     relax.const(_per_channel(op.arrays["shift"], o, fill=1))]
        kernel = ConvKernel(st, self.batch, src.dtype, _chunks(c, src.block), src.block, src.height, src.width,
                            _chunks(o), k, stride, padding, src.offset, len(parts),
                            "requant" if requant else "raw", out_bits, extras)
        ho, wo = kernel.out_hw
        if requant:
            v = PackedValue(None, st.act_dtype, o, ho, wo, BLOCK, _stored_max(0, (1 << out_bits) - 1, st.act_offset),
                            st.act_offset)
        else:
            v = PackedValue(None, "int32", o, ho, wo, BLOCK, INT32_MAX)
        v.var = self._call(kernel, args, v.shape(self.batch), v.dtype, out_name)
        self.values[out_name] = v

    @staticmethod
    def _rq_consts(add_op, i, channels):
        return [relax.const(_per_channel(add_op.arrays[f"multiplier{i}"], channels)),
                relax.const(_per_channel(add_op.arrays[f"shift{i}"], channels, fill=1))]

    @staticmethod
    def _out_hw(op, src):
        if op.kind == "linear":
            return 1, 1
        k, s, p = op.arrays["weight"].shape[-1], op.attrs["stride"], op.attrs["padding"]
        return (src.height + 2 * p - k) // s + 1, (src.width + 2 * p - k) // s + 1

    def _emit_add(self, op):
        st = self.strategy
        ins = [self.values[name] for name in op.inputs]
        first = ins[0]
        if any((v.channels, v.height, v.width, v.block) != (first.channels, first.height, first.width, BLOCK)
               for v in ins):
            raise Unsupported(f"layer '{op.name}': add of differently shaped tensors")
        args = []
        for i, v in enumerate(ins):
            args += [v.var] + self._rq_consts(op, i, first.channels)
        bits = op.attrs["out_bits"]
        kernel = AddKernel(first.shape(self.batch), tuple((v.dtype, v.offset) for v in ins), bits,
                           st.act_dtype, st.act_offset)
        v = PackedValue(None, st.act_dtype, first.channels, first.height, first.width, BLOCK,
                        _stored_max(0, (1 << bits) - 1, st.act_offset), st.act_offset)
        v.var = self._call(kernel, args, v.shape(self.batch), v.dtype, op.output)
        self.values[op.output] = v

    def _emit_pool(self, op):
        src = self.values[op.inputs[0]]
        if src.dtype == "int32":
            raise Unsupported(f"layer '{op.name}': pooling of a raw int32 tensor")
        a = op.attrs
        k, s, p = a["kernel"], a["stride"], a.get("padding", 0)
        ho, wo = (src.height + 2 * p - k) // s + 1, (src.width + 2 * p - k) // s + 1
        kernel = PoolKernel(op.kind, src.shape(self.batch), src.dtype, src.offset, k, s, p, a.get("out_bits", 8))
        args = [src.var]
        if op.kind == "avgpool":
            _check_bound(op.name, src.max_abs * k * k, "the window sum")
            args += [relax.const(np.asarray(op.arrays["multiplier"], np.int32).reshape(1)),
                     relax.const(np.asarray(op.arrays["shift"], np.int32).reshape(1))]
            bound = _stored_max(0, (1 << a["out_bits"]) - 1, src.offset)
        else:
            bound = src.max_abs
        v = PackedValue(None, src.dtype, src.channels, ho, wo, src.block, bound, src.offset)
        v.var = self._call(kernel, args, v.shape(self.batch), v.dtype, op.output)
        self.values[op.output] = v

    def _emit_flatten(self, op):
        src = self.values[op.inputs[0]]
        if src.dtype == "int32":
            raise Unsupported(f"layer '{op.name}': flatten of a raw int32 tensor")
        if src.flat and src.block == BLOCK:     # [N, C/16, 1, 1, 16] is already NCHW order
            self.values[op.output] = src
            return
        feat = src.channels * src.height * src.width
        kernel = FlattenKernel((self.batch, src.channels, src.height, src.width), src.dtype, src.block, src.offset)
        v = PackedValue(None, src.dtype, feat, 1, 1, BLOCK, src.max_abs, src.offset)
        v.var = self._call(kernel, [src.var], v.shape(self.batch), v.dtype, op.output)
        self.values[op.output] = v

    def _emit_output(self):
        g = self.graph
        v = self.values[g.output]
        t = g.tensors[g.output]
        flat = len(t.shape) == 1
        shape = (self.batch, v.channels) if flat else (self.batch, v.channels, v.height, v.width)
        kernel = UnpackOutputKernel((self.batch, v.channels, v.height, v.width), v.dtype, v.block, flat,
                                    t.dtype, v.offset)
        return self._call(kernel, [v.var], shape, t.dtype, "output")


def lower_graph(graph: G.IntGraph, batch: int, strategy: Strategy, target, database=None):
    """(IRModule, report) for the packed fast path; raises Unsupported outside it."""
    lowering = PackedLowering(graph, batch, strategy, target, database)
    mod = lowering.build()
    report = {"strategy": strategy.name, "kernels": len(lowering.kernels),
              "tuned_kernels": sum(1 for h in lowering.schedules.values() if h == "tuned")}
    return mod, report


def tunable_kernels(graph: G.IntGraph, batch: int, strategy: Strategy, target) -> dict:
    """{conv kernel: calls x MACs} for the graph: what `--tune` spends its trials on."""
    lowering = PackedLowering(graph, batch, strategy, target)
    lowering.build()
    return {k: n * k.macs for k, n in lowering.uses.items() if is_tunable(k)}


@tvm.transform.module_pass(opt_level=0, name="MarkSingleBufferFuncsNoAlias")
def mark_single_buffer_funcs_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Works around TVM 0.27's LLVM codegen letting the last PrimFunc of a module decide
    whether *every* function is compiled with `tirx.noalias`: with a symbolic batch, Relax adds
    a `shape_func` (no noalias, sorted after our kernels) and the kernels run ~4x slower
    (measured). A function with one buffer parameter cannot alias, so marking it is exact."""
    updated = {gv: f.with_attr("tirx.noalias", True) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and not f.attrs.get("tirx.noalias", False)
               and len(f.params) <= 1}
    for gv, f in updated.items():
        mod[gv] = f
    return mod


def relax_pipeline():
    """Relax build without the fusion passes (every kernel is already scheduled)."""
    return tvm.transform.Sequential([relax.get_pipeline("default_build"), mark_single_buffer_funcs_noalias])


def compile_module(mod: tvm.IRModule, target) -> relax.VMExecutable:
    with target:
        return tvm.compile(mod, target, relax_pipeline=relax_pipeline())


def strategy_for(target) -> Strategy | None:
    """The fast-path strategy the target's CPU features allow (None: none does)."""
    from mixq.compile import arm, x86
    try:
        return (arm if arm.is_aarch64(target) else x86).strategy_for(target)
    except Unsupported:
        return None


def lower_fast(graph: G.IntGraph, target, batch: int | None = None, tune_trials: int = 0, tune_db=None,
               tune_board: str | None = None, log=print):
    """`mixq compile`'s fast path: (IRModule, info), or None when the target or the graph is
    outside it (the reason is logged). batch None: the program takes any batch; an int fixes
    it. With tune_trials, MetaSchedule first tunes the conv kernels (at `batch`, or 1) into
    `tune_db`, on `tune_board` over RPC when given; records already in `tune_db` are used
    either way."""
    import time

    from mixq.compile import tune
    strategy = strategy_for(target)
    if strategy is None:
        log("fast path: the target has no int8 dot-product strategy (x86 AVX512-VNNI/AVX2, aarch64 "
            "NEON); default lowering")
        return None
    tuned_batch = batch or 1
    try:
        kernels = tunable_kernels(graph, tuned_batch, strategy, target)
    except Unsupported as e:
        log(f"fast path: not used ({e}); default lowering")
        return None
    info = {"strategy": strategy.name, "batch": batch}
    if tune_trials:
        if tune_db is None:
            raise tune.TuneError("--tune needs --tune-db DIR (where the tuning records go)")
        runner = tune.board_runner(tune_board) if tune_board else None
        t0 = time.time()
        tune.tune_kernels(kernels, target, tune_trials, tune_db, runner=runner)
        info.update(tune_trials=tune_trials, tune_seconds=round(time.time() - t0, 1))
    database = tune.open_database(tune_db) if tune_db else None
    lowering = PackedLowering(graph, batch, strategy, target, database, tuned_batch)
    mod = lowering.build()
    info.update(kernels=len(lowering.kernels), tuned_for_batch=tuned_batch if database else None,
                tuned_kernels=sum(1 for h in lowering.schedules.values() if h == "tuned"),
                tune_db=str(tune_db) if tune_db else None)
    return mod, info
