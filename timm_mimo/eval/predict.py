"""Member and ensemble predictions, for MIMO models and any other timm model (the M = 1 case).

Every call goes through the model's ``__call__`` (``model(x, masks)``, ``model(x, members=True)``), so the
wrappers around it (DDP, FSDP, torch.compile) see every forward and gather what they shard themselves.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..mimo import MemberOutputs


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
