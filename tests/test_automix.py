"""AutoMix (timm_mimo.automix, train.py --msda automix / --mix-mode automix) and the mixed-sample pictures."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import timm
import timm_mimo  # noqa: F401
from timm.utils import ModelEmaV3
from timm_mimo.automix import AutoMix, FeatureTap, MixBlock, build_automix, check_features, freeze, mask_loss, \
    momentum_at
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.eval.plots import mimo_samples, msda_samples, save_mix_grid

from test_train import summary_column

REPO = Path(__file__).resolve().parents[1]
TINY = dict(channels=(8, 16, 32))  # WRN-16 at 1/4 width: the code paths of wrn16_2, a fraction of the time
TINY_CLI = ['--model-kwargs', 'channels=[8,16,32]']


def tiny(name='wrn16_2'):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **TINY)


def momentum_copy(model):
    ema = ModelEmaV3(model, decay=0.999)
    freeze(ema.module)
    return ema


def batch_for(model, num_members, n=8, seed=0):
    builder = MimoBatchBuilder(num_members, 10, model.mix_grid_size((32, 32)), mix_mode='mimo', seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return builder(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


# ------------------------------------------------------------------------------------------------------
# Mix Block, schedule, mask loss

@pytest.mark.parametrize('lam_concat', [False, True])
def test_mixblock_shapes_and_value_range(lam_concat):
    block = MixBlock(64, lam_concat=lam_concat)
    assert block.query.out_channels == 32 and block.value.out_channels == 1
    z = torch.randn(4, 64, 8, 8) * 50  # large features: the sigmoid still stays inside (0, 1)
    out = block(z, z.flip(0), torch.rand(4), (32, 32))
    assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
    assert (out > 0).all() and (out < 1).all()
    assert block.logits(z, z.flip(0), 0.3).shape == (4, 1, 8, 8)
    # nearest upsampling: every 4x4 pixel block repeats one feature cell
    assert torch.equal(out[:, :, ::4, ::4], out[:, :, 3::4, 3::4])
    assert MixBlock(64, upsample='bilinear')(z, z, 0.5, (32, 32)).shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match='reads 64 channels'):
        block(torch.randn(4, 32, 8, 8), torch.randn(4, 32, 8, 8))
    with pytest.raises(ValueError, match='upsampling'):
        MixBlock(64, upsample='area')


def test_mixblock_attention_runs_in_fp32_under_autocast():
    block = MixBlock(16)
    z = torch.randn(2, 16, 4, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(z, z.flip(0), 0.5, (8, 8))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_momentum_schedule_at_known_steps():
    m0, m1 = 0.999, 0.999999
    assert momentum_at(0, 1000, m0, m1, 0.1) == m0
    assert momentum_at(99, 1000, m0, m1, 0.1) == m0                      # constant before 10 % of training
    # from 10 %: m_end - (m_end - m0) (cos(pi t / T) + 1) / 2 with t / T over the whole run (a small jump)
    assert momentum_at(100, 1000, m0, m1, 0.1) == pytest.approx(m1 - (m1 - m0) * (math.cos(0.1 * math.pi) + 1) / 2)
    assert momentum_at(100, 1000, m0, m1, 0.1) == pytest.approx(0.9990244, abs=1e-7)
    assert momentum_at(500, 1000, m0, m1, 0.1) == pytest.approx((m0 + m1) / 2)
    assert momentum_at(1000, 1000, m0, m1, 0.1) == pytest.approx(m1)
    assert momentum_at(300, 1000, m0, m1, 0.5) == m0
    # the EMA update with that momentum: theta_k <- m theta_k + (1 - m) theta_q (BatchNorm statistics too)
    online = tiny()
    ema = momentum_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online.stages[0][0].norm1.running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.decay = momentum_at(500, 1000, m0, m1, 0.1)
    ema.update(online)
    after = ema.module.state_dict()
    name = 'stem.weight'
    assert torch.allclose(after[name], before[name] + (1 - ema.decay) * 1.0, atol=1e-6)
    assert torch.allclose(after['stages.0.0.norm1.running_mean'], torch.full((16,), (1 - ema.decay) * 5.0))


def test_mask_loss_is_zero_inside_the_margin():
    lam = torch.tensor(0.5)
    for mean in (0.41, 0.5, 0.59):  # image share 1 - mean within 0.1 of lambda
        mask = torch.full((4, 1, 8, 8), mean, requires_grad=True)
        loss = mask_loss(mask, lam, 0.1)
        assert loss.item() == 0.0
        loss.backward()
        assert mask.grad.abs().sum() == 0
    # outside the margin: |1 - mean - lam| - margin, over the whole batch (one scalar)
    mask = torch.cat([torch.full((2, 1, 8, 8), 0.1), torch.full((2, 1, 8, 8), 0.3)])
    assert mask_loss(mask, lam, 0.1).item() == pytest.approx(0.2)
    assert mask_loss(torch.full((2, 1, 4, 4), 0.9), 0.7, 0.1).item() == pytest.approx(0.5)


def test_lambda_margin_falls_back_to_mixup_on_the_backbone_branch():
    automix = AutoMix(MixBlock(8), tap=None, lam_margin=0.08)
    mask = torch.rand(3, 1, 4, 4)
    for lam, constant in ((0.05, True), (0.08, True), (0.5, False), (0.93, True)):
        out = automix._fallback(mask, torch.tensor(lam))
        if constant:
            assert torch.allclose(out, torch.full_like(mask, 1 - lam))
        else:
            assert torch.equal(out, mask)


# ------------------------------------------------------------------------------------------------------
# features and gradient flow

def test_feature_tap_reads_timm_intermediates_and_hooks():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    tap = FeatureTap(model, -2)
    assert tap.index == 2 and tap.num_chs == 16 and tap.use_intermediates
    assert tap(model, x).shape == (2, 16, 16, 16)
    final, inter = model.forward_intermediates(x, indices=[0, 3], norm=True)
    assert torch.allclose(final, model.forward_features(x)) and torch.allclose(inter[1], final)
    assert inter[0].shape == (2, 16, 32, 32)  # the stem (16 channels at any width)

    class HooksOnly(nn.Module):  # feature_info but no forward_intermediates: the forward-hook path
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1))
            self.feature_info = [dict(module='body.0', num_chs=4, reduction=1),
                                 dict(module='body.1', num_chs=6, reduction=2)]

        def forward_features(self, x):
            return self.body(x)

    other = HooksOnly()
    hook_tap = FeatureTap(other, 1)
    assert not hook_tap.use_intermediates and hook_tap(other, x).shape == (2, 6, 16, 16)
    assert not other.body[1]._forward_hooks, 'the hook is removed after use'
    with pytest.raises(ValueError, match='out of range'):
        FeatureTap(model, 4)
    with pytest.raises(ValueError, match='out of range'):
        FeatureTap(model, -5)
    with pytest.raises(ValueError, match='exposes no intermediate features'):
        FeatureTap(nn.Linear(3, 3), 0)
    automix = build_automix(timm.create_model('resnet10t', num_classes=10), -2)
    assert check_features(automix, timm.create_model('resnet10t', num_classes=10), (64, 64)) == (256, 4, 4)


@pytest.mark.parametrize('name,members', [('wrn16_2', 1), ('wrn16_2_mixmo2', 2)])
def test_mixblock_learns_only_through_the_frozen_momentum_encoder(name, members):
    model = tiny(name)
    ema = momentum_copy(model)
    automix = build_automix(model, -2, num_members=members)
    batch = batch_for(model, members)
    out = automix(model, ema.module, batch, torch.Generator().manual_seed(1), vis=True)
    online = [p for p in model.parameters()]
    block = list(automix.mixblock.parameters())
    momentum = list(ema.module.parameters())
    assert not any(p.requires_grad for p in momentum)

    def grads(term, params):
        return torch.autograd.grad(out.terms[term], params, retain_graph=True, allow_unused=True)

    # the Mix Block's loss reaches the block (only possible through the frozen encoder's forward of the
    # mixed images), never the online model
    assert all(g is not None and g.abs().sum() > 0 for g in grads('mb', block))
    assert all(g is None for g in grads('mb', online))
    assert all(g is None for g in grads('mask', online))
    # the online model learns on the detached mask: no gradient from its loss to the block
    assert all(g is None for g in grads('mix', block))
    assert all(g is not None for g in grads('mix', online))
    if members == 1:
        assert all(g is None for g in grads('one', block))
    # one backward of the total: online model and block get gradients, the momentum encoder none
    out.loss.backward()
    assert all(p.grad is None for p in momentum)
    assert all(p.grad is not None for p in block) and model.stem.weight.grad is not None
    assert out.vis['mask'].shape[-2:] == (32, 32) and out.vis['lam'].shape == (8 * 1,)
    assert set(out.parts) >= {'mix', 'mb', 'mask', 'mask_mean'}


def test_mixmo_automix_alternates_learned_and_linear_masks():
    """--mix-mode automix is Cut-MixMo with the learned mask in place of the box: with mix_prob 0 the backbone
    branch mixes linearly (constant mask 1 - lambda for member 1), with 1 it always takes the learned mask."""
    model = tiny('wrn16_2_mixmo2')
    ema = momentum_copy(model)
    batch = batch_for(model, 2)
    for prob in (0.0, 1.0):
        automix = build_automix(model, -2, num_members=2, mix_prob=prob)
        out = automix(model, ema.module, batch, torch.Generator().manual_seed(3), vis=True)
        mask, lam = out.vis['mask'], out.vis['lam'][0]
        constant = torch.allclose(mask, (1 - lam).expand_as(mask))
        assert constant == (prob == 0.0 or lam <= 0.08 or lam >= 0.92)


def test_mix_pictures(tmp_path):
    from PIL import Image
    model = tiny('wrn16_2_mixmo2')
    builder = MimoBatchBuilder.from_model(model, (32, 32), mix_mode='cut', mix_prob=1.0, seed=0)
    batch = builder(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,)))
    samples = mimo_samples(batch.inputs, batch.masks)
    assert torch.allclose(samples['lam'], batch.masks[:, 0].mean((1, 2)))
    path = save_mix_grid(tmp_path / 'pics' / 'mimo.png', samples, (0.5,) * 3, (0.25,) * 3, title='cut')
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.size[0] > 4 * 96
    cut = msda_samples(torch.randn(5, 3, 32, 32), 'cutmix', 1.0, torch.Generator().manual_seed(0))
    own = 1 - cut['mask'][:, 0]
    assert torch.allclose(cut['lam'], own.mean((1, 2))) and set(own.unique().tolist()) <= {0.0, 1.0}
    save_mix_grid(tmp_path / 'cutmix.png', cut)
    mix = msda_samples(torch.randn(5, 3, 32, 32), 'mixup', 1.0)
    assert torch.allclose(mix['mixed'], (1 - mix['mask']) * mix['image'] + mix['mask'] * mix['partner'], atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# train.py

def run(*args, timeout=300, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(REPO / 'train.py'), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


@pytest.mark.parametrize('args,message', [
    (['--model', 'wrn16_2_mixmo2', '--msda', 'automix'], 'use --mix-mode automix for M = 2'),
    (['--model', 'wrn16_2', '--mix-mode', 'automix'], 'masks for M = 2 but wrn16_2 has M = 1'),
    (['--model', 'wrn16_2', '--msda', 'automix', '--automix-stage', '7'], 'out of range'),
    (['--model', 'wrn16_2', '--msda', 'automix', '--model-ema'], 'drop --model-ema'),
])
def test_bad_automix_input_is_refused(args, message, tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.remove(str(REPO))
    with pytest.raises(ValueError, match=message):
        train.main([*args, *TINY_CLI, '--epochs', '1', '--output', str(tmp_path)])


def test_bad_automix_input_gives_one_error_line(tmp_path):
    proc = run('--model', 'wrn16_2', '--msda', 'automix', '--automix-stage', '-9', *TINY_CLI, '--output', tmp_path,
               check=False)
    assert proc.returncode == 2 and proc.stderr.startswith('error: ') and proc.stderr.strip().count('\n') == 0


AUTOMIX_RUN = ['--model', 'wrn16_2', *TINY_CLI, '--msda', 'automix', '-b', '16', '--lr', '0.05', '--seed', '3',
               '--epochs', '2', '--limit-train-batches', '12', '--automix-momentum', '0.99', '--mix-vis-interval', '1']


def final_state(folder: Path):
    checkpoint = sorted(folder.glob('checkpoint-*'))[-1]
    return (load_file(str(checkpoint / 'model.safetensors')),
            load_file(str(checkpoint / 'state' / 'model_1.safetensors')),
            load_file(str(folder / 'ema' / 'model.safetensors')))


def test_automix_training_outputs_and_exact_resume(tmp_path):
    """--msda automix end to end: both models evaluated, the EMA deployed, pictures; SIGTERM mid-epoch then
    --resume gives the same online weights, Mix Block and momentum encoder as an uninterrupted run."""
    run(*AUTOMIX_RUN, '--output', tmp_path, '--experiment', 'ref')
    ref = tmp_path / 'ref'
    header = (ref / 'summary.csv').read_text().splitlines()[0].split(',')
    for column in ('eval_top1', 'ema_top1', 'ema_nll', 'train_loss_mb', 'train_loss_mix', 'train_loss_one',
                   'train_loss_mask', 'train_mask_mean', 'automix_momentum'):
        assert column in header, column
    results = json.loads((ref / 'results.json').read_text())
    assert results['deployed'] == 'best' and results['deployed_model'] == 'ema'
    assert results['best']['model'] == 'ema' and results['last']['model'] == 'online'
    assert 'test' in results['ema_last'] and results['automix']['feature_level'] == 2
    assert json.loads((ref / 'best' / 'metrics.json').read_text())['model'] == 'ema'
    assert (ref / 'mixblock.safetensors').exists()
    assert sorted(p.name for p in (ref / 'mixed_samples').glob('*.png')) == ['epoch_0000.png', 'epoch_0001.png']

    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *AUTOMIX_RUN, '--output', str(tmp_path),
                             '--experiment', 'term'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    before = ''
    while 'epoch 1 step 3/12' not in before:  # 3 steps into epoch 1 (a log line every 3 steps: 4 an epoch)
        line = proc.stdout.readline()
        assert line, before
        before += line
    proc.send_signal(signal.SIGTERM)  # the step in flight is abandoned, the last completed one saved
    output, _ = proc.communicate(timeout=240)
    output = before + output
    assert proc.returncode == 0, output
    assert 'SIGTERM' in output and list((tmp_path / 'term').glob('checkpoint-0001-step*'))
    [mid_epoch] = (tmp_path / 'term').glob('checkpoint-0001-step*')
    state = json.loads((mid_epoch / 'trainer_state.json').read_text())
    # the interrupted epoch's sums travel with the checkpoint: loss parts, images seen, time spent
    assert set(state['part_sums']) >= {'mix', 'mask', 'mask_mean'}
    assert state['epoch_seen'] == state['step'] * 16 and state['epoch_time_s'] > 0
    run(*AUTOMIX_RUN, '--resume', tmp_path / 'term')
    for ours, theirs in zip(final_state(tmp_path / 'term'), final_state(ref)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # so the resumed epoch's summary covers all its steps, as the uninterrupted run's does
    for column in ('train_loss', 'train_loss_mix', 'train_loss_one', 'train_loss_mb', 'train_loss_mask',
                   'train_mask_mean'):
        assert summary_column(tmp_path / 'term', column) == pytest.approx(summary_column(ref, column), rel=1e-5), column


def test_mixmo_automix_training_run(tmp_path):
    run('--model', 'wrn16_2_mixmo2', *TINY_CLI, '--mix-mode', 'automix', '-b', '16', '--batch-repeat', '2',
        '--epochs', '1', '--limit-train-batches', '3', '--mix-vis-interval', '1', '--output', tmp_path,
        '--experiment', 'mm')
    folder = tmp_path / 'mm'
    results = json.loads((folder / 'results.json').read_text())
    assert results['deployed_model'] == 'ema' and results['automix']['mode'] == '--mix-mode automix'
    assert len(results['best']['test']['member_top1']) == 2
    assert (folder / 'mixed_samples' / 'epoch_0000.png').exists()
    header = (folder / 'summary.csv').read_text().splitlines()[0]
    assert 'ema_member1_top1' in header and 'train_loss_one' not in header


# ------------------------------------------------------------------------------------------------------
# real images

def test_automix_learns_on_a_cifar10_subset():
    from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
    from timm_mimo.data import CifarZipDataset, default_cifar10_zip
    if not default_cifar10_zip().exists():
        pytest.skip(f'CIFAR-10 zip not found at {default_cifar10_zip()}')

    def arrays(split, per_class):
        x, y = CifarZipDataset(default_cifar10_zip(), split=split, max_per_class=per_class).load_arrays()
        x = x.permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(CIFAR_DEFAULT_MEAN)[:, None, None]
        return (x - mean) / torch.tensor(CIFAR_DEFAULT_STD)[:, None, None], y

    train_x, train_y = arrays('train', 100)            # 1,000 training images
    val_x, val_y = arrays('validation', 30)            # 300 held-out images (from the last 500 per class)
    model = tiny()
    ema = momentum_copy(model)
    automix = build_automix(model, -2)
    builder = MimoBatchBuilder(1, 10, (32, 32), mix_mode='mimo', seed=0)
    optimizer = torch.optim.SGD([*model.parameters(), *automix.mixblock.parameters()], lr=0.1, momentum=0.9,
                                nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in automix.mixblock.parameters()]
    steps, history = 50, []
    for step in range(steps):
        idx = torch.randint(0, len(train_x), (32,), generator=gen)
        out = automix(model, ema.module, builder(train_x[idx], train_y[idx]), gen)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ema.decay = momentum_at(step, steps, 0.9, 0.99, 0.1)
        ema.update(model)
        history.append({k: float(v) for k, v in out.parts.items()})
    assert all(math.isfinite(h[k]) for h in history for k in h)
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    assert last['one'] < 0.95 * first['one'], (first, last)
    assert 0.1 < last['mask_mean'] < 0.9, 'the mask loss keeps the masks near lambda on average'
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(automix.mixblock.parameters(), start))
    model.eval()
    ema.module.eval()
    with torch.no_grad():
        online = (model(val_x).argmax(-1) == val_y).float().mean().item()
        momentum = (ema.module(val_x).argmax(-1) == val_y).float().mean().item()
    # chance is 10 %; 300 images give a standard error of about 1.8 points
    assert online > 0.15 and momentum > 0.15, (online, momentum)
