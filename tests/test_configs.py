"""The YAML recipes under configs/: they load, train.py accepts them, and they hold the paper's numbers.

Every file is checked against ``train.build_parser()`` (keys, types, choices) and parsed with
``train.parse_args(['-c', path])``; the paper rows are checked against docs/methods/mixmo.md §3 and §5.1 (batch,
lr / b, warmup, milestones, weight decay, mixing settings), and the multistep milestones are run through
timm's scheduler to check that the lr drops at the start of the paper's (1-based) epochs. No model is built.
"""
import argparse
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import timm.scheduler  # noqa: E402

import timm_mimo  # noqa: E402,F401  (registers the models)
import train  # noqa: E402

CONFIGS = REPO / 'configs'
# configs/accelerate/ holds `accelerate launch --config_file` files, checked in tests/test_accelerate_configs.py
ALL = sorted(p for p in CONFIGS.rglob('*.yaml') if p.parent.name != 'accelerate')
IDS = [str(p.relative_to(CONFIGS)) for p in ALL]

# paper rows: file stem -> (M = 2 model?, mix_mode or None for M = 1, msda)
CIFAR_ROWS = {
    'vanilla': (False, None, 'none'),
    'mixup': (False, None, 'mixup'),
    'cutmix': (False, None, 'cutmix'),
    'mimo': (True, 'mimo', 'none'),
    'linear_mixmo': (True, 'linear', 'none'),
    'cut_mixmo': (True, 'cut', 'none'),
    'linear_mixmo_cutmix': (True, 'linear', 'cutmix'),
    'cut_mixmo_cutmix': (True, 'cut', 'cutmix'),
}
TINY_ROWS = {
    'w1_vanilla': ('preactresnet18', None, 'none'),
    'w1_mixup': ('preactresnet18', None, 'mixup'),
    'w1_cutmix': ('preactresnet18', None, 'cutmix'),
    'w1_linear_mixmo': ('preactresnet18_mixmo2', 'linear', 'none'),
    'w1_cut_mixmo': ('preactresnet18_mixmo2', 'cut', 'none'),
    'w2_vanilla': ('preactresnet18_w2', None, 'none'),
    'w2_linear_mixmo': ('preactresnet18_w2_mixmo2', 'linear', 'none'),
    'w2_cut_mixmo': ('preactresnet18_w2_mixmo2', 'cut', 'none'),
    'w3_vanilla': ('preactresnet18_w3', None, 'none'),
    'w3_linear_mixmo': ('preactresnet18_w3_mixmo2', 'linear', 'none'),
    'w3_cut_mixmo': ('preactresnet18_w3_mixmo2', 'cut', 'none'),
}
MIXVIT_FILES = [CONFIGS / 'mixvit' / 'cifar10_cait_xxs.yaml', CONFIGS / 'mixvit' / 'digits_cait_shallow.yaml']
AUTOMIX_FILES = [CONFIGS / 'automix' / 'cifar100_r18_automix.yaml', CONFIGS / 'automix' / 'cifar100_r18_mixup.yaml']
PAPER_FILES = [CONFIGS / ds / f'{row}.yaml' for ds in ('cifar10', 'cifar100') for row in CIFAR_ROWS] + \
              [CONFIGS / 'tiny_imagenet' / f'{row}.yaml' for row in TINY_ROWS]
# the large settings (issue 24, item 7): ImageNet-1k at 224 px, and Tiny ImageNet from a Hugging Face data set;
# each also runs two steps in tests/test_recipes.py
IMAGENET_FILES = [CONFIGS / 'imagenet' / name for name in ('mixvit_cait_xxs24.yaml', 'automix_r18_100ep.yaml',
                                                           'automix_r18_300ep.yaml')]
TINY_HFDS = CONFIGS / 'tiny_imagenet' / 'w1_cut_mixmo_hfds.yaml'
RECIPES_AT_SCALE = IMAGENET_FILES + [TINY_HFDS]

def load(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict) and config, f'{path} is not a non-empty mapping'
    return config


def actions():
    return {a.dest: a for a in train.build_parser()._actions if a.dest not in ('help', 'config')}


def is_mimo_model(name: str) -> bool:
    with torch.device('meta'):  # M as the registered model has it (MixMo CNNs and MixViT alike)
        return getattr(timm.create_model(name), 'num_members', 1) > 1


def test_all_expected_files_exist():
    others = [CONFIGS / 'cifar10' / 'fast_gpu.yaml', CONFIGS / 'cifar10' / 'time_to_accuracy.yaml',
              CONFIGS / 'cifar10' / 'cpu_scale.yaml', CONFIGS / 'digits_mixmo.yaml']
    missing = [str(p.relative_to(REPO)) for p in PAPER_FILES + AUTOMIX_FILES + RECIPES_AT_SCALE + others
               if not p.exists()]
    assert not missing, f'missing configs: {missing}'
    extra = {p for p in ALL} - set(PAPER_FILES) - set(MIXVIT_FILES) - set(AUTOMIX_FILES) - set(RECIPES_AT_SCALE) - \
        set(others)
    assert not extra, f'configs not covered by tests/test_configs.py: {sorted(map(str, extra))}'


@pytest.mark.parametrize('path', ALL, ids=IDS)
def test_header(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith('# ') and re.search(r'docs/methods/[a-z-]+\.md §\d', lines[0]), \
        f'{path}: the first line must name the row and the section of docs/methods/ it follows'
    rel = path.relative_to(REPO).as_posix()
    assert any(f'accelerate launch train.py -c {rel}' in line for line in lines[:4] if line.startswith('#')), \
        f'{path}: the header must give the command "accelerate launch train.py -c {rel}"'


@pytest.mark.parametrize('path', ALL, ids=IDS)
def test_keys_types_and_choices(path):
    config, known = load(path), actions()
    unknown = sorted(set(config) - set(known))
    assert not unknown, f'{path}: unknown keys {unknown}'
    for key, value in config.items():
        action = known[key]
        # argparse does not type-convert or choice-check defaults: the YAML must hold the final values
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            assert isinstance(value, bool), f'{path}: {key} must be true/false, got {value!r}'
        elif action.nargs in ('+', '*'):
            assert isinstance(value, list), f'{path}: {key} must be a list, got {value!r}'
            if action.type is int:
                assert all(isinstance(v, int) and not isinstance(v, bool) for v in value), f'{path}: {key}'
        elif action.type is int:
            assert isinstance(value, int) and not isinstance(value, bool), f'{path}: {key} must be an int'
        elif action.type is float:
            # a bare 6e-4 is a *string* in YAML 1.1: write 6.0e-4
            assert isinstance(value, (int, float)) and not isinstance(value, bool), \
                f'{path}: {key} must be a number, got {value!r} ({type(value).__name__})'
        else:
            assert value is None or isinstance(value, str), f'{path}: {key} must be a string, got {value!r}'
        if action.choices is not None:
            assert value in action.choices, f'{path}: {key}={value!r} not in {action.choices}'


@pytest.mark.parametrize('path', ALL, ids=IDS)
def test_parse_args_and_model(path):
    config = load(path)
    args = train.parse_args(['-c', str(path)])
    for key, value in config.items():
        assert getattr(args, key) == value, f'{path}: {key} parsed as {getattr(args, key)!r}, file has {value!r}'
    assert timm.is_model(args.model), f'{path}: model {args.model!r} is not registered'
    assert args.batch_size % args.batch_repeat == 0, f'{path}: batch_size not divisible by batch_repeat'
    if path not in MIXVIT_FILES + AUTOMIX_FILES + IMAGENET_FILES:
        assert args.opt == 'sgd' and args.momentum == 0.9
    assert args.eval_metric == 'top1'
    if not is_mimo_model(args.model):
        assert args.batch_repeat == 1, f'{path}: a vanilla (M = 1) row uses batch_repeat 1'


@pytest.mark.parametrize('stem', list(CIFAR_ROWS))
@pytest.mark.parametrize('ds', ['cifar10', 'cifar100'])
def test_cifar_paper_rows(ds, stem):
    path = CONFIGS / ds / f'{stem}.yaml'
    config, args = load(path), train.parse_args(['-c', str(CONFIGS / ds / f'{stem}.yaml')])
    mimo, mix_mode, msda = CIFAR_ROWS[stem]
    assert args.dataset == f'torch/{ds}' and args.dataset_download and args.data_dir == f'data/{ds}'
    assert args.num_classes == (10 if ds == 'cifar10' else 100)
    assert args.model == ('wrn28_10_mixmo2' if mimo else 'wrn28_10')
    assert args.batch_size == 64
    assert args.batch_repeat == (4 if mimo else 1)
    assert args.lr == pytest.approx(0.0125 if mimo else 0.05)
    assert args.lr * args.batch_repeat == pytest.approx(0.05)  # lr divided by b (docs/methods/mixmo.md §3)
    assert args.sched == 'multistep' and args.epochs == 300
    assert args.decay_milestones == [100, 200, 225] and args.decay_rate == pytest.approx(0.1)
    assert args.warmup_epochs == 1 and args.warmup_lr <= 1e-5
    assert args.weight_decay == pytest.approx(6e-4) and args.wd_all  # = L2 3e-4 * sum(theta^2), all params
    assert args.checkpoint_hist == 1 and 'seed' in config
    check_mixing(args, config, mimo, mix_mode, msda)


@pytest.mark.parametrize('stem', list(TINY_ROWS))
def test_tiny_imagenet_paper_rows(stem):
    path = CONFIGS / 'tiny_imagenet' / f'{stem}.yaml'
    config, args = load(path), train.parse_args(['-c', str(path)])
    model, mix_mode, msda = TINY_ROWS[stem]
    mimo = mix_mode is not None
    # a non-empty dataset name: '' with no data_dir is the embedded digits, and '' uses ImageNet mean/std
    assert args.dataset and '/' not in args.dataset
    assert args.data_dir == 'data/tiny-imagenet-200'
    assert args.img_size == 64 and args.num_classes == 200
    assert args.model == model
    assert args.batch_size == 100
    assert args.batch_repeat == (4 if mimo else 1)
    assert args.lr == pytest.approx(0.05 if mimo else 0.2)
    assert args.lr * args.batch_repeat == pytest.approx(0.2)
    assert args.sched == 'multistep' and args.epochs == 1200
    assert args.decay_milestones == [599, 899] and args.decay_rate == pytest.approx(0.1)
    assert args.warmup_epochs == 1 and args.warmup_lr <= 1e-5
    assert args.weight_decay == pytest.approx(1e-4) and args.wd_all
    assert args.checkpoint_hist == 1 and 'seed' in config
    check_mixing(args, config, mimo, mix_mode, msda)


def check_mixing(args, config, mimo, mix_mode, msda):
    assert is_mimo_model(args.model) == mimo
    if mimo:
        assert args.mix_mode == mix_mode
        if mix_mode == 'mimo':
            assert args.weight_root == 1
        else:
            assert args.mix_alpha == 2 and args.weight_root == 3
        if mix_mode == 'cut':
            assert args.mix_prob == pytest.approx(0.5)
    else:
        assert not any(k.startswith('mix_') or k == 'weight_root' for k in config), \
            'M = 1 rows set no MixMo keys'
    assert args.msda == msda
    if msda != 'none':
        assert args.msda_prob == pytest.approx(0.5) and args.msda_alpha == pytest.approx(1.0)


def lr_at(args, epoch: int, updates_per_epoch: int = 8) -> float:
    """lr of the second optimizer step of 0-based ``epoch``, scheduled the way train.py does it."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=args.lr, momentum=args.momentum, nesterov=True)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    scheduler.step_update(epoch * updates_per_epoch + 1)
    return optimizer.param_groups[0]['lr']


@pytest.mark.parametrize('path, plateaus', [
    # docs/methods/mixmo.md §5.1, CIFAR b = 4 (1-based epochs):
    # 0.0125 (1-100), 1.25e-3 (101-200), 1.25e-4 (201-225), 1.25e-5 (226-300)
    (CONFIGS / 'cifar100' / 'cut_mixmo.yaml', [(2, 100, 1.0), (101, 200, 0.1), (201, 225, 0.01), (226, 300, 1e-3)]),
    (CONFIGS / 'cifar10' / 'vanilla.yaml', [(2, 100, 1.0), (101, 200, 0.1), (201, 225, 0.01), (226, 300, 1e-3)]),
    # docs/methods/mixmo.md §5.1, Tiny ImageNet b = 4 (1-based epochs): 0.05 (1-599), 5e-3 (600-899), 5e-4 (900-1200)
    (CONFIGS / 'tiny_imagenet' / 'w3_cut_mixmo.yaml', [(2, 599, 1.0), (600, 899, 0.1), (900, 1200, 0.01)]),
], ids=['cifar100-b4', 'cifar10-b1', 'tiny-b4'])
def test_multistep_lr_matches_paper_epochs(path, plateaus):
    args = train.parse_args(['-c', str(path)])
    for first, last, factor in plateaus:        # 1-based epochs, inclusive
        for epoch1 in (first, last):
            assert lr_at(args, epoch1 - 1) == pytest.approx(args.lr * factor), \
                f'{path.name}: 1-based epoch {epoch1} should run at lr x {factor}'
    # the first epoch is the linear warmup from ~0
    assert lr_at(args, 0) < args.lr / 2


def test_fast_gpu_recipe():
    path = CONFIGS / 'cifar10' / 'fast_gpu.yaml'
    config, args = load(path), train.parse_args(['-c', str(path)])
    assert args.model in ('wrn16_8_mixmo2', 'wrn28_10_mixmo2')
    assert args.mix_mode == 'cut' and args.mix_prob == pytest.approx(0.5)
    assert args.mix_alpha == 2 and args.weight_root == 3
    assert args.batch_repeat == 2 and args.batch_size == 256
    # linear scaling: lr 0.1 per 128 unique images per step (the paper's 0.1 / (2 b) at B = 64)
    assert args.lr == pytest.approx(0.1 * (args.batch_size / args.batch_repeat) / 128)
    assert args.sched == 'cosine' and args.warmup_epochs == 1 and 30 <= args.epochs <= 60
    assert args.amp and args.amp_dtype == 'bfloat16' and args.channels_last and args.workers == 8
    assert args.dataset == 'cifar10-zip' and 'data_dir' not in config and args.data_dir is None
    assert 'untested' in path.read_text().lower()


def test_time_to_accuracy_recipe():
    """Issue 7's recipe: Cut-MixMo with every fast setting on, the same lr rule as fast_gpu.yaml."""
    path = CONFIGS / 'cifar10' / 'time_to_accuracy.yaml'
    args = train.parse_args(['-c', str(path)])
    assert args.model == 'wrn16_8_mixmo2' and args.mix_mode == 'cut' and args.batch_repeat == 2
    assert args.lr == pytest.approx(0.1 * (args.batch_size / args.batch_repeat) / 128)
    assert args.device_data == 'on' and args.amp and args.amp_dtype == 'bfloat16' and args.channels_last
    assert args.torchcompile == 'inductor' and args.fused_opt is True
    assert args.dataset == 'cifar10-zip' and args.sched == 'cosine' and args.epochs * args.batch_size <= 40 * 512
    # the vanilla comparison of bench/time_to_accuracy.py: b = 1, the same unique images per step
    vanilla = train.parse_args(['-c', str(path), '--model', 'wrn16_8', '--batch-repeat', '1',
                                '-b', str(args.batch_size // args.batch_repeat)])
    assert vanilla.batch_size // vanilla.batch_repeat == args.batch_size // args.batch_repeat
    assert 'untested on a gpu' in path.read_text().lower()


def test_digits_main_job():
    path = CONFIGS / 'digits_mixmo.yaml'
    config = load(path)
    assert config == dict(model='wrn16_2_mixmo2', img_size=16, epochs=20, batch_size=32, batch_repeat=2, lr=0.1,
                          mix_mode='cut')
    args = train.parse_args(['-c', str(path)])
    assert args.dataset == '' and args.data_dir is None  # the embedded digits
    assert args.experiment == ''                          # a new dated folder per run
    assert args.aug is None                               # the digits' own default: crop without flip
    text = path.read_text()
    measured = re.search(r'measured: (\d+ min \d+ s[^)\n]*)', text)
    assert measured and '2 CPU cores' in text
    # docs/results.md quotes the same measurement
    assert f'measured: {measured.group(1)}' in (REPO / 'docs' / 'results.md').read_text()


def test_command_line_overrides_config():
    path = CONFIGS / 'cifar100' / 'cut_mixmo.yaml'
    args = train.parse_args(['-c', str(path), '--epochs', '3', '-b', '128'])
    assert args.epochs == 3 and args.batch_size == 128 and args.lr == pytest.approx(0.0125)
    # every speed setting a config turns on can be turned off again on the command line
    fast = CONFIGS / 'cifar10' / 'time_to_accuracy.yaml'
    args = train.parse_args(['-c', str(fast), '--no-amp', '--no-channels-last', '--torchcompile', 'none',
                             '--no-fused-opt', '--device-data', 'off'])
    assert not args.amp and not args.channels_last and args.torchcompile is None and args.fused_opt is False
    assert args.device_data == 'off'


def test_readme_lists_every_config():
    readme = (CONFIGS / 'README.md').read_text()
    for path in ALL:
        rel = path.relative_to(CONFIGS).as_posix()
        assert rel in readme, f'configs/README.md does not mention {rel}'


@pytest.mark.parametrize('model', ['cait_xxs_mixvit2', 'cait_xxs_mixvit1'])
def test_mixvit_recipe_is_the_same_for_the_model_and_its_baseline(model):
    """docs/methods/mixvit.md §5: AdamW, cosine with warmup, timm augmentation, the same for M = 2 and M = 1."""
    path = MIXVIT_FILES[0]
    args = train.parse_args(['-c', str(path), '--model', model])
    assert args.model == model and timm.is_model(model)
    assert (args.opt, args.sched) == ('adamw', 'cosine') and args.warmup_epochs > 0
    assert args.weight_decay == 0.05 and args.lr == 1.0e-3 and args.batch_size == 128
    assert args.aa.startswith('rand-') and args.reprob > 0 and args.smoothing == 0.1
    assert args.mix_mode == 'box' and args.weight_root == 3.0 and args.mix_alpha == 2.0


@pytest.mark.parametrize('path', AUTOMIX_FILES, ids=lambda p: p.name)
def test_automix_reference_recipe(path):
    """docs/methods/automix.md §7, CIFAR-100 ResNet-18: SGD (momentum 0.9, no Nesterov) lr 0.1, wd 1e-4 on every
    parameter, cosine to min_lr 0.05, batch 100, 400 epochs, 4 px reflect-padded crop + flip."""
    args = train.parse_args(['-c', str(path)])
    assert args.dataset == 'torch/cifar100' and args.num_classes == 100
    assert args.model == 'preactresnet18' and args.batch_size == 100 and args.batch_repeat == 1
    assert args.opt == 'momentum' and args.momentum == 0.9  # timm's 'momentum' = SGD without Nesterov
    assert args.lr == pytest.approx(0.1) and args.weight_decay == pytest.approx(1e-4) and args.wd_all
    assert args.sched == 'cosine' and args.min_lr == pytest.approx(0.05) and args.warmup_epochs == 0
    assert args.epochs == 400 and args.aug == 'reflect-crop-flip'
    if path.stem.endswith('automix'):
        assert args.msda == 'automix' and args.automix_alpha == 2 and args.mixblock_lr == pytest.approx(0.1)
        assert (args.automix_mask_loss, args.automix_margin, args.automix_lam_margin) == (0.1, 0.1, 0.08)
        assert (args.automix_momentum, args.automix_momentum_end, args.automix_momentum_start) == \
            (0.999, 0.999999, 0.1)
        assert args.automix_stage == -2  # stage 3 of 4 (256 channels), the Mix Block input of the reference
    else:
        assert args.msda == 'mixup' and args.msda_prob == 1.0 and args.msda_alpha == 1.0
    # the pair differs in the mixing only
    other = AUTOMIX_FILES[1 - AUTOMIX_FILES.index(path)]
    mine, theirs = load(path), load(other)
    mixing = {k for k in set(mine) | set(theirs) if k.startswith(('msda', 'automix', 'mixblock'))}
    assert {k: v for k, v in mine.items() if k not in mixing} == {k: v for k, v in theirs.items() if k not in mixing}


def test_the_mixvit_imagenet_recipe_is_deits():
    """docs/methods/mixvit.md §5: AdamW, lr 5e-4 x B / 512, weight decay 0.05, cosine, 5 warm-up epochs, 300
    epochs, RandAugment m9-mstd0.5, random erasing 0.25, smoothing 0.1, stochastic depth 0.05 for XXS; DeiT's
    per-image transforms (timm's names and values); the baseline under the same recipe."""
    path = IMAGENET_FILES[0]
    config = load(path)
    args = train.parse_args(['-c', str(path)])
    assert args.model == 'cait_xxs_mixvit2' and args.img_size == 224 and args.num_classes == 1000
    assert (args.opt, args.sched, args.weight_decay) == ('adamw', 'cosine', 0.05)
    assert args.lr == pytest.approx(5e-4 * args.batch_size / 512) and args.batch_repeat == 1
    assert args.warmup_epochs == 5 and args.epochs == 300 and args.drop_path == 0.05
    assert args.aa.startswith('rand-m9-mstd0.5-inc1') and args.reprob == 0.25 and args.smoothing == 0.1
    assert args.mix_mode == 'box' and args.mix_alpha == 2.0 and args.weight_root == 3.0
    assert args.msda == 'cutmix' and args.msda_alpha == 1.0 and args.aug == 'timm'
    assert (config['scale'], config['hflip'], config['vflip'], config['train_interpolation']) == \
        ([0.08, 1.0], 0.5, 0.0, 'bicubic')
    assert config['crop_pct'] == 0.875 and config['mean'] == [0.485, 0.456, 0.406]
    assert train.parse_args(['-c', str(path), '--model', 'cait_xxs_mixvit1']).lr == args.lr


def test_the_automix_imagenet_rows_differ_in_epochs_only():
    """docs/methods/automix.md §7, §9: ResNet-18, SGD lr 0.1, wd 1e-4, batch 256, cosine to 0, Mix Block on stage
    3 with lambda concatenated, momentum-encoder end 0.99999; 100 epochs (70.50 %) and 300 (72.05 %)."""
    short, long = (load(path) for path in IMAGENET_FILES[1:])
    assert (short.pop('epochs'), long.pop('epochs')) == (100, 300) and short == long
    args = train.parse_args(['-c', str(IMAGENET_FILES[1])])
    assert args.model == 'resnet18' and args.img_size == 224 and args.batch_size == 256
    assert (args.opt, args.momentum, args.lr, args.weight_decay) == ('momentum', 0.9, 0.1, 1e-4)
    assert args.sched == 'cosine' and args.min_lr == 0 and args.warmup_epochs == 0
    assert args.msda == 'automix' and args.automix_lam_concat and args.automix_stage == -2
    assert args.automix_momentum_end == 0.99999 and args.mixblock_lr == 0.1
    assert short['color_jitter'] == 0.0 and short['train_interpolation'] == 'bilinear' and 'aa' not in short


def test_the_tiny_imagenet_hfds_recipe_is_the_folder_ones_with_other_data_keys():
    data_keys = {'dataset', 'data_dir', 'train_split', 'val_split', 'val_per_class'}
    hfds, folder = load(TINY_HFDS), load(CONFIGS / 'tiny_imagenet' / 'w1_cut_mixmo.yaml')
    assert {k: v for k, v in hfds.items() if k not in data_keys} == \
        {k: v for k, v in folder.items() if k not in data_keys}
    assert hfds['dataset'] == 'hfds/zh-plus/tiny-imagenet' and (hfds['train_split'], hfds['val_split']) == \
        ('train', 'valid')
