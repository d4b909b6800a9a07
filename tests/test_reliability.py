"""Faults and bad input, tried as a careless or hostile user would (issue "Trust"): nothing we read back runs
code, nothing non-finite is saved, no two runs share a folder, every bad input is one line with exit code 2
and leaves nothing half-made. docs/reliability.md lists each case and what the user sees."""
import json
import os
import pickle
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train import FAST, REPO, final_weights, run, start, wait_for

from timm_mimo import rundir

sys.path.insert(0, str(REPO))
import train  # noqa: E402

TINY = [*FAST, '--limit-train-batches', 2]


def one_line_error(code, err, *needles):
    """Exit code 2 and one `error:` line, the last one (log lines of a run that had started may precede it),
    no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert lines[-1].startswith('error: ') and sum(line.startswith('error: ') for line in lines) == 1, err
    assert 'Traceback' not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# ------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no folder left behind (in-process: every case fails before any training)

def _config(tmp_path, text):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    return ['-c', str(path)]


@pytest.mark.parametrize('make_args,needle', [
    (lambda p: ['--epochs', '0'], '--epochs must be >= 1'),
    (lambda p: ['--epochs', '-3'], '--epochs must be >= 1'),
    (lambda p: ['--batch-repeat', '0'], '--batch-repeat must be >= 1'),
    (lambda p: ['--grad-accum-steps', '0'], '--grad-accum-steps must be >= 1'),
    (lambda p: ['--lr', 'nan'], '--lr must be a finite number'),
    (lambda p: ['--lr', 'inf'], '--lr must be a finite number'),
    (lambda p: ['--eval-metric', 'accuracy'], "unknown --eval-metric 'accuracy'"),
    (lambda p: _config(p, 'model: [unclosed\n'), 'is not valid YAML'),
    (lambda p: _config(p, '- model\n- wrn16_2\n'), 'must be a mapping of flag names to values, not a list'),
    (lambda p: _config(p, '42\n'), 'not a int'),
    (lambda p: _config(p, 'batch_size: abc\n'), 'batch_size must be int'),
    (lambda p: _config(p, 'batch_size: 1.5\n'), 'batch_size must be an integer'),
    (lambda p: _config(p, 'amp: maybe\n'), 'amp must be true or false'),
    (lambda p: _config(p, 'mix_mode: diagonal\n'), 'mix_mode must be one of'),
    (lambda p: _config(p, 'lr: [0.1, 0.2]\n'), 'lr takes one value'),
])
def test_bad_arguments_and_configs_are_one_line_errors_before_anything_is_made(make_args, needle, tmp_path, capsys):
    out = tmp_path / 'out'
    code = train.cli([*make_args(tmp_path), '--output', str(out), '--experiment', 'x'])
    one_line_error(code, capsys.readouterr().err, needle)
    assert not out.exists()


def test_yaml_words_for_off_mean_off(tmp_path):
    for word in ('"no"', '"false"', 'off', 'no', '"0"'):
        args = train.parse_args(_config(tmp_path, f'amp: {word}\nchannels_last: {word}\n'))
        assert args.amp is False and args.channels_last is False, word
    assert train.parse_args(_config(tmp_path, 'amp: "yes"\n')).amp is True


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / 'taken').write_text('mine')
    code = train.cli(['--output', str(tmp_path), '--experiment', 'taken'])
    one_line_error(code, capsys.readouterr().err, 'is not a folder')
    assert (tmp_path / 'taken').read_text() == 'mine'


def test_complete_checkpoints_only_by_a_rule_a_half_written_folder_cannot_meet(tmp_path):
    def checkpoint(name, epoch, state=True):
        folder = tmp_path / name
        (folder / rundir.TRAINING_STATE_DIR).mkdir(parents=True)
        (folder / rundir.WEIGHTS_FILE).write_bytes(b'w')
        if state:
            (folder / rundir.STATE_FILE).write_text(json.dumps(dict(epoch=epoch, step=0)))
        return folder
    good = checkpoint('checkpoint-0001', 1)
    checkpoint('checkpoint-0002.tmp', 2)          # renamed by hand, or an older tool's temporary name
    checkpoint('.checkpoint-0003.tmp', 3)         # our temporary name
    checkpoint('checkpoint-0004', 4, state=False)  # no trainer state: not finished
    (tmp_path / 'checkpoint-0005').mkdir()         # empty
    assert rundir.complete_checkpoints(tmp_path) == [good]
    assert rundir.resolve_resume(tmp_path) == (tmp_path, good)


def test_a_failed_folder_write_leaves_nothing_under_either_name(tmp_path):
    final = tmp_path / 'best'
    final.mkdir()
    (final / 'model.safetensors').write_text('old and good')
    with pytest.raises(OSError):
        with rundir.atomic_dir(final) as tmp:
            (tmp / 'model.safetensors').write_text('half')
            raise OSError(28, 'No space left on device')
    assert (final / 'model.safetensors').read_text() == 'old and good'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best']


def test_leftovers_of_interrupted_swaps_are_removed(tmp_path):
    for name in ('best.old', '.best.tmp-abc', '.checkpoint-0002.tmp', '.summary.csv.tmp-x'):
        (tmp_path / name).mkdir() if 'csv' not in name else (tmp_path / name).write_text('x')
    (tmp_path / 'best').mkdir()
    (tmp_path / 'notes.old.txt').write_text('a user file')
    assert sorted(rundir.remove_leftovers(tmp_path)) == sorted(
        ['best.old', '.best.tmp-abc', '.checkpoint-0002.tmp', '.summary.csv.tmp-x'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best', 'notes.old.txt']


def test_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        rundir.write_atomic(tmp_path / 'a.txt', 'x')
        with rundir.atomic_dir(tmp_path / 'folder') as tmp:
            (tmp / 'w.bin').write_bytes(b'1')
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'a.txt').stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / 'folder').stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / 'folder' / 'w.bin').stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------------
# runs: code in a checkpoint, non-finite weights, two runs, a stub folder, resume records

@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
    """One finished epoch of a run with --model-ema (its EMA model lives in the checkpoint)."""
    out = tmp_path_factory.mktemp('short')
    run('train.py', *TINY, '--model-ema', '--epochs', 1, '--output', out, '--experiment', 'r')
    return out / 'r'


class _WritesAFile:
    """Unpickling this creates ``path``: what a crafted checkpoint file could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), 'w'))


def test_resume_refuses_a_training_state_file_that_would_run_code(short_run, tmp_path):
    run_copy = tmp_path / 'r'
    import shutil
    shutil.copytree(short_run, run_copy)
    [checkpoint] = rundir.complete_checkpoints(run_copy)
    assert (checkpoint / rundir.EXTRA_WEIGHTS_FILE).exists()  # the EMA copy: tensors, not a pickle
    marker = tmp_path / 'pwned'
    with open(checkpoint / rundir.TRAINING_STATE_DIR / 'custom_checkpoint_0.pkl', 'wb') as f:
        pickle.dump(_WritesAFile(marker), f)
    proc = run('train.py', '--resume', run_copy, '--epochs', 2, check=False)
    one_line_error(proc.returncode, proc.stderr, 'refusing to resume from', 'custom_checkpoint_0.pkl')
    assert not marker.exists()


def test_resume_with_a_changed_recipe_is_recorded_and_fewer_epochs_than_done_refused(short_run, tmp_path):
    import shutil
    run_copy = tmp_path / 'r'
    shutil.copytree(short_run, run_copy)
    results = (run_copy / rundir.RESULTS_FILE).read_text()
    proc = run('train.py', '--resume', run_copy, '--epochs', 0, check=False)
    one_line_error(proc.returncode, proc.stderr, '--epochs must be >= 1')
    proc = run('train.py', '--resume', run_copy, '--epochs', 2, '--lr', 0.01)
    assert 'changed recipe' in proc.stderr + proc.stdout
    [entry] = yaml.safe_load((run_copy / rundir.RESUMES_FILE).read_text())
    assert entry['from'] == 'checkpoint-0001' and any('--lr 0.01 (was 0.05)' in c for c in entry['changes'])
    assert json.loads((run_copy / rundir.RESULTS_FILE).read_text())['epochs'] == 2
    results = (run_copy / rundir.RESULTS_FILE).read_text()
    proc = run('train.py', '--resume', run_copy, '--epochs', 1, check=False)
    one_line_error(proc.returncode, proc.stderr, 'has trained 2 epochs already')
    assert (run_copy / rundir.RESULTS_FILE).read_text() == results


def test_diverged_weights_are_never_saved_as_a_checkpoint_or_best(tmp_path):
    # one step per epoch at an absurd lr: the loss of a step is finite, the update after it is not
    proc = run('train.py', *FAST, '--limit-train-batches', 1, '--epochs', 4, '--lr', '1e30',
               '--output', tmp_path, '--experiment', 'd', check=False)
    assert proc.returncode == 1 and 'not finite' in proc.stderr, proc.stderr
    named = proc.stderr.strip().rsplit('Last good checkpoint (finite weights): ', 1)[1].strip()
    folders = [*(tmp_path / 'd').glob('checkpoint-*'), *(tmp_path / 'd').glob('best')]
    assert named == 'none' or Path(named) in folders
    for folder in folders:  # whatever was saved is finite
        weights = load_file(str(folder / 'model.safetensors'))
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), folder


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_run_stays_resumable(tmp_path):
    # long enough to outlive two start-ups of a second train.py, even on an idle machine
    args = [*FAST, '--epochs', 60, '--limit-train-batches', 6, '--output', tmp_path, '--experiment', 'both']
    first = start('train.py', *args)
    wait_for('args.yaml', tmp_path / 'both', first)
    second = run('train.py', *args, check=False)  # before or after the first's first checkpoint
    assert second.returncode == 2 and ('is in use by another train.py' in second.stderr or 'exists and is not empty'
                                       in second.stderr), second.stderr
    wait_for('checkpoint-*', tmp_path / 'both', first)
    second = run('train.py', '--resume', tmp_path / 'both', check=False)
    one_line_error(second.returncode, second.stderr, 'is in use by another train.py')
    assert first.poll() is None, 'the first run is still training'
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the kernel released the dead run's lock: it resumes (shortened to its next epoch)
    done = rundir.read_trainer_state(rundir.complete_checkpoints(tmp_path / 'both')[-1])['epoch']
    run('train.py', '--resume', tmp_path / 'both', '--epochs', done + 1)
    assert (tmp_path / 'both' / rundir.RESULTS_FILE).exists()


def test_a_folder_left_before_the_first_checkpoint_is_started_again(tmp_path):
    stub = tmp_path / 'stub'
    stub.mkdir()
    (stub / rundir.ARGS_FILE).write_text(yaml.safe_dump(dict(model='wrn16_2_mixmo2')))
    (stub / '.best.tmp-abc').mkdir()
    run('train.py', *TINY, '--epochs', 1, '--output', tmp_path, '--experiment', 'stub')
    assert (stub / rundir.RESULTS_FILE).exists() and not (stub / '.best.tmp-abc').exists()


def test_a_damaged_training_state_is_one_line(short_run, tmp_path):
    import shutil
    run_copy = tmp_path / 'r'
    shutil.copytree(short_run, run_copy)
    [checkpoint] = rundir.complete_checkpoints(run_copy)
    (checkpoint / rundir.TRAINING_STATE_DIR / 'model.safetensors').write_bytes(b'')
    proc = run('train.py', '--resume', run_copy, '--epochs', 2, check=False)
    one_line_error(proc.returncode, proc.stderr, 'cannot resume from', 'damaged')


def test_best_weights_follow_the_umask(short_run):
    assert stat.S_IMODE((short_run / rundir.BEST_DIR).stat().st_mode) == 0o777 & ~_umask()
    assert stat.S_IMODE((short_run / rundir.BEST_DIR / rundir.WEIGHTS_FILE).stat().st_mode) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ema_checkpoint_resumes_to_the_same_ema_weights(short_run, tmp_path):
    import shutil
    run_copy = tmp_path / 'r'
    shutil.copytree(short_run, run_copy)
    [checkpoint] = rundir.complete_checkpoints(run_copy)
    saved = load_file(str(checkpoint / rundir.EXTRA_WEIGHTS_FILE))
    ema = load_file(str(run_copy / rundir.EMA_DIR / rundir.WEIGHTS_FILE))
    assert all(k.startswith('ema.module.') for k in saved)
    assert all((saved[f'ema.module.{k}'] == v).all() for k, v in ema.items())


def test_ema_added_on_resume_starts_from_the_resumed_weights(tmp_path):
    """A run trained without --model-ema, resumed with it: the EMA starts from the checkpoint's weights (as
    timm's train.py builds its EMA after loading), not from the weights the model had before the load."""
    run('train.py', *TINY, '--epochs', 1, '--output', tmp_path, '--experiment', 'plain')
    folder = tmp_path / 'plain'
    [checkpoint] = rundir.complete_checkpoints(folder)
    resumed = load_file(str(checkpoint / rundir.WEIGHTS_FILE))
    run('train.py', '--resume', folder, '--epochs', 2, '--model-ema')
    ema = load_file(str(folder / rundir.EMA_DIR / rundir.WEIGHTS_FILE))
    trained = final_weights(folder)

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).norm()) for k in a if a[k].is_floating_point())
    # decay 0.9998 over 2 steps: the EMA has barely left the resumed weights, while the model moved on
    assert distance(ema, resumed) < 0.05 * distance(trained, resumed)


def test_a_best_newer_than_the_checkpoint_stays_the_best_on_resume(tmp_path):
    """Killed after best/ of epoch 1 was written and before checkpoint-0002: the resume replays epoch 1 from
    checkpoint-0001, keeps best/ as the best so far (its epoch and metric) and overwrites it only if the
    replay does better, so results.json's best epoch is the epoch of the weights best/ holds."""
    import shutil
    run('train.py', *TINY, '--epochs', 2, '--checkpoint-hist', 2, '--output', tmp_path, '--experiment', 'k')
    folder = tmp_path / 'k'
    shutil.rmtree(rundir.complete_checkpoints(folder)[-1])
    (folder / rundir.RESULTS_FILE).unlink()
    best_metrics = folder / rundir.BEST_DIR / rundir.METRICS_FILE
    lost = json.loads(best_metrics.read_text())
    lost.update(epoch=1, validation=dict(lost['validation'], top1=100.0))  # the lost attempt: unbeatable
    best_metrics.write_text(json.dumps(lost))
    proc = run('train.py', '--resume', folder)
    assert 'newer than the checkpoint' in proc.stderr + proc.stdout
    assert json.loads(best_metrics.read_text())['validation']['top1'] == 100.0  # not overwritten by the replay
    assert json.loads((folder / rundir.RESULTS_FILE).read_text())['best']['epoch'] == 1


# ------------------------------------------------------------------------------------------------------
# validate.py and hub/

def test_validate_results_to_an_unwritable_place_is_one_line(short_run, tmp_path):
    (tmp_path / 'file').write_text('x')
    proc = run('validate.py', short_run, '--results-file', tmp_path / 'file' / 'r.json', check=False)
    one_line_error(proc.returncode, proc.stderr, 'is a file, not a folder')
    assert proc.stderr.strip().count('\n') == 0  # refused before the evaluation


def test_export_refuses_a_symlink_and_a_runs_own_checkpoint(short_run, tmp_path):
    import shutil
    run_copy = tmp_path / 'r'
    shutil.copytree(short_run, run_copy)
    (tmp_path / 'target').mkdir()
    (tmp_path / 'link').symlink_to(tmp_path / 'target')
    proc = run('hub/export.py', run_copy, tmp_path / 'link', check=False)
    one_line_error(proc.returncode, proc.stderr, 'symbolic link')
    [checkpoint] = rundir.complete_checkpoints(run_copy)
    proc = run('hub/export.py', run_copy, checkpoint, '--overwrite', check=False)
    one_line_error(proc.returncode, proc.stderr, 'part of a training run')
    assert rundir.complete_checkpoints(run_copy) == [checkpoint]
    assert (checkpoint / rundir.TRAINING_STATE_DIR).is_dir()


# ------------------------------------------------------------------------------------------------------
# a test split only where the data set has one

def _image_folder(root: Path, classes=('a', 'b'), per_class=4):
    from PIL import Image
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (8, 8), (40 * k + i, 0, 0)).save(root / name / f'{i}.png')


def test_an_image_folder_without_split_folders_has_no_test_split(tmp_path):
    from timm_mimo.data.splits import build_splits
    _image_folder(tmp_path / 'flat')
    splits = build_splits('', str(tmp_path / 'flat'), img_size=8, val_per_class=1)
    assert splits.test is None and splits.test_source is None and 'no test split' in splits.description
    _image_folder(tmp_path / 'split' / 'train')
    _image_folder(tmp_path / 'split' / 'validation', per_class=2)
    splits = build_splits('', str(tmp_path / 'split'), img_size=8, val_per_class=1)
    assert len(splits.test) == 4 and splits.test_source == str((tmp_path / 'split' / 'validation').resolve())
    assert splits.test_source in splits.description


def test_an_empty_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    code = train.cli(['--data-dir', str(tmp_path / 'empty'), '--epochs', '1', '--output', str(tmp_path / 'out')])
    one_line_error(code, capsys.readouterr().err, 'Found 0 images')
    assert not any((tmp_path / 'out').iterdir())  # the run's own folder was removed


def test_a_damaged_member_of_the_cifar_zip_is_named(tmp_path):
    import io
    import zipfile
    from PIL import Image
    from timm_mimo.data import CifarZipDataset
    path = tmp_path / 'train.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        for k, cls in enumerate(('airplane', 'automobile')):
            for i in range(3):
                buffer = io.BytesIO()
                Image.new('RGB', (32, 32), (k * 100, i, 0)).save(buffer, format='JPEG')
                zf.writestr(f'train/{cls}/{i:04d}.jpg', buffer.getvalue())
        zf.writestr('train/automobile/0003.jpg', b'not a jpeg')
    with pytest.raises(ValueError, match='member train/automobile/0003.jpg is damaged'):
        for split in ('train', 'validation'):
            data = CifarZipDataset(str(path), split=split, val_per_class=1)
            for i in range(len(data)):
                data[i]
