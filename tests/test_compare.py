"""bench/compare.py: the equal-epochs plan, the summary table, bad input, and one tiny resumable comparison."""
import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
import compare  # noqa: E402

RECIPE = str(REPO / 'configs' / 'digits_mixmo.yaml')


def plan(*argv):
    return compare.plan_runs(compare.build_parser().parse_args(['-c', RECIPE, *argv]))


def test_equal_epochs_rule_b_times_the_steps_at_lr_over_b():
    # the recipe: wrn16_2_mixmo2 at b = 2, lr 0.1 -> lr 0.2 at b = 1; every run keeps B and the epochs
    runs = plan('--models', 'wrn16_2', 'wrn16_2_mixmo2', 'wrn16_2_mixmo2:mix_mode=linear', '--seeds', '2')
    by = {(r['spec'], r['seed']): r for r in runs}
    assert len(runs) == 6 and {r['seed'] for r in runs} == {0, 1}
    vanilla, mimo = by[('wrn16_2', 0)], by[('wrn16_2_mixmo2', 1)]
    assert (vanilla['members'], vanilla['batch_repeat'], vanilla['lr']) == (1, 1, pytest.approx(0.2))
    assert (mimo['members'], mimo['batch_repeat'], mimo['lr']) == (2, 2, pytest.approx(0.1))
    assert vanilla['epochs'] == mimo['epochs']
    assert '-b' not in vanilla['flags']  # the global batch stays the recipe's: b = 2 means 2x the steps
    linear = by[('wrn16_2_mixmo2:mix_mode=linear', 0)]
    assert linear['flags'][-2:] == ['--mix-mode', 'linear'] and linear['folder'].name == 'wrn16_2_mixmo2-mix_mode-linear-s0'
    # shared extras are read into the recipe: an extra --lr is the recipe's lr, still divided by b per run
    runs = plan('--models', 'wrn16_2', 'wrn16_2_mixmo2', '--seeds', '1', '--', '--lr', '0.05', '--epochs', '3')
    assert [(r['lr'], r['epochs']) for r in runs] == [(pytest.approx(0.1), 3), (pytest.approx(0.05), 3)]
    assert all(r['flags'][r['flags'].index('--lr', 4) + 1] == repr(r['lr']) for r in runs)
    # --batch-repeat sets b of the M >= 2 networks only
    runs = plan('--models', 'wrn16_2', 'wrn16_2_mixmo2', '--seeds', '1', '--batch-repeat', '4')
    assert [(r['batch_repeat'], r['lr']) for r in runs] == [(1, pytest.approx(0.2)), (4, pytest.approx(0.05))]


def test_model_kwargs_of_a_spec_add_to_the_recipes():
    """The MixViT fair test's input ablation: a spec's model kwargs join the recipe's (depth, LayerScale)."""
    recipe = str(REPO / 'configs' / 'mixvit' / 'digits_cait_shallow.yaml')
    runs = compare.plan_runs(compare.build_parser().parse_args([
        '-c', recipe, '--seeds', '1', '--models', 'cait_xxs_mixvit2', 'cait_xxs_mixvit2:model_kwargs=attribution=input',
        'cait_xxs_mixvit1:msda=box,model_kwargs=num_members=2,model_kwargs=depth=7']))
    plain, ablation, two = runs
    assert '--model-kwargs' not in plain['flags']  # the recipe's own model_kwargs apply as they are
    flags = ablation['flags']
    assert flags[flags.index('--model-kwargs') + 1:] == ['depth=6', 'init_values=0.1', 'attribution=input']
    assert ablation['members'] == 2 and ablation['batch_repeat'] == 2
    # kwargs decide M too: the M = 1 name built with num_members=2 runs the M >= 2 rule
    assert (two['members'], two['batch_repeat']) == (2, 2) and two['flags'][-5:] == [
        '--model-kwargs', 'depth=6', 'init_values=0.1', 'num_members=2', 'depth=7']


def test_summary_is_mean_and_std_over_seeds():
    rows = [dict(model='a', seed=s, members=2, batch_repeat=2, lr=0.1, split='test', top1=t, nll=0.1, ece=0.01,
                 nll_cal=0.1, ece_cal=0.01, temperature=1.0, best_member_top1=t - 1, member_mean_top1=t - 1.5,
                 ensemble_gain=1.0, disagreement=0.05, member0_top1=t - 1, member1_top1=t - 2, wall_s=10.0,
                 steps=100, params=1e6, flops=1e8, passes=1) for s, t in enumerate((90.0, 92.0, 94.0))]
    summary = compare.summarise(rows, ['a', 'missing'])
    assert len(summary) == 1
    entry = summary[0]
    assert entry['top1_mean'] == pytest.approx(92.0) and entry['top1_std'] == pytest.approx(2.0)
    assert entry['members_top1'] == [pytest.approx(91.0), pytest.approx(90.0)]
    table = compare.markdown_table(summary, 'test')
    assert '92.00 ± 2.00' in table and '91.00 / 90.00' in table


def test_deep_ensemble_reuses_the_vanilla_seeds_and_trains_only_the_missing_ones():
    runs = plan('--models', 'wrn16_2', 'wrn16_2_mixmo2', '--seeds', '2', '--deep-ensemble', '2')
    assert [(r['spec'], r['seed']) for r in runs] == [('wrn16_2', 0), ('wrn16_2', 1), ('wrn16_2_mixmo2', 0),
                                                       ('wrn16_2_mixmo2', 1)]  # N <= seeds: nothing more to train
    runs = plan('--models', 'wrn16_2', 'wrn16_2_mixmo2', '--seeds', '2', '--deep-ensemble', '3')
    vanilla = compare.runs_of(runs, 'wrn16_2')
    # the third vanilla seed serves the ensemble only: the vanilla row stays over --seeds seeds, MIMO gets none
    assert [(r['seed'], r['in_row']) for r in vanilla] == [(0, True), (1, True), (2, False)]
    assert [r['seed'] for r in compare.runs_of(runs, 'wrn16_2_mixmo2')] == [0, 1]


def test_table_reads_vanilla_then_deep_ensemble_then_mimo_with_the_inference_cost():
    order = compare.table_order({'wrn16_2_mixmo2': 2, 'wrn16_2': 1, 'wrn16_2:msda=mixup': 1},
                                ['3 x wrn16_2 (deep ensemble)'])
    assert order == ['wrn16_2', 'wrn16_2:msda=mixup', '3 x wrn16_2 (deep ensemble)', 'wrn16_2_mixmo2']
    common = dict(batch_repeat=1, lr=0.2, split='test', top1=98.0, nll=0.1, ece=0.01, nll_cal=0.1, ece_cal=0.01,
                  temperature=1.0, best_member_top1=None, member_mean_top1=98.0, ensemble_gain=None,
                  disagreement=None, wall_s=10.0, steps=100)
    rows = [dict(common, model='wrn16_2', seed=s, members=1, member0_top1=98.0, params=700_000, flops=2e7,
                 passes=1) for s in range(3)]
    rows.append(dict(common, model='3 x wrn16_2 (deep ensemble)', seeds=3, members=3, member0_top1=98.0,
                     member1_top1=97.0, member2_top1=96.0, params=2_100_000, flops=6e7, passes=3, wall_s=30.0))
    summary = compare.summarise(rows, order)
    assert [(e['model'], e['seeds'], e['rows']) for e in summary] == [
        ('wrn16_2', 3, 3), ('3 x wrn16_2 (deep ensemble)', 3, 1)]
    table = compare.markdown_table(summary, 'test').splitlines()
    assert 'inference: params / FLOPs / passes' in table[0]
    assert '| 0.70 M / 20.0 M / 1 |' in table[2] and '| 2.10 M / 60.0 M / 3 |' in table[3]
    assert '98.00 ± 0.00' in table[2] and '| 98.00 |' in table[3]  # one ensemble: no spread to show


@pytest.mark.parametrize('argv,message', [
    (['--models', 'no_such_net'], 'unknown model'),
    (['--models', 'wrn16_2:mix_mode'], 'is not key=value'),
    (['--models', 'wrn16_2', 'wrn16_2'], 'model specs repeat'),
    (['--models', 'wrn16_2', '--seeds', '0'], '--seeds must be >= 1'),
    (['--models', 'wrn16_2', '--deep-ensemble', '1'], '--deep-ensemble needs N >= 2'),
    (['--models', 'wrn16_2', '--', '--no-such-flag'], 'train.py refuses the flags'),
    (['--models', 'cait_xxs_mixvit2:model_kwargs=depth'], 'model_kwargs takes K=V'),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, tmp_path):
    assert compare.cli(['-c', RECIPE, '--out', str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0]
    assert not any(tmp_path.iterdir())  # nothing written, nothing removed
    assert compare.cli(['-c', str(tmp_path / 'none.yaml'), '--models', 'wrn16_2']) == 2


def test_tiny_comparison_writes_reports_and_resumes(tmp_path, run_script, monkeypatch):
    out = tmp_path / 'cmp'
    argv = [REPO / 'bench' / 'compare.py', '-c', RECIPE, '--models', 'wrn16_2', 'wrn16_2_mixmo2', '--seeds', '1',
            '--deep-ensemble', '2', '--out', out, '--', '--epochs', '2', '--limit-train-batches', '2']
    monkeypatch.setenv('OMP_NUM_THREADS', '2')  # the train.py / validate.py subprocesses compare.py starts
    # compare.py runs in this process (no interpreter start); train.py and validate.py stay subprocesses
    proc = run_script(*argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ('compare.md', 'compare.csv', 'runs.csv', 'validation_curves.png', 'reliability.png'):
        assert (out / name).exists(), name
    with open(out / 'runs.csv') as handle:
        rows = {r['model']: r for r in csv.DictReader(handle)}
    # 2 steps per epoch at the limit for both, 2 epochs; b = 2 doubles the steps only without the limit
    assert rows['wrn16_2']['batch_repeat'] == '1' and rows['wrn16_2_mixmo2']['batch_repeat'] == '2'
    assert rows['wrn16_2']['steps'] == rows['wrn16_2_mixmo2']['steps'] == '4'
    assert rows['wrn16_2_mixmo2']['ensemble_gain'] != '' and rows['wrn16_2']['ensemble_gain'] == ''
    assert float(rows['wrn16_2_mixmo2']['nll_cal']) > 0 and 'ece_cal' in rows['wrn16_2']
    table = (out / 'compare.md').read_text()
    assert '`wrn16_2_mixmo2`' in table and 'ECE (TS)' in table
    # the deep ensemble of seeds 0 and 1 (seed 1 trained for it alone), between vanilla and MIMO
    assert set(rows) == {'wrn16_2', 'wrn16_2_mixmo2'} and len(rows) == 2  # seed 1 is in no per-run row
    lines = [line.split(' | ')[0].strip('| `') for line in table.splitlines() if line.startswith('| `')]
    assert lines == ['wrn16_2', '2 x wrn16_2 (deep ensemble)', 'wrn16_2_mixmo2']
    ensemble = json.loads((out / 'deep_ensembles' / 'wrn16_2-x2' / 'compare_eval.json').read_text())
    vanilla_eval = json.loads((out / 'runs' / 'wrn16_2-s0' / 'compare_eval.json').read_text())
    assert ensemble['num_members'] == 2 and ensemble['ensemble'] == 'mean-prob'
    assert ensemble['cost'] == dict(params=2 * vanilla_eval['cost']['params'],
                                    flops=2 * vanilla_eval['cost']['flops'], forward_passes=2)
    with open(out / 'compare.csv') as handle:
        by_model = {r['model']: r for r in csv.DictReader(handle)}
    assert by_model['2 x wrn16_2 (deep ensemble)']['passes_mean'] == '2.0'

    # a finished run is not rerun; an interrupted one (checkpoint, no results) resumes with --resume
    vanilla = out / 'runs' / 'wrn16_2-s0'
    mimo_results = out / 'runs' / 'wrn16_2_mixmo2-s0' / 'results.json'
    before = mimo_results.stat().st_mtime_ns
    (vanilla / 'results.json').unlink()
    (vanilla / 'compare_eval.json').unlink()
    proc = run_script(*argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert mimo_results.stat().st_mtime_ns == before
    assert '--resume' in proc.stdout and 'wrn16_2_mixmo2 seed 0]' not in proc.stdout
    assert json.loads((vanilla / 'results.json').read_text())['epochs'] == 2
