"""Layer surgery's helpers: one module per activation and pool use, and what stays float.

quant.swap_layers works on modules: it replaces each nn.ReLU (ReLU6, Hardtanh(0, c)) module
by an ActQuant, which learns its own clip and scale, and follows each average pool module by
one. Real CNNs also call activations and pools as functions (F.relu, torch.relu, x.clamp(0, 6),
F.adaptive_avg_pool2d, x.mean((2, 3))) and call one activation module at several places.
`one_module_per_activation` rewrites those calls, with torch.fx, into modules of their own, one
per use, before the swap (what torch.ao's prepare_fx does for its observers). A net that needs
no rewrite (every zoo net) is left as it is: same class, same module tree.

Other elementwise activations (Hardswish, GELU, SiLU, sigmoid...: quant.TABLE_ACTIVATIONS, as
modules or as F.hardswish, torch.sigmoid, x.tanh()...) become modules the same way; swap_layers
puts a quantizer after each and `insert_signed_quantizers` one before it where its input may be
negative, and freeze makes it a table over its quantized input. Anything else (F.softmax, a
functional activation with computed arguments...) would train with float values and report an
accuracy for a network that `mixq freeze` then refuses; `check_activations` refuses such a
model before training instead, naming each place (the `mixq train` command goes further: it
dry-runs freeze on the untrained model and lists every op freeze cannot take)."""
from __future__ import annotations

import copy
import inspect

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

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
    LEAVES = (quant.InputQuant, quant.ActQuant, quant.SignedQuant)

    def is_leaf_module(self, m, qualname):
        # any method's quantized weight layer (they all have integer_weight) is one node
        return isinstance(m, self.LEAVES) or hasattr(m, "integer_weight") or super().is_leaf_module(m, qualname)


def owner(node) -> str:
    """The path of the module whose forward made the traced call `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def unquantized_activations(model: nn.Module) -> list[str]:
    """"'path' (what)" for every activation of `model` that is not an ActQuant: activation modules
    (torch.nn.modules.activation) and, when torch.fx can trace the model, activation functions
    and tensor methods (path: the module whose forward calls them)."""
    found = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
             if type(m).__module__ == nn.ReLU.__module__ and not quant.table_activation(m)]
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
        found.append(f"'{owner(node)}' ({what})")
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


# ----------------------------------------------------------------------------- one module per use
# The signatures of the calls rewritten into modules (torch.X, F.X or tensor.X(), bound by name).
_SIGNATURES = {
    "relu": lambda input, inplace=False: None,
    "relu_": lambda input: None,
    "relu6": lambda input, inplace=False: None,
    "hardtanh": lambda input, min_val=-1.0, max_val=1.0, inplace=False: None,
    "clamp": lambda input, min=None, max=None: None,
    "clamp_min": lambda input, min: None,
    "adaptive_avg_pool2d": lambda input, output_size: None,
    "avg_pool2d": lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None: None,
    "max_pool2d": lambda input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False: None,
    "mean": lambda input, dim=None, keepdim=False, dtype=None: None,
    # table activations (quant.TABLE_ACTIVATIONS)
    "hardswish": lambda input, inplace=False: None,
    "hardsigmoid": lambda input, inplace=False: None,
    "silu": lambda input, inplace=False: None,
    "gelu": lambda input, approximate="none": None,
    "sigmoid": lambda input: None,
    "tanh": lambda input: None,
    "leaky_relu": lambda input, negative_slope=0.01, inplace=False: None,
    "elu": lambda input, alpha=1.0, inplace=False: None,
    "mish": lambda input, inplace=False: None,
    "selu": lambda input, inplace=False: None,
    "celu": lambda input, alpha=1.0, inplace=False: None,
    "softplus": lambda input, beta=1.0, threshold=20.0: None,
}
_ALIASES = {"clip": "clamp", "clamp_": "clamp", "clip_": "clamp", "clamp_min_": "clamp_min", "hardtanh_": "hardtanh",
            "sigmoid_": "sigmoid", "tanh_": "tanh", "leaky_relu_": "leaky_relu", "elu_": "elu", "selu_": "selu",
            "celu_": "celu"}
# name -> the module computing it from the call's arguments (bound by _SIGNATURES' names)
_TABLE_MODULES = {
    "hardswish": lambda a: nn.Hardswish(), "hardsigmoid": lambda a: nn.Hardsigmoid(), "silu": lambda a: nn.SiLU(),
    "gelu": lambda a: nn.GELU(a["approximate"]), "sigmoid": lambda a: nn.Sigmoid(), "tanh": lambda a: nn.Tanh(),
    "leaky_relu": lambda a: nn.LeakyReLU(a["negative_slope"]), "elu": lambda a: nn.ELU(a["alpha"]),
    "mish": lambda a: nn.Mish(), "selu": lambda a: nn.SELU(), "celu": lambda a: nn.CELU(a["alpha"]),
    "softplus": lambda a: nn.Softplus(a["beta"], a["threshold"]),
}
_GLOBAL_DIMS = ({2, 3}, {-1, -2})


def _call_name(node) -> str | None:
    if node.op == "call_function":
        name = "max_pool2d" if node.target is F.max_pool2d else getattr(node.target, "__name__", None)
    elif node.op == "call_method":
        name = node.target
    else:
        return None
    name = _ALIASES.get(name, name)
    return name if name in _SIGNATURES else None


def _relu(clip):
    return nn.ReLU() if clip is None else nn.ReLU6() if clip == 6 else nn.Hardtanh(0.0, float(clip))


def _as_module(name: str, a: dict) -> nn.Module | None:
    """The module computing the call `name` with bound arguments `a`; None when it has no
    such module (e.g. clamp(-1, 1), a non-global mean) or an argument is computed."""
    if any(isinstance(v, torch.fx.Node) for k, v in a.items() if k != "input"):
        return None
    if name in ("relu", "relu_"):
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "hardtanh" and a["max_val"] > a["min_val"]:
        return _relu(a["max_val"]) if a["min_val"] == 0 else nn.Hardtanh(a["min_val"], a["max_val"])
    if name in _TABLE_MODULES:
        return _TABLE_MODULES[name](a)
    if name == "clamp" and a["min"] == 0 and (a["max"] is None or a["max"] > 0):
        return _relu(a["max"])
    if name == "clamp_min" and a["min"] == 0:
        return nn.ReLU()
    if name == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d(a["output_size"])
    if name == "avg_pool2d":
        return nn.AvgPool2d(a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                            a["divisor_override"])
    if name == "max_pool2d" and not a["return_indices"]:
        return nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])
    if name == "mean" and a["dim"] is not None and a["dtype"] is None:
        dims = {a["dim"]} if isinstance(a["dim"], int) else set(a["dim"])
        if dims in _GLOBAL_DIMS:
            pool = nn.AdaptiveAvgPool2d(1)
            return pool if a["keepdim"] else nn.Sequential(pool, nn.Flatten())
    return None


def _stateful_per_use(m: nn.Module) -> bool:
    """Modules that become (or get) an ActQuant or SignedQuant, which learns one clip per place it quantizes."""
    return quant.relu_clip(m)[0] or isinstance(m, quant.AVG_POOLS) or quant.table_activation(m)


def one_module_per_activation(net: nn.Module) -> nn.Module:
    """`net` with every functional activation or pool it calls (see _SIGNATURES) made a module
    of its own, and every activation or average pool module it calls more than once copied, one
    per call: so swap_layers gives each place its own quantizer.

    Module by module, children first: a module whose own forward needs a rewrite becomes a
    torch.fx.GraphModule of that forward (its children stay modules), in the same place of the
    tree, with the same parameter names; new modules are named after the function (`relu6`,
    `relu_1`...) inside the module that called it. A module torch.fx cannot trace is left as it
    is (freeze traces the whole net and says why). Every zoo net comes back unchanged."""
    builtin = type(net).__module__.startswith("torch.nn.modules.")
    if builtin and not isinstance(net, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return net                  # torch's own layers (nn.ReLU6 calls F.hardtanh): what swap_layers knows
    for name, child in list(net.named_children()):
        new = one_module_per_activation(child)
        if new is not child:
            setattr(net, name, new)
    return net if builtin else _rewrite_own_forward(net)


def _free_target(gm: nn.Module, stem: str) -> str:
    target, k = stem, 0
    while hasattr(gm, target):
        k += 1
        target = f"{stem}_{k}"
    return target


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _is_cat(node) -> bool:
    return node.op == "call_function" and node.target in _CATS


def _ends_in_relu(m: nn.Module) -> bool:
    """A module whose output passed a ReLU-like activation (directly, or as a Sequential's last)."""
    if isinstance(m, nn.Sequential) and len(m):
        return _ends_in_relu(m[-1])
    return quant.relu_clip(m)[0]


def _needs_relu_after_cat(gm, node) -> bool:
    """A channel concatenation of ReLU outputs (an Inception / SqueezeNet block) gets an nn.ReLU
    after it, which computes nothing on them but becomes the ActQuant that sets the concat's
    one output scale (freeze requantizes every part to it). Not when a ReLU-like call follows
    it already, nor when a part may be negative (a signed concatenation: freeze refuses it)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    if not parts or not all(isinstance(p, torch.fx.Node) and p.op == "call_module" and
                            _ends_in_relu(gm.get_submodule(p.target)) for p in parts):
        return False
    users = list(node.users)
    return not (users and all(u.op == "call_module" and _ends_in_relu(gm.get_submodule(u.target)) or
                              _call_name(u) in ("relu", "relu_", "relu6") for u in users))


class _OwnForward(torch.fx.Tracer):
    """Traces one module's forward, every child a leaf."""

    def is_leaf_module(self, m, qualname):
        return True


def _rewrite_own_forward(module: nn.Module) -> nn.Module:
    try:
        gm = torch.fx.GraphModule(module, _OwnForward().trace(module), class_name=type(module).__name__)
    except Exception:   # noqa: BLE001 - an untraceable forward (control flow on values...)
        return module
    seen, changed = set(), False
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            if not _stateful_per_use(gm.get_submodule(node.target)):
                continue
            if node.target not in seen:
                seen.add(node.target)
                continue
            new, stem = copy.deepcopy(gm.get_submodule(node.target)), node.target.replace(".", "_")
        elif _is_cat(node):
            if not _needs_relu_after_cat(gm, node):
                continue
            target = _free_target(gm, "cat_relu")
            gm.add_submodule(target, nn.ReLU())
            with gm.graph.inserting_after(node):
                relu = gm.graph.call_module(target, (node,))
            node.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
            changed = True
            continue
        else:
            name = _call_name(node)
            if name is None:
                continue
            try:
                bound = inspect.signature(_SIGNATURES[name]).bind(*node.args, **node.kwargs)
            except TypeError:
                continue
            bound.apply_defaults()
            new, stem = _as_module(name, bound.arguments), name.rstrip("_")
            if new is None:
                continue
            node.args, node.kwargs = (bound.arguments["input"],), {}
        target = _free_target(gm, stem)
        gm.add_submodule(target, new)
        node.op, node.target = "call_module", target
        changed = True
    if not changed:
        return module
    gm.graph.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- signed activations
# Ops that pass a quantized value through unchanged (freeze: same integer tensor or a view).
_PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_PASS_CALLS = {"flatten", "view", "reshape", "size"}
# Ops whose input freeze needs quantized (an integer tensor, not a pending affine value).
_NEEDS_QUANT = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def _needs_quant(m) -> bool:
    return isinstance(m, _NEEDS_QUANT) or quant.table_activation(m)     # a table is over integer inputs


def insert_signed_quantizers(net: nn.Module, act_bits: int) -> nn.Module:
    """A SignedQuant after every value that reaches a conv, linear, pool, flatten or table
    activation (Hardswish, GELU...) without a ReLU-like activation on its way: MobileNetV2's linear
    bottleneck, whose projection conv + BN output (or its residual sum with the block input)
    feeds the next block; MobileNetV3's conv + BN before its Hardswish. Freeze makes it an
    int8 tensor (graph: out_signed). Where the value comes from decides the place:

      - a module (the projection's BatchNorm2d, a conv without BN): it becomes
        nn.Sequential(module, SignedQuant) in its parent (its parameters then live under
        `NAME.0.`, as an average pool's do under its ActQuant wrapper);
      - a residual add returned by a module's forward (MobileNetV2's `x + self.conv(x)`): that
        module becomes nn.Sequential(module, SignedQuant).

    Any other producer (an add used inside its module's forward) is left alone: freeze names
    it before training. An average pool of a value that may be negative (one of the above, a
    signed table activation such as MobileNetV3's Hardswish, the network input) is marked
    `signed_output`: swap_layers follows it with a SignedQuant instead of an ActQuant, so the
    average keeps its negative values (graph: avgpool out_signed). Runs on the float net after
    one_module_per_activation; a net whose every such value passes a ReLU (every zoo net) comes
    back unchanged."""
    try:
        graph = torch.fx.Tracer().trace(net)
    except Exception:   # noqa: BLE001 - the freeze check names the tracing error
        return net
    modules = dict(net.named_modules())
    places = {}
    for node in graph.nodes:
        if not (node.op == "call_module" and _needs_quant(modules.get(node.target))):
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        while src is not None and _passes_through(src, modules):
            src = src.args[0] if isinstance(src.args[0], torch.fx.Node) else None
        place = _signed_place(src, modules, net) if src is not None else None
        if place:
            places[place] = True
    for node in graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, quant.AVG_POOLS) and node.args and _may_be_negative(node.args[0], modules, net):
            m.signed_output = True
    for path in places:
        parent_path, _, name = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        setattr(parent, name, nn.Sequential(getattr(parent, name), quant.SignedQuant(act_bits)))
    return net


def _may_be_negative(node, modules, net) -> bool:
    """Whether the value `node` is a signed integer tensor once quantized: the network input (int8),
    a value that gets a SignedQuant (_signed_place), a signed table activation, or the average
    pool of one; not a ReLU-like activation's output."""
    while isinstance(node, torch.fx.Node) and _passes_through(node, modules):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "placeholder":
        return True
    m = modules.get(node.target) if node.op == "call_module" else None
    if m is not None and quant.relu_clip(m)[0]:
        return False
    if m is not None and quant.table_activation(m):
        return quant.signed_table_output(m)
    if isinstance(m, quant.AVG_POOLS):
        return bool(node.args) and _may_be_negative(node.args[0], modules, net)
    return _signed_place(node, modules, net) is not None


def _passes_through(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASS_MODULES)
    name = getattr(node.target, "__name__", node.target) if node.op == "call_function" else node.target
    return node.op in ("call_function", "call_method") and name in _PASS_CALLS


def _signed_place(node, modules, net) -> str | None:
    """The module path to follow with a SignedQuant for the value `node`, or None when it is
    quantized already (the input, a ReLU-like activation, an average pool: ActQuant follows it;
    a table activation: swap_layers puts its quantizer after it)."""
    if node.op == "placeholder":
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        if quant.relu_clip(m)[0] or isinstance(m, quant.AVG_POOLS):
            return None
        return node.target if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)) else None
    if node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd"):
        path = owner(node)
        if path and _returns(net.get_submodule(path), "add"):
            return path
    return None


def _returns(module: nn.Module, what: str) -> bool:
    """Whether `module`'s own forward returns the result of a `what` call (an add)."""
    try:
        graph = _OwnForward().trace(module)
    except Exception:   # noqa: BLE001
        return False
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return isinstance(out, torch.fx.Node) and out.op in ("call_function", "call_method") and \
        getattr(out.target, "__name__", out.target) in (what, "i" + what, "__" + what + "__")
