"""A simple, generic CPU schedule for the default kernels: not tuned, just not naive.

Applied to every PrimFunc not already marked `tirx.is_scheduled` (a target-specific lowering
that schedules its own kernels sets that attribute and is left alone). A schedule only
reorders, splits and parallelizes loops, so the integers computed are unchanged.

For a kernel with one reduction (conv, dense, pooling) over an NCHW output:
    padding            a separate pass (inlining it puts a bounds check on every
                       multiply-add: 3.5x slower on ResNet-20)
    loops              (n, c) fused and parallel over the cores -> output row y ->
                       the reduction loops -> the row's x positions (LLVM vectorizes them)
    epilogue           bias + int64 requantization + clip computed per output row, right
                       after the row's accumulators (while they are in cache)
Elementwise kernels (residual add) are parallel over (n, c) and vectorized over the rest.

`relax_pipeline()` is the Relax build every module goes through (compile/build.py).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule

REDUCE = 2          # tirx.IterVar.CommReduce


def schedule_module(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Every unscheduled PrimFunc of `mod` scheduled by `schedule_func` (others unchanged)."""
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        scheduled = schedule_func(func)
        if scheduled is not None:
            updated[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    for gv, func in updated.items():
        mod[gv] = func
    return mod


def _is_reduction(sch: Schedule, block) -> bool:
    return any(int(iv.iter_type) == REDUCE for iv in sch.get(block).iter_vars)


def _extent(sch: Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The scheduled function, or None when its shape is not one this rule knows."""
    sch = Schedule(tvm.IRModule({"main": func}))
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) == 1:
            _schedule_reduction(sch, reductions[0])
        elif not reductions:
            for block in blocks:
                _schedule_elementwise(sch, block)
        else:
            return None
    except Exception:  # noqa: BLE001 - the rule does not fit this kernel: keep it unscheduled
        return None
    return sch.mod["main"]


def _schedule_reduction(sch: Schedule, block):
    loops = sch.get_loops(block)
    kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
    n_spatial = kinds.index(REDUCE)
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    for producer in sch.get_producers(block):          # zero padding: its own cheap pass
        if not _is_reduction(sch, producer) and len(sch.get_loops(producer)) >= 2:
            p_loops = sch.get_loops(producer)
            sch.parallel(sch.fuse(p_loops[0], p_loops[1]))
    consumers = sch.get_consumers(block)
    if n_spatial == 4:                                 # n, c, y, x
        n, c, y, x = spatial
        sch.reorder(n, c, y, *reduce, x)               # LLVM vectorizes the x loop
        for epilogue in consumers:
            sch.reverse_compute_at(epilogue, y, preserve_unit_loops=True)
            _vectorize_below(sch, epilogue, 3)          # its x loop, never the shared y loop
        sch.parallel(sch.fuse(n, c))
        init = sch.decompose_reduction(block, reduce[0])
        _vectorize_below(sch, init, 2)
    else:                                              # dense: n, o
        sch.parallel(sch.fuse(*spatial))
        for epilogue in consumers:
            sch.parallel(sch.fuse(*sch.get_loops(epilogue)))


def _schedule_elementwise(sch: Schedule, block):
    loops = sch.get_loops(block)
    if len(loops) >= 3:
        sch.parallel(sch.fuse(loops[0], loops[1]))
        _vectorize_lanes(sch, sch.fuse(*sch.get_loops(block)[1:]), max_lanes=16)
    elif loops:
        sch.parallel(sch.fuse(*loops))


def _vectorize_below(sch: Schedule, block, depth: int):
    """Vectorize the block's innermost loop if it is its own (deeper than `depth` loops):
    a loop shared with the reduction must stay serial."""
    loops = sch.get_loops(block)
    if len(loops) > depth:
        _vectorize_lanes(sch, loops[-1])


def _vectorize_lanes(sch: Schedule, loop, max_lanes: int | None = None):
    """Vectorize `loop` in power-of-two lanes: the whole loop when its extent is a power of two
    (at most max_lanes), else the inner part of a split by the largest power of two dividing
    it (at most max_lanes, 16 when None), none when the extent is odd. Why: LLVM 22's aarch64
    backend miscompiles a 3-lane vector of this requantization (measured on the emulated
    board: an avgpool with 3-wide output rows was wrong in half its outputs; 5-, 6- and
    7-wide rows were exact); power-of-two vectors are the ones every backend legalizes
    natively. The rows of the zoo's nets (32, 16, 8, 4 wide) are vectorized as before."""
    extent = _extent(sch, loop)
    if not extent:
        return
    lanes = extent & -extent                        # the largest power of two dividing it
    if lanes == extent and (max_lanes is None or extent <= max_lanes):
        if extent > 1:
            sch.vectorize(loop)
        return
    lanes = min(lanes, max_lanes or 16)
    if lanes >= 2:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


# ----------------------------------------------------------------------------- build pipeline
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
