"""An evaluation report: one markdown page with the numbers and the pictures, usable as a model-card section.

``validate.py ... --report DIR`` calls :func:`write_report`, which draws the pictures into DIR and writes
``DIR/report.md`` and ``DIR/results.json`` (validate.py's results dictionary). :func:`model_card_section`
turns a results dictionary into the same markdown for a Hub model card, with the images referenced under
``image_dir``; :func:`report_section` does it from a report folder, e.g. for an export that copies DIR's
PNGs into the Hub repository's ``report/`` folder::

    card += report_section('eval/report', image_dir='report', heading_level=2)
"""
import html
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..rundir import RESULTS_FILE, check_regular_file_inside, write_atomic
from .uncertainty import SCORE_LABELS, risk_coverage_curve, uncertainty_scores
from .plots import reliability_diagram, risk_coverage_plot, score_histogram

__all__ = ['write_report', 'model_card_section', 'report_section', 'report_pictures', 'report_picture_files',
           'markdown_text', 'code_span', 'code_block']

REPORT_NAME = 'report.md'
RESULTS_NAME = RESULTS_FILE  # the report folder's results, named as a run's
PICTURE_RE = re.compile(r'[A-Za-z0-9_.-]+\.png')  # the names report_pictures gives, safe in a Markdown link


# ------------------------------------------------------------------------------------------------------
# values read from files or folder names, as Markdown shows them literally: they cannot open HTML (an
# ``<img onerror=...>`` in a folder name), a link, a code span or a table cell, nor start a line

def markdown_text(value) -> str:
    text = html.escape(' '.join(str(value).split()), quote=False)
    return re.sub(r'([\\`*\[\]|])', r'\\\1', text)


def code_span(value) -> str:
    """``value`` as inline code: its fence is longer than any run of backticks inside (CommonMark's rule)."""
    text = ' '.join(str(value).split())
    fence = '`' * (max(map(len, re.findall('`+', text)), default=0) + 1)
    pad = ' ' if text.startswith('`') or text.endswith('`') else ''
    return f'{fence}{pad}{text}{pad}{fence}'


def code_block(text: str, info: str = '') -> str:
    """``text`` as a fenced block that no line of it can close."""
    fence = '`' * max(3, max(map(len, re.findall('`+', text)), default=0) + 1)
    return f'{fence}{info}\n{text.rstrip()}\n{fence}'


def _fmt(value, digits: int = 4, sign: str = '') -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 'n/a'  # missing, or not a number (a hand-edited results file)
    return f'{value:{sign}.{digits}f}' if isinstance(value, float) else str(value)


def _fmt_list(values, digits: int) -> str:
    return ' / '.join(_fmt(v, digits) for v in values) if isinstance(values, list) else 'n/a'


def _percent(value) -> str:
    return _fmt(100 * value if isinstance(value, (int, float)) else None, 2)


def _combined(results: dict) -> str:
    """How the members were combined, for a page that has several (', mean-prob of their members')."""
    several = results.get('ensemble') and results.get('num_members', 1) > 1
    return f', combined by {markdown_text(results["ensemble"])}' if several else ''


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
        return f'![{alt}]({prefix}{pictures[key]})' if PICTURE_RE.fullmatch(pictures.get(key, '')) else ''

    lines: List[str] = [
        f'{h} Evaluation: {markdown_text(results.get("model", ""))} on {markdown_text(results.get("dataset", ""))}',
        '',
        f'Split {code_span(split)}, {_fmt(results.get("num_samples"))} images, '
        f'M = {_fmt(results.get("num_members", 1))} member(s){_combined(results)}; '
        f'checkpoint {code_span(results.get("checkpoint", ""))}. '
        f'Written by `validate.py --report` (definitions: docs/evaluation.md of timm_mimo).',
        '',
        f'{h}# Accuracy and calibration',
        '',
        '| metric | value |',
        '|---|---|',
        f'| top-1 / top-5 (%) | {_fmt(m.get("top1"), 2)} / {_fmt(m.get("top5"), 2)} |',
        f'| member top-1 (%) | {_fmt_list(m.get("member_top1"), 2)} |',
        f'| NLL | {_fmt(m.get("nll"))} |',
        f'| Brier (sum over classes) | {_fmt(m.get("brier"))} |',
        f'| ECE (15 equal-width bins) | {_fmt(m.get("ece"))} |',
        f'| adaptive ECE (15 equal-mass bins) | {_fmt(m.get("ece_adaptive"))} |',
        f'| classwise ECE | {_fmt(m.get("ece_classwise"))} |',
        f'| misclassification AUROC (MSP) | {_fmt(m.get("auc"))} |',
    ]
    if m.get('ensemble_gain') is not None:
        lines += [f'| ensemble gain over best member (points) | {_fmt(m["ensemble_gain"], 2, sign="+")} |',
                  f'| member disagreement / ratio-errors | {_fmt(m.get("disagreement"))} / '
                  f'{_fmt(m.get("ratio_errors"))} |']
    if m.get('member_ece'):
        lines.append(f'| member ECE | {_fmt_list(m["member_ece"], 4)} |')
    cost = results.get('cost')
    if cost:
        lines.append(f'| inference cost per image | {cost["params"] / 1e6:.3f} M parameters, '
                     f'{cost["flops"] / 1e6:.2f} MFLOPs, {cost["forward_passes"]} forward pass(es) |')
    if m.get('temperature') is not None:
        lines.append(f'| temperature / NLL / ECE after scaling | {_fmt(m["temperature"], 3)} / '
                     f'{_fmt(m.get("nll_calibrated"))} / {_fmt(m.get("ece_calibrated"))} |')
    lines += ['', image('reliability', 'reliability diagram of the ensemble')]
    members = sorted(k for k in pictures if k.startswith('reliability_member'))
    if members:
        lines += ['', ' '.join(image(k, f'reliability diagram of member {k[len("reliability_member"):]}')
                              for k in members)]  # keys of PICTURE_RE names: plain text
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
            f'{h}# Out-of-distribution detection: {markdown_text(ood.get("dataset", ""))} '
            f'({_fmt(ood.get("num_samples"))} images) as OOD',
            '',
            '| score | AUROC (%) | AUPR-in (%) | AUPR-out (%) | FPR at 95 % TPR (%) |',
            '|---|---|---|---|---|',
        ]
        for score, values in ood['scores'].items():
            lines.append(f'| {markdown_text(SCORE_LABELS.get(score, score))} | {_percent(values.get("auroc"))} | '
                         f'{_percent(values.get("aupr_in"))} | {_percent(values.get("aupr_out"))} | '
                         f'{_percent(values.get("fpr95"))} |')
        member_scores = ood.get('member_scores') or {}
        if member_scores:
            count = len(next(iter(member_scores.values())))
            lines += ['', 'Each member alone (AUROC %):', '',
                      '| score | ' + ' | '.join(f'member {i}' for i in range(count)) + ' |',
                      '|---|' + '---|' * count]
            lines += [f'| {markdown_text(SCORE_LABELS.get(score, score))} | '
                      + ' | '.join(_percent(v.get('auroc')) for v in per_member) + ' |'
                      for score, per_member in member_scores.items()]
        histograms = [image(f'ood_{score}', f'OOD histogram of {markdown_text(score)}') for score in ood['scores']]
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


def report_picture_files(folder) -> Dict[str, str]:
    """{key: file name} of a report folder's pictures, each a regular file inside the folder (a link, which
    could point at any file of the machine, is refused by name); other names are not the report's."""
    folder = Path(folder)
    pictures = {}
    for path in sorted(folder.glob('*.png')):
        check_regular_file_inside(path, folder, 'copy')
        if PICTURE_RE.fullmatch(path.name):
            pictures[path.stem] = path.name
    return pictures


def _check_results(results, path: Path) -> dict:
    """What model_card_section reads as a mapping is one (a hand-edited report is an error naming it)."""
    split = results.get('split') if isinstance(results, dict) else None
    if not isinstance(split, str) or not isinstance(results.get(split), dict):
        raise ValueError(f'{path} is not validate.py\'s results: it needs "split" naming a mapping of metrics')
    ood = results.get('ood')
    if ood and not (isinstance(ood, dict) and isinstance(ood.get('scores'), dict)
                    and all(isinstance(v, dict) for v in ood['scores'].values())):
        raise ValueError(f'{path}: "ood" is not {{dataset, num_samples, scores: {{score: metrics}}}}')
    return results


def report_section(folder, image_dir: str = '', heading_level: int = 2) -> str:
    """The model-card markdown of a report folder written by :func:`write_report` (its results.json and
    whichever of its pictures exist), with the images referenced under ``image_dir``. A metric the results
    lack shows as n/a."""
    folder = Path(folder)
    results_path = folder / RESULTS_NAME
    if not results_path.exists() and not results_path.is_symlink():
        raise FileNotFoundError(f'{results_path} not found: write the report with validate.py --report {folder}')
    check_regular_file_inside(results_path, folder, 'read')
    try:
        results = json.loads(results_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{results_path} is not a results file: {e}') from e
    return model_card_section(_check_results(results, results_path), report_picture_files(folder), image_dir,
                              heading_level)
