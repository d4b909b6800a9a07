"""Hub and local models by name in train.py and validate.py (issue 24, item 3): ``--model hf-hub:org/name`` and
``--model local-dir:PATH``, the project's models and plain timm models alike, fine-tuned with ``--pretrained
--num-classes K`` (the heads rebuilt, the core kept) and evaluated; the run records what it loaded. Offline: a
tiny trained run is exported (hub.export) and put in a Hugging Face cache built in tmp_path, read with
HF_HUB_OFFLINE=1."""
import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_data_backends import CLASSES, _tar
from test_reliability import one_line_error
from test_train import REPO

from timm_mimo import hub
from timm_mimo.cli import run_cli

sys.path.insert(0, str(REPO))
import train  # noqa: E402
import validate  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

COMMIT = 'c0ffee' + '0' * 34
TINY = ['--img-size', '8', '-b', '4', '--epochs', '1', '--limit-train-batches', '2', '--val-per-class', '1']
# the project's smallest MIMO model, and one of timm's own test models (M = 1)
MODELS = {'mimo': ('wrn16_2_mixmo2', 'head.fc'), 'plain': ('test_resnet', 'fc')}


@pytest.fixture(scope='module', params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(kind, a tiny run trained on the embedded digits (10 classes) and exported in the Hub's layout)."""
    root = tmp_path_factory.mktemp(f'source-{request.param}')
    arch = MODELS[request.param][0]
    assert train.cli([*TINY, '--model', arch, '--output', str(root), '--experiment', 'run']) == 0
    hub.export(root / 'run', root / 'export')
    return request.param, root / 'export'


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, the Hub unreachable (HF_HUB_OFFLINE=1), as huggingface_hub reads
    them at each call."""
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hf_home' / 'hub'
    cache.mkdir(parents=True)
    for name, value in (('HF_HUB_CACHE', str(cache)), ('HF_HUB_OFFLINE', True)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache


def _fine_tune(tmp_path, model, *extra):
    _tar(tmp_path / 'data' / 'train.tar', CLASSES, per_class=4)
    _tar(tmp_path / 'data' / 'test.tar', CLASSES, per_class=2, start=100)
    return train.cli([*TINY, '--model', model, '--data-dir', str(tmp_path / 'data' / 'train.tar'), '--output',
                      str(tmp_path / 'out'), '--experiment', 'tuned', '--num-classes', '3', *extra])


def _check_core_kept_heads_fresh(kind, source_weights, tuned_weights, pretrained: bool):
    """Every core tensor of the fine-tuned run's first step is the source's up to one SGD step; the heads have
    the new shape (M x 3 rows for M members)."""
    head = MODELS[kind][1]
    core = [k for k in source_weights if not k.startswith(head)]
    assert core and all(source_weights[k].shape == tuned_weights[k].shape for k in core)
    num_members = 2 if kind == 'mimo' else 1
    assert tuned_weights[f'{head}.weight'].shape[0] == 3 * num_members  # rebuilt for 3 classes, every member
    assert source_weights[f'{head}.weight'].shape[0] == 10 * num_members
    stem = next(k for k in core if k.endswith('weight') and source_weights[k].dim() == 4)
    drift = (tuned_weights[stem] - source_weights[stem]).abs().max().item()
    assert (drift < 0.05) == pretrained, drift  # two small SGD steps from the source, or a fresh draw


def test_hf_hub_model_fine_tunes_with_new_heads_records_its_commit_and_validates(
        exported, tmp_path, offline_hub, populate_hub_cache, capsys):
    kind, folder = exported
    populate_hub_cache(offline_hub, 'test-org/tiny', folder, commit=COMMIT)
    assert _fine_tune(tmp_path, 'hf-hub:test-org/tiny', '--pretrained') == 0
    run = tmp_path / 'out' / 'tuned'
    record = dict(model='hf-hub:test-org/tiny', hf_hub_id='test-org/tiny', revision=COMMIT)
    assert yaml.safe_load((run / 'args.yaml').read_text())['model_source'] == record
    config = json.loads((run / 'best' / 'config.json').read_text())
    assert config['model_source'] == record and config['num_classes'] == 3
    assert config['architecture'] == MODELS[kind][0]
    _check_core_kept_heads_fresh(kind, load_file(str(folder / 'model.safetensors')),
                                 load_file(str(run / 'best' / 'model.safetensors')), pretrained=True)
    # the fine-tuned run, and the Hub model itself by name, evaluated by validate.py
    results = tmp_path / 'results.json'
    assert run_cli(validate.main, [str(run), '--device', 'cpu', '-j', '0', '--results-file', str(results)]) == 0
    scored = json.loads(results.read_text())
    assert scored['num_samples'] == 6 and scored['model'] == MODELS[kind][0]
    assert run_cli(validate.main, ['--model', 'hf-hub:test-org/tiny', '--pretrained', '--device', 'cpu', '-j', '0',
                                   '--dataset', '', '--img-size', '8', '--results-file', str(results),
                                   '--overwrite']) == 0
    as_published = json.loads(results.read_text())
    assert as_published['model_source'] == record and as_published['num_samples'] > 0
    capsys.readouterr()


def test_local_dir_model_fine_tunes_without_and_with_pretrained_weights(exported, tmp_path, capsys):
    kind, folder = exported
    source = load_file(str(folder / 'model.safetensors'))
    assert _fine_tune(tmp_path, f'local-dir:{folder}') == 0  # the architecture only: fresh weights
    run = tmp_path / 'out' / 'tuned'
    assert yaml.safe_load((run / 'args.yaml').read_text())['model_source'] == dict(
        model=f'local-dir:{folder}', local_dir=str(folder.resolve()))
    _check_core_kept_heads_fresh(kind, source, load_file(str(run / 'best' / 'model.safetensors')), pretrained=False)
    (tmp_path / 'out').rename(tmp_path / 'scratch')
    assert _fine_tune(tmp_path, f'local-dir:{folder}', '--pretrained') == 0
    _check_core_kept_heads_fresh(kind, source, load_file(str(run / 'best' / 'model.safetensors')), pretrained=True)
    # resumed by its folder alone: the recorded model source and data location; only --epochs changed
    assert train.cli(['--resume', str(run), '--epochs', '2']) == 0
    changes = (run / 'resumes.yaml').read_text()
    assert 'model_source' not in changes and '--epochs 2' in changes
    assert json.loads((run / 'results.json').read_text())['epochs'] == 2
    results = tmp_path / 'results.json'
    assert run_cli(validate.main, ['--model', f'local-dir:{folder}', '--pretrained', '--num-classes', '3',
                                   '--data-dir', str(tmp_path / 'data' / 'train.tar'), '--img-size', '8',
                                   '--val-per-class', '1', '--device', 'cpu', '-j', '0', '--results-file',
                                   str(results)]) == 0
    assert json.loads(results.read_text())['num_samples'] == 6
    capsys.readouterr()


def _config_without_architecture(tmp_path, cache):
    folder = tmp_path / 'bad'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(num_classes=3, pretrained_cfg=dict(input_size=[3, 8, 8]))))
    return f'local-dir:{folder}'


def _unregistered_architecture(tmp_path, cache):
    folder = tmp_path / 'bad'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(architecture='bert_base', pretrained_cfg={})))
    return f'local-dir:{folder}'


@pytest.mark.parametrize('make_name,needle', [
    (lambda p, cache: 'hf-hub:test-org/absent', 'hf-hub:test-org/absent: not in the local Hugging Face cache'),
    (_config_without_architecture, 'is not a timm model: its config.json names no'),
    (_unregistered_architecture, "names the architecture 'bert_base', which is not in timm's registry"),
    (lambda p, cache: f'local-dir:{p / "nowhere"}', 'config.json'),
], ids=['hub-absent-offline', 'no-architecture', 'unregistered-architecture', 'no-folder'])
@pytest.mark.parametrize('script', ['train', 'validate'])
def test_a_hub_or_local_name_that_is_not_a_timm_model_is_one_line_and_leaves_no_run_folder(
        make_name, needle, script, tmp_path, offline_hub, capsys):
    name = make_name(tmp_path, offline_hub)
    capsys.readouterr()
    if script == 'train':
        code = train.cli([*TINY, '--model', name, '--pretrained', '--output', str(tmp_path / 'out'), '--experiment',
                          'x'])
        assert not (tmp_path / 'out' / 'x').exists()
    else:
        code = run_cli(validate.main, ['--model', name, '--pretrained', '--dataset', '', '--device', 'cpu',
                                       '--results-file', str(tmp_path / 'r.json')])
        assert not (tmp_path / 'r.json').exists()
    one_line_error(code, capsys.readouterr().err, needle)


def test_a_run_config_with_a_recorded_model_source_is_still_a_valid_config(tmp_path):
    """args.yaml of a hf-hub: run holds model_source beside the flags: `train.py -c <run>/args.yaml` still reads."""
    from timm_mimo.train.args import build_parser, read_config
    path = tmp_path / 'args.yaml'
    path.write_text(yaml.safe_dump(dict(model='hf-hub:test-org/tiny', lr=0.01, model_source=dict(
        model='hf-hub:test-org/tiny', hf_hub_id='test-org/tiny', revision=COMMIT))))
    assert read_config(path, build_parser()) == dict(model='hf-hub:test-org/tiny', lr=0.01)


def test_fine_tuned_heads_are_drawn_afresh_and_the_core_loads_exactly(exported, tmp_path):
    """timm's pretrained load with another class count, through our factory: every core tensor equal to the
    source's, every head of the new shape and not a slice of the old ones."""
    from timm_mimo.models.factory import create_model
    kind, folder = exported
    source = load_file(str(folder / 'model.safetensors'))
    model = create_model(f'local-dir:{folder}', pretrained=True, num_classes=3)
    head = MODELS[kind][1]
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in source.items() if not k.startswith(head))
    new, old = weights[f'{head}.weight'], source[f'{head}.weight']
    assert new.shape[0] * 10 == old.shape[0] * 3
    assert not any(torch.equal(new[i], old[j]) for i in range(new.shape[0]) for j in range(old.shape[0]))
