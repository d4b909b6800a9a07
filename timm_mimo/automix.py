"""AutoMix: a learned mixing policy trained through a momentum copy of the classifier.

Paper: `AutoMix: Unveiling the Power of Mixup for Stronger Classifiers` (Liu et al., ECCV 2022,
arXiv 2103.13027). Written from the method description in docs/methods/automix.md (the sections cited
below), not from OpenMixup's code.

Pieces:

- :class:`MixBlock`: a small network that turns feature maps of two images into a soft per-pixel mask
  (docs/methods/automix.md §3): a shared 1x1 query conv, a 1x1 value conv on the partner, a
  cross-attention softmax in fp32, upsampling, then a sigmoid.
- :class:`FeatureTap`: features of any timm model at one ``feature_info`` level, through the model's
  ``forward_intermediates`` (timm >= 1.0) or, failing that, a forward hook on the level's module.
- :func:`momentum_at`: the cosine momentum schedule of the momentum (EMA) encoder (docs/methods/automix.md §6).
- :func:`mask_loss`: the L1 mask regulariser with its margin (docs/methods/automix.md §5).
- :class:`AutoMix`: the loss of one training iteration (docs/methods/automix.md §4) given the online
  model, its momentum copy and a :class:`~timm_mimo.batch.MimoBatch`, for single networks (M = 1: pixel
  masks) and, beyond the paper, for MixMo networks with M = 2 (the Mix Block draws the MixMo mask on the
  mixing grid).

Gradient flow (docs/methods/automix.md §4): the Mix Block learns only from the mixup loss of the
*momentum* encoder on its own mixed samples (through the frozen encoder into the mask) and from the mask
loss; the online model learns from mixed samples whose mask is detached (and from clean images for M = 1);
the momentum encoder learns nothing by gradient: it is an EMA of the online model, updated after each
optimizer step.
The momentum encoder's parameters are frozen, but by default (``momentum_train_mode``) it runs its
AutoMix forward passes in train mode: BatchNorm normalises with batch statistics, and its running
statistics follow its own activations (the EMA update then pulls them by 1 - m towards the online
model's, as timm's ``ModelEmaV3`` does for buffers), so they match its own weights when it is evaluated
and deployed. An eval-mode encoder would normalise with running statistics that lag the weights early in
training, and its exploding logits would feed the Mix Block noise.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch import MimoBatch
from .loss import MemberSoftTargetCrossEntropy
from .mimo import MemberOutputs
from .mixing import check_alpha, member_loss_weights, patch_mix_prob, sample_beta

__all__ = ['MixBlock', 'FeatureTap', 'AutoMix', 'AutoMixOutput', 'momentum_at', 'mask_loss', 'freeze']

UPSAMPLE_MODES = ('nearest', 'bilinear', 'bicubic')


class MixBlock(nn.Module):
    """The Mix Block (PixelMixBlock, docs/methods/automix.md §3): features of image i and of its partner j
    -> the partner's mask.

    Args:
        in_chans: C, channels of the feature map it reads.
        reduction: r of the query/key width C / r (2 in every released config).
        lam_concat: append a constant lambda channel to z_i and 1 - lambda to z_j (AutoMix "V1", the
            ImageNet / ViT setting); off for CIFAR-size data, where lambda reaches the block only
            through the mask loss.
        upsample: 'nearest' (every benchmarked config), 'bilinear' or 'bicubic'.

    ``forward(z, z_partner, lam, size)`` returns s_j (N, 1, *size) in (0, 1), the weight of the *partner*
    image at every pixel; image i gets 1 - s_j. The mask is soft: mixing uses it as is.
    """

    def __init__(self, in_chans: int, reduction: int = 2, lam_concat: bool = False, upsample: str = 'nearest'):
        super().__init__()
        if in_chans < 1:
            raise ValueError(f'in_chans must be >= 1, got {in_chans}')
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f'unknown upsampling {upsample!r}, expected one of {UPSAMPLE_MODES}')
        self.in_chans = in_chans
        self.lam_concat = lam_concat
        self.upsample = upsample
        chans = in_chans + (1 if lam_concat else 0)
        self.hidden = max(in_chans // reduction, 1)
        # one 1x1 conv for both query (image i) and key (partner j), and a 1x1 value conv (saliency of j)
        self.query = nn.Conv2d(chans, self.hidden, 1)
        self.value = nn.Conv2d(chans, 1, 1)
        for conv in (self.query, self.value):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def logits(self, z: torch.Tensor, z_partner: torch.Tensor,
               lam: Union[float, torch.Tensor] = 0.5) -> torch.Tensor:
        """Mask logits m_j (N, 1, h, w) on the feature grid, before upsampling and sigmoid."""
        if z.shape != z_partner.shape or z.ndim != 4:
            raise ValueError(f'features must be two (N, C, h, w) maps of one shape, got {list(z.shape)} '
                             f'and {list(z_partner.shape)}')
        if z.shape[1] != self.in_chans:
            raise ValueError(f'the Mix Block reads {self.in_chans} channels, the features have {z.shape[1]}')
        n, _, h, w = z.shape
        if self.lam_concat:
            lam_map = torch.as_tensor(lam, dtype=z.dtype, device=z.device).reshape(-1, 1, 1, 1).expand(n, 1, h, w)
            z = torch.cat([z, lam_map], 1)
            z_partner = torch.cat([z_partner, 1 - lam_map], 1)
        value = self.value(z_partner).flatten(2)                 # (N, 1, hw): saliency of the partner
        query = self.query(z).flatten(2)                         # (N, C/r, hw)
        key = self.query(z_partner).flatten(2)                   # (N, C/r, hw), the same conv
        # cross-attention in fp32 whatever the autocast dtype: fp16 overflow was seen in practice
        # (docs/methods/automix.md §11.9)
        with torch.autocast(device_type=z.device.type, enabled=False):
            scores = torch.bmm(query.float().transpose(1, 2), key.float()) / math.sqrt(self.hidden)
            attention = scores.softmax(-1)                       # (N, hw, hw): row a = partner positions like a
            mask = torch.bmm(attention, value.float().transpose(1, 2))   # (N, hw, 1)
        return mask.transpose(1, 2).reshape(n, 1, h, w)

    def forward(self, z: torch.Tensor, z_partner: torch.Tensor, lam: Union[float, torch.Tensor] = 0.5,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        mask = self.logits(z, z_partner, lam)
        if size is not None and tuple(size) != tuple(mask.shape[-2:]):
            mask = F.interpolate(mask, size=tuple(size), mode=self.upsample,
                                 **({} if self.upsample == 'nearest' else dict(align_corners=False)))
        return mask.sigmoid()  # sigmoid after upsampling (docs/methods/automix.md §3.6)


# ------------------------------------------------------------------------------------------------------
# features of a timm model at one level

def _feature_levels(model: nn.Module) -> List[dict]:
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    if hasattr(info, 'info'):  # timm FeatureInfo (features_only models)
        info = info.info
    return [dict(fi) for fi in info] if isinstance(info, (list, tuple)) else []


def _resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The module a ``feature_info`` entry names (dotted path; timm's flattened 'a_b' names as 'a.b')."""
    for candidate in (name, name.replace('_', '.')):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f'{type(model).__name__} has no module {name!r} (named by its feature_info)')


class _Stop(Exception):
    def __init__(self, output):
        super().__init__()
        self.output = output


class FeatureTap:
    """Features (N, C, h, w) of a timm model at ``feature_info`` level ``index`` (negative from the end).

    Uses ``model.forward_intermediates(x, indices=[i], intermediates_only=True, stop_early=True)`` when the
    model has it; otherwise a forward hook on the level's module that stops the forward pass there. The
    tap stores the level, not the model: it serves the online model and its momentum copy alike.
    Raises ValueError when the model lists no features or the index is out of range.
    """

    def __init__(self, model: nn.Module, index: int):
        levels = _feature_levels(model)
        name = type(model).__name__
        if not levels:
            raise ValueError(f'{name} exposes no intermediate features (no feature_info): AutoMix needs a model '
                             f'with forward_intermediates or timm feature_info')
        n = len(levels)
        if not -n <= index < n:
            raise ValueError(f'--automix-stage {index} is out of range: {name} has {n} feature levels '
                             f'(0..{n - 1}, or -{n}..-1 from the end): '
                             + ', '.join(f'{i}: {fi.get("module", "?")} ({fi.get("num_chs", "?")} ch, '
                                         f'/{fi.get("reduction", "?")})' for i, fi in enumerate(levels)))
        self.index = index % n
        self.info = levels[self.index]
        self.num_chs = int(self.info.get('num_chs', 0))
        self.use_intermediates = hasattr(model, 'forward_intermediates')
        self.module_name = self.info.get('module', '')
        if not self.use_intermediates:
            if not self.module_name:
                raise ValueError(f'{name} has no forward_intermediates and feature level {self.index} names no '
                                 f'module to hook')
            _resolve_module(model, self.module_name)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_intermediates:
            out = model.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)
            return out[0]
        name = self.module_name
        module = _resolve_module(model, name)

        def hook(mod, inputs, output):
            raise _Stop(output)

        handle = module.register_forward_hook(hook)
        try:
            model.forward_features(x) if hasattr(model, 'forward_features') else model(x)
        except _Stop as stop:
            out = stop.output
        else:  # pragma: no cover  (the level's module is always on the forward path)
            raise RuntimeError(f'feature module {name!r} was not reached in the forward pass')
        finally:
            handle.remove()
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 4:
            raise ValueError(f'feature level {self.index} ({name}) gives a {out.ndim}-D tensor, not (N, C, h, w)')
        return out


# ------------------------------------------------------------------------------------------------------
# schedules and losses

def momentum_at(step: int, total: int, m0: float = 0.999, m_end: float = 0.999999,
                start_frac: float = 0.1) -> float:
    """EMA momentum used after iteration ``step`` of ``total`` (docs/methods/automix.md §6, constant warm-up).

    Constant ``m0`` before ``start_frac * total``; from there ``m_end - (m_end - m0) * (cos(pi t / T) + 1) / 2``
    (t / T over the whole run, so the value jumps a little at the start of the cosine part).
    """
    if total <= 0:
        return m0
    if step < start_frac * total:
        return m0
    t = min(max(step, 0), total) / total
    return m_end - (m_end - m0) * (math.cos(math.pi * t) + 1) / 2


def mask_loss(mask: torch.Tensor, lam: Union[float, torch.Tensor], margin: float = 0.1) -> torch.Tensor:
    """L1 mask loss with a margin (docs/methods/automix.md §5): max(|1 - mean(s_j) - lam| - margin, 0).

    ``mask`` holds s_j, the partner's weight; its mean is taken over the whole batch and every pixel
    (one scalar), so image i's share 1 - mean(s_j) is pulled to within ``margin`` of lambda.
    """
    mu = mask.float().mean()
    lam = torch.as_tensor(lam, dtype=torch.float32, device=mask.device).mean()
    return F.relu((1 - mu - lam).abs() - margin)


def freeze(module: nn.Module) -> nn.Module:
    """No parameter of ``module`` takes gradients (the momentum encoder); gradients still flow through it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mixblock_param_groups(mixblock: nn.Module, lr: float, weight_decay: float, decay_all: bool = False):
    """Optimizer parameter groups for the Mix Block, with its own learning rate (biases undecayed)."""
    decay = [p for n, p in mixblock.named_parameters() if decay_all or p.ndim > 1]
    no_decay = [p for n, p in mixblock.named_parameters() if not decay_all and p.ndim <= 1]
    groups = [dict(params=decay, lr=lr, weight_decay=weight_decay, name='mixblock')]
    if no_decay:
        groups.append(dict(params=no_decay, lr=lr, weight_decay=0.0, name='mixblock_no_decay'))
    return groups


# ------------------------------------------------------------------------------------------------------
# one iteration

class AutoMixOutput(NamedTuple):
    loss: torch.Tensor                 # the total loss to backpropagate once
    parts: Dict[str, torch.Tensor]     # detached scalars for logging: mix (online, mixed), one (online, clean),
                                       # mb (momentum encoder, Mix Block samples), mask, mask_mean
    vis: Optional[Dict[str, torch.Tensor]]  # backbone-branch samples for pictures, when asked for
    terms: Dict[str, torch.Tensor]     # the loss terms with their graphs: mix, one, mb, mask (unweighted)


@dataclass
class AutoMix:
    """The AutoMix loss of one iteration (docs/methods/automix.md §4), for ``num_members`` 1 (pixel masks)
    or 2 (MixMo masks).

    Args:
        mixblock: the :class:`MixBlock` (its parameters go to the optimizer with their own lr).
        tap: :class:`FeatureTap` of the momentum encoder's features read by the Mix Block.
        num_members: 1: AutoMix on images; 2: the Mix Block draws the MixMo mask of member 1 on the mixing
            grid (member 0 gets 1 - mask), in place of Cut-MixMo's random box (experimental).
        alpha: lambda ~ Beta(alpha, alpha), drawn twice per batch (Mix Block and backbone branches).
        mask_loss_weight / margin: the L1 mask loss (docs/methods/automix.md §5).
        lam_margin: the backbone branch falls back to a constant mask (Mixup; Linear-MixMo for M = 2) when
            lambda <= lam_margin or >= 1 - lam_margin.
        weight_root: r of the MixMo member loss weights (M = 2), applied to (lambda, 1 - lambda).
        clean_loss: add the online model's loss on the clean images (``L_one``, M = 1 only).
        momentum_train_mode: run the momentum encoder in train mode (batch-statistics BatchNorm) during
            the AutoMix passes; evaluation code puts it back in eval mode.
        mix_prob: M = 2 only: probability, per batch, that the backbone branch uses the learned mask; otherwise
            Linear-MixMo (the constant mask lambda), as Cut-MixMo alternates its box with linear mixing. It
            decays to 0 over the last 1/12 of training like Cut-MixMo's (``progress``, set each epoch).

    ``__call__(model, momentum_model, batch, generator)`` returns :class:`AutoMixOutput`. The batch is a
    :class:`MimoBatch` from :class:`~timm_mimo.batch.MimoBatchBuilder` built *without* mixing of its own
    (M = 1: no MSDA; M = 2: ``mix_mode='mimo'``, so that the targets carry member weights of 1): AutoMix
    mixes the images itself and weighs the targets with its own lambda.
    """
    mixblock: nn.Module
    tap: FeatureTap
    num_members: int = 1
    alpha: float = 2.0
    mask_loss_weight: float = 0.1
    margin: float = 0.1
    lam_margin: float = 0.08
    weight_root: float = 3.0
    clean_loss: bool = True
    momentum_train_mode: bool = True
    mix_prob: float = 1.0
    progress: float = 0.0

    def __post_init__(self):
        if self.num_members not in (1, 2):
            raise ValueError(f'AutoMix supports M = 1 (--msda automix) and M = 2 (--mix-mode automix), '
                             f'not M = {self.num_members}')
        check_alpha(self.alpha, 'automix alpha')
        if not 0 <= self.lam_margin < 0.5:
            raise ValueError(f'the lambda margin must be in [0, 0.5), got {self.lam_margin}')
        if not 0 <= self.mix_prob <= 1:
            raise ValueError(f'mix_prob must be in [0, 1], got {self.mix_prob}')
        if self.margin < 0 or self.mask_loss_weight < 0:
            raise ValueError('the mask loss weight and margin must be >= 0')
        self.criterion = MemberSoftTargetCrossEntropy()

    def _draw(self, n: int, device, generator):
        lam = sample_beta(2, self.alpha, generator, device)                     # (lam_mb, lam_bb)
        perms = torch.rand(2, n, generator=generator, device=device).argsort(1)  # (perm_mb, perm_bb)
        return lam, perms

    def _fallback(self, mask: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The backbone mask, or a constant one (partner share 1 - lam) for lam near 0 or 1: no host sync."""
        outside = (lam <= self.lam_margin) | (lam >= 1 - self.lam_margin)
        return torch.where(outside, (1 - lam).to(mask.dtype).expand_as(mask), mask)

    def __call__(self, model: nn.Module, momentum_model: nn.Module, batch: MimoBatch,
                 generator: Optional[torch.Generator] = None, outputs: Optional[MemberOutputs] = None,
                 vis: bool = False) -> AutoMixOutput:
        """``outputs``: how both models (the online one possibly wrapped) give member logits; by default read
        from ``momentum_model``, a bare copy of the online model."""
        outputs = outputs or MemberOutputs(momentum_model)
        if batch.inputs.shape[1] != self.num_members:
            raise ValueError(f'AutoMix for M = {self.num_members} got a batch of {batch.inputs.shape[1]} members')
        if momentum_model.training != self.momentum_train_mode:
            momentum_model.train(self.momentum_train_mode)
        if self.num_members == 1:
            return self._single(model, momentum_model, batch, generator, outputs, vis)
        return self._mimo(model, momentum_model, batch, generator, vis)

    def _single(self, model, k_model, batch, generator, outputs, vis) -> AutoMixOutput:
        x, t = batch.inputs[:, 0], batch.targets[:, 0]
        ones = batch.masks
        n, _, h, w = x.shape
        lam, (perm_mb, perm_bb) = self._draw(n, x.device, generator)
        with torch.no_grad():
            z = self.tap(k_model, x)
        # the backbone branch's mask is detached: drawn without a graph (no attention matrix kept for backward)
        with torch.no_grad():
            s_bb = self._fallback(self.mixblock(z, z[perm_bb], lam[1].expand(n), (h, w)), lam[1])
        s_mb = self.mixblock(z, z[perm_mb], lam[0].expand(n), (h, w))
        x_mb = x + s_mb.to(x.dtype) * (x[perm_mb] - x)
        x_bb = x + s_bb.to(x.dtype) * (x[perm_bb] - x)
        t_mb = lam[0] * t + (1 - lam[0]) * t[perm_mb]
        t_bb = lam[1] * t + (1 - lam[1]) * t[perm_bb]

        # the Mix Block learns through the frozen momentum encoder (gradients reach x_mb, then s_mb)
        logits_k = outputs.members(k_model, x_mb[:, None], ones)
        loss_mb = self.criterion(logits_k.float(), t_mb[:, None])
        loss_mask = mask_loss(s_mb, lam[0], self.margin)
        # the online model learns on the detached mask, and on clean images
        logits_mix = outputs.members(model, x_bb[:, None], ones)
        loss_mix = self.criterion(logits_mix.float(), t_bb[:, None])
        loss = loss_mix + loss_mb + self.mask_loss_weight * loss_mask
        loss_one = torch.zeros((), device=x.device)
        if self.clean_loss:
            logits_one = outputs.members(model, x[:, None], ones)
            loss_one = self.criterion(logits_one.float(), t[:, None])
            loss = loss + loss_one
        terms = dict(mix=loss_mix, one=loss_one, mb=loss_mb, mask=loss_mask)
        parts = {k: v.detach() for k, v in terms.items()}
        parts['mask_mean'] = s_mb.detach().float().mean()
        samples = None
        if vis:
            samples = dict(image=x.detach(), partner=x[perm_bb].detach(), mask=s_bb.detach(),
                           mixed=x_bb.detach(), lam=lam[1].expand(n).detach())
        return AutoMixOutput(loss, parts, samples, terms)

    def _mimo(self, model, k_model, batch, generator, vis) -> AutoMixOutput:
        """MixMo with a learned mask (M = 2): member 1 gets s_j of the mixing grid, member 0 gets 1 - s_j."""
        inputs, t = batch.inputs, batch.targets
        b = inputs.shape[0]
        grid = tuple(batch.masks.shape[-2:])
        x0, x1 = inputs[:, 0], inputs[:, 1]
        lam, (perm_mb, _) = self._draw(b, inputs.device, generator)
        with torch.no_grad():
            z = self.tap(k_model, torch.cat([x0, x1]))      # one image per sample: the summed member encoders
        z0, z1 = z[:b], z[b:]
        # backbone branch: the builder's pairs, mask detached; Mix Block branch: member 1 re-paired by its own
        # permutation
        with torch.no_grad():
            s_bb = self._fallback(self.mixblock(z0, z1, lam[1].expand(b), grid), lam[1])
        if self.mix_prob < 1:  # Cut-MixMo's alternation: learned mask, or linear mixing (one draw per batch)
            learned = torch.rand((), generator=generator, device=inputs.device) < patch_mix_prob(
                self.progress, self.mix_prob)
            s_bb = torch.where(learned, s_bb, (1 - lam[1]).to(s_bb.dtype).expand_as(s_bb))
        s_mb = self.mixblock(z0, z1[perm_mb], lam[0].expand(b), grid)
        kappa = torch.stack([lam, 1 - lam], 1)                               # (2 branches, M)
        weights = member_loss_weights(kappa, self.weight_root)               # MixMo weights, r = 3

        inputs_mb = torch.stack([x0, x1[perm_mb]], 1)
        masks_mb = torch.cat([1 - s_mb, s_mb], 1)
        t_mb = torch.stack([t[:, 0], t[perm_mb, 1]], 1) * weights[0][None, :, None]
        logits_k = k_model(inputs_mb, masks_mb)
        loss_mb = self.criterion(logits_k.float(), t_mb)
        loss_mask = mask_loss(s_mb, lam[0], self.margin)

        masks_bb = torch.cat([1 - s_bb, s_bb], 1)
        logits_mix = model(inputs, masks_bb)
        loss_mix = self.criterion(logits_mix.float(), t * weights[1][None, :, None])
        loss = loss_mix + loss_mb + self.mask_loss_weight * loss_mask
        terms = dict(mix=loss_mix, mb=loss_mb, mask=loss_mask)   # no clean-image term for MixMo
        parts = {k: v.detach() for k, v in terms.items()}
        parts['mask_mean'] = s_mb.detach().float().mean()
        samples = None
        if vis:
            h, w = x0.shape[-2:]
            mask_img = F.interpolate(s_bb.detach().float(), size=(h, w), mode='nearest')
            samples = dict(image=x0.detach(), partner=x1.detach(), mask=mask_img,
                           mixed=(x0 + mask_img.to(x0.dtype) * (x1 - x0)).detach(), lam=lam[1].expand(b).detach())
        return AutoMixOutput(loss, parts, samples, terms)


def build_automix(model: nn.Module, stage: int = -2, num_members: int = 1, lam_concat: bool = False,
                  upsample: str = 'nearest', **kwargs) -> AutoMix:
    """An :class:`AutoMix` for ``model``: checks the feature level, sizes the Mix Block from it."""
    tap = FeatureTap(model, stage)
    chans = tap.num_chs
    if chans <= 0:
        raise ValueError(f'feature level {tap.index} of {type(model).__name__} does not state its channels')
    mixblock = MixBlock(chans, lam_concat=lam_concat, upsample=upsample)
    return AutoMix(mixblock, tap, num_members=num_members, **kwargs)


def check_features(automix: AutoMix, model: nn.Module, img_size: Sequence[int], in_chans: int = 3,
                   device=None) -> Tuple[int, int, int]:
    """Run the tap once on a small batch (eval mode, no grad): the level must give (N, C, h, w) with the
    Mix Block's C. Returns (C, h, w). Raises ValueError with the reason otherwise."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, in_chans, *img_size, device=device)
            try:
                z = automix.tap(model, x)
            except (ValueError, TypeError) as e:
                raise ValueError(f'cannot read features at level {automix.tap.index} of {type(model).__name__}: '
                                 f'{e}') from e
    finally:
        model.train(was_training)
    if z.ndim != 4:
        raise ValueError(f'feature level {automix.tap.index} gives shape {list(z.shape)}, not (N, C, h, w)')
    if z.shape[1] != automix.mixblock.in_chans:
        raise ValueError(f'feature level {automix.tap.index} has {z.shape[1]} channels, feature_info says '
                         f'{automix.mixblock.in_chans}')
    return tuple(z.shape[1:])
