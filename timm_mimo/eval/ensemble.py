"""Deep ensembles of trained networks, their inference cost, and any model as TorchUncertainty's estimators.

A deep ensemble (Lakshminarayanan et al. 2017) is, to the evaluation code, one more model with member
logits (B, M, K): :class:`DeepEnsemble` concatenates the member logits of its networks (a plain timm model
gives one member, a MIMO model its M), so :func:`timm_mimo.eval.predict.collect_predictions` and every metric of
:mod:`timm_mimo.eval.metrics` / :mod:`timm_mimo.eval.uncertainty` serve one network and many alike.

:class:`MembersAsEstimators` gives TorchUncertainty's ``ClassificationRoutine(is_ensemble=True)`` the
output it expects from an ensemble: the member logits stacked member-major, (M x B, K).
"""
from collections import Counter
from typing import Dict, Sequence

import torch
import torch.nn as nn

from ..mimo import MemberOutputs, check_ensemble_rule, ensemble_logits

__all__ = ['DeepEnsemble', 'MembersAsEstimators', 'inference_cost', 'ENSEMBLE_CHOICES']

# command-line names of the combination rules of timm_mimo.mimo.ensemble_logits
ENSEMBLE_CHOICES = {'mean-prob': 'probs', 'mean-logit': 'logits'}


class DeepEnsemble(nn.Module):
    """Independently trained networks as one model whose members are all their members.

    ``rule``: 'probs' (mean of the member probabilities, the deep-ensemble rule) or 'logits' (mean of the
    member logits, MixMo's rule), applied over all members at once. Every network sees the same image.
    """

    def __init__(self, models: Sequence[nn.Module], rule: str = 'probs'):
        super().__init__()
        if not models:
            raise ValueError('a deep ensemble needs at least one network')
        self.networks = nn.ModuleList(models)
        # how each network gives member logits, decided once from the bare networks
        self._outputs = [MemberOutputs(m) for m in models]
        self.members_per_network = [o.num_members for o in self._outputs]
        self.num_members = sum(self.members_per_network)
        self.ensemble = check_ensemble_rule(rule)
        self.num_classes = getattr(models[0], 'num_classes', None)
        self.pretrained_cfg = dict(getattr(models[0], 'pretrained_cfg', {}) or {},
                                   architecture=describe_networks(models))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Member logits (B, sum of the networks' M, K) of one image per sample."""
        return torch.cat([o.members(m, x) for o, m in zip(self._outputs, self.networks)], dim=1)

    def forward(self, x: torch.Tensor, masks=None, members: bool = False) -> torch.Tensor:
        if masks is not None:
            raise ValueError('a deep ensemble evaluates one image per sample; its networks train separately')
        member_logits = self.forward_members(x)
        return member_logits if members else ensemble_logits(member_logits, self.ensemble)


def describe_networks(models: Sequence[nn.Module]) -> str:
    """'deep ensemble: 5 x wrn16_2' (architectures with their counts, in first-seen order)."""
    names = Counter((getattr(m, 'pretrained_cfg', {}) or {}).get('architecture', type(m).__name__) for m in models)
    return 'deep ensemble: ' + ' + '.join(f'{n} x {name}' for name, n in names.items())


@torch.no_grad()
def inference_cost(model: nn.Module, image: torch.Tensor) -> Dict[str, int]:
    """Parameters, forward FLOPs per image (``torch.utils.flop_counter``, a multiply-add counts 2) and
    network forward passes per image of ``model`` predicting its ensemble for one ``image`` (C, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    outputs = MemberOutputs(model)
    # inference is counted with no parameter requiring grad: the counter's module tracker would otherwise hook
    # every module input that requires grad, and fails on some (MixViT's source tags)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            outputs.predict(model, image[None])
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    passes = len(model.networks) if isinstance(model, DeepEnsemble) else 1
    return dict(params=sum(p.numel() for p in model.parameters()), flops=int(counter.get_total_flops()),
                forward_passes=passes)


class MembersAsEstimators(nn.Module):
    """Any project model (MIMO, a timm M = 1 model, a :class:`DeepEnsemble`) as the estimators of
    TorchUncertainty's ``ClassificationRoutine(model, num_classes, is_ensemble=True)``: ``forward`` returns
    the member logits as (M x B, K), member-major (rows m B .. (m + 1) B - 1 are member m), the layout its
    routine splits back into (B, M, K) and averages over members in probability."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._outputs = MemberOutputs(model)
        self.num_members = self._outputs.num_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        member_logits = self._outputs.members(self.model, x)  # (B, M, K)
        return member_logits.transpose(0, 1).reshape(-1, member_logits.shape[-1])
