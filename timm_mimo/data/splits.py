"""Train / validation / test splits for every data set the trainer and the validator read.

Model selection uses a validation split carved from the training data (never the test set). Splits:

| dataset | train | validation (model selection) | test (reported) |
|---|---|---|---|
| '' (default): scikit-learn digits | 70 % per class (seeded shuffle) | 15 % | 15 % |
| 'cifar10-zip' or a .zip | 45k | last 500 / class (5k) | none (the zip has none) |
| 'torch/cifar10', 'torch/cifar100' | train minus validation | last 500 (C10) / 50 (C100) per class | official test |
| hfds/ names (map-style) | ``--train-split`` minus validation | last ``val_per_class`` per class | ``--val-split``, else the set's 'validation' or 'test' split if present |
| a folder | ``train/`` (or the folder) minus validation | last ``val_per_class`` per class | ``--val-split`` folder, else ``test/`` or a validation folder beside ``train/``, else none |
| a tar of images | the tar minus validation | last ``val_per_class`` per class | ``--val-split`` tar beside it, else ``test.tar`` / ``validation.tar`` / ... beside ``train.tar``, else none |
| wds/, hfids/, tfds/ streams | ``--train-split`` | ``--val-split`` (a split of its own) | the set's 'test' split if present |
| the same, ``select_last_epoch`` | ``--train-split`` | none: the last epoch is kept | ``--val-split`` (or 'validation' / 'test') |

Every split is labelled with the training split's class-to-index map.
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
from .streams import MissingSplit, create_stream, is_stream

_logger = logging.getLogger(__name__)

# an image folder's split subfolders: timm's names for the training folder; for the test folder, 'test' and
# timm's names for a validation folder (with a training folder beside it, a validation folder is held out)
TRAIN_FOLDERS = ('train', 'training')
TEST_FOLDERS = ('test', 'validation', 'val', 'valid', 'eval', 'evaluation')
# the largest input side the data sets are built for: larger than any timm model's input, and an image side
# beyond it is gigabytes per batch; the embedded digits (8 x 8 images) are upscaled in memory, all at once
MAX_IMG_SIZE = 4096
MAX_DIGITS_IMG_SIZE = 256
LAST_EPOCH = 'the last epoch (--select-last-epoch: no selection split)'
# timm's data set flags, build_splits' arguments of the same names (train.py and validate.py take them alike)
DATA_BACKEND_KEYS = ('train_split', 'val_split', 'train_num_samples', 'val_num_samples', 'class_map',
                     'select_last_epoch')


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
    # how the best epoch is chosen: on a validation split (carved, or named), or 'the last epoch'
    selection: str = 'validation split carved from train'
    # a stream (wds/, hfids/, tfds/): no random access, sharded by timm's reader (loaders.py)
    iterable: bool = False

    @property
    def select_last_epoch(self) -> bool:
        return self.selection == LAST_EPOCH

    @property
    def default_aug(self) -> str:
        """The batched augmentation that suits this data set: 'crop-flip', or 'crop' where a flip changes labels."""
        return 'crop-flip' if self.hflip else 'crop'


def dataset_targets(dataset) -> List[int]:
    """Integer labels of a map-style dataset without decoding images."""
    targets = getattr(dataset, 'targets', None)
    reader = getattr(dataset, 'reader', None)
    if targets is None and reader is not None:
        if getattr(reader, 'targets', None) is not None:  # timm's tar reader
            targets = reader.targets
        elif hasattr(reader, 'samples'):  # timm's folder reader: (path, target)
            targets = [t for _, t in reader.samples]
        elif hasattr(reader, 'iter_targets'):  # timm's hfds reader: the label column, no image decoded
            targets = list(reader.iter_targets())
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


def class_to_idx(dataset) -> dict:
    """The class-name-to-index map of a timm ImageDataset (folder, tar, hfds reader); {} where it has none."""
    reader = getattr(dataset, 'reader', None)
    return dict(getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None) or {})


def folder_split(dataset: str, folder: Path, train) -> Optional[Dataset]:
    """The image folder (or tar) ``folder`` labelled with the class-to-index map of ``train`` (its own folder
    names, numbered alone, would give another class the same index when it lacks a class). None when it holds no
    images. A class the training split lacks is an error; one it has no images of is logged."""
    classes = class_to_idx(train)
    try:
        split = create_dataset(dataset, str(folder), split='validation', search_split=False)
    except (RuntimeError, AssertionError) as e:  # timm's "Found 0 images in ..."
        _logger.warning(f'no test split: {" ".join(str(e).split())}')
        return None
    own = class_to_idx(split)
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


def find_test_tar(train_tar, val_split: Optional[str] = None) -> Optional[Path]:
    """The tar of the test split beside the training tar ``train_tar``: ``<val_split>.tar`` (or the path
    ``val_split``) when named, which must exist; else ``test.tar``, ``validation.tar``, ... (:data:`TEST_FOLDERS`)
    when the training tar is ``train.tar`` or ``training.tar``, as for folders; else None."""
    train_tar = Path(train_tar)
    if val_split:
        tar = Path(val_split) if val_split.endswith('.tar') else train_tar.parent / f'{val_split}.tar'
        if not tar.is_file():
            raise FileNotFoundError(f'--val-split {val_split}: no tar {tar} beside {train_tar}')
        if tar.resolve() == train_tar.resolve():
            raise ValueError(f'--val-split {val_split} is the training tar {train_tar}')
        return tar
    if train_tar.stem not in TRAIN_FOLDERS:
        return None
    return next((train_tar.parent / f'{name}.tar' for name in TEST_FOLDERS
                 if (train_tar.parent / f'{name}.tar').is_file()), None)


def library_test_split(dataset: str, root, val_split: Optional[str], download: bool, train):
    """(test split, its name) of a library's map-style set (torch/, hfds/): ``val_split`` when named (which must
    exist), else the library's test split (torch/) or its 'validation' or 'test' split (hfds/), else (None, None).
    Labelled with ``train``'s class-to-index map."""
    if dataset.lower().startswith('torch/'):
        names = [val_split or 'test']
        class_map = None  # torchvision's sets number their classes alone, the same in both splits
    else:
        names = [val_split] if val_split else ['validation', 'test']
        class_map = class_to_idx(train) or None
    for name in names:
        if name.split('[')[0] == 'train' and not dataset.lower().startswith('torch/'):
            raise ValueError(f'--val-split {name} is the training split: the test split must be another one')
        try:
            return create_dataset(dataset, root, split=name, download=download, class_map=class_map), name
        except Exception as e:  # noqa: BLE001  the library's own error for a split it lacks
            if val_split:
                raise ValueError(f'--val-split {val_split}: {dataset} has no such split '
                                 f'({" ".join(str(e).split())[:300]})') from None
    return None, None


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
        train_split: str = 'train',
        val_split: Optional[str] = None,
        class_map: Optional[str] = None,
        train_num_samples: Optional[int] = None,
        val_num_samples: Optional[int] = None,
        select_last_epoch: bool = False,
        num_classes: Optional[int] = None,
        batch_size: int = 1,
        seed: int = 42,
) -> DataSplits:
    """Datasets for training, model selection and final testing; images come out as normalised tensors.

    ``train_transform(img_size, mean, std)`` builds the training split's per-image transform (e.g. timm's
    RandAugment); by default every split gets the plain tensor transform (crop / flip run batched later).
    timm's data flags: ``train_split``, ``val_split`` (the reported split of a map-style set, the selection split
    of a stream: see the module's table), ``class_map`` (a file of class names, timm's format),
    ``train_num_samples`` / ``val_num_samples`` (a stream's length where the library does not know it).
    Streams only: ``select_last_epoch`` (no selection split), ``num_classes`` (where the stream does not name its
    classes), ``batch_size`` (unique images per process and step) and ``seed``, as timm's readers take them.
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

    for flag, value in (('--train-num-samples', train_num_samples), ('--val-num-samples', val_num_samples)):
        if value is not None and value < 1:
            raise ValueError(f'{flag} must be >= 1, got {value}')
    if select_last_epoch and not is_stream(dataset):
        raise ValueError('--select-last-epoch is for streamed sets (wds/, hfids/, tfds/): this set carves its '
                         'selection split from the training split')
    if class_map and (dataset.lower().startswith('torch/') or is_cifar_zip(dataset, data_dir)):
        raise ValueError(f'--class-map is not supported for {dataset or data_dir} (its classes are fixed)')
    if data_dir is not None and not dataset.lower().startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) \
            and not Path(data_dir).exists():
        raise FileNotFoundError(f'dataset path not found: {data_dir}')
    is_cifar = dataset in ('cifar10-zip', 'torch/cifar10', 'torch/cifar100') or str(dataset).endswith('.zip') \
        or (not dataset and str(data_dir).endswith('.zip'))
    size = img_size or 32
    mean = tuple(mean or (CIFAR_DEFAULT_MEAN if is_cifar else timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(std or (CIFAR_DEFAULT_STD if is_cifar else timm.data.IMAGENET_DEFAULT_STD))
    transform = tensor_transform(size, mean, std)
    train_tf = transform if train_transform is None else train_transform(size, mean, std)

    if is_cifar_zip(dataset, data_dir):
        per_class = val_per_class or 500
        train = create_dataset(dataset, data_dir, split='train', val_per_class=per_class, transform=train_tf)
        val = create_dataset(dataset, data_dir, split='validation', val_per_class=per_class, transform=transform)
        return DataSplits(train, val, None, resolve_num_classes(train), size, mean, std,
                          f'CIFAR-10 zip {train.root}: {len(train)} train / {len(val)} validation, no test split')

    root = data_dir if data_dir is not None else os.path.join('data', dataset.replace('/', '_'))
    if is_stream(dataset):
        return stream_splits(dataset, root, download, size, mean, std, transform, train_tf, train_split, val_split,
                             class_map, train_num_samples, val_num_samples, select_last_epoch, num_classes,
                             batch_size, seed)
    try:
        full = create_dataset(dataset, root, split=train_split, is_training=True, download=download,
                              class_map=class_map or None)
    except (RuntimeError, AssertionError) as e:  # timm's "Found 0 images in ...", or its bare assert on the root
        raise ValueError(f'cannot read {dataset or root} as an image data set: '
                         f'{" ".join(str(e).split()) or "no such data set or folder"}') from None
    except ValueError as e:  # hfds/: a split the set lacks
        if not dataset.lower().startswith('hfds/'):
            raise
        raise ValueError(f'--train-split {train_split}: {dataset} has no such split ({" ".join(str(e).split())[:300]})'
                         ) from None
    except (ConnectionError, FileNotFoundError) as e:  # hfds/: an offline Hub name absent from the local cache
        if not dataset.lower().startswith('hfds/'):
            raise
        raise FileNotFoundError(f'cannot read {dataset}: {" ".join(str(e).split())} (offline, the name must be in '
                                f'the datasets cache under --data-dir, or be a local folder of data files)') from None
    skip_non_regular_files(full)
    full.transform = transform
    try:
        num_classes = resolve_num_classes(full)
    except ValueError:  # an hfds/ label column of plain integers (no class names)
        num_classes = max(dataset_targets(full)) + 1
    per_class = val_per_class or (50 if num_classes >= 100 else 500)
    full_train = None
    if train_transform is not None:
        full_train = copy.copy(full)  # the same listing (and carving), another transform
        full_train.transform = train_tf
    train, val = carve_validation(full, per_class, full_train)
    if dataset.lower().startswith(('torch/', 'hfds/')):
        test, name = library_test_split(dataset, root, val_split, download, full)
        test_source = f'{dataset} {name} split' if test is not None else None
    else:
        is_tar = Path(root).is_file()
        if is_tar:
            test_folder = find_test_tar(root, val_split)
        elif val_split:
            test_folder = Path(root) / val_split
            if not test_folder.is_dir():
                raise FileNotFoundError(f'--val-split {val_split}: no folder {test_folder}')
        else:
            test_folder = find_test_folder(root)
        test = folder_split(dataset, test_folder, full) if test_folder is not None else None
        test_source = str(test_folder) if test is not None else None
    if test is not None:
        test.transform = transform
    return DataSplits(train, val, test, num_classes, size, mean, std,
                      f'{dataset or data_dir}: {len(train)} train / {len(val)} validation (last {per_class} '
                      f'per class of train) / ' + (f'{len(test)} test ({test_source})' if test is not None else
                                                   'no test split'), test_source=test_source)


def is_cifar_zip(dataset: str, data_dir) -> bool:
    return dataset == 'cifar10-zip' or str(dataset).endswith('.zip') or (not dataset and str(data_dir).endswith('.zip'))


def stream_splits(dataset, root, download, size, mean, std, transform, train_tf, train_split, val_split, class_map,
                  train_num_samples, val_num_samples, select_last_epoch, num_classes, batch_size, seed) -> DataSplits:
    """The splits of a streamed set (module table): the selection split is ``val_split`` (never carved: a stream
    has no random access), or none with ``select_last_epoch``; every split is labelled with the training
    stream's class map."""
    if not val_split and not select_last_epoch:
        raise ValueError(f'{dataset} is a stream, whose selection split cannot be carved from training: name one with '
                         f'--val-split, or keep the last epoch with --select-last-epoch')
    if val_split and val_split.split('|')[0] == train_split.split('|')[0]:
        raise ValueError(f'--val-split {val_split} is the training split --train-split {train_split}')
    train = create_stream(dataset, root, train_split, '--train-split', is_training=True, download=download,
                          class_map=class_map, num_samples=train_num_samples, batch_size=batch_size, seed=seed,
                          transform=train_tf)
    classes = dict(getattr(train.reader, 'class_to_idx', None) or {})
    if classes:
        if num_classes is not None and num_classes != len(set(classes.values())):
            raise ValueError(f'--num-classes {num_classes} does not match the {len(classes)} classes of {dataset}')
        num_classes = len(set(classes.values()))
    elif num_classes is None:
        raise ValueError(f'{dataset} does not name its classes (integer labels): give --num-classes or --class-map')

    def other(split, flag, num_samples):
        return create_stream(dataset, root, split, flag, is_training=False, download=download,
                             class_map=classes or None, num_samples=num_samples, batch_size=batch_size,
                             transform=transform)

    if select_last_epoch:
        # no selection split: the reported split is --val-split (timm's evaluation split), else the set's own
        names, selection = ([val_split] if val_split else ['validation', 'test']), LAST_EPOCH
    else:
        names, selection = ['test'], f'the {val_split} split (--val-split)'
        validation = other(val_split, '--val-split', val_num_samples)
    test = test_name = None
    for name in names:
        try:
            test, test_name = other(name, '--val-split', val_num_samples), name
            break
        except MissingSplit:
            if name == val_split:
                raise
    if select_last_epoch:
        if test is None:
            raise ValueError(f'--select-last-epoch: {dataset} has no validation or test split to report on: name one '
                             f'with --val-split')
        validation = test  # scored each epoch as timm does, but never choosing the weights: the last epoch is kept
    test_source = f'{dataset} {test_name} split' if test is not None else None
    description = (f'{dataset} (stream): {train.reader.num_samples} train ({train_split}) / '
                   + (f'validation: {val_split} split / ' if not select_last_epoch else '')
                   + (f'test: {test_name} split' if test is not None else 'no test split')
                   + f' | model selection: {selection}')
    return DataSplits(train, validation, test, num_classes, size, mean, std, description, test_source=test_source,
                      selection=selection, iterable=True)
