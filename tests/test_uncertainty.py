"""timm_mimo.eval.uncertainty: known values per metric, then agreement with torchmetrics / TorchUncertainty.

Library agreement runs on random predictions here and on a trained model's predictions in
tests/test_validate_ood.py. Where a library defines a metric differently, the test converts between the
two definitions and says how (docs/evaluation.md has the same notes).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_mimo.eval.metrics import brier_score, classification_metrics, expected_calibration_error, misclassification_auc, nll
from timm_mimo.eval.uncertainty import (
    adaptive_calibration_error, average_precision, binary_auroc, classwise_calibration_error, fpr_at_tpr,
    member_disagreement, member_ood_metrics, mutual_information, ood_detection_metrics, ood_metrics,
    predictive_entropy,
    risk_coverage_curve, selective_metrics, uncertainty_metrics, uncertainty_scores)

ATOL = 1e-5


# --- scores -----------------------------------------------------------------------------------------------

def test_predictive_entropy_known_values():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert predictive_entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


def test_mutual_information_known_values():
    sure = 50.0 * F.one_hot(torch.tensor([[0, 1], [2, 2]]), 3).float()  # (N=2, M=2, K=3)
    # row 0: two certain members on different classes: H(mean) = log 2, mean H = 0; row 1: they agree
    assert mutual_information(sure).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-9)
    # identical uncertain members carry no epistemic part however high the entropy
    same = torch.zeros(1, 3, 5)
    assert mutual_information(same).item() == pytest.approx(0.0, abs=1e-12)
    assert predictive_entropy(same.softmax(-1).mean(1)).item() == pytest.approx(math.log(5))


def test_member_disagreement_counts_disagreeing_pairs():
    preds = torch.tensor([[0, 0, 1], [2, 2, 2], [0, 1, 2]])  # (N, M = 3) top classes
    logits = 10.0 * F.one_hot(preds, 3).float()
    # pairs (0,1) (0,2) (1,2): row 0 disagrees on 2 of 3, row 1 on none, row 2 on all
    assert member_disagreement(logits).tolist() == pytest.approx([2 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match='M >= 2'):
        member_disagreement(logits[:, :1])


SINGLE_SCORES = {'msp', 'entropy', 'energy', 'max_logit'}


def test_uncertainty_scores_member_scores_only_for_several_members():
    logits = torch.randn(6, 4)
    assert set(uncertainty_scores(logits)) == SINGLE_SCORES
    assert set(uncertainty_scores(logits, logits[:, None])) == SINGLE_SCORES
    both = uncertainty_scores(logits, torch.randn(6, 2, 4))
    assert set(both) == SINGLE_SCORES | {'mutual_info', 'disagreement'}
    assert torch.allclose(both['msp'], 1 - logits.double().softmax(-1).max(-1).values)


def test_energy_and_max_logit_known_values_read_the_mean_member_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    scores = uncertainty_scores(logits)
    # energy -logsumexp: four equal logits give -log 4; higher = more uncertain, like every score
    assert scores['energy'].tolist() == pytest.approx([-math.log(4), -torch.logsumexp(logits[1], 0).item()])
    assert scores['max_logit'].tolist() == pytest.approx([0.0, -2.0])
    # under the mean-prob rule the ensemble "logits" are log-probabilities (logsumexp 0 for every sample):
    # energy and max-logit take the mean member logits instead, so they still tell samples apart
    members = torch.stack([logits, 3 * logits], dim=1)  # (N, M = 2, K)
    log_mean_prob = members.softmax(-1).mean(1).log()
    scores = uncertainty_scores(log_mean_prob, members)
    assert torch.allclose(scores['energy'], -(2 * logits).logsumexp(-1))
    assert torch.allclose(scores['max_logit'], -(2 * logits).max(-1).values)
    assert torch.allclose(scores['msp'], 1 - members.softmax(-1).mean(1).max(-1).values)


def test_member_ood_metrics_score_each_member_alone():
    gen = torch.Generator().manual_seed(5)
    members_in = 3 * torch.randn(50, 3, 6, generator=gen, dtype=torch.float64)
    members_out = torch.randn(40, 3, 6, generator=gen, dtype=torch.float64)
    members_out[:, 1] *= 3  # member 1 is as confident on the OOD set as on the in-distribution one
    per_member = member_ood_metrics(members_in, members_out)
    assert set(per_member) == SINGLE_SCORES and all(len(v) == 3 for v in per_member.values())
    for m in range(3):
        assert per_member['energy'][m] == ood_metrics(members_in[:, m], members_out[:, m])['energy']
    assert per_member['msp'][0]['auroc'] > 0.8 and per_member['msp'][1]['auroc'] < 0.7
    with pytest.raises(ValueError, match='as many members'):
        member_ood_metrics(members_in, members_out[:, :2])


# --- detection --------------------------------------------------------------------------------------------

def test_auroc_and_average_precision_known_values():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([0, 0, 1, 1])
    # pairs (pos, neg): 0.35 > 0.1, 0.35 < 0.4, 0.8 beats both -> 3 of 4
    assert binary_auroc(scores, positive) == pytest.approx(0.75)
    # thresholds 0.8 (P 1, R 1/2), 0.4 (P 1/2, R 1/2), 0.35 (P 2/3, R 1): 1/2 · 1 + 1/2 · 2/3
    assert average_precision(scores, positive) == pytest.approx(5 / 6)


def test_detection_ties_count_one_half_and_enter_together():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    positive = torch.tensor([1, 0, 1, 0])
    assert binary_auroc(scores, positive) == pytest.approx(0.5)
    assert average_precision(scores, positive) == pytest.approx(0.5)  # one operating point: P 1/2, R 1
    # the order of tied samples does not matter
    assert binary_auroc(scores, positive.flip(0)) == binary_auroc(scores, positive)


def test_fpr_at_tpr_known_values():
    # 20 positives at 1..20, negatives at 0.5 and 18.5: reaching 19 of 20 positives (95 %) needs t = 2
    positive_scores = torch.arange(1, 21).double()
    scores = torch.cat([positive_scores, torch.tensor([0.5, 18.5])])
    positive = torch.cat([torch.ones(20), torch.zeros(2)])
    assert fpr_at_tpr(scores, positive, 0.95) == pytest.approx(0.5)
    assert fpr_at_tpr(scores, positive, 0.10) == pytest.approx(0.0)  # t = 19 keeps 2 positives, no negative
    assert fpr_at_tpr(scores, positive, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fpr_at_tpr(scores, positive, 0.0)


def test_ood_detection_metrics_perfect_reversed_and_one_sided():
    low, high = torch.linspace(0, 1, 50), torch.linspace(2, 3, 30)
    perfect = ood_detection_metrics(low, high)  # OOD samples more uncertain than every ID sample
    assert perfect == pytest.approx({'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0, 'fpr95': 0.0})
    reversed_ = ood_detection_metrics(high, low)
    assert reversed_['auroc'] == pytest.approx(0.0) and reversed_['fpr95'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match='both positive and negative'):
        ood_detection_metrics(low, low[:0])


# --- selective classification ---------------------------------------------------------------------------

def test_risk_coverage_curve_and_areas_known_values():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0])  # correct, wrong, correct, wrong; confidences 0.9 0.8 0.7 0.6
    coverage, risk = risk_coverage_curve(probs.max(1).values, probs.argmax(1) == labels)
    assert coverage.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    metrics = selective_metrics(probs, labels, from_logits=False)
    assert metrics['aurc'] == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert metrics['augrc'] == pytest.approx((0.25 * 0 + 0.5 * 0.5 + 0.75 / 3 + 0.5) / 4)
    # ceil(0.8 · 4) = 4 samples, ceil(0.5 · 4) = 2
    assert metrics['risk_at_80'] == pytest.approx(0.5)
    assert selective_metrics(probs, labels, from_logits=False, coverages=(0.5,))['risk_at_50'] == 0.5


def test_risk_coverage_ties_share_their_errors():
    coverage, risk = risk_coverage_curve(torch.tensor([0.9, 0.9, 0.5]), torch.tensor([True, False, True]))
    # either order of the tied pair is equally likely: expected risk 1/2 at one sample
    assert risk.tolist() == pytest.approx([0.5, 0.5, 1 / 3])


def test_risk_at_coverage_takes_the_ceiling():
    conf = torch.linspace(1, 0.55, 20, dtype=torch.float64)  # most confident first, all predicting class 0
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(20, dtype=torch.long)
    labels[18] = 1  # the 19th most confident is wrong
    metrics = selective_metrics(probs, labels, from_logits=False)
    assert metrics['risk_at_90'] == 0.0  # 18 samples
    assert metrics['risk_at_95'] == pytest.approx(1 / 19)  # 19 samples, not 20
    # 0.9 · 30 is 27.000000000000004 in floating point: still 27 samples, not 28
    conf30 = torch.linspace(1, 0.55, 30, dtype=torch.float64)
    labels30 = torch.zeros(30, dtype=torch.long)
    labels30[27] = 1  # the 28th most confident is wrong
    assert selective_metrics(torch.stack([conf30, 1 - conf30], 1), labels30, from_logits=False)['risk_at_90'] == 0.0


# --- calibration ------------------------------------------------------------------------------------------

def test_adaptive_ece_equal_mass_bins_known_values():
    # confidences 0.6 0.7 | 0.8 0.9 (2 bins of 2); correct: 1 0 | 1 1
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0])
    # bin 1: |1 - 1.3| = 0.3, bin 2: |2 - 1.7| = 0.3  ->  0.6 / 4
    assert adaptive_calibration_error(probs, labels, num_bins=2, from_logits=False) == pytest.approx(0.15)
    # 5 samples in 2 bins: sizes 3 and 2 (tensor_split); add a wrong one at 0.95
    probs5 = torch.cat([probs, torch.tensor([[0.05, 0.95]], dtype=torch.float64)])
    labels5 = torch.tensor([0, 0, 0, 0, 0])
    # bin 1 (0.6 0.7 0.8; correct 1 0 1): |2 - 2.1| = 0.1; bin 2 (0.9, 0.95; 1 0): |1 - 1.85| = 0.85
    assert adaptive_calibration_error(probs5, labels5, num_bins=2, from_logits=False) == pytest.approx(0.19)
    # more bins than samples: one sample per bin, the mean |correct - conf|
    assert adaptive_calibration_error(probs, labels, num_bins=10, from_logits=False) == pytest.approx(
        (0.4 + 0.7 + 0.2 + 0.1) / 4)


def test_classwise_ece_known_values():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    # 2 bins (0, 0.5], (0.5, 1]. class 0: bin 2 {0.75, y=1}: 0.25; bin 1 {0.25, y=1}: 0.75 -> (0.25+0.75)/2
    # class 1: bin 1 {0.25, y=0}: 0.25; bin 2 {0.75, y=0}: 0.75 -> 0.5; mean over classes 0.5
    assert classwise_calibration_error(probs, labels, num_bins=2, from_logits=False) == pytest.approx(0.5)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert classwise_calibration_error(perfect, torch.tensor([0, 1]), from_logits=False) == 0.0


def test_uncertainty_metrics_keys_and_member_ece():
    gen = torch.Generator().manual_seed(3)
    members = torch.randn(40, 2, 5, generator=gen)
    labels = torch.randint(0, 5, (40,), generator=gen)
    metrics = uncertainty_metrics(members.mean(1), labels, members)
    assert set(metrics) == {'aurc', 'augrc', 'risk_at_80', 'risk_at_90', 'risk_at_95', 'ece_adaptive',
                            'ece_classwise', 'member_ece_adaptive'}
    # each member's ECE and NLL come with its top-1, from classification_metrics (train.py's report reads them)
    plain = classification_metrics(None, labels, members)
    assert plain['member_ece'][1] == pytest.approx(expected_calibration_error(members[:, 1], labels))
    assert plain['member_nll'][0] == pytest.approx(nll(members[:, 0], labels))
    assert plain['member_nll'][0] != pytest.approx(plain['member_nll'][1])
    scores = ood_metrics(members.mean(1), members.mean(1) * 0.1, members, members * 0.1)
    assert set(scores) == SINGLE_SCORES | {'mutual_info', 'disagreement'}
    # shrunken logits are less confident everywhere: MSP and entropy rank every OOD sample higher
    assert scores['msp']['auroc'] == 1.0 and scores['entropy']['auroc'] == 1.0


# --- agreement with maintained libraries ----------------------------------------------------------------

def random_predictions(seed, num=1000, members=3, classes=10):
    gen = torch.Generator().manual_seed(seed)
    member_logits = 2.0 * torch.randn(num, members, classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (num,), generator=gen)
    # make the ensemble better than chance so calibration and selection are not all degenerate
    member_logits[torch.arange(num), :, labels] += 1.5
    return member_logits, labels


def check_against_libraries(logits, member_logits, labels, ood_logits, ood_member_logits):
    """Every metric both we and torchmetrics / TorchUncertainty compute, to 1e-5; shared with the CLI test."""
    import torchmetrics.functional.classification as tmf

    logits, member_logits = logits.double(), member_logits.double()
    probs = logits.softmax(-1)
    classes = probs.shape[1]
    # equal-width ECE: torchmetrics' bins are [lower, upper), ours (lower, upper]: they differ only for a
    # confidence exactly on an edge, which continuous predictions never hit
    assert expected_calibration_error(logits, labels) == pytest.approx(
        tmf.multiclass_calibration_error(probs, labels, classes, n_bins=15).item(), abs=ATOL)
    correct = probs.argmax(1) == labels
    if 0 < int(correct.sum()) < correct.numel():
        assert misclassification_auc(logits, labels) == pytest.approx(
            tmf.binary_auroc(probs.max(1).values, correct.long()).item(), abs=ATOL)
    assert nll(logits, labels) == pytest.approx(F.nll_loss(probs.log(), labels).item(), abs=ATOL)

    # OOD detection: torchmetrics' AUROC / average precision with OOD as the positive class (AUPR-in: ID
    # positive, negated score)
    scores = uncertainty_scores(logits, member_logits)
    ood = ood_metrics(logits, ood_logits.double(), member_logits, ood_member_logits.double())
    ood_scores = uncertainty_scores(ood_logits.double(), ood_member_logits.double())
    is_out = torch.cat([torch.zeros(len(labels)), torch.ones(len(ood_logits))]).long()
    joined = {name: torch.cat([scores[name], ood_scores[name]]) for name in ood}
    for name, values in ood.items():
        both = joined[name]
        assert values['auroc'] == pytest.approx(tmf.binary_auroc(both, is_out).item(), abs=ATOL), name
        assert values['aupr_out'] == pytest.approx(tmf.binary_average_precision(both, is_out).item(), abs=ATOL)
        assert values['aupr_in'] == pytest.approx(tmf.binary_average_precision(-both, 1 - is_out).item(), abs=ATOL)

    for_tu = pytest.importorskip('torch_uncertainty.metrics', reason='TorchUncertainty is optional')
    brier = for_tu.BrierScore(num_classes=classes)  # also a sum over classes (MixMo's code divides by K)
    brier.update(probs, labels)
    assert brier_score(logits, labels) == pytest.approx(brier.compute().item(), abs=ATOL)

    ace = for_tu.AdaptiveCalibrationError(task='multiclass', num_classes=classes, num_bins=15)
    ace.update(probs, labels)
    assert adaptive_calibration_error(logits, labels) == pytest.approx(ace.compute().item(), abs=ATOL)
    cw = for_tu.ClasswiseCalibrationError(num_classes=classes, num_bins=15)
    cw.update(probs, labels)
    assert classwise_calibration_error(logits, labels) == pytest.approx(cw.compute().item(), abs=ATOL)

    ours = selective_metrics(logits, labels)
    _, risk = risk_coverage_curve(probs.max(1).values, correct)
    num = risk.numel()
    coverage = torch.arange(1, num + 1, dtype=torch.float64) / num
    for key, metric, curve in (('aurc', for_tu.AURC(), risk), ('augrc', for_tu.AUGRC(), coverage * risk)):
        metric.update(probs, labels)
        # TorchUncertainty integrates by trapezoids from coverage 1/N to 1, divided by (1 - 1/N); ours is the
        # mean over the N operating points. Convert: mean = (TU · (N - 1) + (first + last) / 2) / N
        converted = (metric.compute().item() * (num - 1) + (curve[0] + curve[-1]).item() / 2) / num
        assert ours[key] == pytest.approx(converted, abs=ATOL), key
    for coverage_level in (0.8, 0.9, 0.95):
        metric = for_tu.RiskAtxCov(coverage_level)
        metric.update(probs, labels)
        assert ours[f'risk_at_{round(100 * coverage_level)}'] == pytest.approx(metric.compute().item(), abs=ATOL)

    member_probs = member_logits.softmax(-1)
    mi = for_tu.MutualInformation(reduction='none')
    mi.update(member_probs)
    assert torch.allclose(scores['mutual_info'], mi.compute().double(), atol=ATOL)
    disagreement = for_tu.Disagreement(reduction='none')
    disagreement.update(member_probs)
    assert torch.allclose(scores['disagreement'], disagreement.compute().double(), atol=ATOL)
    # energy and max-logit: TorchUncertainty's criteria on the (N, M, K) member logits (they average them)
    from torch_uncertainty.ood_criteria import EnergyCriterion, MaxLogitCriterion
    for name, criterion in (('energy', EnergyCriterion()), ('max_logit', MaxLogitCriterion())):
        assert torch.allclose(scores[name], criterion(member_logits), atol=ATOL), name
        single = member_logits[:, 0]  # one network: its logits as one estimator
        assert torch.allclose(uncertainty_scores(single)[name], criterion(single[:, None]), atol=ATOL), name
    # FPR95: TorchUncertainty's FPR95 with the in-distribution set as the positive class (its routine
    # takes OOD as positive, i.e. reports the share of ID samples flagged when 95 % of OOD are caught)
    for name, values in ood.items():
        fpr = for_tu.FPR95(pos_label=0)
        fpr.update(-joined[name], is_out)
        assert values['fpr95'] == pytest.approx(fpr.compute().item(), abs=ATOL), name


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_equal_torchmetrics_and_torch_uncertainty_on_random_predictions(seed):
    member_logits, labels = random_predictions(seed)
    ood_members, _ = random_predictions(seed + 100, num=700)
    check_against_libraries(member_logits.mean(1), member_logits, labels, ood_members.mean(1) * 0.7,
                            ood_members * 0.7)
