"""Random integer graphs for fuzzing the compiled programs against the golden interpreter.

`random_graph(seed)` builds a small network that exercises every op kind and the corners of
the contract: int8 (signed) or uint8 inputs of 1-8 bits, weights of 1-9 storage bits whose
values use a random, non-contiguous set of bit positions (e.g. {3, 0}: 0, ±1, ±8, ±9),
activations of 1-8 bits, per-channel or single multipliers (some negative) and shifts,
grouped convs, strides and paddings, table lookups (`lut`, on the input or later), residual
blocks (an add of a raw int32 conv branch and a uint8 or int8 branch, or of two raw branches),
maxpool (also straight on a signed input, where the contract's zero padding differs from -inf
padding), avgpool, flatten and linear. About one requantized conv, linear, add or avgpool in SIGNED_SHARE
has a signed output (out_signed, int8: a linear bottleneck's), drawn from a stream of its own, so
a seed's graph has the same structure and draws as without signed outputs (only the values that
depend on a tensor's range differ).
Every graph passes `mixq.graph.validate` (so `value_bounds`' int32 overflow proof).
"""
from __future__ import annotations

import numpy as np

from mixq import graph as G

SIGNED_SHARE = 0.3



class _Builder:
    def __init__(self, rng: np.random.Generator, signed_rng: np.random.Generator | None = None):
        self.rng = rng
        self.signed_rng = signed_rng    # whether an output is signed (None: never)
        self.ops, self.tensors = [], {}
        self.spread = {}            # raw int32 tensor -> typical |value| (to scale adds)
        self.bound = {}             # raw int32 tensor -> max |value| (keeps adds inside int32)
        self.count = 0

    def tensor(self, name, shape, dtype, bits, scale=1.0):
        t = G.TensorInfo(name, tuple(int(s) for s in shape), dtype, bits, scale)
        self.tensors[name] = t
        return t

    def emit(self, kind, inputs, shape, dtype, bits, attrs, arrays):
        self.count += 1
        name = f"{kind}{self.count}"
        scale = [1.0] * shape[0] if dtype == "int32" else 1.0
        self.tensor(name, shape, dtype, bits, scale)
        self.ops.append(G.Op(name, kind, [t.name for t in inputs], name, attrs, arrays))
        return self.tensors[name]

    # ------------------------------------------------------------------ values
    def max_abs(self, t: G.TensorInfo) -> int:
        return (1 << t.bits) - 1 if t.dtype == "uint8" else (1 << (t.bits - 1)) - 1

    def requantized(self, attrs: dict, out_bits: int) -> tuple:
        """(dtype, bits) of a requantized output, signed (attrs get out_signed) now and then."""
        attrs["out_bits"] = out_bits
        if self.signed_rng is not None and out_bits >= 2 and self.signed_rng.random() < SIGNED_SHARE:
            attrs["out_signed"] = True
            return "int8", out_bits
        return "uint8", out_bits

    def weights(self, shape, storage_bits: int) -> np.ndarray:
        """Signed weights whose magnitudes use a random subset of bit positions below
        storage_bits - 1 (the sign takes one storage bit)."""
        mag_bits = storage_bits - 1
        if mag_bits == 0:
            return np.zeros(shape, dtype=np.int8)
        kept = self.rng.choice(mag_bits, size=self.rng.integers(1, mag_bits + 1), replace=False)
        pick = self.rng.integers(0, 2, size=(*shape, len(kept)))
        mags = (pick << np.asarray(kept)).sum(axis=-1)
        signs = self.rng.choice([-1, 1], size=shape)
        return (mags * signs).astype(G.container_dtype(storage_bits))

    def requant(self, channels: int, acc_spread: float, out_bits: int, allow_negative=False,
                cap: float = 1.0, dead_channel=True):
        """(M, s): a multiplier that maps a typical accumulator onto the output range, with
        random per-channel jitter; sometimes one value for all channels."""
        per_channel = self.rng.random() < 0.7
        k = channels if per_channel else 1
        real = np.minimum((1 << out_bits) / max(acc_spread, 1.0) * self.rng.uniform(0.3, 3.0, size=k), cap)
        if allow_negative:
            real *= self.rng.choice([-1.0, 1.0], size=k, p=[0.25, 0.75])
        if dead_channel and self.rng.random() < 0.1:
            real[0] = 0.0                               # a dead channel: M = 0, s = 1
        return G.quantize_multiplier(real)

    # ------------------------------------------------------------------ layers
    def conv(self, x: G.TensorInfo, out_ch: int, k: int, stride: int, padding: int, groups=1,
             raw=False, storage_bits=None):
        sb = storage_bits or int(self.rng.integers(1, 10))
        w = self.weights((out_ch, x.shape[0] // groups, k, k), sb)
        fan_in = w[0].size
        spread = np.sqrt(fan_in) * max(self.max_abs(x), 1) * max(np.abs(w).mean(), 0.5) / 2
        bias = self.rng.integers(-int(spread) - 1, int(spread) + 2, size=out_ch).astype(np.int32)
        h = (x.shape[1] + 2 * padding - k) // stride + 1
        wd = (x.shape[2] + 2 * padding - k) // stride + 1
        attrs = {"stride": stride, "padding": padding, "groups": groups, "storage_bits": sb}
        arrays = {"weight": w, "bias": bias}
        if raw:
            out = self.emit("conv2d", [x], (out_ch, h, wd), "int32", 32, attrs, arrays)
            l1 = np.abs(w.astype(np.int64)).reshape(out_ch, -1).sum(axis=1)
            self.spread[out.name] = spread
            self.bound[out.name] = int((l1 * self.max_abs(x) + np.abs(bias.astype(np.int64))).max())
            return out
        out_bits = int(self.rng.integers(1, 9))
        m, s = self.requant(out_ch, spread, out_bits, allow_negative=self.rng.random() < 0.2)
        arrays.update(multiplier=m, shift=s)
        return self.emit("conv2d", [x], (out_ch, h, wd), *self.requantized(attrs, out_bits), attrs, arrays)

    def linear(self, x: G.TensorInfo, out_features: int, raw: bool):
        sb = int(self.rng.integers(1, 10))
        w = self.weights((out_features, x.shape[0]), sb)
        spread = np.sqrt(x.shape[0]) * max(self.max_abs(x), 1) * max(np.abs(w).mean(), 0.5) / 2
        bias = self.rng.integers(-int(spread) - 1, int(spread) + 2, size=out_features).astype(np.int32)
        attrs, arrays = {"storage_bits": sb}, {"weight": w, "bias": bias}
        if raw:
            return self.emit("linear", [x], (out_features,), "int32", 32, attrs, arrays)
        out_bits = int(self.rng.integers(1, 9))
        m, s = self.requant(out_features, spread, out_bits)
        arrays.update(multiplier=m, shift=s)
        return self.emit("linear", [x], (out_features,), *self.requantized(attrs, out_bits), attrs, arrays)

    def add(self, xs: list):
        out_bits = int(self.rng.integers(1, 9))
        channels = xs[0].shape[0]
        arrays = {}
        for i, x in enumerate(xs):
            spread = self.max_abs(x) if x.dtype != "int32" else self.spread[x.name]
            bound = self.max_abs(x) if x.dtype != "int32" else self.bound[x.name]
            # value_bounds pairs the largest M with the smallest shift: stay well inside int32
            m, s = self.requant(channels, spread * len(xs), out_bits, allow_negative=True,
                                cap=2.0 ** 28 / (max(bound, 1) * len(xs)),
                                # (M=0, s=1) would pair with another channel's M in value_bounds
                                dead_channel=False)
            arrays[f"multiplier{i}"], arrays[f"shift{i}"] = m, s
        attrs = {}
        return self.emit("add", xs, xs[0].shape, *self.requantized(attrs, out_bits), attrs, arrays)

    def residual(self, x: G.TensorInfo):
        """conv -> conv(raw) + shortcut: the identity (uint8 or int8) or a 1x1 raw conv."""
        c = x.shape[0]
        k = int(self.rng.choice([1, 3]))
        a = self.conv(x, c, k, 1, k // 2)
        b = self.conv(a, c, k, 1, k // 2, raw=True)
        if x.dtype != "int32" and self.rng.random() < 0.6:
            return self.add([b, x])
        shortcut = self.conv(x, c, 1, 1, 0, raw=True)
        return self.add([shortcut, b] if self.rng.random() < 0.5 else [b, shortcut])

    def concat(self, x: G.TensorInfo, rng):
        """An Inception-like block: x itself, a 1x1 and a 3x3 conv of it, joined along channels
        (each part requantized to one output scale; signed output now and then), drawn from `rng`."""
        main, self.rng = self.rng, rng
        try:
            parts = [x, self.conv(x, int(rng.choice([2, 4])), 1, 1, 0), self.conv(x, 4, 3, 1, 1)]
            signed = bool(rng.random() < 0.3)
            out_bits = int(rng.integers(2, 9))
            arrays = {}
            for i, p in enumerate(parts):
                m, s = G.quantize_multiplier(np.array([rng.uniform(0.2, 1.5)]))
                arrays[f"multiplier{i}"], arrays[f"shift{i}"] = m, s
            attrs = {"out_bits": out_bits, **({"out_signed": True} if signed else {})}
            shape = (sum(p.shape[0] for p in parts),) + tuple(x.shape[1:])
            return self.emit("concat", parts, shape, "int8" if signed else "uint8", out_bits, attrs, arrays)
        finally:
            self.rng = main

    def lut(self, x: G.TensorInfo, rng):
        """A table lookup of `x` (an arbitrary table: every entry random in the output range,
        which is signed now and then), drawn from `rng`."""
        lo, hi = G.value_range(x)
        signed = bool(rng.random() < 0.5)
        out_bits = int(rng.integers(2, 9)) if signed else int(rng.integers(1, 9))
        out_hi = (1 << (out_bits - 1)) - 1 if signed else (1 << out_bits) - 1
        dtype = "int8" if signed else "uint8"
        table = rng.integers(-out_hi if signed else 0, out_hi + 1, size=hi - lo + 1).astype(dtype)
        attrs = {"out_bits": out_bits, **({"out_signed": True} if signed else {})}
        return self.emit("lut", [x], x.shape, dtype, out_bits, attrs, {"table": table})

    def pool(self, x: G.TensorInfo, kind: str):
        h = min(x.shape[1], x.shape[2])
        k = int(self.rng.integers(1, min(h, 3) + 1))
        s = int(self.rng.integers(1, 3))
        p = int(self.rng.integers(0, k))
        ho, wo = (x.shape[1] + 2 * p - k) // s + 1, (x.shape[2] + 2 * p - k) // s + 1
        attrs = {"kernel": k, "stride": s, "padding": p}
        if kind == "maxpool":
            return self.emit("maxpool", [x], (x.shape[0], ho, wo), x.dtype, x.bits, attrs, {})
        out_bits = int(self.rng.integers(1, 9))
        m, s_ = self.requant(x.shape[0], self.max_abs(x) * k * k / 2, out_bits)
        dtype, bits = self.requantized(attrs, out_bits)
        return self.emit("avgpool", [x], (x.shape[0], ho, wo), dtype, bits, attrs,
                         {"multiplier": m, "shift": s_})


def random_graph(seed: int) -> G.IntGraph:
    rng = np.random.default_rng(seed)
    b = _Builder(rng, np.random.default_rng([seed, 1]))
    signed = rng.random() < 0.6
    in_bits = int(rng.integers(2, 9)) if signed else int(rng.integers(1, 9))
    shape = (int(rng.integers(1, 5)), int(rng.integers(6, 13)), int(rng.integers(6, 13)))
    x = b.tensor("input", shape, "int8" if signed else "uint8", in_bits, float(rng.uniform(0.01, 0.1)))
    inp = x
    lut_rng = np.random.default_rng(seed + 104729)    # its own stream too: graphs without a lut are unchanged
    lut_at = str(lut_rng.choice(["none", "input", "late"], p=[0.7, 0.15, 0.15]))
    if rng.random() < 0.3:
        x = b.pool(x, "maxpool")                       # on the raw (maybe signed) input
    if lut_at == "input":
        x = b.lut(x, lut_rng)                          # on the network input's values (int8 or uint8)
    ch = int(rng.choice([4, 6, 8]))
    k = int(rng.choice([k for k in (1, 3, 5) if k <= min(x.shape[1:])]))
    x = b.conv(x, ch, k, int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1)))
    for _ in range(int(rng.integers(1, 3))):
        x = b.residual(x)
    if ch % 2 == 0 and rng.random() < 0.5:             # grouped conv (depthwise when groups == ch)
        groups = int(rng.choice([2, ch]))
        x = b.conv(x, ch, 3, 1, 1, groups=groups)
    cat_rng = np.random.default_rng(seed + 7919)      # its own stream: graphs without one are unchanged
    if cat_rng.random() < 0.4:
        x = b.concat(x, cat_rng)
    if lut_at == "late":
        x = b.lut(x, lut_rng)
    x = b.pool(x, str(rng.choice(["maxpool", "avgpool"])))
    if rng.random() < 0.2:                             # a raw int32 feature map as the output
        out = b.conv(x, 3, 1, 1, 0, raw=True)
    else:
        x = b.emit("flatten", [x], (int(np.prod(x.shape)),), x.dtype, x.bits, {}, {})
        if rng.random() < 0.5:
            x = b.linear(x, int(rng.integers(4, 17)), raw=False)
        out = b.linear(x, int(rng.integers(2, 11)), raw=True)
    g = G.IntGraph(f"random-{seed}", inp, out.name, b.ops, b.tensors, {"seed": seed})
    G.validate(g)
    return g


def random_input(graph: G.IntGraph, n: int, seed: int = 0) -> np.ndarray:
    """Uniform integers over the input's whole range (extremes included)."""
    rng = np.random.default_rng(seed)
    t = graph.input
    if t.dtype == "int8":
        lim = (1 << (t.bits - 1)) - 1
        return rng.integers(-lim, lim + 1, size=(n, *t.shape)).astype(np.int8)
    return rng.integers(0, 1 << t.bits, size=(n, *t.shape)).astype(np.uint8)
