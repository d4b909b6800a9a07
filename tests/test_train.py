"""train.py and validate.py end to end on the embedded digits data: outputs, faults, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm
import timm_mimo  # noqa: F401
from timm_mimo import rundir
from timm_mimo.data import default_cifar10_zip

REPO = Path(__file__).resolve().parents[1]
# a small, fast run: WRN-16-2 with M = 2, 16 mixed samples per step (8 unique images x 2 repeats)
FAST = ['--model', 'wrn16_2_mixmo2', '-b', '16', '--batch-repeat', '2', '--lr', '0.05', '--seed', '7']


def run(script, *args, timeout=300, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def start(script, *args):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_weights(folder: Path):
    checkpoints = sorted(folder.glob('checkpoint-*'))
    return load_file(str(checkpoints[-1] / 'model.safetensors'))


def wait_for(path_glob, folder: Path, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(folder.glob(path_glob)):
            return
        if proc.poll() is not None:
            raise AssertionError(f'training ended before {path_glob} appeared:\n{proc.stdout.read()[-3000:]}')
        time.sleep(0.05)
    raise AssertionError(f'{path_glob} did not appear')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The reference run: 3 epochs of 12 steps, never interrupted."""
    out = tmp_path_factory.mktemp('runs')
    proc = run('train.py', *FAST, '--epochs', 3, '--limit-train-batches', 12, '--output', out, '--experiment', 'ref')
    return out / 'ref', proc


def test_training_writes_timm_style_outputs_and_reports_metrics(uninterrupted):
    folder, proc = uninterrupted
    assert 'accuracy' in proc.stdout and 'NLL' in proc.stdout and 'ECE' in proc.stdout
    for name in ('args.yaml', 'summary.csv', 'results.json', 'best/model.safetensors', 'best/config.json'):
        assert (folder / name).exists(), name
    header = (folder / 'summary.csv').read_text().splitlines()[0].split(',')
    for column in ('epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'eval_nll', 'eval_ece',
                   'eval_member0_top1', 'eval_member1_top1', 'train_img_s', 'epoch_time'):
        assert column in header
    assert len((folder / 'summary.csv').read_text().splitlines()) == 4
    results = json.loads((folder / 'results.json').read_text())
    assert set(results['best']) >= {'epoch', 'validation', 'test'} and results['last']['epoch'] == 2
    assert len(results['best']['test']['member_top1']) == 2
    # checkpoints are complete folders in timm's Hub format, only the newest kept (--checkpoint-hist 1)
    assert [p.name for p in folder.glob('checkpoint-*')] == ['checkpoint-0003']
    assert not list(folder.glob('.*tmp*'))
    config = json.loads((folder / 'best' / 'config.json').read_text())
    assert config['architecture'] == 'wrn16_2_mixmo2' and config['num_classes'] == 10


def test_saved_model_loads_with_timm_local_dir_and_validate(uninterrupted, tmp_path):
    folder, _ = uninterrupted
    model = timm.create_model(f'local-dir:{folder / "best"}', pretrained=True).eval()
    assert model.num_members == 2
    out = tmp_path / 'val.json'
    proc = run('validate.py', folder, '--results-file', out, '--reliability-png', tmp_path / 'rel.png',
               '--results-csv', tmp_path / 'val.csv', '--tempscale')
    assert 'top1' in proc.stdout
    results = json.loads(out.read_text())
    metrics = results['test']
    for key in ('top1', 'top5', 'nll', 'ece', 'brier', 'member_top1', 'ensemble_gain', 'disagreement',
                'ratio_errors', 'temperature', 'nll_calibrated', 'ece_calibrated'):
        assert key in metrics
    assert abs(metrics['top1'] - json.loads((folder / 'results.json').read_text())['best']['test']['top1']) < 1e-6
    assert (tmp_path / 'rel.png').read_bytes()[:4] == b'\x89PNG'
    # an existing result file is never overwritten without --overwrite
    again = run('validate.py', folder, '--results-file', out, check=False)
    assert again.returncode == 2 and 'exists' in again.stderr


def test_validate_any_timm_model_with_m_equal_one(tmp_path):
    from timm.models import save_for_hf
    model = timm.create_model('resnet10t', num_classes=10)
    save_for_hf(model, str(tmp_path / 'resnet'), safe_serialization=True)
    proc = run('validate.py', tmp_path / 'resnet', '--dataset', '', '--split', 'validation')
    assert 'members' in proc.stdout


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    args = [*FAST, '--epochs', 3, '--limit-train-batches', 12, '--output', tmp_path, '--experiment', 'killed']
    proc = start('train.py', *args)
    wait_for('checkpoint-0001', tmp_path / 'killed', proc)
    time.sleep(1.0)  # into epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'killed' / 'results.json').exists()
    run('train.py', *FAST, '--epochs', 3, '--limit-train-batches', 12, '--resume', tmp_path / 'killed')
    ours, theirs = final_weights(tmp_path / 'killed'), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize('signum,code', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_at_the_next_step_and_resume_matches(uninterrupted, tmp_path, signum, code):
    reference, _ = uninterrupted
    name = signal.Signals(signum).name
    args = [*FAST, '--epochs', 3, '--limit-train-batches', 12, '--output', tmp_path, '--experiment', 'term']
    proc = start('train.py', *args)
    before = ''
    while 'epoch 1 step 3/12' not in before:  # 3 steps into epoch 1 (a log line every 3 steps: 4 an epoch)
        line = proc.stdout.readline()
        assert line, before
        before += line
    proc.send_signal(signum)  # the step in flight is abandoned, the last completed one saved
    output, _ = proc.communicate(timeout=120)
    output = before + output
    assert proc.returncode == code, output
    assert name in output and f'--resume {tmp_path / "term"}' in output
    assert rundir.complete_checkpoints(tmp_path / 'term')[-1].name.startswith('checkpoint-0001-step'), output
    if signum == signal.SIGTERM:
        run('train.py', *FAST, '--epochs', 3, '--limit-train-batches', 12, '--resume', tmp_path / 'term')
    else:
        run('train.py', '--resume', tmp_path / 'term')  # the run's own arguments
    ours, theirs = final_weights(tmp_path / 'term'), final_weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the interrupted epoch's training loss covers the whole epoch, not only the steps after the resume
    assert summary_column(tmp_path / 'term', 'train_loss') == summary_column(reference, 'train_loss')


def summary_column(folder: Path, name: str):
    import csv
    with open(folder / 'summary.csv', newline='') as f:
        return [float(row[name]) for row in csv.DictReader(f)]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*FAST, '--epochs', 2, '--limit-train-batches', 3, '--output', tmp_path, '--experiment', 'nan']
    proc = start('train.py', *args)
    wait_for('checkpoint-0001', tmp_path / 'nan', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    good = load_file(str(tmp_path / 'nan' / 'checkpoint-0001' / 'model.safetensors'))
    # resuming with an absurd learning rate blows the weights up within a few steps
    bad = run('train.py', *args[:-4], '--lr', '1e30', '--resume', tmp_path / 'nan', check=False)
    assert bad.returncode == 1 and 'loss is' in bad.stderr and 'Last good checkpoint' in bad.stderr
    kept = load_file(str(tmp_path / 'nan' / 'checkpoint-0001' / 'model.safetensors'))
    assert all(torch.equal(good[k], kept[k]) for k in good)


@pytest.mark.parametrize('args,message', [
    (['--model', 'no_such_net'], 'unknown model'),
    (['--dataset', 'cifar10-zip', '--data-dir', '/does/not/exist.zip'], 'not found'),
    (['-b', '30', '--batch-repeat', '4'], 'not divisible'),
    (['--num-classes', '7'], 'does not match'),
])
def test_bad_training_input_gives_one_line_errors(args, message, tmp_path):
    proc = run('train.py', *args, '--epochs', 1, '--output', tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.strip().count('\n') == 0, proc.stderr


def test_unknown_config_key_and_existing_output(tmp_path):
    config = tmp_path / 'bad.yaml'
    config.write_text('model: wrn16_2_mixmo2\nlearning_rate: 0.1\n')
    proc = run('train.py', '-c', config, check=False)
    assert proc.returncode == 2 and 'unknown config key(s)' in proc.stderr and 'learning_rate' in proc.stderr
    (tmp_path / 'exp').mkdir()
    (tmp_path / 'exp' / 'summary.csv').write_text('keep me')
    proc = run('train.py', '--output', tmp_path, '--experiment', 'exp', check=False)
    assert proc.returncode == 2 and 'exists' in proc.stderr
    assert (tmp_path / 'exp' / 'summary.csv').read_text() == 'keep me'


def test_validate_rejects_truncated_and_mismatched_checkpoints(uninterrupted, tmp_path):
    folder, _ = uninterrupted
    weights = (folder / 'best' / 'model.safetensors').read_bytes()
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(weights[:len(weights) // 2])
    proc = run('validate.py', truncated, '--model', 'wrn16_2_mixmo2', '--num-classes', '10', '--dataset', '',
               check=False)
    assert proc.returncode == 2 and 'cannot read checkpoint' in proc.stderr
    proc = run('validate.py', folder / 'best' / 'model.safetensors', '--model', 'wrn16_4_mixmo2',
               '--num-classes', '10', '--dataset', '', check=False)
    assert proc.returncode == 2 and 'does not match' in proc.stderr


def test_two_processes_on_cpu_match_one_process_with_the_same_global_batch(tmp_path):
    """DDP through Accelerate (gloo on CPU): same global batch B = 32 (16 unique x 2), split over 2 processes.

    The runs are not bitwise equal (each process draws its own masks and BatchNorm sees half the batch),
    so the metrics are compared within a tolerance: last-epoch train loss within 5 % and validation NLL
    within 0.2 nats (measured here: 4.354 vs 4.358 and 2.09 vs 2.14 after 4 x 25 steps).
    """
    args = ['--model', 'wrn16_2_mixmo2', '-b', '32', '--batch-repeat', '2', '--lr', '0.1', '--epochs', '3',
            '--limit-train-batches', '20', '--output', str(tmp_path)]
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', 'train.py',
                          *args, '--experiment', 'two', '--log-with', 'tensorboard'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert '2 process(es) x 8 unique images' in two.stdout + two.stderr
    assert (two.stdout + two.stderr).count('best epoch') == 1, 'only the main process reports and writes'
    assert len(list((tmp_path / 'two' / 'trackers').glob('*/events.out.tfevents.*'))) == 1, 'the main process logs'
    run('train.py', *args, '--experiment', 'one')
    rows = {}
    for name in ('one', 'two'):
        lines = (tmp_path / name / 'summary.csv').read_text().splitlines()
        assert len(lines) == 4
        header = lines[0].split(',')
        rows[name] = dict(zip(header, lines[-1].split(',')))
    loss_one, loss_two = float(rows['one']['train_loss']), float(rows['two']['train_loss'])
    assert abs(loss_one - loss_two) / loss_one < 0.05
    assert abs(float(rows['one']['eval_nll']) - float(rows['two']['eval_nll'])) < 0.2


def test_channels_last_run_saves_contiguous_weights(tmp_path):
    """channels-last kernels are not contiguous; safetensors refuses them unless the save packs them."""
    run('train.py', *FAST, '--channels-last', '--epochs', 1, '--limit-train-batches', 2, '--output', tmp_path,
        '--experiment', 'cl')
    model = timm.create_model(f'local-dir:{tmp_path / "cl" / "best"}', pretrained=True)
    assert model.num_members == 2


def test_resume_with_another_architecture_is_refused(uninterrupted, tmp_path):
    import shutil
    folder, _ = uninterrupted
    copy = tmp_path / 'copy'
    shutil.copytree(folder, copy)
    proc = run('train.py', '--model', 'wrn16_4_mixmo2', '--resume', copy, check=False)
    assert proc.returncode == 2 and 'trained with --model wrn16_2_mixmo2' in proc.stderr


def test_ema_amp_run_and_validate_on_a_corruption_folder(tmp_path):
    """--model-ema and --amp (bf16 autocast on CPU) end to end, then validate.py --corruptions on a tiny
    CIFAR-C-style folder (uint8 N x 32 x 32 x 3 per corruption, 5 severities stacked, labels.npy)."""
    import numpy as np
    run('train.py', *FAST, '--model-ema', '--amp', '--epochs', 1, '--limit-train-batches', 3, '--output', tmp_path,
        '--experiment', 'ema')
    folder = tmp_path / 'ema'
    results = json.loads((folder / 'results.json').read_text())
    assert 'ema_validation' in results and (folder / 'ema' / 'model.safetensors').exists()
    assert 'ema_top1' in (folder / 'summary.csv').read_text().splitlines()[0]

    corrupted = tmp_path / 'CIFAR-10-C'
    corrupted.mkdir()
    rng = np.random.default_rng(0)
    per_severity = 4
    for name in ('gaussian_noise', 'fog'):
        np.save(corrupted / f'{name}.npy', rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8))
    np.save(corrupted / 'labels.npy', np.tile(np.arange(per_severity) % 10, 5).astype(np.int64))
    out = tmp_path / 'c.json'
    run('validate.py', folder, '--which', 'ema', '--corruptions', corrupted, '--results-file', out)
    c = json.loads(out.read_text())['corruptions']
    assert 0.0 <= c['top1'] <= 100.0 and 'nll' in c and 'ece' in c


def test_torchcompile_trains_like_eager(tmp_path):
    """--torchcompile (inductor on CPU): the same first-epoch loss as the eager run, to float tolerance."""
    args = ['--epochs', 1, '--limit-train-batches', 3, '-b', 16, '--output', tmp_path]
    eager = run('train.py', *args, '--experiment', 'eager')
    compiled = run('train.py', *args, '--experiment', 'compiled', '--torchcompile', timeout=600)
    assert 'training uncompiled' not in compiled.stdout + compiled.stderr, 'inductor compiled on this machine'

    def loss(proc):
        line = next(l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith('epoch 0: loss'))
        return float(line.split()[3])
    assert abs(loss(eager) - loss(compiled)) < 1e-3



def test_fast_settings_and_batched_erasing_end_to_end(tmp_path):
    """Fused SGD, batched random erasing and device-resident data in one run; each is recorded in results.json,
    and summary.csv's `elapsed` (wall time since train.py started) grows epoch by epoch and never exceeds the
    time the process took (it once re-added the saved total at every epoch end)."""
    started = time.time()
    run('train.py', *FAST, '--fused-opt', '--reprob', 0.5, '--device-data', 'on', '--epochs', 4,
        '--limit-train-batches', 2, '--output', tmp_path, '--experiment', 'fast')
    results = json.loads((tmp_path / 'fast' / 'results.json').read_text())
    assert results['speed'] == dict(distributed='no', mixed_precision='no', channels_last=False,
                                    torchcompile=None, fused_optimizer=True, device_data=True)
    lines = (tmp_path / 'fast' / 'summary.csv').read_text().splitlines()
    header = lines[0].split(',')
    elapsed = [float(dict(zip(header, line.split(',')))['elapsed']) for line in lines[1:]]
    assert 0 < elapsed[0] < elapsed[1] < elapsed[2] < elapsed[3] <= results['wall_time_s'] <= time.time() - started


def test_dataloader_path_resumes_after_sigkill_with_the_same_weights(tmp_path):
    """--device-data off (a DataLoader with per-image transforms, prepared by Accelerate): exact resume too."""
    args = [*FAST, '--device-data', 'off', '--epochs', 2, '--limit-train-batches', 8, '--output', tmp_path]
    run('train.py', *args, '--experiment', 'ref')
    proc = start('train.py', *args, '--experiment', 'killed')
    wait_for('checkpoint-0001', tmp_path / 'killed', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run('train.py', *FAST, '--device-data', 'off', '--epochs', 2, '--limit-train-batches', 8,
        '--resume', tmp_path / 'killed')
    ours, theirs = final_weights(tmp_path / 'killed'), final_weights(tmp_path / 'ref')
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / 'ref' / 'results.json').read_text())['speed']['device_data'] is False


@pytest.mark.skipif(not default_cifar10_zip().exists(), reason='CIFAR-10 zip of ../shared missing')
def test_device_data_on_refuses_per_image_augmentation(tmp_path):
    proc = run('train.py', '--dataset', 'cifar10-zip', '--aa', 'rand-m9-mstd0.5', '--device-data', 'on',
               '--epochs', 1, '--output', tmp_path, '--experiment', 'aa', check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
    assert '--device-data on' in proc.stderr and '--aa' in proc.stderr
    assert not (tmp_path / 'aa').exists()
