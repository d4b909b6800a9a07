"""MIMO from any timm backbone: a timm CNN as MixMo, a timm ViT with a class token as MixViT.

    model = timm_mimo.create_mimo_model('resnet18', num_members=2, pretrained=True, num_classes=10)
    model = timm.create_model('mimo_backbone', backbone='resnet18', num_members=2, pretrained=True)
    python train.py --model mimo_backbone --model-kwargs backbone=resnet18 --num-members 2 ...

The backbone is built by ``timm.create_model`` and converted in place, so every module, weight name and
method of the timm model stays as timm built it (``forward_intermediates``, ``features_only``, grad
checkpointing, ...); only these change (see docs/backbones.md):

- CNNs (MixMo, docs/methods/mixmo.md): the first convolution (``pretrained_cfg['first_conv']``) becomes M member
  encoders (:class:`MixMoStem`, a :class:`~timm_mimo.mimo.MemberConv2d`) that mix member inputs right
  after them (x M, MixMo's scaling); the classifier (``pretrained_cfg['classifier']``) becomes M heads.
- ViTs (timm's ``VisionTransformer`` with a class token, docs/methods/mixvit.md): member inputs are mixed token by
  token after the patch embedding; source embeddings are added before the last ``member_blocks`` blocks,
  which run once per member with the class token, then M heads (``MixViTMixin``'s attribution pieces).

Pretrained core: with ``pretrained=True`` the backbone loads its own pretrained weights (from its
registered cfg, or ``pretrained_cfg_overlay=dict(file=...)``, which is the backbone's: timm's train.py
``--pretrained-path`` form), unchanged; each member kernel is
the pretrained kernel / M, so a single image (which runs through the sum of the kernels) gives the base
model's features exactly, and binary-masked mixed features x M equal the pretrained stem's. ViT source
embeddings start at zero for the same reason. Heads copy the pretrained classifier when the class count
matches; otherwise member 0 keeps the backbone's fresh head and the others are drawn with its std.

A whole ``pretrained_cfg`` is the MIMO model's own (``local-dir:`` and ``hf-hub:`` pass the saved one):
it becomes ``model.pretrained_cfg``, and ``pretrained=True`` then loads the weights it names, never the
backbone's. That is how a saved MIMO model (config.json ``architecture: mimo_backbone`` + ``model_args``)
is rebuilt.
"""
import types
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.models import generate_default_cfgs, load_pretrained, register_model
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import VisionTransformer

from ..mimo import MemberLinear, MimoClassifierMixin, check_ensemble_rule, check_num_members
from ._member_layers import MixMoStem, member_classifier
from ._mixvit import MixViTMixin, block_rows, computes_rows

__all__ = ['MixMoStem', 'MixMoBackboneMixin', 'MixViTBackboneMixin', 'create_mimo_model', 'to_mimo']

ARCHITECTURE = 'mimo_backbone'


def _classifier_path(model: nn.Module) -> str:
    path = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if not isinstance(path, str) or not path:
        raise ValueError(f'{type(model).__name__} names no single classifier in its pretrained_cfg '
                         f'({path!r}): cannot give it M heads')
    return path


def _set_classifier(model: nn.Module, copy: bool):
    path = _classifier_path(model)
    heads = member_classifier(model.get_submodule(path), model.num_members, copy)
    model.set_submodule(path, heads)
    model.heads_are_conv = isinstance(heads, nn.Conv2d)


DEFAULT_BACKBONE = 'resnet18'


class _BackboneMixin(MimoClassifierMixin):
    """What both conversions share: the timm model's classifier reset, then M heads again."""
    num_members: int

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        # the timm model builds its new head (and pooling) as always; then it becomes M fresh heads
        base_reset = super(MimoClassifierMixin, self).reset_classifier
        base_reset(num_classes) if global_pool is None else base_reset(num_classes, global_pool)
        self.num_classes = num_classes
        self._reset_heads()

    def _reset_heads(self):
        path = _classifier_path(self)
        heads = member_classifier(self.get_submodule(path), self.num_members, copy=True)
        if not isinstance(heads, nn.Identity):
            heads.reset_parameters()  # M independent draws of the fresh head's (nn.Linear's) init
        self.set_submodule(path, heads)
        self.heads_are_conv = isinstance(heads, nn.Conv2d)


class MixMoBackboneMixin(_BackboneMixin):
    """A timm CNN as MixMo: :class:`MixMoStem` at its first convolution, M heads at its classifier."""
    default_mix_mode = 'cut'  # Cut-MixMo, MixMo's best mix for M = 2 (docs/methods/mixmo.md)
    __jit_unused_properties__ = ['mimo_stem']  # TorchScript compiles properties; this one serves Python only
    stem_path: str
    ensemble: str
    heads_are_conv: bool  # M heads as one 1x1 conv of M * K channels (ResNetV2, ...), split after the head

    @property
    def mimo_stem(self) -> MixMoStem:
        return self.get_submodule(self.stem_path)

    def mix_grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Size (h, w) of the MixMo masks for inputs of ``img_size``: the first convolution's output grid."""
        return self.mimo_stem.output_grid(tuple(img_size))

    # timm's forward_features takes a Tensor: TorchScript cannot pass it the (inputs, masks) pair, so a
    # scripted model keeps the single-image paths (ensemble and member logits) and drops this training one
    @torch.jit.unused
    def forward_mixed_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Member inputs (B, M, C, H, W) mixed right after the member encoders, then the timm core."""
        if x.shape[2] != self.mimo_stem.member_in_chans:
            raise ValueError(f'input has {x.shape[2]} channels, the model expects {self.mimo_stem.member_in_chans}')
        # the timm forward_features calls its first convolution first: the stem gets both tensors
        return self.forward_features((x, masks))

    def forward_member_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.base_forward_head(x, pre_logits=pre_logits)
        # MemberLinear heads give (B, M, K); a conv head gives M * K channels. Decided by the module's type,
        # not the output's rank, so that torch.fx traces it
        if pre_logits or self.num_classes == 0 or not self.heads_are_conv:
            return out
        return out.unflatten(1, (self.num_members, self.num_classes))


class MixViTBackboneMixin(_BackboneMixin, MixViTMixin):
    """A timm ``VisionTransformer`` with a class token as MixViT (docs/methods/mixvit.md).

    Token mixing after the patch embedding; the class token and the first L - k blocks are shared; source
    embeddings tag each member's tokens before the last k = ``member_blocks`` blocks, which run once per
    member (the 'member' class stage, I2 inference), and member i's class token goes to head i.

    Features are (B, M + R + N, D), as the ViT lays them out with M class tokens: member i's class token,
    then the R register and N patch tokens averaged over the member passes, normed.
    """

    def _prepare_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        # the ViT's own embedding steps: class / register tokens and positions, patch dropout, pre-norm
        return self.norm_pre(self.patch_drop(self._pos_embed(tokens)))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._class_rows_suffice() and not torch.jit.is_scripting():
            return self._class_features(self._image_tokens(x), None)
        return self.forward_features(x)

    def mixed_head_features(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self._class_rows_suffice() and not torch.jit.is_scripting():
            return self._class_features(*self._mixed_tokens(x, masks))
        return self.forward_mixed_features(x, masks)

    def _class_rows_suffice(self) -> bool:
        # a 'token' head reads the member class tokens only: the last block need not compute the others
        return self.global_pool == 'token' and self.last_block_computes_rows

    @torch.jit.unused  # TorchScript passes no module to a function: a scripted model runs the full blocks
    def _class_features(self, tokens: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, M, D): the member class tokens of the features, the last block computed on class rows only."""
        b = tokens.shape[0]
        tokens, passes = self._trunk_passes(tokens, masks, end=self.trunk_depth - 1)
        tokens = self.norm(block_rows(self.blocks[self.trunk_depth - 1], tokens, rows=1))
        return self._member_class_features(tokens, b, passes)

    def _forward_tokens(self, tokens: torch.Tensor, masks: Optional[torch.Tensor], start: int = 0) -> torch.Tensor:
        """Blocks from ``start``, source attribution before the member blocks, norm; (B, M + R + N, D)."""
        b = tokens.shape[0]
        tokens, passes = self._trunk_passes(tokens, masks, start)
        tokens = self.norm(tokens)
        member_cls = self._member_class_features(tokens[:, :1], b, passes)
        others = tokens[:, 1:].unflatten(0, (b, passes)).mean(1)
        return torch.cat((member_cls, others), dim=1)

    def _trunk_passes(self, tokens: torch.Tensor, masks: Optional[torch.Tensor], start: int = 0,
                      end: int = -1) -> Tuple[torch.Tensor, int]:
        """Blocks ``start`` .. ``end`` (default: the last), source attribution before the member blocks:
        (tokens (B * passes, P + N, D), passes), one pass per member after the attribution."""
        end = self.trunk_depth if end < 0 else end
        b = tokens.shape[0]
        prefix = self.trunk_prefix_tokens
        depth = self.attribution_depth
        passes = 1
        if depth < 0:
            tokens = self._run_trunk(tokens, start, end)
        else:
            tokens = self._run_trunk(tokens, start, depth)
            if masks is None:
                # one image (I2): member i's pass sees every patch token as its own
                masks = tokens.new_ones(b, self.num_members, tokens.shape[1] - prefix)
            # the class and register tokens come from no member's input: no source embedding
            tokens = self._attribute(tokens, F.pad(masks.to(tokens.dtype), (prefix, 0)), per_member=True)
            passes = self.num_members
            tokens = self._run_trunk(tokens, max(depth, start), end)
        return tokens, passes

    def forward_member_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features (B, M + R + N, D) -> member logits (B, M, K): class token i to head i, or the pool."""
        if self.global_pool == 'token':
            x = x[:, :self.num_members]
        elif self.global_pool:
            x = self.pool(x)
        x = self.head_drop(self.fc_norm(x))
        if pre_logits or self.num_classes == 0:
            # timm's contract of one feature vector per image: the member class features averaged
            return x.mean(1) if self.global_pool == 'token' else x
        return self.head(x)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool in ('map', 'prr', 'avgmax', 'max'):
            raise ValueError(f'global_pool must be "", "token" or "avg" for MixViT, got {global_pool!r}')
        super().reset_classifier(num_classes, global_pool)

    def _reset_heads(self):
        if self.num_classes > 0:
            self.head = MemberLinear(self.embed_dim, self.num_classes, self.num_members).to(self.cls_token.device)
            self._init_head()

    def _prune_trunk(self, keep: int):
        self.blocks = self.blocks[:keep]
        self.trunk_depth = keep
        self.last_block_computes_rows = computes_rows(self.blocks[-1])
        if self.attribution_depth >= keep:
            self.attribution_depth = -1  # the member blocks are gone: what is left is the shared trunk


# --- conversion -------------------------------------------------------------------------------------------

_CONVERTED_CLASSES: Dict[Tuple[type, type], type] = {}


def _renamed(method, name: str = 'base_forward_head'):
    """A copy of ``method`` under another name. The mixins reach the timm model's own head through it:
    TorchScript compiles no ``super()`` call and names a compiled method after its function's name."""
    copy = types.FunctionType(method.__code__, method.__globals__, name, method.__defaults__, method.__closure__)
    copy.__qualname__, copy.__kwdefaults__ = name, method.__kwdefaults__
    return copy


def _converted_class(mixin: type, base: type) -> type:
    """``class <Base><MixMo|MixViT>(mixin, Base)``, one per timm class: the model keeps timm's methods."""
    key = (mixin, base)
    if key not in _CONVERTED_CLASSES:
        suffix = 'MixViT' if mixin is MixViTBackboneMixin else 'MixMo'
        _CONVERTED_CLASSES[key] = type(f'{base.__name__}{suffix}', (mixin, base),
                                       {'__module__': __name__, 'base_forward_head': _renamed(base.forward_head)})
    return _CONVERTED_CLASSES[key]


def _is_class_token_vit(model: nn.Module) -> bool:
    if not isinstance(model, VisionTransformer):
        return False
    # subclasses that lay tokens out otherwise (distilled DeiT: a second token, two heads) are not it
    cls = type(model)
    return all(getattr(cls, name) is getattr(VisionTransformer, name)
               for name in ('_pos_embed', 'forward_features', 'forward_head', 'pool'))


def _convert_vit(model: VisionTransformer, num_members: int, member_blocks: int, pretrained_core: bool,
                 head_pretrained: bool, ensemble: str):
    problems = []
    if not getattr(model, 'has_class_token', model.cls_token is not None):
        problems.append('no class token (class_token=False)')
    if model.attn_pool is not None or model.global_pool not in ('token', 'avg', ''):
        problems.append(f'global_pool={model.global_pool!r} (MixViT pools "token" or "avg")')
    if model.dynamic_img_size:
        problems.append('dynamic_img_size=True (mixing masks live on a fixed token grid)')
    if not isinstance(model.patch_drop, nn.Identity):
        problems.append('patch_drop_rate > 0 (dropped tokens would lose their source masks)')
    if problems:
        raise ValueError(f'{type(model).__name__} cannot be a MixViT: ' + '; '.join(problems))
    depth = len(model.blocks)
    if isinstance(member_blocks, bool) or not isinstance(member_blocks, int) or not 0 <= member_blocks <= depth:
        raise ValueError(f'member_blocks must be an int in 0..{depth} (the ViT has {depth} blocks), got '
                         f'{member_blocks!r}')
    base_head = model.head
    prefix = model.num_prefix_tokens
    model.__class__ = _converted_class(MixViTBackboneMixin, type(model))
    model.grad_checkpointing = getattr(model, 'grad_checkpointing', False)
    model.trunk_prefix_tokens = prefix
    # 0 member blocks: no attribution, the M heads read one class token (a 'naive' MIMO ViT)
    model._init_mimo(num_members, depth - member_blocks if member_blocks else 'none', 'member', 'passes',
                     ensemble, depth, model.patch_embed.num_patches)
    model.member_blocks = member_blocks
    model.last_block_computes_rows = computes_rows(model.blocks[-1])
    model.num_prefix_tokens = num_members + prefix - 1  # in the features: M class tokens, then registers
    # timm's features API reads the shared blocks only: those before the attribution
    model.feature_info = model.feature_info[:depth if model.attribution_depth < 0 else model.attribution_depth]
    if model.source_embed is not None and pretrained_core:
        nn.init.zeros_(model.source_embed)  # at init every member pass is the pretrained ViT's
    model.head = member_classifier(base_head, num_members, copy=head_pretrained)


def _convert_cnn(model: nn.Module, num_members: int, head_pretrained: bool, ensemble: str):
    stem_path = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    if not isinstance(stem_path, str) or not stem_path:
        raise ValueError(f'{type(model).__name__} names no single first convolution in its pretrained_cfg '
                         f'({stem_path!r}): cannot give it member encoders')
    for name in ('forward_features', 'forward_head', 'reset_classifier'):
        if not hasattr(model, name):
            raise ValueError(f'{type(model).__name__} has no {name}(): not a timm classification model')
    conv = model.get_submodule(stem_path)
    in_chans = conv.in_channels
    model.set_submodule(stem_path, MixMoStem.from_conv(conv, num_members))
    model.__class__ = _converted_class(MixMoBackboneMixin, type(model))
    model.stem_path = stem_path
    model.num_members = num_members
    model.ensemble = ensemble
    model.in_chans = in_chans
    _set_classifier(model, copy=head_pretrained)


def to_mimo(model: nn.Module, num_members: int = 2, member_blocks: int = 1, ensemble: str = 'logits',
            pretrained_core: bool = False, head_pretrained: bool = False) -> nn.Module:
    """Convert a timm classification model in place to M members (MixViT for a class-token ViT, else MixMo).

    ``pretrained_core``: the weights are pretrained (ViT source embeddings then start at zero);
    ``head_pretrained``: the classifier is pretrained for these classes (every head copies it).
    """
    check_num_members(num_members)
    check_ensemble_rule(ensemble)
    if _is_class_token_vit(model):
        _convert_vit(model, num_members, member_blocks, pretrained_core, head_pretrained, ensemble)
    elif isinstance(model, VisionTransformer):
        raise ValueError(f'{type(model).__name__} changes the VisionTransformer token layout (e.g. a distillation '
                         f'token): only timm\'s VisionTransformer with one class token converts to MixViT')
    else:
        _convert_cnn(model, num_members, head_pretrained, ensemble)
    return model


def _mimo_pretrained_cfg(model: nn.Module) -> Dict[str, Any]:
    """The backbone's cfg (preprocessing, first conv, classifier) for the converted model, weight sources
    removed: pretrained=True on it would otherwise load the backbone's weights into the MIMO model."""
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items()
           if k not in ('url', 'hf_hub_id', 'hf_hub_filename', 'file', 'state_dict', 'source', 'tag')}
    is_vit = isinstance(model, MixViTMixin)
    cfg.update(
        architecture=ARCHITECTURE,
        paper_ids='openreview:pOq1HuMI8Dz' if is_vit else 'arXiv:2103.06132',
        paper_name=('Reconciling feature sharing and multiple predictions with MIMO Vision Transformers' if is_vit
                    else 'MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks'))
    return cfg


def _has_weight_source(cfg: Dict[str, Any]) -> bool:
    return bool(_resolve_pretrained_source(cfg)[0])


def _features_model(model: nn.Module, out_indices) -> FeatureGetterNet:
    """timm's feature getter over the model's ``forward_intermediates`` (single images)."""
    if out_indices is None:
        levels = len(model.feature_info)
        # CNNs: every level, as timm's CNN feature extractors; ViTs: the last 3 shared blocks, as timm's ViT
        out_indices = tuple(range(levels)) if isinstance(model, MixMoBackboneMixin) \
            else tuple(range(max(levels - 3, 0), levels))
    pretrained_cfg = model.pretrained_cfg
    features = FeatureGetterNet(model, out_indices=out_indices, prune=False)
    features.pretrained_cfg = features.default_cfg = dict(pretrained_cfg, num_classes=0)
    return features


# no weights of its own: pretrained=True means the backbone's (see the module docstring)
default_cfgs = generate_default_cfgs({
    ARCHITECTURE: dict(
        url='', num_classes=1000, input_size=(3, 224, 224), crop_pct=0.875, interpolation='bicubic',
        first_conv='', classifier='', license='apache-2.0'),
})


@register_model
def mimo_backbone(
        pretrained: bool = False,
        backbone: Optional[str] = None,
        num_members: int = 2,
        member_blocks: int = 1,
        ensemble: str = 'logits',
        backbone_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Union[str, Dict[str, Any]]] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        features_only: bool = False,
        out_indices: Optional[Union[int, List[int]]] = None,
        pretrained_model_args: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Any timm CNN as MixMo / any timm ViT with a class token as MixViT, with M = ``num_members``.

    Args:
        backbone: a timm model name (with an optional pretrained tag), e.g. 'resnet18.a1_in1k' (default
            ``DEFAULT_BACKBONE``, resnet18).
        num_members: M; 1 is the backbone itself (same weights, same outputs).
        member_blocks: ViTs: the last blocks run once per member after the source attribution (0: none).
        ensemble: 'logits' (mean of member logits, MixMo) or 'probs'.
        pretrained_cfg_overlay: the backbone's pretrained_cfg overlay, e.g. dict(file=...) to start from
            local weights with ``pretrained=True``.
        backbone_pretrained_cfg_overlay: the same as a model argument (``--model-kwargs``), recorded in a
            saved config.json (only used with ``pretrained=True`` and no saved MIMO cfg); wins over the above.
        pretrained_cfg: the MIMO model's own cfg (a saved model's; ``local-dir:`` / ``hf-hub:`` pass it).
        **kwargs: the backbone's ``timm.create_model`` arguments (num_classes, img_size, drop_path_rate, ...).
    """
    if backbone is None:
        backbone = DEFAULT_BACKBONE  # timm's convention: every registered name builds without arguments
    if not backbone or not isinstance(backbone, str):
        raise ValueError('mimo_backbone needs backbone=<a timm model name>, e.g. backbone=resnet18')
    if not timm.is_model(backbone):
        raise ValueError(f'unknown backbone {backbone!r}: not in timm\'s registry')
    if isinstance(pretrained_cfg, str):
        raise ValueError(f'mimo_backbone has no pretrained tags (got {pretrained_cfg!r}): tag the backbone, e.g. '
                         f'backbone=resnet18.a1_in1k')
    own_cfg = None if pretrained_cfg is None else resolve_pretrained_cfg(ARCHITECTURE, pretrained_cfg).to_dict()
    own_weights = pretrained and own_cfg is not None and _has_weight_source(own_cfg)
    base_pretrained = pretrained and not own_weights
    base_overlay = dict(pretrained_cfg_overlay or {}, **(backbone_pretrained_cfg_overlay or {}))
    model = timm.create_model(backbone, pretrained=base_pretrained, cache_dir=cache_dir,
                              pretrained_cfg_overlay=base_overlay or None, **kwargs)
    base_cfg = model.pretrained_cfg
    head_pretrained = base_pretrained and model.num_classes == base_cfg.get('num_classes')
    to_mimo(model, num_members, member_blocks, ensemble, pretrained_core=base_pretrained,
            head_pretrained=head_pretrained)
    cfg = _mimo_pretrained_cfg(model)
    # a cfg of the MIMO model itself (a saved one: local-dir:, hf-hub:) describes these weights, as timm's
    # build_model_with_cfg keeps it; the registry default of mimo_backbone does not replace the backbone's
    if own_cfg is not None:
        cfg.update({k: v for k, v in own_cfg.items() if v is not None})
    model.pretrained_cfg = model.default_cfg = dict(cfg, architecture=ARCHITECTURE)
    model.pretrained_model_args = pretrained_model_args or {}
    if own_weights:
        load_pretrained(model, pretrained_cfg=own_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get('in_chans', 3), cache_dir=cache_dir)
    if features_only:
        return _features_model(model, out_indices)
    return model


def create_mimo_model(
        backbone: str,
        num_members: int = 2,
        pretrained: bool = False,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """``timm.create_model(backbone, pretrained, pretrained_cfg_overlay, **kwargs)`` with M members.

    ``pretrained`` and ``pretrained_cfg_overlay`` are the backbone's, as in ``timm.create_model``; the result
    is ``timm.create_model('mimo_backbone', backbone=backbone, ...)``, so that it saves and reloads in timm's
    Hub format (config.json records ``backbone`` and the MIMO arguments, not the overlay).
    """
    return timm.create_model(ARCHITECTURE, pretrained=pretrained, backbone=backbone, num_members=num_members,
                             pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
