"""bench/time_to_accuracy.py on CPU at small scale: both runs, the report, a time budget and its resume."""
import json
from pathlib import Path

import pytest

from timm_mimo.rundir import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'bench' / 'time_to_accuracy.py'
SMALL = ['--', '--epochs', '2', '--limit-train-batches', '12', '-b', '32', '--fused-opt', '--channels-last']


@pytest.fixture
def bench(run_script, monkeypatch):
    """``bench(*args, check=True)``: ``python bench/time_to_accuracy.py ARGS``, the script run in this process
    (its ``__main__`` block: exit status and error line as on the command line); train.py stays the
    subprocess the bench starts, signals and times."""
    monkeypatch.setenv('PYTHONUNBUFFERED', '1')  # train.py's lines reach the bench as printed
    monkeypatch.setenv('OMP_NUM_THREADS', '2')

    def run(*args, check=True):
        proc = run_script(SCRIPT, *args)
        if check and proc.returncode not in (0, 3):
            raise AssertionError(f'exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
        return proc
    return run


def test_budget_stops_with_a_checkpoint_then_the_same_command_resumes_and_reports(tmp_path, bench):
    common = ['-c', 'configs/digits_mixmo.yaml', '--target', 0, '--vanilla-model', 'wrn16_2',
              '--output', tmp_path / 'runs']
    first = bench(*common, '--budget-s', 1, *SMALL)
    assert first.returncode == 3 and 'run the same command again to resume' in first.stdout
    mixmo = tmp_path / 'runs' / 'wrn16_2_mixmo2'
    assert not (mixmo / 'results.json').exists()
    # the stop abandons the step in flight: whether one completed within the budget depends on the machine's
    # speed, and what the bench says must match what was saved
    saved = complete_checkpoints(mixmo)
    assert ('stopped at the time budget with a checkpoint' in first.stdout) == bool(saved), first.stdout[-2000:]

    report_path = tmp_path / 'report.json'
    second = bench(*common, '--json', report_path, *SMALL)
    assert second.returncode == 0, second.stdout[-2000:]
    assert ('resumed from' if saved else 'starting the run in place') in second.stdout, second.stdout[-2000:]
    report = json.loads(report_path.read_text())
    assert list(report['runs']) == ['wrn16_2_mixmo2', 'wrn16_2']
    for run in report['runs'].values():
        # target 0: reached at the first epoch, after some positive wall time that the whole run exceeds
        assert run['target_epoch'] == 0 and 0 < run['time_to_target_s'] < run['wall_time_s']
        assert run['speed']['fused_optimizer'] and run['speed']['channels_last'] and run['epochs'] == 2
    assert report['time_to_target_ratio'] > 0 and report['whole_run_ratio'] > 0
    assert '| wrn16_2 |' in second.stdout and 'MixMo / vanilla' in second.stdout
    # vanilla under the same recipe: b = 1 and the same 16 unique images per step as MixMo's 32 / 2
    vanilla_args = (tmp_path / 'runs' / 'wrn16_2' / 'args.yaml').read_text()
    assert 'batch_size: 16' in vanilla_args and 'batch_repeat: 1' in vanilla_args

    # finished runs are read again, not retrained; an existing report is kept
    again = bench(*common, '--json', report_path, '--target', 101, *SMALL, check=False)
    assert again.returncode == 2 and 'exists' in again.stderr and again.stderr.strip().count('\n') == 0
    again = bench(*common, '--target', 101, *SMALL)
    assert again.returncode == 0 and 'not reached' in again.stdout and 'train.py' not in again.stdout
