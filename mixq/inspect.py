"""`mixq inspect FROZEN_DIR`: what a frozen model holds, layer by layer, and what it weighs.

One row per op that carries arrays: weight layers (conv2d, linear) with their paper precision
(kept mask bits), honest storage bits (span + sign), kept bit positions, parameter count and
bytes on disk (packed weights + int32 bias + requantization constants); requantizing adds and
pools (their multipliers only). The totals compare the artifact with the same layers stored
as float32 (weights + one bias per output channel, i.e. the BN-folded float model), and give
the three measures a mixed method's --budget is written in (train/budget.py): average
precision (bits), KiB of packed weights (size) and GBOPs (bops: MACs x weight storage bits x
input activation bits, from the graph's shapes and dtypes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixq import graph as G


def layer_rows(frozen_dir) -> tuple[G.IntGraph, list]:
    """(graph, rows): one dict per op with arrays, bytes as stored in FROZEN_DIR."""
    g = G.load(frozen_dir)
    manifest = json.loads((Path(frozen_dir) / "manifest.json").read_text())
    records = {o["name"]: o["arrays"] for o in manifest["ops"]}
    rows = []
    for op in g.ops:
        if not op.arrays:
            continue
        recs = records[op.name]
        weight = op.arrays.get("weight")
        macs = act_bits = 0
        if weight is not None:
            out, src = g.tensors[op.output], g.tensors[op.inputs[0]]
            per_output = int(weight[0].size)            # in_channels/groups x kh x kw (or in_features)
            macs = int(np.prod(out.shape)) * per_output     # per image: outputs x multiply-adds each
            act_bits = src.bits
        rows.append({
            "layer": op.name, "kind": op.kind,
            "precision": op.attrs.get("precision"), "storage_bits": op.attrs.get("storage_bits"),
            "kept_bits": op.attrs.get("kept_bits"),
            "params": int(weight.size) if weight is not None else 0,
            "out_channels": int(weight.shape[0]) if weight is not None else 0,
            "macs": macs, "act_bits": act_bits,
            "weight_bytes": recs["weight"]["bytes"] if "weight" in recs else 0,
            "bytes": sum(r["bytes"] for r in recs.values()),
        })
    return g, rows


def summary(rows: list, g: G.IntGraph | None = None) -> dict:
    """Totals; avg_bits is the training run's (the paper's mean over the searched layers) when
    the graph carries it, else the mean precision of its weight layers."""
    params = sum(r["params"] for r in rows)
    weights = [r for r in rows if r["params"]]
    trained = ((g.meta.get("training") or {}).get("avg_bits") if g is not None else None)
    precisions = [r["precision"] for r in weights if r["precision"] is not None]
    weight_bytes = sum(r["weight_bytes"] for r in rows)
    total = sum(r["bytes"] for r in rows)
    float32 = 4 * sum(r["params"] + r["out_channels"] for r in rows)
    return {
        "params": params, "weight_bytes": weight_bytes, "bytes": total,
        "ideal_weight_bytes": sum(r["params"] * r["storage_bits"] for r in rows if r["params"]) / 8,
        "storage_bits_per_weight": 8 * weight_bytes / params if params else 0.0,
        "float32_bytes": float32, "compression": float32 / total if total else 0.0,
        "weight_compression": 4 * params / weight_bytes if weight_bytes else 0.0,
        "avg_bits": trained if trained is not None else (sum(precisions) / len(precisions) if precisions else None),
        "weight_kib": sum(r["params"] * r["storage_bits"] for r in weights) / 8192,
        "gbops": sum(r["macs"] * r["storage_bits"] * r["act_bits"] for r in weights) / 1e9,
    }


def _bits(v) -> str:
    return "-" if v is None else str(v)


def format_table(g: G.IntGraph, rows: list, s: dict) -> str:
    head = ("layer", "kind", "precision", "storage", "kept bits", "params", "bytes")
    body = [(r["layer"], r["kind"], _bits(r["precision"]), _bits(r["storage_bits"]),
             "-" if r["kept_bits"] is None else "{" + ",".join(map(str, r["kept_bits"])) + "}",
             f"{r['params']:,}", f"{r['bytes']:,}") for r in rows]
    body.append(("total", "", "", "", "", f"{s['params']:,}", f"{s['bytes']:,}"))
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    left = (0, 1, 4)

    def line(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(head))
    out = [f"{g.model}: {len(g.ops)} ops, input {g.input.dtype}{list(g.input.shape)} scale {g.input.scale:.6g}",
           line(head), rule, *map(line, body[:-1]), rule, line(body[-1]), ""]
    out.append(f"weights: {s['params']:,} params in {s['weight_bytes']:,} bytes packed "
               f"({s['storage_bits_per_weight']:.2f} bits/weight; sum(params*bits)/8 = {s['ideal_weight_bytes']:,.0f}), "
               f"{s['weight_compression']:.2f}x smaller than float32")
    tables = " + activation tables" if any(op.kind == "lut" for op in g.ops) else ""
    out.append(f"model size: {s['bytes']:,} bytes (packed weights + int32 bias + requantization{tables}) vs "
               f"{s['float32_bytes']:,} bytes float32 (weights + bias): {s['compression']:.2f}x compression")
    avg = "-" if s["avg_bits"] is None else f"{s['avg_bits']:.2f}"
    out.append(f"budget measures: bits={avg} (mean precision), size={s['weight_kib']:.2f} KiB "
               f"(params x storage bits / 8), bops={s['gbops']:.4g} G (MACs x weight x activation bits)")
    return "\n".join(out)


def add_arguments(p):
    p.add_argument("frozen_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows and totals)")


def run(args) -> int:
    g, rows = layer_rows(args.frozen_dir)
    s = summary(rows, g)
    if args.json:
        print(json.dumps({"model": g.model, "layers": rows, **s}))
    else:
        print(format_table(g, rows, s))
    return 0
