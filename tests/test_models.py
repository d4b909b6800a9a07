"""MixMo CNNs as timm models: registry, parameter counts, timm's model-suite checks, MIMO contract."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import timm
import timm.optim
import timm_mimo
from timm_mimo.mimo import ensemble_logits

CNN_MODELS = [
    'wrn28_10', 'wrn28_10_mixmo2', 'wrn28_10_mixmo3', 'wrn16_2', 'wrn16_2_mixmo2', 'wrn16_4', 'wrn16_4_mixmo2', 'wrn16_8', 'wrn16_8_mixmo2',
    'preactresnet18', 'preactresnet18_mixmo2', 'preactresnet18_w2', 'preactresnet18_w2_mixmo2',
    'preactresnet18_w3', 'preactresnet18_w3_mixmo2',
]
SMALL = ['wrn16_4', 'wrn16_4_mixmo2', 'preactresnet18_mixmo2']


def _input(model, batch_size=2, members=False):
    size = model.pretrained_cfg['input_size']
    shape = (batch_size, model.num_members, *size) if members else (batch_size, *size)
    return torch.randn(shape)


def test_every_model_is_registered_by_import_and_is_ours():
    assert set(CNN_MODELS) <= set(timm.list_models())
    for name in CNN_MODELS:
        # a name clash with a timm built-in would make the entrypoint come from timm's own module
        assert timm.models.model_entrypoint(name).__module__ == 'timm_mimo.models.mixmo_resnets'


@pytest.mark.parametrize('name,num_classes,expected', [
    ('wrn28_10', 100, 36_536_884),
    ('wrn28_10_mixmo2', 100, 36_601_416),
    ('wrn28_10', 10, 36_479_194),
    ('wrn28_10_mixmo2', 10, 36_486_036),
])
def test_wrn_parameter_counts_match_spec(name, num_classes, expected):
    with torch.device('meta'):  # shapes only: skips the slow initialisation of 36M weights
        model = timm.create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize('name,millions', [
    ('preactresnet18', 11.27), ('preactresnet18_mixmo2', 11.37), ('preactresnet18_w2', 44.78),
    ('preactresnet18_w2_mixmo2', 44.99), ('preactresnet18_w3', 100.54), ('preactresnet18_w3_mixmo2', 100.85),
])
def test_preactresnet_parameter_counts_match_spec(name, millions):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert model.num_classes == 200 and model.pretrained_cfg['input_size'] == (3, 64, 64)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize('name', CNN_MODELS)
def test_timm_forward_backward_and_default_cfg(name):
    """The checks of timm's tests/test_models.py: forward, backward (all params get grads), default cfg."""
    model = timm.create_model(name, num_classes=42)
    model.train()
    x = _input(model)
    out = model(x)
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'

    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict and cfg['classifier'] + '.weight' in state_dict
    x = _input(model, 1)
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == cfg['pool_size']
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).shape[-2:] == cfg['pool_size']


@pytest.mark.parametrize('name', SMALL)
def test_torchscript_and_features_only(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, timm still tests it
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
        members = _input(model, members=True)
        m = model.num_members
        uniform = torch.full((members.shape[0], m, *model.mix_grid_size(members.shape[-2:])), 1.0 / m)
        assert torch.allclose(scripted(members, uniform), model(members, uniform), atol=1e-5)
        assert torch.allclose(scripted(x, None, True), model(x, members=True), atol=1e-5)
        # forward_members: the same calls, uniform masks made for member inputs without them
        assert torch.allclose(model.forward_members(members), model(members, uniform), atol=1e-6)
    features = timm.create_model(name, features_only=True).eval()
    outs = features(x)
    assert len(outs) >= 4 and [o.shape[1] for o in outs] == features.feature_info.channels()


@pytest.mark.parametrize('name,num_members', [
    ('wrn16_4_mixmo2', 2), ('wrn16_4_mixmo2', 3), ('preactresnet18_mixmo2', 2)])
def test_shapes_train_and_eval(name, num_members):
    model = timm.create_model(name, num_classes=7, num_members=num_members)
    m = model.num_members
    members = _input(model, 3, members=True)
    masks = torch.full((3, m, *model.mix_grid_size(members.shape[-2:])), 1.0 / m)
    model.train()
    assert model(members, masks).shape == (3, m, 7)
    assert model.forward_members(members).shape == (3, m, 7)
    model.eval()
    x = _input(model, 3)
    assert model(x).shape == (3, 7)
    assert model.forward_members(x).shape == (3, m, 7)


def test_num_members_one_equals_the_vanilla_network():
    torch.manual_seed(0)
    vanilla = timm.create_model('wrn16_4').eval()
    as_mixmo = timm.create_model('wrn16_4_mixmo2', num_members=1).eval()
    assert {k: v.shape for k, v in vanilla.state_dict().items()} == \
        {k: v.shape for k, v in as_mixmo.state_dict().items()}
    as_mixmo.load_state_dict(vanilla.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # the plain network written out: one conv, the stages, BN-ReLU, pool, one linear layer
        plain = F.conv2d(x, vanilla.stem.weight, padding=1)
        plain = vanilla.norm(vanilla.stages(plain)).mean((2, 3))
        plain = F.linear(plain, vanilla.head.fc.weight, vanilla.head.fc.bias)
        assert torch.allclose(vanilla(x), plain, atol=1e-5)
        assert torch.allclose(as_mixmo(x), plain, atol=1e-5)
        # the member path with M = 1 and an all-ones mask is the same network again
        ones = torch.ones(4, 1, 32, 32)
        assert torch.allclose(as_mixmo(x[:, None], ones)[:, 0], plain, atol=1e-5)


def test_inference_sums_member_encoders_and_runs_the_core_once():
    model = timm.create_model('wrn16_4_mixmo2').eval()
    calls = []
    model.stages.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        single = model(x)
        assert calls == [5], 'the shared core must run once on the B images, not M times'
        # same image to both encoders, mixed with kappa = 1/2 and times M = the sum of the encoders
        repeated = x[:, None].expand(5, 2, 3, 32, 32)
        half = torch.full((5, 2, 32, 32), 0.5)
        assert torch.allclose(model.forward_members(x), model(repeated, half), atol=1e-4)
        assert torch.allclose(single, model(repeated, half).mean(1), atol=1e-4)
    encoders = model.stem.weight.view(2, 16, 3, 3, 3)
    summed = F.conv2d(x, encoders[0], padding=1) + F.conv2d(x, encoders[1], padding=1)
    assert torch.allclose(model.stem(x), summed, atol=1e-5)


def test_members_share_the_core_and_have_their_own_heads():
    model = timm.create_model('wrn16_4_mixmo2').train()
    member_logits = model.forward_members(torch.randn(2, 2, 3, 32, 32))
    member_logits[:, 0].sum().backward()
    head_grad = model.head.fc.weight.grad.view(2, 10, -1)
    assert head_grad[0].abs().sum() > 0 and head_grad[1].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stages.parameters())


def test_ensemble_rules():
    logits = torch.randn(6, 3, 5)
    assert torch.allclose(ensemble_logits(logits, 'logits'), logits.mean(1))
    assert torch.allclose(ensemble_logits(logits, 'probs').softmax(-1), logits.softmax(-1).mean(1), atol=1e-6)
    model = timm.create_model('wrn16_4_mixmo2', ensemble='probs').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(-1), model.forward_members(x).softmax(-1).mean(1), atol=1e-5)


def test_reset_classifier_resets_every_head_and_timm_interface():
    model = timm.create_model('wrn16_4_mixmo2')
    model.reset_classifier(7)
    assert model.get_classifier().weight.shape == (2 * 7, model.num_features)
    assert model.forward_members(torch.randn(1, 3, 32, 32)).shape == (1, 2, 7)
    assert model.no_weight_decay() == set()
    groups = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.8).param_groups
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    model.set_grad_checkpointing(True)
    model.train()
    model.forward_members(torch.randn(2, 2, 3, 32, 32)).sum().backward()


def test_pretrained_cfg_tags():
    assert timm.create_model('wrn28_10_mixmo2.cifar100').num_classes == 100
    assert timm.create_model('wrn16_4_mixmo2').pretrained_cfg['mean'] == timm_mimo.constants.CIFAR_DEFAULT_MEAN


@pytest.mark.parametrize('kwargs,error', [
    (dict(num_members=0), ValueError),
    (dict(num_members=1.5), TypeError),
    (dict(ensemble='median'), ValueError),
])
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        timm.create_model('wrn16_4_mixmo2', **kwargs)


def test_bad_inputs_give_clear_errors():
    model = timm.create_model('wrn16_4_mixmo2')
    with pytest.raises(ValueError, match='3 members but the model has num_members=2'):
        model.forward_members(torch.randn(2, 3, 3, 32, 32))
    with pytest.raises(ValueError, match=r'one image per sample .* model\(x, masks\) or model.forward_members'):
        model(torch.randn(2, 2, 3, 32, 32))  # member inputs need their masks
    with pytest.raises(ValueError, match='mixing masks are 16x16'):
        model(torch.randn(2, 2, 3, 32, 32), torch.rand(2, 2, 16, 16))
    with pytest.raises(ValueError, match='mixing masks must be'):
        model(torch.randn(2, 2, 3, 32, 32), torch.rand(2, 32, 32))
    with pytest.raises(ValueError, match='channels'):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='smaller than the network reduction'):
        model(torch.randn(2, 3, 2, 2))


def _fx_model(model):
    """The model traced as timm's own tests/test_models.py traces it (timm's FX feature extraction)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('name', ['wrn16_2_mixmo2', 'wrn16_2', 'preactresnet18_mixmo2', 'cait_xxs_mixvit2',
                                  'convit_tiny_mixvit2'])
def test_torch_fx_traces_the_forward_as_timm_tests_it(name):
    """timm's test_model_forward_fx / _backward_fx / _forward_fx_torchscript, on our models (the full file,
    run with `import timm_mimo` first, passes on every registered WRN, PreActResNet and MixViT)."""
    model = timm.create_model(name).eval()
    x = _input(model, 1)
    with torch.no_grad():
        fx_model = _fx_model(model)
        assert torch.equal(tuple(fx_model(x).values())[0], model(x))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            scripted = torch.jit.script(fx_model)
        assert torch.allclose(tuple(scripted(x).values())[0], model(x), atol=1e-5)
    model.train()
    out = tuple(_fx_model(model)(_input(model, 2)).values())[0]
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
