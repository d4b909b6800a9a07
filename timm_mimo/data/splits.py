"""Train / validation / test splits for every data set the trainer and the validator read.

Model selection uses a validation split carved from the training data (never the test set). Splits:

| dataset | train | validation | test |
|---|---|---|---|
| '' (default): scikit-learn digits | 70 % per class | 15 % | 15 % |
| 'cifar10-zip' or a .zip (``../shared/data``) | 45k | last 500 / class (5k) | none (the zip has none) |
| 'torch/cifar10', 'torch/cifar100' | train minus validation | last 500 (C10) / 50 (C100) per class | official test |
| any other timm name, folder or tar | train minus validation | last ``val_per_class`` per class | timm's 'validation' split if present |
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from torch.utils.data import Dataset, Subset

import timm.data

from ..constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .digits import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from .factory import create_dataset, resolve_num_classes


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


def dataset_targets(dataset) -> List[int]:
    """Integer labels of a map-style dataset without decoding images."""
    targets = getattr(dataset, 'targets', None)
    if targets is None and hasattr(dataset, 'reader') and hasattr(dataset.reader, 'samples'):
        targets = [t for _, t in dataset.reader.samples]
    if targets is None:
        raise ValueError(f'cannot read the labels of {type(dataset).__name__} to carve a validation split')
    return [int(t) for t in targets]


def carve_validation(dataset, val_per_class: int):
    """Split a dataset into (train, validation) Subsets: the last ``val_per_class`` samples of each class."""
    by_class = {}
    for index, target in enumerate(dataset_targets(dataset)):
        by_class.setdefault(target, []).append(index)
    train_idx, val_idx = [], []
    for target, indices in sorted(by_class.items()):
        if len(indices) <= val_per_class:
            raise ValueError(f'class {target} has {len(indices)} samples, too few to hold out {val_per_class}')
        train_idx += indices[:-val_per_class]
        val_idx += indices[-val_per_class:]
    return Subset(dataset, sorted(train_idx)), Subset(dataset, sorted(val_idx))


def tensor_transform(img_size: int, mean, std):
    # no random augmentation here: crop / flip run batched in the MIMO batch builder, per copy
    return timm.data.create_transform(
        img_size, is_training=False, crop_pct=1.0, interpolation='bilinear', mean=mean, std=std)


def build_splits(
        dataset: str = '',
        data_dir: Optional[str] = None,
        download: bool = False,
        img_size: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        val_per_class: Optional[int] = None,
) -> DataSplits:
    """Datasets for training, model selection and final testing; images come out as normalised tensors."""
    if not dataset and not data_dir:
        size = img_size or 32
        return DataSplits(
            DigitsDataset('train', size), DigitsDataset('validation', size), DigitsDataset('test', size),
            10, size, DIGITS_MEAN, DIGITS_STD, 'scikit-learn digits (embedded), 70/15/15 split')

    if data_dir is not None and not dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) \
            and not Path(data_dir).exists():
        raise FileNotFoundError(f'dataset path not found: {data_dir}')
    is_cifar = dataset in ('cifar10-zip', 'torch/cifar10', 'torch/cifar100') or str(dataset).endswith('.zip') \
        or (not dataset and str(data_dir).endswith('.zip'))
    size = img_size or 32
    mean = tuple(mean or (CIFAR_DEFAULT_MEAN if is_cifar else timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(std or (CIFAR_DEFAULT_STD if is_cifar else timm.data.IMAGENET_DEFAULT_STD))
    transform = tensor_transform(size, mean, std)

    if dataset == 'cifar10-zip' or str(dataset).endswith('.zip') or (not dataset and str(data_dir).endswith('.zip')):
        per_class = val_per_class or 500
        train = create_dataset(dataset, data_dir, split='train', val_per_class=per_class, transform=transform)
        val = create_dataset(dataset, data_dir, split='validation', val_per_class=per_class, transform=transform)
        return DataSplits(train, val, None, resolve_num_classes(train), size, mean, std,
                          f'CIFAR-10 zip {train.root}: {len(train)} train / {len(val)} validation, no test split')

    root = data_dir if data_dir is not None else os.path.join('data', dataset.replace('/', '_'))
    full = create_dataset(dataset, root, split='train', is_training=True, download=download)
    full.transform = transform
    num_classes = resolve_num_classes(full)
    per_class = val_per_class or (50 if num_classes >= 100 else 500)
    train, val = carve_validation(full, per_class)
    test = None
    try:
        test = create_dataset(dataset, root, split='validation' if not dataset.startswith('torch/') else 'test',
                              download=download)
        test.transform = transform
    except Exception:  # noqa: BLE001  a dataset without a test / validation split is fine: report none
        test = None
    return DataSplits(train, val, test, num_classes, size, mean, std,
                      f'{dataset or data_dir}: {len(train)} train / {len(val)} validation (last {per_class} '
                      f'per class of train) / {len(test) if test is not None else "no"} test')
