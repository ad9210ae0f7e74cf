"""The packed int8 kernels of the fast path: TE definitions and hand TIR schedules, no graphs.

Every kernel is a frozen dataclass of its shapes and options with two methods: `tensors()`
(the TE computation: placeholders then the output) and `schedule(sch)` (the hand schedule);
`prim_func(kernel)` is its unscheduled PrimFunc (the workload MetaSchedule keys its records
by) and `scheduled(kernel, ...)` the PrimFunc that goes into a module, with a tuning record's
schedule when the database has one. The graph lowering that emits them is compile/packed.py.

Tensors are packed [N, C/b, H, W, b] with b = 16 channels per block (4 for the network's input
when it has few channels, e.g. RGB or gray), 8-bit, or int32 for a raw conv output:

    PackInputKernel      NCHW int8/uint8 -> packed 8-bit (stored = value + offset)
    ConvKernel           8-bit x int8 -> int32 accumulators, `lanes` output x 4 input channels
                         per dot-product instruction (a TensorIR intrinsic, `PackedISA.intrin`);
                         the epilogue (bias, int64 requantization, ReLU or symmetric clip, a
                         residual add's other branches) is fused. Linear layers are 1x1 convs
                         on a 1x1 image; a grouped conv reads a window of input chunks per
                         output chunk.
    DepthwiseKernel      depthwise conv: 8-bit x int16 -> int32, 16 channels per vector (no
                         reduction over channels), or with `four_taps` 4 taps of a kernel row
                         per dot-product instruction (x86 with VBMI); the same epilogue
    AddKernel / PoolKernel / FlattenKernel / UnpackOutputKernel    small kernels

Weights are packed at compile time (NumPy, `pack_conv_weight`) into [O/16 * P, C/b, K, K,
b/4, 16, 4]. Everything stays exact; the tricks that keep it so:
- Stored values carry an offset (stored = value + offset) so that the instruction's operand
  types fit: x86 (u8 x s8) stores unsigned activations as they are and signed values (the
  network input, out_signed activations) as x + 128; aarch64 (sdot, s8 x s8) stores unsigned
  activations as a - 128 and signed values as they are (`PackedISA.out_offset`). A conv's
  caller subtracts offset * sum(w) from its bias, the conv pads with the stored zero
  (= offset), and every other kernel subtracts the offset, so a tensor's consumers take any
  offset: an add's inputs or a fused add's branches may each have their own.
- 9-bit weights (CSQ kept all 8 bits, |w| <= 255, int16 arrays) are split into two int8
  parts, w = 2 * (w >> 1) + (w & 1); the epilogue combines the two accumulators.
- Channel counts are padded to 16 with zero weights, zero bias and zero multiplier.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx, topi
from tvm.s_tir import Schedule

from mixq.compile.registry import Unsupported

BLOCK = 16                       # channels per packed block


@dataclass(frozen=True)
class PackedISA:
    """The int8 dot-product instructions a target runs the packed kernels with (compile/x86.py,
    compile/arm.py define them and pick one from the target's CPU features)."""
    name: str                    # "x86-vnni", "x86-avx2", "arm-sdot", "arm-neon"
    intrin: str | None           # TensorIR intrinsic for a (lanes x 4) int8 dot product, or
                                 # None: LLVM vectorizes exact int32 multiply-adds instead
    lanes: int                   # output channels per intrinsic call
    act_dtype: str               # storage of 8-bit activations: "uint8" or "int8"
    act_offset: int              # stored activation = value + act_offset
    input_offsets: tuple         # ((graph input dtype, offset), ...)
    accumulators: int = 16       # vector accumulators a conv tile aims for (hand schedule)
    vector_bits: int = 128       # SIMD register width (bits) and count of the target:
    vector_registers: int = 32   # what a depthwise tile's accumulators must fit in
    depthwise_intrin: str | None = None     # TensorIR intrinsic for a depthwise conv's 4 taps
                                 # x 16 channels per dot product (`DepthwiseKernel.four_taps`)

    def input_offset(self, dtype: str) -> int:
        return dict(self.input_offsets)[dtype]

    def out_offset(self, signed: bool) -> int:
        """The offset of a kernel's 8-bit output: an unsigned activation's, or for a signed
        one (out_signed) the signed network input's, so that it is stored as the input is."""
        return self.input_offset("int8") if signed else self.act_offset


# ----------------------------------------------------------------------------- helpers
def _dims(shape):
    """A kernel's shape with batch None (the symbolic batch) as a TIR variable."""
    return tuple(te.var("n", "int64") if d is None else d for d in shape)


def chunks(channels: int, block: int = BLOCK) -> int:
    return -(-channels // block)


def _i64(v):
    return v.astype("int64")


def _rq(x64, mult, shift):
    """(x * M + 2^(s-1)) >> s in int64, as mixq.graph.rq."""
    s = _i64(shift)
    return (x64 * _i64(mult) + (tirx.const(1, "int64") << (s - 1))) >> s


def _store(y64, bits: int, dtype: str, offset: int, signed: bool = False):
    """clip(y, 0, 2^bits - 1), or signed clip(y, -(2^(bits-1) - 1), 2^(bits-1) - 1) (graph.out_range),
    + offset in the storage dtype."""
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    y = te.max(te.min(y64, tirx.const(hi, "int64")), tirx.const(-hi if signed else 0, "int64"))
    return (y + offset).astype(dtype) if offset else y.astype(dtype)


def _value(x, offset: int):
    """Stored tensor element -> its int64 value."""
    return _i64(x) - offset if offset else _i64(x)


def channel_blocks(values, channels: int, fill=0, dtype="int32") -> np.ndarray:
    """Per-channel vector -> [C/16, 16], padded channels set to `fill`."""
    v = np.full(chunks(channels) * BLOCK, fill, dtype=np.int64)
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
    oc, ic = chunks(o), chunks(c, in_block)
    out = np.zeros((oc * BLOCK, len(parts), ic * in_block, kh, kw), dtype=np.int8)
    for p, part in enumerate(parts):
        out[:o, p, :c] = part
    out = out.reshape(oc, BLOCK, len(parts), ic, in_block // 4, 4, kh, kw)
    out = out.transpose(0, 2, 3, 6, 7, 4, 1, 5)          # oc, p, ic, kh, kw, icf, ob, ics
    return np.ascontiguousarray(out.reshape(oc * len(parts), *out.shape[2:]))


def group_window(channels: int, out_channels: int, groups: int, in_block: int) -> tuple:
    """(width, per, step): the data chunks a grouped conv's output chunk oc reduces over,
    start(oc) = oc // per * step and `width` chunks on, the fewest that cover every output
    channel's group for some (per, step); (all data chunks, out chunks, 0) when only the
    whole input does (the conv is then a dense one with block-diagonal weights)."""
    cg, og = channels // groups, out_channels // groups
    data_chunks, out_chunks = chunks(channels, in_block), chunks(out_channels)
    first, last = [], []
    for oc in range(out_chunks):
        lo, hi = oc * BLOCK, min(oc * BLOCK + BLOCK, out_channels) - 1
        first.append(lo // og * cg // in_block)
        last.append(((hi // og + 1) * cg - 1) // in_block)
    best = (data_chunks, out_chunks, 0)
    for per in range(1, out_chunks):
        step = first[per]
        starts = [oc // per * step for oc in range(out_chunks)]
        width = max(b - a + 1 for a, b in zip(starts, last))
        if all(a <= f for a, f in zip(starts, first)) and max(starts) + width <= data_chunks \
                and width < best[0]:
            best = (width, per, step)
    return best


def pack_grouped_weight(w: np.ndarray, groups: int, in_block: int, window: tuple) -> np.ndarray:
    """[O, C/groups, K, K] integers of a grouped conv -> `pack_conv_weight` of the dense
    [O, width * in_block, K, K] weights its output chunks see through their window (zero for
    the window's channels outside the output channel's group)."""
    width, per, step = window
    o, cg, kh, kw = w.shape
    og = o // groups
    dense = np.zeros((o, width * in_block, kh, kw), dtype=np.int64)
    for ch in range(o):
        col = (ch // og) * cg - (ch // BLOCK) // per * step * in_block
        dense[ch, col:col + cg] = w[ch]
    return pack_conv_weight(dense, in_block)


def pack_depthwise_weight(w: np.ndarray, four_taps: bool = False) -> np.ndarray:
    """[C, 1, K, K] integers (any storage bits up to 16) -> int16 [C/16, K, K, 16], zero padded;
    `four_taps` (int8 weights, K <= 4): int8 [C/16, K, 16, 4], a row's taps per channel, the
    taps past K zero."""
    c, _, kh, kw = w.shape
    if four_taps:
        out = np.zeros((chunks(c) * BLOCK, kh, 4), dtype=np.int8)
        out[:c, :, :kw] = w[:, 0]
        return np.ascontiguousarray(out.reshape(-1, BLOCK, kh, 4).transpose(0, 2, 1, 3))
    out = np.zeros((chunks(c) * BLOCK, kh, kw), dtype=np.int16)
    out[:c] = w[:, 0]
    return np.ascontiguousarray(out.reshape(-1, BLOCK, kh, kw).transpose(0, 2, 3, 1))


def four_taps_fit(w: np.ndarray, in_dtype: str, isa: PackedISA) -> bool:
    """Whether a depthwise conv with integer weights `w` [C, 1, K, K] of an `in_dtype` input
    takes `isa`'s 4-tap intrinsic: one there, uint8 activations, K <= 4, int8 weights."""
    return (isa.depthwise_intrin is not None and in_dtype == "uint8" and w.shape[-1] <= 4
            and int(np.abs(w).max(initial=0)) <= 127)


def _epilogue(kernel, n, ho, wo, acc, bias):
    """A conv kernel's fused epilogue on its int32 accumulator `acc(i, oc, oh, ow, ob)` and its
    `bias` placeholder (`kernel.bias_tensor()`): (its other placeholders, the output). out
    "raw": acc + bias, int32; "requant": clip(rq(acc + bias, M, s) + sum_j rq(extra_j, M_j, s_j))
    + offset in the ISA's activation dtype (extras: the other branches of a fused residual add,
    `kernel.extras` = their (dtype, offset); the clip and offset: `out_signed`'s,
    `PackedISA.out_offset`), with the bias folded at lowering (`folds_bias`): rq(acc + bias)
    = (acc * M + bias * M + 2^(s-1)) >> s (exact: |(acc + bias) * M| < 2^62)."""
    pc = (kernel.out_chunks, BLOCK)
    args = []
    if kernel.out == "requant":
        mult = te.placeholder(pc, "int32", name="mult")
        shift = te.placeholder(pc, "int32", name="shift")
        args += [mult, shift]
    extras = []
    for j, (dtype, offset) in enumerate(kernel.extras):
        extras.append((te.placeholder((n, kernel.out_chunks, ho, wo, BLOCK), dtype, name=f"extra{j}"),
                       te.placeholder(pc, "int32", name=f"mult{j}"),
                       te.placeholder(pc, "int32", name=f"shift{j}"), offset))
        args += list(extras[-1][:3])

    def epilogue(i, oc, oh, ow, ob):
        a = acc(i, oc, oh, ow, ob)
        if kernel.out == "raw":
            return a + bias[oc, ob]
        y = (_i64(a) * _i64(mult[oc, ob]) + bias[oc, ob]) >> _i64(shift[oc, ob])
        for x, m, sh, offset in extras:
            y = y + _rq(_value(x[i, oc, oh, ow, ob], offset), m[oc, ob], sh[oc, ob])
        return _store(y, kernel.out_bits, kernel.isa.act_dtype, kernel.isa.out_offset(kernel.out_signed),
                      kernel.out_signed)

    return args, te.compute((n, kernel.out_chunks, ho, wo, BLOCK), epilogue, name="epilogue")


# ----------------------------------------------------------------------------- kernels
class _SlidingWindow:
    """What the conv kernels share: the output size (fields height, width, kernel, stride,
    padding) and the bias they take (fields out, out_chunks)."""

    @property
    def out_hw(self):
        f = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1
        return f(self.height), f(self.width)

    @property
    def folds_bias(self) -> bool:
        """out "requant": `bias` is int64 bias * M + 2^(s-1), folded at lowering, so the
        epilogue multiplies the int32 accumulator itself: LLVM makes that a 32x32->64 vpmuldq
        (or smull), where acc + bias sign-extended to int64 took a 64x64 vpmullq and two more
        adds per 16 lanes; out "raw": int32, added to the accumulator."""
        return self.out == "requant"

    def bias_tensor(self):
        return te.placeholder((self.out_chunks, BLOCK), "int64" if self.folds_bias else "int32", name="bias")


@dataclass(frozen=True)
class ConvKernel(_SlidingWindow):
    """Packed conv2d: [N, C/b, H, W, b] 8-bit x packed weights -> [N, O/16, Ho, Wo, 16].

    out "requant": clip(rq(acc + bias, M, s) + sum_j rq(extra_j, M_j, s_j)) + offset, the clip
                   0..2^bits - 1, or +-(2^(bits-1) - 1) with out_signed (`PackedISA.out_offset`);
    out "raw":     acc + bias as int32 (feeds a residual add that is not fused here).
    `acc` sums stored inputs; the lowering folds the input offset into the bias.

    Grouped convs (`window`): output chunk oc reduces over `in_chunks` data chunks from
    start(oc) = oc // per * step on (`pack_grouped_weight`: zero weights for the channels of
    the window outside the output channel's group)."""
    tunable = True          # class attribute (not a field): MetaSchedule tunes these
    isa: PackedISA
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
    window: tuple = ()      # grouped: (data chunks, per, step); (): dense, all in_chunks
    out_signed: bool = False    # requant: symmetric clip, stored with the signed offset

    @property
    def macs(self) -> int:
        ho, wo = self.out_hw
        return ((self.batch or 1) * self.out_chunks * BLOCK * ho * wo * self.in_chunks * self.in_block
                * self.kernel ** 2 * self.parts)

    def tensors(self):
        (n,), b, k, s, p = _dims((self.batch,)), self.in_block, self.kernel, self.stride, self.padding
        ho, wo = self.out_hw
        data_chunks = self.window[0] if self.window else self.in_chunks
        data = te.placeholder((n, data_chunks, self.height, self.width, b), self.in_dtype, name="data")
        weight = te.placeholder((self.out_chunks * self.parts, self.in_chunks, k, k, b // 4, BLOCK, 4),
                                "int8", name="weight")
        bias = self.bias_tensor()
        if p:
            pad = topi.nn.pad(data, (0, 0, p, p, 0), (0, 0, p, p, 0), pad_value=self.pad_value, name="pad")
        else:
            pad = data
        if self.window:         # grouped: output chunk oc reads data chunks start(oc) + ico
            _, per, step = self.window
            chunk = lambda oc, ico: oc // (self.parts * per) * step + ico
        else:
            chunk = lambda oc, ico: ico
        ico = te.reduce_axis((0, self.in_chunks), "ico")
        kh = te.reduce_axis((0, k), "kh")
        kw = te.reduce_axis((0, k), "kw")
        icf = te.reduce_axis((0, b // 4), "icf")
        ics = te.reduce_axis((0, 4), "ics")
        acc = te.compute(
            (n, self.out_chunks * self.parts, ho, wo, BLOCK),
            lambda i, oc, oh, ow, ob: te.sum(
                pad[i, chunk(oc, ico), oh * s + kh, ow * s + kw, icf * 4 + ics].astype("int32")
                * weight[oc, ico, kh, kw, icf, ob, ics].astype("int32"),
                axis=[ico, kh, kw, icf, ics]),
            name="conv")

        def total(i, oc, oh, ow, ob):
            # int32 is enough (bounds checked at lowering) and lets LLVM multiply 32x32->64
            a = acc[i, oc * self.parts, oh, ow, ob]
            for part in range(1, self.parts):
                a = a * 2 + acc[i, oc * self.parts + part, oh, ow, ob]
            return a

        args, out = _epilogue(self, n, ho, wo, total, bias)
        return [data, weight, bias] + args + [out]

    # -- schedule ---------------------------------------------------------------------
    ORDERS = ("ic-outer", "k-outer")        # reduction loop orders (design-space sketches)

    def default_tiles(self):
        """(oc_inner, oh_inner, ow_inner): output-channel chunks, rows and columns computed per
        register tile, about `isa.accumulators` vector accumulators: enough independent
        dot products to hide their latency, few enough to stay in registers. Two rows per
        tile reuse each weight vector twice as often (measured best on ResNet-20's layers)."""
        ho, wo = self.out_hw
        per_pixel = self.parts * BLOCK // self.isa.lanes      # vectors per pixel and chunk
        oh_inner = 2 if ho % 2 == 0 else 1
        oc_inner = 2 if self.out_chunks % 2 == 0 and self.parts == 1 else 1     # parts act as chunks
        room = max(1, self.isa.accumulators // (oh_inner * oc_inner * per_pixel))
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
        st = self.isa
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
class DepthwiseKernel(_SlidingWindow):
    """Packed depthwise conv2d (groups = C = O): [N, C/16, H, W, 16] 8-bit x int16 weights
    [C/16, K, K, 16] -> [N, C/16, Ho, Wo, 16], with the epilogue of `ConvKernel` (out
    "requant" | "raw", fused residual addends).

    No reduction over channels, so no dot-product instruction: each of the 16 lanes of a block
    is its own channel, acc = sum over the K*K taps of the widened stored input times the
    weight, in int32 (exact: the products fit in 8 + 16 bits, the sum is bounded at lowering;
    LLVM makes 16-bit multiply-adds of them, vpmaddwd/vpdpwssd on x86, smlal on NEON).
    Weights of any storage width up to 16 bits stay one int16 tensor (no parts).
    `four_taps` (`four_taps_fit`: int8 weights, K <= 4, an ISA with `depthwise_intrin`): the
    taps of a kernel row go 4 to a dot product, acc += sum_q x[ow*s + q] * w[q] over q < 4
    with w[q] = 0 for q >= K (the padded input gets the columns that reads past the last
    output's window, the stored zero). x86: 4 pixels x 16 channels are 64 contiguous bytes,
    vpermb makes them 16 lanes of 4 taps, vpdpbusd multiplies them by the row's weights: 3
    dot products per output vector of a 3x3 conv instead of 9 multiply-adds (measured on
    MobileNetV2's 3x3 layers, AMD EPYC, 1 thread: 23-25 % less time per kernel, bit-exact).
    With out "requant" the `bias` argument is int64, bias * M + 2^(s-1) folded at lowering
    (`folds_bias`): rq(acc + bias) = (acc * M + that) >> s, a 32x32->64 multiply per element
    instead of a 64x64 one (the epilogue is a large share of a depthwise conv's work).
    Measured and not taken: an int32 epilogue from the product's high word (exact for
    33 <= s <= 62: ((t * M >> 32) + 2^(s-33)) >> (s-32)), two vpmuldq per 16 lanes in a tensor
    intrinsic, then int32 add, shift, clip: fewer instructions per vector, but MobileNetV2
    (CIFAR-10, batch 1, AMD EPYC) ran 3-11 % slower, the intrinsic's output going through a
    tile buffer; LLVM alone does not form a 16-lane multiply-high (it widens to int64)."""
    tunable = True
    isa: PackedISA
    batch: int | None
    in_dtype: str
    out_chunks: int         # = input chunks
    height: int
    width: int
    kernel: int
    stride: int
    padding: int
    pad_value: int          # the stored zero of the input (its offset)
    out: str                # "requant" | "raw"
    out_bits: int
    extras: tuple = ()      # (dtype, offset) of fused residual addends
    out_signed: bool = False    # requant: symmetric clip, stored with the signed offset
    four_taps: bool = False     # int8 weights [C/16, K, 16, 4], isa.depthwise_intrin

    @property
    def pad_right(self) -> int:
        """Columns padded on the right: `padding`, or with four_taps as many as the last
        output's 4 taps read."""
        if not self.four_taps:
            return self.padding
        return max(self.padding, (self.out_hw[1] - 1) * self.stride + 4 - self.width - self.padding)

    @property
    def macs(self) -> int:
        ho, wo = self.out_hw
        return (self.batch or 1) * self.out_chunks * BLOCK * ho * wo * self.kernel ** 2

    def tensors(self):
        (n,), k, s, p = _dims((self.batch,)), self.kernel, self.stride, self.padding
        ho, wo = self.out_hw
        data = te.placeholder((n, self.out_chunks, self.height, self.width, BLOCK), self.in_dtype, name="data")
        if self.four_taps:
            weight = te.placeholder((self.out_chunks, k, BLOCK, 4), "int8", name="weight")
        else:
            weight = te.placeholder((self.out_chunks, k, k, BLOCK), "int16", name="weight")
        bias = self.bias_tensor()
        if self.pad_right:      # >= padding
            pad = topi.nn.pad(data, (0, 0, p, p, 0), (0, 0, p, self.pad_right, 0), pad_value=self.pad_value,
                              name="pad")
        else:
            pad = data
        kh = te.reduce_axis((0, k), "kh")
        if self.four_taps:
            kq = te.reduce_axis((0, 4), "kq")
            tap = lambda i, c, oh, ow, b: (pad[i, c, oh * s + kh, ow * s + kq, b].astype("int32")
                                           * weight[c, kh, b, kq].astype("int32"))
            axes = [kh, kq]
        else:
            kw = te.reduce_axis((0, k), "kw")
            tap = lambda i, c, oh, ow, b: (pad[i, c, oh * s + kh, ow * s + kw, b].astype("int32")
                                           * weight[c, kh, kw, b].astype("int32"))
            axes = [kh, kw]
        acc = te.compute((n, self.out_chunks, ho, wo, BLOCK),
                         lambda *idx: te.sum(tap(*idx), axis=axes), name="conv")
        args, out = _epilogue(self, n, ho, wo, lambda *idx: acc[idx], bias)
        return [data, weight, bias] + args + [out]

    # -- schedule ---------------------------------------------------------------------
    BAND_ROWS = 8           # output rows per parallel task (at most)

    def default_tiles(self):
        """(band, oh_inner, ow_inner): output rows per parallel task (the largest divisor of
        the output height up to BAND_ROWS: its padded input rows are copied once, (band - 1)
        * stride + K of them), and rows and columns per register tile, 16 int32 lanes each, in
        half the target's vector registers (the rest: inputs, weights)."""
        ho, wo = self.out_hw
        per_pixel = max(1, BLOCK * 32 // self.isa.vector_bits)     # registers per 16 int32 lanes
        room = max(1, self.isa.vector_registers // 2 // per_pixel)
        ow_inner = max(d for d in range(1, min(wo, room) + 1) if wo % d == 0)
        band = max(d for d in range(1, min(ho, self.BAND_ROWS) + 1) if ho % d == 0)
        return band, 1, ow_inner

    def design_space(self, sch: Schedule) -> list:
        """MetaSchedule's search space: the hand schedule with its tile sizes sampled."""
        s = sch.copy()
        self.schedule(s, tiles="sample")
        return [s]

    def schedule(self, sch: Schedule, tiles=None):
        """The hand schedule (tiles=None: `default_tiles`; "sample": MetaSchedule decisions).

        One parallel task per channel chunk and band of output rows (images inside it): it
        pads the input rows the band needs into a small thread-local buffer, then walks the
        band's row and column tiles; a tile keeps oh_inner x ow_inner 16-lane int32
        accumulators over the K*K taps (each tap's weight vector loaded once per tile), then
        the fused epilogue writes them."""
        conv = sch.get_sblock("conv")
        n, c, oh, ow, b, kh, kw = sch.get_loops(conv)        # kw: the 4 taps (kq) with four_taps
        if tiles == "sample":
            ohb, ohm, ohi = sch.split(oh, sch.sample_perfect_tile(oh, n=3, max_innermost_factor=2))
            owo, owi = sch.split(ow, sch.sample_perfect_tile(ow, n=2, max_innermost_factor=16))
        else:
            band, oh_inner, ow_inner = tiles or self.default_tiles()
            ohb, ohm, ohi = sch.split(oh, [None, band // oh_inner, oh_inner])
            owo, owi = sch.split(ow, [None, ow_inner])
        if self.four_taps:
            sch.reorder(c, ohb, n, ohm, owo, kh, ohi, owi, b, kw)
        else:
            sch.reorder(c, ohb, n, ohm, owo, kh, kw, ohi, owi, b)
        sch.reverse_compute_at(sch.get_sblock("epilogue"), owo, preserve_unit_loops=True)
        task = sch.fuse(c, ohb)
        ho, wo = self.out_hw
        if _worth_threads((self.batch, self.out_chunks, ho, wo, BLOCK * self.kernel ** 2)):
            sch.parallel(task)
        if self.pad_right:      # >= padding: the kernel has a pad stage
            pad = sch.get_sblock("pad")
            sch.compute_at(pad, n, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(pad)[-1])
        if not self.four_taps:
            sch.vectorize(b)
        init = sch.decompose_reduction(conv, kh)
        if self.four_taps:
            sch.tensorize(b, self.isa.depthwise_intrin)
        for loop in (owi, ohi):
            sch.unroll(loop)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(sch.get_sblock("epilogue"))[-1])
        return sch


@dataclass(frozen=True)
class PackInputKernel:
    """NCHW -> packed, stored = x + offset (padded channels hold the stored zero): the network
    input, or a tensor another lowering made (int32 ones with offset 0)."""
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
        out = te.compute((n, chunks(c, self.block), h, w, self.block), f, name="pack")
        return [x, out]

    def schedule(self, sch, tiles=None):
        _schedule_elementwise(sch, sch.get_sblock("pack"))
        return sch


@dataclass(frozen=True)
class UnpackOutputKernel:
    """Packed [N, C/b, H, W, b] -> NCHW (or NC when flat) values in the graph's dtype: the
    network output, or a tensor another lowering takes."""
    shape: tuple            # N, C, H, W of the real tensor
    dtype: str              # stored dtype
    block: int
    flat: bool
    out_dtype: str
    offset: int

    def tensors(self):
        n, c, h, w = _dims(self.shape)
        x = te.placeholder((n, chunks(c, self.block), h, w, self.block), self.dtype, name="x")
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
        x = te.placeholder((n, chunks(c, self.block), h, w, self.block), self.dtype, name="x")

        def f(i, fc, y, z, fb):
            flat = te.min(fc * BLOCK + fb, feat - 1)
            ch, r = flat // (h * w), flat % (h * w)
            v = x[i, ch // self.block, r // w, r % w, ch % self.block]
            return te.if_then_else(fc * BLOCK + fb < feat, v, tirx.const(self.pad_value, self.dtype))
        out = te.compute((n, chunks(feat), 1, 1, BLOCK), f, name="flatten")
        return [x, out]

    def schedule(self, sch, tiles=None):
        return sch


@dataclass(frozen=True)
class AddKernel:
    """y = clip(sum_i rq(x_i, M_i, s_i), 0, 2^bits - 1) on packed tensors (out_signed: clip to
    +-(2^(bits-1) - 1)); each input has its own offset, the output `out_offset`."""
    shape: tuple            # packed shape
    inputs: tuple           # (dtype, offset) per input
    out_bits: int
    out_dtype: str
    out_offset: int
    out_signed: bool = False

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
            return _store(total, self.out_bits, self.out_dtype, self.out_offset, self.out_signed)
        out = te.compute(shape, f, name="add")
        return [t for group in ins for t in group[:3]] + [out]

    def schedule(self, sch, tiles=None):
        _schedule_elementwise(sch, sch.get_sblock("add"))
        return sch


@dataclass(frozen=True)
class PoolKernel:
    """avgpool (window sum, rq, clip) or maxpool on packed 8-bit tensors, zero padding (the
    stored zero). A maxpool's output is stored as its input (max commutes with the offset);
    an avgpool's is an activation of its own, unsigned or signed (`out_signed`), stored with
    `out_offset` (the input's offset need not be the output's: x86 stores int8 values as
    x + 128, uint8 ones as they are)."""
    kind: str               # avgpool | maxpool
    shape: tuple            # packed input shape
    dtype: str              # storage of input and output
    offset: int             # stored = value + offset, the input (and a maxpool's output)
    kernel: int
    stride: int
    padding: int
    out_bits: int
    out_offset: int         # avgpool: the output's offset
    out_signed: bool = False    # avgpool: symmetric clip (graph.out_range)

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
                                                          self.out_bits, self.dtype, self.out_offset,
                                                          self.out_signed),
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

