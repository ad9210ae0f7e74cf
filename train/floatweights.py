"""Float weights from a checkpoint into a float net: what --init-from starts a run from and
what SDQ's --teacher is made of. Its own module, which imports no method, so that a method may
use it (train.config imports the methods)."""
from __future__ import annotations

from pathlib import Path

import torch

from mixq.train.errors import ConfigError


def load_float_weights(net, path: str, model_name: str, option: str = "--init-from"):
    """Float weights (conv/linear weights and biases, batch norm) into the zoo net `net`, from
    a mixq checkpoint of the same model (any method keeping float weights: ste-uniform, clado,
    sdq) or a plain state dict of the net (e.g. torchvision's resnet18/50 weights for
    `net.load_state_dict`). Every conv/linear weight must be there with its shape. Errors name
    `option`, the flag that gave the path (--init-from; sdq's --teacher)."""
    if not Path(path).is_file():
        raise ConfigError(f"{option} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise ConfigError(f"{option} {path}: not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and {"model", "config"} <= set(state):        # a mixq checkpoint
        other = state["config"].get("model") if isinstance(state["config"], dict) else None
        if other != model_name:
            raise ConfigError(f"{option} {path}: a checkpoint of model '{other}', not '{model_name}'")
        state = {k[len("net."):]: v for k, v in state["model"].items() if k.startswith("net.")}
    if not isinstance(state, dict):
        raise ConfigError(f"{option} {path}: not a state dict")
    own = net.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            key = f"{name}.weight"
            if key not in state:
                raise ConfigError(f"{option} {path}: no float weight for layer '{name}' (a CSQ or BSQ "
                                 "checkpoint keeps no float weights)")
    loaded = {k: v for k, v in state.items() if k in own}
    for k, v in loaded.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConfigError(f"{option} {path}: '{k}' has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
    net.load_state_dict(loaded, strict=False)
