"""The layers a timm CNN gets when it becomes MixMo (``mimo_backbone.py``): M member encoders in place of its
first convolution, M heads in place of its classifier, both started from the timm layers they replace."""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..mimo import MemberConv2d, MemberLinear, mix_members


class MixMoStem(MemberConv2d):
    """M member encoders in place of a timm CNN's first convolution, mixing member inputs right after.

    The timm model calls it as it called its first convolution: with an image (B, C, H, W) it runs the
    sum of the member kernels; with ``(member inputs (B, M, C, H, W), masks (B, M, h, w) or None)`` it
    runs every encoder on its own input and returns the mixed map, x M (docs/methods/mixmo.md §1.7), or the plain
    sum of the member features without masks (MIMO).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_members: int) -> 'MixMoStem':
        """Member encoders that each hold ``conv``'s kernel (and bias) / M."""
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != 'zeros' \
                or isinstance(conv.padding, str):
            raise ValueError(
                f'the first convolution is a {type(conv).__name__} (groups={conv.groups}, padding='
                f'{conv.padding!r}, padding_mode={conv.padding_mode!r}): member encoders replace a plain '
                f'nn.Conv2d with static zero padding and groups=1 only (its output is linear in the kernel)')
        stem = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                   padding=conv.padding, num_members=num_members, bias=conv.bias is not None)
        stem.dilation = conv.dilation
        stem = stem.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            stem.weight.copy_(conv.weight.repeat(num_members, 1, 1, 1) / num_members)
            if conv.bias is not None:
                stem.bias.copy_(conv.bias.repeat(num_members) / num_members)
        stem.train(conv.training)
        return stem

    def output_grid(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Spatial size of the encoder output (the MixMo mixing grid), any kernel, stride and dilation."""
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(img_size, self.kernel_size, self.stride, self.padding, self.dilation))

    def forward(self, x: Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> torch.Tensor:
        # tested as a tuple, not as a Tensor: a torch.fx Proxy is neither and takes the single-image path
        if not isinstance(x, tuple):
            return self.forward_summed(x)
        members, masks = x
        features = self.forward_members(members)
        if masks is None:
            # no masks = MIMO: kappa = 1/M, so M * mean = sum of the member features
            return features.sum(1)
        if masks.shape[-2:] != features.shape[-2:]:
            raise ValueError(
                f'mixing masks are {masks.shape[-2]}x{masks.shape[-1]} but the stem output is '
                f'{features.shape[-2]}x{features.shape[-1]}: build masks with model.mix_grid_size()')
        return mix_members(features, masks, float(self.num_members))


# --- the M heads ----------------------------------------------------------------------------------------

def _draw_like_(weight: torch.Tensor, reference: torch.Tensor):
    """Fill ``weight`` with a truncated normal of ``reference``'s std (zeros if it is all zeros)."""
    if reference.is_meta:
        return  # a model built on the meta device (timm's default-cfg test) has no values to draw from
    std = float(reference.float().std()) if reference.numel() > 1 else 0.
    if std == 0.:
        nn.init.zeros_(weight)
    else:
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def member_classifier(classifier: nn.Module, num_members: int, copy: bool) -> nn.Module:
    """M heads in place of a classifier (``nn.Linear`` or 1x1 ``nn.Conv2d``; ``nn.Identity`` stays).

    ``copy``: every member starts from ``classifier``'s weights (a pretrained head); otherwise member 0
    keeps them and the others are drawn with their std, so that the members start apart.
    """
    if isinstance(classifier, nn.Identity):
        return classifier
    if isinstance(classifier, MemberLinear):
        raise ValueError('the classifier already holds member heads')
    if isinstance(classifier, nn.Linear):  # timm's own Linear too (MobileNetV3)
        heads = MemberLinear(classifier.in_features, classifier.out_features, num_members,
                             bias=classifier.bias is not None)
    elif isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.groups == 1:
        # a conv classifier (ResNetV2, ...): M * K output channels, split into members after the head
        heads = nn.Conv2d(classifier.in_channels, classifier.out_channels * num_members, 1,
                          bias=classifier.bias is not None)
    else:
        raise ValueError(f'the classifier is a {type(classifier).__name__}: M heads replace an nn.Linear or a '
                         f'1x1 nn.Conv2d only')
    heads = heads.to(device=classifier.weight.device, dtype=classifier.weight.dtype)
    with torch.no_grad():
        weight = heads.weight.unflatten(0, (num_members, -1))
        weight.copy_(classifier.weight.expand_as(weight))
        if not copy:
            for member in range(1, num_members):
                _draw_like_(weight[member], classifier.weight)
        if classifier.bias is not None:
            heads.bias.copy_(classifier.bias.repeat(num_members))
    heads.train(classifier.training)
    return heads
