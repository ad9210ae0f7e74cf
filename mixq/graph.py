"""The integer graph: mixq's contract between freeze, the golden interpreter and compile.

Dependency-light on purpose (NumPy only). Semantics are documented in docs/integer-contract.md;
every op below has exactly one NumPy implementation (`_NUMPY_OPS`), which *is* the golden
reference. `mixq.intsim` runs the same table in torch.

A graph is a list of ops in execution order. Every tensor is NCHW (or NC) with batch first;
shapes below omit the batch dimension.

    input   int8/uint8      quantized once by the runtime: q = clip(round(x / scale))
    conv2d  int8|uint8 -> uint8 (requantized, ReLU clip) | int32 (acc + bias, "raw")
    linear  same as conv2d for 2-D tensors
    add     n-ary: y = clip(sum_i rq(x_i, M_i, s_i), 0, 2^bits - 1), M_i/s_i per channel
    avgpool y = clip(rq(window_sum, M, s), 0, 2^bits - 1)
    maxpool integer max (zero padding; inputs are >= 0 so this equals -inf padding)
    flatten NCHW -> N(C*H*W), row-major

with rq(x, M, s) = (x * M + 2^(s-1)) >> s evaluated in int64 (arithmetic shift = floor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MAX_SHIFT = 62
INT32_MAX = 2**31 - 1


class GraphError(ValueError):
    """A frozen model on disk or in memory breaks the contract. Message names the culprit."""


# ----------------------------------------------------------------------------- data model
@dataclass
class TensorInfo:
    name: str
    shape: tuple            # without batch
    dtype: str              # "int8", "uint8", "int32"
    bits: int               # value range: uint8 -> [0, 2^bits-1]; int8 -> signed bits; int32 -> 32
    scale: float | list     # real value = q * scale (per output channel for raw int32 tensors)


@dataclass
class Op:
    name: str
    kind: str
    inputs: list
    output: str
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # name -> np.ndarray (unpacked, canonical dtype)


@dataclass
class IntGraph:
    model: str
    input: TensorInfo
    output: str
    ops: list
    tensors: dict           # name -> TensorInfo (input included)
    meta: dict = field(default_factory=dict)

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)


# ----------------------------------------------------------------------------- arithmetic
def rq(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """(x * M + 2^(s-1)) >> s in int64; M, s broadcast along axis 1 (channels)."""
    x = x.astype(np.int64)
    m = _per_channel(np.asarray(multiplier, dtype=np.int64), x.ndim)
    s = _per_channel(np.asarray(shift, dtype=np.int64), x.ndim)
    return (x * m + (np.int64(1) << (s - 1))) >> s


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def quantize_multiplier(real: np.ndarray, name: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers -> (M, s) with |M| < 2^31, 1 <= s <= 62, M / 2^s ~= real (dyadic).

    Each M is normalized into [2^30, 2^31) where the shift range allows, so the relative
    rounding error is below 2^-30. Zero maps to (0, 1)."""
    real = np.atleast_1d(np.asarray(real, dtype=np.float64))
    if not np.all(np.isfinite(real)):
        raise GraphError(f"layer '{name}': non-finite requantization multiplier")
    mult = np.zeros(real.shape, dtype=np.int64)
    shift = np.ones(real.shape, dtype=np.int64)
    for i, r in enumerate(real):
        if r == 0.0:
            continue
        mant, exp = np.frexp(abs(r))          # abs(r) = mant * 2^exp, mant in [0.5, 1)
        s = 31 - int(exp)                     # so that M = mant * 2^31 in [2^30, 2^31)
        s = min(max(s, 1), MAX_SHIFT)
        m = int(np.round(abs(r) * 2.0**s))
        if m > INT32_MAX:                     # rounding hit 2^31: halve
            s -= 1
            m = int(np.round(abs(r) * 2.0**s))
        if s < 1 or m > INT32_MAX:
            raise GraphError(f"layer '{name}': requantization multiplier {r:.3g} is too large "
                             "for a 31-bit fixed-point multiplier")
        mult[i] = m if r > 0 else -m
        shift[i] = s
    return mult.astype(np.int32), shift.astype(np.int32)


def clip_bits(x: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(x, 0, (1 << bits) - 1)


# ----------------------------------------------------------------------------- golden ops
def _pad_nchw(x, pad):
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _windows(x, k, stride, pad):
    """[N,C,H,W] -> [N,C,Ho,Wo,k,k] view of sliding windows."""
    x = _pad_nchw(x, pad)
    w = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return w[:, :, ::stride, ::stride]


def conv_accumulate(x: np.ndarray, weight: np.ndarray, stride: int, padding: int,
                    groups: int) -> np.ndarray:
    """Integer convolution, int64 result.

    Computed as a float64 GEMM: every product and partial sum is an integer whose magnitude
    is bounded by freeze's static overflow proof (< 2^31), far inside float64's exact range
    (2^53), so the result is exact whatever the summation order."""
    n, c, _, _ = x.shape
    o, cg, k, _ = weight.shape
    win = _windows(x.astype(np.float64), k, stride, padding)        # N,C,Ho,Wo,k,k
    ho, wo = win.shape[2], win.shape[3]
    og = o // groups
    out = np.empty((n, o, ho, wo), dtype=np.int64)
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, cg * k * k)
        wg = weight[g * og:(g + 1) * og].reshape(og, cg * k * k).astype(np.float64)
        acc = cols @ wg.T                                            # [N*Ho*Wo, og]
        out[:, g * og:(g + 1) * og] = np.rint(acc).astype(np.int64).reshape(n, ho, wo, og).transpose(0, 3, 1, 2)
    return out


def _finish(acc, op):
    """Add bias; requantize + ReLU clip when the op has a multiplier, else raw int32."""
    acc = acc + _per_channel(op.arrays["bias"].astype(np.int64), acc.ndim)
    if "multiplier" not in op.arrays:
        return acc.astype(np.int32)
    y = rq(acc, op.arrays["multiplier"], op.arrays["shift"])
    return clip_bits(y, op.attrs["out_bits"]).astype(np.uint8)


def np_conv2d(op, x):
    a = op.attrs
    acc = conv_accumulate(x, op.arrays["weight"], a["stride"], a["padding"], a.get("groups", 1))
    return _finish(acc, op)


def np_linear(op, x):
    acc = np.rint(x.astype(np.float64) @ op.arrays["weight"].astype(np.float64).T).astype(np.int64)
    return _finish(acc, op)


def np_add(op, *xs):
    total = None
    for i, x in enumerate(xs):
        r = rq(x, op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"])
        total = r if total is None else total + r
    return clip_bits(total, op.attrs["out_bits"]).astype(np.uint8)


def np_avgpool(op, x):
    a = op.attrs
    win = _windows(x.astype(np.int64), a["kernel"], a["stride"], a.get("padding", 0))
    s = win.sum(axis=(4, 5))
    y = rq(s, op.arrays["multiplier"], op.arrays["shift"])
    return clip_bits(y, op.attrs["out_bits"]).astype(np.uint8)


def np_maxpool(op, x):
    a = op.attrs
    win = _windows(x, a["kernel"], a["stride"], a.get("padding", 0))
    return win.max(axis=(4, 5)).astype(x.dtype)


def np_flatten(op, x):
    return x.reshape(x.shape[0], -1)


_NUMPY_OPS = {
    "conv2d": np_conv2d,
    "linear": np_linear,
    "add": np_add,
    "avgpool": np_avgpool,
    "maxpool": np_maxpool,
    "flatten": np_flatten,
}
OP_KINDS = tuple(_NUMPY_OPS)


def run(graph: IntGraph, x_q: np.ndarray, keep: bool = False):
    """Golden interpreter: integer input batch -> integer output (int32 logits).

    With keep=True returns the dict of every intermediate tensor as well."""
    expect = np.dtype(graph.input.dtype)
    if x_q.dtype != expect:
        raise GraphError(f"input must be {expect}, got {x_q.dtype}")
    if tuple(x_q.shape[1:]) != tuple(graph.input.shape):
        raise GraphError(f"input shape {tuple(x_q.shape[1:])} != model input {tuple(graph.input.shape)}")
    env = {graph.input.name: x_q}
    for op in graph.ops:
        env[op.output] = _NUMPY_OPS[op.kind](op, *[env[i] for i in op.inputs])
    out = env[graph.output]
    return (out, env) if keep else out


def run_batched(graph: IntGraph, x_q: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([run(graph, x_q[i:i + batch_size]) for i in range(0, len(x_q), batch_size)])


def quantize_input(graph_input: TensorInfo, x: np.ndarray) -> np.ndarray:
    """The runtime's one float step: q = clip(round(x / scale)) in float32, half to even."""
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / np.float32(graph_input.scale))
    if graph_input.dtype == "int8":
        lo, hi = -(1 << (graph_input.bits - 1)) + 1, (1 << (graph_input.bits - 1)) - 1
    else:
        lo, hi = 0, (1 << graph_input.bits) - 1
    return np.clip(q, lo, hi).astype(graph_input.dtype)


# ----------------------------------------------------------------------------- bit packing
def pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Two's complement values, `bits` each, little-endian bit order, into bytes."""
    u = q.astype(np.int64).ravel() & ((1 << bits) - 1)
    b = ((u[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size * 8 < count * bits:
        raise GraphError("packed array is truncated")
    b = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits).astype(np.int64)
    u = (b << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return u - ((u >> (bits - 1)) & 1) * (1 << bits)


def container_dtype(storage_bits: int) -> str:
    return "int8" if storage_bits <= 8 else "int16"


# ----------------------------------------------------------------------------- save / load
def _array_record(arr: np.ndarray, packed_bits: int | None) -> tuple[dict, bytes]:
    if packed_bits:
        data = pack_bits(arr, packed_bits)
        rec = {"dtype": str(arr.dtype), "shape": list(arr.shape), "packed_bits": packed_bits}
    else:
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        rec = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    rec["sha256"] = hashlib.sha256(data).hexdigest()
    rec["bytes"] = len(data)
    return rec, data


def _tensor_json(t: TensorInfo) -> dict:
    d = dataclasses.asdict(t)
    d["shape"] = list(t.shape)
    return d


def save(graph: IntGraph, out_dir: str | os.PathLike) -> Path:
    """Write manifest.json + arrays/ atomically: a temp dir renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "arrays").mkdir()
        ops = []
        for op in graph.ops:
            arrays = {}
            for key, arr in op.arrays.items():
                packed = op.attrs.get("storage_bits") if key == "weight" else None
                rec, data = _array_record(arr, packed)
                rec["file"] = f"arrays/{op.name}.{key}.bin"
                (tmp / rec["file"]).write_bytes(data)
                arrays[key] = rec
            ops.append({"name": op.name, "kind": op.kind, "inputs": list(op.inputs),
                        "output": op.output, "attrs": op.attrs, "arrays": arrays})
        manifest = {
            "format": "mixq-intgraph", "format_version": FORMAT_VERSION,
            "model": graph.model, "input": _tensor_json(graph.input), "output": graph.output,
            "tensors": {k: _tensor_json(v) for k, v in graph.tensors.items()},
            "ops": ops, "meta": graph.meta,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def manifest_sha256(frozen_dir: str | os.PathLike) -> str:
    """Identity of a frozen model: the hash of its manifest (which holds every array's hash)."""
    return hashlib.sha256((Path(frozen_dir) / "manifest.json").read_bytes()).hexdigest()


def _tensor_from(d: dict) -> TensorInfo:
    return TensorInfo(d["name"], tuple(d["shape"]), d["dtype"], d["bits"], d["scale"])


def load(frozen_dir: str | os.PathLike) -> IntGraph:
    """Read and verify a frozen model (format, every array's size and sha256)."""
    frozen_dir = Path(frozen_dir)
    mpath = frozen_dir / "manifest.json"
    if not mpath.is_file():
        raise GraphError(f"{mpath}: no such file (not a frozen model directory)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphError(f"{mpath}: not valid JSON ({e.msg})") from None
    if m.get("format") != "mixq-intgraph":
        raise GraphError(f"{mpath}: not a mixq frozen model manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise GraphError(f"{mpath}: format version {m.get('format_version')} is not supported "
                         f"(this mixq reads {FORMAT_VERSION})")
    ops = []
    for o in m["ops"]:
        if o["kind"] not in _NUMPY_OPS:
            raise GraphError(f"{mpath}: op '{o['name']}' has unknown kind '{o['kind']}'")
        arrays = {}
        for key, rec in o["arrays"].items():
            path = frozen_dir / rec["file"]
            if not path.is_file():
                raise GraphError(f"{path}: missing array file")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise GraphError(f"{path}: sha256 does not match the manifest (corrupt or modified)")
            count = int(np.prod(rec["shape"], dtype=np.int64))
            if rec.get("packed_bits"):
                arr = unpack_bits(data, rec["packed_bits"], count).astype(rec["dtype"])
            else:
                dt = np.dtype(rec["dtype"]).newbyteorder("<")
                if len(data) != count * dt.itemsize:
                    raise GraphError(f"{path}: {len(data)} bytes, expected {count * dt.itemsize}")
                arr = np.frombuffer(data, dtype=dt).astype(rec["dtype"])
            arrays[key] = arr.reshape(rec["shape"])
        ops.append(Op(o["name"], o["kind"], o["inputs"], o["output"], o["attrs"], arrays))
    tensors = {k: _tensor_from(v) for k, v in m["tensors"].items()}
    return IntGraph(m["model"], _tensor_from(m["input"]), m["output"], ops, tensors, m.get("meta", {}))


# ----------------------------------------------------------------------------- overflow proof
def value_bounds(graph: IntGraph) -> dict:
    """Static proof that no int32 accumulator can overflow.

    Returns {tensor: max |value|} and, per op, the accumulator bound in graph.meta-friendly form.
    The bound uses bit-widths and fan-in first (|acc| <= fan_in * max|x| * max|w| + max|b|);
    where that is loose enough to exceed int32 it falls back to the exact per-channel L1 norm of
    the integer weights (still a proof for every input). Raises GraphError naming the op."""
    def tensor_max(t: TensorInfo) -> int:
        if t.dtype == "uint8":
            return (1 << t.bits) - 1
        if t.dtype == "int8":
            return (1 << (t.bits - 1)) - 1
        raise GraphError(f"tensor '{t.name}': int32 tensors need a producer")

    bound = {graph.input.name: tensor_max(graph.input)}
    acc_bounds = {}
    for op in graph.ops:
        xs = [bound[i] for i in op.inputs]
        if op.kind in ("conv2d", "linear"):
            w = op.arrays["weight"].astype(np.int64)
            fan_in = int(np.prod(w.shape[1:]))
            wmax = (1 << (op.attrs["storage_bits"] - 1)) - 1
            bmax = int(np.abs(op.arrays["bias"].astype(np.int64)).max(initial=0))
            acc = fan_in * xs[0] * wmax + bmax
            if acc > INT32_MAX:
                l1 = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
                acc = int((l1 * xs[0] + np.abs(op.arrays["bias"].astype(np.int64))).max())
            if acc > INT32_MAX:
                raise GraphError(
                    f"layer '{op.name}': int32 accumulator can overflow (bound {acc} > 2^31-1 for "
                    f"{op.attrs['storage_bits']}-bit weights, fan-in {fan_in}, inputs <= {xs[0]})")
            acc_bounds[op.name] = acc
            out = acc if "multiplier" not in op.arrays else (1 << op.attrs["out_bits"]) - 1
        elif op.kind == "add":
            total = 0
            for i, x in enumerate(xs):
                m = int(np.abs(op.arrays[f"multiplier{i}"].astype(np.int64)).max())
                s = int(op.arrays[f"shift{i}"].min())
                if x >= 2**31 or m >= 2**31:
                    raise GraphError(f"layer '{op.name}': input {i} exceeds int32")
                total += (x * m + (1 << (s - 1))) >> s
            if total > INT32_MAX:
                raise GraphError(f"layer '{op.name}': residual sum can overflow int32 (bound {total})")
            acc_bounds[op.name] = total
            out = (1 << op.attrs["out_bits"]) - 1
        elif op.kind == "avgpool":
            acc = xs[0] * op.attrs["kernel"] ** 2
            acc_bounds[op.name] = acc
            out = (1 << op.attrs["out_bits"]) - 1
        else:
            out = xs[0]
        bound[op.output] = out
    return {"tensors": bound, "accumulators": acc_bounds}
