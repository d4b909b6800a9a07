"""Dataset statistics that timm does not ship (it has ImageNet, Inception, DPN and CLIP only)."""

# MixMo uses the same constants for CIFAR-10 and CIFAR-100 (spec mixmo.md §5.2).
CIFAR_DEFAULT_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR_DEFAULT_STD = (0.2023, 0.1994, 0.2010)

# Tiny ImageNet in MixMo is normalised with 0.5 / 0.5 (spec mixmo.md §5.2).
TINY_IMAGENET_MEAN = (0.5, 0.5, 0.5)
TINY_IMAGENET_STD = (0.5, 0.5, 0.5)

CIFAR10_CLASSES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck',
)
