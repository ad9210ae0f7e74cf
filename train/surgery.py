"""What layer surgery (quant.swap_layers) leaves float: activations it does not quantize.

swap_layers replaces nn.ReLU modules by ActQuant. Any other activation (an nn.ReLU6 or nn.GELU
module, F.relu or torch.relu called in a forward, x.clamp(0, 6)...) would train with float
values, report an accuracy for a network that `mixq freeze` then refuses; `check_activations`
refuses such a model before training instead, naming each place."""
from __future__ import annotations

import torch.fx
import torch.nn as nn

from mixq.train import quant
from mixq.train.errors import ConfigError

# elementwise activations by name, whether torch.X, torch.nn.functional.X or tensor.X()
ACTIVATION_NAMES = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "elu", "elu_", "selu",
    "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "softplus", "prelu", "rrelu", "threshold", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
    "softmax", "log_softmax",
})


class Tracer(torch.fx.Tracer):
    """torch.fx with mixq's quantizers and quantized weight layers as single nodes (freeze's walk)."""
    LEAVES = (quant.InputQuant, quant.ActQuant)

    def is_leaf_module(self, m, qualname):
        # any method's quantized weight layer (they all have integer_weight) is one node
        return isinstance(m, self.LEAVES) or hasattr(m, "integer_weight") or super().is_leaf_module(m, qualname)


def unquantized_activations(model: nn.Module) -> list[str]:
    """"'path' (what)" for every activation of `model` that is not an ActQuant: activation modules
    (torch.nn.modules.activation) and, when torch.fx can trace the model, activation functions
    and tensor methods (path: the module whose forward calls them)."""
    found = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
             if type(m).__module__ == nn.ReLU.__module__]
    try:
        graph = Tracer().trace(model)
    except Exception:   # noqa: BLE001 - untraceable forward: freeze will say so; modules are found above
        return found
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", None) in ACTIVATION_NAMES:
            what = f"{node.target.__module__ or 'torch'}.{node.target.__name__}".replace("torch.nn.functional.", "F.")
        elif node.op == "call_method" and node.target in ACTIVATION_NAMES:
            what = f"Tensor.{node.target}"
        else:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else ""
        found.append(f"'{where}' ({what})")
    return found


def check_activations(model: nn.Module, act_bits: int, model_name: str):
    """ConfigError naming every activation swap_layers left float, unless activations are float anyway."""
    if act_bits >= 32:
        return
    found = unquantized_activations(model)
    if found:
        raise ConfigError(f"model '{model_name}': activations layer surgery cannot quantize: {', '.join(found)} "
                         f"(they would train as float under --act-bits {act_bits} and the run could not be "
                         "frozen; mixq quantizes nn.ReLU modules, one per use)")
