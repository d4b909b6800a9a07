"""The registry tells the truth: only published tags have weights, and pretrained=True on any other tag fails
at once with one line naming its repository, for plain ``timm.create_model`` too (no random weights, no
download attempt). Loading published weights from a cache is tested in test_convert_official.py."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import timm
import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo.constants import hub_id
from timm_mimo.models import _pretrained
from timm_mimo.models._pretrained import PretrainedWeightsError, hub_cfgs, published_tags

REPO = Path(__file__).resolve().parents[1]
MODULES = ('mixmo_resnets', 'mixvit')
OURS = [name for module in MODULES for name in timm.list_models(module=module)]
OUR_TAGS = [name for arch in OURS for name in timm.models.get_arch_pretrained_cfgs(arch)]


def test_only_published_tags_have_weights_and_are_listed_as_pretrained():
    assert {'wrn28_10_mixmo3', 'preactresnet18_w3_mixmo2', 'cait_xs_mixvit2'} <= set(OURS) and len(OUR_TAGS) > 2 * len(OURS)
    for name in OUR_TAGS:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        arch, tag = name.split('.')
        assert cfg.hf_hub_id == (hub_id(arch, tag) if name in published_tags() else None), name
        assert not (cfg.url or cfg.file), name
    listed = {n for module in MODULES for n in timm.list_models(pretrained=True, module=module)}
    assert listed == published_tags() & set(OUR_TAGS)


@pytest.mark.parametrize('name', [n for n in OUR_TAGS if n not in published_tags()])
def test_pretrained_true_on_an_unpublished_tag_fails_at_once_naming_the_repository(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError('an unpublished tag must not be looked up on the Hub')
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_download)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(name, pretrained=True)
    message = str(info.value)
    assert f'the Hub repository {hub_id(*name.split("."))} is not published' in message and '\n' not in message
    assert 'timm_mimo/models/published.py' in message


def test_an_untagged_name_with_pretrained_true_fails_for_its_default_tag(monkeypatch):
    with pytest.raises(PretrainedWeightsError, match=r'wrn16_2_mixmo2\.cifar10: .* is not published'):
        timm.create_model('wrn16_2_mixmo2', pretrained=True)
    assert timm.create_model('wrn16_2_mixmo2').num_members == 2  # without pretrained: nothing is looked up


def test_an_explicit_weight_source_is_used_even_for_an_unpublished_tag(tmp_path):
    from safetensors.torch import save_file
    model = timm.create_model('wrn16_2_mixmo2', num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    loaded = timm.create_model('wrn16_2_mixmo2.cifar100', pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors'), num_classes=10))
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_hub_cfgs_gives_hf_hub_ids_to_published_tags_only(monkeypatch):
    monkeypatch.setattr(_pretrained, '_PUBLISHED', frozenset({'net.ds', 'other.ds'}))
    cfgs = hub_cfgs({'net.ds': {}, 'net.other': {}, 'other.ds': dict(url='https://example.org/w.pth')})
    assert cfgs['net.ds']['hf_hub_id'] == hub_id('net', 'ds') and 'hf_hub_id' not in cfgs['net.other']
    assert 'hf_hub_id' not in cfgs['other.ds']  # an existing weight source is kept
    with pytest.raises(ValueError, match='no tag'):
        hub_cfgs({'untagged': {}})


def test_published_environment_variable_adds_tags_and_is_checked(monkeypatch, caplog):
    monkeypatch.setenv(_pretrained.PUBLISHED_ENV, ' wrn16_2.cifar10 ,preactresnet18.tiny_imagenet,')
    assert {'wrn16_2.cifar10', 'preactresnet18.tiny_imagenet'} <= _pretrained._read_published()
    for bad in ('wrn16_2', 'a.b.c', '.cifar10'):  # read at import: skipped with a warning, never an error
        monkeypatch.setenv(_pretrained.PUBLISHED_ENV, f'wrn16_2.cifar10,{bad}')
        caplog.clear()
        assert _pretrained._read_published() == frozenset(_pretrained.PUBLISHED) | {'wrn16_2.cifar10'}
        assert f'{_pretrained.PUBLISHED_ENV}: {bad!r} is not an <arch>.<tag> name: ignored' in caplog.text


# timm's own tests/test_models.py checks of pretrained weights, run on our models: they are parametrized by
# timm.list_models(pretrained=True), so they run for every published tag and skip ("got empty parameter set")
# while none is; a published tag that is not in the cache offline skips with that reason.
def _create_published(name, **kwargs):
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except PretrainedWeightsError as e:
        if 'not in the local Hugging Face cache' in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize('model_name', [n for m in MODULES for n in timm.list_models(pretrained=True, module=m)])
def test_model_load_pretrained(model_name):
    _create_published(model_name, in_chans=1, num_classes=5)
    _create_published(model_name, in_chans=1, num_classes=0)


@pytest.mark.parametrize('model_name', [n for m in MODULES for n in timm.list_models(pretrained=True, module=m)])
def test_model_features_pretrained(model_name):
    _create_published(model_name, features_only=True)


def test_model_table_states_published_and_unpublished_weights():
    table = runpy.run_path(str(REPO / 'bench' / 'model_table.py'), run_name='model_table')
    # the registry as it is: nothing published
    assert table['weights_cell']('wrn28_10_mixmo2') == 'not published: `cifar10`, `cifar100`, 10 `official_*`'
    assert table['weights_cell']('cait_xxs_mixvit2') == 'not published: `cifar10`, `cifar100`, `tiny_imagenet`'
    # one tag published (by the environment, as a mirror does): the table links it, in a fresh registry
    script = ("import runpy, sys; print(runpy.run_path(sys.argv[1], run_name='t')['weights_cell']('wrn16_2_mixmo2'))")
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1',
           _pretrained.PUBLISHED_ENV: 'wrn16_2_mixmo2.cifar10', 'TIMM_MIMO_HUB_ORG': 'my-lab'}
    proc = subprocess.run([sys.executable, '-c', script, str(REPO / 'bench' / 'model_table.py')], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ('[`cifar10`](https://huggingface.co/my-lab/wrn16_2_mixmo2.cifar10), '
                                   'not published: `cifar100`')
