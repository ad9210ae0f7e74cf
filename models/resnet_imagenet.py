"""ResNet-18/50 for ImageNet, built on torchvision's definitions.

torchvision's blocks reuse one ReLU module twice; quantization needs one activation
quantizer per use, so each block is rewrapped with its own ReLUs. Parameter names are
unchanged, so torchvision state dicts (e.g. pretrained weights) load as they are."""
import torch.nn as nn
from torchvision.models import resnet as tv


class Basic(nn.Module):
    def __init__(self, b: tv.BasicBlock):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = b.conv1, b.bn1, b.conv2, b.bn2
        self.downsample = b.downsample
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, b: tv.Bottleneck):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3 = b.conv1, b.bn1, b.conv2, b.bn2, b.conv3, b.bn3
        self.downsample = b.downsample
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + identity)


def _rewrap(model: tv.ResNet) -> tv.ResNet:
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for i, b in enumerate(layer):
            layer[i] = Basic(b) if isinstance(b, tv.BasicBlock) else Bottleneck(b)
    return model


def resnet18(num_classes: int = 1000):
    return _rewrap(tv.resnet18(weights=None, num_classes=num_classes))


def resnet50(num_classes: int = 1000):
    return _rewrap(tv.resnet50(weights=None, num_classes=num_classes))
