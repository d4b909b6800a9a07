"""A run's life from start to stop, tried as a hostile or unlucky user would (issues "Trust, third pass" and
"First contact"): stop requests under a launcher, a full disk, files edited by hand, the lock. Each case ends
as the right result or one `error:` line, and never leaves a folder that neither a rerun nor --resume accepts.
docs/reliability.md lists each case."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from test_reliability import TINY, one_line_error
from test_train import FAST, REPO, run

from timm_mimo import rundir

sys.path.insert(0, str(REPO))
import train  # noqa: E402


# ------------------------------------------------------------------------------------------------------
# a stop request under `accelerate launch`, with a step longer than its grace period

# 8 steps: a log line every 2 (4 an epoch); dropout, so that the random state of an abandoned step matters
SLOW_RUN = [*FAST, '--drop', '0.2', '--epochs', 1, '--limit-train-batches', 8]


def test_ctrl_c_under_accelerate_launch_saves_the_last_completed_step_and_resumes_exactly(tmp_path):
    """accelerate launch answers Ctrl-C with SIGTERM to its child and SIGKILL 5 s later; a step here takes a
    minute. The step in flight is abandoned (its BatchNorm statistics and dropout draws undone) and the last
    completed one saved before the kill: the resumed run equals an uninterrupted one, bit for bit."""
    marker = tmp_path / 'slow-step-started'
    env = dict(os.environ, PYTHONUNBUFFERED='1', SLOW_STEP_FROM='2', SLOW_STEP_S='60',
               SLOW_STEP_MARKER=str(marker))
    launched = subprocess.Popen(
        [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1', '--num_machines', '1',
         '--mixed_precision', 'no', '--dynamo_backend', 'no', '--num_cpu_threads_per_process', '2',
         str(REPO / 'tests' / 'slow_step_train.py'),
         *map(str, SLOW_RUN), '--log-interval-s', '0.01', '--output', tmp_path, '--experiment', 'run'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert launched.poll() is None and time.time() < deadline, launched.communicate()[0]
            time.sleep(0.05)
        time.sleep(0.5)  # inside the slow step
        os.killpg(launched.pid, signal.SIGINT)  # Ctrl-C in a terminal: the launcher and its child both get it
        output, _ = launched.communicate(timeout=30)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
    folder = tmp_path / 'run'
    checkpoint = folder / 'checkpoint-0000-step000002'
    assert rundir.complete_checkpoints(folder) == [checkpoint], output
    assert 'saved' in output and f'--resume {folder}' in output, output
    assert not (folder / rundir.LOCK_FILE).exists()
    # progress under a launcher: the time limit logs step 1 (the step interval alone would log steps 2, 4, ...)
    assert 'epoch 0 step 1/8' in output and 'epoch 0 step 2/8' in output, output

    # on 2 threads, as test_train's run and the launch above: the same float sums, bit for bit
    run('train.py', '--resume', folder)
    run('train.py', *SLOW_RUN, '--output', tmp_path, '--experiment', 'reference')
    ours = load_file(str(folder / 'checkpoint-0001' / rundir.WEIGHTS_FILE))
    theirs = load_file(str(tmp_path / 'reference' / 'checkpoint-0001' / rundir.WEIGHTS_FILE))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r['train_loss'] for r in rundir.read_csv(folder / rundir.SUMMARY_FILE)] == \
        [r['train_loss'] for r in rundir.read_csv(tmp_path / 'reference' / rundir.SUMMARY_FILE)]


_STUCK = '''
import sys
from timm_mimo.cli import run_cli
from timm_mimo.train.run import StopRequest

def main(argv):
    stop = StopRequest()
    print('blocked', flush=True)
    open(sys.argv[1]).read()  # a named pipe nobody writes: blocks in the kernel, outside any step

sys.exit(run_cli(main, []))
'''


def test_a_second_sigterm_ends_a_process_that_cannot_reach_its_next_step(tmp_path):
    fifo = tmp_path / 'pipe'
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, '-c', _STUCK, str(fifo)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == 'blocked'
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, 'the first request waits for the next step'
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and 'SIGTERM again: stopping at once' in output, output


def test_a_launchers_sigterm_after_ctrl_c_is_the_same_request_and_a_second_ctrl_c_stops():
    from timm_mimo.train.run import StepAbandoned, StopRequest
    stop = StopRequest()
    try:
        stop(signal.SIGINT, None)
        stop(signal.SIGTERM, None)  # accelerate passing the Ctrl-C on: not a second request
        assert stop.signal == 'SIGINT'
        with pytest.raises(StepAbandoned):
            with stop.step_in_flight():  # a request received before a step abandons it as it starts
                pass
        with pytest.raises(KeyboardInterrupt):
            stop(signal.SIGINT, None)
    finally:
        stop.restore()


# ------------------------------------------------------------------------------------------------------
# a full disk, and a folder whose only progress is best/

_FULL_DISK = '''
import sys
from safetensors import SafetensorError
sys.path.insert(0, sys.argv[1])
import train
from timm_mimo import rundir

write_model_files = rundir.write_model_files

def full_for_checkpoints(model, folder, *args, **kwargs):
    if folder.name.startswith('.checkpoint-'):  # best/ fits; the checkpoint after it does not
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    return write_model_files(model, folder, *args, **kwargs)

rundir.write_model_files = full_for_checkpoints
sys.exit(train.cli(sys.argv[2:]))
'''


def test_a_full_disk_is_one_line_and_the_best_only_folder_it_leaves_resumes_in_place(tmp_path):
    """The disk fills between an epoch's best/ and its checkpoint (what a SIGKILL there leaves too): one
    `error:` line; the same command says to resume; --resume starts the run in place, keeping best/."""
    args = [*TINY, '--epochs', 1, '--output', tmp_path, '--experiment', 'full']
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    proc = subprocess.run([sys.executable, '-c', _FULL_DISK, str(REPO), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    one_line_error(proc.returncode, proc.stderr, 'cannot write', 'checkpoint-0001', 'No space left on device')
    folder = tmp_path / 'full'
    assert sorted(p.name for p in folder.iterdir()) == [rundir.ARGS_FILE, rundir.BEST_DIR, rundir.SUMMARY_FILE]
    proc = run('train.py', *args, check=False)
    one_line_error(proc.returncode, proc.stderr, f'use --resume {folder}')
    proc = run('train.py', '--resume', folder)
    assert f'{folder} holds no checkpoint yet: starting the run in place' in proc.stderr
    assert 'newer than the checkpoint: kept as the best so far' in proc.stderr
    assert rundir.complete_checkpoints(folder) == [folder / 'checkpoint-0001']
    assert json.loads((folder / rundir.RESULTS_FILE).read_text())['best']['epoch'] == 0
    assert not (folder / rundir.LOCK_FILE).exists()


def test_resume_of_a_folder_stopped_before_its_first_checkpoint_starts_it_in_place(tmp_path):
    """What Ctrl-C under accelerate launch used to leave (args.yaml and .lock): --resume is the way on."""
    run('train.py', *TINY, '--epochs', 1, '--output', tmp_path, '--experiment', 'ref')
    folder = tmp_path / 'stub'
    folder.mkdir()
    (folder / rundir.ARGS_FILE).write_text((tmp_path / 'ref' / rundir.ARGS_FILE).read_text())
    (folder / rundir.LOCK_FILE).write_text('12345')  # a dead run's (its flock went with it)
    proc = run('train.py', '--resume', folder)
    assert 'holds no checkpoint yet: starting the run in place' in proc.stderr
    ours = load_file(str(folder / 'checkpoint-0001' / rundir.WEIGHTS_FILE))
    theirs = load_file(str(tmp_path / 'ref' / 'checkpoint-0001' / rundir.WEIGHTS_FILE))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    (tmp_path / 'empty').mkdir()
    proc = run('train.py', '--resume', tmp_path / 'empty', check=False)
    one_line_error(proc.returncode, proc.stderr, 'nothing to resume', 'neither a training folder')


def test_a_failed_write_of_a_model_folder_is_one_oserror_naming_it(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    model = torch.nn.Linear(2, 2)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setattr(rundir, 'write_model_files', full)
    with pytest.raises(OSError, match=r'cannot write .*best: .*No space left on device \(os error 28\) \(.* MiB free'):
        rundir.save_model_folder(model, tmp_path / 'best', {})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------
# files read back: edited or crafted

@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """One finished epoch of 8 steps, run with --log-interval 50."""
    out = tmp_path_factory.mktemp('finished')
    proc = run('train.py', *FAST, '--epochs', 1, '--limit-train-batches', 8, '--output', out, '--experiment', 'r')
    return out / 'r', proc


def copy_of(finished, tmp_path) -> Path:
    import shutil
    shutil.copytree(finished[0], tmp_path / 'r')
    return tmp_path / 'r'


def test_progress_is_logged_at_least_four_times_an_epoch_and_the_lock_goes_with_the_run(finished):
    folder, proc = finished
    steps = [line.split('/')[0].rsplit(' ', 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith('epoch 0 step ')]
    assert steps == ['2', '4', '6', '8'], proc.stderr  # --log-interval 50 alone: step 8 only
    assert not (folder / rundir.LOCK_FILE).exists()


def test_a_refused_resume_records_nothing(finished, tmp_path, capsys):
    folder = copy_of(finished, tmp_path)
    code = train.cli(['--resume', str(folder), '--num-members', '3', '--epochs', '2'])
    one_line_error(code, capsys.readouterr().err, 'does not match the model', 'head.fc')
    assert not (folder / rundir.RESUMES_FILE).exists()
    assert not (folder / rundir.LOCK_FILE).exists()  # removed on an error too


def _edit_state(folder: Path, **values):
    path = rundir.complete_checkpoints(folder)[-1] / rundir.STATE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize('values,needles', [
    (dict(step=999999), ('trainer_state.json: step must be an integer >= 0 and < 8', '999999')),
    (dict(epoch=-3), ('trainer_state.json: epoch must be an integer >= 0', '-3')),
    (dict(step='2'), ('trainer_state.json: step must be an integer',)),
])
def test_an_edited_trainer_state_is_refused_naming_the_file_and_field(finished, tmp_path, capsys, values, needles):
    folder = copy_of(finished, tmp_path)
    _edit_state(folder, **values)
    before = sorted(p.name for p in folder.iterdir())
    code = train.cli(['--resume', str(folder), '--epochs', '2'])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert sorted(p.name for p in folder.iterdir()) == before  # no checkpoint--003, nothing deleted


def _retype(path: Path):
    """A float weight saved as int32, as a crafted file would hold it."""
    weights = load_file(str(path))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 4)
    weights[key] = (weights[key] * 1e4).to(torch.int32)
    save_file(weights, str(path), metadata={'format': 'pt'})
    return key


def test_a_retyped_tensor_is_refused_by_validate_and_by_resume(finished, tmp_path, capsys):
    folder = copy_of(finished, tmp_path)
    key = _retype(folder / rundir.BEST_DIR / rundir.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f'does not match the model: its {key} is int32 .*, the model\'s float32'):
        rundir.load_model(rundir.resolve(folder))
    [checkpoint] = rundir.complete_checkpoints(folder)
    _retype(checkpoint / rundir.TRAINING_STATE_DIR / rundir.WEIGHTS_FILE)  # what --resume reads
    code = train.cli(['--resume', str(folder), '--epochs', '2'])
    one_line_error(code, capsys.readouterr().err, 'state/model.safetensors does not match the model', 'int32')


def test_half_precision_weights_still_load():
    """Another float precision is a precision, not a retype: released fp16 weights load into the fp32 model."""
    from timm_mimo.models.weights import check_tensors_match
    own = torch.nn.Linear(2, 2).state_dict()
    check_tensors_match(own, {k: v.half() for k, v in own.items()}, Path('w.safetensors'))


@pytest.mark.parametrize('text', ['[]', '{"epoch": "x", "validation": []}'])
def test_a_best_metrics_file_that_is_not_one_warns_and_the_run_goes_on(finished, tmp_path, caplog, text):
    folder = copy_of(finished, tmp_path)
    (folder / rundir.BEST_DIR / rundir.METRICS_FILE).write_text(text)
    assert train.cli(['--resume', str(folder), '--epochs', '2', '--limit-train-batches', '1']) == 0
    assert 'is not a metrics file of best/' in caplog.text
    assert json.loads((folder / rundir.RESULTS_FILE).read_text())['epochs'] == 2


@pytest.mark.parametrize('text,needle', [
    ('x: [\n', 'resumes.yaml is not valid YAML'),
    ('- {}\n', 'resumes.yaml: resume 1 is not'),
    ('just words\n', 'resumes.yaml is not a list of resumes'),
])
def test_a_damaged_resumes_record_is_one_line(finished, tmp_path, capsys, text, needle):
    folder = copy_of(finished, tmp_path)
    (folder / rundir.RESUMES_FILE).write_text(text)
    code = train.cli(['--resume', str(folder), '--epochs', '2', '--lr', '0.01'])
    one_line_error(code, capsys.readouterr().err, needle)
    assert (folder / rundir.RESUMES_FILE).read_text() == text
    with pytest.raises(ValueError, match=needle):
        rundir.read_resumes(folder)  # the one reader: the model card's too


# ------------------------------------------------------------------------------------------------------
# the lock

def test_the_lock_file_goes_with_its_holder_and_never_with_another_runs(tmp_path):
    first = rundir.RunLock(tmp_path).acquire()
    with pytest.raises(FileExistsError, match='in use by another train.py'):
        rundir.RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()
    # a holder whose file was replaced (removed by hand, then taken by another run) leaves the new one alone
    first = rundir.RunLock(tmp_path).acquire()
    (tmp_path / rundir.LOCK_FILE).unlink()
    second = rundir.RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / rundir.LOCK_FILE).read_text() == str(os.getpid())
    with pytest.raises(FileExistsError):
        rundir.RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """Between opening .lock and locking it, its holder may finish and remove it: the lock would guard a
    removed file while a third run locks a new one. The taker checks that the file is still the folder's."""
    import fcntl
    holder = rundir.RunLock(tmp_path).acquire()
    flock = fcntl.flock

    def holder_finishes_first(f, how):  # the holder releases between our open and our flock
        if holder._file is not None:
            holder.release()
        return flock(f, how)
    monkeypatch.setattr(fcntl, 'flock', holder_finishes_first)
    taker = rundir.RunLock(tmp_path).acquire()
    monkeypatch.setattr(fcntl, 'flock', flock)
    path = tmp_path / rundir.LOCK_FILE
    assert os.stat(path).st_ino == os.fstat(taker._file.fileno()).st_ino
    with pytest.raises(FileExistsError):
        rundir.RunLock(tmp_path).acquire()
    taker.release()
