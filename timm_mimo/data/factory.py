"""Dataset factory: zip-backed CIFAR datasets, everything else through ``timm.data.create_dataset``."""
import os
from pathlib import Path
from typing import Optional, Union

import timm.data

from ..constants import CIFAR10_CLASSES
from .cifar_zip import CifarZipDataset, default_cifar10_zip

__all__ = ['create_dataset', 'native_img_size', 'resolve_num_classes']

_ZIP_NAMES = ('cifar10-zip',)

# kwargs timm's train script passes for streaming / HF datasets; meaningless for an in-memory map dataset
_IGNORED_KWARGS = (
    'batch_size', 'seed', 'repeats', 'num_samples', 'search_split', 'trust_remote_code', 'input_key', 'target_key',
)


def _is_zip(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith('.zip')


def create_dataset(
        name: str,
        root: Optional[Union[str, os.PathLike]] = None,
        split: str = 'train',
        is_training: bool = False,
        download: bool = False,
        **kwargs,
):
    """Create a dataset by name, like ``timm.data.create_dataset``.

    Handled here (as :class:`CifarZipDataset`):
      * ``name='cifar10-zip'``: ``root`` is the zip, or a folder holding ``train.zip``; default
        :func:`default_cifar10_zip`.
      * ``name`` or ``root`` is a path ending in ``.zip`` (``train/<class>/<image>`` layout).
    Splits: 'train', 'validation' / 'val', 'all'. Extra kwargs ``transform``, ``target_transform``,
    ``val_per_class``, ``max_per_class`` are passed on. Any other name goes to timm unchanged.
    """
    if name in _ZIP_NAMES:
        path = Path(root) if root is not None else default_cifar10_zip()
        if path.is_dir():
            path = path / 'train.zip'
        if root is None and not path.exists():
            where = 'where $TIMM_MIMO_CIFAR10_ZIP points' if os.environ.get('TIMM_MIMO_CIFAR10_ZIP') else \
                'its default place'
            raise FileNotFoundError(f'the CIFAR-10 zip is not at {path} ({where}): give the zip (or its folder) with '
                                    f'--data-dir, or set TIMM_MIMO_CIFAR10_ZIP')
    elif _is_zip(name):
        path = Path(name)
    elif not name and _is_zip(root):
        path = Path(root)
    else:
        try:
            return timm.data.create_dataset(
                name, root=root, split=split, is_training=is_training, download=download, **kwargs)
        except OSError as e:  # urllib's URLError offline: "<urlopen error ...>" alone says nothing of the cure
            if not download:
                raise
            where = (f'torchvision\'s layout: e.g. {Path(root or ".") / "cifar-10-batches-py"} for torch/cifar10'
                     if name.lower().startswith('torch/') else 'the library\'s cache layout, as a download leaves it')
            raise OSError(f'downloading {name} into {root} failed ({" ".join(str(e).split())[:300]}): offline, put '
                          f'the files the library reads there yourself ({where}), give that folder with --data-dir '
                          f'and leave out --dataset-download') from e

    if download:
        raise ValueError(f'Zip datasets cannot be downloaded; expected the archive at {path}.')
    for key in _IGNORED_KWARGS:
        kwargs.pop(key, None)
    # accept timm's defaults for these, but refuse settings we would silently not honour
    if kwargs.pop('class_map', None):
        raise ValueError('class_map is not supported for zip datasets (classes come from the folder names).')
    if kwargs.pop('load_bytes', False):
        raise ValueError('load_bytes is not supported for zip datasets.')
    img_mode = kwargs.pop('input_img_mode', 'RGB')
    if img_mode not in ('RGB', None):
        raise ValueError(f"input_img_mode={img_mode!r} is not supported for zip datasets (RGB only).")
    ds = CifarZipDataset(path, split=split, **kwargs)
    if name == 'cifar10-zip' and tuple(ds.classes) != CIFAR10_CLASSES:
        # a wrong archive would otherwise only show up as a silently mislabelled run
        raise ValueError(f'{path} does not hold the CIFAR-10 classes, found {ds.classes}.')
    return ds


def native_img_size(name: str, root: Optional[Union[str, os.PathLike]] = None) -> Optional[int]:
    """The side every image of the data set ``name`` (``root``) has, where the name tells it without reading the
    files: 32 for the CIFAR sets (a CIFAR zip, ``torch/cifar10``, ``torch/cifar100``) and for the embedded
    digits (``name == ''`` without ``root``: 8 px images served at 32 px, the CIFAR networks' size); None where
    the files decide (image folders, tars, other libraries' sets)."""
    if not name and not root:
        return 32
    if name in (*_ZIP_NAMES, 'torch/cifar10', 'torch/cifar100') or _is_zip(name) or (not name and _is_zip(root)):
        return 32
    return None


def resolve_num_classes(dataset) -> int:
    """Number of classes of a dataset.

    Looks at, in order: ``dataset.classes``; ``dataset.class_to_idx`` or ``dataset.reader.class_to_idx``
    (timm ImageDataset / readers; ``class_name_to_idx`` for the tar reader), counting distinct indices; ``len(set(dataset.targets))``. A
    ``torch.utils.data.Subset``-like wrapper (``.dataset``) is unwrapped. Note the last fallback undercounts
    if some class has no samples. Raises ValueError if none is available.
    """
    while not hasattr(dataset, 'classes') and hasattr(dataset, 'dataset'):
        dataset = dataset.dataset
    classes = getattr(dataset, 'classes', None)
    if classes is not None:
        return len(classes)
    for owner in (dataset, getattr(dataset, 'reader', None)):
        # class_name_to_idx: timm's tar reader
        class_to_idx = getattr(owner, 'class_to_idx', None) or getattr(owner, 'class_name_to_idx', None)
        if class_to_idx:
            return len(set(class_to_idx.values()))
    targets = getattr(dataset, 'targets', None)
    if targets is not None and len(targets):
        return len(set(int(t) for t in targets))
    raise ValueError(f'Cannot determine the number of classes of {type(dataset).__name__}.')
