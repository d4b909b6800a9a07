"""Out-of-distribution detection, selective classification and more calibration errors (docs/evaluation.md).

The companions of :mod:`timm_mimo.eval.metrics` for the evaluations TorchUncertainty reports. Vectorised torch
functions of full tensors (any device), plain Python numbers out; shapes as in :mod:`timm_mimo.eval.metrics`:
ensemble logits (N, K), member logits (N, M, K), labels (N,).

Uncertainty scores are per-sample tensors where *higher means more uncertain* (more likely OOD, rejected
first), so one convention serves OOD detection and the histograms:

    msp             1 - max_k p_k of the ensemble prediction (the maximum softmax probability, negated)
    entropy         predictive entropy  H(p) = -sum_k p_k log p_k of the ensemble prediction
    energy          -logsumexp_k z_k of the mean member logits z (Liu et al. 2020, the free energy)
    max_logit       -max_k z_k of the mean member logits z (Hendrycks et al. 2022)
    mutual_info     H(mean_m p_m) - mean_m H(p_m), the members' epistemic share (M >= 2)
    disagreement    fraction of member pairs whose top classes differ (M >= 2)

p is the softmax of the ensemble logits (the model's own prediction, docs/methods/mixmo.md §4.4: mean of member
logits); mutual information needs the mean of the member *probabilities* so that it is >= 0 (Jensen).
Energy and max-logit read logits, so they take the mean member logits whatever the ensemble rule (as
TorchUncertainty's criteria do): under the mean-probability rule the ensemble's "logits" are log-probabilities,
whose logsumexp is 0 for every sample.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .metrics import check_scores, probabilities

__all__ = [
    'predictive_entropy', 'mutual_information', 'member_disagreement', 'uncertainty_scores',
    'binary_curve', 'binary_auroc', 'average_precision', 'fpr_at_tpr', 'ood_detection_metrics',
    'risk_coverage_curve', 'selective_metrics', 'adaptive_calibration_error', 'classwise_calibration_error',
    'uncertainty_metrics', 'ood_metrics', 'member_ood_metrics', 'COVERAGES', 'SCORE_LABELS',
]

COVERAGES = (0.8, 0.9, 0.95)  # risk reported at these coverages (TorchUncertainty reports 80 %)
SCORE_LABELS = {
    'msp': '1 - maximum softmax probability',
    'entropy': 'predictive entropy',
    'energy': 'energy (-logsumexp of the logits)',
    'max_logit': '- maximum logit',
    'mutual_info': 'mutual information',
    'disagreement': 'member disagreement',
}


# --- per-sample uncertainty scores -------------------------------------------------------------------

def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dimension; 0 · log 0 = 0."""
    return torch.special.entr(probs.double()).sum(-1)


def mutual_information(member_logits: torch.Tensor) -> torch.Tensor:
    """(N,) mutual information between the prediction and the member: H(mean_m p_m) - mean_m H(p_m)."""
    if member_logits.dim() != 3:
        raise ValueError(f'expected member logits (N, M, K), got shape {tuple(member_logits.shape)}')
    member_probs = member_logits.double().softmax(-1)
    # clamp: the difference of two nearly equal entropies can dip below 0 by rounding
    return (predictive_entropy(member_probs.mean(1)) - predictive_entropy(member_probs).mean(1)).clamp_min(0)


def member_disagreement(member_logits: torch.Tensor) -> torch.Tensor:
    """(N,) fraction of the M (M - 1) / 2 member pairs whose top classes differ (0 when all agree)."""
    if member_logits.dim() != 3 or member_logits.shape[1] < 2:
        raise ValueError(f'disagreement needs member logits (N, M >= 2, K), got {tuple(member_logits.shape)}')
    num, members, classes = member_logits.shape
    votes = torch.zeros(num, classes, dtype=torch.float64, device=member_logits.device)
    votes.scatter_add_(1, member_logits.argmax(-1), torch.ones(num, members, dtype=torch.float64,
                                                                device=member_logits.device))
    # pairs that agree: sum over classes of C(n_c, 2)
    agreeing = (votes * (votes - 1) / 2).sum(1)
    return 1 - agreeing / (members * (members - 1) / 2)


def uncertainty_scores(logits: torch.Tensor, member_logits: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """All scores of the module docstring for one set; the member scores only when M >= 2. Energy and
    max-logit read the mean of ``member_logits`` when given, else ``logits``."""
    probs = logits.double().softmax(-1)
    mean_logits = (member_logits.double().mean(1) if member_logits is not None and member_logits.dim() == 3
                   else logits.double())
    scores = {'msp': 1 - probs.max(-1).values, 'entropy': predictive_entropy(probs),
              'energy': -mean_logits.logsumexp(-1), 'max_logit': -mean_logits.max(-1).values}
    if member_logits is not None and member_logits.dim() == 3 and member_logits.shape[1] >= 2:
        scores['mutual_info'] = mutual_information(member_logits)
        scores['disagreement'] = member_disagreement(member_logits)
    return scores


# --- binary detection: ROC, precision-recall --------------------------------------------------------

def binary_curve(scores: torch.Tensor, positive: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cumulative (true positives, false positives) at each distinct threshold, highest score first.

    A threshold t accepts the samples with score >= t; tied scores enter together, so the curves (and the
    areas below) do not depend on the order of ties. float64 counts.
    """
    scores = scores.detach().reshape(-1).double()
    positive = positive.detach().reshape(-1).to(device=scores.device, dtype=torch.float64)
    if scores.numel() != positive.numel():
        raise ValueError(f'{scores.numel()} scores but {positive.numel()} labels')
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order], positive[order]
    # the last index of each run of equal scores is one operating point
    last = torch.cat([(scores[1:] != scores[:-1]).nonzero().flatten(),
                      torch.tensor([scores.numel() - 1], device=scores.device)])
    tps = positive.cumsum(0)[last]
    return tps, (last + 1).double() - tps


def _both_classes(positive: torch.Tensor) -> Tuple[int, int]:
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError('detection metrics need both positive and negative samples')
    return num_pos, num_neg


def binary_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoids between operating points = Mann-Whitney with ties as 1/2)."""
    tps, fps = binary_curve(scores, positive)
    num_pos, num_neg = _both_classes(positive)
    tpr = torch.cat([tps.new_zeros(1), tps / num_pos])
    fpr = torch.cat([fps.new_zeros(1), fps / num_neg])
    return torch.trapezoid(tpr, fpr).item()


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the precision-recall curve as the step sum  sum_i (R_i - R_{i-1}) P_i  (no interpolation)."""
    tps, fps = binary_curve(scores, positive)
    num_pos, _ = _both_classes(positive)
    recall = tps / num_pos
    precision = tps / (tps + fps)
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum().item()


def fpr_at_tpr(scores: torch.Tensor, positive: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches ``tpr``."""
    if not 0 < tpr <= 1:
        raise ValueError(f'tpr must be in (0, 1], got {tpr}')
    tps, fps = binary_curve(scores, positive)
    num_pos, num_neg = _both_classes(positive)
    # the 1e-12 absorbs float rounding of tpr itself (0.95 * 20 positives must count 19 as enough)
    reached = (tps / num_pos >= tpr - 1e-12).nonzero().flatten()[0]
    return (fps[reached] / num_neg).item()


def ood_detection_metrics(uncertainty_in: torch.Tensor, uncertainty_out: torch.Tensor) -> Dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95 % TPR of one uncertainty score (higher = more OOD).

    AUROC and AUPR-out take the OOD samples as positives ranked by the score; AUPR-in takes the
    in-distribution samples as positives ranked by the negated score. FPR95 follows the OOD literature
    (Hendrycks & Gimpel 2017, OpenOOD): the share of OOD samples accepted as in-distribution at the
    threshold that keeps 95 % of the in-distribution samples. All in [0, 1]; AUROC 0.5 = chance.
    """
    scores = torch.cat([uncertainty_in.reshape(-1).double(), uncertainty_out.reshape(-1).double().to(
        uncertainty_in.device)])
    is_out = torch.cat([torch.zeros(uncertainty_in.numel(), device=scores.device),
                        torch.ones(uncertainty_out.numel(), device=scores.device)])
    return {
        'auroc': binary_auroc(scores, is_out),
        'aupr_in': average_precision(-scores, 1 - is_out),
        'aupr_out': average_precision(scores, is_out),
        'fpr95': fpr_at_tpr(-scores, 1 - is_out, 0.95),
    }


# --- selective classification -------------------------------------------------------------------------

def risk_coverage_curve(confidence: torch.Tensor, correct: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(coverage k / N, risk = error rate of the k most confident) for k = 1 .. N, float64.

    Tied confidences share their errors evenly (the expected curve over the order of the ties), so the
    curve is a function of the scores, not of the sort's tie-breaking.
    """
    confidence = confidence.detach().reshape(-1).double()
    errors = 1 - correct.detach().reshape(-1).to(device=confidence.device, dtype=torch.float64)
    num = confidence.numel()
    if num == 0:
        raise ValueError('selective classification needs at least one sample')
    order = torch.argsort(confidence, descending=True, stable=True)
    confidence, errors = confidence[order], errors[order]
    _, group, counts = torch.unique_consecutive(confidence, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(counts.numel(), dtype=torch.float64, device=errors.device).index_add_(0, group, errors)
    errors = (group_errors / counts)[group]
    kept = torch.arange(1, num + 1, dtype=torch.float64, device=errors.device)
    return kept / num, errors.cumsum(0) / kept


def selective_metrics(scores: torch.Tensor, labels: torch.Tensor, from_logits: bool = True,
                      coverages: Sequence[float] = COVERAGES) -> Dict[str, float]:
    """AURC, AUGRC and the risk at ``coverages`` when rejecting the least confident (MSP) predictions first.

    AURC = mean_k risk(k / N) (Geifman & El-Yaniv 2017); AUGRC = mean_k (k / N) risk(k / N), the area under
    the generalised risk (the joint probability of being accepted and wrong, Traub et al. 2024). Risk at
    coverage c: the error rate of the ceil(c N) most confident samples (c N is rounded down first when it is
    within 1e-9 of an integer, so 0.9 · 30 keeps 27, not 28). All in [0, 1]; lower is better.
    """
    scores, labels = check_scores(scores, labels)
    conf, pred = probabilities(scores, from_logits).max(dim=1)
    coverage, risk = risk_coverage_curve(conf, pred == labels)
    num = risk.numel()
    metrics = {'aurc': risk.mean().item(), 'augrc': (coverage * risk).mean().item()}
    for c in coverages:
        metrics[f'risk_at_{round(100 * c)}'] = risk[max(math.ceil(c * num - 1e-9), 1) - 1].item()
    return metrics


# --- calibration beyond equal-width top-label ECE ---------------------------------------------------------

def adaptive_calibration_error(scores: torch.Tensor, labels: torch.Tensor, num_bins: int = 15,
                               from_logits: bool = True) -> float:
    """Equal-mass ECE: the confidence-sorted samples cut into ``num_bins`` bins of (almost) equal count.

    With N = q · num_bins + r the first r bins hold q + 1 samples, the rest q (``torch.tensor_split``), as in
    TorchUncertainty's ``AdaptiveCalibrationError``; ECE = sum_b |sum_{i in b} (correct_i - conf_i)| / N.
    """
    if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    scores, labels = check_scores(scores, labels)
    conf, pred = probabilities(scores, from_logits).max(dim=1)
    conf = conf.double()
    order = torch.argsort(conf, stable=True)
    gap = (pred == labels).double()[order] - conf[order]
    num = gap.numel()
    small, extra = divmod(num, num_bins)
    position = torch.arange(num, device=gap.device)
    # positions below extra * (small + 1) sit in the larger bins
    big_span = extra * (small + 1)
    bin_index = torch.where(position < big_span, position // (small + 1),
                            extra + (position - big_span) // max(small, 1))
    per_bin = torch.zeros(num_bins, dtype=torch.float64, device=gap.device).index_add_(0, bin_index, gap)
    return (per_bin.abs().sum() / num).item()


def classwise_calibration_error(scores: torch.Tensor, labels: torch.Tensor, num_bins: int = 15,
                                from_logits: bool = True) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes k of the equal-width ECE of p_k against 1[y = k].

    Bins are (lower, upper] like :func:`timm_mimo.eval.metrics.calibration_bins`; every class's ECE weighs its
    bins by their share of all N samples.
    """
    if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    scores, labels = check_scores(scores, labels)
    probs = probabilities(scores, from_logits).double()
    num, classes = probs.shape
    edges = torch.arange(num_bins + 1, dtype=torch.float64, device=probs.device) / num_bins
    index = (torch.searchsorted(edges, probs.reshape(-1).contiguous()) - 1).clamp_(0, num_bins - 1)
    index = index.view(num, classes) + num_bins * torch.arange(classes, device=probs.device)
    gap = torch.nn.functional.one_hot(labels, classes).double() - probs
    per_bin = torch.zeros(classes * num_bins, dtype=torch.float64, device=probs.device)
    per_bin.index_add_(0, index.reshape(-1), gap.reshape(-1))
    return (per_bin.abs().sum() / (num * classes)).item()


# --- one call per evaluated set ------------------------------------------------------------------------

def uncertainty_metrics(logits: torch.Tensor, labels: torch.Tensor, member_logits: Optional[torch.Tensor] = None,
                        num_bins: int = 15) -> Dict[str, object]:
    """Selective classification and calibration metrics of one set (keys of :func:`selective_metrics` plus
    ``ece_adaptive``, ``ece_classwise`` and, with member logits, ``member_ece_adaptive``; ``member_ece`` is
    :func:`timm_mimo.eval.metrics.classification_metrics`'s)."""
    metrics: Dict[str, object] = dict(selective_metrics(logits, labels))
    metrics['ece_adaptive'] = adaptive_calibration_error(logits, labels, num_bins)
    metrics['ece_classwise'] = classwise_calibration_error(logits, labels, num_bins)
    if member_logits is not None and member_logits.dim() == 3:
        members = member_logits.unbind(1)
        metrics['member_ece_adaptive'] = [adaptive_calibration_error(m, labels, num_bins) for m in members]
    return metrics


def ood_metrics(logits_in: torch.Tensor, logits_out: torch.Tensor, members_in: Optional[torch.Tensor] = None,
                members_out: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
    """{score name: :func:`ood_detection_metrics`} for every score both sets have."""
    scores_in = uncertainty_scores(logits_in, members_in)
    scores_out = uncertainty_scores(logits_out, members_out)
    return {name: ood_detection_metrics(scores_in[name], scores_out[name])
            for name in scores_in if name in scores_out}


def member_ood_metrics(members_in: torch.Tensor, members_out: torch.Tensor) -> Dict[str, List[Dict[str, float]]]:
    """{score name: [:func:`ood_detection_metrics` of member 0, member 1, ...]} for the single-network scores
    (MSP, entropy, energy, max-logit) of each member alone: how well one member detects what the ensemble does."""
    if members_in.dim() != 3 or members_out.dim() != 3 or members_in.shape[1] != members_out.shape[1]:
        raise ValueError(f'expected member logits (N, M, K) of as many members, got {tuple(members_in.shape)} '
                         f'and {tuple(members_out.shape)}')
    per_member = [ood_metrics(member_in, member_out)
                  for member_in, member_out in zip(members_in.unbind(1), members_out.unbind(1))]
    return {score: [metrics[score] for metrics in per_member] for score in per_member[0]}
