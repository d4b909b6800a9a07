"""The evaluation pictures (timm_mimo.eval.plots), the report page (timm_mimo.eval.report) and the progress and
loading helpers of timm_mimo.eval.evaluation."""
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from timm_mimo.eval.evaluation import Renormalized, default_workers, with_progress
from timm_mimo.eval.report import model_card_section, report_section, write_report
from timm_mimo.eval.uncertainty import risk_coverage_curve
from timm_mimo.eval.plots import ACC_FILL, GAP_FILL, HIST_ALPHA, SERIES, nice_ticks, composite, \
    reliability_diagram, risk_coverage_plot, save_mix_grid, score_histogram

REPO = Path(__file__).resolve().parents[1]
# _chart's plot area on the default 640 x 480 canvas: x from 84 to 608, y from 48 (top) to 416 (bottom)
LEFT, WIDTH, TOP, HEIGHT = 84, 524, 48, 368
WHITE = (255, 255, 255)


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
    top = nice_ticks(0.0, float(torch.ceil(risk.max() * 20) / 20))[0][-1]  # the next 5 % step, then a round tick
    with Image.open(path) as image:
        image = image.convert('RGB')
        for index in (400, 700, 999):
            x = LEFT + round(float(coverage[index]) * WIDTH)
            y = TOP + round((1 - float(risk[index]) / top) * HEIGHT)
            window = [image.getpixel((x + dx, y + dy)) for dx in range(-2, 3) for dy in range(-3, 4)]
            assert any(b > r + 80 for r, _, b in window), index  # the first series colour, (40, 90, 190)
    with pytest.raises(ValueError):
        risk_coverage_plot({}, tmp_path / 'none.png')


def near(colour, target, tolerance=3) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, target))


def test_overlapping_histograms_show_both_sets_and_their_overlap_colour_in_the_legend(tmp_path):
    scores = torch.linspace(0.0, 1.0, 300)
    path = score_histogram(scores, scores[::2], tmp_path / 'h.png', 'score')  # the same range: all overlap
    in_colour = composite((*SERIES[0], HIST_ALPHA), WHITE)
    both = composite((*SERIES[1], HIST_ALPHA), in_colour)
    with Image.open(path) as image:
        image = image.convert('RGB')
        middle = column_colours(image, LEFT + WIDTH // 2 + 3)
        legend = [image.getpixel((x, y)) for x in range(LEFT + 280, LEFT + 300) for y in range(TOP, TOP + 80)]
    # where both sets have samples the second one no longer hides the first: their colours mix
    assert any(near(c, both) for c in middle) and not any(near(c, composite((*SERIES[1], HIST_ALPHA), WHITE))
                                                           for c in middle)
    assert any(near(c, both) for c in legend)  # the mixed colour is explained


@pytest.mark.parametrize('low,high,ticks,form', [
    (0.0296, 0.849, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], '.1f'),   # was 0.0296, 0.193, 0.357, ... 0.849
    (0.0, 0.151, [0.0, 0.05, 0.1, 0.15, 0.2], '.2f'),
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], '.1f'),
    (3.0, 47.0, [0.0, 10.0, 20.0, 30.0, 40.0, 50.0], '.0f'),
    (0.0, 0.0125, [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.0125], '.4f'),
])
def test_chart_ticks_are_round_numbers_that_cover_the_range(low, high, ticks, form):
    assert nice_ticks(low, high) == (pytest.approx(ticks), form)


def test_every_tick_label_of_a_chart_lies_inside_the_picture(tmp_path):
    # a range ending far from a round number used to put its last label across the right edge
    path = score_histogram(torch.linspace(0, 123456, 50), torch.linspace(0, 123456, 50), tmp_path / 'w.png', 's')
    with Image.open(path) as image:
        image = image.convert('RGB')
        labels = [image.getpixel((x, y)) for x in range(image.width - 40, image.width)
                  for y in range(TOP + HEIGHT + 4, TOP + HEIGHT + 26)]
        edge = [image.getpixel((image.width - 1, y)) for y in range(image.height)]
    assert any(sum(c) < 300 for c in labels)  # the last label is there...
    assert all(c == WHITE for c in edge)      # ...and nothing is cut at the edge


def test_reliability_legend_shows_the_colour_of_the_gap_inside_the_bars(tmp_path):
    # underconfident: every prediction right at confidence ~0.55, so the gap is drawn over the blue bar
    labels = torch.arange(200) % 4
    logits = torch.zeros(200, 4)
    logits[torch.arange(200), labels] = 1.3
    path = reliability_diagram(logits, labels, tmp_path / 'r.png')
    purple = composite(GAP_FILL, ACC_FILL)
    with Image.open(path) as image:
        image = image.convert('RGB')
        pixels = list(image.getdata())
        legend = [image.getpixel((x, y)) for x in range(80 + 12, 80 + 34) for y in range(56 + 12, 56 + 100)]
    assert any(near(c, purple) for c in pixels)
    assert any(near(c, purple) for c in legend)


def test_mix_grid_of_small_images_is_readable_and_its_long_title_is_wrapped_not_cut(tmp_path):
    gen = torch.Generator().manual_seed(0)
    samples = dict(image=torch.rand(3, 3, 8, 8, generator=gen), partner=torch.rand(3, 3, 8, 8, generator=gen),
                   mask=torch.ones(3, 1, 8, 8) * 0.3, mixed=torch.rand(3, 3, 8, 8, generator=gen), lam=0.7)
    title = 'epoch 2: MixMo cut masks (members 0 and 1; mixed = pixel illustration); this batch linear, ' \
            'patch probability 0.00 this epoch (decayed to 0 over the last 1/12 of training: linear mixing only)'
    short = save_mix_grid(tmp_path / 'short.png', samples, title='epoch 2')
    long = save_mix_grid(tmp_path / 'long.png', samples, title=title)
    with Image.open(short) as a, Image.open(long) as b:
        assert a.width >= 4 * 80 and a.width == b.width  # 8 px images drawn at 80 px, whatever the title
        assert b.height > a.height  # the title took more lines
        b = b.convert('RGB')
        assert all(b.getpixel((b.width - 1, y)) == WHITE for y in range(b.height - a.height + 40))


def test_mix_picture_title_says_when_cut_mixmo_mixes_linearly(tmp_path):
    import timm
    import timm_mimo  # noqa: F401
    from timm_mimo.batch import MimoBatchBuilder
    from timm_mimo.train.tasks import MimoTask
    model = timm.create_model('wrn16_2_mixmo2')
    builder = MimoBatchBuilder.from_model(model, (32, 32), batch_repeat=2, mix_mode='cut', mix_prob=1.0, seed=0)
    task = MimoTask(model, builder)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    titles = []
    for epoch in (0, 2):  # a 3-epoch run: the last epoch is in the decay, at patch probability 0
        task.set_epoch(epoch, 3)
        gen = torch.Generator().manual_seed(0)
        titles.append(task._pictures(builder(images, labels, generator=gen), images, gen)[1])
    assert 'this batch patches, patch probability 1.00' in titles[0] and 'linear mixing only' not in titles[0]
    assert 'this batch linear, patch probability 0.00 this epoch' in titles[1] and 'linear mixing only' in titles[1]


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
    loader = [(torch.zeros(3, 1), torch.zeros(3)), (torch.zeros(2, 1), torch.zeros(2))]
    with caplog.at_level(logging.INFO, logger='timm_mimo.eval.evaluation'):
        assert len(list(with_progress(loader, 'eval', interval=0))) == 2
    assert [r.getMessage().split(',')[0] for r in caplog.records] == ['eval: 1/2 batches', 'eval: 2/2 batches']
    assert 'eval: 2/2 batches, 5 images' in caplog.records[-1].getMessage()
    assert '|' not in capsys.readouterr().err  # no bar when stderr is not a terminal

    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    caplog.clear()
    assert len(list(with_progress(loader, 'eval', interval=0))) == 2
    bar = capsys.readouterr().err
    assert bar.startswith('\reval:') and '/2 [' in bar and not caplog.records  # tqdm's bar, no log lines


def test_default_workers_only_for_decoded_images():
    from timm_mimo.data import DigitsDataset
    digits = DigitsDataset('test', 8)
    assert default_workers(torch.utils.data.Subset(digits, [0, 1])) == 0
    assert default_workers(Renormalized(digits, (0.5,), (0.2,), (0.4,), (0.3,))) == 0
    assert default_workers(object()) == max(0, min(4, (os.cpu_count() or 1) - 1))


def test_renormalized_digits_equal_raw_pixels_normalised_like_cifar():
    from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
    from timm_mimo.data import DigitsDataset
    from timm_mimo.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    digits = DigitsDataset('all', 8)
    moved = Renormalized(digits, DIGITS_MEAN, DIGITS_STD, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD)
    raw, labels = load_digits_tensors(8)
    mean, std = torch.tensor(CIFAR_DEFAULT_MEAN)[:, None, None], torch.tensor(CIFAR_DEFAULT_STD)[:, None, None]
    for index in (0, 500, len(digits) - 1):
        image, label = moved[index]
        assert label == labels[index]
        assert torch.allclose(image, (raw[index] - mean) / std, atol=1e-5)
