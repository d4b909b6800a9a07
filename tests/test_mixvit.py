"""MixViT (CaiT / ConViT MIMO transformers): registry, timm equivalence at M = 1, token mixing, source
attribution, design options, timm's model-suite checks, bad input."""
import pytest
import torch

import timm
import timm.optim
import timm_mimo  # noqa: F401
from timm.models.cait import Cait
from timm.models.convit import ConVit
from timm_mimo.data import default_cifar10_zip
from timm_mimo.mixing import sample_mixing
from timm_mimo.models.mixvit import ATTRIBUTION_PLACES, CLASS_STAGES, MixViTCait, MixViTConVit

MIXVIT_MODELS = ['cait_xxs_mixvit2', 'cait_xs_mixvit2', 'cait_s_mixvit2', 'convit_tiny_mixvit2', 'convit_small_mixvit2']
BASELINES = [name.replace('_mixvit2', '_mixvit1') for name in MIXVIT_MODELS]
# small trunks for the option sweeps: same code paths, a fraction of the time
TINY_CAIT = dict(depth=4)
TINY_CONVIT = dict(depth=4, local_up_to_layer=3)


def _tiny(name, **kwargs):
    extra = TINY_CAIT if name.startswith('cait') else TINY_CONVIT
    return timm.create_model(name, **extra, **kwargs)


def _binary_masks(batch_size=3, num_members=2, grid=(8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks, _ = sample_mixing(batch_size, num_members, grid, 'box', generator=gen)
    return masks


def test_registered_by_import_and_ours():
    assert set(MIXVIT_MODELS + BASELINES) <= set(timm.list_models())
    for name in MIXVIT_MODELS + BASELINES:
        assert timm.models.model_entrypoint(name).__module__ == 'timm_mimo.models.mixvit'


@pytest.mark.parametrize('name,width,heads,blocks', [
    ('cait_xxs_mixvit2', 192, 4, 24), ('cait_xs_mixvit2', 288, 6, 24), ('cait_s_mixvit2', 384, 8, 24),
    ('convit_tiny_mixvit2', 192, 4, 12), ('convit_small_mixvit2', 432, 9, 12),
])
def test_sizes_cifar_defaults_and_parameter_overhead(name, width, heads, blocks):
    with torch.device('meta'):
        model = timm.create_model(name)
        base = timm.create_model(name.replace('_mixvit2', '_mixvit1'))
    assert model.embed_dim == width and len(model.blocks) == blocks and model.num_members == 2
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.num_patches == 64
    assert model.pretrained_cfg['input_size'] == (3, 32, 32) and model.num_classes == 10
    n_model = sum(p.numel() for p in model.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    # docs/methods/mixvit.md §3.8, default design: M source embeddings and a second head (D x K + K)
    assert n_model - n_base == 2 * width + width * 10 + 10
    assert (n_model - n_base) / n_base < 0.01
    if name.startswith('cait'):
        assert len(model.blocks_token_only) == 2 and model.trunk_depth == 24
    else:
        assert model.trunk_depth == 10


def test_tiny_imagenet_tag_uses_64px_and_patch_8():
    with torch.device('meta'):
        model = timm.create_model('cait_xxs_mixvit2.tiny_imagenet')
    assert model.num_classes == 200 and model.patch_embed.patch_size == (8, 8)
    assert model.patch_embed.num_patches == 64 and model.pretrained_cfg['input_size'] == (3, 64, 64)


@pytest.mark.parametrize('name,reference', [
    ('cait_xxs_mixvit1', lambda: Cait(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=24,
                                      num_heads=4, init_values=1e-5)),
    ('convit_tiny_mixvit1', lambda: ConVit(img_size=32, patch_size=4, num_classes=10, embed_dim=48, num_heads=4,
                                           depth=12, local_up_to_layer=10, locality_strength=1.0)),
])
@pytest.mark.parametrize('class_stage', ['member', 'shared'])  # both readings of the class stage
def test_one_member_is_the_plain_timm_model(name, reference, class_stage):
    torch.manual_seed(0)
    model = timm.create_model(name, class_stage=class_stage).eval()
    ref = reference().eval()
    # same state dict keys and shapes: timm's weights load strictly, and ours into timm's model
    ref.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=0, atol=0)
        # the MIMO path with one member and all-ones masks is the same network
        torch.testing.assert_close(model(x[:, None], torch.ones(2, 1, 8, 8))[:, 0], ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['cait_xxs_mixvit2', 'convit_tiny_mixvit2'])
def test_shapes_train_and_eval(name):
    model = _tiny(name, num_classes=7)
    x = torch.randn(3, 2, 3, 32, 32)
    masks = _binary_masks()
    model.train()
    assert model(x, masks).shape == (3, 2, 7)
    assert model(x[:, 0]).shape == (3, 7)
    model.eval()
    with torch.no_grad():
        assert model(x[:, 0]).shape == (3, 7)
        assert model.forward_members(x[:, 0]).shape == (3, 2, 7)
        assert model.forward_features(x[:, 0]).shape == (3, 2 + 64, model.embed_dim)
        members = model.forward_members(x[:, 0])
        torch.testing.assert_close(model(x[:, 0]), members.mean(1))


def test_token_mixing_takes_each_token_from_its_masked_input():
    model = _tiny('cait_xxs_mixvit2').eval()
    x = torch.randn(3, 2, 3, 32, 32)
    masks = _binary_masks()
    seen = {}
    model.pos_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault('mixed', out))
    with torch.no_grad():
        model(x, masks)
        tokens = torch.stack([model.embed_tokens(x[:, k]) for k in range(2)], 1)       # (B, M, N, D)
    own = masks.flatten(2).argmax(1)                                                       # source of each token
    expected = tokens.gather(1, own[:, None, :, None].expand(-1, 1, -1, tokens.shape[-1]))[:, 0]
    torch.testing.assert_close(seen['mixed'], expected)
    assert seen['mixed'].shape[1] == 64  # N tokens stay N (ConViT's GPSA needs the grid)


def test_gradient_reaches_every_member_source_embedding_and_head():
    for name in ('cait_xxs_mixvit2', 'convit_tiny_mixvit2'):
        model = _tiny(name)
        model.train()
        out = model(torch.randn(4, 2, 3, 32, 32), _binary_masks(4))
        labels = torch.randint(0, 10, (4, 2))
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten())
        loss.backward()
        assert (model.source_embed.grad.abs().sum(1) > 0).all(), name
        head_grad = model.head.weight.grad.unflatten(0, (2, 10))
        assert (head_grad.flatten(1).abs().sum(1) > 0).all(), name
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f'{name}: no gradient for {missing}'


@pytest.mark.parametrize('class_stage', CLASS_STAGES)
@pytest.mark.parametrize('attribution', ATTRIBUTION_PLACES + (2,))
def test_every_design_option_trains_and_predicts(class_stage, attribution):
    for name in ('cait_xxs_mixvit2', 'convit_tiny_mixvit2'):
        model = _tiny(name, class_stage=class_stage, attribution=attribution)
        model.train()
        out = model(torch.randn(2, 2, 3, 32, 32), _binary_masks(2))
        out.sum().backward()
        assert out.shape == (2, 2, 10)
        model.eval()
        with torch.no_grad():
            members = model.forward_members(torch.randn(2, 3, 32, 32))
        assert members.shape == (2, 2, 10) and torch.isfinite(members).all()
        assert (model.source_embed is None) == (attribution == 'none')


@pytest.mark.parametrize('class_stage', CLASS_STAGES)
def test_duplicate_inference_differs_from_passes_but_both_predict(class_stage):
    model = _tiny('cait_xxs_mixvit2', class_stage=class_stage).eval()
    with torch.no_grad():
        model.source_embed.normal_(std=1.0)  # make attribution matter
        x = torch.randn(2, 3, 32, 32)
        passes = model.forward_members(x)
        model.inference = 'duplicate'
        duplicate = model.forward_members(x)
    assert duplicate.shape == passes.shape
    assert not torch.allclose(duplicate, passes)


def test_members_differ_through_source_attribution():
    """At inference, member i's pass tags every token with s_i: different embeddings, different outputs."""
    model = _tiny('cait_xxs_mixvit2').eval()
    with torch.no_grad():
        model.source_embed.normal_(std=1.0)
        model.head.weight.unflatten(0, (2, 10))[1].copy_(model.head.weight.unflatten(0, (2, 10))[0])
        model.head.bias.unflatten(0, (2, 10))[1].copy_(model.head.bias.unflatten(0, (2, 10))[0])
        members = model.forward_members(torch.randn(2, 3, 32, 32))
    # identical heads: any difference comes from the per-member attribution before the class stage
    assert not torch.allclose(members[:, 0], members[:, 1])


@pytest.mark.parametrize('name', ['cait_xxs_mixvit2', 'convit_tiny_mixvit2'])
def test_timm_model_suite_checks(name):
    """timm's tests/test_models.py checks: default cfg, classifier reset, pre-logits, features, optimizer."""
    model = _tiny(name).eval()
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] + '.weight' in sd
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, 2 + 64, model.num_features)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (1, 5) and model.forward_members(x).shape == (1, 2, 5)
    assert 'source_embed' in model.no_weight_decay()
    timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    # timm's features API: the shared trunk's blocks
    feats = timm.create_model(name, features_only=True, **(TINY_CAIT if name.startswith('cait') else TINY_CONVIT),
                              attribution='class', out_indices=(0, 1, 2))
    outs = feats(x)
    assert [o.shape for o in outs] == [(1, model.embed_dim, 8, 8)] * 3
    final, inter = _tiny(name).eval().forward_intermediates(x, indices=2)
    assert final.shape == (1, 66, model.embed_dim) and len(inter) == 2


def test_torchscript():
    for name in ('cait_xxs_mixvit2', 'convit_tiny_mixvit2'):
        model = _tiny(name).eval()
        scripted = torch.jit.script(model)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(scripted(x), model(x))


def test_mixing_batches_built_for_the_token_grid():
    model = _tiny('cait_xxs_mixvit2')
    builder = timm_mimo.MimoBatchBuilder.from_model(model, (32, 32), mix_mode=model.default_mix_mode, seed=0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batch = builder(images, labels)
    assert batch.masks.shape == (8, 2, 8, 8)
    assert ((batch.masks == 0) | (batch.masks == 1)).all() and (batch.masks.sum(1) == 1).all()
    assert model(batch.inputs, batch.masks).shape == (8, 2, 10)


# --- bad input -----------------------------------------------------------------------------------------

def test_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        timm.create_model('cait_xxs_mixvit2', img_size=30, patch_size=4)
    model = _tiny('cait_xxs_mixvit2')
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        model.mix_grid_size((30, 30))


def test_unknown_attribution_and_options():
    with pytest.raises(ValueError, match='unknown attribution placement'):
        _tiny('cait_xxs_mixvit2', attribution='late')
    with pytest.raises(ValueError, match='outside the trunk'):
        _tiny('cait_xxs_mixvit2', attribution=9)
    with pytest.raises(ValueError, match='unknown class stage'):
        _tiny('cait_xxs_mixvit2', class_stage='heads')
    with pytest.raises(ValueError, match='only the class stage accepts'):
        _tiny('cait_xxs_mixvit2', attribution='mid', inference='duplicate')


def test_more_members_than_the_mask_sampler_supports():
    with pytest.raises(ValueError, match='binary masks cannot share a 8x8 grid among 65 members'):
        sample_mixing(2, 65, (8, 8), 'box')
    with pytest.raises(ValueError, match='more than the 16 tokens'):
        timm.create_model('cait_xxs_mixvit2', depth=2, patch_size=8, num_members=17)


def test_mask_grid_mismatch_is_named():
    model = _tiny('cait_xxs_mixvit2')
    with pytest.raises(ValueError, match='build masks with model.mix_grid_size'):
        model(torch.randn(2, 2, 3, 32, 32), torch.ones(2, 2, 4, 4) / 2)


def test_classes_are_subclasses_of_timm():
    assert issubclass(MixViTCait, Cait) and issubclass(MixViTConVit, ConVit)


# --- the trainer and validator with MixViT ----------------------------------------------------------------

def _run(script, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='2')
    return subprocess.run([sys.executable, str(repo / script), *map(str, args)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_and_validate_mixvit_on_the_embedded_data(tmp_path):
    import json
    proc = _run('train.py', '--model', 'cait_xxs_mixvit2', '--model-kwargs', 'depth=2', '--opt', 'adamw',
                '--lr', '1e-3', '--weight-decay', '0.05', '--drop-path', '0.05', '-b', '32', '--epochs', 1,
                '--limit-train-batches', 4, '--output', tmp_path, '--experiment', 'vit')
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / 'vit'
    results = json.loads((run / 'results.json').read_text())
    assert len(results['best']['test']['member_top1']) == 2
    config = json.loads((run / 'best' / 'config.json').read_text())
    assert config['architecture'] == 'cait_xxs_mixvit2' and config['model_args']['depth'] == 2
    proc = _run('validate.py', run, '--results-file', tmp_path / 'val.json')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tmp_path / 'val.json').read_text())['test']['member_top1']) == 2


@pytest.mark.skipif(not default_cifar10_zip().exists(), reason='CIFAR-10 zip of ../shared missing')
def test_baseline_trains_with_timm_augmentation_on_cifar10(tmp_path):
    proc = _run('train.py', '-c', 'configs/mixvit/cifar10_cait_xxs.yaml', '--model', 'cait_xxs_mixvit1',
                '--model-kwargs', 'depth=2', '--no-amp', '-b', '16', '--workers', 0, '--epochs', 1,
                '--limit-train-batches', 2, '--val-per-class', 10, '--output', tmp_path, '--experiment', 'base')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'base' / 'results.json').exists()


def test_auto_augment_needs_image_data(tmp_path):
    proc = _run('train.py', '--model', 'cait_xxs_mixvit2', '--aa', 'rand-m9-mstd0.5', '--output', tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: per-image augmentation (--aa) needs')


# --- the source attribution learns; both class stages; coarse grids ------------------------------------

def _class_stage_parameters(model):
    """The class stage's parameter tensors: its blocks (CaiT's class attention, ConViT's blocks after the
    class token joins), the final norm and the heads."""
    blocks = model.blocks_token_only if isinstance(model, Cait) else model.blocks[model.local_up_to_layer:]
    return [*blocks.parameters(), *model.norm.parameters(), *model.head.parameters()]


def _attribution_gradient_ratio(model, token_scale=1.0):
    """RMS gradient of the source embeddings over the median RMS gradient of the class stage's tensors, at
    initialisation, on one mixed batch; ``token_scale`` multiplies the trunk's output tokens (a trunk whose
    residual stream has grown, as over training or in a pretrained core)."""
    if token_scale != 1.0:
        model.blocks[model.trunk_depth - 1].register_forward_hook(lambda mod, inp, out: out * token_scale)
    model.train()
    out = model(torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), _binary_masks(8))
    labels = torch.randint(0, 10, (8, 2), generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten()).backward()

    def rms(p):
        return p.grad.pow(2).mean().sqrt().item()
    others = sorted(rms(p) for p in _class_stage_parameters(model))
    return rms(model.source_embed) / others[len(others) // 2]


@pytest.mark.parametrize('name,kwargs', [
    ('cait_xxs_mixvit2', {}),                                     # the registered LayerScale 1e-5
    ('cait_xxs_mixvit2', dict(init_values=0.1)),                  # the fair test's shallow CaiT's
    ('convit_tiny_mixvit2', {}),
])
def test_source_attribution_gradient_is_of_the_order_of_the_class_stage_whatever_the_token_scale(name, kwargs):
    """At initialisation the source embeddings get a gradient of the order of the class stage's parameters
    (within 10x of their median), also when the trunk's tokens are 30x larger: tags added after the class
    blocks' norm keep their share and gradient (added before it, both fell 30x, to 0.02-0.03 of the median)."""
    ratios = []
    for scale in (1.0, 30.0):
        torch.manual_seed(0)
        ratios.append(_attribution_gradient_ratio(_tiny(name, **kwargs), token_scale=scale))
    for ratio in ratios:
        assert 0.1 < ratio < 10, ratios
    assert ratios[1] == pytest.approx(ratios[0], rel=0.05)


@pytest.mark.parametrize('name', ['cait_xxs_mixvit2', 'convit_tiny_mixvit2'])
def test_class_blocks_read_the_source_tags_after_their_norm(name):
    """The tagged class stage is timm's class stage on normed tokens plus the tags: zero tags change nothing."""
    model = _tiny(name).eval()
    x, masks = torch.randn(2, 2, 3, 32, 32), _binary_masks(2)
    with torch.no_grad():
        model.source_embed.zero_()
        tagged = model(x, masks)
        model.attribution_depth = -1  # the same weights with no attribution at all
        plain = model(x, masks)
    torch.testing.assert_close(tagged, plain)


@pytest.mark.parametrize('name', ['cait_xxs_mixvit2', 'convit_tiny_mixvit2'])
def test_shared_class_stage_one_pass_one_class_token_read_by_m_heads(name):
    model = _tiny(name, class_stage='shared', num_classes=7)
    assert model.num_class_tokens == 1 and model.cls_token.shape == (1, 1, model.embed_dim)
    batch_sizes = []
    first_class_block = model.blocks_token_only[0] if name.startswith('cait') else model.blocks[model.trunk_depth]
    first_class_block.norm1.register_forward_hook(lambda mod, inp, out: batch_sizes.append(out.shape[0]))
    model.train()
    out = model(torch.randn(3, 2, 3, 32, 32), _binary_masks(3))
    assert out.shape == (3, 2, 7) and batch_sizes == [3]  # one pass over the mixed tokens, not one per member
    labels = torch.randint(0, 7, (3, 2))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    head_grad = model.head.weight.grad.unflatten(0, (2, 7))
    assert not torch.allclose(head_grad[0], head_grad[1])  # each head learns its own member's label
    model.eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(3, 3, 32, 32)).shape == (3, 2 + 64, model.embed_dim)
        assert model.forward_members(torch.randn(3, 3, 32, 32)).shape == (3, 2, 7)
        # one image with inference='duplicate' (I1): one pass too, its class feature read by the M heads
        model.inference = 'duplicate'
        features = model.forward_features(torch.randn(3, 3, 32, 32))
        torch.testing.assert_close(features[:, 0], features[:, 1])


@pytest.mark.parametrize('class_stage', ['member', 'shared'])
@pytest.mark.parametrize('name', ['cait_xxs_mixvit2', 'convit_tiny_mixvit2'])
def test_both_class_stages_trace_with_torch_fx(name, class_stage):
    """timm's FX feature extraction (as tests/test_models.py runs it) on both readings of the class stage."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    model = _tiny(name, class_stage=class_stage).eval()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tuple(fx_model(x).values())[0], model(x))
    fx_model.train()
    tuple(fx_model(x).values())[0].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_binary_mixing_on_a_grid_under_8x8_warns_what_the_member_targets_are():
    model = _tiny('cait_xxs_mixvit2', img_size=16, patch_size=4)           # the old 16 px digits run: 4x4 tokens
    with pytest.warns(UserWarning, match=r'4x4 grid .* one of \{0, 1, 4, .*16\} of 16 tokens.* one member gets '
                                         r'no token \(loss weight 0\)'):
        timm_mimo.MimoBatchBuilder.from_model(model, (16, 16), mix_mode='box', seed=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm_mimo.MimoBatchBuilder.from_model(_tiny('cait_xxs_mixvit2'), (32, 32), mix_mode='box', seed=0)  # 8x8
        timm_mimo.MimoBatchBuilder.from_model(model, (16, 16), mix_mode='linear', seed=0)  # not binary


def test_box_msda_pastes_whole_tokens_and_mixes_labels_by_token_share():
    """The augmentation-only control: M = 1, the partner's box is whole 4x4-pixel tokens, the label share
    the exact share of tokens."""
    model = _tiny('cait_xxs_mixvit1')
    builder = timm_mimo.MimoBatchBuilder.from_model(model, (32, 32), msda='box', msda_prob=1.0, msda_alpha=2.0,
                                                    augment=None, seed=0)
    images = torch.arange(16.).repeat_interleave(3 * 32 * 32).view(16, 3, 32, 32)  # image i is constant i
    labels = torch.arange(16) % 10
    batch = builder(images, labels)
    mixed = batch.inputs[:, 0, 0]                                                   # (B, 32, 32)
    tokens = mixed.unfold(1, 4, 4).unfold(2, 4, 4)                                  # (B, 8, 8, 4, 4)
    assert (tokens == tokens[..., :1, :1]).all()                                    # every token from one image
    for i in range(16):
        values, counts = tokens[i, :, :, 0, 0].unique(return_counts=True)
        assert len(values) <= 2
        expected = torch.zeros(10)
        for v, c in zip(values.long(), counts):
            expected[v % 10] += c / 64
        torch.testing.assert_close(batch.targets[i, 0], expected)
