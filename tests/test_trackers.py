"""Experiment trackers through Accelerate (--log-with, --log-wandb): read back from what they wrote, across a
resume. TensorBoard through its own event reader; wandb (an optional extra) in offline mode, from its run file."""
import glob
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from timm_mimo import rundir
from timm_mimo.train.trackers import WANDB_RUN_ID_FILE, tracker_config

# 4 optimizer steps an epoch, the trackers' row every 2: steps 2, 4 | 6, 8; the epoch rows at 4 and 8
FAST = ['--model', 'wrn16_2_mixmo2', '-b', '16', '--batch-repeat', '2', '--seed', '7', '--limit-train-batches', '4']
LOCAL = ['--log-interval', '2', '--checkpoint-hist', '2']  # where a run is watched: given again on --resume


def scalars(log_dir: Path) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard shows them (its reader applies the purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def test_tensorboard_logs_steps_and_epochs_at_the_global_step_and_a_replayed_epoch_replaces_its_events(
        tmp_path, run_script):
    """A run of 2 epochs; then its last checkpoint is lost (a run killed after logging past its checkpoint looks
    the same) and the run resumed: epoch 1 is replayed, and TensorBoard shows each step once, with the values of
    the uninterrupted run."""
    pytest.importorskip('tensorboard', reason='the TensorBoard tracker needs the tensorboard package')
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    folder = tmp_path / 'tb'
    done = run_script('train.py', *FAST, *LOCAL, '--epochs', 2, '--log-with', 'tensorboard', '--output', tmp_path,
                      '--experiment', 'tb')
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = folder / rundir.TRACKERS_DIR / 'timm_mimo'
    first = scalars(log_dir)
    assert [step for step, _ in first['train/loss']] == [2, 4, 6, 8]
    assert {'train/lr', 'train/samples_per_s', 'train_loss', 'eval_top1', 'eval_nll', 'eval_ece', 'lr'} <= set(first)
    assert [step for step, _ in first['eval_top1']] == [4, 8]  # the global step, not the epoch
    assert [value for _, value in first['epoch']] == [0, 1]
    hparams = list(log_dir.glob('*/hparams.yml'))
    assert len(hparams) == 1 and 'log_with: tensorboard' in hparams[0].read_text()

    shutil.rmtree(folder / 'checkpoint-0002')
    (folder / rundir.RESULTS_FILE).unlink()
    resumed = run_script('train.py', '--resume', folder, *LOCAL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = sorted(log_dir.glob('events.out.tfevents.*'))
    assert len(events) == 2, 'the resumed run writes to the same log folder'
    starts = [e.step for e in EventFileLoader(str(events[1])).Load() if e.HasField('session_log')]
    assert starts == [5], 'the resumed process purges the events past its checkpoint (4 steps)'
    again = scalars(log_dir)
    for tag in ('train/loss', 'train/lr', 'eval_top1', 'eval_nll', 'train_loss'):
        assert [s for s, _ in again[tag]] == [s for s, _ in first[tag]], tag
        assert [v for _, v in again[tag]] == pytest.approx([v for _, v in first[tag]], rel=1e-5), tag


def test_an_unknown_or_missing_tracker_is_one_error_line_and_no_run_folder(tmp_path, run_script):
    proc = run_script('train.py', *FAST, '--epochs', 1, '--log-with', 'tensorboard,nosuchtracker', '--output',
                      tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "error: unknown tracker 'nosuchtracker' in --log-with" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_the_tracker_config_holds_only_scalars():
    config = tracker_config(dict(lr=0.1, amp=False, model='m', num_classes=None, decay_milestones=[90, 180],
                                 opt_betas=(0.9, 0.99), extra={'a': 1}))
    assert config == dict(lr=0.1, amp=False, model='m', num_classes='none', decay_milestones='90,180',
                          opt_betas='0.9,0.99', extra='a=1')


def wandb_records(path: Path):
    """The records of a wandb run file (.wandb: a ':W&B' header, then LevelDB-log framing: 32 KiB blocks of
    chunks with a 7-byte header: CRC, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, chunks = path.read_bytes(), 32768, 7, b''
    assert data[:4] == b':W&B'
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b''
            yield record


def wandb_run(path: Path):
    """(run id, project, config, {step: {key: value}}) of a wandb run file."""
    run_id = project = None
    config, history = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof('record_type')
        if kind == 'run':
            run_id, project = record.run.run_id, record.run.project
        elif kind == 'config':
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == 'history':
            history.setdefault(record.history.step.num, {}).update(
                {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return run_id, project, config, history


def test_wandb_offline_logs_the_config_steps_and_epochs_and_a_resume_continues_the_same_run(
        tmp_path, run_script, monkeypatch):
    pytest.importorskip('wandb', reason='the wandb tracker is an optional extra: pip install timm_mimo[wandb]')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb-dir'))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    (tmp_path / 'wandb-dir').mkdir()
    folder = tmp_path / 'wb'
    done = run_script('train.py', *FAST, *LOCAL, '--epochs', 1, '--log-wandb', '--output', tmp_path,
                      '--experiment', 'wb')
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = run_script('train.py', '--resume', folder, '--epochs', 2, *LOCAL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = (folder / rundir.TRACKERS_DIR / WANDB_RUN_ID_FILE).read_text().strip()
    files = sorted(glob.glob(str(tmp_path / 'wandb-dir' / 'wandb' / 'offline-run-*' / 'run-*.wandb')))
    assert len(files) == 2
    (id1, project, config, history1), (id2, _, _, history2) = (wandb_run(Path(f)) for f in files)
    assert id1 == id2 == run_id and project == 'timm_mimo'
    assert config['lr'] == 0.05 and config['log_with'] == 'wandb' and config['decay_milestones'] == '90,180,270'
    assert sorted(history1) == [2, 4] and sorted(history2) == [6, 8]
    assert {'train/loss', 'train/lr', 'train/samples_per_s'} <= set(history1[2])
    assert {'train/loss', 'train_loss', 'eval_top1', 'epoch'} <= set(history2[8]) and history2[8]['epoch'] == 1
