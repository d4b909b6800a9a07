"""Train / validation / test splits for every data set the trainer and the validator read.

Model selection uses a validation split carved from the training data (never the test set). Splits:

| dataset | train | validation | test |
|---|---|---|---|
| '' (default): scikit-learn digits | 70 % per class (seeded shuffle) | 15 % | 15 % |
| 'cifar10-zip' or a .zip (``../shared/data``) | 45k | last 500 / class (5k) | none (the zip has none) |
| 'torch/cifar10', 'torch/cifar100' | train minus validation | last 500 (C10) / 50 (C100) per class | official test |
| hfds/, tfds/, wds/ names | train minus validation | last ``val_per_class`` per class | the library's 'validation' split if present |
| a folder (or tar) | ``train/`` (or the folder) minus validation | last ``val_per_class`` per class | ``test/`` or a validation folder beside ``train/``, else none |

Every split of a folder is labelled with the training folder's class-to-index map.
"""
import copy
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from torch.utils.data import Dataset, Subset

import timm.data

from ..constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .digits import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from .factory import create_dataset, resolve_num_classes

_logger = logging.getLogger(__name__)

# an image folder's split subfolders: timm's names for the training folder; for the test folder, 'test' and
# timm's names for a validation folder (with a training folder beside it, a validation folder is held out)
TRAIN_FOLDERS = ('train', 'training')
TEST_FOLDERS = ('test', 'validation', 'val', 'valid', 'eval', 'evaluation')
# the largest input side the data sets are built for: larger than any timm model's input, and an image side
# beyond it is gigabytes per batch; the embedded digits (8 x 8 images) are upscaled in memory, all at once
MAX_IMG_SIZE = 4096
MAX_DIGITS_IMG_SIZE = 256


@dataclass
class DataSplits:
    train: Dataset
    validation: Dataset
    test: Optional[Dataset]
    num_classes: int
    img_size: int
    mean: Sequence[float]
    std: Sequence[float]
    description: str
    # whether a horizontal mirror keeps the label: False for digits (a mirrored 2, 3, 4, 7 or 9 is no
    # digit or another one); the trainer's default augmentation reads it (crop + flip, or crop only)
    hflip: bool = True
    # where the test split comes from (a folder, a library's split), None when there is none
    test_source: Optional[str] = None

    @property
    def default_aug(self) -> str:
        """The batched augmentation that suits this data set: 'crop-flip', or 'crop' where a flip changes labels."""
        return 'crop-flip' if self.hflip else 'crop'


def dataset_targets(dataset) -> List[int]:
    """Integer labels of a map-style dataset without decoding images."""
    targets = getattr(dataset, 'targets', None)
    if targets is None and hasattr(dataset, 'reader') and hasattr(dataset.reader, 'samples'):
        targets = [t for _, t in dataset.reader.samples]
    if targets is None:
        raise ValueError(f'cannot read the labels of {type(dataset).__name__} to carve a validation split')
    return [int(t) for t in targets]


def carve_validation(dataset, val_per_class: int, train_dataset=None):
    """Split a dataset into (train, validation) Subsets: the last ``val_per_class`` samples of each class.

    ``train_dataset``: the same samples with the training transform, to take the training subset from.
    """
    by_class = {}
    for index, target in enumerate(dataset_targets(dataset)):
        by_class.setdefault(target, []).append(index)
    train_idx, val_idx = [], []
    for target, indices in sorted(by_class.items()):
        if len(indices) <= val_per_class:
            raise ValueError(f'class {target} has {len(indices)} samples, too few to hold out {val_per_class}')
        train_idx += indices[:-val_per_class]
        val_idx += indices[-val_per_class:]
    train_source = dataset if train_dataset is None else train_dataset
    return Subset(train_source, sorted(train_idx)), Subset(dataset, sorted(val_idx))


def skip_non_regular_files(dataset):
    """Drop the listed files of an image folder that are not regular files (a named pipe, a socket, a device, a
    broken link): opening a named pipe waits for a writer, so one would stop training for good. Each is warned
    about as timm warns about an image it cannot read."""
    reader = getattr(dataset, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if not isinstance(samples, list) or not samples or not isinstance(samples[0][0], str):
        return  # not a folder listing (a tar's members, a library's arrays)
    kept = []
    for path, target in samples:
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)  # follows links: a link to an image is kept
        except OSError:
            regular = False
        if regular:
            kept.append((path, target))
        else:
            _logger.warning(f'Skipped sample ({path}): not a regular file (a named pipe, socket, device or broken '
                            f'link)')
    if not kept:
        raise ValueError(f'Found 0 images in subfolders of {reader.root}: none is a regular file')
    reader.samples = kept


def find_test_folder(root) -> Optional[Path]:
    """The folder of ``root``'s test split, or None: a test or validation folder beside a training folder
    (:data:`TEST_FOLDERS`, :data:`TRAIN_FOLDERS`). Never ``root`` itself, nor a folder inside, around or equal to
    the training folder (that would score the model on its training images)."""
    root = Path(root)
    train = next((root / name for name in TRAIN_FOLDERS if (root / name).is_dir()), None)
    test = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if train is None or test is None:
        return None
    train, test = train.resolve(), test.resolve()
    if test.is_relative_to(train) or train.is_relative_to(test):
        return None
    return test


def folder_split(dataset: str, folder: Path, train) -> Optional[Dataset]:
    """The image folder ``folder`` labelled with the class-to-index map of ``train`` (its own folder names,
    numbered alone, would give another class the same index when it lacks a class). None when it holds no
    images. A class the training split lacks is an error; one it has no images of is logged."""
    classes = train.reader.class_to_idx
    try:
        split = create_dataset(dataset, str(folder), split='validation', search_split=False)
    except (RuntimeError, AssertionError) as e:  # timm's "Found 0 images in ..."
        _logger.warning(f'no test split: {" ".join(str(e).split())}')
        return None
    own = split.reader.class_to_idx
    unknown = [name for name in own if name not in classes]
    if unknown:
        raise ValueError(f'{folder} holds class(es) the training split lacks: {", ".join(unknown)} (the training '
                         f'classes: {", ".join(classes)})')
    missing = [name for name in classes if name not in own]
    if missing:
        _logger.warning(f'{folder} has no images of {len(missing)} of the {len(classes)} classes: '
                        f'{", ".join(missing)}; it is scored with the training split\'s class numbers')
    if own != classes:
        split = create_dataset(dataset, str(folder), split='validation', search_split=False, class_map=dict(classes))
    skip_non_regular_files(split)
    return split


def tensor_transform(img_size: int, mean, std):
    # no random augmentation here: crop / flip run batched in the MIMO batch builder, per copy
    return timm.data.create_transform(
        img_size, is_training=False, crop_pct=1.0, interpolation='bilinear', mean=mean, std=std)


def auto_augment_transform(auto_augment: str):
    """Training transform factory with timm's AutoAugment / RandAugment / AugMix policy ``auto_augment``.

    timm's training transform with its random-resized crop pinned to the full image and no flip: the
    pad-4 crop and flip of the small-image recipes run later, batched, per batch copy. Returns
    ``f(img_size, mean, std) -> transform`` for :func:`build_splits`.
    """
    def make(img_size: int, mean, std):
        return timm.data.create_transform(
            img_size, is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=None,
            auto_augment=auto_augment, interpolation='bicubic', mean=mean, std=std)
    return make


def build_splits(
        dataset: str = '',
        data_dir: Optional[str] = None,
        download: bool = False,
        img_size: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        val_per_class: Optional[int] = None,
        train_transform=None,
) -> DataSplits:
    """Datasets for training, model selection and final testing; images come out as normalised tensors.

    ``train_transform(img_size, mean, std)`` builds the training split's per-image transform (e.g. timm's
    RandAugment); by default every split gets the plain tensor transform (crop / flip run batched later).
    """
    if img_size is not None and not 1 <= img_size <= MAX_IMG_SIZE:
        raise ValueError(f'--img-size must be in [1, {MAX_IMG_SIZE}], got {img_size}')
    if val_per_class is not None and val_per_class < 1:
        raise ValueError(f'--val-per-class must be >= 1, got {val_per_class}')
    if not dataset and not data_dir:
        if img_size is not None and img_size > MAX_DIGITS_IMG_SIZE:
            raise ValueError(f'the embedded digits (8 x 8 images, upscaled in memory) take --img-size up to '
                             f'{MAX_DIGITS_IMG_SIZE}, got {img_size}')
        if train_transform is not None:
            raise ValueError('per-image augmentation (--aa) needs a dataset of images: the embedded digits are '
                             'tensors already; give --dataset / --data-dir')
        size = img_size or 32
        return DataSplits(
            DigitsDataset('train', size), DigitsDataset('validation', size), DigitsDataset('test', size),
            10, size, DIGITS_MEAN, DIGITS_STD, 'scikit-learn digits (embedded), 70/15/15 per class after a seeded shuffle',
            hflip=False, test_source='the embedded digits\' test split (15 % per class)')

    if data_dir is not None and not dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) \
            and not Path(data_dir).exists():
        raise FileNotFoundError(f'dataset path not found: {data_dir}')
    is_cifar = dataset in ('cifar10-zip', 'torch/cifar10', 'torch/cifar100') or str(dataset).endswith('.zip') \
        or (not dataset and str(data_dir).endswith('.zip'))
    size = img_size or 32
    mean = tuple(mean or (CIFAR_DEFAULT_MEAN if is_cifar else timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(std or (CIFAR_DEFAULT_STD if is_cifar else timm.data.IMAGENET_DEFAULT_STD))
    transform = tensor_transform(size, mean, std)
    train_tf = transform if train_transform is None else train_transform(size, mean, std)

    if dataset == 'cifar10-zip' or str(dataset).endswith('.zip') or (not dataset and str(data_dir).endswith('.zip')):
        per_class = val_per_class or 500
        train = create_dataset(dataset, data_dir, split='train', val_per_class=per_class, transform=train_tf)
        val = create_dataset(dataset, data_dir, split='validation', val_per_class=per_class, transform=transform)
        return DataSplits(train, val, None, resolve_num_classes(train), size, mean, std,
                          f'CIFAR-10 zip {train.root}: {len(train)} train / {len(val)} validation, no test split')

    root = data_dir if data_dir is not None else os.path.join('data', dataset.replace('/', '_'))
    try:
        full = create_dataset(dataset, root, split='train', is_training=True, download=download)
    except (RuntimeError, AssertionError) as e:  # timm's "Found 0 images in ...", or its bare assert on the root
        raise ValueError(f'cannot read {dataset or root} as an image data set: '
                         f'{" ".join(str(e).split()) or "no such data set or folder"}') from None
    skip_non_regular_files(full)
    full.transform = transform
    num_classes = resolve_num_classes(full)
    per_class = val_per_class or (50 if num_classes >= 100 else 500)
    full_train = None
    if train_transform is not None:
        full_train = copy.copy(full)  # the same listing (and carving), another transform
        full_train.transform = train_tf
    train, val = carve_validation(full, per_class, full_train)
    test, test_source = None, None
    if dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')):
        test_split = 'validation' if not dataset.startswith('torch/') else 'test'
        try:
            test = create_dataset(dataset, root, split=test_split, download=download)
            test.transform, test_source = transform, f'{dataset} {test_split} split'
        except Exception:  # noqa: BLE001  a dataset without a test / validation split is fine: report none
            test = None
    else:
        test_folder = find_test_folder(root)
        test = folder_split(dataset, test_folder, full) if test_folder is not None else None
        if test is not None:
            test.transform, test_source = transform, str(test_folder)
    return DataSplits(train, val, test, num_classes, size, mean, std,
                      f'{dataset or data_dir}: {len(train)} train / {len(val)} validation (last {per_class} '
                      f'per class of train) / ' + (f'{len(test)} test ({test_source})' if test is not None else
                                                   'no test split'), test_source=test_source)
