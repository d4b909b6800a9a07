"""The embedded digits: a seeded stratified split, and a default augmentation without horizontal flip."""
import sys
from pathlib import Path

import pytest
import torch

from timm_mimo.data.digits import DigitsDataset, load_digits_tensors
from timm_mimo.data.splits import build_splits
from timm_mimo.augment import batch_augment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def split_indices(order):
    """Indices into the full digits of each split, found by matching images (they are unique per index)."""
    images, _ = load_digits_tensors(8)
    flat = images.flatten(1)
    out = {}
    for split in ('train', 'validation', 'test'):
        ds = DigitsDataset(split, 8, order=order)
        mean, std = 0.3053, 0.3236
        raw = (ds.images * std + mean).flatten(1)
        out[split] = torch.cdist(raw, flat).argmin(1)
    return out


@pytest.mark.parametrize('order', ['shuffled', 'file'])
def test_splits_are_disjoint_stratified_and_cover_the_digits(order):
    _, labels = load_digits_tensors(8)
    idx = split_indices(order)
    every = torch.cat(list(idx.values()))
    assert every.unique().numel() == every.numel() == 1797
    for split, share in (('train', 0.70), ('validation', 0.15), ('test', 0.15)):
        counts = labels[idx[split]].bincount(minlength=10).float()
        assert torch.allclose(counts / labels.bincount(minlength=10), torch.full((10,), share), atol=0.02)


def test_shuffled_split_is_fixed_and_not_the_file_order():
    shuffled, file = split_indices('shuffled'), split_indices('file')
    assert torch.equal(split_indices('shuffled')['test'], shuffled['test'])  # the same on every call
    assert not torch.equal(shuffled['test'].sort().values, file['test'].sort().values)
    # file order: each class's test share is its last 15 %; the shuffled test set reaches back into the file
    assert shuffled['test'].float().mean() < file['test'].float().mean() - 100
    with pytest.raises(ValueError, match='unknown digits split order'):
        DigitsDataset('train', order='random')


def test_digits_default_to_crop_without_flip_and_the_flag_overrides():
    splits = build_splits('', img_size=8)
    assert splits.hflip is False and splits.default_aug == 'crop'
    assert 'seeded shuffle' in splits.description
    images = torch.rand(256, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))

    def flipped_share(aug):
        out = batch_augment(aug, 0.0, 'pixel')(images, generator=gen)
        plain = [any(torch.equal(o, padded[i, :, y:y + 8, x:x + 8]) for y in range(9) for x in range(9))
                 for i, o in enumerate(out)]
        return 1 - sum(plain) / len(plain)
    assert flipped_share('crop') == 0.0
    assert 0.35 < flipped_share('crop-flip') < 0.65
    assert batch_augment('none', 0.0, 'pixel') is None
    assert train.build_parser().parse_args([]).aug is None  # resolved from the data set after the splits
