"""MixViT: MIMO vision transformers (CaiT, ConViT) with source attribution (docs/methods/mixvit.md).

The M inputs are mixed in token space with binary masks (a token per position from one input), the
shared trunk runs once on the mixed tokens, and the subnetworks separate only at the end: learned
per-member *source embeddings* tie every token to the member whose input it came from, then the class
stage reads the tokens for each member and M dense heads predict. At inference one image runs through
the trunk once; the class stage runs once per member on the tokens attributed to that member.

The models subclass timm's ``Cait`` and ``ConVit`` (all blocks, init and weight names are timm's): with
M = 1 they are the plain networks and give the same outputs from the same weights.

Design options (docs/methods/mixvit.md §3, §7; the paper's exact choices are not public):

``attribution``: where the source embeddings are added and the members separate.
    'class' (default): at the class stage, added to the patch tokens after the first norm of every
    class-attention block (CaiT) or block after the class token joins (ConViT), so that a tag's share of
    what the block reads and its gradient do not shrink as the trunk's tokens grow (a reconstructed
    choice, README); 'mid': after half of the trunk; 'input': right after the
    patch embedding; an int d: after trunk block d; 'none': no attribution (a "naive" MIMO ViT).
    With the 'member' class stage, the trunk blocks after the attribution run once per member.
``class_stage``: how the M predictions are read (docs/methods/mixvit.md §1.1, §3.5).
    'member' (default, §1.1): the shared class token and class blocks run once per member, on the tokens
    with member i's own tokens tagged by s_i; head i reads pass i.
    'tokens' (§3.5 A): M class tokens, one pass over tokens tagged by their source, token i -> head i.
    'shared' (§3.5 B, the most literal reading of the paper's §2.1): one class token, one pass over the
    tokens tagged by their source, M heads read the same feature.
``inference``: how a single image is attributed (docs/methods/mixvit.md §3.7).
    'passes' (I2, default): member i's pass sees every token tagged s_i.
    'duplicate' (I1): the tokens are repeated once per member, copy k tagged s_k, and the class stage
    reads all M*N tokens in one pass (only with attribution at the class stage). With the 'member' and
    'shared' class stages that one pass gives one class feature, read by the M heads; with 'tokens', the
    M class tokens of that pass.
"""
from typing import Optional, Tuple

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.cait import Cait, LayerScaleBlockClassAttn
from timm.models.convit import Block as ConVitBlock, ConVit

from ..constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD
from ._mixvit import ATTRIBUTION_PLACES, CLASS_STAGES, INFERENCE_MODES, MixViTMixin, resolve_patch_size  # noqa: F401
from ._mixvit import tag_patch_rows
from ._pretrained import hub_cfgs, pretrained_weights

__all__ = ['MixViTCait', 'MixViTConVit', 'ATTRIBUTION_PLACES', 'CLASS_STAGES', 'INFERENCE_MODES']


class TaggedClassAttnBlock(LayerScaleBlockClassAttn):
    """timm's CaiT class-attention block (same weights, same output without ``tags``); ``tags`` (B, N, D)
    are added to the patch tokens after ``norm1``: the source attribution at the class stage."""

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor, tags: Optional[torch.Tensor] = None) -> torch.Tensor:
        u = tag_patch_rows(self.norm1(torch.cat((x_cls, x), dim=1)), tags)
        x_cls = x_cls + self.drop_path(self.gamma_1 * self.attn(u))
        return x_cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x_cls)))


class TaggedConVitBlock(ConVitBlock):
    """timm's ConViT block (same weights, same output without ``tags``); ``tags`` (B, N, D) are added to the
    last N rows (the patch tokens) after ``norm1``: the source attribution at the class stage."""

    def forward(self, x: torch.Tensor, tags: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(tag_patch_rows(self.norm1(x), tags)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixViTCait(MixViTMixin, Cait):
    """CaiT with M members: the 24 self-attention blocks are the shared trunk, the class-attention blocks
    and M heads the member part (docs/methods/mixvit.md §3)."""

    def __init__(self, **kwargs):
        kwargs.setdefault('block_layers_token', TaggedClassAttnBlock)
        super().__init__(**kwargs)

    def shared_trunk_depth(self) -> int:
        return len(self.blocks)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed

    def class_stage(self, tokens: torch.Tensor, cls: torch.Tensor,
                    tags: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        # class attention updates the class tokens only; timm's ClassAttn reads one query, so several
        # class tokens run folded into the batch, each over the same tokens
        t = self.num_class_tokens
        b = tokens.shape[0]
        kv = tokens
        if t > 1:
            kv = tokens.repeat_interleave(t, 0)
            cls = cls.reshape(b * t, 1, -1)
            if tags is not None:
                tags = tags.repeat_interleave(t, 0)
        for blk in self.blocks_token_only:
            cls = blk(kv, cls, tags)
        return cls.reshape(b, t, -1), tokens

    def _prune_trunk(self, keep: int):
        self.blocks = self.blocks[:keep]
        self.trunk_depth = keep
        self.blocks_token_only = None  # the member part goes: only trunk features are left


class MixViTConVit(MixViTMixin, ConVit):
    """ConViT with M members: the GPSA blocks are the shared trunk; the blocks where the class token
    joins (the last ``depth - local_up_to_layer``) and M heads the member part (docs/methods/mixvit.md §3.5)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for blk in self.blocks:  # timm builds its Block directly: the same module, with the tags argument
            blk.__class__ = TaggedConVitBlock
        # timm's features API reads the shared trunk: the GPSA blocks before the class token joins
        self.feature_info = self.feature_info[:self.local_up_to_layer]

    def shared_trunk_depth(self) -> int:
        return self.local_up_to_layer

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return x + self.pos_embed if self.use_pos_embed else x

    def class_stage(self, tokens: torch.Tensor, cls: torch.Tensor,
                    tags: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self.num_class_tokens
        x = torch.cat((cls, tokens), dim=1)
        for i, blk in enumerate(self.blocks):
            if i >= self.local_up_to_layer:
                x = blk(x, tags)
        return x[:, :t], x[:, t:]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def _prune_trunk(self, keep: int):
        self.blocks = self.blocks[:keep]
        self.trunk_depth = self.local_up_to_layer = min(self.local_up_to_layer, keep)


def _create_mixvit(model_cls, variant: str, pretrained: bool = False, **kwargs):
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': CIFAR_DEFAULT_MEAN, 'std': CIFAR_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0', 'paper_ids': 'openreview:pOq1HuMI8Dz',
        'paper_name': 'Reconciling feature sharing and multiple predictions with MIMO Vision Transformers',
        **kwargs,
    }


def _dataset_tags(name: str):
    # CIFAR: 32 px, patch 4; Tiny ImageNet: 64 px, patch 8 (patch_size defaults to img_size // 8): 64 tokens
    return {
        f'{name}.cifar10': _cfg(),
        f'{name}.cifar100': _cfg(num_classes=100),
        f'{name}.tiny_imagenet': _cfg(
            num_classes=200, input_size=(3, 64, 64), mean=TINY_IMAGENET_MEAN, std=TINY_IMAGENET_STD),
    }


# only the tags of timm_mimo/models/published.py get weights (hf_hub_id); pretrained=True on others fails
default_cfgs = generate_default_cfgs(hub_cfgs({
    tag: cfg for arch in (
        'cait_xxs_mixvit1', 'cait_xxs_mixvit2', 'cait_xs_mixvit1', 'cait_xs_mixvit2', 'cait_s_mixvit1',
        'cait_s_mixvit2', 'convit_tiny_mixvit1', 'convit_tiny_mixvit2', 'convit_small_mixvit1', 'convit_small_mixvit2',
    ) for tag, cfg in _dataset_tags(arch).items()
}))


def _create_variant(model_cls, variant: str, pretrained: bool, **kwargs):
    with pretrained_weights(variant, pretrained, kwargs):
        return _create_mixvit(model_cls, variant, pretrained=pretrained, **kwargs)


# sizes as timm's CaiT-XXS/XS/S-24 and ConViT-Ti/S (docs/methods/mixvit.md §4); kwargs override, num_members too
@register_model
def cait_xxs_mixvit1(pretrained: bool = False, **kwargs) -> MixViTCait:
    """CaiT-XXS-24 for small images, one member: the plain CaiT baseline of MixViT."""
    model_args = dict(embed_dim=192, depth=24, num_heads=4, init_values=1e-5, num_members=1)
    return _create_variant(MixViTCait, 'cait_xxs_mixvit1', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_xxs_mixvit2(pretrained: bool = False, **kwargs) -> MixViTCait:
    """MixViT CaiT-XXS-24 with two members."""
    model_args = dict(embed_dim=192, depth=24, num_heads=4, init_values=1e-5, num_members=2)
    return _create_variant(MixViTCait, 'cait_xxs_mixvit2', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_xs_mixvit1(pretrained: bool = False, **kwargs) -> MixViTCait:
    """CaiT-XS-24 for small images, one member (baseline)."""
    model_args = dict(embed_dim=288, depth=24, num_heads=6, init_values=1e-5, num_members=1)
    return _create_variant(MixViTCait, 'cait_xs_mixvit1', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_xs_mixvit2(pretrained: bool = False, **kwargs) -> MixViTCait:
    """MixViT CaiT-XS-24 with two members."""
    model_args = dict(embed_dim=288, depth=24, num_heads=6, init_values=1e-5, num_members=2)
    return _create_variant(MixViTCait, 'cait_xs_mixvit2', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_s_mixvit1(pretrained: bool = False, **kwargs) -> MixViTCait:
    """CaiT-S-24 for small images, one member (baseline)."""
    model_args = dict(embed_dim=384, depth=24, num_heads=8, init_values=1e-5, num_members=1)
    return _create_variant(MixViTCait, 'cait_s_mixvit1', pretrained, **dict(model_args, **kwargs))


@register_model
def cait_s_mixvit2(pretrained: bool = False, **kwargs) -> MixViTCait:
    """MixViT CaiT-S-24 with two members."""
    model_args = dict(embed_dim=384, depth=24, num_heads=8, init_values=1e-5, num_members=2)
    return _create_variant(MixViTCait, 'cait_s_mixvit2', pretrained, **dict(model_args, **kwargs))


@register_model
def convit_tiny_mixvit1(pretrained: bool = False, **kwargs) -> MixViTConVit:
    """ConViT-Ti for small images, one member (baseline)."""
    model_args = dict(embed_dim=48, num_heads=4, depth=12, local_up_to_layer=10, locality_strength=1.0,
                      num_members=1)
    return _create_variant(MixViTConVit, 'convit_tiny_mixvit1', pretrained, **dict(model_args, **kwargs))


@register_model
def convit_tiny_mixvit2(pretrained: bool = False, **kwargs) -> MixViTConVit:
    """MixViT ConViT-Ti with two members."""
    model_args = dict(embed_dim=48, num_heads=4, depth=12, local_up_to_layer=10, locality_strength=1.0,
                      num_members=2)
    return _create_variant(MixViTConVit, 'convit_tiny_mixvit2', pretrained, **dict(model_args, **kwargs))


@register_model
def convit_small_mixvit1(pretrained: bool = False, **kwargs) -> MixViTConVit:
    """ConViT-S for small images, one member (baseline)."""
    model_args = dict(embed_dim=48, num_heads=9, depth=12, local_up_to_layer=10, locality_strength=1.0,
                      num_members=1)
    return _create_variant(MixViTConVit, 'convit_small_mixvit1', pretrained, **dict(model_args, **kwargs))


@register_model
def convit_small_mixvit2(pretrained: bool = False, **kwargs) -> MixViTConVit:
    """MixViT ConViT-S with two members."""
    model_args = dict(embed_dim=48, num_heads=9, depth=12, local_up_to_layer=10, locality_strength=1.0,
                      num_members=2)
    return _create_variant(MixViTConVit, 'convit_small_mixvit2', pretrained, **dict(model_args, **kwargs))
