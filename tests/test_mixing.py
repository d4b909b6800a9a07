"""MixMo mixing functions against the method (docs/methods/mixmo.md §1-2)."""
import math

import pytest
import torch

from timm_mimo.mixing import (
    box_masks, member_loss_weights, mixmo_masks, patch_mix_prob, sample_gamma, sample_kappa, sample_mixing)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('alpha', [0.3, 1.0, 2.0, 5.0])
def test_gamma_sampler_moments(alpha):
    draws = sample_gamma(torch.full((40000,), alpha), gen())
    assert (draws > 0).all()
    assert abs(draws.mean().item() - alpha) < 0.03 * alpha + 0.01
    assert abs(draws.var().item() - alpha) < 0.08 * alpha + 0.01


def test_kappa_is_dirichlet_per_sample():
    kappa = sample_kappa(40000, 2, 2.0, gen())
    assert kappa.shape == (40000, 2)
    assert torch.allclose(kappa.sum(1), torch.ones(40000))
    # Beta(2, 2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.05
    assert abs(kappa[:, 0].mean().item() - 0.5) < 0.01
    assert abs(kappa[:, 0].var().item() - 0.05) < 0.003
    three = sample_kappa(20000, 3, 2.0, gen())
    assert torch.allclose(three.mean(0), torch.full((3,), 1 / 3), atol=0.01)


def test_draws_are_reproducible_from_a_seed():
    a = sample_mixing(16, 2, (32, 32), 'cut', mix_prob=0.5, generator=gen(7))
    b = sample_mixing(16, 2, (32, 32), 'cut', mix_prob=0.5, generator=gen(7))
    c = sample_mixing(16, 2, (32, 32), 'cut', mix_prob=0.5, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_box_geometry():
    """Side floor(size * sqrt(area)), even-floored around a centre, clipped at the border
    (docs/methods/mixmo.md §1.4)."""
    area = torch.full((2000,), 0.25)
    masks = box_masks(area, (32, 32), gen())
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for mask in masks[:200]:
        rows = mask.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        # one solid rectangle
        assert mask.sum() == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        # full box is 2 * (floor(32 * 0.5) // 2) = 16 cells per side, smaller only where clipped
        assert len(rows) <= 16 and len(cols) <= 16
        if 0 < rows.min() and rows.max() < 31:
            assert len(rows) == 16
    unclipped = masks.sum((1, 2)) == 256
    # unclipped iff the centre lies in [8, 24] on both axes: probability (17/32)^2 = 0.282
    assert abs(unclipped.float().mean().item() - (17 / 32) ** 2) < 0.03


def test_cut_masks_are_binary_complements_with_mean_exactly_kappa():
    kappa = sample_kappa(256, 2, 2.0, gen())
    masks, true_kappa = mixmo_masks(kappa, (32, 32), patch=True, generator=gen(1))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(1), torch.ones(256, 32, 32))
    assert torch.equal(true_kappa, masks.mean((2, 3)))
    # the corrected kappa differs from the drawn one (clipping, rounding) but stays close on average
    assert not torch.equal(true_kappa, kappa)
    assert (true_kappa[:, 0] <= kappa[:, 0] + 1e-6).all()


def test_cut_in_mix_for_three_members():
    kappa = sample_kappa(64, 3, 2.0, gen())
    masks, true_kappa = mixmo_masks(kappa, (32, 32), patch=True, generator=gen(1))
    box = masks[:, 0]
    assert set(box.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(masks.sum(1), torch.ones(64, 32, 32))
    outside = box == 0
    ratio = masks[:, 1][outside] / masks[:, 2][outside]
    expected = (kappa[:, 1] / kappa[:, 2])[:, None, None].expand(64, 32, 32)[outside]
    assert torch.allclose(ratio, expected, rtol=1e-4)
    assert torch.allclose(true_kappa, masks.mean((2, 3)))


def test_linear_and_mimo_masks():
    masks, kappa = sample_mixing(32, 2, (8, 8), 'linear', generator=gen())
    assert torch.equal(masks, kappa[:, :, None, None].expand_as(masks))
    masks, kappa = sample_mixing(32, 3, (8, 8), 'mimo', generator=gen())
    assert torch.allclose(masks, torch.full_like(masks, 1 / 3)) and torch.allclose(kappa, torch.full_like(kappa, 1 / 3))


def test_patch_or_linear_is_chosen_per_batch_and_roles_are_permuted():
    binary = 0
    box_member = []
    for seed in range(200):
        masks, _ = sample_mixing(8, 2, (16, 16), 'cut', mix_prob=0.5, generator=gen(seed))
        is_binary = ((masks == 0) | (masks == 1)).all(dim=(1, 2, 3))
        assert is_binary.all() or not is_binary.any(), 'patch vs linear must be one choice per batch'
        if is_binary.all():
            binary += 1
            # the member holding the box: its mask is 1 on a rectangle, the other's on the complement
            box_member.append(int((masks[:, 1].mean((1, 2)) < masks[:, 0].mean((1, 2))).float().mean() > 0.5))
    assert 70 < binary < 130
    assert 0.3 < sum(box_member) / len(box_member) < 0.7


def test_patch_probability_schedule():
    assert patch_mix_prob(0.0) == 0.5 and patch_mix_prob(0.9) == 0.5
    # E = 300: constant through epoch 274 (progress < 11/12), then linear decay to 0 at epoch 300
    assert patch_mix_prob(274 / 300) == 0.5
    assert math.isclose(patch_mix_prob(287.5 / 300), 0.25, rel_tol=1e-6)
    assert patch_mix_prob(1.0) == 0.0
    masks, _ = sample_mixing(8, 2, (16, 16), 'cut', mix_prob=0.5, progress=1.0, generator=gen())
    assert not ((masks == 0) | (masks == 1)).all()


@pytest.mark.parametrize('kappa,weights', [
    (0.5, (1.0, 1.0)), (0.6, (1.067, 0.933)), (0.7, (1.140, 0.860)), (0.8, (1.227, 0.773)),
    (0.9, (1.351, 0.649)), (0.95, (1.455, 0.545)), (0.99, (1.645, 0.355)),
])
def test_loss_weights_match_the_spec_table(kappa, weights):
    w = member_loss_weights(torch.tensor([[kappa, 1 - kappa]]), 3.0)[0]
    assert w.tolist() == pytest.approx(weights, abs=1e-3)
    assert w.sum().item() == pytest.approx(2.0)


def test_loss_weights_root_one_and_infinity():
    kappa = torch.tensor([[0.9, 0.1]])
    assert member_loss_weights(kappa, 1.0)[0].tolist() == pytest.approx([1.8, 0.2])
    assert member_loss_weights(kappa, float('inf'))[0].tolist() == pytest.approx([1.0, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match='unknown mix mode'):
        sample_mixing(4, 2, (8, 8), 'cowmix')
    with pytest.raises(ValueError, match='alpha must be > 0'):
        sample_mixing(4, 2, (8, 8), 'cut', mix_alpha=0.0)
    with pytest.raises(ValueError, match='weight_root'):
        member_loss_weights(torch.rand(2, 2), 0.0)


@pytest.mark.parametrize('mode', ['box', 'token'])
@pytest.mark.parametrize('num_members', [2, 3, 4])
def test_binary_token_masks_have_mean_exactly_kappa(mode, num_members):
    """MixViT's masks: every cell from exactly one member, kappa re-read as the exact share ("corrected")."""
    masks, kappa = sample_mixing(2048, num_members, (8, 8), mode, generator=gen())
    assert ((masks == 0) | (masks == 1)).all()
    assert (masks.sum(1) == 1).all()
    torch.testing.assert_close(masks.mean((2, 3)), kappa, rtol=0, atol=0)
    # the box is placed whole, so the shares stay close to the Dirichlet draws: about 1/M on average
    torch.testing.assert_close(kappa.mean(0), torch.full((num_members,), 1 / num_members), rtol=0, atol=0.03)


def test_box_masks_inside_the_grid_are_whole_rectangles_of_about_the_area():
    area = torch.tensor([0.25, 0.5, 1.0, 0.0])
    masks = box_masks(area, (8, 8), gen(), inside=True)
    assert masks.sum((1, 2)).tolist() == [16.0, 36.0, 64.0, 0.0]  # sides round(8 * sqrt(area)): 4, 6, 8, 0
    rows, cols = masks[1].sum(1), masks[1].sum(0)
    assert set(rows.unique().tolist()) == {0.0, 6.0} and set(cols.unique().tolist()) == {0.0, 6.0}


def _is_rectangle(mask):
    cells = mask.nonzero()
    if len(cells) == 0:
        return True
    (r0, c0), (r1, c1) = cells.min(0).values, cells.max(0).values
    return int(mask.sum()) == int((r1 - r0 + 1) * (c1 - c0 + 1))


def test_box_roles_are_swapped_per_batch():
    owners = []
    g = gen()
    for _ in range(20):
        masks, _ = sample_mixing(16, 2, (8, 8), 'box', generator=g)
        # the box owner is the member whose masks are all rectangles (the other one's have holes)
        owners.append(all(_is_rectangle(m) for m in masks[:, 0]))
    assert any(owners) and not all(owners)
