"""MIMO from any timm backbone (models/mimo_backbone.py): eight timm families at 32 px, M = 1 and M = 2,
the pretrained core from locally saved weights, timm's model contract, the local-dir: / Hub round trip."""
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm
import timm_mimo
from timm_mimo.rundir import load_model_folder, save_model_folder
from timm_mimo.mimo import MemberLinear
from timm_mimo.models.mimo_backbone import MixMoStem
from timm_mimo.models.mixvit import resolve_patch_size

NUM_CLASSES = 10
IMG = 32
_VIT = dict(img_size=IMG, patch_size=8, depth=3)  # 16 tokens, 3 blocks: tiny and fast
# one small variant per family; the ViTs at 32 px with 3 blocks
FAMILIES = {
    'resnet': ('resnet10t', {}),
    'resnetv2': ('resnetv2_18', {}),
    'convnext': ('convnext_atto', {}),
    'efficientnet': ('efficientnet_b0', {}),
    'mobilenetv3': ('mobilenetv3_small_050', {}),
    'regnet': ('regnetx_002', {}),
    'vit': ('vit_tiny_patch16_224', _VIT),
    'deit': ('deit_tiny_patch16_224', _VIT),
    'vit_reg_avg': ('vit_tiny_patch16_224', dict(_VIT, reg_tokens=2, global_pool='avg')),
}
CNNS = ('resnet', 'resnetv2', 'convnext', 'efficientnet', 'mobilenetv3', 'regnet')


def _base(family: str, **kwargs) -> nn.Module:
    name, model_kwargs = FAMILIES[family]
    return timm.create_model(name, num_classes=NUM_CLASSES, **model_kwargs, **kwargs).eval()


def _mimo(family: str, num_members: int = 2, **kwargs) -> nn.Module:
    name, model_kwargs = FAMILIES[family]
    return timm_mimo.create_mimo_model(name, num_members=num_members, num_classes=NUM_CLASSES,
                                       **model_kwargs, **kwargs).eval()


def _cut_masks(batch: int, grid) -> torch.Tensor:
    """Binary masks (B, 2, h, w): member 0 on the left half of the grid, member 1 on the right."""
    masks = torch.zeros(batch, 2, *grid)
    masks[:, 0, :, :grid[1] // 2] = 1
    masks[:, 1] = 1 - masks[:, 0]
    return masks


def _one_hot_masks(batch: int, grid, member: int, num_members: int = 2) -> torch.Tensor:
    masks = torch.zeros(batch, num_members, *grid)
    masks[:, member] = 1
    return masks


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('family', FAMILIES)
def test_one_member_is_the_base_model_given_its_weights(family, images):
    base = _base(family)
    model = _mimo(family, num_members=1)
    # same weight names and shapes: the base's state dict loads strictly
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), base.forward_features(images))
        assert torch.allclose(model(images), base(images), atol=1e-6)
        assert model.forward_members(images).shape == (2, 1, NUM_CLASSES)
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        assert torch.allclose(pooled, base.forward_head(base.forward_features(images), pre_logits=True))


@pytest.mark.parametrize('family', FAMILIES)
def test_two_members_forward_and_backward_on_member_inputs(family, images):
    model = _mimo(family).train()
    grid = model.mix_grid_size((IMG, IMG))
    members = torch.randn(4, 2, 3, IMG, IMG)
    logits = model(members, _cut_masks(4, grid))
    assert logits.shape == (4, 2, NUM_CLASSES)
    targets = torch.randint(0, NUM_CLASSES, (4, 2))
    nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    head = model.get_classifier()
    grad = head.weight.grad.unflatten(0, (2, -1))
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0, 'both heads learn'
    first = model.mimo_stem.weight if hasattr(model, 'mimo_stem') else model.patch_embed.proj.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    if hasattr(model, 'source_embed'):
        assert model.source_embed.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, NUM_CLASSES)
        assert model.forward_members(images).shape == (2, 2, NUM_CLASSES)
        assert model.forward_members(members).shape == (4, 2, NUM_CLASSES)  # no masks: MIMO summing


@pytest.fixture(scope='module')
def saved_base(tmp_path_factory):
    """Locally 'pretrained' weights: a base model (with trained-looking BN statistics) saved to a file."""
    folder = tmp_path_factory.mktemp('pretrained')

    def save(family: str) -> Path:
        torch.manual_seed(1)
        base = _base(family)
        with torch.no_grad():
            for module in base.modules():  # non-trivial norm statistics, as pretrained weights have
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0, .1)
                    module.running_var.uniform_(.5, 2)
        path = folder / f'{family}.safetensors'
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
        return path
    return save


@pytest.mark.parametrize('family', ('resnet', 'convnext', 'vit'))
def test_pretrained_core_gives_the_base_model_exactly(family, images, saved_base):
    path = saved_base(family)
    base = _base(family, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    model = _mimo(family, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    with torch.no_grad():
        # a single image runs the sum of the member kernels = the pretrained kernel: the base's features
        features, base_features = model.forward_features(images), base.forward_features(images)
        if family == 'vit':
            # (B, M + N, D): both members' class tokens are the base's class token
            assert torch.allclose(features[:, :2], base_features[:, :1].expand(-1, 2, -1), atol=1e-5)
            assert torch.allclose(features[:, 2:], base_features[:, 1:], atol=1e-5)
            assert torch.count_nonzero(model.source_embed) == 0
        else:
            assert torch.allclose(features, base_features, atol=1e-5)
            stem_weight = model.mimo_stem.weight.unflatten(0, (2, -1))
            base_stem = base.get_submodule(base.pretrained_cfg['first_conv']).weight
            assert torch.allclose(stem_weight[0], base_stem / 2) and torch.equal(stem_weight[0], stem_weight[1])
        # every head starts from the pretrained classifier (10 classes = the file's)
        assert torch.allclose(model.forward_members(images), base(images)[:, None].expand(-1, 2, -1), atol=1e-5)
        # training: member k's input alone (binary mask on k) gives its pretrained features, MixMo's x M
        members = torch.randn(2, 2, 3, IMG, IMG)
        grid = model.mix_grid_size((IMG, IMG))
        for k in range(2):
            mixed = model.forward_mixed_features(members, _one_hot_masks(2, grid, k))
            alone = base.forward_features(members[:, k])
            if family == 'vit':
                mixed = torch.cat((mixed[:, :1], mixed[:, 2:]), dim=1)
            assert torch.allclose(mixed, alone, atol=1e-5)
        if family != 'vit':
            # a cut mask: the mixed stem map is each input's pretrained stem map where its mask is 1
            masks = _cut_masks(2, grid)
            stem_out = model.mimo_stem((members, masks))
            base_conv = base.get_submodule(base.pretrained_cfg['first_conv'])
            expected = sum(masks[:, k, None] * base_conv(members[:, k]) for k in range(2))
            assert torch.allclose(stem_out, expected, atol=1e-5)


def test_both_overlay_forms_load_the_backbone_and_only_the_model_argument_is_recorded(saved_base, tmp_path):
    path = saved_base('resnet')
    overlay = dict(file=str(path), num_classes=NUM_CLASSES)
    # timm's form (what train.py --pretrained-path would pass) and the --model-kwargs form
    direct = timm.create_model('mimo_backbone', backbone='resnet10t', pretrained=True, num_classes=NUM_CLASSES,
                               pretrained_cfg_overlay=overlay)
    as_arg = timm.create_model('mimo_backbone', backbone='resnet10t', pretrained=True, num_classes=NUM_CLASSES,
                               backbone_pretrained_cfg_overlay=overlay)
    for name, value in direct.state_dict().items():
        assert torch.equal(value, as_arg.state_dict()[name]), name
    assert 'pretrained_cfg_overlay' not in direct._model_args and 'file' not in direct.pretrained_cfg
    # a saved model reloads its own weights with pretrained=True, whatever the recorded backbone overlay
    save_model_folder(as_arg, tmp_path / 'saved', dict(as_arg._model_args))
    path.unlink()  # the backbone's file is gone: nothing may read it
    loaded = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True)
    assert torch.equal(loaded.mimo_stem.weight, as_arg.mimo_stem.weight)
    with pytest.raises(ValueError, match='no pretrained tags'):
        timm.create_model('mimo_backbone.in1k', backbone='resnet10t')


def test_heads_start_apart_when_the_class_count_differs(saved_base):
    path = saved_base('resnet')
    model = timm_mimo.create_mimo_model('resnet10t', num_members=3, pretrained=True, num_classes=4,
                                        pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    heads = model.get_classifier().weight.detach().unflatten(0, (3, 4))
    assert not torch.allclose(heads[0], heads[1]) and not torch.allclose(heads[1], heads[2])
    assert 0.5 < float(heads[1].std() / heads[0].std()) < 2.0, 'the other heads are drawn like the fresh one'


@pytest.mark.parametrize('family', ('resnet', 'resnetv2', 'efficientnet', 'vit'))
def test_timm_model_contract(family, images):
    model = _mimo(family)
    num_features = model.num_features
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        assert pooled.shape == (2, num_features)
        model.reset_classifier(7)
        assert model(images).shape == (2, 7) and model.forward_members(images).shape == (2, 2, 7)
        heads = model.get_classifier()
        assert isinstance(heads, MemberLinear) or heads.out_channels == 14
        model.reset_classifier(0)
        assert model(images).shape == (2, num_features)
    if family == 'vit':
        assert 'source_embed' in model.no_weight_decay()


@pytest.mark.parametrize('family', ('resnet', 'resnetv2', 'convnext', 'vit'))
def test_torchscript_and_meta_device_as_timm_tests_them(family, images):
    # timm's test_model_forward_torchscript: a scripted model keeps the single-image paths (the
    # ensemble and the member logits); test_model_default_cfgs builds on the meta device
    model = _mimo(family)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated, timm still tests it
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(images), model(images), atol=1e-5)
        assert torch.allclose(scripted(images, members=True), model.forward_members(images), atol=1e-5)
    with torch.device('meta'):
        on_meta = _mimo(family)
    assert on_meta.forward_features(images.to('meta')).shape == model.forward_features(images).shape


@pytest.mark.parametrize('family', ('resnet', 'regnet', 'vit'))
def test_features_only_gives_the_base_model_intermediates(family, images):
    base = _base(family)
    name, kwargs = FAMILIES[family]
    features = timm.create_model('mimo_backbone', backbone=name, num_members=1, features_only=True,
                                 num_classes=NUM_CLASSES, **kwargs).eval()
    features.model.load_state_dict(base.state_dict())
    indices = features.out_indices
    with torch.no_grad():
        got = features(images)
        expected = base.forward_intermediates(images, indices=indices, intermediates_only=True)
    assert len(got) == len(expected) == len(features.feature_info.channels())
    for a, b, chs in zip(got, expected, features.feature_info.channels()):
        assert torch.allclose(a, b, atol=1e-6) and a.shape[1] == chs
    # M = 2: the intermediates of a ViT are the shared blocks only, those before the source attribution
    two = timm.create_model('mimo_backbone', backbone=name, num_members=2, features_only=True, **kwargs)
    assert all(t.shape[0] == 2 for t in two(images))
    if family == 'vit':
        assert len(two.feature_info.channels()) == _VIT['depth'] - 1


@pytest.mark.parametrize('family', ('resnetv2', 'vit'))
def test_saved_model_folder_rebuilds_the_same_wrapped_model(family, images, tmp_path):
    model = _mimo(family, ensemble='probs')
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * .01)
    model_args = dict(model._model_args)
    save_model_folder(model, tmp_path / 'export', model_args)
    for loaded in (timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval(),
                   load_model_folder(tmp_path / 'export').eval()):
        assert type(loaded) is type(model) and loaded.num_members == 2 and loaded.ensemble == 'probs'
        assert loaded.pretrained_cfg['architecture'] == 'mimo_backbone'
        with torch.no_grad():
            assert torch.allclose(loaded.forward_members(images), model.forward_members(images), atol=1e-6)


def test_member_blocks_choose_where_the_vit_members_separate(images):
    model = _mimo('vit', member_blocks=2)
    assert model.attribution_depth == _VIT['depth'] - 2 and model.member_blocks == 2
    naive = _mimo('vit', member_blocks=0)
    assert naive.source_embed is None and naive.attribution_depth < 0
    with torch.no_grad():
        naive.head.weight.unflatten(0, (2, -1))[1].copy_(naive.head.weight.unflatten(0, (2, -1))[0])
        naive.head.bias.unflatten(0, (2, -1))[1].copy_(naive.head.bias.unflatten(0, (2, -1))[0])
        members = naive.forward_members(images)
    assert torch.allclose(members[:, 0], members[:, 1]), 'no attribution: one class token for both heads'


@pytest.mark.parametrize('member_blocks', (0, 1, 2))
def test_the_heads_forward_computes_the_last_block_on_the_class_rows_only(member_blocks, images):
    """model(x) / model(x, masks) skip the last block's patch rows, which a 'token' head never reads:
    the logits and the gradients are those of the full features."""
    model = _mimo('vit', member_blocks=member_blocks, reg_tokens=1)
    assert model.last_block_computes_rows
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * .02)
    masks = _cut_masks(2, model.mix_grid_size((IMG, IMG)))
    members = torch.stack((images, images.flip(0)), dim=1)
    with torch.no_grad():
        assert torch.allclose(model(images), model.forward_head(model.forward_features(images)), atol=1e-5)
        assert torch.allclose(model(images, members=True),
                              model.forward_member_head(model.forward_features(images)), atol=1e-5)
    model.train()
    grads = []
    for logits in (lambda: model(members, masks),
                   lambda: model.forward_member_head(model.forward_mixed_features(members, masks))):
        model.zero_grad()
        out = logits()
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (fast, fast_grads), (full, full_grads) = grads
    assert torch.allclose(fast, full, atol=1e-5) and len(fast_grads) == len(full_grads)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, full_grads))
    # an 'avg' head reads the patch tokens: the full blocks run
    assert not _mimo('vit_reg_avg')._class_rows_suffice()


@pytest.mark.parametrize('kwargs, message', [
    (dict(backbone='no_such_model'), 'unknown backbone'),
    (dict(backbone='deit_tiny_distilled_patch16_224', img_size=IMG, patch_size=8, depth=2), 'token layout'),
    (dict(backbone='vit_tiny_patch16_224', img_size=IMG, patch_size=8, depth=2, member_blocks=3), 'member_blocks'),
    (dict(backbone='vit_tiny_patch16_224', img_size=IMG, patch_size=8, depth=2, class_token=False,
          global_pool='avg'), 'no class token'),
    (dict(backbone='tf_efficientnet_b0'), 'plain nn.Conv2d'),
    (dict(backbone=''), 'needs backbone'),
])
def test_unsupported_backbones_give_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('mimo_backbone', num_members=2, **kwargs)


def test_the_registered_name_builds_without_arguments_and_traces_with_torch_fx():
    # timm's convention (its own model tests create every registered name bare): resnet18 by default
    from test_models import _fx_model
    model = timm.create_model('mimo_backbone', num_classes=5).eval()
    assert model.pretrained_cfg.get('architecture') == 'mimo_backbone' and model.num_members == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tuple(_fx_model(model)(x).values())[0], model(x))


def test_mask_grid_mismatch_is_reported():
    model = _mimo('resnet')
    with pytest.raises(ValueError, match='mix_grid_size'):
        model(torch.randn(1, 2, 3, IMG, IMG), torch.ones(1, 2, 3, 3) / 2)


def test_member_stem_matches_any_conv_geometry():
    conv = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True)
    stem = MixMoStem.from_conv(conv, 3)
    x = torch.randn(2, 3, 17, 20)
    with torch.no_grad():
        assert torch.allclose(stem(x), conv(x), atol=1e-5)
        assert stem.output_grid((17, 20)) == tuple(conv(x).shape[-2:])


# --- MixViT fixes (issue 17, item 5) -------------------------------------------------------------------

def test_mixvit_default_patch_size_is_timms_16_at_224_and_4_at_32():
    assert resolve_patch_size(224, None) == 16
    assert resolve_patch_size(384, None) == 16
    assert resolve_patch_size(32, None) == 4
    assert resolve_patch_size(64, None) == 8


def test_mixvit_duplicate_inference_runs_one_class_stage_pass():
    model = timm.create_model('cait_xxs_mixvit2', depth=2, embed_dim=48, num_heads=2, inference='duplicate').eval()
    calls = []
    model.blocks_token_only[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        model.forward_members(torch.randn(3, 3, IMG, IMG))
    # one pass of the class stage over the M * N = 2 * 64 tokens of the 3 images
    assert calls == [torch.Size([3, 2 * 64, 48])]


# --- train.py, hub/export.py and validate.py ------------------------------------------------------------

def _run(script, *args):
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(repo / script), *map(str, args)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}'
    return proc.stdout + proc.stderr


def test_train_export_and_validate_a_wrapped_backbone(tmp_path):
    """train.py fine-tunes --model mimo_backbone (MixMo batches, batch repetition), hub/export.py exports
    the run and validate.py evaluates the export, which rebuilds the same wrapped model."""
    log = _run('train.py', '--model', 'mimo_backbone', '--model-kwargs', 'backbone=resnet10t', '--num-members', 2,
               '-b', 16, '--batch-repeat', 2, '--epochs', 1, '--limit-train-batches', 3, '--img-size', IMG,
               '--output', tmp_path, '--experiment', 'run')
    assert 'M=2' in log
    _run('hub/export.py', tmp_path / 'run', tmp_path / 'export')
    out = _run('validate.py', tmp_path / 'export', '--split', 'test', '--results-file', tmp_path / 'val.json')
    import json
    results = json.loads((tmp_path / 'val.json').read_text())
    trained = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['num_members'] == 2 and 'members' in out
    # the export evaluates exactly as the run's best weights did on the test split
    assert results['test']['top1'] == pytest.approx(trained['best']['test']['top1'])
    assert results['test']['nll'] == pytest.approx(trained['best']['test']['nll'], abs=1e-4)


def test_a_weights_file_of_a_wrapped_model_exports_with_its_model_kwargs(images, tmp_path):
    """A bare safetensors file holds no constructor arguments: --model-kwargs names the backbone and M,
    and config.json records them, so that local-dir: rebuilds the same wrapped model."""
    import json
    from timm_mimo import hub
    from timm_mimo.eval.metrics import classification_metrics
    model = _mimo('resnet')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    with torch.no_grad():
        members = model.forward_members(images)
    metrics = classification_metrics(members.mean(1), torch.tensor([0, 1]), members)
    (tmp_path / 'val.json').write_text(json.dumps(dict(
        checkpoint=str(tmp_path / 'w.safetensors'), model='mimo_backbone', num_members=2, split='test', test=metrics)))
    kwargs = dict(backbone=FAMILIES['resnet'][0], num_members=2)
    hub.export(tmp_path / 'w.safetensors', tmp_path / 'out', model_name='mimo_backbone', model_kwargs=kwargs,
               num_classes=NUM_CLASSES, results=str(tmp_path / 'val.json'))
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['model_args']['backbone'] == kwargs['backbone']
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded.forward_members(images), members, atol=1e-6)
    with pytest.raises(ValueError, match='is for a weights file'):
        hub.export(tmp_path / 'out', tmp_path / 'again', model_kwargs=kwargs)


def test_train_image_size_follows_the_backbone_and_builds_a_vit_for_it():
    from timm_mimo.models.factory import registered_cfg, resolve_img_size

    def resolve(name, kwargs, size):
        return resolve_img_size(registered_cfg(name, kwargs), kwargs, size)[0]
    # no --img-size: the backbone's registered input size (mimo_backbone's own cfg is generic), or the kwarg
    assert resolve('mimo_backbone', {'backbone': 'resnet10t'}, None) == \
        timm.models.get_pretrained_cfg('resnet10t').input_size[-1]
    assert resolve('mimo_backbone', {'backbone': 'vit_tiny_patch16_224', 'img_size': IMG}, None) == IMG
    # --img-size builds a fixed-size model (ViT, MixViT) for that size, and leaves a CNN's arguments alone
    for name, kwargs, side in (('cait_xxs_mixvit2', {}, 16),
                               ('mimo_backbone', {'backbone': 'vit_tiny_patch16_224', 'depth': 2}, 64)):
        assert resolve(name, kwargs, side) == side and kwargs['img_size'] == side
        assert timm.create_model(name, **kwargs).patch_embed.img_size == (side, side)
    cnn_args = {'backbone': 'resnet10t'}
    assert resolve('mimo_backbone', cnn_args, 16) == 16 and 'img_size' not in cnn_args
    with pytest.raises(ValueError, match='--img-size 16 contradicts the model argument img_size=32'):
        resolve('cait_xxs_mixvit2', {'img_size': 32}, 16)
