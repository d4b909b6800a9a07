"""CIFAR-style image folders read in place from a zip archive.

The archive holds ``train/<class>/<file>.jpg``; classes are the sub-folder names in sorted order.
There is no official test set in the archive, so a deterministic hold-out split is carved out of it:
the last ``val_per_class`` files (by name) of every class form the validation split.
"""
import hashlib
import io
import logging
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.utils.data as data
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions

__all__ = ['CifarZipDataset', 'default_cifar10_zip', 'normalize_split', 'SPLIT_ALIASES']

_logger = logging.getLogger(__name__)

# repo root, found from this file so that an editable install works from any working directory
_REPO_ROOT = Path(__file__).resolve().parents[2]
_ZIP_PREFIX = 'train'
_CACHE_VERSION = 1  # bump when the cache file layout changes

SPLIT_ALIASES: Dict[str, str] = {
    'train': 'train',
    'val': 'validation',
    'validation': 'validation',
    'all': 'all',
}


def default_cifar10_zip() -> Path:
    """Location of the CIFAR-10 train zip: ``$TIMM_MIMO_CIFAR10_ZIP`` or ``<repo>/../shared/data/cifar10/train.zip``.

    The path is returned even if it does not exist; datasets raise FileNotFoundError when opened.
    """
    env = os.environ.get('TIMM_MIMO_CIFAR10_ZIP')
    return Path(env) if env else _REPO_ROOT.parent / 'shared' / 'data' / 'cifar10' / 'train.zip'


def normalize_split(split: str) -> str:
    """Map a split name or alias to one of 'train', 'validation', 'all'."""
    key = str(split).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"Unknown split '{split}', expected one of {sorted(SPLIT_ALIASES)}.")
    return SPLIT_ALIASES[key]


def _index_zip(path: Path) -> Dict[str, List[str]]:
    """Return {class name: sorted member names} for ``train/<class>/<image>`` entries of the zip."""
    if not path.exists():
        raise FileNotFoundError(f'Dataset zip not found: {path}')
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f'Not a zip file: {path}')
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    exts = get_img_extensions(as_set=True)
    per_class: Dict[str, List[str]] = {}
    for name in names:
        parts = name.split('/')
        # only direct children of train/<class>/ count; directory entries and stray files are skipped
        if len(parts) == 3 and parts[0] == _ZIP_PREFIX and parts[1] and os.path.splitext(parts[2])[1].lower() in exts:
            per_class.setdefault(parts[1], []).append(name)
    if not per_class:
        raise ValueError(f"No '{_ZIP_PREFIX}/<class>/<image>' entries in zip: {path}")
    return {c: sorted(per_class[c]) for c in sorted(per_class)}


class CifarZipDataset(data.Dataset):
    """Map-style dataset over ``train/<class>/*`` images inside a zip, decoded with PIL on access.

    Splits: 'train' (all but the last ``val_per_class`` files of each class), 'validation'
    (aliases 'val') (the last ``val_per_class`` files of each class) and 'all'.
    ``max_per_class`` keeps only the first N files of each class within the split.

    Samples are ``(img, target)``; ``img`` is an RGB PIL image unless ``transform`` is set.
    """

    def __init__(
            self,
            root: Union[str, os.PathLike],
            split: str = 'train',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            val_per_class: int = 500,
            max_per_class: Optional[int] = None,
    ):
        self.root = Path(root).expanduser()
        self.split = normalize_split(split)
        if val_per_class < 0:
            raise ValueError(f'val_per_class must be >= 0, got {val_per_class}.')
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f'max_per_class must be >= 1 or None, got {max_per_class}.')
        self.val_per_class = val_per_class
        self.max_per_class = max_per_class
        self.transform = transform  # plain attribute: timm's create_loader assigns it
        self.target_transform = target_transform

        per_class = _index_zip(self.root)
        self.classes: List[str] = list(per_class)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for cls, members in per_class.items():
            if len(members) <= val_per_class:
                raise ValueError(
                    f"Class '{cls}' has {len(members)} images, not more than val_per_class={val_per_class}.")
            if self.split == 'train':
                members = members[:len(members) - val_per_class]
            elif self.split == 'validation':
                members = members[len(members) - val_per_class:]
            if max_per_class is not None:
                members = members[:max_per_class]
            label = self.class_to_idx[cls]
            self.samples.extend((m, label) for m in members)
        self.targets: List[int] = [t for _, t in self.samples]

        # the ZipFile handle is opened lazily and per process: a handle inherited through fork shares
        # its file offset with the parent, so concurrent worker reads would corrupt each other
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None

    def _zipfile(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._zip_pid != pid:
            self._zip = zipfile.ZipFile(self.root)
            self._zip_pid = pid
        return self._zip

    def __getstate__(self):
        # open file handles do not pickle (spawn / forkserver workers); the copy reopens on first use
        state = self.__dict__.copy()
        state['_zip'] = None
        state['_zip_pid'] = None
        return state

    def _load_image(self, index: int) -> Image.Image:
        member = self.samples[index][0]
        try:
            with Image.open(io.BytesIO(self._zipfile().read(member))) as img:
                return img.convert('RGB')
        except (OSError, zipfile.BadZipFile, zlib.error) as e:  # a damaged member: name it, in one line
            raise ValueError(f'{self.root}: member {member} is damaged ({type(e).__name__}: '
                             f'{" ".join(str(e).split())[:120]})') from None

    def __getitem__(self, index: int):
        img = self._load_image(index)
        target = self.samples[index][1]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.samples)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """Member name inside the zip; ``absolute`` prefixes the zip path (``/path/train.zip/train/cat/0001.jpg``)."""
        name = self.samples[index][0]
        if basename:
            return name.rsplit('/', 1)[-1]
        if absolute:
            return f'{self.root.resolve()}/{name}'
        return name

    def filenames(self, basename: bool = False, absolute: bool = False) -> List[str]:
        return [self.filename(i, basename=basename, absolute=absolute) for i in range(len(self))]

    def _cache_path(self, cache_dir: Union[str, os.PathLike]) -> Path:
        # size + mtime + member list identify the archive without hashing 50 MB on every call
        st = self.root.stat()
        h = hashlib.sha1()
        h.update(f'{_CACHE_VERSION}|{st.st_size}|{st.st_mtime_ns}|'.encode())
        h.update('\n'.join(m for m, _ in self.samples).encode())
        tag = f'{self.split}-v{self.val_per_class}-m{self.max_per_class or "all"}'
        return Path(cache_dir).expanduser() / f'{self.root.stem}-{tag}-{h.hexdigest()[:16]}.pt'

    def load_arrays(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode the whole split once: ``(uint8 images [N, H, W, 3], int64 labels [N])``.

        Transforms are not applied. With ``cache_dir`` the result is stored as a ``.pt`` file keyed by the
        archive's size/mtime/members and the split settings, and reused on later calls.
        """
        cache_file = None
        if cache_dir is not None:
            cache_file = self._cache_path(cache_dir)
            if cache_file.is_file():
                try:
                    cached = torch.load(cache_file, map_location='cpu', weights_only=True)
                    images, labels = cached['images'], cached['labels']
                    if labels.tolist() == self.targets:
                        return images, labels
                    _logger.warning(f'Ignoring stale dataset cache {cache_file}.')
                except Exception as e:  # a truncated / foreign file is rebuilt rather than fatal
                    _logger.warning(f'Ignoring unreadable dataset cache {cache_file}: {e}')

        images = self._decode_all()
        labels = torch.tensor(self.targets, dtype=torch.int64)

        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # write then rename so that a concurrent reader never sees a partial file
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix='.tmp')
            os.close(fd)
            try:
                torch.save({'images': images, 'labels': labels, 'classes': self.classes}, tmp)
                os.replace(tmp, cache_file)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return images, labels

    def _decode_all(self) -> torch.Tensor:
        n = len(self)
        if n == 0:
            return torch.empty((0, 0, 0, 3), dtype=torch.uint8)
        first = self._load_image(0)
        w, h = first.size
        # one preallocated buffer, filled image by image, avoids an N-way stack of small tensors
        buf = bytearray(n * h * w * 3)
        step = h * w * 3
        for i in range(n):
            img = first if i == 0 else self._load_image(i)
            if img.size != (w, h):
                raise ValueError(
                    f'load_arrays needs equally sized images: {self.filename(i)} is {img.size}, expected {(w, h)}.')
            buf[i * step:(i + 1) * step] = img.tobytes()
        return torch.frombuffer(buf, dtype=torch.uint8).view(n, h, w, 3)

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(root={str(self.root)!r}, split={self.split!r}, '
            f'num_samples={len(self)}, num_classes={len(self.classes)})'
        )
