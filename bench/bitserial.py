"""Are 1-2 bit layers faster as bit-serial kernels? Measured on ResNet-20's conv shapes.

    TVM_NUM_THREADS=2 .venv/bin/python bench/bitserial.py --out bench/out/bitserial-2.json

Bit-serial: `topi.nn.bitserial_conv2d_nchw` (AND + popcount over bit planes packed 32 channels
per word), scheduled parallel over output channels and vectorized over output columns
(AVX512-VPOPCNTDQ where the CPU has it). mixq's weights are signed (|w| <= 2^(k-1) - 1 at k
storage bits), bit-serial planes are unsigned, so w = w_pos - w_neg and the layer is two
bit-serial convs (k - 1 magnitude planes each) subtracted: exact. Compared with mixq's packed
VNNI conv (mixq.compile.kernels.ConvKernel, raw int32 output) on the same layer; both are
checked against the golden integer convolution. Written by `make bench` into results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# (name, in channels, out channels, size, stride): ResNet-20 layers bit-serial can pack
# (channels a multiple of the 32-bit word)
LAYERS = [("layer2 32->32 16x16", 32, 32, 16, 1), ("layer3 64->64 8x8", 64, 64, 8, 1)]
WEIGHT_BITS = (2, 3)            # storage bits incl. sign: |w| <= 1 and |w| <= 3
ACT_BITS = (8, 2)


def bitserial_func(n, c, o, size, act_bits, mag_bits):
    import tvm
    from tvm import te, topi
    from tvm.s_tir import Schedule
    x = te.placeholder((n, c, size, size), "uint8", name="x")
    w_pos = te.placeholder((o, c, 3, 3), "uint8", name="w_pos")
    w_neg = te.placeholder((o, c, 3, 3), "uint8", name="w_neg")
    conv = lambda w: topi.nn.bitserial_conv2d_nchw(x, w, 1, 1, act_bits, mag_bits, "uint32", "int32", unipolar=False)
    pos, neg = conv(w_pos), conv(w_neg)
    out = te.compute(pos.shape, lambda *i: pos(*i) - neg(*i), name="out")
    sch = Schedule(te.create_prim_func([x, w_pos, w_neg, out]))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        loops = sch.get_loops(block)
        if name.startswith("Conv2dOutput"):
            nn, ff, yy, xx, rc, ry, rx, b2, b1 = loops
            sch.reorder(nn, ff, yy, rc, ry, rx, b2, b1, xx)
            sch.parallel(sch.fuse(nn, ff))
            sch.vectorize(xx)
            sch.decompose_reduction(block, rc)
        elif name != "out":
            sch.parallel(sch.fuse(*loops[:2]))
    return sch.mod["main"]


def packed_kernel(n, c, o, size):
    from mixq.compile import kernels, x86
    return kernels.ConvKernel(x86.VNNI, n, "uint8", c // 16, 16, size, size, o // 16, 3, 1, 1, 0, 1, "raw", 8)


def median_us(lib, args, number):
    import tvm
    return float(np.median(lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=7)(*args).results)) * 1e6


def measure(threads: int) -> list[dict]:
    import tvm
    from tvm.s_tir import Schedule

    from mixq import graph as G
    from mixq.compile import kernels
    from tvm.target import codegen
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": threads})
    rng = np.random.default_rng(0)
    rows = []
    for name, c, o, size, _ in LAYERS:
        for act_bits in ACT_BITS:
            for wbits in WEIGHT_BITS:
                mag = wbits - 1
                x = rng.integers(0, 1 << act_bits, (1, c, size, size)).astype(np.uint8)
                w = rng.integers(-((1 << mag) - 1), 1 << mag, (o, c, 3, 3)).astype(np.int64)
                want = G.conv_accumulate(x, w, 1, 1, 1).astype(np.int32)
                dev = tvm.cpu()
                # bit-serial
                lib = tvm.compile(tvm.IRModule({"main": bitserial_func(1, c, o, size, act_bits, mag)}), target)
                args = [tvm.runtime.tensor(a, dev) for a in (x, np.maximum(w, 0).astype(np.uint8),
                                                              np.maximum(-w, 0).astype(np.uint8))]
                out = tvm.runtime.tensor(np.zeros(want.shape, np.int32), dev)
                lib(*args, out)
                bs_exact = bool(np.array_equal(out.numpy(), want))
                bs_us = median_us(lib, [*args, out], number=20)
                # packed VNNI (raw int32 accumulators + zero bias)
                k = packed_kernel(1, c, o, size)
                sch = Schedule(tvm.IRModule({"main": kernels.prim_func(k)}))
                k.schedule(sch)
                plib = tvm.compile(sch.mod, target)
                xp = x.reshape(1, c // 16, 16, size, size).transpose(0, 1, 3, 4, 2).copy()
                pargs = [tvm.runtime.tensor(a, dev) for a in (xp, kernels.pack_conv_weight(w, 16), np.zeros((o // 16, 16), np.int32))]
                pout = tvm.runtime.tensor(np.zeros((1, o // 16, size, size, 16), np.int32), dev)
                plib(*pargs, pout)
                p_exact = bool(np.array_equal(pout.numpy().transpose(0, 1, 4, 2, 3).reshape(want.shape), want))
                p_us = median_us(plib, [*pargs, pout], number=200)
                rows.append({"layer": name, "act_bits": act_bits, "weight_bits": wbits, "threads": threads,
                             "packed_us": p_us, "packed_exact": p_exact,
                             "bitserial_us": bs_us, "bitserial_exact": bs_exact})
                print(f"{name} a{act_bits} w{wbits} threads {threads}: packed {p_us:.1f} us (exact {p_exact}), "
                      f"bit-serial {bs_us:.1f} us (exact {bs_exact})", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {"rows": [], "summary": "not measured"}
    wins = [r for r in rows if r["bitserial_us"] < r["packed_us"] and r["bitserial_exact"]]
    ratio = [r["bitserial_us"] / r["packed_us"] for r in rows]
    summary = (f"Bit-serial is {min(ratio):.1f}x to {max(ratio):.1f}x the time of the packed VNNI kernel on "
               f"these layers; it wins on {len(wins)} of {len(rows)}. "
               + ("mixq therefore does not use bit-serial kernels: a VNNI instruction does 64 8-bit "
                  "multiply-adds, a popcount 16-64 1-bit ones per bit plane pair."
                  if not wins else "Layers where it wins: " + ", ".join(f"{r['layer']} a{r['act_bits']} w{r['weight_bits']}" for r in wins)))
    return {"rows": rows, "summary": summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "1")))
    args = p.parse_args(argv)
    t0 = time.time()
    rows = measure(args.threads)
    Path(args.out).write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
