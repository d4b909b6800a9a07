"""An evaluation report: one markdown page with the numbers and the pictures, usable as a model-card section.

``validate.py ... --report DIR`` calls :func:`write_report`, which draws the pictures into DIR and writes
``DIR/report.md`` and ``DIR/results.json`` (validate.py's results dictionary). :func:`model_card_section`
turns a results dictionary into the same markdown for a Hub model card, with the images referenced under
``image_dir``; :func:`report_section` does it from a report folder, e.g. for an export that copies DIR's
PNGs into the Hub repository's ``report/`` folder::

    card += report_section('eval/report', image_dir='report', heading_level=2)
"""
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .rundir import RESULTS_FILE, write_atomic
from .uncertainty import SCORE_LABELS, risk_coverage_curve, uncertainty_scores
from .visualize import reliability_diagram, risk_coverage_plot, score_histogram

__all__ = ['write_report', 'model_card_section', 'report_section', 'report_pictures']

REPORT_NAME = 'report.md'
RESULTS_NAME = RESULTS_FILE  # the report folder's results, named as a run's


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return 'n/a'
    return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def _percent(value) -> str:
    return 'n/a' if value is None else f'{100 * value:.2f}'


def _combined(results: dict) -> str:
    """How the members were combined, for a page that has several (', mean-prob of their members')."""
    several = results.get('ensemble') and results.get('num_members', 1) > 1
    return f', combined by {results["ensemble"]}' if several else ''


def report_pictures(folder, logits: torch.Tensor, member_logits: torch.Tensor, labels: torch.Tensor,
                    ood_logits: Optional[torch.Tensor] = None, ood_member_logits: Optional[torch.Tensor] = None,
                    title: str = '') -> Dict[str, str]:
    """Draw every picture of the report into ``folder``; returns {picture key: file name}."""
    folder = Path(folder)
    names = {'reliability': 'reliability.png'}
    reliability_diagram(logits, labels, folder / names['reliability'], title=f'{title} ensemble'.strip())
    members = member_logits.unbind(1) if member_logits is not None and member_logits.shape[1] >= 2 else ()
    for index, member in enumerate(members):
        names[f'reliability_member{index}'] = f'reliability_member{index}.png'
        reliability_diagram(member, labels, folder / names[f'reliability_member{index}'],
                            title=f'{title} member {index}'.strip())
    curves = {}
    for name, scores in [('ensemble', logits), *((f'member {i}', m) for i, m in enumerate(members))]:
        probs = scores.float().softmax(-1)
        curves[name] = risk_coverage_curve(probs.max(-1).values, probs.argmax(-1) == labels)
    names['risk_coverage'] = 'risk_coverage.png'
    risk_coverage_plot(curves, folder / names['risk_coverage'], title=f'{title} risk-coverage (MSP)'.strip())
    if ood_logits is not None:
        scores_in = uncertainty_scores(logits, member_logits)
        scores_out = uncertainty_scores(ood_logits, ood_member_logits)
        for score, label in SCORE_LABELS.items():
            if score in scores_in and score in scores_out:
                names[f'ood_{score}'] = f'ood_{score}.png'
                score_histogram(scores_in[score], scores_out[score], folder / names[f'ood_{score}'], label,
                                title=f'{title} OOD: {label}'.strip())
    return names


def model_card_section(results: dict, pictures: Optional[Dict[str, str]] = None, image_dir: str = '',
                       heading_level: int = 2) -> str:
    """The report as markdown: numbers from validate.py's results dictionary, pictures under ``image_dir``
    (a path relative to the page, '' = next to it). ``pictures``: {key: file name} from
    :func:`report_pictures`; without it the page has numbers only."""
    split = results['split']
    m = results[split]
    h = '#' * heading_level
    prefix = f'{image_dir.rstrip("/")}/' if image_dir else ''
    pictures = pictures or {}

    def image(key: str, alt: str) -> str:
        return f'![{alt}]({prefix}{pictures[key]})' if key in pictures else ''

    lines: List[str] = [
        f'{h} Evaluation: {results.get("model", "")} on {results.get("dataset", "")}',
        '',
        f'Split `{split}`, {results.get("num_samples", "?")} images, M = {results.get("num_members", 1)} '
        f'member(s){_combined(results)}; checkpoint `{results.get("checkpoint", "")}`. '
        f'Written by `validate.py --report` '
        f'(definitions: docs/evaluation.md of timm_mimo).',
        '',
        f'{h}# Accuracy and calibration',
        '',
        '| metric | value |',
        '|---|---|',
        f'| top-1 / top-5 (%) | {_fmt(m["top1"], 2)} / {_fmt(m["top5"], 2)} |',
        f'| member top-1 (%) | {" / ".join(f"{a:.2f}" for a in m["member_top1"])} |',
        f'| NLL | {_fmt(m["nll"])} |',
        f'| Brier (sum over classes) | {_fmt(m["brier"])} |',
        f'| ECE (15 equal-width bins) | {_fmt(m["ece"])} |',
        f'| adaptive ECE (15 equal-mass bins) | {_fmt(m.get("ece_adaptive"))} |',
        f'| classwise ECE | {_fmt(m.get("ece_classwise"))} |',
        f'| misclassification AUROC (MSP) | {_fmt(m.get("auc"))} |',
    ]
    if m.get('ensemble_gain') is not None:
        lines += [f'| ensemble gain over best member (points) | {m["ensemble_gain"]:+.2f} |',
                  f'| member disagreement / ratio-errors | {_fmt(m["disagreement"])} / {_fmt(m["ratio_errors"])} |']
    if m.get('member_ece'):
        lines.append(f'| member ECE | {" / ".join(f"{e:.4f}" for e in m["member_ece"])} |')
    cost = results.get('cost')
    if cost:
        lines.append(f'| inference cost per image | {cost["params"] / 1e6:.3f} M parameters, '
                     f'{cost["flops"] / 1e6:.2f} MFLOPs, {cost["forward_passes"]} forward pass(es) |')
    if m.get('temperature') is not None:
        lines.append(f'| temperature / NLL / ECE after scaling | {_fmt(m["temperature"], 3)} / '
                     f'{_fmt(m["nll_calibrated"])} / {_fmt(m["ece_calibrated"])} |')
    lines += ['', image('reliability', 'reliability diagram of the ensemble')]
    members = sorted(k for k in pictures if k.startswith('reliability_member'))
    if members:
        lines += ['', ' '.join(image(k, f'reliability diagram of member {k[len("reliability_member"):]}')
                              for k in members)]
    lines += [
        '',
        f'{h}# Selective classification (reject the lowest maximum softmax probability first)',
        '',
        '| AURC | AUGRC | risk at 80 % coverage | at 90 % | at 95 % |',
        '|---|---|---|---|---|',
        f'| {_fmt(m.get("aurc"))} | {_fmt(m.get("augrc"))} | {_fmt(m.get("risk_at_80"))} | '
        f'{_fmt(m.get("risk_at_90"))} | {_fmt(m.get("risk_at_95"))} |',
        '',
        image('risk_coverage', 'risk-coverage curve'),
    ]
    ood = results.get('ood')
    if ood:
        lines += [
            '',
            f'{h}# Out-of-distribution detection: {ood["dataset"]} ({ood["num_samples"]} images) as OOD',
            '',
            '| score | AUROC (%) | AUPR-in (%) | AUPR-out (%) | FPR at 95 % TPR (%) |',
            '|---|---|---|---|---|',
        ]
        for score, values in ood['scores'].items():
            lines.append(f'| {SCORE_LABELS.get(score, score)} | {_percent(values["auroc"])} | '
                         f'{_percent(values["aupr_in"])} | {_percent(values["aupr_out"])} | '
                         f'{_percent(values["fpr95"])} |')
        member_scores = ood.get('member_scores') or {}
        if member_scores:
            count = len(next(iter(member_scores.values())))
            lines += ['', 'Each member alone (AUROC %):', '',
                      '| score | ' + ' | '.join(f'member {i}' for i in range(count)) + ' |',
                      '|---|' + '---|' * count]
            lines += [f'| {SCORE_LABELS.get(score, score)} | ' + ' | '.join(_percent(v['auroc']) for v in per_member)
                      + ' |' for score, per_member in member_scores.items()]
        histograms = [image(f'ood_{score}', f'OOD histogram of {score}') for score in ood['scores']]
        lines += ['', ' '.join(h for h in histograms if h)]
    return '\n'.join(lines).rstrip() + '\n'


def write_report(folder, results: dict, logits: torch.Tensor, member_logits: torch.Tensor, labels: torch.Tensor,
                 ood_logits: Optional[torch.Tensor] = None, ood_member_logits: Optional[torch.Tensor] = None) -> Path:
    """Pictures plus ``report.md`` in ``folder`` (created); returns the markdown path."""
    folder = Path(folder)
    title = str(results.get('model', ''))
    pictures = report_pictures(folder, logits, member_logits, labels, ood_logits, ood_member_logits, title)
    write_atomic(folder / RESULTS_NAME, json.dumps(results, indent=2))
    path = folder / REPORT_NAME
    write_atomic(path, model_card_section(results, pictures, heading_level=1))
    return path


def report_section(folder, image_dir: str = '', heading_level: int = 2) -> str:
    """The model-card markdown of a report folder written by :func:`write_report` (its results.json and
    whichever of its pictures exist), with the images referenced under ``image_dir``."""
    folder = Path(folder)
    results_path = folder / RESULTS_NAME
    if not results_path.is_file():
        raise FileNotFoundError(f'{results_path} not found: write the report with validate.py --report {folder}')
    pictures = {p.stem: p.name for p in sorted(folder.glob('*.png'))}
    return model_card_section(json.loads(results_path.read_text()), pictures, image_dir, heading_level)
