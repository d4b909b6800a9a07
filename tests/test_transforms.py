"""timm's ImageNet-style transforms per member copy (--aug timm) and timm's eval pipeline (--crop-pct)."""
import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import timm.data
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.data.splits import build_splits
from timm_mimo.data.transforms import (
    TIMM_AUG, ImageTransforms, MemberCopies, default_aug, eval_data_config, eval_transform, train_transform,
    with_transform)
from timm_mimo.train.args import build_parser, image_transforms, parse_args

from test_train import final_weights, run, start

# a tiny run on the 40 px JPEG folder: WRN-16-2 MixMo (M = 2) at 32 px, 4 unique images x 2 repeats a step
TINY = ['--model', 'wrn16_2_mixmo2', '--img-size', '32', '-b', '8', '--batch-repeat', '2', '--val-per-class', '1',
        '--seed', '3', '--epochs', '2', '--limit-train-batches', '6']


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory) -> Path:
    """train/ (3 classes x 10 random 40 x 48 JPEGs) and test/ (3 x 2): larger than the 32 px input."""
    root = tmp_path_factory.mktemp('jpegs')
    rng = np.random.default_rng(0)
    for split, count in (('train', 10), ('test', 2)):
        for name in ('a', 'b', 'c'):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.jpg', quality=90)
    return root


def config32():
    return eval_data_config(32, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)


def test_each_copy_is_an_independent_draw_replayed_by_seed_epoch_and_index_alone(jpeg_folder):
    splits = build_splits('', str(jpeg_folder), img_size=32, val_per_class=1)
    images = with_transform(splits.train, None)
    copies = MemberCopies(images, train_transform(config32(), ImageTransforms(reprob=0.5)), copies=4, seed=5)
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    views, label = copies[3]
    assert views.shape == (4, 3, 32, 32) and label == images[3][1]
    flat = views.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(4) for j in range(i + 1, 4))  # 4 draws, not 1
    # the caller's random sources are untouched
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    random.random(), np.random.rand(), torch.rand(1)  # whatever the process drew before does not matter
    assert torch.equal(copies[3][0], views)
    assert not torch.equal(copies[4][0], views)
    copies.set_epoch(1)
    assert not torch.equal(copies[3][0], views)
    # nor which process reads the sample: a DataLoader worker draws what the main process draws
    in_process = next(iter(DataLoader(copies, batch_size=6)))[0]
    in_worker = next(iter(DataLoader(copies, batch_size=6, num_workers=1)))[0]
    assert torch.equal(in_process, in_worker)
    # the trainer's loader passes each epoch on to the copies (Accelerate's prepared loader does it)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from timm_mimo.data.loaders import PreparedTrainLoader
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    PreparedTrainLoader(accelerator.prepare(DataLoader(copies, batch_size=2, shuffle=True)), accelerator).set_epoch(4)
    assert copies.epoch == 4


def test_large_images_default_to_timm_transforms_small_ones_to_the_batched_recipe(jpeg_folder):
    assert default_aug(build_splits('', str(jpeg_folder), img_size=32, val_per_class=1), 32) == TIMM_AUG
    assert default_aug(build_splits('', str(jpeg_folder), img_size=40, val_per_class=1), 40) == 'crop-flip'
    assert default_aug(build_splits('', None, img_size=32), 32, native_size=32) == 'crop'  # digits: no flip


def test_the_builder_gives_each_member_view_its_own_copy_and_augments_nothing():
    unique, members, repeat = 3, 2, 2
    # copy c of image u is filled with 10 u + c
    images = (10 * torch.arange(unique)[:, None] + torch.arange(members * repeat)).float()
    images = images[..., None, None, None].expand(unique, members * repeat, 3, 4, 4)

    def no_augment(*_, **__):
        raise AssertionError('the copies are transformed already')

    builder = MimoBatchBuilder(members, 5, (4, 4), batch_repeat=repeat, mix_mode='linear', augment=no_augment, seed=0)
    batch = builder(images, torch.tensor([0, 1, 2]))
    assert batch.inputs.shape == (unique * repeat, members, 3, 4, 4)
    seen = batch.inputs[:, :, 0, 0, 0].long()                   # (B, M): 10 u + c
    image, copy = seen // 10, seen % 10
    for k in range(members):
        assert set(copy[:, k].tolist()) <= set(range(k * repeat, (k + 1) * repeat))  # member k's own copies
    assert sorted(seen.flatten().tolist()) == sorted(images[:, :, 0, 0, 0].long().flatten().tolist())  # each once
    assert torch.equal(batch.targets.argmax(-1), image)          # every view keeps its image's label
    with pytest.raises(ValueError, match='M x b'):
        builder(images[:, :3], torch.tensor([0, 1, 2]))


def test_evaluation_is_a_center_crop_of_the_image_resized_by_crop_pct(jpeg_folder):
    image = Image.open(next((jpeg_folder / 'test' / 'a').iterdir())).convert('RGB')  # 48 x 40
    config = eval_data_config(16, (0.5,) * 3, (0.25,) * 3, crop_pct=0.5, interpolation='bicubic')
    assert config['crop_pct'] == 0.5 and config['interpolation'] == 'bicubic'
    resized = image.resize((38, 32), Image.BICUBIC)               # shorter side to 16 / 0.5 = 32
    expected = resized.crop((11, 8, 27, 24))                       # the central 16 x 16
    expected = (torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(eval_transform(config)(image), expected, atol=0.05)
    # without the flags, the model's pretrained_cfg decides (as timm's resolve_data_config does)
    from_model = eval_data_config(16, (0.5,) * 3, (0.25,) * 3, dict(crop_pct=0.75, interpolation='bicubic'))
    assert from_model['crop_pct'] == 0.75 and from_model['interpolation'] == 'bicubic'


def test_timm_flags_reach_timm_create_transform():
    args = parse_args(['--aug', 'timm', '--scale', '0.3', '0.9', '--ratio', '0.5', '2', '--hflip', '0.25', '--vflip',
                       '0.75', '--color-jitter', '0.2', '--reprob', '0.6', '--remode', 'const', '--recount', '3',
                       '--train-interpolation', 'bicubic', '--input-size', '3', '48', '48', '--crop-pct', '0.8',
                       '--mean', '0.1', '0.2', '0.3', '--std', '0.5', '--interpolation', 'lanczos'])
    assert args.img_size == 48  # --input-size sets the side
    transforms = image_transforms(args)
    config = eval_data_config(args.img_size, args.mean, args.std, None, transforms.crop_pct, transforms.interpolation)
    steps = {type(t).__name__: t for t in train_transform(config, transforms).transforms}
    crop = steps['RandomResizedCropAndInterpolation']
    assert crop.size == (48, 48) and crop.scale == (0.3, 0.9) and crop.ratio == (0.5, 2.0)
    assert crop.interpolation == timm.data.transforms.str_to_interp_mode('bicubic')
    assert steps['RandomHorizontalFlip'].p == 0.25 and steps['RandomVerticalFlip'].p == 0.75
    assert steps['ColorJitter'].brightness == (0.8, 1.2)
    erase = steps['RandomErasing']
    assert (erase.probability, erase.mode, erase.max_count) == (0.6, 'const', 3)
    assert steps['Normalize'].mean.tolist() == pytest.approx([0.1, 0.2, 0.3]) and steps['Normalize'].std.tolist() == \
        pytest.approx([0.5] * 3)
    evaluation = {type(t).__name__: t for t in eval_transform(config).transforms}
    assert evaluation['Resize'].size == 60 and evaluation['CenterCrop'].size == (48, 48)  # shorter side 48 / 0.8
    assert evaluation['Resize'].interpolation == timm.data.transforms.str_to_interp_mode('lanczos')
    with_aa = {type(t).__name__ for t in train_transform(config, ImageTransforms(aa='rand-m9-mstd0.5')).transforms}
    assert 'RandAugment' in with_aa


def test_train_help_documents_every_timm_transform_flag():
    text = build_parser().format_help()
    for flag in ('--scale', '--ratio', '--hflip', '--vflip', '--color-jitter', '--aa', '--reprob', '--remode',
                 '--recount', '--train-interpolation', '--input-size', '--img-size', '--crop-pct', '--mean', '--std',
                 '--interpolation'):
        assert flag in text, flag


@pytest.mark.parametrize('argv,needle', [
    (['--hflip', '0.2', '--dataset', ''], '--hflip is a flag of timm'),           # the batched recipe ignores it
    (['--aug', 'timm', '--dataset', ''], 'holds tensors, not images'),           # digits are tensors
    (['--scale', '0.5', '--aug', 'timm'], '--scale takes two numbers'),
    (['--input-size', '3', '32', '24'], '--input-size takes 3 channels and a square side'),
])
def test_transform_flags_that_cannot_be_honoured_are_one_error_line(argv, needle, tmp_path, run_script):
    proc = run_script('train.py', *argv, '--epochs', '1', '--output', tmp_path, '--experiment', 'bad')
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / 'bad').exists()


def test_per_copy_path_resumes_mid_epoch_bit_identically_and_validate_reuses_its_eval(jpeg_folder, tmp_path):
    common = [*TINY, '--data-dir', jpeg_folder, '--output', tmp_path]
    run('train.py', *common, '--experiment', 'ref')
    proc = start('train.py', *common, '--experiment', 'term')
    before = ''
    while 'epoch 1 step 2/6' not in before:  # mid-epoch 1
        line = proc.stdout.readline()
        assert line, before
        before += line
    proc.send_signal(signal.SIGTERM)
    output = before + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and 'checkpoint-0001-step' in output, output
    run('train.py', *common, '--resume', tmp_path / 'term')
    ours, theirs = final_weights(tmp_path / 'term'), final_weights(tmp_path / 'ref')
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    results = json.loads((tmp_path / 'ref' / 'results.json').read_text())
    assert results['speed']['device_data'] is False
    run('validate.py', tmp_path / 'ref', '-j', '0', '--results-file', tmp_path / 'val.json')
    assert json.loads((tmp_path / 'val.json').read_text())['test']['nll'] == pytest.approx(
        results['best']['test']['nll'], abs=1e-6)


def test_a_stream_draws_each_copy_apart_and_a_resumed_epoch_replays_the_draws(tmp_path):
    """wds/: no index, so the draws follow each sample's position in its reader's share of the (seed, epoch)
    order; a fresh loader resumed at epoch 1, batch 2 (a resumed run) sees the copies the first reading saw."""
    wds = pytest.importorskip('webdataset')
    from timm_mimo.data.loaders import StreamTrainLoader
    from timm_mimo.data.streams import create_stream
    from timm_mimo.data.transforms import StreamCopies

    def loader(folder, workers):
        folder.mkdir()
        rng = np.random.default_rng(0)
        for shard, name in enumerate(('train-0000', 'train-0001', 'val-0000')):
            with wds.TarWriter(str(folder / f'{name}.tar')) as writer:
                for i in range(6):
                    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)  # noise: every crop differs
                    writer.write({'__key__': f'{shard}{i:03d}', 'png': pixels, 'cls': str(i % 3).encode()})
        pipeline = train_transform(eval_data_config(8, (0.5,) * 3, (0.5,) * 3), ImageTransforms(color_jitter=0.0))
        stream = create_stream('wds/tiny', str(folder), 'train-{0000..0001}.tar|12', '--train-split',
                               is_training=True, batch_size=3, seed=3, transform=StreamCopies(pipeline, 4, seed=3))
        stream.set_loader_cfg(num_workers=workers)
        return StreamTrainLoader(stream, 3, workers, torch.device('cpu'), seed=3)

    def epoch(source, number, start=0):
        source.set_epoch(number)
        return [images for images, _ in source.batches(start)]

    first = loader(tmp_path / 'a', workers=0)
    zero, one = epoch(first, 0), epoch(first, 1)
    assert zero[0].shape == (3, 4, 3, 8, 8)
    assert all(not torch.equal(zero[0][0, i], zero[0][0, j]) for i in range(4) for j in range(i + 1, 4))
    resumed = epoch(loader(tmp_path / 'b', workers=0), 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[2:])) and len(resumed) == len(one) - 2
    with_workers = loader(tmp_path / 'c', workers=2)
    assert [len(b) for b in epoch(with_workers, 1)] == [len(b) for b in epoch(with_workers, 1)]
    assert all(torch.equal(a, b) for a, b in zip(epoch(with_workers, 1), epoch(loader(tmp_path / 'd', 2), 1)))
    # and train.py trains on it with --aug timm
    import train
    assert train.cli(['--dataset', 'wds/tiny', '--data-dir', str(tmp_path / 'a'), '--num-classes', '3', '--aug', 'timm',
                      '--train-split', 'train-{0000..0001}.tar|12', '--val-split', 'val-0000.tar|6', '--img-size', '8',
                      '-b', '4', '--batch-repeat', '2', '--epochs', '1', '--output', str(tmp_path / 'out'),
                      '--experiment', 'wds']) == 0
    assert json.loads((tmp_path / 'out' / 'wds' / 'results.json').read_text())['best']['validation']['top1'] >= 0
