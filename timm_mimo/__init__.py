"""timm_mimo: multi-input multi-output (MixMo, MixViT) networks as timm models.

``import timm_mimo`` registers every model with timm, then ``timm.create_model('wrn28_10_mixmo2')`` works.
"""
from . import models  # noqa: F401  (registration side effect)
from .batch import MimoBatch, MimoBatchBuilder, MimoCollate, unique_batch_size
from .loss import MemberSoftTargetCrossEntropy
from .mimo import MemberClassifierHead, MemberConv2d, MemberLinear, ensemble_logits, mix_members
from .models.mimo_backbone import create_mimo_model, to_mimo

__version__ = '0.1.0'
