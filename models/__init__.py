"""The model zoo: plain float nn.Modules. A training method quantizes them by layer surgery.

Each builder takes num_classes and returns a float model; `input_shape` gives C,H,W."""
from __future__ import annotations

import torch.nn as nn

from mixq.errors import MixqError
from mixq.models.digits_cnn import DigitsCNN
from mixq.models.resnet_cifar import resnet20
from mixq.models.vgg_cifar import vgg19bn
from mixq.models.resnet_imagenet import resnet18, resnet50

MODELS = {
    "digits-cnn": DigitsCNN,
    "resnet20": resnet20,
    "vgg19bn": vgg19bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


class ModelError(MixqError, ValueError):
    """An unknown model name."""


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}' (choose from: {', '.join(MODELS)})")
    return MODELS[name](num_classes=num_classes)
