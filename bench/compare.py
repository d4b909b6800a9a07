#!/usr/bin/env python3
"""MIMO against its own network under the paper's rule: equal epochs, lr per unique image held fixed.

    python bench/compare.py -c configs/digits_mixmo.yaml --models wrn16_2 wrn16_2_mixmo2 --seeds 3
    python bench/compare.py -c configs/digits_mixmo.yaml --seeds 5 --out output/compare/digits \\
        --models wrn16_2 wrn16_2_mixmo2 wrn16_2_mixmo2:mix_mode=linear wrn16_2_mixmo2:mix_mode=mimo
    python bench/compare.py -c configs/digits_mixmo.yaml --models wrn16_2:msda=mixup wrn16_2:msda=automix
    python bench/compare.py -c configs/digits_mixmo.yaml --models wrn16_2 wrn16_2_mixmo2 --seeds 5 --deep-ensemble 5

Every run is ``train.py -c RECIPE --model NAME --seed S`` plus the flags below, in ``<out>/runs/<label>-s<S>``.
The rule (MixMo / MIMO papers): all runs keep the recipe's global batch B (mixed samples per step) and its
epochs; a network with M >= 2 members uses batch repetition b (``--batch-repeat``, default the recipe's),
so it sees B / b unique images per step and takes b x the optimizer steps per epoch, at lr / b; an M = 1
network runs b = 1. The recipe's ``lr`` belongs to its own ``batch_repeat`` b_r: a run with b gets
``lr * b_r / b`` (the project's recipes write lr as 0.1 / (2 b)), so the learning rate per unique image is
the same for every run. A model spec ``NAME:key=value,...`` adds ``--key value`` flags to that model's runs
(``wrn16_2_mixmo2:mix_mode=mimo``); ``model_kwargs=K=V`` options are added to the recipe's ``model_kwargs``
(``cait_xxs_mixvit2:model_kwargs=attribution=input``); flags after ``--`` go to every run.

``--deep-ensemble N`` adds, for every M = 1 model spec, the row of the deep ensemble of its first N seeds
(the paper's baseline: N independently trained networks, N forward passes); the seeds already trained serve
it, so it costs training only where N exceeds ``--seeds`` (those extra seeds count in no other row).

After training, each run is scored on its test split (validation if the data set has none) with
``validate.py --tempscale`` (temperature scaling, MixMo's two-fold protocol), a deep ensemble by one
``validate.py RUN1 ... RUNN --tempscale`` (mean of the member probabilities). Printed and written to
``<out>/compare.md`` and ``<out>/compare.csv``, in the order M = 1 networks, deep ensembles, M >= 2 networks:
mean +- std over seeds of test top-1, NLL, ECE, calibrated NLL / ECE, the temperature, per-member top-1, the
ensemble gain over the best member, member disagreement, the inference cost per image (parameters, FLOPs,
forward passes), wall time (train.py's whole run; a deep ensemble: the sum over its networks) and optimizer
steps (likewise); ``<out>/runs.csv`` has one row per run.
``<out>/validation_curves.png``: validation top-1 per epoch of every run; ``<out>/reliability.png``: the
reliability diagrams of all runs side by side (one row per model, one column per seed).

Resumable per run: a run with ``results.json`` is not rerun, an interrupted one (a complete checkpoint,
no results) continues with ``train.py --resume``, and its evaluation is kept once written. A folder that
holds neither is left as it is and reported (nothing is deleted).
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from timm_mimo.rundir import RESULTS_FILE, SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS_LINE = re.compile(r'(\d+) steps/epoch')
# the columns of the table, as (name, metric key in validate.py's results, scale)
COLUMNS = (
    ('top1', 'top1', 1.0), ('nll', 'nll', 1.0), ('ece', 'ece', 1.0),
    ('nll_cal', 'nll_calibrated', 1.0), ('ece_cal', 'ece_calibrated', 1.0), ('temperature', 'temperature', 1.0),
    ('best_member_top1', 'best_member_top1', 1.0), ('member_mean_top1', 'member_mean_top1', 1.0),
    ('ensemble_gain', 'ensemble_gain', 1.0), ('disagreement', 'disagreement', 1.0),
)


class BadInput(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', required=True, help='train.py recipe (YAML)')
    p.add_argument('--models', nargs='+', required=True, help='model specs: NAME or NAME:key=value,...')
    p.add_argument('--seeds', type=int, default=3, help='seeds 0 .. N-1 per model')
    p.add_argument('--seed-offset', type=int, default=0, help='first seed')
    p.add_argument('--batch-repeat', type=int, default=None,
                   help="b of the M >= 2 networks (default: the recipe's batch_repeat)")
    p.add_argument('--deep-ensemble', type=int, default=0, metavar='N',
                   help='add the deep ensemble of N seeds of every M = 1 model (trains seeds beyond --seeds)')
    p.add_argument('--out', default='output/compare', help='folder of the runs and the reports')
    p.add_argument('--launcher', default='', help="command before train.py / validate.py, e.g. 'accelerate launch'")
    p.add_argument('--dry-run', action='store_true', help='print the train.py commands and exit')
    p.add_argument('train_args', nargs=argparse.REMAINDER, help='-- then extra train.py flags for every run')
    return p


def parse_spec(spec: str):
    """'NAME:key=value,key2=value2' -> (label, name, ['--key', 'value', ...], [model kwarg, ...]).

    ``model_kwargs=K=V`` options (any number) are create_model kwargs: they are kept apart, to be added to
    the recipe's own ``model_kwargs`` rather than replace them.
    """
    name, _, options = spec.partition(':')
    if not name:
        raise BadInput(f'empty model name in {spec!r}')
    flags, model_kwargs = [], []
    for option in filter(None, options.split(',')):
        key, eq, value = option.partition('=')
        if not eq or not key:
            raise BadInput(f'model option {option!r} in {spec!r} is not key=value')
        if key.replace('-', '_') == 'model_kwargs':
            if '=' not in value:
                raise BadInput(f'model option {option!r} in {spec!r}: model_kwargs takes K=V')
            model_kwargs.append(value)
        else:
            flags += [f'--{key.replace("_", "-")}', value]
    return spec, name, flags, model_kwargs


def run_label(spec: str) -> str:
    """A folder-safe name of a model spec."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.replace(':', '-').replace('=', '-')).strip('-')


def num_members_of(name: str, flags: Sequence[str], model_kwargs: Sequence[str] = ()) -> int:
    """M of a registered model with these create_model kwargs, built on the meta device (no memory, no weights)."""
    import timm
    import torch
    import timm_mimo  # noqa: F401  (registers the models)
    from timm_mimo.cli import parse_model_kwargs
    if not timm.is_model(name):
        raise BadInput(f'unknown model {name!r}: not in timm\'s registry')
    kwargs = parse_model_kwargs(model_kwargs)
    if '--num-members' in flags:
        kwargs['num_members'] = int(flags[list(flags).index('--num-members') + 1])
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return int(getattr(model, 'num_members', 1))


def plan_runs(args) -> List[Dict]:
    """Every (model spec, seed) run with its train.py flags under the equal-epochs rule."""
    from timm_mimo.train.args import parse_args
    extra = list(args.train_args[1:] if args.train_args[:1] == ['--'] else args.train_args)
    if not Path(args.config).exists():
        raise BadInput(f'recipe not found: {args.config}')
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            recipe = parse_args(['-c', args.config, *extra])
    except SystemExit as err:  # argparse's usage + message: keep its message as the one error line
        reason = said.getvalue().strip().splitlines()[-1:] or ['invalid flags']
        raise BadInput(f'train.py refuses the flags {extra}: {reason[0].partition("error: ")[2] or reason[0]}') \
            from err
    except (ValueError, FileNotFoundError) as err:  # a value or config file train.py's checks refuse
        raise BadInput(f'train.py refuses the flags {extra}: {err}') from err
    if args.seeds < 1:
        raise BadInput(f'--seeds must be >= 1, got {args.seeds}')
    if args.deep_ensemble == 1 or args.deep_ensemble < 0:
        raise BadInput(f'--deep-ensemble needs N >= 2 networks, got {args.deep_ensemble}')
    mimo_repeat = args.batch_repeat or recipe.batch_repeat
    if mimo_repeat < 1:
        raise BadInput(f'--batch-repeat must be >= 1, got {mimo_repeat}')
    base_lr = recipe.lr * recipe.batch_repeat  # the lr of b = 1: recipes write lr per their own b
    labels = [run_label(spec) for spec in args.models]
    if len(set(labels)) != len(labels):
        raise BadInput(f'model specs repeat (or map to the same folder name): {args.models}')
    runs = []
    for spec, label in zip(args.models, labels):
        _, name, flags, own_kwargs = parse_spec(spec)
        model_kwargs = [*recipe.model_kwargs, *own_kwargs]
        if own_kwargs:  # one --model-kwargs list: the recipe's, then the spec's (a later key wins)
            flags = [*flags, '--model-kwargs', *model_kwargs]
        members = num_members_of(name, flags, model_kwargs)
        repeat = mimo_repeat if members > 1 else 1
        if recipe.batch_size % repeat:
            raise BadInput(f'the recipe\'s batch size {recipe.batch_size} is not divisible by b = {repeat}')
        # an M = 1 model trains the deep ensemble's seeds too; those beyond --seeds serve only the ensemble
        seeds = max(args.seeds, args.deep_ensemble) if members == 1 else args.seeds
        for seed in range(args.seed_offset, args.seed_offset + seeds):
            # the rule's flags after the shared extras (an extra --lr or --batch-repeat is read into the
            # recipe above, not passed through); a model spec's own flags come last
            flags_run = ['-c', args.config, *extra, '--model', name, '--seed', str(seed),
                         '--batch-repeat', str(repeat), '--lr', repr(base_lr / repeat), *flags]
            runs.append(dict(spec=spec, label=label, model=name, seed=seed, members=members, batch_repeat=repeat,
                             lr=base_lr / repeat, epochs=recipe.epochs, flags=flags_run,
                             in_row=seed < args.seed_offset + args.seeds,
                             folder=Path(args.out) / 'runs' / f'{label}-s{seed}'))
    return runs


def runs_of(runs: List[Dict], spec: str) -> List[Dict]:
    """The runs of one model spec, in seed order."""
    return [r for r in runs if r['spec'] == spec]


def launch(launcher: str, script: str, flags: Sequence[str]) -> List[str]:
    head = launcher.split() if launcher else [sys.executable]
    return [*head, str(REPO / script), *map(str, flags)]


def run_logged(command: Sequence[str], log: Path) -> int:
    """Run a command with its output appended to ``log`` (and echoed), returning its exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(log, 'a') as handle, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            handle.write(line)
            sys.stdout.write('    ' + line)
        return proc.wait()


def has_checkpoint(folder: Path) -> bool:
    from timm_mimo.rundir import complete_checkpoints
    return folder.is_dir() and bool(complete_checkpoints(folder))


def train_run(run: Dict, launcher: str) -> str:
    """Train (or resume) one run: 'done', 'trained', 'resumed' or 'failed: ...'."""
    folder = run['folder']
    if (folder / RESULTS_FILE).exists():
        return 'done'
    log = folder.parent / f'{folder.name}.log'
    if has_checkpoint(folder):
        command, how = launch(launcher, 'train.py', [*run['flags'], '--resume', folder]), 'resumed'
    elif folder.exists() and any(folder.iterdir()):
        return f'failed: {folder} holds neither results nor a complete checkpoint (left as it is)'
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        command, how = launch(launcher, 'train.py', [*run['flags'], '--output', folder.parent,
                                                     '--experiment', folder.name]), 'trained'
    print(f'[{run["label"]} seed {run["seed"]}] {" ".join(command[1:])}', flush=True)
    rc = run_logged(command, log)
    if rc != 0 or not (folder / RESULTS_FILE).exists():
        return f'failed: train.py exited {rc} (log {log})'
    return how


def evaluate_run(sources: Sequence[Path], folder: Path, launcher: str) -> Optional[str]:
    """validate.py --tempscale on the best weights of ``sources`` (one run, or the runs of a deep ensemble),
    into ``folder``, once; None when it worked, else why not."""
    results, png = folder / 'compare_eval.json', folder / 'reliability.png'
    if results.exists() and png.exists():
        return None
    for stale in (results, png):  # written by an evaluation that did not finish both: redo it
        if stale.exists():
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    command = launch(launcher, 'validate.py', [*sources, '--tempscale', '--results-file', results,
                                               '--reliability-png', png])
    rc = run_logged(command, folder.parent / f'{folder.name}.log')
    return None if rc == 0 and results.exists() else f'validate.py exited {rc}'


def steps_per_epoch(folder: Path) -> Optional[int]:
    """Optimizer steps per epoch, from train.py's start-up line in the run's log (the last one: resumes)."""
    log = folder.parent / f'{folder.name}.log'
    found = STEPS_LINE.findall(log.read_text()) if log.exists() else []
    return int(found[-1]) if found else None


def read_curve(folder: Path) -> List[float]:
    with open(folder / SUMMARY_FILE) as handle:
        return [float(row['eval_top1']) for row in csv.DictReader(handle)]


def evaluated_row(folder: Path, **identity) -> Dict:
    """The metrics and inference cost of the evaluation in ``folder``, after the ``identity`` columns."""
    evaluation = json.loads((folder / 'compare_eval.json').read_text())
    metrics = evaluation[evaluation['split']]
    row = dict(identity, split=evaluation['split'])
    for column, key, scale in COLUMNS:
        value = metrics.get(key)
        row[column] = None if value is None else value * scale
    for k, acc in enumerate(metrics['member_top1']):
        row[f'member{k}_top1'] = acc
    cost = evaluation.get('cost') or {}  # absent from evaluations written before validate.py reported it
    row.update(params=cost.get('params'), flops=cost.get('flops'), passes=cost.get('forward_passes'))
    return row


def training_cost(run: Dict):
    """(train.py's wall time in s, optimizer steps or None) of one run."""
    steps = steps_per_epoch(run['folder'])
    wall = json.loads((run['folder'] / RESULTS_FILE).read_text())['wall_time_s']
    return wall, (steps * run['epochs'] if steps is not None else None)


def collect(run: Dict) -> Dict:
    """One row of runs.csv: the run's evaluated metrics, inference cost, wall time and optimizer steps."""
    row = evaluated_row(run['folder'], model=run['spec'], seed=run['seed'], members=run['members'],
                        batch_repeat=run['batch_repeat'], lr=run['lr'], epochs=run['epochs'])
    row['wall_s'], row['steps'] = training_cost(run)
    return row


def deep_ensemble_label(spec: str, size: int) -> str:
    return f'{size} x {spec} (deep ensemble)'


def deep_ensemble_folder(out: Path, spec: str, size: int) -> Path:
    return out / 'deep_ensembles' / f'{run_label(spec)}-x{size}'


def collect_deep_ensemble(spec: str, runs: List[Dict], folder: Path) -> Dict:
    """The summary row of the deep ensemble of ``runs``: its metrics, and the training cost of all its networks."""
    row = evaluated_row(folder, model=deep_ensemble_label(spec, len(runs)), seeds=len(runs),
                        members=sum(r['members'] for r in runs), batch_repeat=runs[0]['batch_repeat'],
                        lr=runs[0]['lr'], epochs=runs[0]['epochs'])
    walls, steps = zip(*map(training_cost, runs))
    row['wall_s'] = sum(walls)
    row['steps'] = None if None in steps else sum(steps)
    return row


def mean_std(values: Sequence[Optional[float]]):
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)


SUMMARY_COLUMNS = ('top1', 'nll', 'ece', 'nll_cal', 'ece_cal', 'temperature', 'best_member_top1',
                   'member_mean_top1', 'ensemble_gain', 'disagreement', 'params', 'flops', 'passes', 'wall_s',
                   'steps')
DIGITS = dict(top1=2, nll=4, ece=4, nll_cal=4, ece_cal=4, temperature=3, best_member_top1=2, member_mean_top1=2,
              ensemble_gain=2, disagreement=3, wall_s=0, steps=0)


def summarise(rows: List[Dict], specs: Sequence[str]) -> List[Dict]:
    """Mean and std over the rows of each model spec, in the order of ``specs``; ``seeds``: the seeds behind
    them (a deep ensemble's one row stands for its networks' seeds)."""
    out = []
    for spec in specs:
        mine = [r for r in rows if r['model'] == spec]
        if not mine:
            continue
        entry = dict(model=spec, rows=len(mine), seeds=sum(r.get('seeds', 1) for r in mine),
                     members=mine[0]['members'], batch_repeat=mine[0]['batch_repeat'], lr=mine[0]['lr'])
        for column in SUMMARY_COLUMNS:
            entry[f'{column}_mean'], entry[f'{column}_std'] = mean_std([r.get(column) for r in mine])
        member_keys = sorted(k for k in mine[0] if re.fullmatch(r'member\d+_top1', k))
        entry['members_top1'] = [mean_std([r.get(k) for r in mine])[0] for k in member_keys]
        out.append(entry)
    return out


def table_order(members_of: Dict[str, int], ensembles: Sequence[str]) -> List[str]:
    """The paper's order of the rows: the M = 1 networks, their deep ensembles, the M >= 2 networks (each group
    in the order given)."""
    return ([spec for spec, m in members_of.items() if m == 1] + list(ensembles)
            + [spec for spec, m in members_of.items() if m > 1])


def markdown_table(summary: List[Dict], split: str) -> str:
    head = ['model', 'M', 'b', 'lr', 'seeds', f'{split} top-1 %', 'NLL', 'ECE', 'NLL (TS)', 'ECE (TS)', 'T',
            'members top-1 %', 'gain (pts)', 'disagreement', 'inference: params / FLOPs / passes', 'wall s',
            'steps']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]

    def cell(entry, column):
        mean, std = entry[f'{column}_mean'], entry[f'{column}_std']
        if mean is None:
            return 'n/a'
        d = DIGITS[column]
        return f'{mean:.{d}f} ± {std:.{d}f}' if entry['rows'] > 1 else f'{mean:.{d}f}'

    def cost(entry):  # the same for every seed: the means
        params, flops, passes = (entry[f'{c}_mean'] for c in ('params', 'flops', 'passes'))
        if params is None:
            return 'n/a'
        return f'{params / 1e6:.2f} M / {flops / 1e6:.1f} M / {passes:.0f}'
    for e in summary:
        members = ' / '.join(f'{a:.2f}' for a in e['members_top1'])
        lines.append('| ' + ' | '.join([
            f'`{e["model"]}`', str(e['members']), str(e['batch_repeat']), f'{e["lr"]:.4g}', str(e['seeds']),
            cell(e, 'top1'), cell(e, 'nll'), cell(e, 'ece'), cell(e, 'nll_cal'), cell(e, 'ece_cal'),
            cell(e, 'temperature'), members, cell(e, 'ensemble_gain'), cell(e, 'disagreement'), cost(e),
            cell(e, 'wall_s'), cell(e, 'steps')]) + ' |')
    return '\n'.join(lines) + '\n'


def write_csv(path: Path, rows: List[Dict]):
    """engine's atomic CSV writer, with list cells (per-member top-1) as space-separated numbers."""
    from timm_mimo.rundir import write_csv_atomic
    write_csv_atomic(path, [{k: (' '.join(f'{x:.4f}' for x in v) if isinstance(v, list) else v)
                             for k, v in row.items()} for row in rows])


# --- pictures (Pillow only, like timm_mimo.eval.metrics.reliability_diagram) --------------------------------

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (23, 190, 207))


def save_png(image, path: Path):
    tmp = path.with_name(f'.{path.name}.tmp')
    image.save(tmp, format='PNG')
    os.replace(tmp, path)


def curves_png(curves: Dict[str, List[List[float]]], path: Path, title: str):
    """Validation top-1 per epoch: one colour per model spec, one line per seed."""
    from PIL import Image, ImageDraw
    from timm_mimo.eval.plots import default_font
    font, small = default_font(15), default_font(12)
    legend = [f'{spec} ({len(runs)})' for spec, runs in curves.items()]
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    legend_w = max(probe.textbbox((0, 0), text, font=small)[2] for text in legend)
    width, height, left, right, top, bottom = 640 + legend_w + 60, 560, 70, legend_w + 60, 40, 60
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    values = [v for runs in curves.values() for curve in runs for v in curve]
    epochs = max(len(curve) for runs in curves.values() for curve in runs)
    lo = max(0.0, math.floor(min(values) / 10) * 10)
    hi = min(100.0, math.ceil(max(values) / 10) * 10 if max(values) < 100 else 100.0)
    hi = hi if hi > lo else lo + 10
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(epoch, value):
        x = left + (epoch / max(epochs - 1, 1)) * plot_w
        return x, top + (1 - (value - lo) / (hi - lo)) * plot_h
    for value in range(int(lo), int(hi) + 1, 10 if hi - lo > 20 else 2):
        y = xy(0, value)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=(228, 228, 228))
        draw.text((left - 45, y - 8), f'{value:.0f}', font=small, fill=(20, 20, 20))
    for epoch in range(epochs):
        x = xy(epoch, lo)[0]
        draw.line([(x, top + plot_h), (x, top + plot_h + 5)], fill=(60, 60, 60))
        if epochs <= 20 or epoch % max(epochs // 10, 1) == 0:
            draw.text((x - 4, top + plot_h + 8), str(epoch), font=small, fill=(20, 20, 20))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(60, 60, 60))
    for k, (spec, runs) in enumerate(curves.items()):
        colour = PALETTE[k % len(PALETTE)]
        for curve in runs:
            points = [xy(e, v) for e, v in enumerate(curve)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 10 + 22 * k
        draw.rectangle([left + plot_w + 16, ly + 3, left + plot_w + 36, ly + 13], fill=colour)
        draw.text((left + plot_w + 42, ly), legend[k], font=small, fill=(20, 20, 20))
    draw.text((left, 12), title, font=font, fill=(20, 20, 20))
    draw.text((left + plot_w / 2 - 20, height - 28), 'epoch', font=font, fill=(20, 20, 20))
    draw.text((8, top - 30), 'val top-1 %', font=small, fill=(20, 20, 20))
    save_png(image, path)


def reliability_grid_png(panels: Dict[str, List[Path]], path: Path, scale: float = 0.5):
    """The runs' reliability diagrams side by side: one row per model spec, one column per seed."""
    from PIL import Image, ImageDraw
    from timm_mimo.eval.plots import default_font
    opened = {spec: [Image.open(p).convert('RGB') for p in files] for spec, files in panels.items()}
    first = next(iter(opened.values()))[0]
    w, h = int(first.width * scale), int(first.height * scale)
    label_h = 22
    cols = max(len(v) for v in opened.values())
    grid = Image.new('RGB', (cols * w, len(opened) * (h + label_h)), 'white')
    draw = ImageDraw.Draw(grid)
    font = default_font(14)
    for row, (spec, images) in enumerate(opened.items()):
        y = row * (h + label_h)
        draw.text((6, y + 3), spec, font=font, fill=(20, 20, 20))
        for col, image in enumerate(images):
            grid.paste(image.resize((w, h)), (col * w, y + label_h))
    save_png(grid, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs = plan_runs(args)
    if args.dry_run:
        for run in runs:
            print(' '.join(launch(args.launcher, 'train.py', run['flags'])[1:]))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for run in runs:
        status = train_run(run, args.launcher)
        if status.startswith('failed'):
            failures.append(f'{run["label"]} seed {run["seed"]}: {status}')
            continue
        why = evaluate_run([run['folder']], run['folder'], args.launcher)
        if why:
            failures.append(f'{run["label"]} seed {run["seed"]}: evaluation failed: {why}')
    done = [r for r in runs if (r['folder'] / 'compare_eval.json').exists()]
    rows = [collect(r) for r in done if r['in_row']]
    if not rows:
        print('error: no run finished: ' + '; '.join(failures), file=sys.stderr)
        return 1
    write_csv(out / 'runs.csv', rows)
    ensembles, ensemble_rows = {}, []
    for spec in (s for s in args.models if args.deep_ensemble and runs_of(runs, s)[0]['members'] == 1):
        networks = runs_of(runs, spec)[:args.deep_ensemble]
        folder = deep_ensemble_folder(out, spec, len(networks))
        if not all(r in done for r in networks):
            failures.append(f'{deep_ensemble_label(spec, len(networks))}: not every network finished')
            continue
        why = evaluate_run([r['folder'] for r in networks], folder, args.launcher)
        if why:
            failures.append(f'{deep_ensemble_label(spec, len(networks))}: evaluation failed: {why}')
            continue
        ensembles[deep_ensemble_label(spec, len(networks))] = folder
        ensemble_rows.append(collect_deep_ensemble(spec, networks, folder))
    order = table_order({spec: runs_of(runs, spec)[0]['members'] for spec in args.models}, list(ensembles))
    summary = summarise(rows + ensemble_rows, order)
    write_csv(out / 'compare.csv', [{k: v for k, v in e.items()} for e in summary])
    split = rows[0]['split']
    first = runs[0]
    header = (f'# {Path(args.config).name}: equal epochs ({first["epochs"]}), global batch as the recipe, '
              f'M >= 2 at b = {args.batch_repeat or "recipe"} with lr / b\n\n'
              f'mean ± std over seeds; metrics on the {split} split of each run\'s best (validation-selected) '
              f'epoch; TS = temperature scaling (two-fold); gain = ensemble top-1 - best member top-1; '
              f'a deep ensemble averages its networks\' probabilities, its wall time and steps are the sums '
              f'over its networks; inference FLOPs per image (a multiply-add counts 2)\n\n')
    table = markdown_table(summary, split)
    (out / 'compare.md').write_text(header + table)
    curves = {}
    panels = {}
    for run in (r for r in done if r['in_row']):
        curves.setdefault(run['spec'], []).append(read_curve(run['folder']))
        panels.setdefault(run['spec'], []).append(run['folder'] / 'reliability.png')
    panels.update({label: [folder / 'reliability.png'] for label, folder in ensembles.items()})
    panels = {spec: panels[spec] for spec in order if spec in panels}
    curves_png(curves, out / 'validation_curves.png', f'{Path(args.config).name}: validation top-1 per epoch')
    reliability_grid_png(panels, out / 'reliability.png')
    print(table)
    print(f'written: {out / "compare.md"}, {out / "compare.csv"}, {out / "runs.csv"}, '
          f'{out / "validation_curves.png"}, {out / "reliability.png"}')
    if failures:
        print('error: ' + '; '.join(failures), file=sys.stderr)
        return 1
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
    except (BadInput, ValueError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(cli())
