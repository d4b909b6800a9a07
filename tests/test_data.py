"""Tests for the zip-backed CIFAR dataset and the dataset factory (offline, CPU only)."""
import io
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_loader

from timm_mimo.constants import CIFAR10_CLASSES, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from timm_mimo.data import CifarZipDataset, create_dataset, default_cifar10_zip, resolve_num_classes

CIFAR_ZIP = default_cifar10_zip()
needs_zip = pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason=f'CIFAR-10 zip not found at {CIFAR_ZIP} (set TIMM_MIMO_CIFAR10_ZIP)')


def _make_zip(path: Path, classes=('a', 'b'), per_class=4, size=(8, 6)) -> Path:
    """A tiny archive with the CIFAR zip layout; pixel values encode (class, index) for checks."""
    with zipfile.ZipFile(path, 'w') as zf:
        for c, cls in enumerate(classes):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.new('RGB', size, (c * 100, i * 10, 7)).save(buf, format='PNG')
                zf.writestr(f'train/{cls}/{i:04d}.png', buf.getvalue())
        zf.writestr('train/README.txt', 'not an image')
    return path


@pytest.fixture(scope='module')
def cifar_small():
    return CifarZipDataset(CIFAR_ZIP, split='train', max_per_class=4)


@needs_zip
def test_split_sizes_disjoint_and_labelled():
    train = CifarZipDataset(CIFAR_ZIP, split='train')
    val = CifarZipDataset(CIFAR_ZIP, split='validation')
    full = CifarZipDataset(CIFAR_ZIP, split='all')
    assert (len(train), len(val), len(full)) == (45000, 5000, 50000)
    assert tuple(train.classes) == CIFAR10_CLASSES
    assert Counter(train.targets) == {i: 4500 for i in range(10)}
    assert Counter(val.targets) == {i: 500 for i in range(10)}
    train_names, val_names = set(train.filenames()), set(val.filenames())
    assert not train_names & val_names
    assert train_names | val_names == set(full.filenames())
    for ds in (train, val):
        for name, target in zip(ds.filenames(), ds.targets):
            assert name.split('/')[1] == ds.classes[target]
    # the held-out images are the last 500 file names of each class
    assert val.filename(0) == 'train/airplane/4500.jpg'
    assert train.filename(4499) == 'train/airplane/4499.jpg'


@needs_zip
def test_deterministic_and_aliases():
    a = CifarZipDataset(CIFAR_ZIP, split='val', max_per_class=50)
    b = CifarZipDataset(str(CIFAR_ZIP), split='validation', max_per_class=50)
    assert a.samples == b.samples and len(a) == 500
    assert Counter(a.targets) == {i: 50 for i in range(10)}
    assert np.array_equal(np.asarray(a[123][0]), np.asarray(b[123][0]))


@needs_zip
def test_getitem_and_filenames(cifar_small):
    assert len(cifar_small) == 40
    img, target = cifar_small[5]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (32, 32)
    assert target == 1 and isinstance(target, int)
    assert cifar_small.filename(5, basename=True) == '0001.jpg'
    assert cifar_small.filename(5, absolute=True).endswith('train.zip/train/automobile/0001.jpg')
    assert len(cifar_small.filenames(basename=True)) == 40


@needs_zip
def test_timm_create_loader():
    ds = CifarZipDataset(CIFAR_ZIP, split='train', max_per_class=4)  # own instance: create_loader sets .transform
    raw = torch.from_numpy(np.array(ds[0][0])).permute(2, 0, 1).float() / 255
    loader = create_loader(
        ds, input_size=(3, 32, 32), batch_size=8, use_prefetcher=False, num_workers=0,
        persistent_workers=False, no_aug=True, crop_pct=1.0, mean=CIFAR_DEFAULT_MEAN, std=CIFAR_DEFAULT_STD,
        device=torch.device('cpu'),
    )
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    # eval transform is resize/crop to the same size + normalize, so the first image round-trips
    mean, std = torch.tensor(CIFAR_DEFAULT_MEAN)[:, None, None], torch.tensor(CIFAR_DEFAULT_STD)[:, None, None]
    torch.testing.assert_close(x[0], (raw - mean) / std, atol=1e-5, rtol=0)


@needs_zip
def test_dataloader_workers_fork(cifar_small):
    ds = CifarZipDataset(
        CIFAR_ZIP, split='validation', max_per_class=20, transform=lambda im: torch.from_numpy(np.array(im)))
    # opens the zip in the parent before forking; a handle shared with the workers garbles their reads
    ref_x, ref_y = ds.load_arrays()
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context='fork')
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), ref_x) and torch.equal(torch.cat(ys), ref_y)
    # spawn-style workers pickle the dataset; the open handle must not travel along
    clone = pickle.loads(pickle.dumps(cifar_small))
    assert clone._zip is None and np.array_equal(np.asarray(clone[3][0]), np.asarray(cifar_small[3][0]))


@needs_zip
def test_load_arrays_cache(tmp_path, cifar_small):
    images, labels = cifar_small.load_arrays(cache_dir=tmp_path)
    assert images.shape == (40, 32, 32, 3) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == cifar_small.targets
    assert np.array_equal(images[17].numpy(), np.asarray(cifar_small[17][0]))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == '.pt'
    # a second instance reads the cache instead of decoding
    again = CifarZipDataset(CIFAR_ZIP, split='train', max_per_class=4)
    again._load_image = None
    images2, labels2 = again.load_arrays(cache_dir=tmp_path)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    # different split settings get their own file
    CifarZipDataset(CIFAR_ZIP, split='val', max_per_class=2).load_arrays(cache_dir=tmp_path)
    assert len(list(tmp_path.glob('*.pt'))) == 2 and not list(tmp_path.glob('*.tmp'))
    # an unreadable cache file is rebuilt, not fatal
    files[0].write_bytes(b'garbage')
    assert torch.equal(cifar_small.load_arrays(cache_dir=tmp_path)[0], images)
    assert torch.equal(torch.load(files[0], weights_only=True)['images'], images)


@needs_zip
def test_factory_cifar10_zip():
    ds = create_dataset('cifar10-zip', root=CIFAR_ZIP, split='val', max_per_class=3, batch_size=64, seed=0)
    assert isinstance(ds, CifarZipDataset) and ds.split == 'validation' and len(ds) == 30
    ds = create_dataset('cifar10-zip', root=CIFAR_ZIP.parent, split='all', max_per_class=1)
    assert len(ds) == 10 and resolve_num_classes(ds) == 10


def test_default_zip_env(monkeypatch, tmp_path):
    monkeypatch.setenv('TIMM_MIMO_CIFAR10_ZIP', str(tmp_path / 'x.zip'))
    assert default_cifar10_zip() == tmp_path / 'x.zip'
    monkeypatch.delenv('TIMM_MIMO_CIFAR10_ZIP')
    assert default_cifar10_zip().parts[-4:] == ('shared', 'data', 'cifar10', 'train.zip')


def test_small_zip_splits_and_factory(tmp_path):
    path = _make_zip(tmp_path / 'tiny.zip')
    train = create_dataset('', root=path, split='train', val_per_class=1)
    val = create_dataset(str(path), split='val', val_per_class=1)
    assert (len(train), len(val)) == (6, 2) and train.classes == ['a', 'b']
    assert [p for p, _ in val.samples] == ['train/a/0003.png', 'train/b/0003.png']
    assert val[1][0].getpixel((0, 0)) == (100, 30, 7) and val[1][1] == 1
    images, labels = train.load_arrays()
    assert images.shape == (6, 6, 8, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert resolve_num_classes(train) == 2
    assert resolve_num_classes(torch.utils.data.Subset(train, [0])) == 2
    with pytest.raises(ValueError, match='CIFAR-10 classes'):
        create_dataset('cifar10-zip', root=path, val_per_class=1)
    with pytest.raises(ValueError, match='class_map'):
        create_dataset('', root=path, class_map={'a': 0})


def test_factory_defers_to_timm(tmp_path):
    for cls in ('x', 'y'):
        (tmp_path / cls).mkdir()
        Image.new('RGB', (4, 4)).save(tmp_path / cls / 'img.png')
    ds = create_dataset('', root=tmp_path, split='train')
    assert type(ds).__name__ == 'ImageDataset' and len(ds) == 2
    assert resolve_num_classes(ds) == 2


def test_errors(tmp_path):
    missing = tmp_path / 'nope.zip'
    with pytest.raises(FileNotFoundError, match='nope.zip'):
        CifarZipDataset(missing)
    with pytest.raises(FileNotFoundError, match='nope.zip'):
        create_dataset('cifar10-zip', root=missing)
    not_zip = tmp_path / 'fake.zip'
    not_zip.write_text('hello')
    with pytest.raises(ValueError, match='Not a zip file'):
        CifarZipDataset(not_zip)
    wrong_layout = tmp_path / 'wrong.zip'
    with zipfile.ZipFile(wrong_layout, 'w') as zf:
        zf.writestr('images/cat/0.jpg', b'')
    with pytest.raises(ValueError, match='No .train/<class>/<image>. entries'):
        CifarZipDataset(wrong_layout)
    tiny = _make_zip(tmp_path / 'tiny.zip')
    with pytest.raises(ValueError, match="Unknown split 'test'.*'all', 'train', 'val', 'validation'"):
        CifarZipDataset(tiny, split='test')
    with pytest.raises(ValueError, match='val_per_class'):
        CifarZipDataset(tiny, val_per_class=4)
