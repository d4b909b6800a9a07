"""validate.py's OOD detection, selective classification and report on a real pair, through the CLI.

A WRN-16-2 MixMo (M = 2) trained for a few steps on the CIFAR-10 zip is evaluated on 200 held-out CIFAR
images with the embedded digits as the out-of-distribution set; its saved predictions then go through
torchmetrics / TorchUncertainty (tests/test_uncertainty.py's checks) to tie the CLI's numbers to theirs.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_mimo.data import default_cifar10_zip
from timm_mimo.eval.report import report_section
from timm_mimo.eval.uncertainty import ood_metrics, selective_metrics

from test_train import run  # train.py / validate.py in a subprocess, one-line failure report
from test_uncertainty import check_against_libraries

REPO = Path(__file__).resolve().parents[1]
ZIP = default_cifar10_zip()
needs_zip = pytest.mark.skipif(not ZIP.exists(), reason=f'CIFAR-10 zip not found at {ZIP}')
VAL_PER_CLASS = 20  # 200 in-distribution images


def validate_main(*args):
    """validate.main in this process (no interpreter start-up): results dict, or the exception it raises."""
    spec = importlib.util.spec_from_file_location('validate_cli', REPO / 'validate.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


@pytest.fixture(scope='module')
def cifar_run(tmp_path_factory):
    """A briefly trained CIFAR-10 model: 6 steps of 8 unique images x 2 repeats, data read from the zip."""
    out = tmp_path_factory.mktemp('runs')
    run('train.py', '--model', 'wrn16_2_mixmo2', '--dataset', 'cifar10-zip', '--data-dir', ZIP, '--epochs', 1,
        '--limit-train-batches', 6, '-b', 16, '--batch-repeat', 2, '--lr', 0.05, '--seed', 3,
        '--val-per-class', VAL_PER_CLASS, '--device-data', 'off', '--output', out, '--experiment', 'c10')
    return out / 'c10'


@pytest.fixture(scope='module')
def untrained_folder(tmp_path_factory):
    """A plain timm model folder (M = 1, random weights) for the checks that need no trained MIMO model."""
    import timm
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp('resnet') / 'resnet10t'
    save_for_hf(timm.create_model('resnet10t', num_classes=10), str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope='module')
def evaluated(cifar_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('eval')
    proc = run('validate.py', cifar_run, '--ood-dataset', '', '--report', out / 'report',
               '--save-predictions', out / 'predictions.safetensors', '--results-file', out / 'results.json',
               '--results-csv', out / 'results.csv', '--log-interval', 0)
    return out, proc


@needs_zip
def test_cli_reports_ood_selective_and_calibration_metrics(evaluated):
    out, proc = evaluated
    results = json.loads((out / 'results.json').read_text())
    assert results['split'] == 'validation' and results['num_samples'] == 10 * VAL_PER_CLASS
    metrics = results['validation']
    for key in ('ece', 'ece_adaptive', 'ece_classwise', 'aurc', 'augrc', 'risk_at_80', 'risk_at_90',
                'risk_at_95', 'member_ece'):
        assert key in metrics, key
    ood = results['ood']
    assert 'digits' in ood['dataset'] and ood['num_samples'] == 275  # the digits' 15 % test split
    assert set(ood['scores']) == {'msp', 'entropy', 'energy', 'max_logit', 'mutual_info', 'disagreement'}
    assert set(ood['member_scores']) == {'msp', 'entropy', 'energy', 'max_logit'}
    assert all(len(per_member) == 2 for per_member in ood['member_scores'].values())
    for values in ood['scores'].values():
        assert set(values) == {'auroc', 'aupr_in', 'aupr_out', 'fpr95'}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    for score in ('maximum softmax probability', 'predictive entropy', 'mutual information', 'member disagreement',
                  'energy', 'maximum logit'):
        assert f'OOD 1 - {score}' in proc.stdout or f'OOD {score}' in proc.stdout or f'OOD - {score}' in proc.stdout
    assert 'each member alone: AUROC' in proc.stdout and 'forward pass(es)' in proc.stdout
    assert 'AURC' in proc.stdout and 'classwise' in proc.stdout
    # not a terminal: periodic progress lines (every batch with --log-interval 0), one set at a time
    assert 'validation: 1/1 batches, 200 images' in proc.stderr and 'ood: 2/2 batches, 275 images' in proc.stderr
    rows = (out / 'results.csv').read_text().splitlines()
    assert rows[0].startswith('set,') and [r.split(',')[0] for r in rows[1:7]] == [
        'validation', 'ood_msp', 'ood_entropy', 'ood_energy', 'ood_max_logit', 'ood_mutual_info']
    assert [r.split(',')[0] for r in rows[7:]] == ['ood_disagreement'] + [
        f'ood_member{m}_{score}' for score in ('msp', 'entropy', 'energy', 'max_logit') for m in (0, 1)]


@needs_zip
def test_saved_predictions_reproduce_the_numbers_and_equal_the_libraries(evaluated):
    out, _ = evaluated
    saved = load_file(str(out / 'predictions.safetensors'))
    assert saved['logits'].shape == (200, 10) and saved['member_logits'].shape == (200, 2, 10)
    assert saved['ood_logits'].shape == (275, 10) and saved['labels'].shape == (200,)
    results = json.loads((out / 'results.json').read_text())
    recomputed = ood_metrics(saved['logits'], saved['ood_logits'], saved['member_logits'], saved['ood_member_logits'])
    assert set(recomputed) == set(results['ood']['scores'])
    for score, values in recomputed.items():
        assert values == pytest.approx(results['ood']['scores'][score]), score
    selective = selective_metrics(saved['logits'], saved['labels'])
    assert selective == pytest.approx({k: results['validation'][k] for k in selective})
    # real predictions through torchmetrics / TorchUncertainty, every shared metric to 1e-5
    check_against_libraries(saved['logits'], saved['member_logits'], saved['labels'], saved['ood_logits'],
                            saved['ood_member_logits'])


@needs_zip
def test_report_page_links_pictures_that_exist(evaluated):
    out, proc = evaluated
    folder = out / 'report'
    page = (folder / 'report.md').read_text()
    assert f'report: {folder / "report.md"}' in proc.stdout
    for heading in ('Accuracy and calibration', 'Selective classification', 'Out-of-distribution detection'):
        assert heading in page
    linked = [link.split('](')[1].split(')')[0] for line in page.splitlines() for link in line.split('![')[1:]]
    assert set(linked) == {'reliability.png', 'reliability_member0.png', 'reliability_member1.png',
                           'risk_coverage.png', 'ood_msp.png', 'ood_entropy.png', 'ood_energy.png',
                           'ood_max_logit.png', 'ood_mutual_info.png', 'ood_disagreement.png'}
    for name in linked:
        with Image.open(folder / name) as image:
            assert image.format == 'PNG' and image.size[0] >= 600
    assert not list(folder.glob('.*tmp*'))
    # the same page as a model-card section, images under the card's report/ folder, one heading level down
    section = report_section(folder, image_dir='report', heading_level=2)
    assert section.startswith('## Evaluation: wrn16_2_mixmo2') and '](report/risk_coverage.png)' in section
    shifted = [line[1:] if line.startswith('#') else line for line in section.replace('](report/', '](').splitlines()]
    assert '\n'.join(shifted) + '\n' == page


@needs_zip
def test_existing_report_is_kept_without_overwrite(evaluated, cifar_run):
    out, _ = evaluated
    before = (out / 'report' / 'report.md').read_text()
    proc = run('validate.py', cifar_run, '--report', out / 'report', check=False)
    assert proc.returncode == 2 and 'exists' in proc.stderr and 'Traceback' not in proc.stderr
    assert (out / 'report' / 'report.md').read_text() == before


def test_image_folder_path_as_ood_set(untrained_folder, tmp_path):
    """A path is read as an image folder (one subfolder per class), preprocessed like the in-distribution set;
    a single-member model gets the two single-model scores."""
    gen = torch.Generator().manual_seed(0)
    for cls in ('noise_a', 'noise_b'):
        (tmp_path / 'folder' / cls).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / 'folder' / cls / f'{i}.png')
    results = validate_main(untrained_folder, '--dataset', '', '--split', 'validation', '--ood-dataset',
                            tmp_path / 'folder', '--ood-val-per-class', 1, '--ood-max-samples', 2, '-j', 0)
    ood = results['ood']
    assert ood['num_samples'] == 2 and str(tmp_path / 'folder') in ood['dataset']
    assert set(ood['scores']) == {'msp', 'entropy', 'energy', 'max_logit'} and 'member_scores' not in ood


def test_bad_ood_input_is_one_error_line(untrained_folder):
    proc = run('validate.py', untrained_folder, '--dataset', '', '--ood-dataset', '/no/such/folder', check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.startswith('error: --ood-dataset /no/such/folder: neither a file or folder')
    assert 'test:' not in proc.stdout  # refused before the in-distribution evaluation


@pytest.mark.parametrize('args, error, message', [
    (['--ood-dataset', '', '--ood-split', 'validation', '--ood-max-samples', '0'], ValueError,
     '--ood-max-samples must be >= 1'),
    (['--ood-dataset', 'cifar10-zip', '--ood-data-dir', '/no/such.zip'], FileNotFoundError, 'not found'),
])
def test_bad_ood_arguments_raise_before_evaluating(untrained_folder, args, error, message, capsys):
    with pytest.raises(error, match=message):
        validate_main(untrained_folder, '--dataset', '', *args)
    assert 'test:' not in capsys.readouterr().out


def test_ood_set_that_is_the_evaluated_split_is_one_error_line(untrained_folder):
    """Issue 27: the run's own test split as OOD scored AUROC 50 for every score without a word."""
    proc = run('validate.py', untrained_folder, '--dataset', '', '--ood-dataset', '', check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.startswith("error: --ood-dataset '' is the in-distribution data")
    assert len(proc.stderr.strip().splitlines()) == 1 and 'test:' not in proc.stdout


# --- deep ensembles --------------------------------------------------------------------------------------

def model_folder(root, name, seed, **kwargs):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    folder = root / f'{name}-{seed}'
    save_for_hf(timm.create_model(name, **kwargs), str(folder), safe_serialization=True)
    return folder


def run_folder(root, name, seed, **run_args):
    """A training folder as train.py leaves it, as far as validate.py reads it: args.yaml and best/."""
    import yaml

    folder = root / f'run-{seed}'
    folder.mkdir()
    (folder / 'args.yaml').write_text(yaml.safe_dump(dict(model=name, **run_args)))
    model_folder(folder, name, seed).rename(folder / 'best')
    return folder


@pytest.fixture(scope='module')
def ensemble_folders(tmp_path_factory):
    """Two plain WRN-16-2 (M = 1) and one MixMo WRN-16-2 (M = 2), random weights, 10 classes."""
    root = tmp_path_factory.mktemp('ensemble')
    return [model_folder(root, 'wrn16_2', 0), model_folder(root, 'wrn16_2', 1), model_folder(root, 'wrn16_2_mixmo2', 2)]


def test_deep_ensemble_of_plain_and_mimo_runs_is_their_members_through_one_path(ensemble_folders, tmp_path):
    common = ('--dataset', '', '--split', 'validation', '--img-size', 16, '-j', 0)
    results = validate_main(*ensemble_folders, *common, '--ood-dataset', '', '--ood-split', 'test',
                            '--ood-max-samples', 40,
                            '--save-predictions', tmp_path / 'ensemble.safetensors', '--report', tmp_path / 'report')
    assert results['num_members'] == 4 and results['members_per_network'] == [1, 1, 2]
    assert results['ensemble'] == 'mean-prob' and results['model'] == 'deep ensemble: 2 x wrn16_2 + 1 x wrn16_2_mixmo2'
    metrics = results['validation']
    assert len(metrics['member_top1']) == 4 and len(metrics['member_ece']) == 4 and metrics['disagreement'] is not None
    assert results['ood']['dataset'].endswith('[test]')  # another split of the digits: allowed, with a warning
    assert all(len(v) == 4 for v in results['ood']['member_scores'].values())
    # the ensemble's members are exactly each network's members, evaluated alone by the same command
    alone = []
    for index, folder in enumerate(ensemble_folders):
        single = validate_main(folder, *common, '--save-predictions', tmp_path / f'{index}.safetensors')
        alone.append((single, load_file(str(tmp_path / f'{index}.safetensors'))))
    saved = load_file(str(tmp_path / 'ensemble.safetensors'))
    assert torch.allclose(saved['member_logits'], torch.cat([p['member_logits'] for _, p in alone], 1), atol=1e-5)
    assert torch.allclose(saved['logits'].softmax(-1), saved['member_logits'].softmax(-1).mean(1), atol=1e-6)
    cost = results['cost']
    assert cost['forward_passes'] == 3 and [s['cost']['forward_passes'] for s, _ in alone] == [1, 1, 1]
    assert cost['params'] == sum(s['cost']['params'] for s, _ in alone)
    assert cost['flops'] == sum(s['cost']['flops'] for s, _ in alone)
    page = (tmp_path / 'report' / 'report.md').read_text()
    assert 'combined by mean-prob' in page and '3 forward pass(es)' in page and 'Each member alone' in page
    # --ensemble mean-logit: the mean of all four members' logits
    by_logits = validate_main(*ensemble_folders, *common, '--ensemble', 'mean-logit',
                              '--save-predictions', tmp_path / 'by_logits.safetensors')
    assert by_logits['ensemble'] == 'mean-logit'
    logits = load_file(str(tmp_path / 'by_logits.safetensors'))['logits']
    assert torch.allclose(logits, saved['member_logits'].mean(1), atol=1e-5)


def test_runs_that_do_not_match_are_one_error_line(ensemble_folders, tmp_path):
    five_classes = model_folder(tmp_path, 'wrn16_2', 3, num_classes=5)
    proc = run('validate.py', ensemble_folders[0], five_classes, '--dataset', '', check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f'error: the runs do not match: {ensemble_folders[0]} has classes 10 but '
                                  f'{five_classes} has 5')
    # training folders: the data they trained on must agree too
    digits_a = run_folder(tmp_path, 'wrn16_2', 4, dataset='', val_per_class=None)
    digits_b = run_folder(tmp_path, 'wrn16_2', 5, dataset='', val_per_class=20)
    with pytest.raises(ValueError, match="has --val-per-class None but .* has 20"):
        validate_main(digits_a, digits_b)
    with pytest.raises(ValueError, match='has one member'):
        validate_main(ensemble_folders[0], '--dataset', '', '--ensemble', 'mean-prob')


# ------------------------------------------------------------------------------------------------------
# timm_mimo.eval.evaluate, the library function validate.py calls

def test_evaluate_on_a_module_gives_the_results_and_lines_of_validate_py_on_its_folder(tmp_path, capsys, one_thread):
    import timm
    from timm.models import save_for_hf
    from timm_mimo.eval import DataSettings, EvalOptions, OODSettings, evaluate

    model = timm.create_model('wrn16_2_mixmo2', num_classes=10)
    save_for_hf(model, str(tmp_path / 'folder'), model_args=dict(num_members=2), safe_serialization=True)
    capsys.readouterr()
    from_cli = validate_main(tmp_path / 'folder', '--dataset', '', '--split', 'validation', '--img-size', 16,
                             '--ood-dataset', '', '--ood-split', 'test', '--tempscale', '--device', 'cpu')
    printed = capsys.readouterr().out.splitlines()
    lines = []
    in_memory = evaluate(model, DataSettings(dataset='', split='validation', img_size=16), ood=OODSettings(split='test'),
                         options=EvalOptions(device='cpu', tempscale=True), log=lines.append)
    assert in_memory.pop('checkpoint') == 'wrn16_2_mixmo2 (in memory)'
    assert from_cli.pop('checkpoint') == str(tmp_path / 'folder')
    assert in_memory == from_cli and lines == printed and len(lines) == 13  # 3 + 6 OOD scores + 4 per member


def test_the_evaluate_example_of_the_docs_runs_and_writes_its_files(tmp_path, monkeypatch, one_thread):
    from test_readme import python_blocks
    blocks = [code for _, code, skip in python_blocks((REPO / 'docs' / 'evaluation.md').read_text()) if not skip]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], 'docs/evaluation.md', 'exec'), {'__name__': '__docs__'})
    results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
    assert results['split'] == 'validation' and results['num_members'] == 2 and 'temperature' in results['validation']
    assert (tmp_path / 'eval' / 'report' / 'report.md').is_file()
