"""What train.py tells a newcomer before and after training: flag defaults, the image size and why, where the
data comes from, threads and busy cores, errors that name the cure, and the members in the final report."""
import logging
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import timm
import timm_mimo  # noqa: F401  (registers the models)
import train
from timm_mimo.data import create_dataset, native_img_size
from timm_mimo.models.factory import registered_cfg, resolve_img_size, unknown_model_error
from timm_mimo.eval.metrics import classification_metrics
from timm_mimo.train.run import RunState
from timm_mimo.train.speed import report_cpu_threads

REPO = Path(__file__).resolve().parents[1]


def test_help_shows_the_default_of_every_flag():
    parser = train.build_parser()
    # argparse prints a default only beside a help text: a flag without one shows none
    assert [a.dest for a in parser._actions if not a.help] == []
    formatter, actions = parser._get_formatter(), {a.dest: a for a in parser._actions}
    for dest, default in (('lr', '0.05'), ('epochs', '10'), ('momentum', '0.9'), ('weight_decay', '0.0005'),
                          ('min_lr', '0.0'), ('warmup_lr', '1e-05'), ('decay_rate', '0.1'), ('msda_prob', '0.5')):
        assert formatter._expand_help(actions[dest]).endswith(f'(default: {default})'), dest


@pytest.mark.parametrize('model,dataset,data_dir,size,why', [
    ('resnet18', '', None, 32, "data set's own size"),                  # registered 224: the digits are not upscaled
    ('preactresnet18', 'torch/cifar100', None, 32, "data set's own size"),  # registered 64 (Tiny ImageNet)
    ('wrn16_2_mixmo2', 'cifar10-zip', None, 32, "and the model's registered one"),
    ('vit_small_patch16_224', '', None, 224, 'built for its registered 224 px only'),
    ('cait_xxs_mixvit2', 'torch/cifar10', None, 32, 'built for its registered 32 px only'),
    ('resnet18', 'my-folder', 'images/', 224, 'no single size'),   # an image folder: its files decide
])
def test_a_model_that_takes_any_size_trains_at_the_data_sets_own_size(model, dataset, data_dir, size, why):
    kwargs = {}
    side, reason = resolve_img_size(registered_cfg(model, kwargs), kwargs, None, native_img_size(dataset, data_dir))
    assert side == size and why in reason, reason
    assert resolve_img_size(registered_cfg(model, kwargs), kwargs, 48, native_img_size(dataset, data_dir)) == \
        (48, 'asked for (--img-size, or img_size in a config)')


def test_a_plain_timm_cnn_on_the_digits_says_its_size_data_threads_and_trains_at_32_px(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(REPO / 'train.py'), '--model', 'resnet18', '-b', '16', '--epochs', '1',
                           '--limit-train-batches', '1', '--output', str(tmp_path), '--experiment', 'r18'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'image size 32 px: the data set\'s own size; the model takes any input size (registered at 224 px' in log
    assert 'no --dataset: training on the embedded digits' in log
    assert "the paper's settings for resnet18: -c configs/imagenet/automix_r18_100ep.yaml" in log  # AutoMix's row
    assert 'CPU: 1 thread(s) per process' in log
    config = (tmp_path / 'r18' / 'best' / 'config.json').read_text()
    assert re.search(r'"input_size": \[\s*3,\s*32,\s*32\s*\]', config), config


def test_without_a_dataset_one_line_names_the_config_of_the_papers_setting(caplog, monkeypatch):
    monkeypatch.chdir(REPO)
    caplog.set_level(logging.INFO, logger='train')
    for model in ('wrn28_10_mixmo2', 'wrn16_2_mixmo2', 'resnet34', 'resnet18'):
        train.say_where_the_data_comes_from(SimpleNamespace(dataset='', data_dir=None, model=model))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all('embedded digits' in line for line in lines)
    assert "the paper's settings for wrn28_10_mixmo2: -c configs/cifar10/cut_mixmo.yaml and 9 more" in lines[0]
    assert 'no config runs a paper setting for wrn16_2_mixmo2 (its recipes: configs/cifar10/cpu_scale.yaml, ' \
           'configs/digits_mixmo.yaml)' in lines[1]
    assert lines[2].endswith('no config runs a paper setting for resnet34; the paper rows: configs/README.md')
    assert lines[3].endswith("the paper's settings for resnet18: -c configs/imagenet/automix_r18_100ep.yaml and 1 "
                             "more (configs/README.md)")
    caplog.clear()
    train.say_where_the_data_comes_from(SimpleNamespace(dataset='cifar10-zip', data_dir=None, model='resnet18'))
    assert not caplog.records


def test_the_paper_rows_train_py_names_are_those_of_the_configs_table():
    # configs/README.md's table marks the other recipes "not a paper row"; train.py reads each file's first line
    from timm_mimo.train.args import _PAPER_ROW
    table = re.findall(r'^\| `([^`]+\.yaml)` \| ([^|]+) \|', (REPO / 'configs' / 'README.md').read_text(), re.M)
    assert len(table) >= 30
    for name, row in table:
        if name.startswith('accelerate/'):  # accelerate launch configs: no model, no row
            continue
        first_line = (REPO / 'configs' / name).read_text()
        assert bool(_PAPER_ROW.match(first_line)) == (not row.startswith('not a paper row')), name


@pytest.mark.parametrize('load,threads,launched,warning', [
    (1.9, 2, False, 'OMP_NUM_THREADS=1 (accelerate launch: --num_cpu_threads_per_process 1)'),
    (0.2, 2, False, None),             # idle cores: nothing to say
    (1.2, 1, False, None),             # one thread already: nothing to cure
    (0.2, 1, True, 'pass --num_cpu_threads_per_process 2'),
    (1.2, 1, True, None),              # launched with one thread, and one core is busy: one is right
    (9.0, 1, True, 'with one thread per process already, this run shares its core(s)'),
])
def test_busy_cores_warn_once_with_the_cure(load, threads, launched, warning, caplog, monkeypatch):
    monkeypatch.setattr(os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    if launched:
        monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'no')
    else:
        monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    caplog.set_level(logging.INFO, logger='timm_mimo.train.speed')
    report_cpu_threads(SimpleNamespace(device=torch.device('cpu'), is_main_process=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f'CPU: {threads} thread(s) per process' in caplog.text
    assert len(warnings) == (warning is not None) and (warning is None or warning in warnings[0]), warnings


def test_a_misspelt_model_name_suggests_the_nearest_registered_ones(tmp_path, capsys):
    assert 'did you mean wrn16_2_mixmo2' in str(unknown_model_error('wrn16_2_mixm2'))
    assert 'did you mean' not in str(unknown_model_error('qqqzzzxxx'))
    assert train.cli(['--model', 'wrn28_10_mixmo', '--output', str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and 'did you mean' in error and 'wrn28_10_mixmo2' in error, error
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_failed_download_says_so_and_how_to_use_local_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, 'Name or service not known'))
    monkeypatch.setattr(timm.data, 'create_dataset', offline)
    with pytest.raises(OSError, match=r'downloading torch/cifar10 into .* failed \(<urlopen error') as error:
        create_dataset('torch/cifar10', str(tmp_path), download=True)
    assert '--data-dir' in str(error.value) and 'cifar-10-batches-py' in str(error.value)
    with pytest.raises(urllib.error.URLError):  # no download asked: the library's own error stands
        create_dataset('torch/cifar10', str(tmp_path))


def test_a_missing_cifar_zip_names_data_dir_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_MIMO_CIFAR10_ZIP', str(tmp_path / 'absent.zip'))
    with pytest.raises(FileNotFoundError, match='--data-dir, or set TIMM_MIMO_CIFAR10_ZIP'):
        create_dataset('cifar10-zip', split='train')


def test_the_final_report_gives_every_members_nll_and_ece(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    members = torch.randn(60, 2, 10, generator=gen)
    labels = torch.randint(0, 10, (60,), generator=gen)
    metrics = classification_metrics(None, labels, members)
    run = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), state=RunState(best_epoch=3),
                          task=SimpleNamespace(deployed='model'), run_dir=tmp_path)
    train.report(run, dict(best=dict(test=metrics), test_split='a test split'))
    out = capsys.readouterr().out
    assert re.search(r'top-1\s+NLL\s+ECE', out)
    for k in range(2):
        assert re.search(rf'member {k}\s+{metrics["member_top1"][k]:.2f} %\s+{metrics["member_nll"][k]:.4f}\s+'
                         rf'{metrics["member_ece"][k]:.4f}', out), out
