"""MobileNetV2 (Sandler et al., CVPR 2018) on torchvision's definition.

- `mobilenetv2`: the CIFAR-10 variant (32x32 inputs): torchvision's network with its stem conv at
  stride 1 and its second stage (24 channels) at stride 1, the usual adaptation for 32x32 images
  (kuangliu/pytorch-cifar's; the feature maps are then 32, 32, 16, 8, 8, 4, 4 wide);
- `mobilenetv2-imagenet`: torchvision's ImageNet network (224x224) as it is, so its state dicts
  (torchvision's pretrained weights) load with --init-from.

Both keep torchvision's modules and parameter names. Layer surgery finds what mixq needs in
them: the functional global pool becomes a module, the linear bottlenecks (projection conv + BN
with no activation, residual adds with none after them) get signed int8 quantizers
(train/surgery.py)."""
from torchvision.models import MobileNetV2

IMAGENET_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                    [6, 160, 3, 2], [6, 320, 1, 1]]          # t (expansion), c, n (blocks), s (stride)
CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1]] + IMAGENET_SETTING[2:]


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    net = MobileNetV2(num_classes=num_classes, inverted_residual_setting=CIFAR_SETTING)
    net.features[0][0].stride = (1, 1)
    return net


def mobilenetv2_imagenet(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes)
