"""MixMo mixing as pure tensor functions (docs/methods/mixmo.md §1-2).

Every function works on the device of its inputs, is vectorised over the batch (no per-sample Python),
and takes an optional ``torch.Generator`` so a seed reproduces the draws exactly.

Randomness follows the official code: per sample, the ratio kappa and the box position; per batch, the
choice between patch and linear mixing and the permutation of member roles (who gets the box).
"""
from typing import Optional, Tuple

import torch

MIX_MODES = ('mimo', 'linear', 'cut', 'box', 'token')
"""'mimo': kappa = 1/M, linear sum (Havasi et al.); 'linear': Linear-MixMo; 'cut': Cut-MixMo (patch masks
with probability ``mix_prob`` per batch, linear masks otherwise). Binary masks, every cell from exactly one
member (MixViT's token mixing, docs/methods/mixvit.md §3.2): 'box': a box for one member ("corrected" CutMix on the
grid), the rest for the others; 'token': every cell drawn on its own ("patch-Mixup")."""

BINARY_MIX_MODES = ('box', 'token')
# binary masks on a coarser grid give members a handful of tokens, often none: see coarse_grid_warning
MIN_BINARY_GRID = 8


def check_mix_mode(mix_mode: str) -> str:
    if mix_mode not in MIX_MODES:
        raise ValueError(f'unknown mix mode {mix_mode!r}, expected one of {MIX_MODES}')
    return mix_mode


def check_alpha(alpha: float, what: str = 'alpha') -> float:
    if not alpha > 0:
        raise ValueError(f'{what} must be > 0 to sample mixing ratios, got {alpha}')
    return float(alpha)


def sample_gamma(concentration: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gamma(concentration, 1) samples, vectorised Marsaglia-Tsang rejection.

    torch's own Gamma/Beta/Dirichlet samplers take no Generator; this one does, so mask draws are
    reproducible from a seed on any device. Each round accepts > 95 % of the pending entries.
    """
    conc = concentration.float()
    # Gamma(a) = Gamma(a + 1) * U^(1/a) lifts shapes below 1 into the range the method needs
    boosted = conc < 1
    shape = torch.where(boosted, conc + 1, conc)
    d = shape - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    out = torch.zeros_like(shape)
    pending = torch.ones_like(shape, dtype=torch.bool)
    while bool(pending.any()):
        z = torch.randn(shape.shape, generator=generator, device=shape.device)
        u = torch.rand(shape.shape, generator=generator, device=shape.device)
        v = (1 + c * z) ** 3
        log_v = torch.log(v.clamp_min(1e-30))
        accept = pending & (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
        out = torch.where(accept, d * v, out)
        pending = pending & ~accept
    if bool(boosted.any()):
        u = torch.rand(shape.shape, generator=generator, device=shape.device)
        out = torch.where(boosted, out * u.pow(1.0 / conc), out)
    return out


def sample_beta(
        num: int, alpha: float, generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None) -> torch.Tensor:
    """(num,) draws of Beta(alpha, alpha)."""
    check_alpha(alpha)
    g = sample_gamma(torch.full((num, 2), alpha, device=device), generator)
    return g[:, 0] / g.sum(1)


def sample_kappa(
        batch_size: int, num_members: int, alpha: float, generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-sample mixing ratios (B, M) from a symmetric Dirichlet(alpha) (Beta(alpha, alpha) for M = 2)."""
    check_alpha(alpha)
    g = sample_gamma(torch.full((batch_size, num_members), alpha, device=device), generator)
    return g / g.sum(1, keepdim=True)


def box_masks(
        area: torch.Tensor, grid: Tuple[int, int], generator: Optional[torch.Generator] = None,
        inside: bool = False) -> torch.Tensor:
    """Binary masks (N, h, w), 1 inside one box per sample of about ``area`` of the grid.

    MixMo's geometry (docs/methods/mixmo.md §1.4, default): side = floor(size * sqrt(area)); centre uniform over
    all cells; corners at centre -+ side // 2, clipped to the grid (so border boxes shrink).
    ``inside`` (MixViT's token grid, docs/methods/mixvit.md §3.2): side = round(size * sqrt(area)), the box placed
    uniformly where it fits whole, so the area stays close to ``area`` on a grid as coarse as 8x8.
    Either way the true area is the mask mean: callers re-read it.
    """
    h, w = grid
    n = area.shape[0]
    side = area.float().clamp(0, 1).sqrt()
    rows = torch.arange(h, device=area.device)
    cols = torch.arange(w, device=area.device)
    if inside:
        side_h = torch.round(h * side).long()
        side_w = torch.round(w * side).long()
        u = torch.rand(2, n, generator=generator, device=area.device)
        top = (u[0] * (h - side_h + 1)).long()
        left = (u[1] * (w - side_w + 1)).long()
        in_rows = (rows >= top[:, None]) & (rows < (top + side_h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + side_w)[:, None])
        return (in_rows[:, :, None] & in_cols[:, None, :]).float()
    half_h = torch.floor(h * side).long() // 2
    half_w = torch.floor(w * side).long() // 2
    cy = torch.randint(0, h, (n,), generator=generator, device=area.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=area.device)
    in_rows = (rows >= (cy - half_h).clamp(0, h)[:, None]) & (rows < (cy + half_h).clamp(0, h)[:, None])
    in_cols = (cols >= (cx - half_w).clamp(0, w)[:, None]) & (cols < (cx + half_w).clamp(0, w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).float()


def categorical_cells(
        probs: torch.Tensor, grid: Tuple[int, int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One-hot masks (B, K, h, w): each cell of each sample goes to one of K owners drawn with ``probs`` (B, K)."""
    b, k = probs.shape
    h, w = grid
    cumulative = (probs / probs.sum(1, keepdim=True).clamp_min(1e-12)).cumsum(1)
    u = torch.rand(b, 1, h, w, generator=generator, device=probs.device)
    owner = (u > cumulative[:, :-1, None, None]).sum(1)                      # (B, h, w) in [0, K)
    return (owner[:, None] == torch.arange(k, device=probs.device)[None, :, None, None]).float()


def mixmo_masks(
        kappa: torch.Tensor, grid: Tuple[int, int], patch: bool,
        generator: Optional[torch.Generator] = None, binary: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Member masks (B, M, h, w) summing to 1 over M, and the true ratios kappa (B, M) = mask means.

    Linear masks are the constant kappa. Patch masks ("cut-in-mix", docs/methods/mixmo.md §1.4, §1.8): member 0 gets a
    box of area kappa_0; the complement is shared by the others in proportion to their kappa, linearly,
    or cell by cell when ``binary`` (for M = 2 the other member gets exactly the complement either way).
    ``binary`` also places the box whole inside the grid (MixViT's token geometry, see :func:`box_masks`).
    Role order is not permuted here.
    """
    b, num_members = kappa.shape
    h, w = grid
    if not patch or num_members == 1:
        masks = kappa[:, :, None, None].expand(b, num_members, h, w).contiguous()
        return masks, kappa
    box = box_masks(kappa[:, 0], grid, generator, inside=binary)
    rest = kappa[:, 1:]
    if binary and num_members > 2:
        rest_masks = categorical_cells(rest, grid, generator)
    else:
        rest_masks = (rest / rest.sum(1, keepdim=True).clamp_min(1e-12))[:, :, None, None]
    masks = torch.cat([box[:, None], (1 - box)[:, None] * rest_masks], dim=1)
    return masks, masks.mean((2, 3))


def check_binary_grid(num_members: int, grid: Tuple[int, int]):
    """Binary masks give each cell to one member: more members than cells cannot all get a share."""
    if num_members > grid[0] * grid[1]:
        raise ValueError(f'binary masks cannot share a {grid[0]}x{grid[1]} grid among {num_members} members: '
                         f'at most {grid[0] * grid[1]} are supported')


def member_loss_weights(kappa: torch.Tensor, weight_root: float) -> torch.Tensor:
    """MixMo loss weights w_k = M * kappa_k^(1/r) / sum_j kappa_j^(1/r) (docs/methods/mixmo.md §2.1); they sum to M.

    r = 1 weighs members like mixup labels; r -> inf gives uniform weights; MixMo uses r = 3.
    """
    if not weight_root > 0:
        raise ValueError(f'weight_root must be > 0, got {weight_root}')
    powered = kappa.clamp_min(0).pow(1.0 / weight_root)
    return kappa.shape[1] * powered / powered.sum(1, keepdim=True).clamp_min(1e-12)


def patch_mix_prob(progress: float, mix_prob: float = 0.5, decay_start: float = 11 / 12) -> float:
    """Probability of patch mixing at training progress in [0, 1] (epoch / epochs, docs/methods/mixmo.md §1.5).

    Constant ``mix_prob`` until ``decay_start``, then linear decay to 0 at the end of training.
    """
    if progress < decay_start:
        return mix_prob
    return max(0.0, mix_prob * (1.0 - progress) / (1.0 - decay_start))


def sample_mixing(
        batch_size: int,
        num_members: int,
        grid: Tuple[int, int],
        mix_mode: str = 'cut',
        mix_prob: float = 0.5,
        mix_alpha: float = 2.0,
        progress: float = 0.0,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masks (B, M, h, w) and true ratios kappa (B, M) for one batch.

    Per batch: patch or linear mixing (``cut`` mode, probability from :func:`patch_mix_prob`) and one
    permutation of the member roles; per sample: kappa ~ Dirichlet(mix_alpha) and the box position.
    Binary modes ('box', 'token') re-read kappa as the exact share of cells ("corrected" CutMix).
    """
    check_mix_mode(mix_mode)
    if mix_mode in BINARY_MIX_MODES:
        check_binary_grid(num_members, grid)
    if num_members == 1 or mix_mode == 'mimo':
        kappa = torch.full((batch_size, num_members), 1.0 / num_members, device=device)
        return mixmo_masks(kappa, grid, patch=False)
    kappa = sample_kappa(batch_size, num_members, mix_alpha, generator, device)
    if mix_mode == 'token':
        masks = categorical_cells(kappa, grid, generator)
        kappa = masks.mean((2, 3))
    else:
        patch = mix_mode == 'box'
        if mix_mode == 'cut':
            p = patch_mix_prob(progress, mix_prob)
            patch = bool(torch.rand((), generator=generator, device=device) < p)
        masks, kappa = mixmo_masks(kappa, grid, patch, generator, binary=mix_mode == 'box')
    # batch-level role permutation: which member gets the box (docs/methods/mixmo.md §1.6)
    roles = torch.randperm(num_members, generator=generator, device=device)
    return masks[:, roles], kappa[:, roles]


def coarse_grid_warning(num_members: int, grid: Tuple[int, int], mix_mode: str, mix_alpha: float = 2.0,
                        samples: int = 4096) -> Optional[str]:
    """What binary mixing on a grid smaller than 8x8 does to the member targets, or None when it is not that.

    Measured on ``samples`` draws of :func:`sample_mixing` itself (a fixed seed): the token counts a member's
    target can come from, the share of targets read from a quarter of the grid or less, and how often a
    member gets no token at all (its loss weight is then 0).
    """
    h, w = grid
    if mix_mode not in BINARY_MIX_MODES or num_members < 2 or min(h, w) >= MIN_BINARY_GRID:
        return None
    masks, _ = sample_mixing(samples, num_members, grid, mix_mode, mix_alpha=mix_alpha,
                             generator=torch.Generator().manual_seed(0))
    counts = masks.sum((2, 3)).round().long()                                  # (samples, M) tokens per member
    cells = h * w
    values = counts.unique().tolist()
    shown = ', '.join(map(str, values)) if len(values) <= 12 else f'{values[0]} .. {values[-1]}'
    few = (counts <= cells // 4).float().mean().item()
    empty = (counts == 0).any(1).float().mean().item()
    return (f'binary {mix_mode!r} mixing on a {h}x{w} grid (a ViT: image size / patch size) is coarser than '
            f'{MIN_BINARY_GRID}x{MIN_BINARY_GRID}: a member\'s target comes from one of {{{shown}}} of {cells} '
            f'tokens, {few:.0%} of the member targets from {cells // 4} tokens or fewer, and in {empty:.0%} of '
            f'the samples one member gets no token (loss weight 0). Use a grid of at least '
            f'{MIN_BINARY_GRID}x{MIN_BINARY_GRID}: a smaller patch or larger images')
