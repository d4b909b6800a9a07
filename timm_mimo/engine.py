"""Member and ensemble predictions, for MIMO models and any other timm model (the M = 1 case).

Every call goes through the model's ``__call__`` (``model(x, masks)``, ``model(x, members=True)``), so the
wrappers around it (DDP, FSDP, torch.compile) see every forward and gather what they shard themselves.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .mimo import ensemble_logits


def is_mimo(model: nn.Module) -> bool:
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


@torch.no_grad()
def collect_predictions(model: nn.Module, loader, outputs: Optional[MemberOutputs] = None, accelerator=None):
    """(ensemble logits, member logits, labels) over a loader, gathered across processes with ``accelerator``.

    ``outputs``: how ``model`` (possibly wrapped) gives member logits; by default read from ``model`` itself.
    """
    outputs = outputs or MemberOutputs(model)
    model.eval()
    ensembles, members, labels = [], [], []
    for images, targets in loader:
        ens, mem = outputs.predict(model, images)
        ens, mem = ens.float(), mem.float()
        if accelerator is not None:
            ens, mem, targets = accelerator.gather_for_metrics((ens, mem, targets))
        ensembles.append(ens.cpu())
        members.append(mem.cpu())
        labels.append(targets.cpu())
    return torch.cat(ensembles), torch.cat(members), torch.cat(labels)
