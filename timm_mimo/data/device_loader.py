"""Device-resident training data for small-image sets (CIFAR-10/100, Tiny ImageNet, the ``../shared`` zip).

The official MixMo code decodes JPEG/PNG with PIL in loader workers every epoch and builds its masks
in NumPy per sample: MixMo training waits for data. Here the training split is decoded once (cached on
disk as a uint8 tensor), moved to the accelerator once (50k CIFAR images are 150 MB as uint8), and every
batch is a gather by index, a cast and a normalisation on the device. Crop, flip, batch repetition,
member permutations, MSDA and masks then run batched on the device in :class:`timm_mimo.MimoBatchBuilder`.

:func:`resident_arrays` finds the arrays of a dataset (or a ``Subset`` of one) without a per-image pass
where it can; :class:`DeviceTensorLoader` iterates over them like a shuffled, sharded ``DataLoader``.
"""
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Subset

from .cifar_zip import CifarZipDataset
from .digits import DigitsDataset


def _channels_first(images: torch.Tensor) -> torch.Tensor:
    # decoded image arrays are (N, H, W, C); keep (N, C, H, W) so a gather yields model input directly
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return images.contiguous()


def default_cache_dir() -> Path:
    """Where decoded splits are cached: ``$TIMM_MIMO_CACHE_DIR``, else ``~/.cache/timm_mimo``."""
    return Path(os.environ.get('TIMM_MIMO_CACHE_DIR') or Path.home() / '.cache' / 'timm_mimo')


def resident_arrays(dataset, cache_dir: Optional[str] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images (N, C, H, W), labels (N,))`` of a whole dataset as tensors, or None if it has no array form.

    uint8 images are raw pixels (to be normalised on the device); float images are used as they are.
    Handles :class:`CifarZipDataset` (decoded once, cached in ``cache_dir``), the embedded digits, datasets
    with ``.data`` / ``.targets`` arrays (torchvision CIFAR-10/100, as timm's ``torch/cifar10`` gives them)
    and ``Subset`` s of these (a carved validation split stays out).
    """
    indices = None
    while isinstance(dataset, Subset):
        sub = torch.as_tensor(dataset.indices, dtype=torch.long)
        indices = sub if indices is None else sub[indices]
        dataset = dataset.dataset
    if isinstance(dataset, CifarZipDataset):
        images, labels = dataset.load_arrays(cache_dir)
    elif isinstance(dataset, DigitsDataset):
        images, labels = dataset.images, torch.as_tensor(dataset.targets)
    elif isinstance(getattr(dataset, 'data', None), (np.ndarray, torch.Tensor)) and hasattr(dataset, 'targets'):
        data = dataset.data
        images = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
        if images.dtype != torch.uint8 or images.ndim != 4:
            return None
        labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
    else:
        return None
    images, labels = _channels_first(images), labels.long()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images, labels


class DeviceTensorLoader:
    """Shuffled, sharded batches ``(images (U, C, H, W) float, labels (U,))`` of tensors kept on a device.

    Epoch order (``shuffle=True``, training): a permutation drawn from a generator seeded by (seed, epoch),
    identical on every process; process r takes positions r, r + P, ... (equal shares, like
    ``DistributedSampler`` with drop_last), then the last incomplete batch is dropped. ``start_batch``
    resumes mid-epoch at the same batch a ``skip_first_batches`` would. ``shuffle=False`` (evaluation):
    every sample once, in order, the last batch possibly smaller, no sharding. uint8 pixels are scaled to
    [0, 1] and normalised with ``mean`` / ``std``.
    """

    def __init__(
            self,
            images: torch.Tensor,
            labels: torch.Tensor,
            batch_size: int,
            device: torch.device,
            mean: Sequence[float] = (0.0, 0.0, 0.0),
            std: Sequence[float] = (1.0, 1.0, 1.0),
            seed: int = 0,
            num_replicas: int = 1,
            rank: int = 0,
            shuffle: bool = True,
    ):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        if not shuffle and num_replicas != 1:
            raise ValueError('an evaluation loader (shuffle=False) is not sharded: use num_replicas=1')
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        channels = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self.per_replica = images.shape[0] // num_replicas

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.shuffle:
            return -(-self.images.shape[0] // self.batch_size)
        return self.per_replica // self.batch_size

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.images.shape[0], device=self.device)
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.images.shape[0], generator=gen)
        return order[:self.per_replica * self.num_replicas][self.rank::self.num_replicas].to(self.device)

    def batches(self, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[idx]
            if images.dtype == torch.uint8:
                images = (images.float().div_(255.0) - self.mean) / self.std
            yield images, self.labels[idx]

    def __iter__(self):
        return self.batches()


def device_loader_for(
        dataset,
        batch_size: int,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: int,
        cache_dir: Optional[str] = None,
        **kwargs,
) -> Tuple[Optional[DeviceTensorLoader], str]:
    """A :class:`DeviceTensorLoader` over ``dataset``, or ``(None, why not)`` when it has no array form or
    its images are not ``img_size`` square (the per-image path would resize them; this one does not)."""
    arrays = resident_arrays(dataset, cache_dir)
    if arrays is None:
        return None, f'{type(dataset).__name__} has no array form (decoded pixels) to keep on the device'
    images, labels = arrays
    if tuple(images.shape[-2:]) != (img_size, img_size):
        return None, f'its images are {tuple(images.shape[-2:])}, not the {img_size} px the model takes'
    return DeviceTensorLoader(images, labels, batch_size, device, mean, std, **kwargs), ''
