"""mixq.compile: frozen integer graph -> TVM Relax library (`mixq compile`).

    cli.py       the command's options
    build.py     targets, the build directory, lower -> schedule -> tvm.compile, --tune
    lower.py     the graph walk: a strategy per op from the lowering table, layout conversions
    registry.py  the lowering table (op kind, strategy) -> function; Unsupported
    default.py   the default lowering: every op kind, NCHW, one TE kernel per op
    packed.py    the fast path's lowerings: packed NCHW16c, int8 dot products, fused epilogues
    kernels.py   the packed TE kernels and their hand TIR schedules (no graph)
    schedule.py  the generic schedule of default kernels; the Relax build pipeline
    tune.py      MetaSchedule tuning of the packed conv kernels
    x86.py, arm.py   per architecture: instruction sets, tensor intrinsics, the choice by CPU features
"""
