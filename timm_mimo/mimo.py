"""The MIMO idea in one place: member encoders, the mix step, M heads, the ensemble output.

A MIMO network (Havasi et al. 2021; MixMo, Rame et al. 2021) runs M subnetworks ("members") inside one
base network. In training, M inputs are encoded, mixed into one representation, run through a shared
core, and M heads each predict the label of their own input. At inference one image goes to every
member, the core runs once, and the M heads form an ensemble.

Shapes used everywhere in this package:
    member inputs   (B, M, C, H, W)   one image per member and mixed sample
    mixing masks    (B, M, h, w)      per-member weight on the mixing grid, summing to 1 over M
    member logits   (B, M, K)
    ensemble logits (B, K)

CNNs (``models/mixmo_resnets.py``) and ViTs call these pieces; they differ only in where they mix.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import SelectAdaptivePool2d, register_notrace_module

ENSEMBLE_RULES = ('logits', 'probs')


def check_num_members(num_members: int) -> int:
    if isinstance(num_members, bool) or not isinstance(num_members, int):
        raise TypeError(f'num_members must be an int, got {type(num_members).__name__}')
    if num_members < 1:
        raise ValueError(f'num_members must be >= 1, got {num_members}')
    return num_members


def check_ensemble_rule(rule: str) -> str:
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f'unknown ensemble rule {rule!r}, expected one of {ENSEMBLE_RULES}')
    return rule


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int = 1, patch: Tuple[int, int] = (1, 1),
                      members: bool = False):
    """Refuse images (B, C, H, W), or member inputs (B, M, C, H, W) with ``members``, of another rank or channel
    count, smaller than ``min_size`` (the network's reduction) or not divisible by ``patch``, saying which.

    A check, not a computation: the model modules that call it ``torch.fx.wrap`` it, so that tracing keeps it
    as one call rather than failing on its conditions.
    """
    if x.ndim != (5 if members else 4):
        raise ValueError(f'expected {"member inputs (B, M, C, H, W)" if members else "one image per sample (B, C, H, W)"}'
                         f', got shape {list(x.shape)} (member inputs: model(x, masks) or model.forward_members(x))')
    if x.shape[-3] != in_chans:
        raise ValueError(f'input has {x.shape[-3]} channels, the model expects {in_chans}')
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(f'input size {x.shape[-2]}x{x.shape[-1]} is smaller than the network reduction '
                         f'{min_size}: nothing would be left to pool')
    if x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
        raise ValueError(f'image size {x.shape[-2]}x{x.shape[-1]} is not divisible by the patch size '
                         f'{patch[0]}x{patch[1]}')


def mix_members(features: torch.Tensor, masks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Merge member features (B, M, C, *grid) with masks (B, M, *grid) into (B, C, *grid).

    MixMo multiplies the merged map by M (docs/methods/mixmo.md §1.7) so that its expected scale equals the
    inference-time sum of the encoders; token mixing in ViTs selects tokens and uses scale 1.
    """
    merged = (features * masks.unsqueeze(2).to(features.dtype)).sum(1)
    return merged * scale if scale != 1.0 else merged


def ensemble_logits(member_logits: torch.Tensor, rule: str = 'logits') -> torch.Tensor:
    """Combine member logits (B, M, K) into one prediction (B, K).

    'logits': mean of the member logits, MixMo's rule (docs/methods/mixmo.md §4.4): softmax(mean logits).
    'probs': log of the mean member probability (the original MIMO rule); softmax of the result is
    the averaged probability, so it can be used as logits by any timm evaluation code.
    """
    if rule == 'probs':
        num_members = member_logits.shape[1]
        return torch.logsumexp(member_logits.float().log_softmax(-1), dim=1) - torch.log(
            torch.tensor(float(num_members), device=member_logits.device))
    return member_logits.mean(1)


class MemberConv2d(nn.Conv2d):
    """M member encoders (first convolutions) stored as the kernel of one grouped convolution.

    The weight has shape (M * out_chans, in_chans, k, k), so for M = 1 it is exactly a plain
    ``nn.Conv2d`` (same state-dict key and shape as the vanilla network). Member inputs run through
    all encoders in one convolution; a single image runs once through the sum of the member kernels,
    which equals the sum of the member outputs (convolution is linear), so inference costs one stem conv.
    """

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            num_members: int = 1,
            bias: bool = False,
    ):
        super().__init__(
            in_chans * num_members, out_chans * num_members, kernel_size,
            stride=stride, padding=padding, groups=num_members, bias=bias)
        self.num_members = num_members
        self.member_in_chans = in_chans
        self.member_out_chans = out_chans

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, C, H, W) -> (B, M, out_chans, h, w): member k's input through encoder k.

        Runs as one dense convolution with a block-diagonal kernel rather than a grouped one: on CPU
        (oneDNN) the weight gradient of a grouped convolution falls back to a slow path, while the dense
        kernel costs M x the stem's few FLOPs and is the best-optimised path on every backend.
        """
        m, out_c = self.num_members, self.member_out_chans
        if m == 1:
            out = self._conv_forward(x.flatten(1, 2), self.weight, self.bias)
        else:
            blocks = self.weight.unflatten(0, (m, out_c))                        # (M, out, in, k, k)
            eye = torch.eye(m, device=blocks.device, dtype=blocks.dtype)
            dense = (eye[:, None, :, None, None, None] * blocks[:, :, None])      # (M, out, M, in, k, k)
            dense = dense.flatten(2, 3).flatten(0, 1)                              # (M*out, M*in, k, k)
            out = F.conv2d(x.flatten(1, 2), dense, self.bias, self.stride, self.padding, self.dilation)
        return out.unflatten(1, (m, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_summed(x)

    def forward_summed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_chans, h, w): the same image through every encoder, summed."""
        if self.num_members == 1:
            return self._conv_forward(x, self.weight, self.bias)
        weight = self.weight.unflatten(0, (self.num_members, self.member_out_chans)).sum(0)
        # local copy: TorchScript refines Optional types of locals, not of attributes
        bias = self.bias
        if bias is not None:
            bias = bias.unflatten(0, (self.num_members, self.member_out_chans)).sum(0)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def output_grid(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Spatial size of the encoder output (the MixMo mixing grid) for an input size."""
        h, w = img_size
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


@register_notrace_module  # its input rank picks the shared or the per-member path: a leaf for torch.fx
class MemberLinear(nn.Linear):
    """M linear heads stored as one ``nn.Linear(in_features, M * num_classes)``.

    For M = 1 it is a plain linear layer. Pooled features (B, D) shared by all members give member
    logits (B, M, K) in one matmul; per-member features (B, M, D) (ViT class tokens) go to their own head.
    """

    def __init__(self, in_features: int, num_classes: int, num_members: int = 1, bias: bool = True):
        super().__init__(in_features, num_classes * num_members, bias=bias)
        self.num_members = num_members
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return F.linear(x, self.weight, self.bias).unflatten(-1, (self.num_members, self.num_classes))
        weight = self.weight.unflatten(0, (self.num_members, self.num_classes))
        out = torch.einsum('bmd,mkd->bmk', x, weight)
        bias = self.bias
        if bias is not None:
            out = out + bias.unflatten(0, (self.num_members, self.num_classes))
        return out


class MemberClassifierHead(nn.Module):
    """Global pool -> dropout -> M linear heads, the CNN counterpart of timm's ``ClassifierHead``.

    ``forward`` returns member logits (B, M, K), or pooled features (B, D) when ``pre_logits`` is set
    or the classifier was reset to 0 classes.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            num_members: int = 1,
            pool_type: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.in_features = in_features
        self.num_members = num_members
        self.num_classes = num_classes
        # no pooling ('') keeps the feature map: flattening only makes sense after a pool
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes > 0:
            return MemberLinear(self.in_features, num_classes, self.num_members)
        return nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None):
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.drop(x)
        if pre_logits:
            return x
        return self.fc(x)


class MimoClassifierMixin:
    """Forward contract shared by every MIMO model of the package; every call goes through ``__call__``, so
    DDP, FSDP, torch.compile and torch.fx see it.

    - ``model(x)`` with x (B, C, H, W): one image for all members, returns ensemble logits (B, K), so
      timm's own training and evaluation code works unchanged (in train() and eval() alike).
    - ``model(x, members=True)``: the member logits (B, M, K) of that one pass.
    - ``model(x, masks)`` with x (B, M, C, H, W): M inputs mixed with ``masks`` (B, M, h, w), returns member
      logits (B, M, K) (the training call).
    - ``forward_members(x)``: member logits for either input form (member inputs without masks are mixed
      uniformly, 1/M each: MIMO summing); a user-facing alias of the calls above.

    A model provides ``forward_features`` (single image), ``forward_mixed_features`` (member inputs)
    and ``forward_member_head`` (features -> (B, M, K), or pooled features if num_classes == 0).
    The branches depend on the arguments only, never on tensor values or shapes, so torch.fx traces them.
    """
    num_members: int
    num_classes: int
    in_chans: int
    ensemble: str

    def check_member_input(self, x: torch.Tensor, masks: torch.Tensor):
        if x.ndim != 5:
            raise ValueError(f'member input must be (B, M, C, H, W), got shape {list(x.shape)}')
        if x.shape[1] != self.num_members:
            raise ValueError(
                f'input holds {x.shape[1]} members but the model has num_members={self.num_members}')
        if masks.ndim != 4 or masks.shape[:2] != x.shape[:2]:
            raise ValueError(
                f'mixing masks must be (B, M, h, w) = ({x.shape[0]}, {x.shape[1]}, h, w), '
                f'got {list(masks.shape)}')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.forward_member_head(x, pre_logits=pre_logits)
        if pre_logits or self.num_classes == 0:
            return out
        return ensemble_logits(out, self.ensemble)

    @torch.jit.ignore
    def forward_members(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim == 5 and masks is None:
            grid = self.mix_grid_size(tuple(x.shape[-2:]))
            masks = x.new_full((x.shape[0], self.num_members, *grid), 1.0 / self.num_members)
        return self(x, masks, members=True)

    # What the heads read. By default the features; a model whose heads read a part of them (a ViT's class
    # tokens) overrides these to skip computing the rest: the outputs are the same
    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def mixed_head_features(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.forward_mixed_features(x, masks)

    def forward(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None, members: bool = False) -> torch.Tensor:
        # torch.fx traces every argument as a Proxy, which is neither a Tensor nor a bool: a traced model
        # (timm's FX feature extraction) follows the single-image ensemble path, timm's forward contract
        if isinstance(masks, torch.Tensor):
            self.check_member_input(x, masks)
            return self.forward_member_head(self.mixed_head_features(x, masks))
        features = self.head_features(x)
        if isinstance(members, bool) and members:
            return self.forward_member_head(features)
        return self.forward_head(features)


def is_mimo(model: nn.Module) -> bool:
    """Whether the model has MIMO members (any other timm model is treated as M = 1)."""
    return hasattr(model, 'forward_members') and hasattr(model, 'num_members')


class MemberOutputs:
    """How a model gives member logits (B, M, K), decided once from the bare model (wrappers hide its
    attributes): a MIMO model by its own member calls, any other timm model as M = 1."""

    def __init__(self, model: nn.Module):
        self.mimo = is_mimo(model)
        self.num_members = model.num_members if self.mimo else 1
        self.rule = getattr(model, 'ensemble', 'logits')

    def members(self, model: nn.Module, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Member logits of member inputs (B, M, C, H, W) mixed with ``masks``, or of one image per sample."""
        if not self.mimo:
            return model(x[:, 0] if masks is not None else x).unsqueeze(1)
        return model(x, masks) if masks is not None else model(x, members=True)

    def predict(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits (B, K) and member logits (B, M, K) from one forward pass of one image per sample."""
        members = self.members(model, x)
        return (ensemble_logits(members, self.rule) if self.mimo else members[:, 0]), members
