import torch
import torch.nn as nn

CFG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG-19 with batch norm for 32x32 inputs, as in the BSQ/CSQ CIFAR-10 experiments:
    16 conv-BN-ReLU layers, 5 max pools, one linear classifier."""

    def __init__(self, cfg=CFG19, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg19bn(num_classes: int = 10):
    return VGG(CFG19, num_classes)
