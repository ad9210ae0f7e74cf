"""The integer graph: mixq's contract between freeze, the golden interpreter and compile.

Dependency-light on purpose (NumPy, and mixq.fsio and mixq.errors, which are standard library
only). Semantics are documented in docs/integer-contract.md; every op below has exactly one
NumPy implementation (`_NUMPY_OPS`), which *is* the golden reference. `mixq.intsim` runs the same table in torch.

A graph is a list of ops in execution order. Every tensor is NCHW (or NC) with batch first;
shapes below omit the batch dimension.

    input   int8/uint8      quantized once by the runtime: q = clip(round(x / scale))
    conv2d  int8|uint8 -> uint8 (requantized, ReLU clip) | int8 (requantized, symmetric clip:
            attr out_signed) | int32 (acc + bias, "raw")
    linear  same as conv2d for 2-D tensors
    add     n-ary: y = clip(sum_i rq(x_i, M_i, s_i), 0, 2^bits - 1), M_i/s_i per channel
            (out_signed: clip to +-(2^(bits-1) - 1), int8)
    avgpool y = clip(rq(window_sum, M, s), 0, 2^bits - 1) (out_signed: +-(2^(bits-1) - 1), int8:
            the average of a signed input, e.g. MobileNetV3's Hardswish before its global pool)
    maxpool integer max over zero-padded windows (for uint8 inputs the same as -inf padding)
    flatten NCHW -> N(C*H*W), row-major
    concat  channel concatenation of requantized inputs: y = [clip(rq(x_i, M_i, s_i))]_i along C
    lut     elementwise table lookup of an 8-bit input: y = table[x - lo] (Hardswish, GELU, sigmoid...)

with rq(x, M, s) = (x * M + 2^(s-1)) >> s evaluated in int64 (arithmetic shift = floor).
`validate` checks a graph's structure, shapes and value ranges and re-runs the static int32
overflow proof (`value_bounds`); `save` and `load` both call it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixq import fsio
from mixq.errors import MixqError

FORMAT_VERSION = 1
MAX_SHIFT = 62
INT32_MAX = 2**31 - 1


class GraphError(MixqError, ValueError):
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


def out_range(attrs: dict) -> tuple[int, int, str]:
    """(lo, hi, dtype) of a requantizing op's output: uint8 [0, 2^bits - 1] (the ReLU clip), or
    with attr out_signed int8 [-(2^(bits-1) - 1), 2^(bits-1) - 1] (symmetric, like the input:
    a signed activation, e.g. MobileNetV2's linear bottleneck)."""
    bits = attrs["out_bits"]
    if attrs.get("out_signed"):
        hi = (1 << (bits - 1)) - 1
        return -hi, hi, "int8"
    return 0, (1 << bits) - 1, "uint8"


def value_range(t: TensorInfo) -> tuple[int, int]:
    """(lo, hi) of an int8 or uint8 tensor: [-(2^(bits-1) - 1), 2^(bits-1) - 1] (symmetric: -128
    never occurs) or [0, 2^bits - 1]."""
    if t.dtype == "int8":
        return -((1 << (t.bits - 1)) - 1), (1 << (t.bits - 1)) - 1
    if t.dtype == "uint8":
        return 0, (1 << t.bits) - 1
    raise GraphError(f"tensor '{t.name}': {t.dtype} has no 8-bit value range")


def lut_offset(input_dtype, table_size: int) -> int:
    """-lo of a lut op's input: its index is x + offset. A uint8 input starts at 0; an int8 input
    is symmetric, so its 2^bits - 1 values are centred on the table's middle entry."""
    return (table_size - 1) // 2 if np.dtype(input_dtype) == np.int8 else 0


def clip_out(y: np.ndarray, attrs: dict) -> np.ndarray:
    lo, hi, dtype = out_range(attrs)
    return np.clip(y, lo, hi).astype(dtype)


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
    return clip_out(y, op.attrs)


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
    return clip_out(total, op.attrs)


def np_avgpool(op, x):
    a = op.attrs
    win = _windows(x.astype(np.int64), a["kernel"], a["stride"], a.get("padding", 0))
    s = win.sum(axis=(4, 5))
    y = rq(s, op.arrays["multiplier"], op.arrays["shift"])
    return clip_out(y, op.attrs)


def np_maxpool(op, x):
    a = op.attrs
    win = _windows(x, a["kernel"], a["stride"], a.get("padding", 0))
    return win.max(axis=(4, 5)).astype(x.dtype)


def np_flatten(op, x):
    return x.reshape(x.shape[0], -1)


def np_concat(op, *xs):
    """Each input requantized to the output scale on its own, clipped, then concatenated (axis 1)."""
    return np.concatenate([clip_out(rq(x, op.arrays[f"multiplier{i}"], op.arrays[f"shift{i}"]), op.attrs)
                           for i, x in enumerate(xs)], axis=1)


def np_lut(op, x):
    """y = table[x - lo], lo the input range's low end (graph.lut_offset)."""
    table = op.arrays["table"]
    return table[x.astype(np.int64) + lut_offset(x.dtype, len(table))]


_NUMPY_OPS = {
    "conv2d": np_conv2d,
    "linear": np_linear,
    "add": np_add,
    "avgpool": np_avgpool,
    "maxpool": np_maxpool,
    "flatten": np_flatten,
    "concat": np_concat,
    "lut": np_lut,
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


def is_frozen_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a mixq frozen model manifest (any format version)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("format") == "mixq-intgraph"
    except (OSError, ValueError, AttributeError):
        return False


def check_overwritable(out_dir: str | os.PathLike):
    """Only an empty directory or an earlier frozen model may be replaced (fsio.check_overwritable)."""
    fsio.check_overwritable(out_dir, is_frozen_dir, "a frozen model directory", GraphError)


def save(graph: IntGraph, out_dir: str | os.PathLike) -> Path:
    """Validate, then write manifest.json + arrays/ atomically: everything goes into a temp dir
    beside `out_dir` that is renamed into place; an earlier frozen model there is replaced only
    once the new one is complete (fsio.atomic_dir)."""
    validate(graph)
    out_dir = Path(out_dir)
    check_overwritable(out_dir)
    with fsio.atomic_dir(out_dir, GraphError) as tmp:
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
    return out_dir


def manifest_sha256(frozen_dir: str | os.PathLike) -> str:
    """Identity of a frozen model: the hash of its manifest (which holds every array's hash)."""
    return hashlib.sha256((Path(frozen_dir) / "manifest.json").read_bytes()).hexdigest()


def _tensor_from(d: dict) -> TensorInfo:
    return TensorInfo(d["name"], tuple(d["shape"]), d["dtype"], d["bits"], d["scale"])


def _read_array(frozen_dir: Path, op_name: str, key: str, rec: dict) -> np.ndarray:
    rel = Path(rec["file"])
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("arrays",):
        raise GraphError(f"{frozen_dir / 'manifest.json'}: array file '{rec['file']}' of op '{op_name}' "
                         "is outside arrays/")
    path = frozen_dir / rel
    if not path.is_file():
        raise GraphError(f"{path}: missing array file")
    data = path.read_bytes()
    if len(data) != rec["bytes"]:
        raise GraphError(f"{path}: {len(data)} bytes, the manifest says {rec['bytes']} (truncated or modified)")
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise GraphError(f"{path}: sha256 does not match the manifest (corrupt or modified)")
    shape = tuple(int(d) for d in rec["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    dtype = np.dtype(rec["dtype"])
    if dtype not in (np.int8, np.uint8, np.int16, np.int32):
        raise GraphError(f"{path}: unsupported array dtype {dtype}")
    if rec.get("packed_bits"):
        bits = int(rec["packed_bits"])
        if len(data) != -(-count * bits // 8):
            raise GraphError(f"{path}: {len(data)} bytes cannot hold {count} values of {bits} bits")
        arr = unpack_bits(data, bits, count).astype(dtype)
    else:
        if len(data) != count * dtype.itemsize:
            raise GraphError(f"{path}: {len(data)} bytes, expected {count * dtype.itemsize}")
        arr = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
    return arr.reshape(shape)


def load(frozen_dir: str | os.PathLike) -> IntGraph:
    """Read and verify a frozen model: format, every array's size and sha256, then `validate`."""
    frozen_dir = Path(frozen_dir)
    mpath = frozen_dir / "manifest.json"
    if not mpath.is_file():
        raise GraphError(f"{mpath}: no such file (not a frozen model directory)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "mixq-intgraph":
        raise GraphError(f"{mpath}: not a mixq frozen model manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise GraphError(f"{mpath}: format version {m.get('format_version')} is not supported "
                         f"(this mixq reads {FORMAT_VERSION})")
    try:
        ops = []
        for o in m["ops"]:
            if o["kind"] not in _NUMPY_OPS:
                raise GraphError(f"{mpath}: op '{o['name']}' has unknown kind '{o['kind']}'")
            arrays = {key: _read_array(frozen_dir, o["name"], key, rec) for key, rec in o["arrays"].items()}
            ops.append(Op(o["name"], o["kind"], list(o["inputs"]), o["output"], dict(o["attrs"]), arrays))
        tensors = {k: _tensor_from(v) for k, v in m["tensors"].items()}
        graph = IntGraph(m["model"], _tensor_from(m["input"]), m["output"], ops, tensors, m.get("meta", {}))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, GraphError):
            raise
        raise GraphError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    try:
        validate(graph)
    except GraphError as e:
        raise GraphError(f"{mpath}: {e}") from None
    return graph


# ----------------------------------------------------------------------------- validation
def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _expect(cond: bool, op: Op, msg: str):
    if not cond:
        raise GraphError(f"op '{op.name}' ({op.kind}): {msg}")


def _check_requant(op: Op, m_key: str, s_key: str, channels: int):
    """Multiplier/shift pair: int32, one value or one per channel, 1 <= shift <= 62."""
    for key in (m_key, s_key):
        _expect(key in op.arrays, op, f"missing array '{key}'")
        arr = op.arrays[key]
        _expect(arr.dtype == np.int32, op, f"array '{key}' must be int32, is {arr.dtype}")
        _expect(arr.ndim == 1 and arr.shape[0] in (1, channels), op,
                f"array '{key}' must have 1 or {channels} values, has shape {arr.shape}")
    shift = op.arrays[s_key]
    _expect(bool(np.all((shift >= 1) & (shift <= MAX_SHIFT))), op, f"shifts must be in 1..{MAX_SHIFT}")


def _check_out_bits(op: Op, out: TensorInfo, signed_ok: bool = True):
    bits, signed = op.attrs.get("out_bits"), op.attrs.get("out_signed", False)
    _expect(isinstance(bits, int) and (2 if signed else 1) <= bits <= 8, op,
            f"out_bits must be {'2' if signed else '1'}..8, is {bits!r}")
    _expect(signed in (True, False) and (signed_ok or not signed), op, f"out_signed must be {'a bool' if signed_ok else 'false'}")
    dtype = "int8" if signed else "uint8"
    _expect(out.dtype == dtype and out.bits == bits, op,
            f"output tensor must be {dtype} with {bits} bits, is {out.dtype} with {out.bits}")


def _infer_shape(op: Op, ins: list, out: TensorInfo) -> tuple:
    """Check one op against the contract; returns its output shape (without batch)."""
    a = op.attrs
    if op.kind in ("conv2d", "linear", "avgpool", "maxpool", "flatten", "lut"):
        _expect(len(ins) == 1, op, f"takes one input, has {len(ins)}")
        _expect(ins[0].dtype in ("int8", "uint8"), op, f"input '{ins[0].name}' must be int8 or uint8, is {ins[0].dtype}")
    x = ins[0].shape if ins else ()
    if op.kind in ("conv2d", "linear"):
        w, b = op.arrays.get("weight"), op.arrays.get("bias")
        _expect(w is not None and b is not None, op, "needs arrays 'weight' and 'bias'")
        sb = a.get("storage_bits")
        _expect(isinstance(sb, int) and 1 <= sb <= 16, op, f"storage_bits must be 1..16, is {sb!r}")
        _expect(w.dtype == np.dtype(container_dtype(sb)), op, f"weight must be {container_dtype(sb)} for {sb} storage bits")
        lim = (1 << (sb - 1)) - 1
        _expect(int(np.abs(w.astype(np.int64)).max(initial=0)) <= lim, op,
                f"weights exceed {sb} storage bits (|q| <= {lim})")
        channels = w.shape[0]
        _expect(b.dtype == np.int32 and b.shape == (channels,), op, f"bias must be int32 of shape ({channels},)")
        if op.kind == "conv2d":
            k, s, p, g = a.get("kernel", w.shape[2]), a.get("stride"), a.get("padding"), a.get("groups", 1)
            _expect(all(isinstance(v, int) for v in (s, p, g)) and s >= 1 and p >= 0 and g >= 1, op,
                    "stride >= 1, padding >= 0 and groups >= 1 must be integers")
            _expect(len(x) == 3, op, f"input must be CHW, is {x}")
            _expect(w.ndim == 4 and w.shape[2] == w.shape[3] == k, op, f"weight must be O,C/groups,k,k, is {w.shape}")
            _expect(x[0] == w.shape[1] * g and channels % g == 0, op,
                    f"{x[0]} input channels do not fit weight {w.shape} with groups={g}")
            shape = (channels, _out_size(x[1], k, s, p), _out_size(x[2], k, s, p))
        else:
            _expect(len(x) == 1 and w.ndim == 2 and w.shape[1] == x[0], op, f"input {x} does not fit weight {w.shape}")
            shape = (channels,)
        if "multiplier" in op.arrays:
            _check_requant(op, "multiplier", "shift", channels)
            _check_out_bits(op, out)
        else:
            _expect(out.dtype == "int32", op, "without a multiplier the output is raw int32")
        return shape
    if op.kind == "add":
        _expect(len(ins) >= 1, op, "needs at least one input")
        for i, t in enumerate(ins):
            _expect(t.shape == ins[0].shape, op, f"input shapes differ: {t.shape} vs {ins[0].shape}")
            _check_requant(op, f"multiplier{i}", f"shift{i}", x[0])
        _check_out_bits(op, out)
        return x
    if op.kind in ("avgpool", "maxpool"):
        k, s, p = a.get("kernel"), a.get("stride"), a.get("padding", 0)
        _expect(all(isinstance(v, int) for v in (k, s, p)) and k >= 1 and s >= 1 and 0 <= p < k, op,
                "kernel >= 1, stride >= 1 and 0 <= padding < kernel must be integers")
        _expect(len(x) == 3 and x[1] + 2 * p >= k and x[2] + 2 * p >= k, op, f"window {k} does not fit input {x}")
        if op.kind == "avgpool":
            _check_requant(op, "multiplier", "shift", x[0])
            _check_out_bits(op, out)
        else:
            _expect(out.dtype == ins[0].dtype, op, "output dtype must equal the input's")
        return (x[0], _out_size(x[1], k, s, p), _out_size(x[2], k, s, p))
    if op.kind == "flatten":
        _expect(out.dtype == ins[0].dtype, op, "output dtype must equal the input's")
        return (int(np.prod(x)),)
    if op.kind == "concat":
        _expect(len(ins) >= 1, op, "needs at least one input")
        for i, t in enumerate(ins):
            _expect(t.dtype in ("int8", "uint8"), op, f"input '{t.name}' must be int8 or uint8, is {t.dtype}")
            _expect(len(t.shape) == len(x) and t.shape[1:] == x[1:], op, f"input shapes differ beyond channels: {t.shape} vs {x}")
            _check_requant(op, f"multiplier{i}", f"shift{i}", t.shape[0])
        _check_out_bits(op, out)
        return (sum(t.shape[0] for t in ins),) + tuple(x[1:])
    if op.kind == "lut":
        _check_out_bits(op, out)
        table, (lo, hi), (out_lo, out_hi, dtype) = op.arrays.get("table"), value_range(ins[0]), out_range(a)
        _expect(table is not None and table.dtype == np.dtype(dtype) and table.shape == (hi - lo + 1,), op,
                f"array 'table' must be {dtype} of shape ({hi - lo + 1},): one entry per value of the "
                f"{ins[0].dtype} input of {ins[0].bits} bits, {lo}..{hi}")
        _expect(bool(np.all((table >= out_lo) & (table <= out_hi))), op,
                f"table entries must be in the output range {out_lo}..{out_hi}")
        return x
    raise GraphError(f"op '{op.name}': unknown kind '{op.kind}' (known: {', '.join(OP_KINDS)})")


def validate(graph: IntGraph) -> dict:
    """Check that `graph` is a well-formed program under the contract: ops in execution order,
    every input defined before use, tensor dtypes/shapes consistent with the ops, value ranges
    (weights within storage bits, shifts 1..62), and the static int32 overflow proof.
    Returns `value_bounds(graph)`; raises GraphError naming the op at fault."""
    t_in = graph.input
    if graph.tensors.get(t_in.name) != t_in:
        raise GraphError(f"input tensor '{t_in.name}' is missing from the tensor table")
    if not (t_in.dtype == "int8" and 2 <= t_in.bits <= 8) and not (t_in.dtype == "uint8" and 1 <= t_in.bits <= 8):
        raise GraphError(f"input must be int8 (2..8 bits) or uint8 (1..8 bits), is {t_in.dtype} with {t_in.bits} bits")
    defined = {t_in.name}
    names = set()
    for op in graph.ops:
        _expect(op.name not in names, op, "duplicate op name")
        names.add(op.name)
        for i in op.inputs:
            _expect(i in defined, op, f"input '{i}' is not defined by an earlier op")
        _expect(op.output not in defined, op, f"output '{op.output}' is already defined")
        out = graph.tensors.get(op.output)
        _expect(out is not None, op, f"output '{op.output}' is missing from the tensor table")
        shape = _infer_shape(op, [graph.tensors[i] for i in op.inputs], out)
        _expect(tuple(out.shape) == tuple(shape), op, f"output shape {tuple(out.shape)} should be {tuple(shape)}")
        defined.add(op.output)
    if graph.output not in defined:
        raise GraphError(f"graph output '{graph.output}' is not produced by any op")
    return value_bounds(graph)


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
            out = acc if "multiplier" not in op.arrays else out_range(op.attrs)[1]
        elif op.kind == "add":
            # per channel: the bound of a channel uses that channel's own multiplier and shift
            # (a zero-multiplier channel's shift must not combine with another channel's M)
            total = np.zeros(1, dtype=np.int64)
            for i, x in enumerate(xs):
                m = np.abs(op.arrays[f"multiplier{i}"].astype(np.int64)).reshape(-1)
                s = op.arrays[f"shift{i}"].astype(np.int64).reshape(-1)
                if x >= 2**31 or int(m.max(initial=0)) >= 2**31:
                    raise GraphError(f"layer '{op.name}': input {i} exceeds int32")
                total = total + ((x * m + (np.int64(1) << (s - 1))) >> s)
            total = int(total.max())
            if total > INT32_MAX:
                raise GraphError(f"layer '{op.name}': residual sum can overflow int32 (bound {total})")
            acc_bounds[op.name] = total
            out = out_range(op.attrs)[1]
        elif op.kind == "avgpool":
            acc = xs[0] * op.attrs["kernel"] ** 2
            acc_bounds[op.name] = acc
            out = out_range(op.attrs)[1]
        elif op.kind == "concat":
            out = out_range(op.attrs)[1]            # each input is 8-bit: rq's product fits int64
        elif op.kind == "lut":
            out = out_range(op.attrs)[1]
        else:
            out = xs[0]
        bound[op.output] = out
    return {"tensors": bound, "accumulators": acc_bounds}
