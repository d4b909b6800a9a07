"""The MIMO training loss: every member's soft-target cross-entropy, summed over the members."""
import torch
from timm.loss import SoftTargetCrossEntropy


class MemberSoftTargetCrossEntropy(torch.nn.Module):
    """Sum over members of timm's soft-target cross-entropy (mean over the batch), docs/methods/mixmo.md §2.2.

    Takes member logits (B, M, K) and targets (B, M, K) that already carry the MixMo weights.
    """

    def __init__(self):
        super().__init__()
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, member_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_members = member_logits.shape[1]
        return self.soft_ce(member_logits.flatten(0, 1), targets.flatten(0, 1)) * num_members
