"""Fast training settings: batched random erasing, torch.compile with a fallback, fused optimizers."""
import logging

import pytest
import torch

from timm_mimo.augment import random_erase
from timm_mimo.train.speed import CompiledWithFallback, create_optimizer


def _boxes(erased: torch.Tensor):
    """Per sample: whether anything was erased, and whether the erased pixels form one full rectangle."""
    rows, cols = erased.any(2), erased.any(1)           # (N, H), (N, W)
    rectangle = (rows[:, :, None] & cols[:, None, :]) == erased
    return erased.flatten(1).any(1), rectangle.flatten(1).all(1)


def test_const_erasing_draws_one_box_of_the_right_size_per_sample():
    gen = torch.Generator().manual_seed(0)
    images = torch.ones(4000, 3, 32, 32)
    out = random_erase(images, 1.0, 'const', generator=gen)
    erased = (out == 0).all(1)                          # every channel of an erased pixel is 0
    assert torch.equal((out == 0).any(1), erased), 'a box covers all channels'
    any_erased, rectangle = _boxes(erased)
    assert bool(rectangle.all())
    share = erased.flatten(1).float().mean(1)
    # area share in [0.02, 1/3] before rounding the sides; a box must fit strictly inside the image
    assert float(share.max()) < 0.36 and float(share[any_erased].min()) > 0.01
    assert float(any_erased.float().mean()) > 0.97, 'almost every sample finds a box in 10 attempts'
    assert abs(float(share[any_erased].mean()) - (0.02 + 1 / 3) / 2) < 0.02


def test_probability_modes_and_replay():
    images = torch.randn(3000, 3, 16, 16) * 0.01 + 5.0  # far from N(0, 1) noise, so erased pixels stand out
    out = random_erase(images, 0.3, 'pixel', generator=torch.Generator().manual_seed(1))
    erased = (out - images).abs().flatten(1).amax(1) > 1
    assert abs(float(erased.float().mean()) - 0.3 * 0.99) < 0.04
    changed = (out - images).abs() > 1
    noise = out[changed]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    again = random_erase(images, 0.3, 'pixel', generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again), 'one generator seed replays every draw'
    assert torch.equal(random_erase(images, 0.0, 'pixel', generator=torch.Generator().manual_seed(1)), images)

    rand = random_erase(images, 1.0, 'rand', generator=torch.Generator().manual_seed(2))
    box = (rand - images).abs() > 1                     # (N, C, H, W)
    for i in range(20):
        for c in range(3):
            values = rand[i, c][box[i, c]]
            if values.numel():
                assert torch.allclose(values, values[0].expand_as(values)), "'rand' fills one value per channel"


def test_erasing_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown random erasing mode 'blur'"):
        random_erase(torch.zeros(1, 3, 8, 8), 0.5, 'blur')


def test_compile_falls_back_to_eager_when_the_backend_fails(caplog):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError('no C compiler on this machine')

    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger='timm_mimo.train.speed'):
        wrapped = CompiledWithFallback(model, backend=failing_backend)
        out = wrapped(x)
    torch.testing.assert_close(out, model(x))
    assert wrapped.compiled is None and 'no C compiler' in wrapped.fallback_reason
    assert sum('training uncompiled' in r.message for r in caplog.records) == 1

    # an unknown backend is refused by torch.compile itself, before any call
    unknown = CompiledWithFallback(model, backend='no_such_backend')
    assert unknown.compiled is None and 'no_such_backend' in unknown.fallback_reason
    torch.testing.assert_close(unknown(x), model(x))


def test_compile_wrapper_raises_the_models_own_errors():
    wrapped = CompiledWithFallback(torch.nn.Linear(3, 2), backend='eager')
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied|size mismatch|mat1 and mat2'):
        wrapped(torch.randn(4, 5))


def test_fused_optimizer_where_pytorch_has_one():
    model = torch.nn.Linear(3, 2)
    opt, fused = create_optimizer(model, 'sgd', True, torch.device('cpu'), lr=0.1, weight_decay=1e-4, momentum=0.9)
    assert fused and opt.defaults['fused'] and opt.defaults['nesterov']
    opt, fused = create_optimizer(model, 'adamw', None, torch.device('cpu'), lr=1e-3, weight_decay=0.05)
    assert not fused and not opt.defaults.get('fused'), 'auto: fused only on CUDA'
    opt, fused = create_optimizer(model, 'lamb', None, torch.device('cuda'), lr=1e-3, weight_decay=0.05)
    assert not fused, "auto falls back for timm's own optimizers"
    with pytest.raises(ValueError, match="optimizer 'lamb' has no fused implementation"):
        create_optimizer(model, 'lamb', True, torch.device('cpu'), lr=1e-3, weight_decay=0.05)


def test_fused_and_unfused_sgd_take_the_same_step():
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for fused, model in zip((False, True), models):
        opt, _ = create_optimizer(model, 'sgd', fused, torch.device('cpu'), lr=0.1, weight_decay=5e-4,
                                  momentum=0.9, filter_bias_and_bn=False)
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
