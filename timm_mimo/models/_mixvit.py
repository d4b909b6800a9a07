"""The MixViT machinery shared by the CaiT / ConViT models (``mixvit.py``) and by any timm ViT made MIMO
(``mimo_backbone.py``): token mixing, source attribution, the per-member class stage, inference modes.
The design options are described in ``mixvit.py``."""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import Attention, trunc_normal_
from timm.models._features import feature_take_indices

from ..mimo import MemberLinear, MimoClassifierMixin, check_ensemble_rule, check_image_input, check_num_members, \
    mix_members

torch.fx.wrap('check_image_input')  # one opaque call in traced graphs (timm's FX feature extraction)

ATTRIBUTION_PLACES = ('class', 'mid', 'input', 'none')
CLASS_STAGES = ('member', 'tokens', 'shared')
INFERENCE_MODES = ('passes', 'duplicate')
# patch size defaults to img_size // 8 up to timm's usual 16: 64 tokens for CIFAR (p=4) and Tiny ImageNet
# (p=8), and 14x14 patches of 16 px at 224 px, as timm's CaiT and ConViT
DEFAULT_TOKEN_GRID = 8
MAX_DEFAULT_PATCH_SIZE = 16


def resolve_patch_size(img_size: Union[int, Tuple[int, int]], patch_size: Optional[int]) -> int:
    """The patch size: given, or min(img_size // 8, 16); the image must tile into patches."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if patch_size is None:
        patch_size = min(max(min(h, w) // DEFAULT_TOKEN_GRID, 1), MAX_DEFAULT_PATCH_SIZE)
    if h % patch_size or w % patch_size:
        raise ValueError(f'image size {h}x{w} is not divisible by the patch size {patch_size}')
    return patch_size


def computes_rows(block: nn.Module) -> bool:
    """Whether :func:`block_rows` can run ``block``: timm's pre-norm ViT block with its plain attention."""
    from timm.models.vision_transformer import Block
    return type(block) is Block and type(block.attn) is Attention and isinstance(block.attn.qkv, nn.Linear)


def block_rows(block: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``block(x)[:, :rows]`` for a timm ViT ``Block``, computing only those rows: keys and values of every
    token, but queries, projection and MLP of the first ``rows`` tokens only. The last block's other rows
    feed nothing when the head reads the class token, and they are most of its cost."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    dim, heads = attn.attn_dim, attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :rows], weight[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, weight[dim:], None if bias is None else bias[dim:])
    q = q.reshape(b, rows, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.)
    out = attn.norm(out.transpose(1, 2).reshape(b, rows, dim))
    if attn.gate is not None:
        out = out * attn.gate(h[:, :rows]).sigmoid()
    x = x[:, :rows] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def tag_patch_rows(normed: torch.Tensor, tags: Optional[torch.Tensor]) -> torch.Tensor:
    """A class block's normed input (B, T + N, D) with ``tags`` (B, N, D) added to its last N rows: the patch
    tokens tagged by their source (the T rows before them are class tokens, from no member's input).

    After the norm, a tag's share of what the block reads and its gradient are set by the tag alone: added
    before it, both shrink as the trunk's tokens grow (over training, or in a pretrained trunk).
    """
    if tags is None:
        return normed
    num_class = normed.shape[1] - tags.shape[1]
    return torch.cat((normed[:, :num_class], normed[:, num_class:] + tags), dim=1)


class MixViTMixin(MimoClassifierMixin):
    """Token mixing, source attribution, per-member class stage and M heads for a timm ViT.

    An architecture (a subclass that puts this mixin before a timm ViT) provides ``shared_trunk_depth()``,
    ``embed_tokens`` (patches + positions, (B, N, D)), ``blocks`` whose first
    ``trunk_depth`` see patch tokens only (the shared trunk), and
    ``class_stage(tokens, cls, tags) -> (cls, tokens)``, whose blocks add ``tags`` (the source attribution,
    or None) to the patch tokens after their first norm (:func:`tag_patch_rows`).

    Features (``forward_features`` / ``forward_mixed_features``) are laid out as timm's ViTs lay them
    out, prefix tokens first: (B, M + N, D), the M member class tokens then the patch tokens, normed.
    """
    default_mix_mode = 'box'  # binary token masks: every token comes from one input (docs/methods/mixvit.md §1.1)
    num_members: int
    attribution_depth: int
    class_stage_mode: str
    inference: str
    source_embed: Optional[nn.Parameter]
    grad_checkpointing: bool

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: Optional[int] = None,
            num_members: int = 1,
            attribution: Union[str, int] = 'class',
            class_stage: str = 'member',
            inference: str = 'passes',
            ensemble: str = 'logits',
            num_classes: int = 10,
            **kwargs,
    ):
        """MixViT options (module docstring) on top of the timm ViT's own constructor arguments."""
        patch_size = resolve_patch_size(img_size, patch_size)
        # the timm ViT next in the MRO builds every block, embedding and weight as it always does
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **kwargs)
        self.grad_checkpointing = False
        self._init_mimo(num_members, attribution, class_stage, inference, ensemble, self.shared_trunk_depth(),
                        self.patch_embed.num_patches)

    def _init_mimo(
            self,
            num_members: int,
            attribution: Union[str, int],
            class_stage: str,
            inference: str,
            ensemble: str,
            trunk_depth: int,
            num_tokens: int,
    ):
        self.num_members = check_num_members(num_members)
        if num_members > num_tokens:
            raise ValueError(f'num_members={num_members} is more than the {num_tokens} tokens a binary token '
                             f'mask can share out: every member needs at least one token')
        self.ensemble = check_ensemble_rule(ensemble)
        if class_stage not in CLASS_STAGES:
            raise ValueError(f'unknown class stage {class_stage!r}, expected one of {CLASS_STAGES}')
        if inference not in INFERENCE_MODES:
            raise ValueError(f'unknown inference mode {inference!r}, expected one of {INFERENCE_MODES}')
        self.class_stage_mode = class_stage
        self.inference = inference
        self.trunk_depth = trunk_depth  # blocks[:trunk_depth] see patch tokens only and are shared
        self.attribution_depth = self._attribution_depth(attribution, trunk_depth)
        if inference == 'duplicate' and 0 <= self.attribution_depth < trunk_depth:
            raise ValueError('inference="duplicate" repeats the tokens once per member, which only the class '
                             'stage accepts: use attribution="class" or inference="passes"')
        embed_dim = self.embed_dim
        self.source_embed = None
        if self.attribution_depth >= 0:
            # docs/methods/mixvit.md §3.4: one learned vector per member, initialised like the position
            # embedding, no weight decay
            self.source_embed = nn.Parameter(torch.zeros(num_members, embed_dim))
            trunc_normal_(self.source_embed, std=.02)
        self.num_prefix_tokens = num_members
        num_cls = num_members if class_stage == 'tokens' else 1
        self.num_class_tokens = num_cls  # a plain int: shape-dependent branches on it stay traceable (torch.fx)
        if num_cls > 1:
            cls_token = torch.zeros(1, num_cls, embed_dim)
            trunc_normal_(cls_token, std=.02)
            self.cls_token = nn.Parameter(cls_token)
        self.head = MemberLinear(embed_dim, self.num_classes, num_members) if self.num_classes > 0 else nn.Identity()
        self._init_head()

    def _attribution_depth(self, attribution: Union[str, int], trunk_depth: int) -> int:
        """Trunk block index before which the source embeddings are added; -1 for none."""
        if self.num_members == 1:
            return -1  # one source: nothing to tell apart, and M = 1 stays the plain network
        if isinstance(attribution, bool) or not isinstance(attribution, (str, int)):
            raise ValueError(f'unknown attribution placement {attribution!r}, expected one of '
                             f'{ATTRIBUTION_PLACES} or a trunk block index')
        if isinstance(attribution, str) and attribution.lstrip('-').isdigit():
            attribution = int(attribution)  # from the command line (--model-kwargs attribution=12)
        if isinstance(attribution, int):
            if not 0 <= attribution <= trunk_depth:
                raise ValueError(f'attribution depth {attribution} is outside the trunk (0..{trunk_depth})')
            return attribution
        places = {'class': trunk_depth, 'mid': trunk_depth // 2, 'input': 0, 'none': -1}
        if attribution not in places:
            raise ValueError(f'unknown attribution placement {attribution!r}, expected one of '
                             f'{ATTRIBUTION_PLACES} or a trunk block index')
        return places[attribution]

    def _init_head(self):
        head = self.head
        if isinstance(head, nn.Linear):
            trunc_normal_(head.weight, std=.02)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    # --- timm model interface -----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'source_embed'}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ('', 'token', 'avg'):
                raise ValueError(f'global_pool must be "", "token" or "avg", got {global_pool!r}')
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = MemberLinear(self.embed_dim, num_classes, self.num_members) if num_classes > 0 else nn.Identity()
        self._init_head()

    def mix_grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid (h, w): MixViT's mixing masks live on it."""
        p = self.patch_embed.patch_size
        h, w = img_size
        if h % p[0] or w % p[1]:
            raise ValueError(f'image size {h}x{w} is not divisible by the patch size {p[0]}x{p[1]}')
        return h // p[0], w // p[1]

    # --- the MixViT forward ---------------------------------------------------------------------------

    # tokens of the shared trunk that are no patch (a ViT's class and register tokens); features skip them
    trunk_prefix_tokens = 0

    def _prepare_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedded (or mixed) patch tokens (B, N, D) -> the shared trunk's input."""
        return self.pos_drop(tokens)

    def _run_trunk(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            if start <= i < end:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return x

    def _source_tags(self, masks: torch.Tensor, per_member: bool, dtype: torch.dtype) -> torch.Tensor:
        """What the source attribution adds to each token, from the token sources (B, M, N).

        ``per_member``: M views (B * M, N, D), view i tags member i's own tokens with s_i (the 'member'
        class stage and per-member inference); otherwise one view (B, N, D) where each token carries the
        embedding of its source, sum_k m_k s_k (soft masks give soft attribution, docs/methods/mixvit.md §7.4).
        """
        source = self.source_embed
        assert source is not None
        source = source.to(dtype)
        masks = masks.to(dtype)
        if per_member:
            return (masks.unsqueeze(-1) * source[None, :, None, :]).flatten(0, 1)
        return torch.einsum('bmn,md->bnd', masks, source)

    def _attribute(self, tokens: torch.Tensor, masks: torch.Tensor, per_member: bool) -> torch.Tensor:
        """Tokens (B, N, D) plus their source tags (:meth:`_source_tags`): (B * M or B, N, D)."""
        tags = self._source_tags(masks, per_member, tokens.dtype)
        if per_member:
            tokens = tokens.repeat_interleave(self.num_members, 0)
        return tokens + tags

    def _member_class_features(self, cls: torch.Tensor, batch_size: int, passes: int) -> torch.Tensor:
        """Class-stage outputs (B * passes, T, D) -> one feature per member (B, M, D)."""
        m = self.num_members
        cls = cls.unflatten(0, (batch_size, passes))                 # (B, P, T, D)
        t = self.num_class_tokens
        if passes == m and t == m:
            idx = torch.arange(m, device=cls.device)
            return cls[:, idx, idx]                                   # member i's token from pass i
        if passes == m:
            return cls[:, :, 0]
        if t == m:
            return cls[:, 0]
        return cls[:, 0].expand(-1, m, -1)                            # one token read by M heads

    def _forward_tokens(self, tokens: torch.Tensor, masks: Optional[torch.Tensor], start: int = 0) -> torch.Tensor:
        """Trunk (from block ``start``), source attribution, class stage and norm for tokens (B, N, D).

        ``masks`` (B, M, N) are the token sources of mixed inputs; None means a single image, which
        belongs to every member (inference, docs/methods/mixvit.md §3.7).
        """
        b, n, _ = tokens.shape
        m = self.num_members
        depth = self.attribution_depth
        trunk_depth = self.trunk_depth
        passes, duplicated = 1, False
        tags: Optional[torch.Tensor] = None
        if depth < 0:
            tokens = self._run_trunk(tokens, start, trunk_depth)
        else:
            tokens = self._run_trunk(tokens, start, depth)
            duplicated = masks is None and self.inference == 'duplicate'
            if duplicated:
                # I1: one copy of the tokens per member, copy k entirely member k's
                tokens = tokens.repeat(1, m, 1)
                masks = torch.eye(m, device=tokens.device, dtype=tokens.dtype).repeat_interleave(n, 1)
                masks = masks.unsqueeze(0).expand(b, -1, -1)
                # one class-stage pass over all M*N tokens (docs/methods/mixvit.md §3.7, I1), whatever the
                # class stage
                per_member = False
            elif masks is None:
                # I2: member i's pass sees every token as its own
                masks = tokens.new_ones(b, m, n)
                per_member = True
            else:
                per_member = self.class_stage_mode == 'member'
            passes = m if per_member else 1
            if depth < trunk_depth:
                # inside the trunk: the tags join the residual stream, the blocks after them run per pass
                tokens = self._attribute(tokens, masks, per_member)
                tokens = self._run_trunk(tokens, depth, trunk_depth)
            else:
                # at the class stage: every class block reads its patch tokens tagged after its norm
                # (``class_stage``), where the tags' share and gradient do not depend on the scale
                # the trunk's tokens have grown to (README.md, MixViT)
                tags = self._source_tags(masks, per_member, tokens.dtype)
                if per_member:
                    tokens = tokens.repeat_interleave(m, 0)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        cls, tokens = self.class_stage(tokens, cls, tags)
        member_cls = self._member_class_features(cls, b, passes)
        # patch tokens: averaged over passes (and over copies in I1), for 'avg' pooling and dense features
        tokens = tokens.unflatten(0, (b, passes)).mean(1)
        if duplicated:
            tokens = tokens.unflatten(1, (m, n)).mean(1)
        return self.norm(torch.cat((member_cls, tokens), dim=1))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ):
        """Outputs of the shared trunk blocks (timm's feature API), and the final features.

        Trunk blocks after the source attribution run per member, so only blocks before it are offered.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f'output_fmt must be NCHW or NLC, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(self.trunk_depth, indices)
        if 0 <= self.attribution_depth <= max_index:
            raise ValueError(f'trunk block {max_index} runs after the source attribution (block '
                             f'{self.attribution_depth}), once per member: only earlier blocks are shared features')
        b, _, height, width = x.shape
        tokens = self._prepare_tokens(self.embed_tokens(x))
        intermediates = []
        for i, blk in enumerate(self.blocks):
            if i > max_index:
                break
            tokens = blk(tokens)
            if i in take_indices:
                intermediates.append(self.norm(tokens) if norm else tokens)
        if output_fmt == 'NCHW':
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            p = self.trunk_prefix_tokens
            intermediates = [y[:, p:].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self._forward_tokens(tokens, None, start=max_index + 1), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        take_indices, max_index = feature_take_indices(self.trunk_depth, indices)
        self._prune_trunk(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """One image per sample (B, C, H, W) -> (B, M + N, D): the trunk runs once."""
        return self._forward_tokens(self._image_tokens(x), None)

    def _image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """One image per sample (B, C, H, W) -> its tokens as the trunk takes them (B, N, D)."""
        check_image_input(x, self.in_chans, patch=self.patch_embed.patch_size)
        return self._prepare_tokens(self.embed_tokens(x))

    def forward_mixed_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Member inputs (B, M, C, H, W) mixed token by token with masks (B, M, h, w) on the token grid."""
        tokens, masks = self._mixed_tokens(x, masks)
        return self._forward_tokens(tokens, masks)

    def _mixed_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the mixed tokens as the trunk takes them (B, N, D), their source masks (B, M, N))."""
        check_image_input(x, self.in_chans, patch=self.patch_embed.patch_size, members=True)
        b, m = x.shape[:2]
        tokens = self.embed_tokens(x.flatten(0, 1)).unflatten(0, (b, m))     # (B, M, N, D)
        n = tokens.shape[2]
        if masks is None:
            masks = tokens.new_full((b, m, n), 1.0 / m)  # MIMO summing: every token is the members' mean
        else:
            if masks.shape[-2] * masks.shape[-1] != n:
                raise ValueError(f'mixing masks are {masks.shape[-2]}x{masks.shape[-1]} but the token grid has '
                                 f'{n} tokens: build masks with model.mix_grid_size()')
            masks = masks.flatten(2).to(tokens.dtype)
        # the shared MIMO mix step, on tokens laid out channels-first (B, M, D, N); scale 1 = token selection
        mixed = mix_members(tokens.transpose(2, 3), masks).transpose(1, 2)
        return self._prepare_tokens(mixed), masks

    def forward_member_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features (B, M + N, D) -> member logits (B, M, K).

        With ``pre_logits`` or no classifier, timm's contract of one feature vector per image holds: the
        member class features are averaged (``forward_members`` keeps them apart through the heads).
        """
        m = self.num_members
        if self.global_pool == 'avg':
            x = x[:, m:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, :m]
        x = self.head_drop(x)
        if pre_logits or self.num_classes == 0:
            return x.mean(1) if self.global_pool == 'token' else x
        return self.head(x)
