"""ImageNet-style transforms, the timm way, drawn independently for every member copy of an image.

The small-image recipes (CIFAR, Tiny ImageNet, digits) crop, flip and erase batched on the device
(``timm_mimo.augment``). Sets of large images (ImageNet folders, tars, Hub sets) are trained, as timm trains
them, with ``timm.data.create_transform(is_training=True)``: random-resized crop, flips, colour jitter,
AutoAugment / RandAugment, random erasing, per image in the loader's workers. With MixMo each image of a
batch is used ``M x b`` times (``b`` batch repeats, ``M`` members: docs/methods/mixmo.md §3), and the official
code transforms each member's sample on its own. :class:`MemberCopies` decodes an image once and draws the
pipeline ``M x b`` times, returning the copies stacked ``(M x b, C, H, W)``; the batch builder then hands
copy ``k x b + r`` to member ``k`` without augmenting again (``timm_mimo.batch``).

Every draw of an image's copies comes from timm's and torchvision's usual random sources (Python's ``random``,
NumPy's and torch's global generators), seeded for that image from (seed, epoch, index) and put back after:
the copies depend on nothing else (not the worker that read them, not the number of workers or processes),
so a resumed run replays them exactly. A stream's samples (``wds/``, ``hfids/``) have no index: their draws
are seeded by their position in the reader's share of the epoch (:class:`StreamCopies`).

Evaluation uses timm's eval pipeline (resize to ``img_size / crop_pct``, center crop, normalise) from the
data config ``timm.data.resolve_data_config`` resolves from the flags and the model's ``pretrained_cfg``.
"""
import contextlib
import copy
import hashlib
import random
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

import timm.data

# --aug's value for this path (the batched ones: 'crop-flip', 'crop', 'reflect-crop-flip', 'none')
TIMM_AUG = 'timm'


@dataclass(frozen=True)
class ImageTransforms:
    """timm's transform flags, named as timm's train.py names them (``--scale`` ... ``--interpolation``).

    The training ones feed ``create_transform(is_training=True)``; the eval ones (``None``: the model's
    ``pretrained_cfg``, else timm's defaults) feed ``resolve_data_config``."""
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1
    train_interpolation: str = 'random'
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None


def eval_data_config(img_size: int, mean: Sequence[float], std: Sequence[float], pretrained_cfg=None,
                     crop_pct: Optional[float] = None, interpolation: Optional[str] = None) -> dict:
    """timm's data config of evaluation (input_size, interpolation, mean, std, crop_pct, crop_mode): the flags
    where given, else the model's ``pretrained_cfg`` (a PretrainedCfg or a dict), else timm's defaults. The
    input side and the normalisation are the run's own (already resolved from the flags, model and data)."""
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else dict(pretrained_cfg or {})
    config = timm.data.resolve_data_config(
        dict(input_size=(3, img_size, img_size), mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
             interpolation=interpolation or ''), pretrained_cfg=cfg)
    config['input_size'] = (3, img_size, img_size)
    return config


def eval_transform(data_config: dict):
    """timm's eval pipeline for a data config: resize to ``img_size / crop_pct``, center crop, normalise."""
    return timm.data.create_transform(**data_config, is_training=False)


def train_transform(data_config: dict, transforms: ImageTransforms):
    """timm's training pipeline, as timm's train.py builds it from its flags (one draw per call)."""
    return timm.data.create_transform(
        data_config['input_size'], is_training=True, scale=tuple(transforms.scale), ratio=tuple(transforms.ratio),
        hflip=transforms.hflip, vflip=transforms.vflip, color_jitter=transforms.color_jitter,
        auto_augment=transforms.aa, interpolation=transforms.train_interpolation, mean=data_config['mean'],
        std=data_config['std'], re_prob=transforms.reprob, re_mode=transforms.remode, re_count=transforms.recount)


def copy_seed(seed: int, epoch: int, index) -> int:
    """A 64-bit seed for the copies of sample ``index`` (an int, or a stream's position key) in ``epoch``:
    distinct for every (seed, epoch, index)."""
    digest = hashlib.blake2b(f'{seed}/{epoch}/{index}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little')


@contextlib.contextmanager
def seeded_draws(seed: int):
    """Seed the random sources timm's and torchvision's transforms draw from (Python's ``random``, NumPy's and
    torch's CPU generators) and put them back after, so the caller's own draws are untouched."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.default_generator.manual_seed(seed)  # the CPU generator alone: torch.manual_seed would seed CUDA too
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def draw_copies(image, transform, copies: int, seed: int) -> torch.Tensor:
    """``copies`` independent draws of ``transform`` on one decoded image, stacked, from the draws of ``seed``."""
    with seeded_draws(seed):
        return torch.stack([transform(image) for _ in range(copies)])


class MemberCopies(Dataset):
    """``(copies (copies, C, H, W), label)`` per sample of ``dataset`` (which yields PIL images): one decode,
    ``copies`` independent draws of ``transform``, seeded by (seed, epoch, index) (:func:`copy_seed`).

    ``set_epoch`` before each epoch's iteration (DataLoader workers are forked with the epoch set)."""

    def __init__(self, dataset, transform, copies: int, seed: int):
        if copies < 1:
            raise ValueError(f'copies must be >= 1, got {copies}')
        self.dataset, self.transform, self.copies, self.seed = dataset, transform, copies, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return draw_copies(image, self.transform, self.copies, copy_seed(self.seed, self.epoch, index)), target


class StreamCopies:
    """The transform of a stream (``wds/``, ``hfids/``): ``copies`` draws per sample, as :class:`MemberCopies`.

    A stream sample has no index; its position does: the n-th sample that DataLoader worker w of process p
    reads in ``epoch``. A stream's epoch order depends on (seed, epoch) alone (``timm_mimo.data.loaders``) and a
    resumed epoch replays it from its start, so the positions, and the draws, are those of the first reading.
    ``set_epoch`` starts the count again (workers are forked with it set)."""

    def __init__(self, transform, copies: int, seed: int, process: int = 0):
        self.transform, self.copies, self.seed, self.process = transform, copies, seed, process
        self.epoch, self.count = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch, self.count = epoch, 0

    def __call__(self, image) -> torch.Tensor:
        worker = torch.utils.data.get_worker_info()
        position = f'{self.process}/{worker.id if worker is not None else "main"}/{self.count}'
        self.count += 1
        return draw_copies(image, self.transform, self.copies, copy_seed(self.seed, self.epoch, position))


def with_transform(dataset, transform):
    """The same samples as ``dataset`` (a map-style set with a ``transform`` attribute, or a Subset of one) with
    ``transform`` (None: PIL images); ``dataset`` itself is left as it is."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, 'transform'):
        raise ValueError(f'{type(dataset).__name__} holds tensors, not images: timm\'s per-image transforms need a '
                         f'data set of images (a folder, tar, hfds/, torch/ or zip set)')
    other = copy.copy(dataset)
    other.transform = transform
    return other


def first_image_side(dataset) -> Optional[int]:
    """The shorter side of the first image of ``dataset`` (decoded without its transform), None where the
    samples are not images (tensors already)."""
    try:
        image = with_transform(dataset, None)[0][0]
    except ValueError:
        return None
    return min(image.size) if hasattr(image, 'size') and not isinstance(image, torch.Tensor) else None


def default_aug(splits, img_size: int, native_size: Optional[int] = None) -> str:
    """The training augmentation a data set gets without ``--aug``: timm's per-copy pipeline (``'timm'``) for a
    map-style set of images larger than the model's input (an ImageNet-like folder, tar or Hub set: random-
    resized crops are what they are trained with), else the batched pad-4 crop (+ flip) of the small-image
    recipes (CIFAR, Tiny ImageNet at 64 px, digits). The first training image stands for the set;
    ``native_size`` (a set whose side its name tells: the CIFAR sets, the digits) keeps the batched recipe."""
    if not splits.iterable and native_size is None:
        side = first_image_side(splits.train)
        if side is not None and side > img_size:
            return TIMM_AUG
    return splits.default_aug


def timm_transform_splits(splits, transforms: ImageTransforms, pretrained_cfg, copies: int, seed: int,
                          process: int = 0):
    """(splits, eval data config) for training with timm's pipelines: the training split as
    :class:`MemberCopies` of ``copies`` (M x b) draws per image (a stream: with :class:`StreamCopies` as its
    transform; ``process``: this process's rank), the validation and test splits through timm's eval pipeline."""
    splits, config = timm_eval_splits(splits, pretrained_cfg, transforms.crop_pct, transforms.interpolation)
    pipeline = train_transform(config, transforms)
    if splits.iterable:
        train = with_transform(splits.train, StreamCopies(pipeline, copies, seed, process))
    else:
        train = MemberCopies(with_transform(splits.train, None), pipeline, copies, seed)
    return replace(splits, train=train), config


def timm_eval_splits(splits, pretrained_cfg, crop_pct: Optional[float] = None, interpolation: Optional[str] = None):
    """(splits, data config) with the validation and test splits through timm's eval pipeline."""
    config = eval_data_config(splits.img_size, splits.mean, splits.std, pretrained_cfg, crop_pct, interpolation)
    evaluation = eval_transform(config)
    return replace(splits, validation=with_transform(splits.validation, evaluation),
                   test=with_transform(splits.test, evaluation) if splits.test is not None else None), config
