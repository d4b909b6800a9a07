"""Device-resident training data: arrays found without a per-image pass, batches equal to the transform path,
sharding, resume and epoch order."""
import pytest
import torch
from torch.utils.data import Subset

from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from timm_mimo.data import CifarZipDataset, default_cifar10_zip
from timm_mimo.data.device_loader import DeviceTensorLoader, device_loader_for, resident_arrays
from timm_mimo.data.digits import DigitsDataset
from timm_mimo.data.splits import tensor_transform


def test_digits_and_subsets_resolve_to_arrays():
    ds = DigitsDataset('train')
    images, labels = resident_arrays(Subset(Subset(ds, list(range(10, 60))), [3, 1, 4]))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    for row, i in enumerate([13, 11, 14]):
        torch.testing.assert_close(images[row], ds[i][0])
        assert labels[row] == ds[i][1]


def test_array_dataset_like_torchvision_cifar():
    class ArrayDataset:
        data = torch.randint(0, 256, (20, 8, 8, 3), dtype=torch.uint8).numpy()
        targets = list(range(20))
    images, labels = resident_arrays(Subset(ArrayDataset(), [5, 7]))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [5, 7]
    assert resident_arrays(object()) is None


@pytest.mark.skipif(not default_cifar10_zip().exists(), reason='CIFAR-10 zip of ../shared missing')
def test_cifar_zip_batches_equal_the_per_image_transform(tmp_path):
    ds = CifarZipDataset(default_cifar10_zip(), split='train', max_per_class=3,
                         transform=tensor_transform(32, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD))
    images, labels = resident_arrays(ds, cache_dir=tmp_path)
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert list(tmp_path.glob('*.pt')), 'the decoded split is cached on disk'
    loader = DeviceTensorLoader(images, labels, 30, 'cpu', CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, seed=0)
    batch, batch_labels = next(iter(loader))
    order = loader._order()
    for row in range(0, 30, 7):
        x, y = ds[int(order[row])]
        torch.testing.assert_close(batch[row], x, atol=1e-5, rtol=0)
        assert int(batch_labels[row]) == y


def test_sharding_resume_and_epoch_order():
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    labels = torch.arange(103)
    shards = [DeviceTensorLoader(images, labels, 10, 'cpu', seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5  # 51 images each, last partial batch dropped
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    full = list(shards[0])
    resumed = list(shards[0].batches(start_batch=3))
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in full[3:]]
    again = [y.tolist() for _, y in shards[0]]
    assert again == [y.tolist() for _, y in full], 'the order depends only on (seed, epoch)'
    shards[0].set_epoch(1)
    assert [y.tolist() for _, y in shards[0]] != again
    x, y = full[0]
    torch.testing.assert_close(x[:, 0, 0, 0], y.float() / 255.0)  # uint8 -> [0, 1], mean 0 std 1


def test_bad_input():
    with pytest.raises(ValueError, match='3 images but 2 labels'):
        DeviceTensorLoader(torch.zeros(3, 3, 2, 2), torch.zeros(2), 1, 'cpu')


def test_evaluation_loader_serves_every_sample_once_in_order():
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    loader = DeviceTensorLoader(images, torch.arange(23), 10, 'cpu', shuffle=False)
    assert len(loader) == 3
    labels = [y for _, y in loader]
    assert [len(y) for y in labels] == [10, 10, 3] and torch.equal(torch.cat(labels), torch.arange(23))
    with pytest.raises(ValueError, match='not sharded'):
        DeviceTensorLoader(images, torch.arange(23), 10, 'cpu', shuffle=False, num_replicas=2)


def test_device_loader_for_says_why_not():
    loader, why = device_loader_for(DigitsDataset('validation'), 8, 'cpu', (0,) * 3, (1,) * 3, img_size=32)
    assert loader is not None and why == '' and loader.images.shape[1:] == (3, 32, 32)
    loader, why = device_loader_for(DigitsDataset('validation'), 8, 'cpu', (0,) * 3, (1,) * 3, img_size=64)
    assert loader is None and 'not the 64 px' in why
    loader, why = device_loader_for(object(), 8, 'cpu', (0,) * 3, (1,) * 3, img_size=32)
    assert loader is None and 'no array form' in why
