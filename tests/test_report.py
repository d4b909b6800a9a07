"""The evaluation pictures (timm_mimo.visualize), the report page (timm_mimo.report) and validate.py's progress."""
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from timm_mimo.report import model_card_section, report_section, write_report
from timm_mimo.uncertainty import risk_coverage_curve
from timm_mimo.visualize import risk_coverage_plot, score_histogram

REPO = Path(__file__).resolve().parents[1]
# _chart's plot area on the default 640 x 480 canvas: x from 84 to 620, y from 48 (top) to 416 (bottom)
LEFT, WIDTH, TOP, HEIGHT = 84, 536, 48, 368


def column_colours(image: Image.Image, x: int):
    return [image.getpixel((x, y)) for y in range(TOP + 2, TOP + HEIGHT - 1)]


def test_score_histogram_puts_each_set_where_its_values_are(tmp_path):
    scores_in = torch.linspace(0.0, 0.4, 200)
    scores_out = torch.linspace(0.6, 1.0, 100)
    path = score_histogram(scores_in, scores_out, tmp_path / 'h.png', 'score')
    with Image.open(path) as image:
        image = image.convert('RGB')
        bluish = column_colours(image, LEFT + int(0.2 * WIDTH))
        orange = column_colours(image, LEFT + int(0.8 * WIDTH))
        gap = column_colours(image, LEFT + int(0.5 * WIDTH))
    assert any(b > r + 40 for r, _, b in bluish) and not any(r > b + 40 for r, _, b in bluish)
    assert any(r > b + 40 for r, _, b in orange) and not any(b > r + 40 for r, _, b in orange)
    assert not any(abs(r - b) > 40 for r, _, b in gap)  # no samples between 0.4 and 0.6
    with pytest.raises(ValueError, match='both sets'):
        score_histogram(scores_in, scores_in[:0], tmp_path / 'empty.png', 'score')
    score_histogram(torch.zeros(5), torch.zeros(3), tmp_path / 'constant.png', 'score')  # no zero-width range


def test_risk_coverage_plot_draws_the_curve_at_its_values(tmp_path):
    confidence = torch.linspace(1, 0, 1000)
    correct = torch.rand(1000, generator=torch.Generator().manual_seed(0)) > torch.linspace(0, 0.8, 1000)
    coverage, risk = risk_coverage_curve(confidence, correct)
    path = risk_coverage_plot({'model': (coverage, risk)}, tmp_path / 'rc.png')
    top = float(torch.ceil(risk.max() * 20) / 20)  # the y range ends at the next 5 % step
    with Image.open(path) as image:
        image = image.convert('RGB')
        for index in (400, 700, 999):
            x = LEFT + round(float(coverage[index]) * WIDTH)
            y = TOP + round((1 - float(risk[index]) / top) * HEIGHT)
            window = [image.getpixel((x + dx, y + dy)) for dx in range(-2, 3) for dy in range(-3, 4)]
            assert any(b > r + 80 for r, _, b in window), index  # the first series colour, (40, 90, 190)
    with pytest.raises(ValueError):
        risk_coverage_plot({}, tmp_path / 'none.png')


def single_model_results():
    metrics = dict(top1=50.0, top5=90.0, member_top1=[50.0], nll=1.2, brier=0.6, ece=0.05, ece_adaptive=0.06,
                   ece_classwise=0.02, auc=0.7, ensemble_gain=None, aurc=0.3, augrc=0.1, risk_at_80=0.4,
                   risk_at_90=0.45, risk_at_95=0.48)
    return dict(checkpoint='x', model='resnet10t', num_members=1, dataset='digits', split='test',
                num_samples=4, test=metrics)


def test_model_card_section_for_a_single_model_without_ood():
    page = model_card_section(single_model_results(), {'reliability': 'reliability.png'}, image_dir='card/')
    assert page.startswith('## Evaluation: resnet10t on digits')
    assert '| adaptive ECE (15 equal-mass bins) | 0.0600 |' in page
    assert '| 0.3000 | 0.1000 | 0.4000 | 0.4500 | 0.4800 |' in page
    assert '](card/reliability.png)' in page and 'risk_coverage' not in page  # only the pictures given
    assert 'Out-of-distribution' not in page and 'ensemble gain' not in page


def test_write_report_for_a_single_member_model(tmp_path):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 5, generator=gen)
    labels = torch.randint(0, 5, (40,), generator=gen)
    results = single_model_results()
    page = write_report(tmp_path / 'r', results, logits, logits[:, None], labels)
    assert sorted(p.name for p in page.parent.iterdir()) == [
        'reliability.png', 'report.md', 'results.json', 'risk_coverage.png']  # no member or OOD pictures
    assert report_section(page.parent, heading_level=1) == page.read_text()
    with pytest.raises(FileNotFoundError, match='validate.py --report'):
        report_section(tmp_path)


def load_validate():
    spec = importlib.util.spec_from_file_location('validate_cli', REPO / 'validate.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch, capsys, caplog):
    validate = load_validate()
    loader = [(torch.zeros(3, 1), torch.zeros(3)), (torch.zeros(2, 1), torch.zeros(2))]
    with caplog.at_level(logging.INFO, logger='validate'):
        assert len(list(validate.with_progress(loader, 'eval', interval=0))) == 2
    assert [r.getMessage().split(',')[0] for r in caplog.records] == ['eval: 1/2 batches', 'eval: 2/2 batches']
    assert 'eval: 2/2 batches, 5 images' in caplog.records[-1].getMessage()
    assert '|' not in capsys.readouterr().err  # no bar when stderr is not a terminal

    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    caplog.clear()
    assert len(list(validate.with_progress(loader, 'eval', interval=0))) == 2
    bar = capsys.readouterr().err
    assert bar.startswith('\reval:') and '/2 [' in bar and not caplog.records  # tqdm's bar, no log lines


def test_default_workers_only_for_decoded_images():
    validate = load_validate()
    from timm_mimo.data import DigitsDataset
    digits = DigitsDataset('test', 8)
    assert validate.default_workers(torch.utils.data.Subset(digits, [0, 1])) == 0
    assert validate.default_workers(validate.Renormalized(digits, (0.5,), (0.2,), (0.4,), (0.3,))) == 0
    assert validate.default_workers(object()) == max(0, min(4, (os.cpu_count() or 1) - 1))


def test_renormalized_digits_equal_raw_pixels_normalised_like_cifar():
    validate = load_validate()
    from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
    from timm_mimo.data import DigitsDataset
    from timm_mimo.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    digits = DigitsDataset('all', 8)
    moved = validate.Renormalized(digits, DIGITS_MEAN, DIGITS_STD, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD)
    raw, labels = load_digits_tensors(8)
    mean, std = torch.tensor(CIFAR_DEFAULT_MEAN)[:, None, None], torch.tensor(CIFAR_DEFAULT_STD)[:, None, None]
    for index in (0, 500, len(digits) - 1):
        image, label = moved[index]
        assert label == labels[index]
        assert torch.allclose(image, (raw[index] - mean) / std, atol=1e-5)
