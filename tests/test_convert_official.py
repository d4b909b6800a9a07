"""hub/convert_official.py: checkpoints of the official MixMo code -> timm's Hub format -> the Hub -> timm.

The official checkpoints are built here from the official code's naming (mixmo/networks/{wrn,resnet}.py
of github.com/alexrame/mixmo-pytorch, docs/methods/mixmo.md §4) and layout (``AbstractLearner.save_checkpoint``:
``{'epoch', 'classifier_state_dict', 'classifier_optimizer_state_dict'}``), and their outputs are computed
by :func:`official_forward`, a functional transcription of the official forward pass in eval mode (the
same image into every encoder, features summed, member logits averaged). A converted model must give
those outputs, so a mapping that swaps two same-shaped tensors (bn1 / bn2 of a block, two members) fails.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import timm
import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo import hub
from timm_mimo.hub import official
from timm_mimo.models import official as official_table
from timm_mimo.constants import hub_id
from timm_mimo.hub.official import OFFICIAL_ROWS, OfficialCheckpointError, OfficialRow, convert_state_dict

REPO = Path(__file__).resolve().parents[1]
CONVERT = REPO / 'hub' / 'convert_official.py'


pytestmark = pytest.mark.usefixtures('one_thread')


# ------------------------------------------------------------------------------------------------------
# official networks, from the official naming

def _bn(prefix, chs, gen, device):
    if device == 'meta':
        return {f'{prefix}.{k}': torch.empty(chs if k != 'num_batches_tracked' else (), device='meta')
                for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}
    return {f'{prefix}.weight': 1 + 0.2 * torch.randn(chs, generator=gen), f'{prefix}.bias': 0.1 * torch.randn(chs, generator=gen),
            f'{prefix}.running_mean': 0.1 * torch.randn(chs, generator=gen),
            f'{prefix}.running_var': 0.5 + torch.rand(chs, generator=gen),
            f'{prefix}.num_batches_tracked': torch.tensor(1000)}


def _conv(shape, gen, device):
    if device == 'meta':
        return torch.empty(shape, device='meta')
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen) * (2 / fan_in) ** 0.5


def official_state(family, width, members, num_classes, depth=28, device='cpu', seed=0):
    """The state dict of the official WideResNet(MixMo)(depth, width) or PreActResNet(MixMo)-18 (width)."""
    gen = torch.Generator().manual_seed(seed)
    if family == 'wrn':
        blocks, stem, chs = (depth - 4) // 6, 16, [16 * width, 32 * width, 64 * width]
    else:
        blocks, stem, chs = 2, 64, [64 * width, 128 * width, 256 * width, 512 * width]
    state = {}
    encoders = ['conv1.weight'] if members == 1 else [f'list_conv1.{k}.weight' for k in range(members)]
    for key in encoders:
        state[key] = _conv((stem, 3, 3, 3), gen, device)
    in_chs = stem
    for s, out_chs in enumerate(chs, start=1):
        for b in range(blocks):
            p = f'layer{s}.{b}'
            state.update(_bn(f'{p}.bn1', in_chs, gen, device))
            state[f'{p}.conv1.weight'] = _conv((out_chs, in_chs, 3, 3), gen, device)
            state.update(_bn(f'{p}.bn2', out_chs, gen, device))
            state[f'{p}.conv2.weight'] = _conv((out_chs, out_chs, 3, 3), gen, device)
            stride = 2 if (b == 0 and s > 1) else 1
            if stride != 1 or in_chs != out_chs:
                state[f'{p}.shortcut.0.weight'] = _conv((out_chs, in_chs, 1, 1), gen, device)
            in_chs = out_chs
    if family == 'wrn':
        state.update(_bn('bn1', in_chs, gen, device))
    heads = ['fc'] if members == 1 else [f'list_fc.{k}' for k in range(members)]
    for head in heads:
        state[f'{head}.weight'] = _conv((num_classes, in_chs, 1, 1), gen, device).flatten(1)
        state[f'{head}.bias'] = (torch.empty(num_classes, device='meta') if device == 'meta'
                                 else 0.1 * torch.randn(num_classes, generator=gen))
    return state


def _batch_norm(x, state, prefix):
    return F.batch_norm(x, state[f'{prefix}.running_mean'], state[f'{prefix}.running_var'],
                        state[f'{prefix}.weight'], state[f'{prefix}.bias'], training=False, eps=1e-5)


def official_forward(state, family, x):
    """Member logits (B, M, K) of the official network in eval mode, from its state dict."""
    members = sorted({k.split('.')[1] for k in state if k.startswith('list_conv1.')}) or [None]
    stem_stride = 1 if family == 'wrn' else 2
    encoder = (lambda m: state['conv1.weight'] if m is None else state[f'list_conv1.{m}.weight'])
    out = sum(F.conv2d(x, encoder(m), stride=stem_stride, padding=1) for m in members)
    stages = sorted({int(k.split('.')[0][5:]) for k in state if k.startswith('layer')})
    for s in stages:
        blocks = sorted({int(k.split('.')[1]) for k in state if k.startswith(f'layer{s}.')})
        for b in blocks:
            p = f'layer{s}.{b}'
            stride = 2 if (b == 0 and s > 1) else 1
            projection = state.get(f'{p}.shortcut.0.weight')
            act = F.relu(_batch_norm(out, state, f'{p}.bn1'))
            if family == 'wrn':  # conv stride on conv2, zero padding right/bottom before it
                h = F.relu(_batch_norm(F.conv2d(act, state[f'{p}.conv1.weight'], padding=1), state, f'{p}.bn2'))
                h = F.conv2d(F.pad(h, (0, 1, 0, 1)), state[f'{p}.conv2.weight'], stride=2) if stride == 2 else \
                    F.conv2d(h, state[f'{p}.conv2.weight'], padding=1)
                shortcut = out if projection is None else F.conv2d(out, projection, stride=stride)
            else:  # stride on conv1; the projection reads the activated input
                h = F.conv2d(act, state[f'{p}.conv1.weight'], stride=stride, padding=1)
                h = F.conv2d(F.relu(_batch_norm(h, state, f'{p}.bn2')), state[f'{p}.conv2.weight'], padding=1)
                shortcut = out if projection is None else F.conv2d(act, projection, stride=stride)
            out = h + shortcut
    if family == 'wrn':
        out = F.relu(_batch_norm(out, state, 'bn1'))
    pooled = out.mean((2, 3))
    heads = ['fc'] if members == [None] else [f'list_fc.{m}' for m in members]
    return torch.stack([F.linear(pooled, state[f'{h}.weight'], state[f'{h}.bias']) for h in heads], 1)


def save_official(path, state, epoch=273):
    """An official checkpoint file: network and SGD state under the config's model_wrapper name."""
    optimizer = dict(state={0: dict(momentum_buffer=torch.zeros(3))},
                     param_groups=[dict(lr=0.0125, momentum=0.9, nesterov=True, weight_decay=0, params=[0])])
    torch.save({'epoch': epoch, 'classifier_state_dict': state, 'classifier_optimizer_state_dict': optimizer}, path)
    return path


# ------------------------------------------------------------------------------------------------------
# the key mapping

@pytest.mark.parametrize('arch,family,width,depth,members,num_classes', [
    ('wrn28_10', 'wrn', 10, 28, 1, 100),
    ('wrn28_10_mixmo2', 'wrn', 10, 28, 2, 10),
    ('wrn28_10_mixmo3', 'wrn', 10, 28, 3, 100),
    ('preactresnet18', 'preact', 1, 18, 1, 200),
    ('preactresnet18_w2_mixmo2', 'preact', 2, 18, 2, 200),
    ('preactresnet18_w3_mixmo2', 'preact', 3, 18, 2, 200),
])
def test_every_official_key_maps_to_a_key_of_the_same_shape(arch, family, width, depth, members, num_classes):
    state = official_state(family, width, members, num_classes, depth=depth, device='meta')
    with torch.device('meta'):
        target = timm.create_model(arch, num_classes=num_classes).state_dict()
    converted = convert_state_dict(state, target, members, arch)
    assert list(converted) == list(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    # one stacked stem and one stacked head replace the M encoders and M heads
    assert len(state) == len(target) + 3 * (members - 1)
    assert official.official_num_members(state) == members


@pytest.mark.parametrize('arch,family,members,num_classes,size', [
    ('wrn16_2', 'wrn', 1, 10, 32),
    ('wrn16_2_mixmo2', 'wrn', 3, 100, 32),  # M = 3 (num_members override), CIFAR-100 head
    ('preactresnet18_mixmo2', 'preact', 2, 200, 64),
])
def test_converted_model_gives_the_official_outputs(arch, family, members, num_classes, size):
    state = official_state(family, 2 if family == 'wrn' else 1, members, num_classes, depth=16, seed=members)
    model = timm.create_model(arch, num_classes=num_classes, num_members=members).eval()
    model.load_state_dict(convert_state_dict(state, model.state_dict(), members, arch))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = official_forward(state, family, x)
        torch.testing.assert_close(model.forward_members(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), want.mean(1), rtol=1e-4, atol=1e-4)
    assert want.shape == (2, members, num_classes)


def test_mapping_names_every_unmapped_missing_and_misshaped_key():
    state = official_state('wrn', 2, 2, 10, depth=16, device='meta')
    del state['layer2.0.shortcut.0.weight'], state['list_fc.1.bias']
    state['layer4.0.conv1.weight'] = torch.empty(1, device='meta')
    state['list_conv1.0.weight'] = torch.empty(16, 3, 5, 5, device='meta')
    with torch.device('meta'):
        target = timm.create_model('wrn16_2_mixmo2').state_dict()
    with pytest.raises(OfficialCheckpointError) as info:
        convert_state_dict(state, target, 2, 'wrn16_2_mixmo2')
    message = str(info.value)
    assert '\n' not in message
    for fragment in ('layer4.0.conv1.weight', 'list_fc.1.bias (for head.fc.bias)', 'stages.1.0.shortcut.weight',
                     'list_conv1.0.weight (16, 3, 5, 5) (model: (16, 3, 3, 3) per member)'):
        assert fragment in message, (fragment, message)


def test_every_official_row_is_a_registered_tag_of_the_right_data_set():
    assert len(OFFICIAL_ROWS) == 25 and len({row.name for row in OFFICIAL_ROWS}) == 25
    for row in OFFICIAL_ROWS:
        cfg = timm.models.get_pretrained_cfg(row.name, allow_unregistered=False)
        assert cfg is not None and cfg.num_classes == official_table.DATASETS[row.dataset][0], row
        assert not cfg.has_weights  # registered, not published: no weights promised
        assert row.config.startswith('config/') and row.config.endswith('.yaml')
    best = official_table.official_row('wrn28_10_mixmo2', 'official_cut_mixmo_cutmix_cifar100')
    assert best.top1 == (85.77, 85.92) and official_table.official_row('wrn28_10_mixmo3', 'cifar100') is None


# ------------------------------------------------------------------------------------------------------
# the command line

def run_convert(*args):
    """hub/convert_official.py in a fresh process, as a user runs it: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, str(CONVERT), *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def run_convert_here(capsys, *args):
    """The same in this process (the error cases: no interpreter start per case)."""
    capsys.readouterr()
    main = runpy.run_path(str(CONVERT), run_name='convert_official')['main']
    code = hub.run_script(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1', **extra)
    return env


def assert_one_line_error(code, err, *fragments):
    """Exit code 2 and exactly one stderr line, ``error: ...``, holding every fragment."""
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: '), (code, err)
    missing = [fragment for fragment in fragments if fragment not in err]
    assert not missing, (missing, err)


@pytest.fixture(scope='module')
def wrn_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp('official')
    state = official_state('wrn', 2, 2, 10, depth=16, seed=5)
    return save_official(root / 'wrn16_2_mixmo2.ckpt', state), state


@pytest.fixture(scope='module')
def converted(wrn_checkpoint, tmp_path_factory):
    """wrn16_2_mixmo2.cifar10 converted, measured by validate.py on the embedded digits."""
    out = tmp_path_factory.mktemp('converted') / 'wrn16_2_mixmo2.cifar10'
    code, stdout, stderr = run_convert(wrn_checkpoint[0], out, '--model', 'wrn16_2_mixmo2', '--num-classes', 10,
                                       '--dataset', '')
    assert code == 0, stderr
    assert 'converted' in stdout and 'measured (test): top-1' in stdout
    return out


def test_cli_writes_timm_hub_format_with_the_official_outputs_and_a_card(wrn_checkpoint, converted):
    assert sorted(p.name for p in converted.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in converted.parent.iterdir() if '.tmp-' in p.name]
    config = json.loads((converted / 'config.json').read_text())
    assert config['architecture'] == 'wrn16_2_mixmo2' and config['num_classes'] == 10
    assert config['model_args']['num_members'] == 2 and config['pretrained_cfg']['tag'] == 'cifar10'
    model = timm.create_model(f'local-dir:{converted}', pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_members(x), official_forward(wrn_checkpoint[1], 'wrn', x),
                                   rtol=1e-4, atol=1e-4)
    card = (converted / 'README.md').read_text()
    assert 'library_name: timm' in card and 'license: apache-2.0' in card and '- uoft-cs/cifar10' in card
    for fragment in ('not one of the checkpoints its README lists', 'arxiv.org/abs/2103.06132', 'saved at epoch 273',
                     'no row of the official README', 'Measured on these converted weights', '| test |',
                     "timm.create_model('wrn16_2_mixmo2.cifar10', pretrained=True)", 'rame2021mixmo'):
        assert fragment in card, fragment


def test_card_states_the_papers_row(tmp_path):
    state = official_state('preact', 1, 2, 200, seed=3)
    source = save_official(tmp_path / 'tiny_cut.ckpt', state, epoch=1190)
    out = tmp_path / 'out'
    code, stdout, stderr = run_convert(source, out, '--model', 'preactresnet18_mixmo2', '--num-classes', 200,
                                       '--tag', 'official_cut_mixmo_tiny_imagenet')
    assert code == 0, stderr
    card = (out / 'README.md').read_text()
    for fragment in ('Cut-MixMo on Tiny ImageNet: top-1 64.32 %', 'released for the README row "Cut-MixMo"',
                     'trained with its config `config/tiny/exp_tinyimagenet_res18-2_cutmixmo-p5_standard_bar4.yaml`',
                     'Not measured at conversion', 'saved at epoch 1190'):
        assert fragment in card, fragment
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.pretrained_cfg['input_size'] == (3, 64, 64) and model.num_classes == 200


class _WritesAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), 'ran'))


def test_bad_input_gives_one_line_errors_and_writes_nothing(wrn_checkpoint, converted, tmp_path, capsys):
    source, state = wrn_checkpoint
    out = tmp_path / 'out'
    args = ('--model', 'wrn16_2_mixmo2', '--num-classes', 10)

    marker = tmp_path / 'marker'
    torch.save({'classifier_state_dict': state, 'epoch': _WritesAFile(marker)}, tmp_path / 'evil.ckpt')
    bare = dict(state)
    torch.save(bare, tmp_path / 'bare.ckpt')
    broken = dict(state)
    del broken['layer1.0.bn2.weight']
    broken['extra.weight'] = torch.zeros(1)
    save_official(tmp_path / 'broken.ckpt', broken)
    save_official(tmp_path / 'm3.ckpt', official_state('wrn', 2, 3, 10, depth=16))
    (tmp_path / 'truncated.ckpt').write_bytes(source.read_bytes()[:5000])  # a download cut short
    cases = [
        ((tmp_path / 'evil.ckpt', out, *args), ('refusing to load', 'not a plain tensor checkpoint')),
        ((tmp_path / 'bare.ckpt', out, *args), ('not a checkpoint of the official MixMo code', 'classifier_state_dict')),
        ((tmp_path / 'truncated.ckpt', out, *args), ('cannot read', 'as a torch checkpoint')),
        ((tmp_path / 'missing.ckpt', out, *args), ('official checkpoint not found',)),
        ((tmp_path / 'broken.ckpt', out, *args), ('unmapped official keys (1): extra.weight',
                                                  'does not fill (1): stages.0.0.norm2.weight')),
        ((tmp_path / 'm3.ckpt', out, *args), ('M = 3 subnetworks', 'wrn16_2_mixmo2 has M = 2')),
        ((source, out, '--model', 'wrn16_2_mixmo2', '--num-classes', 100, '--tag', 'cifar10'), ('has 10 classes',)),
        ((source, out, '--model', 'wrn16_2_mixmo2', '--num-classes', 100), ('shapes that differ', 'list_fc.0.weight (10, 128) (model: (100, 128) per member)')),
        ((source, out, *args, '--tag', 'imagenet'), ('not a registered tag', 'cifar100')),
        ((source, out, '--model', 'cait_xxs_mixvit2', '--num-classes', 10), ('WideResNet and PreActResNet',)),
        ((source, out, *args, '--verify'), ('--verify', '--dataset')),
        ((source, out, *args, '--verify', '--dataset', ''), ('no row for wrn16_2_mixmo2.cifar10',)),
        ((source, out, *args, '--dataset', 'torch/none'), ('evaluating the converted weights failed',
                                                           'torch/none')),
        ((source, out, '--model', 'preactresnet18_mixmo2', '--num-classes', 200, '--dataset', ''),
         ('shapes that differ',)),
        ((source, converted, *args), ('exists and is not an empty folder', '--overwrite')),
        ((source, source.parent, *args, '--overwrite'), ('holds the checkpoint', 'would replace it')),
    ]
    before = (converted / 'model.safetensors').read_bytes()
    for argv, fragments in cases:
        code, _, err = run_convert_here(capsys, *argv)
        assert_one_line_error(code, err, *fragments)
        assert not out.exists()
    assert not marker.exists() and source.exists()
    assert (converted / 'model.safetensors').read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name]


def test_verify_fails_when_the_measured_top1_is_not_the_papers(wrn_checkpoint, tmp_path, monkeypatch):
    """A checkpoint that does not reach its row's accuracy (random weights here: the digits are not CIFAR) is
    refused by --verify and nothing is written; the evaluation runs for real."""
    claimed = OfficialRow('wrn16_2_mixmo2', 'cifar10', 'cifar10', 'Cut-MixMo', (97.52,), ('drive-id',), 'config/x.yaml')
    monkeypatch.setattr(official, 'official_row', lambda arch, tag: claimed)
    with pytest.raises(ValueError, match=r'verify failed: measured top-1 \d+\.\d\d % .* 97\.52 %'):
        official.convert(wrn_checkpoint[0], tmp_path / 'out', 'wrn16_2_mixmo2', 10, dataset='', verify=True)
    assert list(tmp_path.iterdir()) == []


INSTALLED_CONVERT = r'''
import json, sys
from timm_mimo.hub.official import convert
result = convert(sys.argv[1], sys.argv[2], 'wrn16_2_mixmo2', 10, dataset='', split='test')
print(json.dumps(result.measured))
'''


def test_conversion_measures_the_weights_with_the_package_alone_as_installed(wrn_checkpoint, converted, tmp_path):
    """The package copied without the repository around it (as pip installs it: no validate.py beside it) still
    evaluates the converted weights, in process, to the numbers validate.py measures on them."""
    import shutil
    from timm_mimo.eval import DataSettings, evaluate
    site = tmp_path / 'site-packages'
    shutil.copytree(REPO / 'timm_mimo', site / 'timm_mimo', ignore=shutil.ignore_patterns('__pycache__'))
    env = dict(_env(), PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, '-c', INSTALLED_CONVERT, str(wrn_checkpoint[0]), str(tmp_path / 'out')],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = evaluate(converted, DataSettings(dataset='', split='test'), log=lambda line: None)
    assert measured['test']['top1'] == expected['test']['top1'] and measured['test']['nll'] == expected['test']['nll']
    assert measured['num_members'] == 2 and (tmp_path / 'out' / 'model.safetensors').is_file()


# ------------------------------------------------------------------------------------------------------
# publishing, end to end and offline: convert -> push.py -> the Hub -> a Hugging Face cache -> timm

FROM_THE_HUB = r'''
import json, sys, torch, timm, timm_mimo
from safetensors.torch import load_file
from timm_mimo.models._pretrained import PretrainedWeightsError
ref = load_file(sys.argv[1])
result = dict(pretrained=timm.list_models(pretrained=True, module='mixmo_resnets'))
model = timm.create_model('wrn16_2_mixmo2.cifar10', pretrained=True).eval()
with torch.no_grad():
    result['same'] = torch.equal(model.forward_members(ref['x']), ref['members'])
# timm's own tests/test_models.py pretrained checks, for every tag timm lists as pretrained
for name in result['pretrained']:
    if name.startswith('wrn16_2_mixmo2'):
        timm.create_model(name, pretrained=True, in_chans=1, num_classes=5)
        timm.create_model(name, pretrained=True, in_chans=1, num_classes=0)
        timm.create_model(name, pretrained=True, features_only=True)
for name in ('wrn16_2_mixmo2.cifar100', 'wrn16_2.cifar10'):
    try:
        timm.create_model(name, pretrained=True)
    except PretrainedWeightsError as e:
        result[name] = str(e)
print(json.dumps(result))
'''


def test_converted_weights_uploaded_with_push_and_hf_load_with_timm_and_validate(converted, tmp_path, fake_hub,
                                                                            populate_hub_cache):
    validate = [sys.executable, str(REPO / 'validate.py')]
    direct = tmp_path / 'direct.json'
    proc = subprocess.run(validate + [str(converted), '--dataset', '', '--results-file', str(direct)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    repo = 'test-org/wrn16_2_mixmo2.cifar10'
    with fake_hub() as server:
        env = _env(HF_ENDPOINT=server.url, HF_TOKEN='sentinel-token-for-test', HF_HUB_DISABLE_XET='1',
                   HF_HOME=str(tmp_path / 'push_home'), TIMM_MIMO_HUB_ORG='test-org')
        env.pop('HF_HUB_OFFLINE')
        proc = subprocess.run(
            [sys.executable, str(REPO / 'hub' / 'push.py'), str(converted), '--repo-id', repo, '--results',
             str(direct), '--export-dir', str(tmp_path / 'export')], env=env, capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # huggingface_hub's own CLI uploads the converted folder as it is, provenance card included
        proc = subprocess.run([str(Path(sys.executable).with_name('hf')), 'upload', repo, str(converted), '.',
                               '--repo-type', 'model', '--commit-message', 'Official MixMo checkpoint, converted'],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # hub/push.py --as-is uploads the converted folder unchanged too
        proc = subprocess.run([sys.executable, str(REPO / 'hub' / 'push.py'), str(converted), '--repo-id', repo,
                               '--as-is'], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    pushed_export, uploaded, as_is = server.commits
    assert as_is['files'] == uploaded['files']
    assert pushed_export['repo'] == uploaded['repo'] == repo
    # the hf command also asks the Hub for its agent-harness list, no part of the upload (answered 404)
    assert {path for _, path in server.unexpected} <= {'/api/agent-harnesses'}
    assert set(pushed_export['files']) == set(hub.EXPORT_FILES)
    exported = load_file(str(tmp_path / 'export' / 'model.safetensors'))
    assert all(torch.equal(v, exported[k]) for k, v in load_file(str(converted / 'model.safetensors')).items())
    assert uploaded['files'] == {p.name: p.read_bytes() for p in converted.iterdir()}
    commit = uploaded

    # the Hugging Face cache as a download of that commit leaves it
    pushed = tmp_path / 'pushed'
    pushed.mkdir()
    for name, data in commit['files'].items():
        (pushed / name).write_bytes(data)
    home = tmp_path / 'hf_home'
    populate_hub_cache(home / 'hub', repo, pushed)
    reference = timm.create_model(f'local-dir:{converted}', pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        save_file(dict(x=x, members=reference.forward_members(x)), str(tmp_path / 'ref.safetensors'))
    env = _env(HF_HOME=str(home), TIMM_MIMO_HUB_ORG='test-org',
               TIMM_MIMO_PUBLISHED='wrn16_2_mixmo2.cifar10, wrn16_2.cifar10')
    proc = subprocess.run([sys.executable, '-c', FROM_THE_HUB, str(tmp_path / 'ref.safetensors')], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['same']
    assert result['pretrained'] == ['wrn16_2.cifar10', 'wrn16_2_mixmo2.cifar10']
    assert 'test-org/wrn16_2_mixmo2.cifar100 is not published' in result['wrn16_2_mixmo2.cifar100']
    assert 'test-org/wrn16_2.cifar10 is published but not in the local Hugging Face cache' in result['wrn16_2.cifar10']

    from_hub = tmp_path / 'from_hub.json'
    proc = subprocess.run(validate + ['--model', 'wrn16_2_mixmo2.cifar10', '--pretrained', '--dataset', '',
                                      '--results-file', str(from_hub)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want, got = json.loads(direct.read_text()), json.loads(from_hub.read_text())
    assert got[got['split']] == want[want['split']]  # every metric, member accuracies and NLL included


def test_rows_prints_valid_commands_for_every_official_row(capsys):
    code, out, err = run_convert_here(capsys, '--rows')
    assert code == 0, err
    blocks = out.strip().split('\n\n')
    assert len(blocks) == len(OFFICIAL_ROWS)
    parser = runpy.run_path(str(CONVERT), run_name='convert_official')['build_parser']()
    for row, block in zip(OFFICIAL_ROWS, blocks):
        comment, download, convert, upload, register = block.splitlines()
        assert download == f'gdown {row.drive_ids[row.best]} -O official/{row.name}.ckpt'
        args = parser.parse_args(convert.split()[2:])  # the command line the converter will be given
        assert (args.source, args.model, args.tag, args.verify) == (f'official/{row.name}.ckpt', row.arch, row.tag, True)
        assert args.num_classes == official_table.DATASETS[row.dataset][0]
        assert upload.startswith(f'hf upload {hub_id(row.arch, row.tag)} exports/{row.name} . ') and row.name in register
