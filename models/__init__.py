"""The model zoo: plain float nn.Modules. A training method quantizes them by layer surgery.

Each builder takes num_classes and returns a float model; `input_shape` gives C,H,W.

A user's own model: `--model path/to/file.py:fn` or `--model package.module:fn`, where
fn(num_classes) returns a float nn.Module. A file's text is kept with the model (`source`,
stored in the checkpoint) so that freeze and --resume rebuild the network that was trained,
wherever they run and whatever happens to the file later; a module is imported by name."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch.nn as nn

from mixq.errors import MixqError
from mixq.models.digits_cnn import DigitsCNN
from mixq.models.resnet_cifar import resnet20
from mixq.models.vgg_cifar import vgg19bn
from mixq.models.mobilenet_v2 import mobilenetv2, mobilenetv2_imagenet
from mixq.models.resnet_imagenet import resnet18, resnet50

MODELS = {
    "digits-cnn": DigitsCNN,
    "resnet20": resnet20,
    "vgg19bn": vgg19bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "mobilenetv2-imagenet": mobilenetv2_imagenet,
}


class ModelError(MixqError, ValueError):
    """An unknown model name."""


def is_user_model(name: str) -> bool:
    return ":" in name


def model_source(name: str) -> dict | None:
    """What rebuilds a user model later: {"spec", "file", "text"} for a file, {"spec", "module"}
    for an importable module; None for a zoo name."""
    if not is_user_model(name):
        return None
    where, _, _ = name.rpartition(":")
    if not _is_file_spec(where):
        return {"spec": name, "module": where}
    path = Path(where)
    try:
        return {"spec": name, "file": path.name, "text": path.read_text()}
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"--model {name}: cannot read {where} ({type(e).__name__})") from None


def build_model(name: str, num_classes: int, source: dict | None = None) -> nn.Module:
    """The float net: a zoo name, or a user model spec (`source`: a model_source record to
    build it from instead of the file named in the spec)."""
    if not is_user_model(name):
        if name not in MODELS:
            raise ModelError(f"unknown model '{name}' (choose from: {', '.join(MODELS)}, or FILE.py:FUNCTION "
                             "or package.module:FUNCTION for your own)")
        return MODELS[name](num_classes=num_classes)
    source = source or model_source(name)
    fn_name = name.rpartition(":")[2]
    module = _module_of(name, source)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"--model {name}: {source.get('file') or source.get('module')} has no function '{fn_name}'")
    try:
        net = fn(num_classes)
    except Exception as e:  # noqa: BLE001 - the user's code: its error, in one line
        raise ModelError(f"--model {name}: {fn_name}({num_classes}) raised {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"--model {name}: {fn_name}(num_classes) returned {type(net).__name__}, not a torch nn.Module")
    return net


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _module_of(name: str, source: dict) -> types.ModuleType:
    if "module" in source:
        try:
            return importlib.import_module(source["module"])
        except Exception as e:  # noqa: BLE001 - import errors of the user's package, one line
            raise ModelError(f"--model {name}: cannot import {source['module']} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    # the file's text as a module of its own (not put in sys.modules: two runs may use files
    # of the same name); its directory is importable while it runs, for its own helper modules
    module = types.ModuleType(f"mixq_user_model_{Path(source['file']).stem}")
    module.__file__ = source["file"]
    where = str(Path(name.rpartition(":")[0]).resolve().parent)
    sys.path.insert(0, where)
    try:
        exec(compile(source["text"], source["file"], "exec"), module.__dict__)
    except Exception as e:  # noqa: BLE001 - a syntax or import error in the user's file, one line
        raise ModelError(f"--model {name}: {source['file']} fails to load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    finally:
        sys.path.remove(where)
    return module
