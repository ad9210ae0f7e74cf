import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: 4 convs + 1 linear = 5 quantized layers."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width, 1), *block(width, width, 1),
                                      *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))
