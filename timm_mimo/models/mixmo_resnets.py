"""MixMo CNNs: CIFAR WideResNet and 64 px PreActResNet-18 with M member encoders and M heads.

Paper: `MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks`
    - https://arxiv.org/abs/2103.06132 (Rame, Sun, Cord, ICCV 2021)

Architectures as in the official MixMo code (docs/methods/mixmo.md §4): the WideResNet is the TF/edward2 variant
(stride on the second conv of a block, asymmetric zero padding before it, BN-ReLU before pooling);
PreActResNet-18 has a stride-2 3x3 stem for 64 px inputs and no final BN-ReLU.

``num_members=1`` is exactly the vanilla network: one stem conv, one linear head, same state-dict keys.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import create_conv2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD
from ..mimo import (
    MemberClassifierHead, MemberConv2d, MimoClassifierMixin, check_ensemble_rule, check_image_input,
    check_num_members, mix_members)
from .official import OFFICIAL_ROWS
from ._pretrained import hub_cfgs, pretrained_weights

__all__ = ['MixMoResNet']

torch.fx.wrap('check_image_input')  # one opaque call in traced graphs (timm's FX feature extraction)


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3(stride); 1x1 projection of the raw input when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_chs)
        # 'same' padding with stride 2 pads right/bottom only, as TF does (docs/methods/mixmo.md §4.1)
        self.conv2 = create_conv2d(out_chs, out_chs, 3, stride=stride, padding='same', bias=False)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + self.shortcut(x)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut reads the activated input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.has_projection = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if self.has_projection \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.norm1(x))
        shortcut = self.shortcut(act) if self.has_projection else x
        out = self.conv2(F.relu(self.norm2(self.conv1(act))))
        return out + shortcut


_BLOCKS = {'wide': WideBasicBlock, 'preact': PreActBasicBlock}


def _trunc_he_normal_(weight: torch.Tensor):
    """TF 'variance_scaling' truncated normal, fan_in, ReLU gain (docs/methods/mixmo.md §4.3)."""
    fan_in = weight[0].numel()
    # 0.87962566 is the std of a unit normal truncated at +-2 sigma; dividing restores the He variance
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class MixMoResNet(MimoClassifierMixin, nn.Module):
    """Residual CNN with M member stem convolutions, a shared core and M linear heads.

    Args:
        block: 'wide' (WideResNet basic block) or 'preact' (PreActResNet basic block).
        layers: blocks per stage.
        channels: output channels per stage.
        strides: stride of the first block of each stage.
        stem_chs: stem (member encoder) output channels.
        stem_stride: stem stride (2 for 64 px Tiny ImageNet inputs).
        final_norm: BN-ReLU after the last stage (WideResNet) or not (PreActResNet).
        num_members: M, the number of subnetworks; 1 is the vanilla network.
        ensemble: 'logits' (mean of member logits, MixMo) or 'probs' (mean of member probabilities).
        head_init: 'he' (truncated He normal, WRN) or 'normal' (N(0, 0.01), PreActResNet) for the heads.
    """

    def __init__(
            self,
            block: str = 'wide',
            layers: Sequence[int] = (4, 4, 4),
            channels: Sequence[int] = (160, 320, 640),
            strides: Sequence[int] = (1, 2, 2),
            stem_chs: int = 16,
            stem_stride: int = 1,
            final_norm: bool = True,
            num_members: int = 1,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            ensemble: str = 'logits',
            head_init: str = 'he',
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f'unknown block {block!r}, expected one of {tuple(_BLOCKS)}')
        self.num_members = check_num_members(num_members)
        self.ensemble = check_ensemble_rule(ensemble)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        # the stem's stride times the stage strides: smaller inputs leave no pixel to pool
        self.reduction = stem_stride * math.prod(strides)

        self.stem = MemberConv2d(in_chans, stem_chs, 3, stride=stem_stride, padding=1, num_members=num_members)
        block_fn = _BLOCKS[block]
        stages: List[nn.Module] = []
        self.feature_info = [dict(num_chs=stem_chs, reduction=stem_stride, module='stem')]
        prev_chs, reduction = stem_chs, stem_stride
        for i, (depth, chs, stride) in enumerate(zip(layers, channels, strides)):
            blocks = [block_fn(prev_chs if d == 0 else chs, chs, stride if d == 0 else 1) for d in range(depth)]
            stages.append(nn.Sequential(*blocks))
            prev_chs, reduction = chs, reduction * stride
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_chs
        self.norm = nn.Sequential(nn.BatchNorm2d(prev_chs), nn.ReLU()) if final_norm else nn.Identity()
        self.head = MemberClassifierHead(
            prev_chs, num_classes, num_members, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights(head_init)

    def _init_weights(self, head_init: str):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _trunc_he_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if head_init == 'he':
                    _trunc_he_normal_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        # MixMo's CIFAR recipe puts L2 on every parameter (docs/methods/mixmo.md §5.1): nothing is exempt
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def mix_grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Size (h, w) of the MixMo masks for inputs of ``img_size``: the stem's output grid."""
        return self.stem.output_grid(img_size)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The shared core: every stage and the final norm, run once per mixed sample."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """One image per sample (B, C, H, W): summed member encoders, then the core."""
        check_image_input(x, self.in_chans, self.reduction)
        return self.forward_core(self.stem(x))

    def forward_mixed_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Member inputs (B, M, C, H, W) mixed right after the stem with masks (B, M, h, w), times M."""
        check_image_input(x, self.in_chans, self.reduction, members=True)
        features = self.stem.forward_members(x)
        if masks is None:
            # no masks = MIMO: kappa = 1/M, so M * mean = sum of the member features
            return self.forward_core(features.sum(1))
        if masks.shape[-2:] != features.shape[-2:]:
            raise ValueError(
                f'mixing masks are {masks.shape[-2]}x{masks.shape[-1]} but the stem output is '
                f'{features.shape[-2]}x{features.shape[-1]}: build masks with model.mix_grid_size()')
        return self.forward_core(mix_members(features, masks, float(self.num_members)))

    def forward_member_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices=None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API for one image per sample (B, C, H, W).

        Feature levels follow ``feature_info``: 0 is the stem output (the summed member encoders), i >= 1
        the output of stage i. ``indices``: last n levels if an int, all if None, else the listed levels
        (negative from the end). ``norm`` applies the final BN-ReLU to the last stage's output.
        ``stop_early`` skips the stages after the last level taken (``intermediates_only`` implies it).
        Returns the intermediates, or (final features, intermediates).
        """
        from timm.models._features import feature_take_indices
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be NCHW, got {output_fmt!r}')
        if x.ndim != 4:
            raise ValueError(f'forward_intermediates takes one image per sample (B, C, H, W), got {list(x.shape)}')
        check_image_input(x, self.in_chans, self.reduction)
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        last = max_index if (stop_early or intermediates_only) else num_stages
        for i in range(min(last, num_stages)):
            x = self.stages[i](x)
            if i + 1 in take_indices:
                intermediates.append(self.norm(x) if norm and i + 1 == num_stages else x)
        if intermediates_only:
            return intermediates
        if last < num_stages:
            return x, intermediates
        return self.norm(x), intermediates


def _create_mixmo_resnet(variant: str, pretrained: bool = False, **kwargs) -> MixMoResNet:
    # features_only returns the stem (summed member encoders) and every stage
    num_levels = len(kwargs.get('layers', (4, 4, 4))) + 1
    with pretrained_weights(variant, pretrained, kwargs):
        return build_model_with_cfg(
            MixMoResNet, variant, pretrained,
            feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_levels))),
            **kwargs,
        )


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': CIFAR_DEFAULT_MEAN, 'std': CIFAR_DEFAULT_STD,
        'first_conv': 'stem', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2103.06132',
        'paper_name': 'MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks',
        **kwargs,
    }


_DATASET_CFGS = {
    'cifar10': _cfg(),
    'cifar100': _cfg(num_classes=100),
    'tiny_imagenet': _cfg(
        num_classes=200, input_size=(3, 64, 64), pool_size=(4, 4), mean=TINY_IMAGENET_MEAN, std=TINY_IMAGENET_STD),
}
_CIFAR_ARCHS = ('wrn28_10', 'wrn28_10_mixmo2', 'wrn28_10_mixmo3', 'wrn16_2', 'wrn16_2_mixmo2', 'wrn16_4',
                'wrn16_4_mixmo2', 'wrn16_8', 'wrn16_8_mixmo2')
_TINY_ARCHS = ('preactresnet18', 'preactresnet18_mixmo2', 'preactresnet18_w2', 'preactresnet18_w2_mixmo2',
               'preactresnet18_w3', 'preactresnet18_w3_mixmo2')

# tags: '<dataset>' for weights trained with timm_mimo, 'official_<method>_<dataset>' for the checkpoints of
# the official MixMo code (timm_mimo/models/official.py; converted by hub/convert_official.py); only published.py's have weights
default_cfgs = generate_default_cfgs(hub_cfgs({
    **{f'{arch}.{dataset}': _DATASET_CFGS[dataset] for arch in _CIFAR_ARCHS for dataset in ('cifar10', 'cifar100')},
    **{f'{arch}.tiny_imagenet': _DATASET_CFGS['tiny_imagenet'] for arch in _TINY_ARCHS},
    **{f'{row.arch}.{row.tag}': _DATASET_CFGS[row.dataset] for row in OFFICIAL_ROWS},
}))

# the two families; every registered variant below gives its own depth, widths and M
_WRN = dict(block='wide', strides=(1, 2, 2), stem_chs=16, stem_stride=1, final_norm=True, head_init='he')
_PREACT18 = dict(block='preact', layers=(2, 2, 2, 2), strides=(1, 2, 2, 2), stem_chs=64, stem_stride=2,
                 final_norm=False, head_init='normal')


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-28-10 for CIFAR (36.5M parameters with 100 classes)."""
    model_args = dict(_WRN, layers=(4, 4, 4), channels=(160, 320, 640), num_members=1)
    return _create_mixmo_resnet('wrn28_10', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_10_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-28-10 MixMo, M = 2."""
    model_args = dict(_WRN, layers=(4, 4, 4), channels=(160, 320, 640), num_members=2)
    return _create_mixmo_resnet('wrn28_10_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_10_mixmo3(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-28-10 MixMo, M = 3 (cut-in-mix masks)."""
    model_args = dict(_WRN, layers=(4, 4, 4), channels=(160, 320, 640), num_members=3)
    return _create_mixmo_resnet('wrn28_10_mixmo3', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-2 (0.7M parameters): CPU-sized runs, the default of train.py on embedded data."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(32, 64, 128), num_members=1)
    return _create_mixmo_resnet('wrn16_2', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_2_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-2 MixMo, M = 2."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(32, 64, 128), num_members=2)
    return _create_mixmo_resnet('wrn16_2_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_4(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-4 for fast CIFAR experiments."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(64, 128, 256), num_members=1)
    return _create_mixmo_resnet('wrn16_4', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_4_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-4 MixMo, M = 2."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(64, 128, 256), num_members=2)
    return _create_mixmo_resnet('wrn16_4_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-8 for CIFAR."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(128, 256, 512), num_members=1)
    return _create_mixmo_resnet('wrn16_8', pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """WideResNet-16-8 MixMo, M = 2."""
    model_args = dict(_WRN, layers=(2, 2, 2), channels=(128, 256, 512), num_members=2)
    return _create_mixmo_resnet('wrn16_8_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18 for 64 px inputs (Tiny ImageNet)."""
    model_args = dict(_PREACT18, channels=(64, 128, 256, 512), num_members=1)
    return _create_mixmo_resnet('preactresnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18 MixMo, M = 2."""
    model_args = dict(_PREACT18, channels=(64, 128, 256, 512), num_members=2)
    return _create_mixmo_resnet('preactresnet18_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18_w2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18, width x2."""
    model_args = dict(_PREACT18, channels=(128, 256, 512, 1024), num_members=1)
    return _create_mixmo_resnet('preactresnet18_w2', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18_w2_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18 width x2 MixMo, M = 2."""
    model_args = dict(_PREACT18, channels=(128, 256, 512, 1024), num_members=2)
    return _create_mixmo_resnet('preactresnet18_w2_mixmo2', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18_w3(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18, width x3."""
    model_args = dict(_PREACT18, channels=(192, 384, 768, 1536), num_members=1)
    return _create_mixmo_resnet('preactresnet18_w3', pretrained, **dict(model_args, **kwargs))


@register_model
def preactresnet18_w3_mixmo2(pretrained: bool = False, **kwargs) -> MixMoResNet:
    """PreActResNet-18 width x3 MixMo, M = 2."""
    model_args = dict(_PREACT18, channels=(192, 384, 768, 1536), num_members=2)
    return _create_mixmo_resnet('preactresnet18_w3_mixmo2', pretrained, **dict(model_args, **kwargs))
