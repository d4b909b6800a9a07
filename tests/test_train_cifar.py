"""A short Cut-MixMo training run on real CIFAR-10 images from ../shared/data.

The network is the registered ``wrn16_4_mixmo2`` at a quarter of its width (stage channels 16/32/64,
i.e. WRN-16-1) so that the run fits the CI budget on 2 CPU cores; the code path is the same.
"""
import time

import pytest
import torch

import timm
import timm_mimo  # noqa: F401
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.loss import MemberSoftTargetCrossEntropy
from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from timm_mimo.data import CifarZipDataset, default_cifar10_zip

pytestmark = pytest.mark.skipif(
    not default_cifar10_zip().exists(), reason=f'CIFAR-10 zip not found at {default_cifar10_zip()}')


def normalized_arrays(split, per_class):
    images, labels = CifarZipDataset(default_cifar10_zip(), split=split, max_per_class=per_class).load_arrays()
    images = images.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(CIFAR_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(CIFAR_DEFAULT_STD)[:, None, None]
    return (images - mean) / std, labels


def test_cut_mixmo_learns_on_cifar10_subset():
    torch.manual_seed(0)
    train_x, train_y = normalized_arrays('train', 200)     # 2,000 training images
    val_x, val_y = normalized_arrays('validation', 50)     # 500 held-out images (the 5k split)
    model = timm.create_model('wrn16_4_mixmo2', channels=(16, 32, 64))
    builder = MimoBatchBuilder.from_model(model, (32, 32), batch_repeat=2, mix_mode='cut', seed=0)
    criterion = MemberSoftTargetCrossEntropy()
    steps, unique = 300, 32
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.15)
    order = torch.randperm(len(train_x))
    losses = []
    start = time.time()
    model.train()
    for step in range(steps):
        builder.progress = step / steps
        idx = order[(step * unique) % len(order):][:unique]
        if len(idx) < unique:
            order = torch.randperm(len(train_x))
            idx = order[:unique]
        batch = builder(train_x[idx], train_y[idx])
        loss = criterion(model(batch.inputs, batch.masks), batch.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        member_logits = model.forward_members(val_x)
        ensemble = model(val_x)
    member_acc = (member_logits.argmax(-1) == val_y[:, None]).float().mean(0)
    ensemble_acc = (ensemble.argmax(-1) == val_y).float().mean()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f'{time.time() - start:.0f}s loss {first:.3f} -> {last:.3f} '
          f'members {member_acc.tolist()} ensemble {ensemble_acc:.3f}')
    # mixed inputs keep the loss floor high early on; a 10 % fall over 300 steps is well above noise
    assert last < 0.9 * first
    # chance is 10 %; 500 images give a standard error of 1.3 points
    assert (member_acc > 0.2).all(), f'member accuracies {member_acc.tolist()}'
    assert ensemble_acc > 0.2
