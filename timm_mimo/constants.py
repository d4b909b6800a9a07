"""Dataset statistics that timm does not ship (it has ImageNet, Inception, DPN and CLIP only), and the
Hugging Face Hub organisation of the pretrained weights."""
import os
import re

# MixMo uses the same constants for CIFAR-10 and CIFAR-100 (docs/methods/mixmo.md §5.2).
CIFAR_DEFAULT_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR_DEFAULT_STD = (0.2023, 0.1994, 0.2010)

# Tiny ImageNet in MixMo is normalised with 0.5 / 0.5 (docs/methods/mixmo.md §5.2).
TINY_IMAGENET_MEAN = (0.5, 0.5, 0.5)
TINY_IMAGENET_STD = (0.5, 0.5, 0.5)

CIFAR10_CLASSES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck',
)

# ------------------------------------------------------------------------------------------------------
# Hugging Face Hub: every pretrained tag of every model lives in one organisation, as '<org>/<arch>.<tag>'
# (timm's own convention for 'timm/<arch>.<tag>'). TIMM_MIMO_HUB_ORG, read once at import, points the whole
# registry at another organisation (a fork, a private mirror, a test cache).
HUB_ORG_ENV = 'TIMM_MIMO_HUB_ORG'
DEFAULT_HUB_ORG = 'timm-mimo'
# the Hub's rule for user and organisation names: letters, digits, '-', '_', '.', not at either end
HUB_NAME_RE = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?')


def _read_hub_org() -> str:
    org = os.environ.get(HUB_ORG_ENV, '').strip() or DEFAULT_HUB_ORG
    if not HUB_NAME_RE.fullmatch(org) or '--' in org or '..' in org:
        raise ValueError(f'{HUB_ORG_ENV}={org!r} is not a Hugging Face user or organisation name')
    return org


HUB_ORG = _read_hub_org()


def hub_id(arch: str, tag: str) -> str:
    """The Hub repository of ``arch`` pretrained as ``tag``: ``'<HUB_ORG>/<arch>.<tag>'``."""
    return f'{HUB_ORG}/{arch}.{tag}'

