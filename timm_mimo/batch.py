"""MIMO batches: batch repetition, member permutations, MixMo masks and soft targets (docs/methods/mixmo.md §3).

One batch format from loader to loss::

    MimoBatch(inputs (B, M, C, H, W), masks (B, M, h, w), targets (B, M, K))

``targets`` are per-member soft labels with the MixMo loss weights already folded in (soft cross-entropy
is linear in the target), so the loss is the sum over members of a soft-target cross-entropy.

:class:`MimoBatchBuilder` turns U unique images and labels into such a batch of B = U * batch_repeat mixed
samples with batched tensor ops. It runs identically inside a DataLoader collate (CPU workers) and on
the accelerator in the training step.
"""
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from .augment import random_crop_flip
from .mimo import check_num_members
from .mixing import check_alpha, check_mix_mode, coarse_grid_warning, member_loss_weights, sample_mixing
from .msda import check_msda_mode, msda_mix


class MimoBatch(NamedTuple):
    inputs: torch.Tensor
    masks: torch.Tensor
    targets: torch.Tensor


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.) -> torch.Tensor:
    """One-hot (or soft, timm-style smoothed) float targets for integer labels of any shape."""
    off = smoothing / num_classes
    return F.one_hot(labels.long(), num_classes).float() * (1.0 - smoothing) + off


class MimoBatchBuilder:
    """Builds :class:`MimoBatch` es from U unique images (U, C, H, W), or their M * b transformed copies
    (U, M * b, C, H, W), and integer labels (U,).

    Steps (docs/methods/mixmo.md §1-3): repeat every image ``batch_repeat`` times; draw M independent permutations
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
        """Build a batch; ``generator`` (on the images' device) overrides the builder's own draws.

        ``images``: (U, C, H, W), augmented here per member view; or (U, M * b, C, H, W), every image's M * b
        copies transformed already (timm's per-copy pipeline, ``timm_mimo.data.transforms.MemberCopies``): each
        (slot, member) view then takes a copy of its own, and nothing is augmented again."""
        copies = self.num_members * self.batch_repeat
        if images.ndim == 5 and images.shape[1] != copies:
            raise ValueError(f'{images.shape[1]} copies per image, but M x b = {self.num_members} x '
                             f'{self.batch_repeat} = {copies} views of each image are drawn')
        if images.ndim not in (4, 5):
            raise ValueError(f'images must be (U, C, H, W) or (U, M * b, C, H, W), got shape {tuple(images.shape)}')
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels')
        gen = generator if generator is not None else self.generator(images.device)
        device = images.device
        b = self.batch_repeat
        if not torch.is_floating_point(images):
            images = images.float()
        # b consecutive copies of each unique image (docs/methods/mixmo.md §3)
        copy_of = torch.arange(images.shape[0], device=device).repeat_interleave(b)
        labels = labels.to(device)
        batch_size = copy_of.shape[0]

        # M independent permutations of the B positions: member k of slot i reads copy perms[k, i]
        perms = torch.rand(self.num_members, batch_size, generator=gen, device=device).argsort(1)
        source = copy_of[perms.t()]                       # (B, M) unique-image index of every view
        member_labels = labels[source]                    # (B, M)
        if images.ndim == 5:
            # member k's view of slot i is copy k * b + r of its image, r = which of the image's b positions
            # the permutation gave it: every one of an image's M * b copies is used once
            copy = (perms % b).t() + torch.arange(self.num_members, device=device) * b
            inputs = images[source, copy]                 # (B, M, C, H, W)
        else:
            inputs = images[source.flatten()]             # (B * M, C, H, W)
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


def unique_batch_size(batch_size: int, batch_repeat: int) -> int:
    """Unique images per batch, B / b, for a loader that feeds a :class:`MimoCollate`."""
    if batch_repeat < 1 or batch_size % batch_repeat:
        raise ValueError(
            f'batch size {batch_size} is not divisible by the batch repetition {batch_repeat}')
    return batch_size // batch_repeat
