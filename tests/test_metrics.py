"""Metrics of docs/methods/mixmo.md §6: known values, calibration properties, temperature scaling, CIFAR-C reading."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from timm_mimo.data.corruptions import CorruptionDataset
from timm_mimo.eval.plots import reliability_diagram
from timm_mimo.eval.metrics import (
    brier_score, calibration_bins, classification_metrics, disagreement, expected_calibration_error,
    fit_temperature, misclassification_auc, nll, ratio_errors, temperature_scaled_metrics,
    topk_accuracy)


def one_hot_logits(preds, num_classes=4):
    """Logits whose argmax is ``preds`` (any shape)."""
    return 5.0 * F.one_hot(torch.as_tensor(preds), num_classes).float()


def calibrated_logits(num=4000, num_classes=10, temperature=2.0, seed=0):
    """Logits z with labels drawn from softmax(z / temperature): z is calibrated at that temperature."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(num, num_classes, generator=gen)
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=gen).squeeze(1)
    return logits, labels


# --- accuracy, NLL, Brier -------------------------------------------------------------------------------

def test_topk_accuracy_known_values_and_k_clipped_to_classes():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.9, 0.05, 0.03, 0.02], [0.3, 0.2, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(100.0)  # 1 is 2nd of row 2, 0 is 2nd of row 3
    assert topk_accuracy(logits, torch.tensor([2, 3, 3]), 3) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, labels, 5) == 100.0  # K = 4 < 5


def test_nll_known_values_and_stable_for_huge_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    assert nll(logits, torch.tensor([0, 1])) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    assert nll(torch.tensor([[1000.0, 0.0]]), torch.tensor([1])) == pytest.approx(1000.0)


def test_brier_known_values_standard_not_divided_by_classes():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], dtype=torch.float64)
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.5² + 0.5² + 1²) = 1.5
    assert brier_score(probs, torch.tensor([0, 2]), from_logits=False) == pytest.approx(0.82)
    # uniform over 4 classes: (3/4)² + 3 · (1/4)² = 0.75 (MixMo's code would report 0.75 / 4)
    assert brier_score(torch.zeros(3, 4), torch.tensor([0, 1, 2])) == pytest.approx(0.75)


# --- ECE --------------------------------------------------------------------------------------------------

def test_ece_bins_are_lower_open_upper_closed():
    # 4 bins, edges 0.25 / 0.5 / 0.75 exact in binary; confidences 0.5 and 0.75 sit on edges
    probs = torch.tensor([
        [0.5, 0.3, 0.2, 0.0],     # conf 0.5,   correct -> bin (0.25, 0.5]
        [0.75, 0.25, 0.0, 0.0],   # conf 0.75,  wrong   -> bin (0.5, 0.75]
        [0.625, 0.375, 0.0, 0.0],  # conf 0.625, correct -> bin (0.5, 0.75]
        [1.0, 0.0, 0.0, 0.0],     # conf 1,     correct -> bin (0.75, 1]
    ], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    # |0.5 − 1|·1/4 + |0.6875 − 0.5|·2/4 + 0 = 0.21875 ([lower, upper) bins would give 0.40625)
    assert expected_calibration_error(probs, labels, num_bins=4, from_logits=False) == pytest.approx(0.21875)
    # the same probabilities given as logits
    assert expected_calibration_error(probs.log(), labels, num_bins=4) == pytest.approx(0.21875)


def test_calibration_bins_put_edge_confidences_in_the_bin_below():
    conf = torch.arange(1, 16, dtype=torch.float64) / 15  # exactly the 15 upper edges
    bins = calibration_bins(conf, torch.ones(15, dtype=torch.bool), num_bins=15)
    assert torch.equal(bins['count'], torch.ones(15, dtype=torch.float64))
    assert torch.allclose(bins['confidence'], conf)


def test_ece_is_zero_when_accuracy_equals_confidence_in_every_bin():
    probs, labels = [], []
    for conf, num, num_correct in ((0.6, 5, 3), (0.8, 5, 4), (0.9, 10, 9), (1.0, 4, 4)):
        for i in range(num):
            probs.append([conf, 1 - conf])
            labels.append(0 if i < num_correct else 1)
    probs = torch.tensor(probs, dtype=torch.float64)
    ece = expected_calibration_error(probs, torch.tensor(labels), from_logits=False)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_ece_small_for_sampled_calibrated_predictions_and_large_for_overconfident_ones():
    gen = torch.Generator().manual_seed(0)
    conf = 0.5 + 0.5 * torch.rand(20000, generator=gen, dtype=torch.float64)
    correct = torch.rand(20000, generator=gen, dtype=torch.float64) < conf
    probs = torch.stack([conf, 1 - conf], 1)
    labels = (~correct).long()
    assert expected_calibration_error(probs, labels, from_logits=False) < 0.02
    sharp = torch.stack([torch.full_like(conf, 0.99), torch.full_like(conf, 0.01)], 1)
    assert expected_calibration_error(sharp, labels, from_logits=False) > 0.2


def test_misclassification_auc():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    assert misclassification_auc(probs, torch.tensor([0, 0, 1, 1]), from_logits=False) == pytest.approx(1.0)
    assert misclassification_auc(probs, torch.tensor([1, 1, 0, 0]), from_logits=False) == pytest.approx(0.0)
    tied = torch.tensor([[0.7, 0.3]] * 4)
    assert misclassification_auc(tied, torch.tensor([0, 1, 0, 1]), from_logits=False) == pytest.approx(0.5)
    assert misclassification_auc(probs, torch.zeros(4, dtype=torch.long), from_logits=False) is None


# --- diversity --------------------------------------------------------------------------------------------

def crafted_members():
    """10 samples of class 0; member 1 wrong on 0-3, member 2 wrong on 2-5, member 3 never wrong.

    On sample 3 members 1 and 2 are both wrong with different classes.
    """
    labels = torch.zeros(10, dtype=torch.long)
    preds = torch.zeros(10, 3, dtype=torch.long)
    preds[0:4, 0] = 1
    preds[2:6, 1] = 1
    preds[3, 1] = 2
    return preds, labels


def test_ratio_errors_and_disagreement_two_members():
    preds, labels = crafted_members()
    logits = one_hot_logits(preds[:, :2])
    # N00 = 2/10 (samples 2, 3), N01 + N10 = 4/10 (samples 0, 1, 4, 5)
    assert ratio_errors(logits, labels) == pytest.approx(2.0)
    assert ratio_errors(preds[:, :2], labels) == pytest.approx(2.0)  # integer predictions work too
    # predictions differ on 0, 1, 3, 4, 5
    assert disagreement(logits) == pytest.approx(0.5)


def test_ratio_errors_and_disagreement_three_members_no_shared_error_rule():
    preds, labels = crafted_members()
    logits = one_hot_logits(preds)
    # pairs with member 3 share no error: 2 · (N01 + N10) = 2 · 0.4 (docs/methods/mixmo.md §6.1)
    assert ratio_errors(logits, labels) == pytest.approx((2.0 + 0.8 + 0.8) / 3)
    assert disagreement(logits) == pytest.approx((0.5 + 0.4 + 0.4) / 3)


def test_diversity_needs_two_members():
    with pytest.raises(ValueError):
        ratio_errors(torch.zeros(4, 1, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        disagreement(torch.zeros(4, 1, 3))


def test_classification_metrics_members_and_ensemble():
    preds, labels = crafted_members()
    preds = preds[:, :2]
    # members are more confident when right, so the mean logits side with the right member
    members = one_hot_logits(preds) * torch.where(preds == labels[:, None], 1.0, 0.6)[..., None]
    out = classification_metrics(None, labels, members)  # ensemble = mean of the member logits
    # ensemble: right wherever one member is; wrong on samples 2 and 3 where both are wrong
    assert out['top1'] == pytest.approx(80.0)
    assert out['member_top1'] == pytest.approx([60.0, 60.0])
    assert out['member_mean_top1'] == pytest.approx(60.0)
    assert out['best_member_top1'] == pytest.approx(60.0)
    assert out['ensemble_gain'] == pytest.approx(20.0)
    assert out['ratio_errors'] == pytest.approx(2.0)
    assert out['disagreement'] == pytest.approx(0.5)
    assert out['top5'] == 100.0
    for key in ('nll', 'ece', 'brier', 'auc'):
        assert math.isfinite(out[key])


def test_classification_metrics_single_member_has_no_diversity():
    logits, labels = calibrated_logits(200, seed=1)
    for out in (classification_metrics(logits, labels), classification_metrics(logits, labels, logits[:, None])):
        assert out['member_top1'] == pytest.approx([out['top1']])
        for key in ('best_member_top1', 'ensemble_gain', 'disagreement', 'ratio_errors'):
            assert out[key] is None
        assert out['nll'] == pytest.approx(F.cross_entropy(logits, labels).item())


# --- temperature scaling ----------------------------------------------------------------------------------

def test_fit_temperature_recovers_the_calibrating_temperature():
    logits, labels = calibrated_logits(temperature=2.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.0, rel=0.1)
    # it is the minimum: nearby temperatures are no better
    best = nll(logits / temperature, labels)
    assert best <= nll(logits / (temperature * 1.05), labels)
    assert best <= nll(logits / (temperature / 1.05), labels)
    # scaling the logits scales the temperature
    assert fit_temperature(3 * logits, labels) == pytest.approx(3 * temperature, rel=1e-4)


def test_fit_temperature_underconfident_and_fallback():
    logits, labels = calibrated_logits(temperature=0.5, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)
    # random labels: the best T is the softest allowed; every prediction right: the sharpest allowed
    noise = torch.randn(500, 10, generator=torch.Generator().manual_seed(3))
    random_labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(4))
    assert fit_temperature(noise, random_labels, t_max=50.0) > 10
    assert fit_temperature(noise, noise.argmax(1), t_min=0.5) == pytest.approx(0.5)


def test_temperature_scaled_metrics_split_protocol():
    logits, labels = calibrated_logits(temperature=2.0, seed=5)  # raw logits are over-confident
    out = temperature_scaled_metrics(logits, labels)
    assert out['temperature'] == pytest.approx(2.0, rel=0.1)
    assert out['temperature'] == pytest.approx(sum(out['temperatures']) / 2)
    assert out['nll_calibrated'] < out['nll']
    assert out['ece_calibrated'] < out['ece']
    assert out['brier_calibrated'] < out['brier']
    assert out['top1'] == pytest.approx(topk_accuracy(logits, labels, 1))
    # the split is fixed by the seed
    assert temperature_scaled_metrics(logits, labels)['temperatures'] == out['temperatures']
    assert temperature_scaled_metrics(logits, labels, seed=0)['temperatures'] != out['temperatures']


# --- reliability diagram ----------------------------------------------------------------------------------

def test_reliability_diagram_writes_a_png(tmp_path):
    logits, labels = calibrated_logits(1000, temperature=2.0)
    path = reliability_diagram(logits, labels, tmp_path / 'plots' / 'reliability.png', title='synthetic')
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ['reliability.png']  # no temp file left over
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert 300 <= image.width <= 2000 and 300 <= image.height <= 2000
        pixels = np.asarray(image.convert('RGB')).reshape(-1, 3).astype(int)
    assert (pixels.std(0) > 10).all()  # drawn, not blank
    assert ((pixels[:, 2] - pixels[:, 0]) > 80).any()  # blue accuracy bars are present


# --- CIFAR-C ----------------------------------------------------------------------------------------------

def make_corruption_folder(folder, names=('snow', 'fog'), per_severity=4, short_labels=False):
    """Pixel (0, 0, 0) of row r in file c encodes 100·c + r; labels are (3·r) % 10 per row."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = 5 * per_severity
    for c, name in enumerate(names):
        images = np.zeros((rows, 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = 100 * c + np.arange(rows)
        np.save(folder / f'{name}.npy', images)
    labels = (3 * np.arange(rows)) % 10
    np.save(folder / 'labels.npy', labels[:per_severity] if short_labels else labels)
    return folder


def test_corruption_dataset_layout_labels_and_severity(tmp_path):
    ds = CorruptionDataset(make_corruption_folder(tmp_path / 'c10c'))
    assert ds.corruptions == ['fog', 'snow']  # sorted file names
    assert len(ds) == 2 * 5 * 4
    # 'snow' (file 0), severity 3, image 2 -> dataset index (1 · 5 + 2) · 4 + 2, file row (3 − 1) · 4 + 2
    index, row = 30, 10
    img, label = ds[index]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == 'RGB'
    assert np.asarray(img)[0, 0, 0] == row
    assert label == (3 * row) % 10
    assert ds.corruption_severity(index) == ('snow', 3)
    assert ds.corruption_severity(-1) == ('snow', 5)
    assert list(ds.indices_of('snow', 3)) == list(range(28, 32))
    fog_img, _ = ds[ds.indices_of('fog', 5)[0]]
    assert np.asarray(fog_img)[0, 0, 0] == 100 + 16
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_corruption_dataset_subset_transform_short_labels_and_pickle(tmp_path):
    folder = make_corruption_folder(tmp_path / 'c', short_labels=True)
    ds = CorruptionDataset(folder, corruptions='fog', severities=(2, 5), transform=lambda im: np.asarray(im))
    assert len(ds) == 8
    img, label = ds[5]  # severity 5, image 1 -> row 17, labels of length 4 repeat per severity
    assert ds.corruption_severity(5) == ('fog', 5)
    assert img[0, 0, 0] == 100 + 17
    assert label == 3
    ds[0]  # opens a memory map, which must not travel with a pickle
    copy = pickle.loads(pickle.dumps(CorruptionDataset(folder, corruptions=['fog'])))
    assert copy[17][1] == 3


def test_corruption_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        CorruptionDataset(tmp_path / 'nowhere')
    folder = make_corruption_folder(tmp_path / 'c')
    with pytest.raises(ValueError, match='brightness'):
        CorruptionDataset(folder, corruptions=['fog', 'brightness'])
    with pytest.raises(ValueError):
        CorruptionDataset(folder, severities=(0, 1))
    np.save(folder / 'bad.npy', np.zeros((20, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match='bad.npy'):
        CorruptionDataset(folder)
    (folder / 'labels.npy').unlink()
    with pytest.raises(FileNotFoundError, match='labels.npy'):
        CorruptionDataset(folder, corruptions=['fog'])
