"""MIMO batches: batch repetition, member permutations, MixMo masks and soft targets (spec mixmo.md §3).

One batch format from loader to loss::

    MimoBatch(inputs (B, M, C, H, W), masks (B, M, h, w), targets (B, M, K))

``targets`` are per-member soft labels with the MixMo loss weights already folded in (soft cross-entropy
is linear in the target), so the loss is the sum over members of a soft-target cross-entropy.

:class:`MimoBatchBuilder` turns U unique images and labels into such a batch of B = U * batch_repeat mixed
samples with batched tensor ops. It runs identically inside a DataLoader collate (CPU workers) and on
the accelerator in the training step.
"""
import math
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from timm.loss import SoftTargetCrossEntropy

from .mimo import check_num_members
from .mixing import check_alpha, check_mix_mode, coarse_grid_warning, member_loss_weights, sample_mixing
from .msda import check_msda_mode, msda_mix


class MimoBatch(NamedTuple):
    inputs: torch.Tensor
    masks: torch.Tensor
    targets: torch.Tensor


def random_crop_flip(
        images: torch.Tensor, padding: int = 4, flip: bool = True,
        generator: Optional[torch.Generator] = None, padding_mode: str = 'constant') -> torch.Tensor:
    """Per-sample random crop after padding, and horizontal flip, for a batch (N, C, H, W).

    The CIFAR / Tiny ImageNet augmentation of MixMo (pad-4 crop + flip, spec §5.2), which timm's
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


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.) -> torch.Tensor:
    """One-hot (or soft, timm-style smoothed) float targets for integer labels of any shape."""
    off = smoothing / num_classes
    return F.one_hot(labels.long(), num_classes).float() * (1.0 - smoothing) + off


class MimoBatchBuilder:
    """Builds :class:`MimoBatch` es from U unique images (U, C, H, W) and integer labels (U,).

    Steps (spec mixmo.md §1-3): repeat every image ``batch_repeat`` times; draw M independent permutations
    of the B positions for the M members; augment each of the M * B member views independently
    (``augment``, as the official code does); sample MixMo masks on the mixing grid; optionally apply MSDA per member; build soft targets
    weighted by the MixMo loss weights.

    Args:
        num_members: M; 1 gives vanilla (or MSDA-only) batches in the same format.
        num_classes: K.
        mix_grid: (h, w) of the masks, i.e. ``model.mix_grid_size(img_size)``.
        batch_repeat: b, copies of each unique image per batch.
        mix_mode: 'mimo', 'linear' or 'cut' (see :mod:`timm_mimo.mixing`).
        mix_prob: probability of patch mixing per batch in 'cut' mode (decays, see ``progress``).
        mix_alpha: Dirichlet concentration of the mixing ratios.
        weight_root: r of the loss weights (MixMo 3, MIMO 1).
        msda: None, 'cutmix' or 'mixup' on each member's image.
        msda_prob / msda_alpha: probability and Beta(alpha, alpha) of the MSDA.
        label_smoothing: timm-style smoothing of the member targets.
        augment: ``f(images, generator) -> images`` applied to the (B * M) member views, e.g.
            :func:`random_crop_flip`; None when the loader already augments.
        seed: seed of the builder's generators; None takes torch's seed (per worker in a DataLoader).
    """

    def __init__(
            self,
            num_members: int,
            num_classes: int,
            mix_grid: Tuple[int, int],
            batch_repeat: int = 1,
            mix_mode: str = 'cut',
            mix_prob: float = 0.5,
            mix_alpha: float = 2.0,
            weight_root: float = 3.0,
            msda: Optional[str] = None,
            msda_prob: float = 0.5,
            msda_alpha: float = 1.0,
            label_smoothing: float = 0.0,
            augment: Optional[Callable] = random_crop_flip,
            seed: Optional[int] = None,
    ):
        self.num_members = check_num_members(num_members)
        if not isinstance(batch_repeat, int) or batch_repeat < 1:
            raise ValueError(f'batch_repeat must be an int >= 1, got {batch_repeat!r}')
        self.mix_mode = check_mix_mode(mix_mode)
        if num_members > 1 and mix_mode != 'mimo':
            check_alpha(mix_alpha, 'mix_alpha')
        if weight_root <= 0:
            raise ValueError(f'weight_root must be > 0, got {weight_root}')
        self.msda = check_msda_mode(msda) if msda not in (None, '', 'none') else None
        if self.msda is not None:
            check_alpha(msda_alpha, 'msda_alpha')
        self.num_classes = num_classes
        self.mix_grid = tuple(mix_grid)
        coarse = coarse_grid_warning(num_members, self.mix_grid, mix_mode, mix_alpha)
        if coarse:
            warnings.warn(coarse, stacklevel=2)
        self.batch_repeat = batch_repeat
        self.mix_prob = mix_prob
        self.mix_alpha = mix_alpha
        self.weight_root = weight_root
        self.msda_prob = msda_prob
        self.msda_alpha = msda_alpha
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.seed = seed
        # fraction of training done, set by the training loop each epoch: drives the patch-prob decay
        self.progress = 0.0
        self._generators: Dict[Tuple[int, str], torch.Generator] = {}

    @classmethod
    def from_model(cls, model, img_size: Sequence[int], **kwargs) -> 'MimoBatchBuilder':
        """Builder matching a model's M, classes and mixing grid."""
        return cls(model.num_members, model.num_classes, model.mix_grid_size(tuple(img_size[-2:])), **kwargs)

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator per (process, device): forked DataLoader workers must not share draws."""
        key = (os.getpid(), str(device))
        gen = self._generators.get(key)
        if gen is None:
            worker = torch.utils.data.get_worker_info()
            if self.seed is None:
                seed = torch.initial_seed()  # the DataLoader seeds each worker differently
            else:
                seed = self.seed + (worker.id + 1 if worker is not None else 0) * 1_000_003
            gen = torch.Generator(device=device)
            gen.manual_seed(seed % (2 ** 63))
            self._generators[key] = gen
        return gen

    def set_epoch(self, epoch: int, num_epochs: int):
        """Start of epoch ``epoch`` (0-based, as train.py counts): the patch-probability schedule follows progress.

        Progress is read the way the official MixMo code reads it, from the 1-based epoch:
        (epoch + 1) / num_epochs, so the last epoch runs at progress 1 (patch probability 0, linear mixing
        only) and the decay over the last 1/12 of training ends at 0 rather than one epoch short of it.
        """
        self.progress = (epoch + 1) / max(num_epochs, 1)

    def __call__(
            self, images: torch.Tensor, labels: torch.Tensor,
            generator: Optional[torch.Generator] = None) -> MimoBatch:
        """Build a batch; ``generator`` (on the images' device) overrides the builder's own draws."""
        if images.ndim != 4:
            raise ValueError(f'images must be (U, C, H, W), got shape {tuple(images.shape)}')
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels')
        gen = generator if generator is not None else self.generator(images.device)
        device = images.device
        b = self.batch_repeat
        if not torch.is_floating_point(images):
            images = images.float()
        # b consecutive copies of each unique image (spec §3)
        copy_of = torch.arange(images.shape[0], device=device).repeat_interleave(b)
        labels = labels.to(device)
        batch_size = copy_of.shape[0]

        # M independent permutations of the B positions: member k of slot i reads copy perms[k, i]
        perms = torch.rand(self.num_members, batch_size, generator=gen, device=device).argsort(1)
        source = copy_of[perms.t()]                       # (B, M) unique-image index of every view
        member_labels = labels[source]                    # (B, M)
        inputs = images[source.flatten()]                 # (B * M, C, H, W)
        if self.augment is not None:
            # every (slot, member) view is augmented on its own, as the official code does (its dataset
            # wrapper loads and transforms each member's sample separately): M * B draws, not B shared
            inputs = self.augment(inputs, generator=gen)
        inputs = inputs.unflatten(0, (batch_size, self.num_members))  # (B, M, C, H, W)

        masks, kappa = sample_mixing(
            batch_size, self.num_members, self.mix_grid, self.mix_mode, self.mix_prob, self.mix_alpha,
            self.progress, gen, device)
        targets = one_hot_smoothed(member_labels, self.num_classes, self.label_smoothing)
        if self.msda is not None:
            inputs, partner, own_share = msda_mix(
                inputs, masks, self.msda, self.msda_prob, self.msda_alpha,
                reverse_if_minor=self.num_members > 1, generator=gen)
            partner_targets = targets.flatten(0, 1)[partner]
            targets = own_share[..., None] * targets + (1 - own_share[..., None]) * partner_targets
        targets = targets * member_loss_weights(kappa, self.weight_root)[..., None]
        return MimoBatch(inputs, masks, targets)


class MimoCollate:
    """``collate_fn`` for a DataLoader or ``timm.data.create_loader(..., use_prefetcher=False)``.

    The loader's batch size is the number of *unique* images U; each batch comes out as a
    :class:`MimoBatch` of U * batch_repeat mixed samples. The dataset's transform must return tensors
    (timm's no-aug transform with ``crop_pct=1.0`` does); crop and flip run here, per member view.
    """

    def __init__(self, builder: MimoBatchBuilder):
        self.builder = builder

    def __call__(self, samples) -> MimoBatch:
        images, labels = default_collate(samples)
        return self.builder(images, torch.as_tensor(labels))


class MemberSoftTargetCrossEntropy(torch.nn.Module):
    """Sum over members of timm's soft-target cross-entropy (mean over the batch), spec §2.2.

    Takes member logits (B, M, K) and targets (B, M, K) that already carry the MixMo weights.
    """

    def __init__(self):
        super().__init__()
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, member_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_members = member_logits.shape[1]
        return self.soft_ce(member_logits.flatten(0, 1), targets.flatten(0, 1)) * num_members


def unique_batch_size(batch_size: int, batch_repeat: int) -> int:
    """Unique images per batch, B / b, for a loader that feeds a :class:`MimoCollate`."""
    if batch_repeat < 1 or batch_size % batch_repeat:
        raise ValueError(
            f'batch size {batch_size} is not divisible by the batch repetition {batch_repeat}')
    return batch_size // batch_repeat
