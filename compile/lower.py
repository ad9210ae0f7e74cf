"""Frozen integer graph -> Relax IRModule, op by op through the lowering table.

The IRModule has one function, `main(x: [n, C, H, W] int8|uint8) -> output`; the batch `n` is
symbolic (one library serves batch 1 for latency and large batches for throughput) unless
`batch` fixes it. For each op, in graph order, `lower_graph` tries the strategies in order and
uses the first whose registered lowering (compile/registry.py) takes the op:

    strategy="auto"     ["packed", "default"] when the target has int8 dot-product
                        instructions (`isa_for`: compile/x86.py, compile/arm.py), else ["default"]
    strategy="default"  ["default"]
    strategy=NAME       [NAME, "default"], for any other registered strategy

"default" (compile/default.py) takes every op kind, so every op ends somewhere. Each value
stays in the layout of the lowering that produced it; an op whose lowering takes another
layout gets a converted copy (e.g. NCHW -> packed NCHW16c before a packed op that follows a
default one, packed -> NCHW after), made once per tensor and layout. The output is NCHW.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import tvm
from tvm import relax, tirx

from mixq import graph as G
from mixq.compile import arm, default, kernels, packed, x86  # noqa: F401  (default, packed: their lowerings)
from mixq.compile.registry import LAYOUTS, LOWERINGS, NCHW, LoweringError, Unsupported


def isa_for(target) -> kernels.PackedISA | None:
    """The packed int8 dot-product instructions the target's CPU features allow (None: none)."""
    try:
        return (arm if arm.is_aarch64(target) else x86).isa_for(target)
    except Unsupported:
        return None


def strategies_for(target, strategy: str = "auto") -> list[str]:
    if strategy == "auto":
        return ["packed", "default"] if isa_for(target) is not None else ["default"]
    return [strategy] if strategy == "default" else [strategy, "default"]


# ----------------------------------------------------------------------------- context
@dataclass
class LoweringContext:
    """What a lowering sees besides its op and inputs."""
    bb: relax.BlockBuilder
    graph: G.IntGraph
    target: tvm.target.Target
    batch: object                      # Relax batch dimension: tirx.Var (symbolic) or int
    kernel_batch: int | None           # the same for kernel dataclasses: None when symbolic
    bounds: dict                       # tensor name -> max |value| (graph.value_bounds' proof)
    isa: kernels.PackedISA | None = None     # the target's int8 dot-product instructions
    database: object = None            # MetaSchedule records for the packed kernels, or None
    tuned_batch: int = 1               # the batch the records were tuned at
    values: dict = field(default_factory=dict)      # tensor name -> (layout, value)
    converted: dict = field(default_factory=dict)   # (tensor name, layout) -> value
    chosen: dict = field(default_factory=dict)      # op name -> strategy used
    fallbacks: dict = field(default_factory=dict)   # op name -> why the strategies before it declined
    kernels: dict = field(default_factory=dict)     # self-scheduled kernel -> GlobalVar
    schedules: dict = field(default_factory=dict)   # kernel -> "tuned" | "hand"
    uses: dict = field(default_factory=dict)        # kernel -> calls

    def __post_init__(self):
        self._consumers = {}
        for op in self.graph.ops:
            for name in op.inputs:
                self._consumers.setdefault(name, []).append(op)

    def tensor(self, name: str) -> G.TensorInfo:
        return self.graph.tensors[name]

    def consumers(self, name: str) -> list:
        return self._consumers.get(name, [])

    def value(self, name: str, layout: str):
        """Tensor `name` in `layout`, converted (once) when it was produced in another."""
        have, v = self.values[name]
        if have == layout:
            return v
        key = (name, layout)
        if key not in self.converted:
            if layout == NCHW:
                self.converted[key] = LAYOUTS[have].to_nchw(self, name, v)
            else:
                self.converted[key] = LAYOUTS[layout].from_nchw(self, name, self.value(name, NCHW))
        return self.converted[key]

    def emit_kernel(self, te_fn: Callable, *args, name: str):
        """One TIR kernel from a TE function, named after the op (readable in profiles); the
        generic schedule (compile/schedule.py) is applied after lowering."""
        return self.bb.emit_te(te_fn, *args, primfunc_name_hint=_kernel_name(name))

    def call_kernel(self, kernel, args, out_shape, out_dtype, name: str):
        """A call of a kernel object that schedules itself (compile/kernels.py), one PrimFunc
        per distinct kernel; `None` in `out_shape` is the batch."""
        gv = self.kernels.get(kernel)
        if gv is None:
            func, how = kernels.scheduled(kernel, self.target, self.database, self.tuned_batch)
            fname = f"k{len(self.kernels)}_{type(kernel).__name__}"
            func = func.with_attrs({"global_symbol": fname, "tirx.is_scheduled": True})
            gv = self.bb.add_func(func, fname)
            self.kernels[kernel], self.schedules[kernel] = gv, how
        self.uses[kernel] = self.uses.get(kernel, 0) + 1
        out_shape = tuple(self.batch if d is None else d for d in out_shape)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, out_dtype)),
                            name_hint=name.replace(".", "_"))


def _kernel_name(op_name: str) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in op_name)


# ----------------------------------------------------------------------------- the walk
def lower_op(ctx: LoweringContext, op: G.Op, strategies) -> None:
    reasons = []
    for strategy in strategies:
        lw = LOWERINGS.get((op.kind, strategy))
        if lw is None:
            continue
        try:
            out = lw.fn(ctx, op, [ctx.value(name, lw.layout) for name in op.inputs])
        except Unsupported as e:
            reasons.append((strategy, str(e)))
            continue
        ctx.values[op.output] = (lw.layout, out)
        ctx.chosen[op.name] = strategy
        if reasons:
            ctx.fallbacks[op.name] = "; ".join(why for _, why in reasons)
        return
    why = f" ({'; '.join(f'{s}: {e}' for s, e in reasons)})" if reasons else ""
    raise LoweringError(f"op '{op.name}' ({op.kind}): no lowering for target "
                        f"{ctx.target.kind.name}{why}")


@dataclass
class Lowered:
    module: tvm.IRModule
    chosen: dict            # op name -> strategy used
    fallbacks: dict         # op name -> why the preferred strategies declined it
    isa: kernels.PackedISA | None
    kernels: dict           # self-scheduled kernel -> GlobalVar
    schedules: dict         # kernel -> "tuned" | "hand"
    uses: dict              # kernel -> calls


def lower_graph(graph: G.IntGraph, target, strategy: str = "auto", batch: int | None = None,
                database=None, tuned_batch: int = 1) -> Lowered:
    """Relax module with `main(x) -> output` for `graph`; `batch=None` means symbolic.
    `database` (MetaSchedule records, tuned at `batch` or `tuned_batch`) schedules the packed
    kernels it has records for."""
    strategies = strategies_for(target, strategy)
    isa = isa_for(target) if "packed" in strategies else None
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64") if batch is None else batch
    t_in = graph.input
    x = relax.Var("x", relax.TensorType((n, *t_in.shape), t_in.dtype))
    ctx = LoweringContext(bb, graph, target, n, batch, G.value_bounds(graph)["tensors"], isa, database,
                          batch or tuned_batch)
    with bb.function("main", [x]):
        with bb.dataflow():
            ctx.values[t_in.name] = (NCHW, x)
            for op in graph.ops:
                lower_op(ctx, op, strategies)
            out = bb.emit_output(ctx.value(graph.output, NCHW))
        bb.emit_func_output(out)
    return Lowered(bb.get(), ctx.chosen, ctx.fallbacks, isa, ctx.kernels, ctx.schedules, ctx.uses)
