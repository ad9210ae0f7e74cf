"""The lowering table: (op kind, strategy) -> the function that lowers an op of that kind.

A lowering is `fn(ctx, op, inputs) -> value`, registered in one line:

    @register("maxpool", "default")
    def lower_maxpool(ctx, op, inputs):
        ...

`op` is the graph's `mixq.graph.Op`; `inputs` are its input tensors in the lowering's
`layout` (NCHW: Relax expressions in the graph's shapes and dtypes); `ctx` is the
`LoweringContext` of compile/lower.py (the BlockBuilder, the target and its packed ISA, the
batch, the value bounds of every tensor). The value returned is the op's output, in the same
layout. A lowering that cannot take an op (on this target, for these shapes) raises
`Unsupported` with the reason before it emits anything, and the op goes to the next strategy.

Strategies registered here: "default" (compile/default.py, every op kind, NCHW) and "packed"
(compile/packed.py, NCHW16c on int8 dot-product instructions). compile/lower.py walks the
graph and picks a strategy per op; a layout registered with `register_layout` says how its
values convert from and to NCHW, so ops of different strategies mix in one graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mixq import graph as G
from mixq.errors import MixqError

NCHW = "nchw"               # the graph's own layout: what the default lowering takes and gives


class Unsupported(Exception):
    """A lowering cannot handle this op (on this target); the message says why. The op falls
    back to the next strategy, in the end to the default lowering."""


class LoweringError(MixqError, ValueError):
    """No registered lowering handles an op of the graph."""


@dataclass(frozen=True)
class Lowering:
    kind: str
    strategy: str
    fn: Callable            # fn(ctx, op, inputs) -> the op's output value
    layout: str             # layout of `inputs` and of the value fn returns


LOWERINGS: dict[tuple[str, str], Lowering] = {}


def register(kind: str, strategy: str, layout: str = NCHW):
    """Decorator: `fn(ctx, op, inputs)` lowers ops of `kind` under `strategy` (replacing any
    lowering registered for the same pair)."""
    if kind not in G.OP_KINDS:
        raise KeyError(f"unknown op kind '{kind}' (known: {', '.join(G.OP_KINDS)})")

    def deco(fn):
        LOWERINGS[(kind, strategy)] = Lowering(kind, strategy, fn, layout)
        return fn
    return deco


@dataclass(frozen=True)
class Layout:
    name: str
    to_nchw: Callable       # (ctx, tensor name, value) -> Relax expression, emitted now
    from_nchw: Callable     # (ctx, tensor name, Relax expression) -> value; may raise Unsupported


LAYOUTS: dict[str, Layout] = {}


def register_layout(name: str, to_nchw: Callable, from_nchw: Callable):
    """A value layout other than NCHW and its conversions (one each way, made once per tensor)."""
    LAYOUTS[name] = Layout(name, to_nchw, from_nchw)
