"""`mixq freeze`: checkpoint -> integer-only graph (docs/integer-contract.md).

The trained model is traced with torch.fx (quantizers, conv/linear, BN and pools as leaves)
and walked once with these kinds of values:

    Quant   a materialized integer tensor (graph input, activation): name, real scale
    Acc     a pending linear op (conv/linear/avgpool) whose float affine epilogue is still
            being folded: per-channel real scale and real bias (BN folds into both)
    Sum     a pending residual add of Acc/Quant branches
    Cat     a pending channel concatenation of Quant values
    Table   a pending elementwise activation (Hardswish, GELU, sigmoid...) of a Quant value

An ActQuant (ReLU + uniform quantizer) or SignedQuant materializes what it receives: an Acc
becomes one op with a per-channel fixed-point requantization, a Sum becomes raw int32 branches
plus an `add` op that requantizes each branch to the output scale, a Cat a `concat` op, a Table
a `lut` op whose table is the activation of every input value, quantized to the output scale.
The graph output (last linear) stays int32. The learned integer weights are never touched: BN
goes to bias/multiplier."""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from mixq import fsio, graph as G
from mixq.errors import MixqError
from mixq.train import quant, surgery
from mixq.train.checkpoint import load_checkpoint, restore_model, training_facts
from mixq.train.errors import TrainError
from mixq.train.surgery import Tracer


class FreezeError(MixqError, ValueError):
    """A checkpoint or model that cannot become an integer graph (one line naming the layer or file)."""


@dataclass
class Quant:
    name: str
    scale: float
    shape: tuple


@dataclass
class Acc:
    kind: str                 # conv2d | linear | avgpool
    layer: str
    input: Quant
    scale: np.ndarray         # real value = acc * scale[c] + bias[c]
    bias: np.ndarray
    shape: tuple
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass
class Sum:
    branches: list
    shape: tuple


@dataclass
class Cat:
    """A pending channel concatenation of quantized tensors; the quantizer after it (surgery
    puts one there) gives the output scale: one `concat` op requantizes every part to it."""
    parts: list
    shape: tuple


@dataclass
class Table:
    """A pending elementwise activation module `fn` of a quantized tensor; the quantizer after it
    (swap_layers puts one there) gives the output scale: one `lut` op, the table fn's values on
    the input's integer grid, quantized as that quantizer does."""
    layer: str
    fn: nn.Module
    input: Quant
    shape: tuple


def freeze_model(model: nn.Module, model_name: str, input_shape: tuple, meta: dict | None = None) -> G.IntGraph:
    """A hardened QuantModel -> IntGraph (validated, overflow-proven). The model is read on
    the CPU in eval mode and handed back on its device and in its mode."""
    return _walk(model, model_name, input_shape).finish(meta or {})


def unsupported(model: nn.Module, model_name: str, input_shape: tuple) -> list[str]:
    """Every reason freeze would refuse `model`'s structure, one per op, without stopping at the
    first (what TVM's ONNX frontend does with unsupported operators): `mixq train` runs it on
    the untrained model, so a net with ops freeze cannot take is refused before any training,
    in one message. An op fed by a refused one is not reported again. Checks that depend on
    trained values (the overflow proof, finite folded scales) are freeze's, after training."""
    problems = []
    _walk(model, model_name, input_shape, problems)
    return problems


class _Unknown:
    """The value of an op freeze refused, while collecting: what consumes it is skipped."""


def _walk(model: nn.Module, model_name: str, input_shape: tuple, problems: list | None = None) -> "_Builder":
    """The builder after visiting every node of the traced model. problems=None: the first
    refusal raises; a list: refusals are appended and the walk goes on. The model is read on
    the CPU in eval mode and handed back on its device and in its mode."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.cpu().eval()
    b = _Builder(model_name, tuple(input_shape))
    try:
        try:
            fx_graph = Tracer().trace(model)
        except Exception as e:
            error = FreezeError(f"model '{model_name}' cannot be traced by torch.fx, which freeze needs "
                                f"({type(e).__name__}: {str(e)[:160]})")
            if problems is None:
                raise error from None
            problems.append(str(error))
            return b
        modules = dict(model.named_modules())
        env = {}
        for node in fx_graph.nodes:
            if problems is not None and any(isinstance(env.get(a.name), _Unknown) for a in node.all_input_nodes):
                refusal = _refusal(node, modules)
                if refusal:
                    problems.append(refusal)
                env[node.name] = _Unknown()
                continue
            try:
                env[node.name] = b.visit(node, modules, env)
            except FreezeError as e:
                if problems is None:
                    raise
                problems.append(str(e))
                env[node.name] = _Unknown()
        return b
    finally:
        model.to(device).train(was_training)


def _check_finite(layer: str, what: str, *values, positive: bool = False):
    """No NaN or inf (nor, with positive, a scale <= 0) reaches an integer cast: one line naming the layer."""
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if not all(np.isfinite(a).all() and (not positive or (a > 0).all()) for a in arrays):
        raise FreezeError(f"layer '{layer}': {what} has NaN or inf values{' or is not positive' if positive else ''} "
                          "(diverged or damaged weights?)")


# What freeze has a rule for, besides the modules of _MODULES, quantized weight layers and table activations.
_FUNCTIONS = {operator.add: "add", torch.add: "add", torch.flatten: "flatten", torch.reshape: "reshape",
              torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat"}
_METHODS = {"add": "add", "flatten": "flatten", "view": "reshape", "reshape": "reshape", "size": "size"}
_MODULES = (quant.InputQuant, quant.ActQuant, quant.SignedQuant, nn.BatchNorm2d, nn.BatchNorm1d, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
            nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


class _Batch:
    """x.size(0): the batch dimension, as a view/reshape argument."""


def _where(node) -> str:
    path = surgery.owner(node)
    return f" in '{path}'" if path else ""


def _refusal(node, modules) -> str | None:
    """Why freeze has no rule for `node`'s op (one line naming it and its module), or None.
    Decided from the op alone, so an op fed by a refused one is still judged (unsupported())."""
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _MODULES) or hasattr(m, "integer_weight") or quant.table_activation(m):
            return None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return f"layer '{node.target}' ({type(m).__name__}) has float weights: it was not quantized"
        return f"layer '{node.target}' ({type(m).__name__}) is not supported by freeze"
    if node.op == "call_function" and node.target in _FUNCTIONS or node.op == "call_method" and node.target in _METHODS:
        return None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        what = "F." + name if getattr(nn.functional, name, None) is node.target else \
            "torch." + name if getattr(torch, name, None) is node.target else \
            f"{getattr(node.target, '__module__', None) or '?'}.{name}".replace("_operator.", "operator.")
    else:
        what = f"Tensor.{node.target}" if node.op == "call_method" else f"{node.op} {node.target}"
    return f"operation '{node.name}' ({what}{_where(node)}) is not supported by freeze"


class _Builder:
    def __init__(self, model_name, input_shape):
        self.model_name, self.input_shape = model_name, input_shape
        self.ops, self.tensors, self.input, self.output = [], {}, None, None
        self.layer_info = []

    # -- helpers -------------------------------------------------------------------------
    def _tensor(self, name, shape, dtype, bits, scale):
        t = G.TensorInfo(name, tuple(int(s) for s in shape), dtype, int(bits),
                         [float(v) for v in scale] if isinstance(scale, (list, np.ndarray)) else float(scale))
        self.tensors[name] = t
        return t

    def _emit(self, name, kind, inputs, shape, dtype, bits, scale, attrs=None, arrays=None):
        out = self._tensor(name, shape, dtype, bits, scale)
        self.ops.append(G.Op(name, kind, list(inputs), out.name, attrs or {}, arrays or {}))
        return out

    def _raw(self, acc: Acc) -> str:
        """Materialize an Acc as int32 acc + bias (no requantization)."""
        bias_q = self._int_bias(acc)
        out = self._emit(acc.layer, acc.kind, [acc.input.name], acc.shape, "int32", 32, acc.scale,
                         acc.attrs, {**acc.arrays, "bias": bias_q})
        return out.name

    def _int_bias(self, acc: Acc) -> np.ndarray:
        b = np.round(acc.bias / acc.scale)
        _check_finite(acc.layer, "folded bias", b)
        if np.any(np.abs(b) > 2**30):
            raise FreezeError(f"layer '{acc.layer}': folded bias does not fit int32 (BN gamma ~ 0?)")
        return b.astype(np.int32)

    def _constant_channels(self, acc: Acc, out_scale: float, clip: tuple | None):
        """A channel of scale 0 (batch norm gamma = 0: a pruned channel, zero_init_residual) is
        the constant acc.bias[c] whatever its input. It becomes an ordinary channel of scale
        out_scale / 2^s, with 2^(s-1) above its accumulator bound, and bias q * out_scale: the
        integer bias is then q * 2^s and requantizing to out_scale gives exactly q for every input
        (q = the constant's level, clipped to the output range `clip`, (lo, hi), when given)."""
        const = np.flatnonzero(acc.scale == 0)
        if not len(const) or acc.kind == "avgpool":
            return
        t = self.tensors[acc.input.name]
        x_max = (1 << t.bits) - 1 if t.dtype == "uint8" else (1 << (t.bits - 1)) - 1
        w = acc.arrays["weight"].astype(np.int64)
        bound = np.abs(w).reshape(len(w), -1).sum(axis=1) * x_max          # |acc| per channel
        q = np.rint(acc.bias / out_scale)
        if clip is not None:
            q = np.clip(q, *clip)
        for c in const:
            s = int(bound[c]).bit_length() + 1
            if abs(q[c]) * 2.0**s + bound[c] > G.INT32_MAX:
                raise FreezeError(f"layer '{acc.layer}': channel {c} is constant (batch norm gamma = 0) at "
                                  f"{q[c]:.0f} output levels, more than its int32 accumulator can hold")
            acc.scale[c], acc.bias[c] = out_scale / 2.0**s, q[c] * out_scale

    # -- nodes ---------------------------------------------------------------------------
    def visit(self, node, modules, env):
        refusal = _refusal(node, modules)
        if refusal:
            raise FreezeError(refusal)
        arg = lambda i: env[node.args[i].name] if isinstance(node.args[i], torch.fx.Node) else node.args[i]
        if node.op == "placeholder":
            return "input"
        if node.op == "output":
            return self._output(env[node.args[0].name])
        if node.op == "call_module":
            return self._module(node.target, modules[node.target], arg(0))
        kind = _FUNCTIONS.get(node.target) if node.op == "call_function" else _METHODS.get(node.target)
        if kind == "add":
            return self._add(node.name, arg(0), arg(1))
        if kind == "cat":
            dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else 0))
            return self._cat(node.name, [env[n.name] for n in node.args[0]], dim)
        if kind == "flatten":
            return self._flatten(node.name, arg(0))
        if kind == "size":
            if node.args[1:] != (0,) or node.kwargs:
                raise FreezeError(f"operation '{node.name}': only x.size(0), the batch, is supported")
            return _Batch()
        return self._reshape(node.name, arg(0), [arg(i) for i in range(1, len(node.args))])

    def _module(self, name, m, x):
        if isinstance(m, quant.InputQuant):
            scale = float(m.scale)
            _check_finite(name, "input scale", scale, positive=True)
            self.input = self._tensor("input", self.input_shape, "int8", m.bits, scale)
            return Quant("input", scale, self.input_shape)
        if hasattr(m, "integer_weight"):
            return self._weight_layer(name, m, x)
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            return self._bn(name, m, x)
        if isinstance(m, (quant.ActQuant, quant.SignedQuant)):
            return self._act(name, m, x)
        if isinstance(m, quant.AVG_POOLS):
            return self._avgpool(name, m, x)
        if isinstance(m, nn.MaxPool2d):
            return self._maxpool(name, m, x)
        if isinstance(m, nn.Flatten):
            return self._flatten(name, x)
        if quant.table_activation(m):
            x = self._need_quant(name, x)
            return Table(name, m, x, x.shape)
        return x                                            # nn.Identity, nn.Dropout (see _refusal)

    def _need_quant(self, name, x):
        if isinstance(x, Table):
            raise FreezeError(f"layer '{name}': its input is activation '{x.layer}' ({type(x.fn).__name__}) with no "
                              "quantizer after it (mixq puts one after each such activation)")
        if isinstance(x, Cat):
            raise FreezeError(f"layer '{name}': its input is a concatenation with no activation after it (mixq "
                              "quantizes concatenations of ReLU outputs, which it follows with a ReLU)")
        if not isinstance(x, Quant):
            raise FreezeError(f"layer '{name}': input is not a quantized tensor (missing activation quantizer before it)")
        return x

    def _weight_layer(self, name, m, x):
        x = self._need_quant(name, x)
        q, scale = m.integer_weight()
        info = m.bit_info()
        _check_finite(name, "integer weights", q.numpy())
        _check_finite(name, "weight scale", scale)
        q = q.numpy().astype(np.int64)
        dtype = G.container_dtype(info.storage_bits)
        lim = (1 << (info.storage_bits - 1)) - 1
        if np.abs(q).max(initial=0) > lim:
            raise FreezeError(f"layer '{name}': integer weights exceed their {info.storage_bits} storage bits")
        out_ch = q.shape[0]
        bias = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(out_ch)
        attrs = {"storage_bits": info.storage_bits, "precision": info.precision, "kept_bits": info.kept,
                 "weight_scale": scale}
        if isinstance(m, nn.Conv2d):
            if m.dilation != (1, 1) or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1] \
                    or m.kernel_size[0] != m.kernel_size[1] or isinstance(m.padding, str):
                raise FreezeError(f"layer '{name}': only square kernels/strides/padding without dilation are supported")
            c, h, w = x.shape
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            shape = (out_ch, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
            attrs.update(stride=s, padding=p, groups=m.groups)
            kind = "conv2d"
        else:
            kind, shape = "linear", (out_ch,)
        self.layer_info.append({"name": name, "params": int(q.size), **{k: attrs[k] for k in ("precision", "storage_bits", "kept_bits")}})
        return Acc(kind, name, x, x.scale * np.broadcast_to(np.asarray(scale, dtype=np.float64), (out_ch,)).copy(),
                   bias, shape, attrs, {"weight": q.astype(dtype)})

    def _bn(self, name, m, x):
        if not isinstance(x, Acc) or x.kind == "avgpool":
            raise FreezeError(f"layer '{name}': batch norm must follow a conv or linear layer")
        g = m.weight.detach().double().numpy() if m.affine else np.ones(m.num_features)
        beta = m.bias.detach().double().numpy() if m.affine else np.zeros(m.num_features)
        inv = g / np.sqrt(m.running_var.double().numpy() + m.eps)
        x.scale = x.scale * inv
        x.bias = (x.bias - m.running_mean.double().numpy()) * inv + beta
        _check_finite(name, "batch norm (folded scale and bias)", x.scale, x.bias)
        return x

    def _act(self, name, m, x):
        if m.bits >= 32:
            raise FreezeError(f"layer '{name}': activations are float (--act-bits 32); an integer graph needs 2..8 bits")
        out_scale = m.scale()
        _check_finite(name, "activation clip", out_scale, positive=True)
        bits = m.bits
        # a ReLU-like ActQuant: uint8 0..levels; a SignedQuant: int8 -levels..levels (out_signed)
        signed = isinstance(m, quant.SignedQuant)
        dtype, out_attrs = ("int8", {"out_bits": bits, "out_signed": True}) if signed else ("uint8", {"out_bits": bits})
        if isinstance(x, Acc):
            self._constant_channels(x, out_scale, (-m.levels if signed else 0, m.levels))
            real = x.scale / out_scale
            if x.kind == "avgpool":       # one multiplier: the pool's divisor and scale ratio
                real, arrays = real[:1], {}
            else:
                arrays = {**x.arrays, "bias": self._int_bias(x)}
            arrays["multiplier"], arrays["shift"] = G.quantize_multiplier(real, x.layer)
            out = self._emit(x.layer, x.kind, [x.input.name], x.shape, dtype, bits, out_scale,
                             {**x.attrs, **out_attrs}, arrays)
            return Quant(out.name, out_scale, x.shape)
        if isinstance(x, Table):
            table = self._table(x, out_scale, -m.levels if signed else 0, m.levels).astype(dtype)
            out = self._emit(x.layer, "lut", [x.input.name], x.shape, dtype, bits, out_scale,
                             {**out_attrs, "function": repr(x.fn)}, {"table": table})
            return Quant(out.name, out_scale, x.shape)
        if isinstance(x, Cat):
            arrays = {}
            for i, p in enumerate(x.parts):
                arrays[f"multiplier{i}"], arrays[f"shift{i}"] = G.quantize_multiplier(np.array([p.scale / out_scale]), name)
            out = self._emit(name, "concat", [p.name for p in x.parts], x.shape, dtype, bits, out_scale, out_attrs, arrays)
            return Quant(out.name, out_scale, x.shape)
        branches = x.branches if isinstance(x, Sum) else [x]
        inputs, arrays = [], {}
        for i, br in enumerate(branches):
            if isinstance(br, Acc):
                self._constant_channels(br, out_scale, None)
                inputs.append(self._raw(br))
                real = br.scale / out_scale
            else:
                inputs.append(br.name)
                real = np.full(x.shape[0], br.scale / out_scale)
            arrays[f"multiplier{i}"], arrays[f"shift{i}"] = G.quantize_multiplier(real, name)
        out = self._emit(name, "add", inputs, x.shape, dtype, bits, out_scale, out_attrs, arrays)
        return Quant(out.name, out_scale, x.shape)

    def _table(self, x: Table, out_scale: float, lo: int, hi: int) -> np.ndarray:
        """fn at every value of the input's integer range, q * s_in, in float64 (fn is the very
        module the model was trained with, so its arguments come along: LeakyReLU's slope, GELU's
        approximation), divided by the output scale, rounded half to even as the quantizer's
        torch.round does, clipped to its levels."""
        q_lo, q_hi = G.value_range(self.tensors[x.input.name])
        with torch.no_grad():
            real = x.fn(torch.arange(q_lo, q_hi + 1, dtype=torch.float64) * x.input.scale).numpy()
        _check_finite(x.layer, f"{type(x.fn).__name__} of the input grid", real)
        return np.clip(np.rint(real / out_scale), lo, hi)

    def _cat(self, name, parts, dim):
        if dim not in (1, -3) or not parts or any(len(p.shape) != 3 for p in parts if isinstance(p, Quant)):
            raise FreezeError(f"operation '{name}': only a concatenation of feature maps along channels (dim 1) "
                              "is supported")
        for p in parts:
            if not isinstance(p, Quant):
                raise FreezeError(f"operation '{name}': concatenates a value that is not a quantized tensor "
                                  "(an activation quantizer is missing before it)")
            if p.shape[1:] != parts[0].shape[1:]:
                raise FreezeError(f"operation '{name}': feature maps of different sizes {p.shape} and {parts[0].shape}")
        return Cat(parts, (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:]))

    def _add(self, name, a, b):
        branches = []
        for v in (a, b):
            if isinstance(v, Sum):
                branches += v.branches
            elif isinstance(v, (Acc, Quant)):
                branches.append(v)
            elif isinstance(v, Table):
                self._need_quant(name, v)
            else:
                raise FreezeError(f"operation '{name}': cannot add {type(v).__name__}")
        if any(isinstance(v, Acc) and v.kind == "avgpool" for v in branches):
            raise FreezeError(f"operation '{name}': adding a pooled tensor is not supported")
        return Sum(branches, branches[0].shape)

    def _avgpool(self, name, m, x):
        x = self._need_quant(name, x)
        c, h, w = x.shape
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if tuple(size) != (1, 1):
                raise FreezeError(f"layer '{name}': only global adaptive average pooling is supported")
            k, s, p = h, h, 0
            if h != w:
                raise FreezeError(f"layer '{name}': global pooling needs a square input, got {h}x{w}")
        else:
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            p = m.padding if isinstance(m.padding, int) else m.padding[0]
            if p and m.count_include_pad is False:
                raise FreezeError(f"layer '{name}': count_include_pad=False is not supported")
        shape = (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        return Acc("avgpool", name, x, np.full(c, x.scale / (k * k)), np.zeros(c), shape,
                   {"kernel": k, "stride": s, "padding": p})

    def _maxpool(self, name, m, x):
        x = self._need_quant(name, x)
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        p = m.padding if isinstance(m.padding, int) else m.padding[0]
        if (m.dilation if isinstance(m.dilation, int) else m.dilation[0]) != 1 or m.ceil_mode:
            raise FreezeError(f"layer '{name}': dilated or ceil-mode max pooling is not supported")
        c, h, w = x.shape
        shape = (c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        t = self.tensors[x.name]
        out = self._emit(name, "maxpool", [x.name], shape, t.dtype, t.bits, x.scale, {"kernel": k, "stride": s, "padding": p})
        return Quant(out.name, x.scale, shape)

    def _reshape(self, name, x, shape):
        """x.view(x.size(0), -1), x.reshape(N, C*H*W)...: a flatten; any other reshape is refused."""
        x = self._need_quant(name, x)
        rest = shape[1:] if shape and isinstance(shape[0], (_Batch, int)) else None
        if rest is None or len(rest) != 1 or rest[0] not in (-1, int(np.prod(x.shape))):
            raise FreezeError(f"operation '{name}': only a reshape to (batch, -1), a flatten, is supported")
        return self._flatten(name, x)

    def _flatten(self, name, x):
        x = self._need_quant(name, x)
        shape = (int(np.prod(x.shape)),)
        t = self.tensors[x.name]
        out = self._emit(name.replace(".", "_"), "flatten", [x.name], shape, t.dtype, t.bits, x.scale)
        return Quant(out.name, x.scale, shape)

    def _output(self, x):
        if isinstance(x, Acc):
            # Logits stay int32 and are ranked as integers: that equals ranking the real logits
            # only if every class shares one positive scale (no BN after the last layer).
            if not (np.all(x.scale == x.scale[0]) and x.scale[0] > 0):
                raise FreezeError(f"layer '{x.layer}': the output layer's per-class scales differ or are not "
                                  "positive (batch norm after the classifier?); int32 logits would not rank "
                                  "like the real ones")
            self.output = self._raw(x)
        elif isinstance(x, Quant):
            self.output = x.name
        else:
            raise FreezeError("model output must be a linear/conv layer or a quantized tensor")
        return self.output

    def finish(self, meta) -> G.IntGraph:
        if self.input is None:
            raise FreezeError("model has no input quantizer (InputQuant)")
        g = G.IntGraph(self.model_name, self.input, self.output, self.ops, self.tensors,
                       {**meta, "layers": self.layer_info})
        try:
            bounds = G.validate(g)          # structure, shapes, value ranges, int32 overflow proof
        except G.GraphError as e:
            raise FreezeError(str(e)) from None
        g.meta["accumulator_bounds"] = bounds["accumulators"]
        return g


# ----------------------------------------------------------------------------- command
def freeze_checkpoint(ckpt_path: str, out_dir: str) -> G.IntGraph:
    """RUN/checkpoint.pt -> FROZEN_DIR. The manifest's meta carries what deploy reports of the
    training run ("training": train.checkpoint.TRAINING_FACTS), so a build needs nothing else."""
    G.check_overwritable(out_dir)           # fail before the work, not after it
    try:
        ckpt = load_checkpoint(ckpt_path)
        model, method, cfg = restore_model(ckpt, ckpt_path)
    except TrainError as e:
        raise FreezeError(str(e)) from None
    training = training_facts(ckpt, cfg, method)
    method.harden(True)
    # dataset, data_dir (absolute) and classes: what eval and deploy reload the test split from
    # by default and check it against (data.model_test_split); a folder's size is the input's
    meta = {"source_checkpoint_epoch": int(ckpt["epoch"]), "method": cfg.method, "dataset": cfg.dataset,
            "data_dir": os.path.abspath(cfg.data_dir) if cfg.data_dir else None,
            "classes": list(cfg.classes) if cfg.classes else None,
            "act_bits": cfg.act_bits, "num_classes": cfg.num_classes, "training": training}
    g = freeze_model(model, cfg.model, tuple(cfg.input_shape), meta)
    G.save(g, out_dir)
    return g


def add_arguments(p):
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint.pt from mixq train")
    p.add_argument("--out", required=True, help="frozen model directory to write")


def run(args) -> int:
    with fsio.DirLock(args.out, FreezeError):
        g = freeze_checkpoint(args.checkpoint, args.out)
    layers = g.meta["layers"]
    params = sum(r["params"] for r in layers)
    print(f"froze {g.model}: {len(g.ops)} ops, {len(layers)} weight layers, {params} params, "
          f"{sum(r['params'] * r['storage_bits'] for r in layers) / params:.2f} storage bits/weight -> {args.out}")
    return 0
