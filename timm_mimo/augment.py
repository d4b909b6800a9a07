"""Batched augmentation of member views on the batch's device: pad-and-crop, flip and random erasing.

Every draw comes from the step's generator, so a resumed run replays the same augmentation. timm's own
transforms work per image in the loader; these work on a whole batch at once, after the images are on the
device (the data path of the device-resident splits) or inside :class:`~timm_mimo.batch.MimoCollate`.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def random_crop_flip(
        images: torch.Tensor, padding: int = 4, flip: bool = True,
        generator: Optional[torch.Generator] = None, padding_mode: str = 'constant') -> torch.Tensor:
    """Per-sample random crop after padding, and horizontal flip, for a batch (N, C, H, W).

    The CIFAR / Tiny ImageNet augmentation of MixMo (pad-4 crop + flip, docs/methods/mixmo.md §5.2), which timm's
    transforms do not offer. Batched indexing, independent draws per sample. ``padding_mode`` 'constant'
    pads zeros in the space of ``images`` (on normalised inputs: the mean colour rather than black);
    'reflect' mirrors the border (torchvision's RandomCrop(padding_mode='reflect'), AutoMix's recipe).
    """
    n, c, h, w = images.shape
    device = images.device
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding), mode=padding_mode)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        images = padded[torch.arange(n, device=device)[:, None, None, None],
                        torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


def random_erase(
        images: torch.Tensor, prob: float, mode: str = 'pixel', area: Tuple[float, float] = (0.02, 1 / 3),
        min_aspect: float = 0.3, attempts: int = 10, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020, timm's ``RandomErasing`` semantics) for a batch (N, C, H, W) at once.

    With probability ``prob`` per sample, one box of ``area`` share of the image (uniform) and log-uniform
    aspect ratio in [min_aspect, 1 / min_aspect] is filled with N(0, 1) noise per pixel (``'pixel'``), per
    channel (``'rand'``), or zeros (``'const'``), in the normalised space. Of ``attempts`` candidate boxes
    the first that fits is used; a sample none fits is left as it is. timm's class loops over the samples
    in Python on the host RNG; here every draw is one tensor op on the images' device, from ``generator``.
    """
    if mode not in ('pixel', 'rand', 'const'):
        raise ValueError(f"unknown random erasing mode {mode!r}: use 'pixel', 'rand' or 'const'")
    n, c, h, w = images.shape
    device = images.device

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    target = (area[0] + (area[1] - area[0]) * uniform(n, attempts)) * (h * w)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(n, attempts))
    box_h = torch.sqrt(target * aspect).round().long()
    box_w = torch.sqrt(target / aspect).round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(1, keepdim=True)  # index of the first candidate that fits (0 if none)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    erase = fits.any(1) & (uniform(n) < prob)
    top = (uniform(n) * (h - box_h + 1)).long()
    left = (uniform(n) * (w - box_w + 1)).long()
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    inside = ((rows >= top[:, None]) & (rows < (top + box_h)[:, None]))[:, :, None] \
        & ((cols >= left[:, None]) & (cols < (left + box_w)[:, None]))[:, None, :]
    inside = (inside & erase[:, None, None])[:, None]  # (N, 1, H, W)
    if mode == 'const':
        fill = torch.zeros((), dtype=images.dtype, device=device)
    else:
        shape = (n, c, h, w) if mode == 'pixel' else (n, c, 1, 1)
        fill = torch.randn(shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside, fill, images)



def batch_augment(aug: str, erase_prob: float, erase_mode: str):
    """The batched augmentation of every member view: pad-4 crop (+ flip for 'crop-flip'), then random
    erasing, all drawn from the step's generator (so a resumed run replays them). None for ``'timm'``: timm's
    per-copy pipeline crops, flips and erases in the loader (``timm_mimo.data.transforms``)."""
    if aug == 'timm':
        return None
    if not 0.0 <= erase_prob <= 1.0:
        raise ValueError(f'erase_prob must be in [0, 1], got {erase_prob}')
    crop = None if aug == 'none' else functools.partial(
        random_crop_flip, flip=aug.endswith('flip'), padding_mode='reflect' if aug.startswith('reflect') else 'constant')
    if erase_prob == 0:
        return crop

    def augment(images, generator=None):
        if crop is not None:
            images = crop(images, generator=generator)
        return random_erase(images, erase_prob, erase_mode, generator=generator)
    return augment
