"""Pictures, Pillow only: mixed training samples, and evaluation plots (reliability diagram, risk-coverage
curve, histograms of OOD scores; :func:`reliability_diagram`, :func:`risk_coverage_plot`,
:func:`score_histogram`).

Mixed samples: one PNG grid, one row per sample.

Columns: the image, its partner, the mask (the partner's weight, white = partner), the mixed image, then
lambda (the image's label share) over the image's pixel share, 1 - mean(mask): they differ where the mask
does not follow lambda exactly (AutoMix's mask loss only pulls the batch mean to within a margin).
:func:`save_mix_grid` draws any such set; the ``*_samples`` helpers build the set for each way of mixing
in this package:

- :func:`mimo_samples`: MixMo masks (M >= 2) of a :class:`~timm_mimo.batch.MimoBatch`: members 0 and 1,
  the mask of member 1 on the mixing grid shown at pixel size. MixMo mixes *features* after the member
  encoders; the mixed column is the same mask applied to pixels, for illustration.
- :func:`msda_samples`: pixel Mixup / CutMix drawn the way :func:`timm_mimo.msda.msda_mix` draws them
  (lambda ~ Beta(alpha, alpha); CutMix: a partner box of area 1 - lambda, lambda re-read as the mask mean).
- AutoMix (:mod:`timm_mimo.automix`) returns its own backbone-branch samples (``vis=True``).
"""
import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .metrics import calibration_bins, check_scores, ece_from_bins, probabilities
from ..mixing import box_masks, sample_beta
from ..msda import check_msda_mode

COLUMNS = ('image', 'partner', 'mask', 'mixed')
_MIN_CELL = 80  # pixels per drawn image: an 8 x 8 digit at scale 3 is too small to read


def mimo_samples(inputs: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Samples of a MIMO batch: inputs (B, M, C, H, W), masks (B, M, h, w) with M >= 2 (members 0 and 1)."""
    if inputs.ndim != 5 or inputs.shape[1] < 2:
        raise ValueError(f'MixMo pictures need member inputs (B, M >= 2, C, H, W), got {list(inputs.shape)}')
    x0, x1 = inputs[:, 0].float(), inputs[:, 1].float()
    mask = F.interpolate(masks[:, 1:2].float(), size=x0.shape[-2:], mode='nearest')
    # the own share: member 0's weight relative to the pair shown (equals 1 - mask for M = 2)
    own = masks[:, 0].float().mean((1, 2)) / masks[:, :2].float().sum(1).mean((1, 2)).clamp_min(1e-12)
    return dict(image=x0, partner=x1, mask=mask, mixed=x0 + mask * (x1 - x0), lam=own)


def msda_samples(images: torch.Tensor, mode: str, alpha: float,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Mixup / CutMix samples of images (N, C, H, W) with partners from the same batch."""
    check_msda_mode(mode)
    images = images.float()
    n, _, h, w = images.shape
    partner = torch.randint(0, n, (n,), generator=generator, device=images.device)
    lam = sample_beta(n, alpha, generator, images.device)
    if mode == 'cutmix':
        own = 1 - box_masks(1 - lam, (h, w), generator)
    else:
        own = lam[:, None, None].expand(n, h, w)
    mask = (1 - own)[:, None]
    x1 = images[partner]
    return dict(image=images, partner=x1, mask=mask, mixed=images + mask * (x1 - images),
                lam=own.mean((1, 2)))


def _to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N, H, W, 3) uint8 RGB."""
    x = x.detach().float().cpu()
    c = x.shape[1]
    mean_t = torch.tensor(list(mean)[:c] if len(mean) >= c else [mean[0]] * c)[:, None, None]
    std_t = torch.tensor(list(std)[:c] if len(std) >= c else [std[0]] * c)[:, None, None]
    x = (x * std_t + mean_t).clamp(0, 1)
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        x = x[:, :3] if c > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - c, -1, -1)], 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _mask_to_uint8(mask: torch.Tensor, size) -> torch.Tensor:
    m = mask.detach().float().cpu()
    if m.ndim == 3:
        m = m[:, None]
    m = F.interpolate(m[:, :1], size=tuple(size), mode='nearest').clamp(0, 1)
    return (m * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def save_mix_grid(path, samples: Dict[str, torch.Tensor], mean: Sequence[float] = (0.0,),
                  std: Sequence[float] = (1.0,), max_rows: int = 8, scale: int = 3, title: str = '') -> Path:
    """Write a PNG grid: rows = samples, columns = image | partner | mask | mixed, then lambda over the pixel
    share of the image (1 - mean mask).

    ``samples``: 'image', 'partner', 'mixed' (N, C, H, W) normalised with ``mean`` / ``std``; 'mask'
    (N, 1, h, w) or (N, h, w) in [0, 1], the partner's weight (resized to the image); 'lam' (N,) or a float,
    the image's own share. Returns the path. The folder is created; the file is replaced atomically.
    """
    missing = [k for k in (*COLUMNS, 'lam') if k not in samples]
    if missing:
        raise ValueError(f'mix samples lack {missing}')
    n = min(int(samples['image'].shape[0]), max_rows)
    if n < 1:
        raise ValueError('no samples to draw')
    h, w = samples['image'].shape[-2:]
    columns = [_to_uint8(samples[k][:n], mean, std) if k != 'mask' else _mask_to_uint8(samples[k][:n], (h, w))
               for k in COLUMNS]
    lam = torch.as_tensor(samples['lam']).detach().float().cpu().reshape(-1)
    lam = lam.expand(n) if lam.numel() == 1 else lam[:n]

    own_px = 1 - columns[2][..., 0].float().mean((1, 2)) / 255
    scale = max(scale, math.ceil(_MIN_CELL / max(h, w)))  # 8-16 px images: cells a reader can see
    cell_h, cell_w, pad = h * scale, w * scale, 6
    font = default_font(14)
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    label_w = _text_size(probe, 'lambda / px', font)[0] + 2 * pad
    width = pad + len(COLUMNS) * (cell_w + pad) + label_w
    lines = _wrap(probe, title, font, width - 2 * pad) if title else []
    line_h = _text_size(probe, 'Ag', font)[1] + 6
    title_h, header = len(lines) * line_h + (pad if lines else 0), line_h + 2
    height = title_h + header + pad + n * (cell_h + pad)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((pad, pad // 2 + k * line_h), line, font=font, fill=_TEXT)
    for j, name in enumerate(COLUMNS):
        draw.text((pad + j * (cell_w + pad), title_h + 2), name, font=font, fill=_TEXT)
    draw.text((pad + len(COLUMNS) * (cell_w + pad) + pad, title_h + 2), 'lambda / px', font=font, fill=_TEXT)
    for i in range(n):
        top = title_h + header + pad + i * (cell_h + pad)
        for j, col in enumerate(columns):
            tile = Image.fromarray(col[i].numpy(), 'RGB').resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), top))
        draw.text((pad + len(COLUMNS) * (cell_w + pad) + pad, top + cell_h // 2 - line_h),
                  f'{float(lam[i]):.3f}\n{float(own_px[i]):.3f}', font=font, fill=_TEXT, spacing=6)
    return save_png(canvas, path)


# --- plots of evaluation results (Pillow only) --------------------------------------------------------

# the reliability diagram's colours (RGB; the gap is translucent RGBA, drawn over the bars and the background)
ACC_FILL, ACC_LINE = (70, 110, 190), (30, 60, 120)
GAP_FILL, GAP_LINE = (220, 60, 60, 110), (190, 40, 40, 255)
_GRID, _AXIS, _TEXT, _DIAGONAL, _HIST = (228, 228, 228), (60, 60, 60), (20, 20, 20), (120, 120, 120), (150, 150, 150)


def default_font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (the fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font when Pillow has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list:
    """``text`` cut at spaces into lines no wider than ``width`` pixels (a longer single word stays whole)."""
    lines = []
    for word in text.split(' '):
        if lines and _text_size(draw, f'{lines[-1]} {word}', font)[0] <= width:
            lines[-1] = f'{lines[-1]} {word}'
        else:
            lines.append(word)
    return lines


def composite(colour: Tuple[int, int, int, int], base: Tuple[int, ...]) -> Tuple[int, int, int]:
    """The RGB that the translucent ``colour`` shows over ``base`` (what alpha compositing draws)."""
    alpha = colour[3] / 255
    return tuple(round(c * alpha + b * (1 - alpha)) for c, b in zip(colour[:3], base[:3]))


def nice_ticks(low: float, high: float, count: int = 5) -> Tuple[list, str]:
    """About ``count`` + 1 round tick values (steps of 1, 2, 2.5 or 5 x 10^k) from at or below ``low`` to at
    or above ``high``, and the format that prints them without spurious digits."""
    span = max(high - low, 1e-12)
    magnitude = 10 ** math.floor(math.log10(span / count))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if span / (m * magnitude) <= count)
    start, stop = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / magnitude, 1) == 2.5 else 0))
    return [round(i * step, decimals + 2) for i in range(start, stop + 1)], f'.{decimals}f'


def _vertical_text(image: Image.Image, text: str, font: ImageFont.ImageFont, center: Tuple[int, int]) -> None:
    """Paste ``text`` rotated 90° counter-clockwise, centred on ``center`` (y-axis labels)."""
    width, height = _text_size(ImageDraw.Draw(image), text, font)
    label = Image.new('RGBA', (width + 4, height + 8), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), text, font=font, fill=_TEXT)
    label = label.rotate(90, expand=True)
    image.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2), label)


def save_png(image, path) -> Path:
    """Write ``image`` as PNG atomically (readers never see half a file), with the user's permissions."""
    import io
    from ..rundir import write_atomic
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    write_atomic(path, buffer.getvalue())
    return Path(path)


def reliability_diagram(
        scores: torch.Tensor,
        labels: torch.Tensor,
        path: Union[str, os.PathLike],
        num_bins: int = 15,
        title: Optional[str] = None,
        from_logits: bool = True,
) -> Path:
    """Write a reliability diagram PNG (docs/methods/mixmo.md §6.1 ECE bins) with Pillow only; returns the path.

    Top: per-bin accuracy bars against the diagonal of perfect calibration, the gap to the bin's mean
    confidence shaded red; bottom: the share of samples per confidence bin. The title carries the ECE.
    The file is written to a temporary name in the same folder and moved into place, so readers never
    see a half-written image.
    """
    scores, labels = check_scores(scores, labels)
    conf, pred = probabilities(scores, from_logits).max(dim=1)
    bins = calibration_bins(conf, pred == labels, num_bins)
    ece = ece_from_bins(bins)
    count = bins['count'].cpu().tolist()
    accuracy = bins['accuracy'].cpu().tolist()
    confidence = bins['confidence'].cpu().tolist()

    width, height = 600, 720
    left, right, top = 80, 24, 56
    side = width - left - right  # square main plot
    plot_bottom = top + side
    hist_top, hist_bottom = plot_bottom + 22, plot_bottom + 112
    image = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(image)
    font, small = default_font(16), default_font(13)

    def x_px(value: float) -> float:
        return left + value * side

    def y_px(value: float) -> float:
        return plot_bottom - value * side

    # grid and ticks every 0.2
    ticks = [i / 5 for i in range(6)]
    for t in ticks:
        draw.line([(x_px(t), top), (x_px(t), plot_bottom)], fill=_GRID)
        draw.line([(left, y_px(t)), (left + side, y_px(t))], fill=_GRID)
        draw.line([(left - 5, y_px(t)), (left, y_px(t))], fill=_AXIS)
        label = f'{t:.1f}'
        tw, th = _text_size(draw, label, small)
        draw.text((left - 9 - tw, y_px(t) - th / 2 - 2), label, font=small, fill=_TEXT)
        for y_axis in (plot_bottom, hist_bottom):
            draw.line([(x_px(t), y_axis), (x_px(t), y_axis + 5)], fill=_AXIS)
        draw.text((x_px(t) - tw / 2, hist_bottom + 8), label, font=small, fill=_TEXT)

    # accuracy bars, then the translucent gap to the mean confidence on top of them
    overlay = Image.new('RGBA', image.size, (0, 0, 0, 0))
    gap_draw = ImageDraw.Draw(overlay)
    for i in range(num_bins):
        if count[i] == 0:
            continue
        x0, x1 = x_px(i / num_bins) + 1, x_px((i + 1) / num_bins) - 1
        if accuracy[i] > 0:
            draw.rectangle([x0, y_px(accuracy[i]), x1, plot_bottom], fill=ACC_FILL, outline=ACC_LINE)
        low, high = sorted((accuracy[i], confidence[i]))
        gap_draw.rectangle([x0, y_px(high), x1, y_px(low)], fill=GAP_FILL, outline=GAP_LINE)
    image.paste(Image.alpha_composite(image.convert('RGBA'), overlay).convert('RGB'))
    draw = ImageDraw.Draw(image)

    # dashed diagonal of perfect calibration
    dashes = 40
    for i in range(0, dashes, 2):
        a, b = i / dashes, (i + 1) / dashes
        draw.line([(x_px(a), y_px(a)), (x_px(b), y_px(b))], fill=_DIAGONAL, width=2)
    draw.rectangle([left, top, left + side, plot_bottom], outline=_AXIS)

    # confidence histogram strip: share of samples per bin, scaled to the fullest bin
    total, fullest = sum(count), max(count)
    for i in range(num_bins):
        if count[i] == 0:
            continue
        bar_top = hist_bottom - (hist_bottom - hist_top) * count[i] / fullest
        draw.rectangle([x_px(i / num_bins) + 1, bar_top, x_px((i + 1) / num_bins) - 1, hist_bottom], fill=_HIST)
    draw.rectangle([left, hist_top, left + side, hist_bottom], outline=_AXIS)
    share = f'max {100 * fullest / total:.0f}%'
    draw.text((left + 6, hist_top + 4), share, font=small, fill=_TEXT)

    # legend in the upper-left triangle, which the bars of a sensible model leave empty
    # the gap is translucent: over white above a bar (confidence > accuracy), over the bar's blue inside it
    legend = [('Accuracy', ACC_FILL, ACC_LINE),
              ('Gap, overconfident (confidence > accuracy)', composite(GAP_FILL, (255, 255, 255)), GAP_LINE[:3]),
              ('Gap, underconfident (accuracy > confidence)', composite(GAP_FILL, ACC_FILL), GAP_LINE[:3]),
              ('Perfect calibration', None, None)]
    lx, ly = left + 12, top + 12
    for text, colour, line in legend:
        if colour is None:
            draw.line([(lx, ly + 8), (lx + 22, ly + 8)], fill=_DIAGONAL, width=2)
        else:
            draw.rectangle([lx, ly + 1, lx + 22, ly + 15], fill=colour, outline=line)
        draw.text((lx + 30, ly), text, font=small, fill=_TEXT)
        ly += 22

    # axis labels and title (the title font shrinks until it fits)
    xw, _ = _text_size(draw, 'Confidence', font)
    draw.text((left + side / 2 - xw / 2, hist_bottom + 30), 'Confidence', font=font, fill=_TEXT)
    _vertical_text(image, 'Accuracy', font, (22, (top + plot_bottom) // 2))
    _vertical_text(image, 'Samples', small, (40, (hist_top + hist_bottom) // 2))
    heading = f'{title + "  -  " if title else ""}ECE {ece:.4f}  (N = {int(total)}, {num_bins} bins)'
    size = 18
    title_font = default_font(size)
    while _text_size(draw, heading, title_font)[0] > width - 20 and size > 8:
        size -= 1
        title_font = default_font(size)
    tw, _ = _text_size(draw, heading, title_font)
    draw.text(((width - tw) / 2, 16), heading, font=title_font, fill=_TEXT)

    return save_png(image, path)


SERIES = ((40, 90, 190), (210, 80, 30), (40, 150, 70), (150, 60, 170), (120, 120, 120))  # one colour per curve / set
HIST_ALPHA = 110  # histogram bars are translucent: where the two sets overlap both show


def _chart(xlim: Tuple[float, float], ylim: Tuple[float, float], xlabel: str, ylabel: str, title: str,
           size: Tuple[int, int] = (640, 480)):
    """A white canvas with a framed, gridded plot area at round ticks; returns (image, draw, x_px, y_px, font,
    xlim, ylim), the limits widened to the outer ticks."""
    width, height = size
    left, right, top, bottom = 84, 32, 48, 64
    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    font, small = default_font(16), default_font(13)
    plot_w, plot_h = width - left - right, height - top - bottom
    # round ticks, the axes widened to the outer ones
    (x_ticks, x_format), (y_ticks, y_format) = nice_ticks(*xlim), nice_ticks(*ylim)
    xlim, ylim = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def x_px(value: float) -> float:
        return left + (value - xlim[0]) / (xlim[1] - xlim[0]) * plot_w

    def y_px(value: float) -> float:
        return top + plot_h - (value - ylim[0]) / (ylim[1] - ylim[0]) * plot_h

    for value in x_ticks:
        label = format(value, x_format)
        tw, th = _text_size(draw, label, small)
        draw.line([(x_px(value), top), (x_px(value), top + plot_h)], fill=_GRID)
        draw.text((min(x_px(value) - tw / 2, width - tw - 2), top + plot_h + 8), label, font=small, fill=_TEXT)
    for value in y_ticks:
        label = format(value, y_format)
        tw, th = _text_size(draw, label, small)
        draw.line([(left, y_px(value)), (left + plot_w, y_px(value))], fill=_GRID)
        draw.text((left - 9 - tw, y_px(value) - th / 2 - 2), label, font=small, fill=_TEXT)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_AXIS)
    xw, _ = _text_size(draw, xlabel, font)
    draw.text((left + plot_w / 2 - xw / 2, height - 30), xlabel, font=font, fill=_TEXT)
    _vertical_text(image, ylabel, font, (22, top + plot_h // 2))
    title_font = default_font(17)
    tw, _ = _text_size(draw, title, title_font)
    draw.text(((width - min(tw, width)) / 2, 14), title, font=title_font, fill=_TEXT)
    return image, draw, x_px, y_px, small, xlim, ylim


def _legend(draw: ImageDraw.ImageDraw, entries, origin: Tuple[float, float], font) -> None:
    x, y = origin
    for text, colour in entries:
        draw.rectangle([x, y + 3, x + 20, y + 13], fill=colour, outline=_AXIS)
        draw.text((x + 28, y), text, font=font, fill=_TEXT)
        y += 20


def risk_coverage_plot(curves: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path, title: str = '') -> Path:
    """Risk (error rate of the accepted samples) against coverage, one line per entry ``name: (coverage,
    risk)`` (e.g. from :func:`timm_mimo.eval.uncertainty.risk_coverage_curve`); the legend carries each AURC."""
    if not curves:
        raise ValueError('no risk-coverage curve to draw')
    top_risk = max(float(risk.max()) for _, risk in curves.values())
    ylim = (0.0, max(0.05, min(1.0, math.ceil(top_risk * 20) / 20)))  # next 5 % step above the highest risk
    image, draw, x_px, y_px, small, _, ylim = _chart((0.0, 1.0), ylim, 'Coverage', 'Risk (error rate)',
                                                     title or 'Risk-coverage curve')
    entries = []
    for colour, (name, (coverage, risk)) in zip(SERIES * len(curves), curves.items()):
        coverage, risk = coverage.double().cpu(), risk.double().cpu()
        # at most ~600 vertices: one per horizontal pixel is all a 640-pixel canvas can show
        keep = torch.unique(torch.linspace(0, coverage.numel() - 1, min(coverage.numel(), 600)).round().long())
        draw.line([(x_px(float(c)), y_px(float(r))) for c, r in zip(coverage[keep], risk[keep])],
                  fill=colour, width=2)
        entries.append((f'{name}  AURC {risk.mean().item():.4f}', colour))
    _legend(draw, entries, (x_px(0.04), y_px(ylim[1]) + 10), small)
    return save_png(image, path)


def score_histogram(scores_in: torch.Tensor, scores_out: torch.Tensor, path, xlabel: str, title: str = '',
                    num_bins: int = 30, names: Tuple[str, str] = ('in-distribution', 'out-of-distribution')) -> Path:
    """Overlaid histograms (share of each set per bin) of an uncertainty score on in- and out-of-distribution
    samples, on the common range of both; the less they overlap, the better the score detects OOD."""
    values = [s.detach().double().reshape(-1).cpu() for s in (scores_in, scores_out)]
    if min(v.numel() for v in values) == 0:
        raise ValueError('a histogram needs samples in both sets')
    low = min(float(v.min()) for v in values)
    high = max(float(v.max()) for v in values)
    high = high if high > low else low + 1.0  # a constant score still gets a visible bin
    shares = [torch.histc(v, num_bins, low, high) / v.numel() for v in values]
    top = max(float(s.max()) for s in shares)
    image, draw, x_px, y_px, small, xlim, ylim = _chart((low, high), (0.0, top * 1.1), xlabel, 'Share of samples',
                                                        title or xlabel)
    step = (high - low) / num_bins
    shown = (255, 255, 255)
    for colour, share in zip(SERIES, shares):
        # one translucent layer per set, composited in turn: where the sets overlap both colours mix
        overlay = Image.new('RGBA', image.size, (0, 0, 0, 0))
        layer = ImageDraw.Draw(overlay)
        for i, value in enumerate(share.tolist()):
            if value > 0:
                layer.rectangle([x_px(low + i * step), y_px(value), x_px(low + (i + 1) * step), y_px(0)],
                                fill=(*colour, HIST_ALPHA), outline=(*colour, 255))
        image = Image.alpha_composite(image.convert('RGBA'), overlay).convert('RGB')
        shown = composite((*colour, HIST_ALPHA), shown)
    draw = ImageDraw.Draw(image)
    entries = [(f'{name} (N = {v.numel()})', composite((*colour, HIST_ALPHA), (255, 255, 255)))
               for name, v, colour in zip(names, values, SERIES)] + [('both (overlap)', shown)]
    _legend(draw, entries, (x_px(xlim[0]) + 280, y_px(ylim[1]) + 10), small)
    return save_png(image, path)
