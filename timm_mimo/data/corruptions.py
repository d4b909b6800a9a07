"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019) as one map-style dataset
(docs/methods/mixmo.md §6.3).

Standard layout of the released folders::

    <folder>/<corruption>.npy   uint8 (5·n, H, W, 3): the n test images at severity 1, then 2, ..., then 5
    <folder>/labels.npy         (5·n,) labels of those rows (or (n,), the same for every severity)

MixMo evaluates on all 19 corruptions × 5 severities pooled (19 × 50k images). The arrays are memory-mapped,
so the 19 × 150 MB files are read page by page as samples are drawn, not loaded up front.
"""
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch.utils.data as data
from PIL import Image

__all__ = ['CorruptionDataset', 'CIFAR_C_CORRUPTIONS', 'NUM_SEVERITIES']

NUM_SEVERITIES = 5

# the 15 benchmark corruptions, then the 4 extra ones shipped with CIFAR-C (docs/methods/mixmo.md §6.3);
# for reference only: the dataset uses whatever .npy files the folder holds
CIFAR_C_CORRUPTIONS: Tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
    'speckle_noise', 'gaussian_blur', 'spatter', 'saturate',
)

_LABELS_FILE = 'labels.npy'


class CorruptionDataset(data.Dataset):
    """All (corruption, severity, image) triples of a CIFAR-C folder, corruption-major then severity.

    ``corruptions``: names of ``<name>.npy`` files in ``folder`` (default: every .npy file except
    labels.npy, sorted). ``severities``: any of 1..5. Samples are ``(img, label)`` with ``img`` an RGB PIL
    image unless ``transform`` is set; :meth:`corruption_severity` tells which corruption and severity an
    index holds, :meth:`indices_of` which indices hold a given pair.
    """

    def __init__(
            self,
            folder: Union[str, os.PathLike],
            corruptions: Optional[Union[str, Sequence[str]]] = None,
            severities: Sequence[int] = (1, 2, 3, 4, 5),
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
    ):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f'Corruption dataset folder not found: {self.folder}')
        labels_path = self.folder / _LABELS_FILE
        if not labels_path.is_file():
            raise FileNotFoundError(f'{_LABELS_FILE} missing in corruption dataset folder {self.folder}')
        available = sorted(p.stem for p in self.folder.glob('*.npy') if p.name != _LABELS_FILE)
        if corruptions is None:
            if not available:
                raise FileNotFoundError(f'No <corruption>.npy files in {self.folder}')
            corruptions = available
        elif isinstance(corruptions, str):
            corruptions = [corruptions]
        self.corruptions: List[str] = list(corruptions)
        unknown = [c for c in self.corruptions if c not in available]
        if unknown:
            raise ValueError(f'Unknown corruption(s) {unknown} in {self.folder}; available: {available}')
        if not self.corruptions or len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError(f'corruptions must be a non-empty list without repeats, got {self.corruptions}')
        self.severities: Tuple[int, ...] = tuple(int(s) for s in severities)
        if (not self.severities or len(set(self.severities)) != len(self.severities)
                or any(s < 1 or s > NUM_SEVERITIES for s in self.severities)):
            raise ValueError(f'severities must be distinct values in 1..{NUM_SEVERITIES}, got {tuple(severities)}')
        self.transform = transform  # plain attribute: timm's create_loader assigns it
        self.target_transform = target_transform

        # check every file's header now (memory-mapping reads no pixels) so a bad folder fails here
        shape = None
        for name in self.corruptions:
            array = np.load(self._path(name), mmap_mode='r')
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or array.shape[0] % NUM_SEVERITIES:
                raise ValueError(
                    f'{self._path(name)}: expected uint8 ({NUM_SEVERITIES}·n, H, W, 3), '
                    f'got {array.dtype} {array.shape}')
            if shape is not None and array.shape != shape:
                raise ValueError(f'{self._path(name)}: shape {array.shape} differs from the other files {shape}')
            shape = array.shape
        rows = shape[0]
        self.images_per_severity = rows // NUM_SEVERITIES
        labels = np.load(labels_path)
        if labels.ndim != 1 or labels.shape[0] not in (rows, self.images_per_severity):
            raise ValueError(
                f'{labels_path}: expected ({rows},) or ({self.images_per_severity},) labels, got {labels.shape}')
        # one label per file row, whichever of the two released forms the folder has
        self.labels = np.tile(labels, NUM_SEVERITIES) if labels.shape[0] != rows else labels
        self.labels = self.labels.astype(np.int64)
        self._arrays: Dict[str, np.ndarray] = {}  # memory maps, opened lazily in each worker process

    def _path(self, name: str) -> Path:
        return self.folder / f'{name}.npy'

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self._path(name), mmap_mode='r')
        return self._arrays[name]

    def __getstate__(self) -> Dict[str, Any]:
        # a pickled np.memmap carries its whole content; spawn-started workers re-open the files instead
        state = self.__dict__.copy()
        state['_arrays'] = {}
        return state

    def __len__(self) -> int:
        return len(self.corruptions) * len(self.severities) * self.images_per_severity

    def _locate(self, index: int) -> Tuple[str, int, int]:
        """Map a dataset index to (corruption, severity, row in the corruption's file)."""
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f'index {index} out of range for {length} samples')
        block, image = divmod(index, self.images_per_severity)
        corruption, severity = divmod(block, len(self.severities))
        severity = self.severities[severity]
        return self.corruptions[corruption], severity, (severity - 1) * self.images_per_severity + image

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        name, _, row = self._locate(index)
        img = Image.fromarray(np.array(self._array(name)[row]))  # copy the row out of the memory map
        target = int(self.labels[row])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def corruption_severity(self, index: int) -> Tuple[str, int]:
        """(corruption name, severity) of the sample at ``index``."""
        name, severity, _ = self._locate(index)
        return name, severity

    def indices_of(self, corruption: str, severity: int) -> range:
        """Dataset indices holding ``corruption`` at ``severity``, e.g. for a per-corruption Subset."""
        if corruption not in self.corruptions or severity not in self.severities:
            raise ValueError(
                f'({corruption!r}, {severity}) not in this dataset: {self.corruptions} × {self.severities}')
        block = self.corruptions.index(corruption) * len(self.severities) + self.severities.index(severity)
        return range(block * self.images_per_severity, (block + 1) * self.images_per_severity)
