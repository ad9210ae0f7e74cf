"""`mixq export-onnx FROZEN_DIR out.onnx`: a frozen model as a standard QDQ ONNX model.

Every integer tensor of the frozen graph becomes a QuantizeLinear output (int8 input, uint8
activations, zero point 0, the tensor's scale); every op becomes its float ONNX twin between
DequantizeLinear and QuantizeLinear, as ONNX Runtime's own quantizer writes them:

    input (float) -> Clip to the input's integer range -> QuantizeLinear(int8)
    conv2d/linear -> DQ(x) . Conv|Gemm(DQ(weight, per channel), DQ(int32 bias, per channel))
                     [-> Clip to 2^out_bits - 1 steps] -> QuantizeLinear(uint8)
    add           -> per branch: real / out_scale, rounded half up (Floor(v + 0.5)) as the
                     integer add rounds each branch; Add; * out_scale [-> Clip] -> QuantizeLinear
    avgpool       -> DQ . AveragePool(count_include_pad) [-> Clip] -> QuantizeLinear(uint8 | int8)
    maxpool       -> DQ . (zero Pad) . MaxPool -> QuantizeLinear;  flatten -> Flatten
    concat        -> per input: real / out_scale rounded half up; Concat; * out_scale -> QuantizeLinear
    lut           -> on the integers: Cast(int64) + offset . Gather(the table, int8|uint8): exact
    raw int32     -> stays float: the real value (acc + bias) * scale; logits are float32

The weights are the learned integers. Batch norm lives in the per-channel weight/bias scales,
taken from the integer program's own multipliers (scale_c = M_c / 2^s_c * out_scale), so ORT
computes the same real numbers; its float requantization rounds half to even after float32
arithmetic and can differ by one step from the integer rq (see docs/integer-contract.md). A
channel with a negative scale (negative BN gamma) gets its integer weights and bias negated
and a positive scale: the same values, and the form DequantizeLinear is meant for.

Weights with storage bits <= 4 are stored as INT4 (opset 21, DequantizeLinear int4 runs on
ONNX Runtime's CPU provider since 1.19); with an older onnxruntime, or --no-int4, they are
int8 at opset 13. 9-bit weights (all 8 CSQ bits kept) are int16 (opset 21) or, at opset 13,
which has no int16 DequantizeLinear, a float32 initializer holding the same values."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mixq import fsio, graph as G
from mixq.errors import MixqError

INT4_MIN_ONNXRUNTIME = (1, 19)   # CPU EP int4 Q/DQ: onnxruntime PR #20362, first released in 1.19


class ExportError(MixqError, ValueError):
    """The frozen model cannot be exported, or onnx/onnxruntime refuse the result."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ExportError("the onnx package is not installed (pip install 'mixq[onnx]')") from None
    return onnx, helper, numpy_helper


def _version(text: str) -> tuple:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def int4_supported() -> bool:
    """INT4 weights need onnx with the INT4 type and, if installed, onnxruntime >= 1.19."""
    onnx, _, _ = _onnx()
    if not hasattr(onnx.TensorProto, "INT4"):
        return False
    try:
        import onnxruntime
    except ImportError:
        return True                               # the model is standard ONNX either way
    return _version(onnxruntime.__version__) >= INT4_MIN_ONNXRUNTIME


class _Exporter:
    def __init__(self, g: G.IntGraph, int4: bool):
        self.onnx, self.helper, self.numpy_helper = _onnx()
        self.g, self.int4 = g, int4
        self.opset = 21 if int4 else 13
        self.nodes, self.inits = [], []
        self.qname = {}       # frozen tensor -> ONNX name of its integer value
        self.fname = {}       # frozen tensor -> ONNX name of its real (float) value
        self.int4_layers = []
        self.made = set()     # names of shared initializers already made

    # -- building blocks -------------------------------------------------------------------
    def node(self, op_type, inputs, output, **attrs):
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def init(self, name, array):
        self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, q: np.ndarray, bits: int, scale: np.ndarray) -> str:
        """DequantizeLinear of the integer weights (per output channel) in the narrowest type
        it takes at this opset: int4 / int8 / int16. Opset 13 has no int16, and ORT's QDQ
        fusion rejects int32 weights, so 9-bit weights are a float initializer there."""
        TP = self.onnx.TensorProto
        if bits > 8 and self.opset < 21:
            return self.init(f"{name}_float", (q * scale.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32))
        if bits <= 4 and self.int4:
            self.inits.append(self.helper.make_tensor(f"{name}_q", TP.INT4, q.shape, q.ravel().tolist()))
        else:
            self.init(f"{name}_q", q.astype(np.int8 if bits <= 8 else np.int16))
        self.init(f"{name}_scale", scale.astype(np.float32))
        return self.node("DequantizeLinear", [f"{name}_q", f"{name}_scale"], f"{name}_dq", axis=0)

    def scale_zero(self, t: G.TensorInfo):
        """(scale, zero point) initializers of an integer tensor, made once."""
        s, z = f"{t.name}_scale", f"{t.name}_zero_point"
        if s not in self.made:
            self.init(s, np.float32(t.scale))
            self.init(z, np.zeros((), dtype=t.dtype))
            self.made.add(s)
        return s, z

    def dq(self, tensor: str) -> str:
        """The real value of a frozen tensor, dequantizing its integer form once."""
        if tensor not in self.fname:
            s, z = self.scale_zero(self.g.tensors[tensor])
            self.fname[tensor] = self.node("DequantizeLinear", [self.qname[tensor], s, z], f"{tensor}_dq")
        return self.fname[tensor]

    def quantize(self, real: str, tensor: str, out_bits: int | None = None):
        """Real value -> the frozen tensor's integers; clip first when fewer than 8 bits."""
        t = self.g.tensors[tensor]
        if out_bits is not None and t.dtype == "int8":     # a signed activation: symmetric, -128 never occurs
            levels = (1 << (out_bits - 1)) - 1
            hi = self.init(f"{tensor}_clip_max", np.float32(levels * t.scale))
            lo = self.init(f"{tensor}_clip_min", np.float32(-levels * t.scale))
            real = self.node("Clip", [real, lo, hi], f"{tensor}_clip")
        elif out_bits is not None and out_bits < 8:
            hi = self.init(f"{tensor}_clip_max", np.float32(((1 << out_bits) - 1) * t.scale))
            lo = self.init(f"{tensor}_clip_min", np.float32(0.0))
            real = self.node("Clip", [real, lo, hi], f"{tensor}_clip")
        s, z = self.scale_zero(t)
        self.qname[tensor] = self.node("QuantizeLinear", [real, s, z], f"{tensor}_q")

    # -- ops -------------------------------------------------------------------------------
    def weight_layer(self, op: G.Op):
        x = self.g.tensors[op.inputs[0]]
        out = self.g.tensors[op.output]
        requant = "multiplier" in op.arrays
        if requant:   # the integer program's own acc -> real factor per channel
            real = op.arrays["multiplier"].astype(np.float64) / 2.0 ** op.arrays["shift"].astype(np.float64) * out.scale
        else:
            real = np.asarray(out.scale, dtype=np.float64) * np.ones(op.arrays["weight"].shape[0])
        sign = np.where(real < 0, -1, 1)
        mag = np.where(real == 0, 1.0, np.abs(real))          # scale 0: weights and bias are zeroed
        keep = (real != 0).astype(np.int64)
        w = op.arrays["weight"].astype(np.int64) * (sign * keep).reshape((-1,) + (1,) * (op.arrays["weight"].ndim - 1))
        b = op.arrays["bias"].astype(np.int64) * sign * keep
        bits = op.attrs["storage_bits"]
        if bits <= 4 and self.int4:
            self.int4_layers.append(op.name)
        wd = self.weight(f"{op.name}_weight", w, bits, mag / float(x.scale))
        bq = self.init(f"{op.name}_bias_q", b.astype(np.int32))
        bs = self.init(f"{op.name}_bias_scale", mag.astype(np.float32))
        bd = self.node("DequantizeLinear", [bq, bs], f"{op.name}_bias_dq", axis=0)
        if op.kind == "conv2d":
            a = op.attrs
            k = op.arrays["weight"].shape[2]
            y = self.node("Conv", [self.dq(op.inputs[0]), wd, bd], f"{op.output}_real", kernel_shape=[k, k],
                          strides=[a["stride"]] * 2, pads=[a["padding"]] * 4, group=a.get("groups", 1))
        else:
            y = self.node("Gemm", [self.dq(op.inputs[0]), wd, bd], f"{op.output}_real", transB=1)
        if requant:
            self.quantize(y, op.output, op.attrs["out_bits"])
        else:
            self.fname[op.output] = y

    def add(self, op: G.Op):
        """Each branch is rounded to the output grid before the sum, as the integer add does."""
        out = self.g.tensors[op.output]
        inv = self.init(f"{op.output}_inv_scale", np.float32(1.0 / out.scale))
        steps = []
        for i, name in enumerate(op.inputs):
            real = self.dq(name) if name in self.qname else self.fname[name]
            scaled = self.node("Mul", [real, inv], f"{op.output}_branch{i}")
            steps.append(self.node("Floor", [self.node("Add", [scaled, self.half()], f"{op.output}_branch{i}_half")],
                                   f"{op.output}_branch{i}_steps"))
        total = steps[0]
        for i, t in enumerate(steps[1:], 1):
            total = self.node("Add", [total, t], f"{op.output}_sum{i}")
        scale, _ = self.scale_zero(out)
        self.quantize(self.node("Mul", [total, scale], f"{op.output}_real"), op.output, op.attrs["out_bits"])

    def concat(self, op: G.Op):
        """Each input rounded to the output grid (half up, as rq rounds), then joined."""
        out = self.g.tensors[op.output]
        inv = self.init(f"{op.output}_inv_scale", np.float32(1.0 / out.scale))
        steps = [self.node("Floor", [self.node("Add", [self.node("Mul", [self.dq(name), inv], f"{op.output}_in{i}"),
                                                       self.half()], f"{op.output}_in{i}_half")], f"{op.output}_in{i}_steps")
                 for i, name in enumerate(op.inputs)]
        joined = self.node("Concat", steps, f"{op.output}_steps", axis=1)
        scale, _ = self.scale_zero(out)
        self.quantize(self.node("Mul", [joined, scale], f"{op.output}_real"), op.output, op.attrs["out_bits"])

    def lut(self, op: G.Op):
        """The integer table itself, indexed by the integer input: bit for bit the contract's."""
        table = op.arrays["table"]
        offset = G.lut_offset(self.g.tensors[op.inputs[0]].dtype, len(table))
        index = self.node("Cast", [self.qname[op.inputs[0]]], f"{op.output}_index", to=self.onnx.TensorProto.INT64)
        if offset:
            index = self.node("Add", [index, self.init(f"{op.output}_offset", np.int64(offset))], f"{op.output}_index_offset")
        self.qname[op.output] = self.node("Gather", [self.init(f"{op.output}_table", table), index], f"{op.output}_q", axis=0)

    def half(self) -> str:
        if "half" not in self.made:
            self.init("half", np.float32(0.5))
            self.made.add("half")
        return "half"

    def avgpool(self, op: G.Op):
        a = op.attrs
        y = self.node("AveragePool", [self.dq(op.inputs[0])], f"{op.output}_real", kernel_shape=[a["kernel"]] * 2,
                      strides=[a["stride"]] * 2, pads=[a.get("padding", 0)] * 4, count_include_pad=1)
        self.quantize(y, op.output, a["out_bits"])

    def maxpool(self, op: G.Op):
        a = op.attrs
        x = self.dq(op.inputs[0])
        p = a.get("padding", 0)
        if p:   # the contract pads with zeros (ONNX MaxPool pads with -inf)
            pads = self.init(f"{op.output}_pads", np.array([0, 0, p, p, 0, 0, p, p], dtype=np.int64))
            x = self.node("Pad", [x, pads], f"{op.output}_padded", mode="constant")
        y = self.node("MaxPool", [x], f"{op.output}_real", kernel_shape=[a["kernel"]] * 2, strides=[a["stride"]] * 2)
        self.quantize(y, op.output)

    def flatten(self, op: G.Op):
        self.qname[op.output] = self.node("Flatten", [self.qname[op.inputs[0]]], f"{op.output}_q", axis=1)

    # -- whole graph -----------------------------------------------------------------------
    def build(self):
        g, helper, TP = self.g, self.helper, self.onnx.TensorProto
        t = g.input
        if t.dtype == "int8":
            lo, hi = -((1 << (t.bits - 1)) - 1), (1 << (t.bits - 1)) - 1
        else:
            lo, hi = 0, (1 << t.bits) - 1
        lo_n = self.init("input_clip_min", np.float32(lo * t.scale))
        hi_n = self.init("input_clip_max", np.float32(hi * t.scale))
        clipped = self.node("Clip", ["input", lo_n, hi_n], "input_clip")
        s, z = self.scale_zero(t)
        self.qname[t.name] = self.node("QuantizeLinear", [clipped, s, z], f"{t.name}_q")
        table = {"conv2d": self.weight_layer, "linear": self.weight_layer, "add": self.add,
                 "avgpool": self.avgpool, "maxpool": self.maxpool, "flatten": self.flatten, "concat": self.concat,
                 "lut": self.lut}
        for op in g.ops:
            table[op.kind](op)
        final = self.fname[g.output] if g.output in self.fname else self.dq(g.output)
        self.node("Identity", [final], "logits")
        out_shape = ["N", *g.tensors[g.output].shape]
        graph = helper.make_graph(
            self.nodes, re.sub(r"\W", "_", g.model),          # a user model's spec: FILE.py:FUNCTION
            [helper.make_tensor_value_info("input", TP.FLOAT, ["N", *t.shape])],
            [helper.make_tensor_value_info("logits", TP.FLOAT, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="mixq", doc_string=f"mixq frozen model '{g.model}' as QDQ")
        model.ir_version = min(model.ir_version, 10 if self.opset >= 21 else 8)
        return model


def export(g: G.IntGraph, int4: bool | None = None, source_sha256: str | None = None):
    """IntGraph -> checked onnx.ModelProto. int4=None: use INT4 where onnxruntime supports it."""
    onnx, helper, _ = _onnx()
    ex = _Exporter(g, int4_supported() if int4 is None else int4)
    model = ex.build()
    meta = {"mixq_model": g.model, "int4_layers": ",".join(ex.int4_layers)}
    if source_sha256:
        meta["mixq_manifest_sha256"] = source_sha256
    helper.set_model_props(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported ONNX model of '{g.model}' fails onnx.checker: {str(e).splitlines()[0]}") from None
    return model


def write_atomic(model, out_path) -> Path:
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a directory; give the .onnx file to write")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fsio.write_bytes(out_path, model.SerializeToString(), ExportError)
    return out_path


def check_runs(model) -> None:
    """Load the model in ONNX Runtime (when installed) before anything is written."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported model: {str(e).splitlines()[0]}") from None


def add_arguments(p):
    p.add_argument("frozen_dir")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--no-int4", action="store_true", help="store <=4-bit weights as int8 (opset 13)")


def run(args) -> int:
    g = G.load(args.frozen_dir)
    model = export(g, False if args.no_int4 else None, G.manifest_sha256(args.frozen_dir))
    check_runs(model)
    out = write_atomic(model, args.out)
    int4 = [p.value for p in model.metadata_props if p.key == "int4_layers"][0]
    print(f"exported {g.model} -> {out}: {out.stat().st_size:,} bytes, opset {model.opset_import[0].version}, "
          f"{len(model.graph.node)} nodes, int4 weights in {len(int4.split(',')) if int4 else 0} layers")
    return 0
