"""Integer simulation: the golden interpreter's op table re-implemented in torch.

Same math as mixq.graph (int64 requantization, exact integer convolution), runs on any torch
device, so the trained model can be evaluated under the deployed integer semantics on GPU.
Convolutions run in float64, exact for |acc| < 2^53 (freeze proves |acc| < 2^31).
`integer_accuracy` measures a trained model that way (metrics.json's int_accuracy: `mixq train`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixq import graph as G
from mixq.freeze import freeze_model


def _pc(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2)) if v.ndim else v


def rq(x, m, s):
    x = x.to(torch.int64)
    m, s = _pc(m, x.ndim), _pc(s, x.ndim)
    return (x * m + (torch.ones_like(s) << (s - 1))) >> s


def _finish(acc, arrays, attrs):
    acc = acc + _pc(arrays["bias"], acc.ndim)
    if "multiplier" not in arrays:
        return acc.to(torch.int32)
    return _clip_out(rq(acc, arrays["multiplier"], arrays["shift"]), attrs)


def _clip_out(y, attrs):
    lo, hi, dtype = G.out_range(attrs)
    return y.clamp(lo, hi).to(getattr(torch, dtype))


def t_conv2d(op, arrays, x):
    a = op.attrs
    acc = F.conv2d(x.to(torch.float64), arrays["weight"].to(torch.float64), None, a["stride"], a["padding"], 1, a.get("groups", 1))
    return _finish(torch.round(acc).to(torch.int64), arrays, a)


def t_linear(op, arrays, x):
    acc = x.to(torch.float64) @ arrays["weight"].to(torch.float64).T
    return _finish(torch.round(acc).to(torch.int64), arrays, op.attrs)


def t_add(op, arrays, *xs):
    total = sum(rq(x, arrays[f"multiplier{i}"], arrays[f"shift{i}"]) for i, x in enumerate(xs))
    return _clip_out(total, op.attrs)


def t_avgpool(op, arrays, x):
    a = op.attrs
    k = a["kernel"]
    s = F.avg_pool2d(x.to(torch.float64), k, a["stride"], a.get("padding", 0), count_include_pad=True) * (k * k)
    y = rq(torch.round(s).to(torch.int64), arrays["multiplier"], arrays["shift"])
    return _clip_out(y, a)


def t_maxpool(op, arrays, x):
    a = op.attrs
    p = a.get("padding", 0)
    xp = F.pad(x.to(torch.int32), (p, p, p, p))   # zero padding, as in the contract
    return F.max_pool2d(xp.to(torch.float32), a["kernel"], a["stride"]).to(x.dtype)


def t_flatten(op, arrays, x):
    return x.reshape(x.shape[0], -1)


def t_concat(op, arrays, *xs):
    return torch.cat([_clip_out(rq(x, arrays[f"multiplier{i}"], arrays[f"shift{i}"]), op.attrs)
                      for i, x in enumerate(xs)], 1)


def t_lut(op, arrays, x):
    table = arrays["table"]
    y = table[x.to(torch.int64) + G.lut_offset(str(x.dtype).removeprefix("torch."), len(table))]
    return y.to(getattr(torch, G.out_range(op.attrs)[2]))


TORCH_OPS = {"conv2d": t_conv2d, "linear": t_linear, "add": t_add, "avgpool": t_avgpool,
             "maxpool": t_maxpool, "flatten": t_flatten, "concat": t_concat, "lut": t_lut}
assert set(TORCH_OPS) == set(G.OP_KINDS)


def quantize_input(graph_input: G.TensorInfo, x: torch.Tensor) -> torch.Tensor:
    """Torch twin of graph.quantize_input: float32 divide, round half to even, clip."""
    q = torch.round(x.to(torch.float32) / torch.tensor(graph_input.scale, dtype=torch.float32, device=x.device))
    if graph_input.dtype == "int8":
        lim = (1 << (graph_input.bits - 1)) - 1
        return q.clamp(-lim, lim).to(torch.int8)
    return q.clamp(0, (1 << graph_input.bits) - 1).to(torch.uint8)


class IntSim:
    """Runs an IntGraph in torch on `device`; arrays are moved there once."""

    def __init__(self, graph: G.IntGraph, device="cpu"):
        self.graph, self.device = graph, torch.device(device)
        self.arrays = [{k: torch.from_numpy(np.asarray(v).astype(np.int64)).to(self.device) for k, v in op.arrays.items()}
                       for op in graph.ops]

    @classmethod
    def from_model(cls, model: torch.nn.Module, input_shape: tuple, device="cpu", name: str = "model") -> "IntSim":
        """Integer simulation of a trained (hardened) QuantModel: freeze it in memory, run the
        result. Accuracy measured this way is the deployed program's accuracy."""
        return cls(freeze_model(model, name, tuple(input_shape)), device)

    @torch.no_grad()
    def logits(self, x_float) -> torch.Tensor:
        """Float images (as the dataset yields them) -> int32 logits, input quantized as the runtime does."""
        x = torch.as_tensor(x_float).to(self.device)
        return self(quantize_input(self.graph.input, x))

    @torch.no_grad()
    def __call__(self, x_q) -> torch.Tensor:
        x = torch.as_tensor(x_q).to(self.device)
        env = {self.graph.input.name: x}
        for op, arrays in zip(self.graph.ops, self.arrays):
            env[op.output] = TORCH_OPS[op.kind](op, arrays, *[env[i] for i in op.inputs])
        return env[self.graph.output]


def integer_accuracy(model: torch.nn.Module, model_name: str, input_shape: tuple, act_bits: int,
                     test_set, workers: int = 0) -> dict:
    """Top-1 of the frozen integer program of a trained, hardened QuantModel on `test_set` (the
    deployed semantics, input quantized as the runtime does) and how often its class agrees
    with the model's own (fake-quant) class, image by image: metrics.json's int_accuracy and
    int_agreement (`mixq train`)."""
    if act_bits >= 32:
        return {"int_accuracy": None, "int_agreement": None, "int_note": "float activations: no integer program"}
    try:
        sim = IntSim(freeze_model(model, model_name, tuple(input_shape)))
    except ValueError as e:     # FreezeError: report it, the trained model is still valid
        return {"int_accuracy": None, "int_agreement": None, "int_note": f"freeze failed: {e}"}
    model.eval()
    right = agree = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, 256, num_workers=workers):
            fake = model(x).argmax(1)
            pred = sim(G.quantize_input(sim.graph.input, x.numpy())).argmax(1)
            right += int((pred == y).sum())
            agree += int((pred == fake).sum())
            total += len(y)
    return {"int_accuracy": 100.0 * right / total, "int_agreement": 100.0 * agree / total}
