"""Depthwise (and grouped) convs: the default lowering against the fast path's packed kernels.

    .venv/bin/python bench/depthwise.py [--threads 1 2] [--target host|avx2] [--grouped] [--blocks]

Layers: MobileNetV2-like depthwise convs (3x3, padding 1, stride 1 and 2, batch 1, uint8
input, requantized uint8 output), kernels only: the layer's kernel from `--strategy default`
(compile/default.py: topi's grouped conv, NCHW, the generic schedule) against the fast path's
`DepthwiseKernel` (compile/kernels.py, with `four_taps` where the target has VBMI, packed
NCHW16c in and out, as between the packed layers of a network: no layout conversion timed)
and, for comparison, the same layer as a grouped `ConvKernel` (block-diagonal int8 dot
products: 16x the multiply-adds). --grouped: grouped 3x3
convs of a few group sizes too (default kernel against the grouped `ConvKernel`; the packed
kernel does width * block / (C / groups) times the multiply-adds, see packed.MAX_GROUPED_WASTE;
the fast path uses it only with dot-product instructions: on AVX2 it lost to the default one).
--blocks: whole programs (`mixq compile`'s lowering, batch 1) of MobileNetV2 inverted
residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, the residual add when the shapes
allow; after a 1x1 conv standing for the previous block), the depthwise conv on the fast path against the depthwise conv declined by the fast
path as before it had a kernel (default lowering, with the layout conversions around it).

Every kernel and program is checked against the golden interpreter (mixq.graph.run) before it
is timed. Each thread count runs in its own process (TVM's thread pool is sized when it
starts). Time: the fastest of `--rounds` interleaved rounds of `time_evaluator` (5 repeats of
20 calls), so that on a shared machine every candidate sees the same load and the least
disturbed repeat counts. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# (name, channels, size, stride): MobileNetV2's expanded depthwise layers at 32x32 and 16x16
DEPTHWISE = [("32x32x96 s1", 96, 32, 1), ("32x32x96 s2", 96, 32, 2),
             ("16x16x144 s1", 144, 16, 1), ("16x16x144 s2", 144, 16, 2)]
# (name, channels, size, groups): grouped 3x3 convs, channels in = out
GROUPED = [("16x16x64 g2", 64, 16, 2), ("16x16x64 g4", 64, 16, 4), ("16x16x64 g8", 64, 16, 8),
           ("16x16x64 g16", 64, 16, 16), ("16x16x64 g32", 64, 16, 32)]
# (name, in channels, size, expanded channels, stride, out channels): inverted residual blocks
BLOCKS = [("32x32 16-96-16 s1", 16, 32, 96, 1, 16), ("32x32 16-96-24 s2", 16, 32, 96, 2, 24),
          ("16x16 24-144-24 s1", 24, 16, 144, 1, 24), ("16x16 24-144-32 s2", 24, 16, 144, 2, 32)]


# ----------------------------------------------------------------------------- graphs
class Net:
    """A small integer graph built op by op, with requantization that spreads the outputs
    over the uint8 range (as freeze writes them)."""

    def __init__(self, channels, size, seed=0):
        from mixq import graph as G
        self.G, self.rng = G, np.random.default_rng(seed)
        self.input = G.TensorInfo("x", (channels, size, size), "uint8", 8, 1.0)
        self.tensors, self.ops, self.max = {"x": self.input}, [], {"x": 255}

    def _tensor(self, name, shape, dtype, bits):
        self.tensors[name] = self.G.TensorInfo(name, tuple(shape), dtype, bits, 1.0)

    def conv(self, src, cout, k, stride=1, groups=1, raw=False):
        name = f"conv{len(self.ops)}"
        cin, h, _ = self.tensors[src].shape
        w = self.rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8)
        spread = np.sqrt(w[0].size) * 127 * self.max[src] / 2
        arrays = {"weight": w, "bias": self.rng.integers(-int(spread), int(spread), cout).astype(np.int32)}
        attrs = {"stride": stride, "padding": k // 2, "groups": groups, "storage_bits": 8}
        ho = (h + 2 * (k // 2) - k) // stride + 1
        if raw:
            self._tensor(name, (cout, ho, ho), "int32", 32)
            self.max[name] = int(np.abs(w.astype(np.int64)).reshape(cout, -1).sum(axis=1).max()) * self.max[src] \
                + int(np.abs(arrays["bias"]).max())
        else:
            arrays["multiplier"], arrays["shift"] = self.G.quantize_multiplier(
                256 / (2 * spread) * self.rng.uniform(0.5, 1.5, cout))
            attrs["out_bits"] = 8
            self._tensor(name, (cout, ho, ho), "uint8", 8)
            self.max[name] = 255
        self.ops.append(self.G.Op(name, "conv2d", [src], name, attrs, arrays))
        return name

    def add(self, a, b):
        name = f"add{len(self.ops)}"
        c = self.tensors[a].shape[0]
        arrays = {}
        for i, s in enumerate((a, b)):
            arrays[f"multiplier{i}"], arrays[f"shift{i}"] = self.G.quantize_multiplier(np.full(c, 256 / (2 * self.max[s])))
        self.ops.append(self.G.Op(name, "add", [a, b], name, {"out_bits": 8}, arrays))
        self._tensor(name, self.tensors[a].shape, "uint8", 8)
        self.max[name] = 255
        return name

    def graph(self, out):
        g = self.G.IntGraph("bench", self.input, out, self.ops, self.tensors, {})
        self.G.validate(g)
        return g


def layer_graph(c, size, stride, groups, seed=0):
    net = Net(c, size, seed)
    return net.graph(net.conv("x", c, 3, stride, groups))


def block_graph(cin, size, expand, stride, cout, seed=0):
    """A 1x1 conv (the previous block's output), then the block."""
    net = Net(cin, size, seed)
    x = net.conv("x", cin, 1)
    y = net.conv(net.conv(net.conv(x, expand, 1), expand, 3, stride, groups=expand), cout, 1,
                 raw=stride == 1 and cin == cout)
    return net.graph(net.add(y, x) if stride == 1 and cin == cout else y)


# ----------------------------------------------------------------------------- kernels
def pack(x):
    """NCHW -> [N, C/16, H, W, 16]."""
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // 16, 16, h, w).transpose(0, 1, 3, 4, 2))


def timer(mod, dev, args):
    return mod.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=5), args


def best_us(runs, rounds):
    """Per (time_evaluator, args): the fastest repeat over `rounds` interleaved rounds."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (evaluate, args) in enumerate(runs):
            best[i] = min(best[i], min(evaluate(*args).results) * 1e6)
    return best


def compiled(func, target):
    import tvm
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)


def default_kernel(g, x, target):
    """The layer's kernel from `--strategy default` (generic schedule), checked; its timer."""
    import tvm
    from tvm import tirx

    from mixq import graph as G
    from mixq.compile import build, default
    mod, _ = build.lower_module(g, target, "default", log=lambda line: None)
    (func,) = [f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("k_")]
    lib = compiled(func, target)
    op = g.ops[0]
    c = op.arrays["weight"].shape[0]
    m, r, s = (k.value.numpy() for k in default.requant_constants(op.arrays["multiplier"], op.arrays["shift"], c))
    want = G.run(g, x)
    args = [tvm.runtime.tensor(a) for a in (x, op.arrays["weight"], op.arrays["bias"], m, r, s, np.zeros_like(want))]
    lib(*args)
    assert np.array_equal(args[-1].numpy(), want), "default kernel is not exact"
    return timer(lib.mod, tvm.cpu(), args)


def packed_kernel(g, x, target, as_grouped_conv=False):
    """The fast path's kernel for the layer (DepthwiseKernel, or ConvKernel with a group
    window), checked; its timer."""
    import tvm
    from tvm.s_tir import Schedule

    from mixq import graph as G
    from mixq.compile import kernels, lower
    isa = lower.isa_for(target)
    if isa.act_offset:
        raise SystemExit(f"{isa.name}: the bench feeds uint8 tensors as they are (x86 only)")
    op = g.ops[0]
    w, groups, stride = op.arrays["weight"].astype(np.int64), op.attrs["groups"], op.attrs["stride"]
    c, size = x.shape[1], x.shape[2]
    bias = op.arrays["bias"].astype(np.int64) - isa.input_offset("uint8") * w.reshape(c, -1).sum(axis=1)
    if groups == c and not as_grouped_conv:
        four = kernels.four_taps_fit(w, "uint8", isa)       # as compile/packed.py picks it
        kernel = kernels.DepthwiseKernel(isa, 1, "uint8", c // 16, size, size, 3, stride, 1, 0, "requant", 8,
                                         four_taps=four)
        weight = kernels.pack_depthwise_weight(w, four)
    else:
        width, per, step = kernels.group_window(c, c, groups, 16)
        kernel = kernels.ConvKernel(isa, 1, "uint8", width, 16, size, size, c // 16, 3, stride, 1, 0, 1,
                                    "requant", 8, (), (c // 16, per, step))
        weight = kernels.pack_grouped_weight(w, groups, 16, (width, per, step))
    sch = Schedule(tvm.IRModule({"main": kernels.prim_func(kernel)}))
    kernel.schedule(sch)
    lib = compiled(sch.mod["main"], target)
    want = G.run(g, x)
    out = np.zeros((1, c // 16, *want.shape[2:], 16), np.uint8)
    mult, shift = op.arrays["multiplier"].astype(np.int64), op.arrays["shift"].astype(np.int64)
    if kernel.folds_bias:                                   # as compile/packed.py passes it
        bias = kernels.channel_blocks(bias * mult + np.left_shift(np.int64(1), shift - 1), c, dtype="int64")
    else:
        bias = kernels.channel_blocks(bias, c)
    args = [tvm.runtime.tensor(a) for a in (pack(x), weight, bias, kernels.channel_blocks(mult, c),
                                            kernels.channel_blocks(shift, c, fill=1), out)]
    lib(*args)
    assert np.array_equal(args[-1].numpy(), pack(want)), f"{type(kernel).__name__} is not exact"
    return timer(lib.mod, tvm.cpu(), args)


@contextlib.contextmanager
def grouped_convs_declined():
    """The fast path as it was before it had grouped kernels: grouped convs take the default
    lowering (the lowering table's packed conv2d entry declines them)."""
    from mixq.compile import registry
    key = ("conv2d", "packed")
    packed = registry.LOWERINGS[key]

    def lower(ctx, op, inputs):
        if op.attrs.get("groups", 1) != 1:
            raise registry.Unsupported(f"layer '{op.name}': grouped convolution")
        return packed.fn(ctx, op, inputs)
    registry.LOWERINGS[key] = dataclasses.replace(packed, fn=lower)
    try:
        yield
    finally:
        registry.LOWERINGS[key] = packed


def program(g, x, target):
    """`mixq compile`'s program for `g` at batch 1, checked; (its timer, ops on the default lowering)."""
    import tvm
    from tvm import relax

    from mixq import graph as G
    from mixq.compile import build
    ex, info = build.build_library(g, target, "auto", {"batch": 1}, log=lambda line: None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x)]
    assert np.array_equal(vm["main"](*args).numpy(), G.run(g, x)), "program is not exact"
    return timer(vm, tvm.cpu(), args), sorted(op for op, s in info["lowerings"].items() if s == "default")


# ----------------------------------------------------------------------------- runs
def measure(threads: int, target_name: str, rounds: int, layers: bool, grouped: bool, blocks: bool):
    import tvm

    from mixq.compile import build
    config = build.host_target_config() if target_name == "host" else {"kind": "llvm", "mcpu": "haswell"}
    target = tvm.target.Target({**config, "num-cores": threads})
    rng = np.random.default_rng(0)
    row = lambda what, d, p, extra="": print(f"| {target_name} | {what} | {threads} | {d:.1f} | {p:.1f} | "
                                             f"{d / p:.2f}x |{extra}", flush=True)
    for name, c, size, stride in DEPTHWISE if layers else []:
        g = layer_graph(c, size, stride, groups=c)
        x = rng.integers(0, 256, (1, c, size, size)).astype(np.uint8)
        d, p, pc = best_us([default_kernel(g, x, target), packed_kernel(g, x, target),
                            packed_kernel(g, x, target, as_grouped_conv=True)], rounds)
        row(f"depthwise kernel {name}", d, p, f" as a grouped ConvKernel: {pc:.1f} us ({d / pc:.2f}x) |")
    for name, c, size, groups in GROUPED if grouped else []:
        g = layer_graph(c, size, 1, groups)
        x = rng.integers(0, 256, (1, c, size, size)).astype(np.uint8)
        d, p = best_us([default_kernel(g, x, target), packed_kernel(g, x, target, as_grouped_conv=True)], rounds)
        row(f"grouped kernel {name}", d, p, " |")
    for name, cin, size, expand, stride, cout in BLOCKS if blocks else []:
        g = block_graph(cin, size, expand, stride, cout)
        x = rng.integers(0, 256, (1, cin, size, size)).astype(np.uint8)
        fast, on_default = program(g, x, target)
        assert not on_default, on_default
        with grouped_convs_declined():
            before, on_default = program(g, x, target)
        assert on_default == ["conv2"], on_default
        d, p = best_us([before, fast], rounds)
        row(f"block program {name}", d, p, " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--target", choices=["host", "avx2"], default="host")
    p.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    p.add_argument("--grouped", action="store_true", help="grouped conv kernels too")
    p.add_argument("--blocks", action="store_true", help="inverted residual block programs too")
    p.add_argument("--no-layers", action="store_true", help="skip the depthwise kernels")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        measure(args.worker, args.target, args.rounds, not args.no_layers, args.grouped, args.blocks)
        return 0
    print("| target | what | threads | default us | fast path us | speedup | |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for threads in args.threads:
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        flags = [f for f, on in (("--grouped", args.grouped), ("--blocks", args.blocks),
                                 ("--no-layers", args.no_layers)) if on]
        subprocess.run([sys.executable, __file__, "--worker", str(threads), "--target", args.target,
                        "--rounds", str(args.rounds), *flags], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
