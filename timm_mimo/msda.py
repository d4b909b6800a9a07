"""Pixel-space CutMix / Mixup on each member's input, inside MIMO batches (docs/methods/mixmo.md §2.3).

Each member image is, with probability ``prob``, mixed with a partner image; the label shares are then
measured on the part of the member that survives the MixMo mask ("what the member's head can see"),
and with ``reverse_if_minor`` the member's own image is given the larger share. With M = 1 (all-ones
masks, no reversal) this is plain per-sample CutMix / Mixup for single networks.

'box' is CutMix on the mixing grid (a ViT's token grid): the pasted box is whole cells placed inside the
grid, MixViT's token-mask geometry (``mixing.box_masks(..., inside=True)``). With M = 1 it is the
augmentation-only control of MixViT: the same token boxes and exact token shares, one network, mixed labels.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .mixing import box_masks, check_alpha, sample_beta

MSDA_MODES = ('cutmix', 'mixup', 'box')


def check_msda_mode(mode: str) -> str:
    if mode not in MSDA_MODES:
        raise ValueError(f'unknown MSDA {mode!r}, expected one of {MSDA_MODES} or none')
    return mode


def msda_mix(
        images: torch.Tensor,
        masks: torch.Tensor,
        mode: str = 'cutmix',
        prob: float = 0.5,
        alpha: float = 1.0,
        reverse_if_minor: bool = True,
        generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix member images with partners drawn from the batch.

    Args:
        images: member inputs (B, M, C, H, W).
        masks: MixMo masks (B, M, h, w); the grid must divide the image size.
        mode: 'cutmix' (box pasted from the partner), 'box' (the same on the cells of the masks' grid) or
            'mixup' (constant blend).
        prob: probability that a member image is mixed at all.
        alpha: lambda ~ Beta(alpha, alpha).
        reverse_if_minor: give the member's own image the larger visible share by swapping roles.

    Returns:
        mixed images (B, M, C, H, W), partner index into the flattened (B * M) members (B, M), and the
        own image's label share (B, M); the partner's share is 1 minus it.

    Partners are drawn uniformly from the B * M member images of the batch, which is itself a uniform
    sample of the training set: the official code draws from the whole set, which a loader cannot do
    without a second image read per sample.
    """
    check_msda_mode(mode)
    check_alpha(alpha, 'msda alpha')
    b, m, c, h, w = images.shape
    n = b * m
    device = images.device
    flat = images.flatten(0, 1)
    partner = torch.randint(0, n, (n,), generator=generator, device=device)
    lam = sample_beta(n, alpha, generator, device)
    active = torch.rand(n, generator=generator, device=device) < prob
    if mode == 'cutmix':
        # the box holds the partner; the own image keeps the rest
        own = 1 - box_masks(1 - lam, (h, w), generator)
    elif mode == 'box':
        grid_h, grid_w = masks.shape[-2:]
        if h % grid_h or w % grid_w:
            raise ValueError(f'box MSDA needs a mixing grid that tiles the image: {grid_h}x{grid_w} cells '
                             f'on {h}x{w} pixels')
        cells = 1 - box_masks(1 - lam, (grid_h, grid_w), generator, inside=True)
        own = cells.repeat_interleave(h // grid_h, 1).repeat_interleave(w // grid_w, 2)
    else:
        own = lam[:, None, None].expand(n, h, w)
    own = torch.where(active[:, None, None], own, torch.ones_like(own))

    # share of the own image on the region the MixMo mask keeps (pixels pooled to the mask grid)
    member_masks = masks.flatten(0, 1).to(own.dtype)
    own_on_grid = F.adaptive_avg_pool2d(own[:, None], member_masks.shape[-2:])[:, 0]
    visible = member_masks.sum((1, 2))
    own_share = (own_on_grid * member_masks).sum((1, 2)) / (visible + 1e-8)
    own_share = torch.where(visible > 0, own_share, own_on_grid.mean((1, 2)))
    if reverse_if_minor:
        minor = own_share < 0.5
        own = torch.where(minor[:, None, None], 1 - own, own)
        own_share = torch.where(minor, 1 - own_share, own_share)

    own = own[:, None].to(flat.dtype)
    mixed = own * flat + (1 - own) * flat[partner]
    return mixed.view(b, m, c, h, w), partner.view(b, m), own_share.view(b, m)
