#!/usr/bin/env python3
"""Time to accuracy: train a MixMo recipe and the vanilla network under the same recipe, report wall time.

    python bench/time_to_accuracy.py -c configs/cifar10/time_to_accuracy.yaml --target 95 --vanilla-model wrn16_8
    python bench/time_to_accuracy.py -c configs/digits_mixmo.yaml --target 50 --vanilla-model wrn16_2 -- --epochs 2

Each run is ``train.py -c CONFIG`` (extra train.py flags after ``--``) in ``<output>/<model>``. The vanilla run
takes ``--vanilla-model`` with batch repetition 1 and the same number of UNIQUE images per step (global batch
B / b), so both see the same data per optimizer step and the same epochs; everything else is the recipe's.

Time to target = the ``elapsed`` column of ``summary.csv`` (wall time from the start of ``train.py``: data
decoding, compilation, training, every epoch's evaluation and checkpoint) at the first epoch whose validation
``--metric`` reaches ``--target``. Also reported: the final (last-epoch) and best validation top-1, NLL, ECE,
the run's whole wall time and its speed settings, the device, and the MixMo / vanilla ratio of times.

Runs are resumable, for machines lent in slices: ``--budget-s S`` sends SIGTERM to a training run after S
seconds of this call (train.py then saves a mid-epoch checkpoint and exits); calling the script again with the
same arguments resumes unfinished runs and re-reads finished ones. ``--launcher 'accelerate launch'`` runs
train.py through Accelerate. ``--json PATH`` writes the report (an existing file is kept unless ``--overwrite``).
"""
import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from timm_mimo.eval.benchmark import cpu_name
from timm_mimo.rundir import RESULTS_FILE, SUMMARY_FILE, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', required=True, help='train.py recipe (YAML) of the MixMo run')
    p.add_argument('--target', type=float, required=True, help='validation metric value to reach, e.g. 95')
    p.add_argument('--metric', default='eval_top1', help='summary.csv column compared with --target (higher = better)')
    p.add_argument('--vanilla-model', default=None, help='M = 1 network under the same recipe (omit: MixMo only)')
    p.add_argument('--output', default='output/time_to_accuracy', help='folder of the runs')
    p.add_argument('--launcher', default='', help="command before train.py, e.g. 'accelerate launch'")
    p.add_argument('--budget-s', type=float, default=None,
                   help='SIGTERM a training run after this many seconds of this call (it checkpoints; rerun to resume)')
    p.add_argument('--json', default=None, help='write the report here')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    p.add_argument('train_args', nargs=argparse.REMAINDER, help='-- then extra train.py flags for both runs')
    return p


def recipe_runs(args, extra):
    """(name, train.py flags after the recipe's) of the MixMo run and of its vanilla counterpart.

    The recipe is read as train.py reads it (the config, then the extra flags), so the vanilla run's batch
    is B / b of the batch the MixMo run really uses.
    """
    from timm_mimo.train.args import parse_args
    recipe = parse_args(['-c', args.config, *extra])
    runs = [(recipe.model, extra)]
    if args.vanilla_model:
        if recipe.batch_size % recipe.batch_repeat:
            raise ValueError(f'the recipe\'s batch size {recipe.batch_size} is not divisible by its batch '
                             f'repetition {recipe.batch_repeat}')
        runs.append((args.vanilla_model, [*extra, '--model', args.vanilla_model, '--batch-repeat', '1',
                                          '-b', str(recipe.batch_size // recipe.batch_repeat)]))
    return runs


def run_training(command, folder: Path, deadline) -> str:
    """Run train.py to the end, or SIGTERM it at ``deadline`` (it saves and exits 0): 'done' / 'stopped'.

    Its output is passed through; the SIGTERM waits for its 'model ...' line, printed when training starts
    (its handler is installed well before), so a budget that runs out during start-up cannot kill it.
    """
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    started = threading.Event()

    def relay():
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith('model '):
                started.set()
    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stopped = False
    try:
        while proc.poll() is None:
            if deadline is not None and not stopped and started.is_set() and time.time() > deadline:
                proc.send_signal(signal.SIGTERM)
                stopped = True
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        raise
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f'train.py exited {proc.returncode} for {folder}: see its output above')
    return 'done' if (folder / RESULTS_FILE).exists() else 'stopped'


def summarize(folder: Path, metric: str, target: float) -> dict:
    """Time to target and final metrics of a finished run, from its summary.csv and results.json."""
    with open(folder / SUMMARY_FILE, newline='') as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise ValueError(f'{folder / "summary.csv"} has no column {metric!r}')
    reached = next((r for r in rows if float(r[metric]) >= target), None)
    results = json.loads((folder / RESULTS_FILE).read_text())
    last, best = results['last']['validation'], results['best']['validation']
    return dict(
        folder=str(folder), epochs=len(rows),
        target_epoch=int(reached['epoch']) if reached else None,
        time_to_target_s=float(reached['elapsed']) if reached else None,
        wall_time_s=results['wall_time_s'], last_top1=last['top1'], last_nll=last['nll'], last_ece=last['ece'],
        best_top1=best['top1'], best_epoch=results['best']['epoch'], speed=results.get('speed', {}),
        device=results.get('device'))


def device_name(device: str) -> str:
    if device and device.startswith('cuda'):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def main(argv=None):
    args = build_parser().parse_args(argv)
    config_path = Path(args.config)
    if not config_path.is_file():
        raise FileNotFoundError(f'config file not found: {config_path}')
    json_path = Path(args.json) if args.json else None
    if json_path is not None and json_path.exists() and not args.overwrite:
        raise FileExistsError(f'{json_path} exists: pass --overwrite to replace it')
    extra = [a for a in args.train_args if a != '--']
    deadline = time.time() + args.budget_s if args.budget_s else None
    output = Path(args.output)
    report = dict(config=str(config_path), target=args.target, metric=args.metric, runs={})
    for name, flags in recipe_runs(args, extra):
        folder = output / name
        if not (folder / RESULTS_FILE).exists():
            if folder.exists() and any(folder.iterdir()):
                where = ['--resume', str(folder)]  # without a checkpoint yet, train.py starts it in place
            else:
                where = ['--output', str(output), '--experiment', name]
            command = [*shlex.split(args.launcher), *([] if args.launcher else [sys.executable]),
                       str(REPO / 'train.py'), '-c', str(config_path), *flags, *where]
            print('+ ' + ' '.join(shlex.quote(c) for c in command), flush=True)
            if run_training(command, folder, deadline) == 'stopped':
                # a stop abandons the step in flight: one that came before any step completed saves nothing
                saved = 'with a checkpoint' if complete_checkpoints(folder) else 'before its first step completed'
                print(f'{name}: stopped at the time budget {saved}; run the same command again to resume')
                return 3
        report['runs'][name] = summarize(folder, args.metric, args.target)

    first = next(iter(report['runs'].values()))
    report['device'] = device_name(first['device'])
    print(f'\ntime to {args.metric} >= {args.target} on {report["device"]} ({config_path}):')
    print(f'| model | epoch reached | time to target (s) | whole run (s) | last top-1 | NLL | ECE | best top-1 |')
    print('|---|---|---|---|---|---|---|---|')
    for name, r in report['runs'].items():
        reached = f'{r["time_to_target_s"]:.1f}' if r['time_to_target_s'] is not None else 'not reached'
        print(f'| {name} | {r["target_epoch"] if r["target_epoch"] is not None else "-"} | {reached} | '
              f'{r["wall_time_s"]:.1f} | {r["last_top1"]:.2f} | {r["last_nll"]:.4f} | {r["last_ece"]:.4f} | '
              f'{r["best_top1"]:.2f} |')
    times = [r['time_to_target_s'] for r in report['runs'].values()]
    walls = [r['wall_time_s'] for r in report['runs'].values()]
    if len(times) == 2:
        report['whole_run_ratio'] = walls[0] / walls[1]
        print(f'whole-run wall time, MixMo / vanilla: {report["whole_run_ratio"]:.3f}')
        if None not in times:
            report['time_to_target_ratio'] = times[0] / times[1]
            print(f'time to target, MixMo / vanilla: {report["time_to_target_ratio"]:.3f}')
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(json_path.name + '.tmp')
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, json_path)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
