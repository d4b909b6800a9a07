"""Hub publishing and loading, offline: export -> local-dir:, registered names and hf-hub: from a populated
Hugging Face cache, the push path against a local HTTP server speaking the Hub API, refusal of pickles that
would run code, the token kept out of every output, and bad input.

The push test runs ``hub/push.py`` for real against a small local server that answers the Hub endpoints
huggingface_hub calls (repo creation, branch, README validation, preupload, commit): the whole client path,
with its HTTP requests and token header, runs unchanged; only the server is ours. Uploads go through the
Hub's regular (non-LFS) commit route: the server answers "regular" upload mode and the client runs with
``HF_HUB_DISABLE_XET=1``, since the Xet/LFS storage protocols have no local stand-in. So the test covers
which files are sent, to which repository, revision and commit message, with which credentials; not the
storage backend of the real Hub.
"""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import timm
import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo import hub
from timm_mimo.constants import hub_id
from timm_mimo.rundir import load_model_folder, save_model_folder, write_model_files
from timm_mimo.models.weights import UnsafeCheckpointError, load_weights
from timm_mimo.eval.metrics import classification_metrics
from timm_mimo.eval import ModelSource

REPO = Path(__file__).resolve().parents[1]
# an export of a training run also holds the recipe its model card tells to reproduce it with
RUN_EXPORT_FILES = (*hub.EXPORT_FILES, 'recipe.yaml')
ARCH = 'wrn16_2_mixmo2'
SENTINEL = 'sentinel-token-5f0c2e9a71'  # not shaped like a real token: only the exact-token redaction hides it
SECRET_DIR = '/secret/datasets/cifar10'  # a local path that must not reach a card
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.3, 0.31, 0.32), std=(0.25, 0.26, 0.27), crop_pct=1.0,
                   interpolation='bilinear')
# distinctive metrics of the best epoch, as they must appear in the card
BEST_TEST = dict(top1=87.654, top5=99.125, nll=0.43219, ece=0.03127, brier=0.1876, member_top1=[85.111, 84.222],
                 ensemble_gain=2.543)


pytestmark = pytest.mark.usefixtures('one_thread')


def _script(name):
    return runpy.run_path(str(REPO / 'hub' / f'{name}.py'), run_name=f'hub_{name}')['main']


def run_cli(name, capsys, *args):
    """hub/<name>.py in this process, as its ``__main__`` runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = hub.run_script(_script(name), [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _metrics(model, seed, **values):
    """Metrics in classification_metrics' format, with chosen values where given."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    with torch.no_grad():
        members = model.eval().forward_members(x)
    metrics = classification_metrics(members.mean(1), y, members)
    assert set(values) <= set(metrics)
    metrics.update(values)
    return metrics


def _trained_looking(seed, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=10, **kwargs)
    model.train()
    with torch.no_grad():  # BN statistics that differ from their initial values
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def make_run(root: Path, name: str = 'run', **model_kwargs) -> Path:
    """A train.py output folder: best/ and checkpoint-0003/ (last epoch), args.yaml, results.json."""
    run = root / name
    model_args = dict(drop_rate=0.1, **model_kwargs)  # train.py records its constructor overrides
    best, last = _trained_looking(1, **model_args), _trained_looking(2, **model_args)
    run.mkdir(parents=True)
    save_model_folder(best, run / 'best', model_args, DATA_CONFIG, metrics=dict(epoch=1))
    write_model_files(last, run / 'checkpoint-0003', model_args, DATA_CONFIG)
    (run / 'checkpoint-0003' / 'state').mkdir()  # a complete checkpoint also holds the training state
    (run / 'checkpoint-0003' / 'trainer_state.json').write_text(json.dumps(dict(epoch=3, step=0)))
    train_parser = runpy.run_path(str(REPO / 'train.py'), run_name='train_args')['build_parser']()
    args = train_parser.parse_args(['--model', ARCH, '--dataset', 'torch/cifar10', '--data-dir', SECRET_DIR,
                                    '--output', str(root), '--experiment', name, '--epochs', '3', '--drop', '0.1'])
    (run / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=False))
    results = dict(
        model=ARCH, num_members=2, dataset=f'CIFAR-10 zip {SECRET_DIR}/train.zip: 450 train / 50 validation',
        epochs=3, selection_metric='top1', wall_time_s=125.0, device='cpu', processes=1,
        best=dict(epoch=1, validation=_metrics(best, 0), test=_metrics(best, 1, **BEST_TEST)),
        last=dict(epoch=2, validation=_metrics(last, 0), test=_metrics(last, 1, top1=55.555)),
        deployed='best')
    (run / 'results.json').write_text(json.dumps(results, indent=2))
    return run


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp('runs'))


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory):
    """The run's best weights exported for the registered name wrn16_2_mixmo2.cifar10."""
    out = tmp_path_factory.mktemp('exports') / 'best'
    hub.export(run_dir, out, repo_id=hub_id(ARCH, 'cifar10'))
    return out


def _outputs(model, seed=3):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model.eval()(x), model.forward_members(x)


# ------------------------------------------------------------------------------------------------------
# registry

def test_hub_org_is_checked(monkeypatch):
    """TIMM_MIMO_HUB_ORG itself is read at import: the offline-cache test below runs with test-org."""
    from timm_mimo import constants
    monkeypatch.setenv('TIMM_MIMO_HUB_ORG', 'my-lab')
    assert constants._read_hub_org() == 'my-lab'
    for bad in ('not/an-org', 'a b', '-lab', 'x--y'):
        monkeypatch.setenv('TIMM_MIMO_HUB_ORG', bad)
        with pytest.raises(ValueError, match='TIMM_MIMO_HUB_ORG'):
            constants._read_hub_org()


def test_create_model_errors_name_the_repository_or_the_missing_import(monkeypatch, tmp_path):
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError('Cannot find the requested files in the disk cache')
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', offline)
    with pytest.raises(ValueError) as info:  # a published tag (its hf_hub_id) that is not cached offline
        hub.create_model(f'{ARCH}.cifar100', pretrained=True,
                         pretrained_cfg_overlay=dict(hf_hub_id=hub_id(ARCH, 'cifar100')))
    message = str(info.value)
    assert hub_id(ARCH, 'cifar100') in message and 'cache' in message and '\n' not in message

    def missing(*args, **kwargs):
        raise RepositoryNotFoundError('404 Client Error', response=SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', missing)
    with pytest.raises(ValueError, match=re.escape(hub_id(ARCH, 'cifar10')) + '.*not published'):
        hub.create_model(ARCH, pretrained=True)  # the default tag, cifar10, unpublished: no download tried
    with pytest.raises(ValueError, match='Tags: cifar10, cifar100'):
        hub.create_model(f'{ARCH}.imagenet')
    folder = tmp_path / 'foreign'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(architecture='plugin_net', num_classes=3)))
    with pytest.raises(ValueError, match='import timm_mimo'):
        hub.create_model(f'local-dir:{folder}', pretrained=True)


# ------------------------------------------------------------------------------------------------------
# export

def test_export_loads_back_with_local_dir_and_gives_the_trained_outputs(run_dir, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(RUN_EXPORT_FILES)
    # the card's `python train.py -c recipe.yaml`: the file is there and train.py accepts it
    train_args = runpy.run_path(str(REPO / 'train.py'), run_name='train_args')['parse_args']
    assert train_args(['-c', str(exported / 'recipe.yaml')]).model == ARCH
    assert not [p for p in exported.parent.iterdir() if '.tmp-' in p.name]
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 10 and config['num_features'] == 128
    assert config['model_args']['num_members'] == 2 and config['model_args']['drop_rate'] == 0.1
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'cifar10' and tuple(cfg['mean']) == DATA_CONFIG['mean']
    assert 'num_members' not in cfg and not {'file', 'hf_hub_id', 'source'} & set(cfg)
    timm.models.PretrainedCfg(**cfg)  # timm's hf-hub: / local-dir: parsing needs exactly its fields

    trained = load_model_folder(run_dir / 'best')
    loaded = timm.create_model(f'local-dir:{exported}', pretrained=True)
    assert tuple(loaded.pretrained_cfg['mean']) == DATA_CONFIG['mean']
    _, want, want_members = _outputs(trained)
    _, got, got_members = _outputs(loaded)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_members, want_members, rtol=0, atol=0)
    assert not torch.allclose(want_members[:, 0], want_members[:, 1])  # two different members


def test_model_card_has_metrics_recipe_usage_license_and_citations(exported, tmp_path):
    card = (exported / 'README.md').read_text()
    front = card.split('---')[1]
    assert 'library_name: timm' in front and 'license: apache-2.0' in front and 'uoft-cs/cifar10' in front
    for value in ('87.65', '99.12', '0.4322', '0.0313', '0.1876', '85.11 / 84.22', '2.54'):
        assert value in card, value
    assert '55.55' not in card  # the last epoch's metrics are not the best weights'
    assert 'mix_alpha: 2.0' in card and 'epochs: 3' in card and 'drop: 0.1' in card  # the recipe: train.py flags
    assert '/secret' not in card and 'train.zip' in card  # local paths reduced to their last component
    code = card.split('```python')[1].split('```')[0]
    assert code.index('import timm_mimo') < code.index('timm.create_model(')
    assert f"timm.create_model('{ARCH}.cifar10', pretrained=True)" in code
    assert 'rame2021mixmo' in card and 'sun2022mixvit' not in card and 'liu2022automix' not in card
    # a MixViT or an AutoMix model gets its own citations
    assert hub.citation_keys('cait_xs_mixvit2', {}, {}) == ['mixvit']
    assert hub.citation_keys(ARCH, {}, {'msda': 'automix'}) == ['mixmo', 'automix']


def test_export_of_the_last_checkpoint_uses_the_last_epoch_metrics(run_dir, tmp_path):
    out = tmp_path / 'last'
    hub.export(run_dir, out, which='last')
    card = (out / 'README.md').read_text()
    assert '55.55' in card and '87.65' not in card and 'epoch 2' in card
    # the card's usage snippet runs as written (the export's folder and an image of ours filled in)
    from PIL import Image
    Image.new('RGB', (40, 40), (200, 30, 90)).save(tmp_path / 'image.png')
    code = card.split('```python')[1].split('```')[0]
    code = code.replace('/path/to/this/folder', str(out)).replace("'image.png'", repr(str(tmp_path / 'image.png')))
    namespace = {}
    exec(code, namespace)
    assert namespace['logits'].shape == (1, 10) and namespace['members'].shape == (1, 2, 10)
    # a checkpoint folder given directly is the same weights
    hub.export(run_dir / 'checkpoint-0003', tmp_path / 'ckpt')
    assert load_file(str(tmp_path / 'ckpt' / 'model.safetensors')).keys() == load_file(
        str(out / 'model.safetensors')).keys()


def test_non_default_constructor_arguments_survive_the_export(tmp_path):
    run = make_run(tmp_path, 'probs', ensemble='probs')
    hub.export(run, tmp_path / 'out', repo_id='someone/probs-model')
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['model_args']['ensemble'] == 'probs'
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert model.ensemble == 'probs'
    assert "hf-hub:someone/probs-model" in (tmp_path / 'out' / 'README.md').read_text()
    # the registered name would build ensemble='logits' from these weights: refused for its repository
    with pytest.raises(ValueError, match="ensemble='probs'.*hf-hub:"):
        hub.export(run, tmp_path / 'out2', repo_id=hub_id(ARCH, 'cifar10'))
    assert not (tmp_path / 'out2').exists()


def test_export_bad_input_gives_one_line_errors_and_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / 'out'
    no_results = tmp_path / 'no_results'
    no_results.mkdir()
    for name in ('best', 'args.yaml'):
        src = run_dir / name
        (no_results / name).symlink_to(src, target_is_directory=src.is_dir())
    other = json.loads((run_dir / 'results.json').read_text())
    other['model'] = 'wrn28_10_mixmo2'
    (tmp_path / 'other.json').write_text(json.dumps(other))
    weights = run_dir / 'best' / 'model.safetensors'
    validated = dict(checkpoint=str(weights), model=ARCH, num_members=2, dataset='d', split='test',
                     test=other['best']['test'])  # validate.py --results-file
    (tmp_path / 'val.json').write_text(json.dumps(validated))
    cases = [
        ((no_results, out), ('no results.json',)),
        ((run_dir, out, '--model', 'wrn16_4_mixmo2'), ('holds a wrn16_2_mixmo2, not a wrn16_4_mixmo2',)),
        ((run_dir, out, '--num-classes', 100), ('predicts 10 classes, not 100',)),
        ((run_dir, out, '--tag', 'cifar100'), ('wrn16_2_mixmo2.cifar100 has 100 classes',)),
        ((run_dir, out, '--results', tmp_path / 'other.json'), ('results are for a wrn28_10_mixmo2',)),
        ((weights, out, '--model', ARCH, '--num-classes', 100, '--results', tmp_path / 'val.json'),
         ('does not match the model',)),
        ((weights, out, '--model', ARCH, '--results', run_dir / 'results.json'), ('best and last epochs',)),
        ((weights, out), ('--model',)),
        ((run_dir / 'missing', out), ('not found',)),
        ((run_dir, run_dir / 'best', '--overwrite'), ('would replace the checkpoint',)),
    ]
    for args, fragments in cases:
        code, _, err = run_cli('export', capsys, *args)
        assert_one_line_error(code, err, *fragments)
        assert not out.exists(), args
    assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]
    assert (run_dir / 'best' / 'model.safetensors').exists()

    # an existing, non-empty folder is kept unless --overwrite, which replaces it whole
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    code, _, err = run_cli('export', capsys, run_dir, out)
    assert_one_line_error(code, err, 'exists and is not empty', '--overwrite')
    assert (out / 'keep.txt').read_text() == 'mine'
    code, stdout, _ = run_cli('export', capsys, run_dir, out, '--overwrite')
    assert code == 0 and 'exported wrn16_2_mixmo2.cifar10' in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_EXPORT_FILES)

    for repo_id in ('no-slash', 'a/b/c', 'org/na me', 'org--x/name', '-org/name'):
        code, _, err = run_cli('push', capsys, run_dir, f'--repo-id={repo_id}', '--dry-run')
        assert_one_line_error(code, err, 'org/name')


# ------------------------------------------------------------------------------------------------------
# security

class _RunsCode:
    """Unpickling this writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").write("pwned")',)


def test_a_checkpoint_that_would_run_code_is_refused(run_dir, tmp_path, capsys):
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    state = load_file(str(run_dir / 'best' / 'model.safetensors'))
    torch.save({'state_dict': state, 'payload': _RunsCode(marker)}, evil)
    model = timm.create_model(ARCH, num_classes=10)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(model, evil)
    message = str(info.value)
    assert message.startswith(f'refusing to load {evil}: it is not a plain tensor checkpoint (weights_only load '
                              f'failed: ') and 'exec' in message and 'weights_only=False' not in message
    validated = json.loads((run_dir / 'results.json').read_text())
    validated.update(split='test', test=validated['best']['test'])  # validate.py --results-file format
    (tmp_path / 'val.json').write_text(json.dumps(validated))
    code, _, err = run_cli('export', capsys, evil, tmp_path / 'out', '--model', ARCH, '--results',
                           tmp_path / 'val.json')
    assert_one_line_error(code, err, 'refusing to load', 'not a plain tensor checkpoint')
    with pytest.raises(UnsafeCheckpointError):
        ModelSource(checkpoints=[str(evil)], name=ARCH).load()  # what validate.py and evaluate() load with
    assert not marker.exists() and not (tmp_path / 'out').exists()
    # the same tensors saved plainly load fine
    torch.save({'state_dict': state}, tmp_path / 'plain.pth')
    load_weights(model, tmp_path / 'plain.pth')


def test_upload_takes_only_regular_files_inside_the_export_folder(exported, tmp_path):
    folder = tmp_path / 'export'
    folder.mkdir()
    for name in hub.EXPORT_FILES:
        (folder / name).write_bytes((exported / name).read_bytes())
    (folder / 'notes.txt').write_text('not for the Hub')
    assert hub.upload_files(folder) == list(hub.EXPORT_FILES)
    outside = tmp_path / 'private.safetensors'
    outside.write_bytes(b'secret')
    (folder / 'model.safetensors').unlink()
    (folder / 'model.safetensors').symlink_to(outside)
    with pytest.raises(ValueError, match='is not a regular file inside .*: refusing to upload it'):
        hub.upload_files(folder)


# ------------------------------------------------------------------------------------------------------
# loading from the Hub cache, offline

OFFLINE_SCRIPT = r'''
import json, sys, torch, timm, timm_mimo
from safetensors.torch import load_file
from timm_mimo.hub import create_model
ref = load_file(sys.argv[1])
result = {}
for name in ('wrn16_2_mixmo2.cifar10', 'hf-hub:test-org/wrn16_2_mixmo2.cifar10'):
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        same = torch.equal(model(ref['x']), ref['y']) and torch.equal(model.forward_members(ref['x']), ref['members'])
    result[name] = dict(hf_hub_id=model.pretrained_cfg.get('hf_hub_id'), same=same)
try:
    create_model('wrn16_2_mixmo2.cifar100', pretrained=True)
except ValueError as e:
    result['unpublished'] = str(e)
from timm_mimo.eval import ModelSource
try:
    ModelSource(name='wrn16_2_mixmo2.cifar100', pretrained=True).load()
except ValueError as e:
    result['validate'] = str(e)
print(json.dumps(result))
'''


def test_registered_name_and_hf_hub_load_from_an_offline_cache(exported, tmp_path, populate_hub_cache):
    home = tmp_path / 'hf_home'
    populate_hub_cache(home / 'hub', 'test-org/wrn16_2_mixmo2.cifar10', exported)
    x, y, members = _outputs(timm.create_model(f'local-dir:{exported}', pretrained=True))
    save_file(dict(x=x, y=y, members=members), str(tmp_path / 'ref.safetensors'))
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE='1', TIMM_MIMO_HUB_ORG='test-org', OMP_NUM_THREADS='1',
               TIMM_MIMO_PUBLISHED='wrn16_2_mixmo2.cifar10')
    proc = subprocess.run([sys.executable, '-c', OFFLINE_SCRIPT, str(tmp_path / 'ref.safetensors')], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['wrn16_2_mixmo2.cifar10'] == dict(hf_hub_id='test-org/wrn16_2_mixmo2.cifar10', same=True)
    assert result['hf-hub:test-org/wrn16_2_mixmo2.cifar10']['same']
    for key in ('unpublished', 'validate'):  # cifar100 is not in TIMM_MIMO_PUBLISHED: no download is tried
        assert 'test-org/wrn16_2_mixmo2.cifar100 is not published' in result[key], result[key]
        assert '\n' not in result[key]


# ------------------------------------------------------------------------------------------------------
# push

def _all_written_bytes(root: Path):
    for path in root.rglob('*'):
        if path.is_file() and not path.is_symlink():
            yield path, path.read_bytes()


def test_push_uploads_the_export_to_the_hub_api_with_the_token_from_the_environment(run_dir, tmp_path, fake_hub):
    export_dir = tmp_path / 'pushed'
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    with fake_hub() as server:
        env.update(HF_ENDPOINT=server.url, HF_TOKEN=SENTINEL, HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf'),
                   HF_HUB_DISABLE_TELEMETRY='1', TIMM_MIMO_HUB_ORG='test-org', OMP_NUM_THREADS='1')
        proc = subprocess.run(
            [sys.executable, str(REPO / 'hub' / 'push.py'), str(run_dir), '--repo-id',
             'test-org/wrn16_2_mixmo2.cifar10', '--private', '--revision', 'v1', '-m', 'First weights',
             '--export-dir', str(export_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.created == [dict(name='wrn16_2_mixmo2.cifar10', organization='test-org', visibility='private')]
    assert server.branches == [('test-org/wrn16_2_mixmo2.cifar10', 'v1')]
    [commit] = server.commits
    assert commit['repo'] == 'test-org/wrn16_2_mixmo2.cifar10' and commit['revision'] == 'v1'
    assert commit['summary'] == 'First weights' and commit['other'] == []
    assert commit['files'] == {name: (export_dir / name).read_bytes() for name in RUN_EXPORT_FILES}
    assert not server.unexpected
    assert server.requests and all(r['auth'] == f'Bearer {SENTINEL}' for r in server.requests)
    assert 'uploaded' in proc.stdout and 'test-org/wrn16_2_mixmo2.cifar10@v1' in proc.stdout
    # the token only ever travelled in the Authorization header
    assert SENTINEL not in proc.stdout + proc.stderr
    for path, data in _all_written_bytes(tmp_path):
        assert SENTINEL.encode() not in data, path
    assert not any(SENTINEL.encode() in data for data in commit['files'].values())


def test_push_dry_run_and_failures_contact_nothing_or_say_so_without_the_token(run_dir, tmp_path, capsys,
                                                                              monkeypatch, fake_hub):
    from huggingface_hub import constants
    monkeypatch.setenv('HF_TOKEN', SENTINEL)
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)
    repo = 'someone/model'
    # the server answers every request with an error that quotes the token back
    with fake_hub(fail_with=(403, dict(error=f'token {SENTINEL} may not write here'))) as server:
        monkeypatch.setattr(constants, 'ENDPOINT', server.url)
        code, out, err = run_cli('push', capsys, run_dir, '--repo-id', repo, '--dry-run', '--export-dir',
                                 tmp_path / 'dry')
        assert code == 0 and 'dry run: would upload README.md' in out and 'token: found' in out
        assert not server.requests and sorted(p.name for p in (tmp_path / 'dry').iterdir()) == sorted(
            RUN_EXPORT_FILES)

        code, out, err = run_cli('push', capsys, run_dir, '--repo-id', repo)
        assert_one_line_error(code, err, f'upload to {repo} failed', 'HTTP 403: token *** may not write here')
        assert server.requests and SENTINEL not in out + err
        # --debug shows the traceback, the chained huggingface_hub error included, with the token removed
        code, out, err = run_cli('push', capsys, run_dir, '--repo-id', repo, '--debug')
        assert code == 2 and 'Traceback' in err and 'HfHubHTTPError' in err and '***' in err
        assert SENTINEL not in out + err

        monkeypatch.delenv('HF_TOKEN')
        monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
        count = len(server.requests)
        code, out, err = run_cli('push', capsys, run_dir, '--repo-id', repo, '--export-dir', tmp_path / 'none')
        assert_one_line_error(code, err, 'no Hugging Face token', 'HF_TOKEN')
        assert len(server.requests) == count and not (tmp_path / 'none').exists()
    for path, data in _all_written_bytes(tmp_path):
        assert SENTINEL.encode() not in data, path


def test_export_with_an_evaluation_report_puts_it_in_the_card_and_uploads_its_pictures(run_dir, tmp_path):
    from timm_mimo.eval.report import write_report
    torch.manual_seed(0)
    logits, members, labels = torch.randn(40, 10), torch.randn(40, 2, 10), torch.randint(0, 10, (40,))
    results = dict(model=ARCH, split='test', num_members=2,
                   test=classification_metrics(logits, labels, members))
    from timm_mimo.eval.uncertainty import uncertainty_metrics
    results['test'].update(uncertainty_metrics(logits, labels, members))
    write_report(tmp_path / 'report', results, logits, members, labels)
    out = tmp_path / 'export'
    result = hub.export(run_dir, out, report=str(tmp_path / 'report'))
    pictures = sorted(p.name for p in (out / 'report').glob('*.png'))
    assert pictures and [f'report/{p}' for p in pictures] == [f for f in result.files if f.startswith('report/')]
    card = (out / 'README.md').read_text()
    assert all(f'report/{p}' in card for p in pictures)
    assert hub.upload_files(out) == result.files
