"""timm's optimizer and distributed flags (--layer-decay, --opt-betas, --opt-eps, --opt-kwargs, --sync-bn): from
the command line to the optimizer and the model, recorded with the run, bad values refused in one line."""
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import timm.scheduler
import torch
import yaml

import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo.train.args import parse_args, recipe_changes, run_settings
from timm_mimo.train.speed import optimizer_from_settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

FLAGS = ['--opt', 'adamw', '--opt-betas', '0.8', '0.95', '--opt-eps', '1e-6', '--opt-kwargs', 'amsgrad=true',
         '--layer-decay', '0.5']


def test_betas_eps_kwargs_and_layer_decay_reach_the_optimizer_and_the_schedule_scales_each_group(one_thread):
    optim = run_settings(parse_args(FLAGS + ['--lr', '0.1'])).optim
    model = timm.create_model('wrn16_2_mixmo2', num_classes=10)
    optimizer, _ = optimizer_from_settings(model, optim, torch.device('cpu'))
    groups = optimizer.param_groups
    assert all(g['betas'] == (0.8, 0.95) and g['eps'] == 1e-6 and g['amsgrad'] for g in groups)
    scales = sorted({g['lr_scale'] for g in groups}, reverse=True)
    assert scales == pytest.approx([0.5 ** k for k in range(len(scales))]) and len(scales) > 3
    head = {id(p) for p in model.get_classifier().parameters()}
    stem = {id(p) for name, p in model.named_parameters() if name.startswith('conv1')} or \
        {id(next(model.parameters()))}
    scale_of = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    assert {scale_of[i] for i in head} == {1.0} and {scale_of[i] for i in stem} == {scales[-1]}
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched='cosine', num_epochs=10, warmup_epochs=0,
                                                      step_on_epochs=False, updates_per_epoch=5)
    scheduler.step_update(10)
    lr = scheduler._get_lr(10)[0]
    assert all(g['lr'] == pytest.approx(lr * g['lr_scale']) for g in groups)


def test_without_the_flags_the_optimizer_keeps_its_own_defaults():
    optim = run_settings(parse_args(['--opt', 'adamw'])).optim
    optimizer, _ = optimizer_from_settings(torch.nn.Linear(2, 2), optim, torch.device('cpu'))
    group = optimizer.param_groups[0]
    assert group['betas'] == (0.9, 0.999) and group['eps'] == 1e-8 and 'lr_scale' not in group


@pytest.mark.parametrize('flags, message', [
    (['--layer-decay', '0'], '--layer-decay must be in (0, 1], got 0.0'),
    (['--layer-decay', '1.5'], '--layer-decay must be in (0, 1], got 1.5'),
    (['--opt-betas', '0.9', '1.0'], '--opt-betas takes one to three values in [0, 1), got 0.9 1.0'),
    (['--opt-eps', '0'], '--opt-eps must be a finite number > 0, got 0.0'),
    (['--opt-eps', 'nan'], '--opt-eps must be a finite number > 0, got nan'),
    (['--opt-kwargs', 'amsgrad'], "--opt-kwargs expects K=V, got 'amsgrad'"),
])
def test_bad_optimizer_flag_values_are_refused_when_parsed(flags, message):
    with pytest.raises(ValueError) as err:
        parse_args(flags)
    assert str(err.value) == message


@pytest.mark.parametrize('flags, message', [
    (['--opt', 'sgd', '--opt-betas', '0.9', '0.99'], "--opt-betas: optimizer 'sgd' takes no betas"),
    (['--opt', 'sgd', '--opt-eps', '1e-6'], "--opt-eps: optimizer 'sgd' takes no eps"),
    (['--opt', 'adamw', '--opt-betas', '0.9'], "--opt-betas: optimizer 'adamw' takes 2 betas, got 1"),
    (['--opt', 'adamw', '--opt-kwargs', 'nosuch=1'], "optimizer 'adamw': "),
])
def test_an_optimizer_argument_the_optimizer_would_drop_or_not_take_is_refused(flags, message):
    """timm drops betas and eps an optimizer does not take without a word; a flag that does nothing is refused."""
    optim = run_settings(parse_args(flags)).optim
    with pytest.raises(ValueError) as err:
        optimizer_from_settings(torch.nn.Linear(2, 2), optim, torch.device('cpu'))
    assert str(err.value).startswith(message)


def test_the_flags_reach_the_trained_optimizer_and_the_run_record(tmp_path, run_script, caplog):
    caplog.set_level(logging.INFO, logger='train')
    proc = run_script('train.py', '-b', '16', '--epochs', 1, '--limit-train-batches', 2, *FLAGS, '--sync-bn',
                      '--output', tmp_path, '--experiment', 'opt')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '--sync-bn: one process, nothing to synchronise' in caplog.text
    folder = tmp_path / 'opt'
    saved = yaml.safe_load((folder / 'args.yaml').read_text())
    assert (saved['opt_betas'], saved['opt_eps'], saved['opt_kwargs'], saved['layer_decay'], saved['sync_bn']) == \
        ([0.8, 0.95], 1e-6, ['amsgrad=true'], 0.5, True)
    state = torch.load(folder / 'checkpoint-0001' / 'state' / 'optimizer.bin', weights_only=True)
    groups = state['param_groups']
    assert all(g['betas'] == (0.8, 0.95) and g['eps'] == 1e-6 and g['amsgrad'] for g in groups)
    assert len({g['lr_scale'] for g in groups}) > 3


def test_a_resume_that_changes_an_optimizer_flag_is_a_recorded_recipe_change_and_trackers_are_not():
    saved = vars(parse_args(['--opt', 'adamw', '--opt-betas', '0.8', '0.95', '--log-with', 'tensorboard']))
    now = vars(parse_args(['--opt', 'adamw', '--opt-betas', '0.9', '0.95', '--layer-decay', '0.7']))
    assert sorted(recipe_changes(saved, now)) == ['--layer-decay 0.7 (was None)',
                                                  '--opt-betas [0.9, 0.95] (was [0.8, 0.95])']


def test_sync_bn_converts_every_batchnorm_keeping_timms_activation_only_with_several_processes():
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer='relu'))
    model[1].running_mean.fill_(0.5)
    gpu = torch.device('cuda')
    assert train.sync_batchnorm(model, True, SimpleNamespace(num_processes=1, device=gpu)) is model
    assert train.sync_batchnorm(model, False, SimpleNamespace(num_processes=2, device=gpu)) is model
    assert type(model[1]) is torch.nn.BatchNorm2d
    converted = train.sync_batchnorm(model, True, SimpleNamespace(num_processes=2, device=gpu))
    assert type(converted[1]) is torch.nn.SyncBatchNorm and torch.all(converted[1].running_mean == 0.5)
    assert type(converted[2]) is SyncBatchNormAct and isinstance(converted[2].act, torch.nn.ReLU)
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only, not on cpu"):
        train.sync_batchnorm(model, True, SimpleNamespace(num_processes=2, device=torch.device('cpu')))


def test_sync_bn_on_two_cpu_processes_is_refused_in_one_line_per_process_and_leaves_no_run_folder(tmp_path):
    """PyTorch's SyncBatchNorm has no CPU kernels (torch.batch_norm_stats is CUDA's): refused before training,
    not at the first forward pass."""
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', 'train.py',
                           '-b', '32', '--batch-repeat', '2', '--epochs', '1', '--limit-train-batches', '2',
                           '--sync-bn', '--output', str(tmp_path), '--experiment', 'sb'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert errors == ["error: --sync-bn: PyTorch's SyncBatchNorm runs on GPUs only, not on cpu"] * 2
    assert not (tmp_path / 'sb').exists()
