"""Accuracy, calibration and diversity metrics for MIMO ensembles (docs/methods/mixmo.md §6).

Every function is a vectorised torch function of full (already gathered) tensors, on whichever device
they live, and returns plain Python numbers:

    ensemble logits (N, K)     mean of the member logits by default (docs/methods/mixmo.md §4.4); p = softmax(logits)
    member logits   (N, M, K)  M = 1 for any plain timm model
    labels          (N,)       integer class indices

Functions that only need probabilities (ECE, Brier, AUC) also take probabilities directly with
``from_logits=False``. OOD detection, selective classification and adaptive / classwise ECE are in
:mod:`timm_mimo.eval.uncertainty`; the reliability diagram is drawn by :mod:`timm_mimo.eval.plots`.

Differences from the official MixMo metric code, all deliberate:
  * NLL uses ``log_softmax`` instead of ``log(p + 1e-12)``; the two agree unless p_y < 1e-12.
  * Brier is the standard multi-class score, mean_n Σ_c (p_c − onehot_c)²; MixMo's code divides it by
    K (docs/methods/mixmo.md §6.1: its 0.00205 on CIFAR-100 is 0.205 here).
  * Temperature scaling solves the 1-D problem exactly instead of MixMo's LBFGS with a closure that never
    zeroes gradients (docs/methods/mixmo.md §6.2); see :func:`fit_temperature`.
"""
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'check_scores', 'probabilities', 'topk_accuracy', 'nll', 'calibration_bins', 'ece_from_bins',
    'expected_calibration_error', 'brier_score', 'misclassification_auc', 'member_predictions', 'ratio_errors',
    'disagreement', 'classification_metrics', 'fit_temperature', 'temperature_scaled_metrics',
]

TS_SEED = 31  # docs/methods/mixmo.md §6.2: the official split of the test set uses seed 31


def check_scores(scores: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate (N, K) scores against (N,) labels; return float scores and long labels on one device. The
    metrics of this module and of ``uncertainty``, and the reliability diagram, all start here."""
    if scores.dim() != 2:
        raise ValueError(f'expected (N, K) logits or probabilities, got shape {tuple(scores.shape)}')
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f'expected ({scores.shape[0]},) labels, got shape {tuple(labels.shape)}')
    if scores.shape[0] == 0:
        raise ValueError('metrics need at least one sample')
    # half precision is too coarse for NLL/ECE sums; float64 stays float64
    scores = scores if scores.dtype == torch.float64 else scores.float()
    return scores, labels.to(device=scores.device, dtype=torch.long)


def probabilities(scores: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """Class probabilities from logits (``from_logits``) or probabilities given as they are."""
    return scores.softmax(dim=1) if from_logits else scores


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent (timm style); k is clipped to the number of classes."""
    logits, labels = check_scores(logits, labels)
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (topk == labels[:, None]).any(dim=1).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class, −log softmax(logits)_y (docs/methods/mixmo.md §6.1)."""
    logits, labels = check_scores(logits, labels)
    return F.cross_entropy(logits, labels).item()  # log_softmax inside: stable for huge logits


def calibration_bins(
        confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> Dict[str, torch.Tensor]:
    """Per-bin statistics of confidence vs accuracy: 15 equal-width bins on [0, 1] (docs/methods/mixmo.md §6.1).

    Bins are (lower, upper], as in MixMo's code; edges are i / num_bins in float64 and confidences are
    compared in float64, so a confidence exactly on an edge goes to the bin below it. A confidence of
    exactly 0 (only possible for hand-made probabilities) is put in the first bin.

    Returns float64 tensors ``edges`` (num_bins + 1,), ``count``, ``confidence`` (mean per bin) and
    ``accuracy`` (fraction correct per bin); the last two are NaN for empty bins.
    """
    if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    conf = confidences.detach().reshape(-1).double()
    correct = correct.detach().reshape(-1).to(device=conf.device, dtype=torch.float64)
    edges = torch.arange(num_bins + 1, dtype=torch.float64, device=conf.device) / num_bins
    # searchsorted (left) gives the first edge >= conf, so conf in (edges[i-1], edges[i]] -> bin i-1
    index = (torch.searchsorted(edges, conf.contiguous()) - 1).clamp_(0, num_bins - 1)
    count = torch.bincount(index, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, conf)
    correct_sum = torch.zeros_like(conf_sum).index_add_(0, index, correct)
    return {
        'edges': edges,
        'count': count,
        'confidence': conf_sum / count,  # 0 / 0 = NaN marks empty bins
        'accuracy': correct_sum / count,
    }


def ece_from_bins(bins: Dict[str, torch.Tensor]) -> float:
    """ECE of :func:`calibration_bins`' output: the count-weighted mean gap between confidence and accuracy."""
    count = bins['count']
    gap = (bins['confidence'] - bins['accuracy']).abs().nan_to_num(0.0)  # empty bins weigh 0
    return ((gap * count).sum() / count.sum()).item()


def expected_calibration_error(
        scores: torch.Tensor, labels: torch.Tensor, num_bins: int = 15, from_logits: bool = True) -> float:
    """ECE = Σ_bins |mean confidence − accuracy| · fraction of samples, over max-prob confidence
    (docs/methods/mixmo.md §6.1).

    A fraction in [0, 1] (MixMo reports it that way, e.g. 0.0229), not a percentage.
    """
    scores, labels = check_scores(scores, labels)
    conf, pred = probabilities(scores, from_logits).max(dim=1)
    return ece_from_bins(calibration_bins(conf, pred == labels, num_bins))


def brier_score(scores: torch.Tensor, labels: torch.Tensor, from_logits: bool = True) -> float:
    """Standard multi-class Brier score, mean over samples of Σ_c (p_c − onehot_c)², in [0, 2].

    MixMo's code reports this divided by the number of classes K (docs/methods/mixmo.md §6.1).
    """
    scores, labels = check_scores(scores, labels)
    probs = probabilities(scores, from_logits)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    # Σ_c (p_c − 1[c = y])² = Σ_c p_c² − 2 p_y + 1, without building the one-hot matrix
    return (probs.square().sum(1) - 2 * p_true + 1).mean().item()


def misclassification_auc(
        scores: torch.Tensor, labels: torch.Tensor, from_logits: bool = True) -> Optional[float]:
    """ROC-AUC of the confidence for telling correct from wrong predictions (docs/methods/mixmo.md §6.1 "AUC").

    Mann-Whitney statistic with tied confidences counted as one half; None when every prediction is
    correct or every one is wrong (the AUC is undefined then).
    """
    scores, labels = check_scores(scores, labels)
    conf, pred = probabilities(scores, from_logits).max(dim=1)
    correct = pred == labels
    num_pos = int(correct.sum())
    num_neg = correct.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    # average ranks (1-based) over ties: a value's rank is (#smaller) + (#equal + 1) / 2
    _, inverse, counts = torch.unique(conf.double(), return_inverse=True, return_counts=True)
    counts = counts.double()
    avg_rank = torch.cumsum(counts, 0) - counts + (counts + 1) / 2
    rank_sum = avg_rank[inverse][correct].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def member_predictions(member_outputs: torch.Tensor) -> torch.Tensor:
    """Class predictions (N, M) from member logits (N, M, K), or integer predictions (N, M) as given."""
    if member_outputs.dim() == 3:
        return member_outputs.argmax(dim=-1)
    if member_outputs.dim() == 2 and not member_outputs.is_floating_point():
        return member_outputs.long()
    raise ValueError(
        f'expected member logits (N, M, K) or integer member predictions (N, M), got '
        f'{tuple(member_outputs.shape)} {member_outputs.dtype}')


def _pair_indices(num_members: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    if num_members < 2:
        raise ValueError(f'diversity needs at least 2 members, got {num_members}')
    first, second = torch.triu_indices(num_members, num_members, offset=1, device=device)
    return first, second


def ratio_errors(member_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Ratio-errors diversity (Aksela 2003), averaged over member pairs (docs/methods/mixmo.md §6.1).

    For a pair, with fractions of samples N00 (both wrong) and N01 + N10 (exactly one wrong), the ratio is
    (N01 + N10) / N00, or 2·(N01 + N10) when the pair shares no error (N00 = 0), exactly as MixMo's code.
    Higher means the members make different mistakes. Takes (N, M, K) logits or (N, M) predictions.
    """
    preds = member_predictions(member_logits)
    labels = labels.to(preds.device).long()
    if labels.dim() != 1 or labels.shape[0] != preds.shape[0] or preds.shape[0] == 0:
        raise ValueError(f'expected ({preds.shape[0]},) labels, got shape {tuple(labels.shape)}')
    first, second = _pair_indices(preds.shape[1], preds.device)
    # error counts in float64 are exact integers (N < 2^53), so the N00 = 0 branch is decided exactly
    wrong = (preds != labels[:, None]).double()
    both_wrong = (wrong.T @ wrong)[first, second]
    errors = wrong.sum(0)
    one_wrong = errors[first] + errors[second] - 2 * both_wrong
    ratio = torch.where(
        both_wrong > 0, one_wrong / both_wrong.clamp_min(1.0), 2 * one_wrong / preds.shape[0])
    return ratio.mean().item()


def disagreement(member_logits: torch.Tensor) -> float:
    """Mean over member pairs of the fraction of samples whose predicted classes differ.

    Not in MixMo's shipped code (docs/methods/mixmo.md §6.1) but the usual MIMO diversity measure (Havasi et al. 2021).
    """
    preds = member_predictions(member_logits)
    if preds.shape[0] == 0:
        raise ValueError('metrics need at least one sample')
    first, second = _pair_indices(preds.shape[1], preds.device)
    # every pair sees the same N samples, so one mean over (N, pairs) is the mean of the pair means
    return (preds[:, first] != preds[:, second]).float().mean().item()


def classification_metrics(
        ensemble_logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        member_logits: Optional[torch.Tensor] = None,
        num_bins: int = 15,
) -> Dict[str, Any]:
    """All metrics of docs/methods/mixmo.md §6.1 for one evaluation set, from gathered tensors.

    ``ensemble_logits`` may be None when ``member_logits`` are given: it is then their mean
    (docs/methods/mixmo.md §4.4).
    Keys: ``top1``, ``top5``, ``member_top1`` (list), ``member_mean_top1`` (all in %), ``nll``, ``ece``,
    ``member_nll``, ``member_ece`` (lists), ``brier``, ``auc`` (None if undefined), and for M >= 2 members
    ``best_member_top1``, ``ensemble_gain`` (top1 − best member top1, in points), ``disagreement``,
    ``ratio_errors``; those four are None when there is a single member. Without ``member_logits`` the model
    counts as one member: member_top1 = [top1] (and its NLL and ECE).
    """
    if ensemble_logits is None:
        if member_logits is None:
            raise ValueError('need ensemble_logits or member_logits')
        ensemble_logits = member_logits.float().mean(dim=1)
    logits, labels = check_scores(ensemble_logits, labels)
    top1 = topk_accuracy(logits, labels, 1)
    metrics: Dict[str, Any] = {
        'top1': top1,
        'top5': topk_accuracy(logits, labels, 5),
        'nll': nll(logits, labels),
        'ece': expected_calibration_error(logits, labels, num_bins),
        'brier': brier_score(logits, labels),
        'auc': misclassification_auc(logits, labels),
    }
    if member_logits is None:
        member_top1, metrics['member_nll'], metrics['member_ece'] = [top1], [metrics['nll']], [metrics['ece']]
    else:
        if member_logits.dim() != 3 or member_logits.shape[0] != logits.shape[0]:
            raise ValueError(
                f'expected member logits ({logits.shape[0]}, M, K), got shape {tuple(member_logits.shape)}')
        preds = member_logits.argmax(dim=-1)
        member_top1 = (100.0 * (preds == labels.to(preds.device)[:, None]).float().mean(0)).tolist()
        members = member_logits.float().unbind(1)
        metrics['member_nll'] = [nll(m, labels) for m in members]
        metrics['member_ece'] = [expected_calibration_error(m, labels, num_bins) for m in members]
    metrics['member_top1'] = member_top1
    metrics['member_mean_top1'] = sum(member_top1) / len(member_top1)
    diverse = member_logits is not None and member_logits.shape[1] >= 2
    best = max(member_top1)
    metrics['best_member_top1'] = best if diverse else None
    metrics['ensemble_gain'] = top1 - best if diverse else None
    metrics['disagreement'] = disagreement(member_logits) if diverse else None
    metrics['ratio_errors'] = ratio_errors(member_logits, labels) if diverse else None
    return metrics


def fit_temperature(
        logits: torch.Tensor,
        labels: torch.Tensor,
        t_min: float = 1e-2,
        t_max: float = 1e2,
        max_iter: int = 100,
) -> float:
    """Temperature T in [t_min, t_max] minimising the NLL of softmax(logits / T) (docs/methods/mixmo.md §6.2).

    Instead of MixMo's LBFGS over an lr grid, this solves the 1-D problem exactly: in β = 1/T the mean NLL
    f(β) = mean[logsumexp(β z) − β z_y] is convex, with f'(β) = mean[E_p z − z_y] and
    f''(β) = mean[Var_p z] ≥ 0, so safeguarded Newton steps inside a shrinking bracket (bisection in
    log T when a step leaves it) reach the minimum in a few iterations, with no learning rate to tune.
    If the optimum lies beyond the range, the bound is returned. As in MixMo, T = 1 is returned when the
    fitted T does not lower the NLL.
    """
    logits, labels = check_scores(logits, labels)
    z = logits.double()  # float64: the Newton steps and the final NLL comparison need the precision
    z_true = z.gather(1, labels[:, None]).squeeze(1)

    def derivatives(beta: float) -> Tuple[float, float]:
        p = (beta * z).softmax(dim=1)
        mean_z = (p * z).sum(1)
        var_z = (p * z.square()).sum(1) - mean_z.square()
        return (mean_z - z_true).mean().item(), var_z.clamp_min(0).mean().item()

    lo, hi = 1.0 / t_max, 1.0 / t_min
    if derivatives(lo)[0] >= 0:  # NLL grows with β on the whole range: softest allowed
        beta = lo
    elif derivatives(hi)[0] <= 0:  # NLL still falls at the sharpest allowed β
        beta = hi
    else:
        beta = min(max(1.0, lo), hi)
        for _ in range(max_iter):
            grad, curv = derivatives(beta)
            if grad > 0:
                hi = beta
            else:
                lo = beta
            step = beta - grad / curv if curv > 0 else math.nan
            if abs(step - beta) <= 1e-10 * beta:  # Newton has converged (also when grad == 0)
                break
            if hi / lo - 1 < 1e-12:
                break
            beta = step if lo < step < hi else math.sqrt(lo * hi)  # bisect in log T outside the bracket
    temperature = 1.0 / beta
    if not F.cross_entropy(z / temperature, labels).item() < F.cross_entropy(z, labels).item():
        return 1.0
    return temperature


def temperature_scaled_metrics(
        logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        member_logits: Optional[torch.Tensor] = None,
        seed: int = TS_SEED,
        num_bins: int = 15,
) -> Dict[str, Any]:
    """Calibrated NLL / ECE / Brier with the two-fold protocol of docs/methods/mixmo.md §6.2.

    The set is split 50/50 by a permutation from ``seed`` (31, as MixMo); T is fitted on half A and the
    metrics evaluated on half B, then the halves swap; the calibrated metrics are the mean of the two
    halves and ``temperature`` the mean of the two fitted temperatures (both in ``temperatures``).
    Returns everything :func:`classification_metrics` returns on the full, unscaled set (top1 and the
    other accuracies do not depend on T) plus ``temperature``, ``temperatures``, ``nll_calibrated``,
    ``ece_calibrated`` and ``brier_calibrated``.
    """
    metrics = classification_metrics(logits, labels, member_logits, num_bins)
    if logits is None:
        logits = member_logits.float().mean(dim=1)
    logits, labels = check_scores(logits, labels)
    num = logits.shape[0]
    if num < 2:
        raise ValueError('temperature scaling needs at least 2 samples to split')
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the split is device-independent
    perm = torch.randperm(num, generator=generator).to(logits.device)
    halves = (perm[:num // 2], perm[num // 2:])
    temperatures, nlls, eces, briers = [], [], [], []
    for fit_idx, eval_idx in (halves, halves[::-1]):
        temperature = fit_temperature(logits[fit_idx], labels[fit_idx])
        scaled, eval_labels = logits[eval_idx] / temperature, labels[eval_idx]
        temperatures.append(temperature)
        nlls.append(nll(scaled, eval_labels))
        eces.append(expected_calibration_error(scaled, eval_labels, num_bins))
        briers.append(brier_score(scaled, eval_labels))
    metrics.update(
        temperature=sum(temperatures) / 2,
        temperatures=temperatures,
        nll_calibrated=sum(nlls) / 2,
        ece_calibrated=sum(eces) / 2,
        brier_calibrated=sum(briers) / 2,
    )
    return metrics

