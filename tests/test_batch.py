"""MIMO batches: repetition, member permutations, targets, MSDA, and the loaders that carry them."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import create_loader

import timm_mimo  # noqa: F401
from timm_mimo.augment import random_crop_flip
from timm_mimo.batch import MimoBatch, MimoBatchBuilder, MimoCollate, unique_batch_size
from timm_mimo.loss import MemberSoftTargetCrossEntropy
from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from timm_mimo.mixing import member_loss_weights
from timm_mimo.msda import msda_mix


def constant_images(n, size=8):
    """Image i is filled with the value i, so every position of a batch tells which image it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).clone()


def test_each_unique_image_appears_batch_repeat_times_in_every_member_stream():
    builder = MimoBatchBuilder(2, 10, (8, 8), batch_repeat=4, augment=None, seed=0)
    labels = torch.arange(16) % 10
    batch = builder(constant_images(16), labels)
    assert batch.inputs.shape == (64, 2, 3, 8, 8)
    ids = batch.inputs[:, :, 0, 0, 0].long()
    for member in range(2):
        assert torch.equal(ids[:, member].bincount(minlength=16), torch.full((16,), 4))
    # the members read independent permutations, so most slots pair two different images
    assert (ids[:, 0] != ids[:, 1]).float().mean() > 0.7
    # each member's target is its own image's label, scaled by its MixMo weight
    assert torch.equal(batch.targets.argmax(-1), labels[ids])


def test_targets_carry_the_mixmo_weights_of_the_true_mask_ratio():
    builder = MimoBatchBuilder(2, 10, (8, 8), batch_repeat=2, mix_prob=1.0, augment=None, seed=3)
    batch = builder(constant_images(8), torch.arange(8))
    kappa = batch.masks.mean((2, 3))
    expected = member_loss_weights(kappa, 3.0)
    assert torch.allclose(batch.targets.sum(-1), expected)
    assert torch.allclose(batch.targets.sum((1, 2)), torch.full((16,), 2.0))


def test_copies_are_augmented_independently():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    builder = MimoBatchBuilder(1, 10, (32, 32), batch_repeat=4, seed=0)
    batch = builder(images, torch.arange(4))
    copies = batch.inputs[:, 0]
    distinct = {tuple(c.flatten().tolist()) for c in copies}
    assert len(distinct) >= 14  # 16 copies; crop offsets x flips give 162 outcomes per image


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    images = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(images, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = random_crop_flip(images, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    is_flip = [torch.equal(f, im.flip(-1)) for f, im in zip(flipped, images)]
    is_same = [torch.equal(f, im) for f, im in zip(flipped, images)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 16 < sum(is_flip) < 48


def test_msda_label_shares_are_measured_on_the_visible_region():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(32, 2, 3, 16, 16)
    # member 0 sees only the left half of the grid, member 1 the right half
    masks = torch.zeros(32, 2, 16, 16)
    masks[:, 0, :, :8] = 1
    masks[:, 1, :, 8:] = 1
    mixed, partner, own_share = msda_mix(images, masks, 'cutmix', prob=1.0, alpha=1.0, generator=gen)
    flat, mixed_flat = images.flatten(0, 1), mixed.flatten(0, 1)
    own_pixels = (mixed_flat == flat).all(1).float()  # (N, H, W): 1 where the own image is kept
    member_masks = masks.flatten(0, 1)
    measured = (own_pixels * member_masks).sum((1, 2)) / member_masks.sum((1, 2))
    other = partner.flatten() != torch.arange(64)  # a self-partner leaves no visible trace
    assert other.sum() > 55
    assert torch.allclose(measured[other], own_share.flatten()[other], atol=1e-6)
    # reverse if minor: the member's own image always owns at least half of what its head sees
    assert (own_share >= 0.5).all()
    assert partner.shape == (32, 2)


def test_msda_without_reversal_for_single_networks():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 3, 8, 8)
    mixed, _, own_share = msda_mix(images, torch.ones(64, 1, 8, 8), 'mixup', prob=1.0, alpha=1.0,
                                   reverse_if_minor=False, generator=gen)
    assert (own_share < 0.5).any() and (own_share > 0.5).any()


def test_msda_targets_in_builder():
    builder = MimoBatchBuilder(2, 10, (8, 8), msda='cutmix', msda_prob=1.0, augment=None, seed=0)
    batch = builder(torch.rand(16, 3, 8, 8), torch.arange(16) % 10)
    weights = member_loss_weights(batch.masks.mean((2, 3)), 3.0)
    assert torch.allclose(batch.targets.sum(-1), weights, atol=1e-5)
    # own label keeps the majority of each member's target
    own = batch.targets.max(-1).values
    assert (own >= 0.5 * weights - 1e-5).all()


def test_member_loss_is_the_sum_of_member_soft_cross_entropies():
    logits = torch.randn(6, 2, 5)
    targets = torch.rand(6, 2, 5)
    loss = MemberSoftTargetCrossEntropy()(logits, targets)
    manual = sum((-targets[:, m] * logits[:, m].log_softmax(-1)).sum(-1).mean() for m in range(2))
    assert torch.allclose(loss, manual)


def test_bad_batch_arguments():
    with pytest.raises(ValueError, match='not divisible by the batch repetition 4'):
        unique_batch_size(30, 4)
    assert unique_batch_size(64, 4) == 16
    with pytest.raises(ValueError, match='num_members must be >= 1'):
        MimoBatchBuilder(0, 10, (8, 8))
    with pytest.raises(ValueError, match='unknown mix mode'):
        MimoBatchBuilder(2, 10, (8, 8), mix_mode='patchup')
    with pytest.raises(ValueError, match='mix_alpha must be > 0'):
        MimoBatchBuilder(2, 10, (8, 8), mix_alpha=0)
    with pytest.raises(ValueError, match='unknown MSDA'):
        MimoBatchBuilder(2, 10, (8, 8), msda='augmix')
    with pytest.raises(ValueError, match='batch_repeat'):
        MimoBatchBuilder(2, 10, (8, 8), batch_repeat=0)


class TinyImages(Dataset):
    """A timm-compatible dataset of PIL images (create_loader assigns ``.transform``)."""

    def __init__(self, n=24, size=32):
        from PIL import Image
        g = torch.Generator().manual_seed(0)
        arrays = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
        self.images = [Image.fromarray(a.numpy()) for a in arrays]
        self.targets = [i % 10 for i in range(n)]
        self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.targets[i]


def _loader_kwargs():
    return dict(input_size=(3, 32, 32), is_training=True, no_aug=True, crop_pct=1.0, mean=CIFAR_DEFAULT_MEAN,
                std=CIFAR_DEFAULT_STD, num_workers=0, persistent_workers=False, device=torch.device('cpu'))


def test_collate_through_timm_create_loader_and_a_training_step():
    model = timm.create_model('wrn16_4_mixmo2')
    builder = MimoBatchBuilder.from_model(model, (32, 32), batch_repeat=2, msda='cutmix', seed=0)
    loader = create_loader(TinyImages(), batch_size=unique_batch_size(16, 2), use_prefetcher=False,
                           collate_fn=MimoCollate(builder), **_loader_kwargs())
    batch = next(iter(loader))
    assert isinstance(batch, MimoBatch)
    assert batch.inputs.shape == (16, 2, 3, 32, 32) and batch.masks.shape == (16, 2, 32, 32)
    assert batch.targets.shape == (16, 2, 10)
    loss = MemberSoftTargetCrossEntropy()(model(batch.inputs, batch.masks), batch.targets)
    loss.backward()
    assert torch.isfinite(loss)


def test_prefetcher_path_builds_the_batch_on_the_device():
    """With timm's prefetcher the loader yields (images, labels) on the device; the builder runs there."""
    loader = create_loader(TinyImages(), batch_size=8, use_prefetcher=True, **_loader_kwargs())
    images, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
    batch = MimoBatchBuilder(2, 10, (32, 32), batch_repeat=2, seed=0)(images, labels)
    assert batch.inputs.shape == (16, 2, 3, 32, 32) and batch.inputs.device == images.device


def test_accelerate_prepared_loader_keeps_the_batch_format():
    from accelerate import Accelerator
    from timm.data import create_transform
    dataset = TinyImages()
    dataset.transform = create_transform(32, is_training=False, crop_pct=1.0, mean=CIFAR_DEFAULT_MEAN,
                                         std=CIFAR_DEFAULT_STD)
    builder = MimoBatchBuilder(2, 10, (32, 32), batch_repeat=2, seed=0)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=6, collate_fn=MimoCollate(builder), drop_last=True))
    batches = list(loader)
    assert len(batches) == 4
    assert isinstance(batches[0], MimoBatch) and batches[0].inputs.shape == (12, 2, 3, 32, 32)


def test_loader_workers_draw_different_masks():
    dataset = TinyImages(32)
    from timm.data import create_transform
    dataset.transform = create_transform(32, is_training=False, crop_pct=1.0)
    torch.manual_seed(0)
    builder = MimoBatchBuilder(2, 10, (32, 32), mix_prob=1.0)
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=MimoCollate(builder), shuffle=False)
    first, second = list(loader)[:2]
    assert not torch.equal(first.masks, second.masks)


def test_every_member_view_is_augmented_on_its_own_as_in_the_official_code():
    # official MixMo: the dataset wrapper loads and transforms the sample of every (slot, member) pair
    # separately, so the two members never share an augmented view of the same image
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32)
    builder = MimoBatchBuilder(2, 16, (8, 8), batch_repeat=1, seed=0)
    batch = builder(images, torch.arange(16))
    ids = batch.targets.argmax(-1)  # (B, M): which unique image each view holds
    view_of = {}
    for member in range(2):
        for slot in range(16):
            view_of.setdefault(int(ids[slot, member]), []).append(batch.inputs[slot, member])
    same = sum(torch.equal(a, b) for a, b in view_of.values())
    assert same <= 2  # 162 crop x flip outcomes per view: equal views only by chance
    # each view is still a crop / flip of its own image (nothing mixed across images before the masks)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image_id, views in view_of.items():
        for view in views:
            windows = [padded[image_id, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
            assert any(torch.equal(view, w) or torch.equal(view, w.flip(-1)) for w in windows)


def test_patch_decay_reads_the_one_based_epoch_of_the_official_code():
    # official MixMo: ratio_epoch = epoch / nb_epochs with epoch = 1..nb_epochs; train.py counts from 0
    builder = MimoBatchBuilder(2, 10, (8, 8), mix_prob=0.5, augment=None, seed=0)
    builder.set_epoch(0, 12)
    assert builder.progress == pytest.approx(1 / 12)
    builder.set_epoch(299, 300)
    assert builder.progress == 1.0  # the last of 300 epochs: p = 0, not 0.02
    # E = 5: the official code trains its whole last epoch with linear mixing only
    builder.set_epoch(4, 5)
    for _ in range(50):
        masks = builder(torch.rand(8, 3, 8, 8), torch.arange(8)).masks
        assert not ((masks == 0) | (masks == 1)).all()
    builder.set_epoch(3, 5)  # progress 0.8 < 11/12: patch mixing at p = 0.5 still
    binary = sum(bool(((m == 0) | (m == 1)).all()) for m in
                 (builder(torch.rand(8, 3, 8, 8), torch.arange(8)).masks for _ in range(50)))
    assert 10 < binary < 40


def test_reflect_padding_crops_a_window_of_the_mirrored_border():
    images = torch.rand(32, 3, 8, 8)
    out = random_crop_flip(images, padding=2, flip=False, generator=torch.Generator().manual_seed(0),
                           padding_mode='reflect')
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode='reflect')
    for i in range(32):
        assert any(torch.equal(out[i], padded[i, :, y:y + 8, x:x + 8]) for y in range(5) for x in range(5))
    assert (out != 0).all()  # no zero border: reflect padding repeats pixels
