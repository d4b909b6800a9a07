"""Conversion of the official MixMo checkpoints (listed in :mod:`timm_mimo.models.official`) to timm's Hub format.

Layout of an official checkpoint (``AbstractLearner.save_checkpoint``): a ``torch.save``'d dict
``{'epoch': int, '<name>_state_dict': network weights, '<name>_optimizer_state_dict': SGD state}``, where
``<name>`` is the config's ``model_wrapper.name`` (``classifier`` in every shipped config). The network
weights are named as in ``mixmo/networks/{wrn,resnet}.py``:

============================================  ==============================================
official                                      timm_mimo (:class:`MixMoResNet`)
============================================  ==============================================
``conv1.weight`` (M = 1)                      ``stem.weight``
``list_conv1.<k>.weight`` (member k)          ``stem.weight`` rows ``k*C:(k+1)*C`` (C = stem channels)
``layer<s>.<b>.{bn1,bn2}.*``                  ``stages.<s-1>.<b>.{norm1,norm2}.*``
``layer<s>.<b>.{conv1,conv2}.weight``         ``stages.<s-1>.<b>.{conv1,conv2}.weight``
``layer<s>.<b>.shortcut.0.weight``            ``stages.<s-1>.<b>.shortcut.weight``
``bn1.*`` (WideResNet's final BN)             ``norm.0.*``
``fc.{weight,bias}`` (M = 1)                  ``head.fc.{weight,bias}``
``list_fc.<k>.{weight,bias}`` (member k)      ``head.fc.*`` rows ``k*K:(k+1)*K`` (K = classes)
============================================  ==============================================

A ``module.`` prefix (weights saved from ``nn.DataParallel``) is removed first.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..models.official import DATASETS, OFFICIAL_LICENSE, OFFICIAL_REPO, OFFICIAL_ROWS, PAPER, PAPER_URL, OfficialRow, \
    official_row


# ------------------------------------------------------------------------------------------------------
# reading a checkpoint and mapping its keys

class OfficialCheckpointError(ValueError):
    """Not a checkpoint of the official MixMo code, or one that does not fit the requested model."""


def read_official_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Optional[int]]:
    """(network weights, epoch) of an official checkpoint, read with ``torch.load(weights_only=True)``."""
    import pickle
    from ..models.weights import UnsafeCheckpointError, unpickling_reason
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'official checkpoint not found: {path}')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f'refusing to load {path}: it is not a plain tensor checkpoint (weights_only '
                                    f'load failed: {unpickling_reason(e, path)})') from e
    except Exception as e:  # noqa: BLE001  (truncated files, zip errors, foreign formats)
        raise OfficialCheckpointError(f'cannot read {path} as a torch checkpoint: {type(e).__name__}: '
                                      f'{" ".join(str(e).split())[:200]}') from e
    found = sorted(k for k in data if isinstance(k, str) and k.endswith('_state_dict')
                   and not k.endswith('_optimizer_state_dict')) if isinstance(data, dict) else []
    if len(found) != 1 or not isinstance(data[found[0]], dict):
        what = f'keys {sorted(map(str, data))[:8]}' if isinstance(data, dict) else f'a {type(data).__name__}'
        raise OfficialCheckpointError(
            f'{path} is not a checkpoint of the official MixMo code (a dict with one "<name>_state_dict" entry, '
            f'e.g. classifier_state_dict, next to "epoch"): it holds {what}')
    weights = data[found[0]]
    if weights and all(k.startswith('module.') for k in weights):
        weights = {k[len('module.'):]: v for k, v in weights.items()}
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f'{path}: {found[0]} holds non-tensor entries: {", ".join(bad)}')
    epoch = data.get('epoch')
    return weights, epoch if isinstance(epoch, int) else None


_BLOCK_RE = re.compile(r'layer(\d+)\.(\d+)\.(bn1|bn2|conv1|conv2|shortcut\.0)\.(\w+)')
_BLOCK_PARTS = {'bn1': 'norm1', 'bn2': 'norm2', 'conv1': 'conv1', 'conv2': 'conv2', 'shortcut.0': 'shortcut'}
_MEMBER_RE = re.compile(r'list_(conv1|fc)\.(\d+)\.(weight|bias)')


def official_num_members(weights: Dict[str, torch.Tensor]) -> int:
    """M of an official network: its number of ``list_conv1`` encoders, 1 for a plain ``conv1``."""
    members = {int(m.group(2)) for m in map(_MEMBER_RE.fullmatch, weights) if m and m.group(1) == 'conv1'}
    return len(members) or 1


def _our_key(key: str) -> Optional[str]:
    """Our name for an official key that maps one to one; None for member keys and unknown keys."""
    block = _BLOCK_RE.fullmatch(key)
    if block:
        stage, index, part, leaf = block.groups()
        return f'stages.{int(stage) - 1}.{index}.{_BLOCK_PARTS[part]}.{leaf}' if int(stage) >= 1 else None
    if key.startswith('bn1.'):
        return 'norm.0.' + key[len('bn1.'):]
    return {'conv1.weight': 'stem.weight', 'fc.weight': 'head.fc.weight', 'fc.bias': 'head.fc.bias'}.get(key)


def convert_state_dict(weights: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], num_members: int,
                       description: str) -> Dict[str, torch.Tensor]:
    """Official network weights renamed (and member tensors stacked) into ``target``'s keys and shapes.

    ``target`` is our model's ``state_dict()`` (only names and shapes are read), ``num_members`` its M.
    Every official key must map to a key of ``target`` with the same shape and every key of ``target``
    must be filled, else one :class:`OfficialCheckpointError` line names all unmapped, missing and
    mis-shaped keys.
    """
    out: Dict[str, torch.Tensor] = {}
    members: Dict[str, Dict[int, torch.Tensor]] = {}
    unmapped: List[str] = []
    for key, value in weights.items():
        member = _MEMBER_RE.fullmatch(key)
        if member and int(member.group(2)) < num_members:
            kind, index, leaf = member.groups()
            members.setdefault(('stem.' if kind == 'conv1' else 'head.fc.') + leaf, {})[int(index)] = value
            continue
        ours = None if member else _our_key(key)
        if ours is None or ours not in target or ours in out:
            unmapped.append(key)
        else:
            out[ours] = value
    missing: List[str] = []
    shapes: List[str] = []
    for ours, by_index in members.items():
        official_name = f'list_{"conv1" if ours.startswith("stem") else "fc"}.{{}}.{ours.rsplit(".", 1)[1]}'
        if ours in out or ours not in target:
            unmapped.extend(official_name.format(i) for i in sorted(by_index))
            continue
        # member k's output channels / classes are rows k*C:(k+1)*C of our stacked tensor
        member_shape = (target[ours].shape[0] // num_members, *target[ours].shape[1:])
        absent = [f'{official_name.format(i)} (for {ours})' for i in range(num_members) if i not in by_index]
        wrong = [f'{official_name.format(i)} {tuple(v.shape)} (model: {member_shape} per member)'
                 for i, v in sorted(by_index.items()) if tuple(v.shape) != member_shape]
        missing.extend(absent)
        shapes.extend(wrong)
        if not absent and not wrong:
            out[ours] = torch.cat([by_index[i] for i in range(num_members)], 0)
    missing += [k for k in target if k not in out and k not in members]
    shapes += [f'{k} {tuple(v.shape)} (model: {tuple(target[k].shape)})' for k, v in out.items()
               if tuple(v.shape) != tuple(target[k].shape)]
    if unmapped or missing or shapes:
        problems = [f'{label} ({len(keys)}): {", ".join(keys)}' for label, keys in (
            ('unmapped official keys', unmapped), ('keys of the model the checkpoint does not fill', missing),
            ('shapes that differ', shapes)) if keys]
        raise OfficialCheckpointError(f'the official checkpoint does not fit {description}: ' + '; '.join(problems))
    return {k: out[k] for k in target}


# ------------------------------------------------------------------------------------------------------
# conversion to timm's Hub format

@dataclass
class Conversion:
    folder: Path
    name: str  # arch.tag
    num_members: int
    num_classes: int
    row: Optional[OfficialRow]
    measured: Optional[dict]  # validate.py's results, when evaluated


def _sha256(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def paper_line(row: Optional[OfficialRow]) -> str:
    if row is None:
        return 'no row of the official README (no released checkpoint is listed for this model and tag)'
    seeds = ' / '.join(f'{v:.2f}' for v in row.top1)
    return f'{row.method} on {DATASETS[row.dataset][1]}: top-1 {seeds} %' + (
        f' ({len(row.top1)} seeds, one checkpoint each)' if len(row.top1) > 1 else '')


def model_card(model, name: str, row: Optional[OfficialRow], source: Path, sha256: str, epoch: Optional[int],
               measured: Optional[dict]) -> str:
    """README.md: timm's front matter, provenance, the paper's row, the measured metrics, usage, citation."""
    from ..constants import hub_id
    from .card import CITATIONS, HUB_DATASETS, card_head, metrics_table
    from ..eval.report import code_span, markdown_text
    arch, tag = name.split('.', 1)
    cfg = model.pretrained_cfg
    num_members = model.num_members
    dataset_key = row.dataset if row else next((d for d in DATASETS if tag == d or tag.endswith(f'_{d}')), None)
    dataset = DATASETS[dataset_key][1] if dataset_key else 'the data set of its tag'
    details = {
        'Model Type': 'Image classification' + (f', multi-input multi-output (MIMO) ensemble of M = {num_members} '
                                                 f'subnetworks in one network' if num_members > 1 else ''),
        'Architecture': f'{arch} (timm_mimo)',
        'Members (M)': num_members,
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        'Image size': 'x'.join(str(s) for s in cfg['input_size'][1:]),
        'Classes': model.num_classes,
        'Papers': [f'{PAPER}: {PAPER_URL}'],
        'Original': OFFICIAL_REPO,
    }
    if dataset_key in HUB_DATASETS:
        details['Dataset'] = HUB_DATASETS[dataset_key]  # timm's generate_readme lists it as the card's `datasets:`
    origin = (f'the checkpoint its authors released for the README row "{row.method}" on {dataset}' if row else
              'a checkpoint written by that code')
    description = (f'Weights of the official MixMo code ({OFFICIAL_REPO}), {origin}, converted to timm_mimo\'s '
                   f'`{arch}` by `hub/convert_official.py`. The tensors are the official ones, renamed, with the M '
                   f'member encoders and heads stacked into one tensor each; nothing was retrained.')
    tags = ['image-classification', 'timm', 'timm_mimo', 'mixmo'] + (['mimo'] if num_members > 1 else [])
    text = card_head(name, tags, OFFICIAL_LICENSE, details, description)
    text += '\n## Provenance\n\n'
    if row:
        seeds = ', '.join(f'{v:.2f} %: {row.url(i)}' for i, v in enumerate(row.top1))
        text += (f'- Checkpoint: linked by the README of {OFFICIAL_REPO} ("Results and available checkpoints"; '
                 f'{seeds}), trained with its config `{row.config}`\n')
    else:
        text += f'- Code: {OFFICIAL_REPO}; not one of the checkpoints its README lists\n'
    text += f'- Paper: {PAPER}, {PAPER_URL}\n'
    text += f'- Source file: {code_span(source.name)}, sha256 `{sha256}`' + (
        f', saved at epoch {epoch}' if epoch else '') + '\n'
    text += (f'- License: the official repository is Apache-2.0 and its README links the checkpoints without other '
             f'terms, so they are redistributed here under Apache-2.0, changed as described above (renamed and '
             f'stacked); {dataset} keeps its own terms\n')
    text += '\n## Results\n\n'
    text += f'Reported by the official README for this row: {paper_line(row)}.\n'
    if measured:
        split = measured['split']
        text += (f'\nMeasured on these converted weights by timm_mimo\'s `validate.py` '
                 f'({markdown_text(measured.get("dataset"))}, {markdown_text(split)} split): top-1/top-5 accuracy in %, NLL, ECE (15 bins), Brier, each member\'s top-1 and '
                 f'the ensemble\'s gain over the best member.\n\n')
        text += metrics_table({split: measured[split]}) + '\n'
    else:
        text += '\nNot measured at conversion (`hub/convert_official.py --dataset` measures and records it).\n'
    text += f"""
## Model Usage

The architecture is defined by the `timm_mimo` package (a timm plugin): install it and **import it before
calling `timm.create_model`**.

```python
import timm
import timm_mimo  # registers the timm_mimo architectures with timm: import it first

model = timm.create_model('{name}', pretrained=True).eval()  # or 'hf-hub:{hub_id(arch, tag)}'
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
logits = model(x)  # ensemble logits (B, {model.num_classes})
```

## Citation
```bibtex
{CITATIONS['mixmo']}
```
"""
    return text


def _evaluate(folder: Path, dataset: str, data_dir: Optional[str], split: Optional[str], batch_size: int,
              download: bool) -> dict:
    """validate.py's results for the converted folder, measured in this process by :func:`timm_mimo.eval.evaluate`
    (quietly: the converter prints its own summary)."""
    from ..cli import USER_ERRORS
    from ..eval import DataSettings, EvalOptions, evaluate
    try:
        return evaluate(folder, DataSettings(dataset=dataset, data_dir=data_dir, download=download, split=split),
                        options=EvalOptions(batch_size=batch_size, progress=False), log=lambda line: None)
    except USER_ERRORS as e:
        raise ValueError(f'evaluating the converted weights failed: {e}') from e


def convert(source, out_dir, model_name: str, num_classes: int, tag: Optional[str] = None,
            dataset: Optional[str] = None, data_dir: Optional[str] = None, split: Optional[str] = None,
            verify: bool = False, tolerance: float = 0.5, batch_size: int = 256, overwrite: bool = False,
            dataset_download: bool = False) -> Conversion:
    """Official checkpoint ``source`` -> ``out_dir`` (model.safetensors, config.json, README.md).

    The folder is written under a temporary name next to ``out_dir`` and renamed into place only once it
    is complete and checked: it loads back with timm's ``local-dir:`` and gives the converted outputs;
    with ``dataset``, :func:`timm_mimo.eval.evaluate` measures it as validate.py does and the card records the
    metrics; with ``verify``, the
    measured top-1 must be within ``tolerance`` points of one of the paper's values for the row.
    """
    import timm
    from timm.models import save_for_hf, split_model_name_tag
    from .export import check_round_trip
    from ..rundir import atomic_dir

    arch, name_tag = split_model_name_tag(model_name)
    if name_tag and tag and name_tag != tag:
        raise ValueError(f'--model {model_name} names the tag {name_tag}, --tag says {tag}')
    tag = tag or name_tag or next((t for t, (k, _) in DATASETS.items() if k == num_classes), None)
    if not timm.is_model(arch) or not arch.startswith(('wrn', 'preactresnet')) or \
            timm.models.model_entrypoint(arch).__module__ != 'timm_mimo.models.mixmo_resnets':
        raise ValueError(f'--model {arch}: official MixMo checkpoints convert to the WideResNet and PreActResNet '
                         f'models of timm_mimo only (wrn28_10, wrn28_10_mixmo2, preactresnet18_w2_mixmo2, ...)')
    if not tag:
        raise ValueError(f'no tag for {num_classes} classes: give --tag')
    registered = timm.models.get_arch_pretrained_cfgs(arch)
    if f'{arch}.{tag}' not in registered:
        raise ValueError(f'{arch}.{tag} is not a registered tag; tags of {arch}: '
                         f'{", ".join(n.split(".", 1)[1] for n in registered)}')
    if registered[f'{arch}.{tag}'].num_classes != num_classes:
        raise ValueError(f'{arch}.{tag} has {registered[f"{arch}.{tag}"].num_classes} classes, not {num_classes}')
    if verify and dataset is None:
        raise ValueError('--verify evaluates the converted model: give --dataset (and --data-dir)')
    row = official_row(arch, tag)
    if verify and row is None:
        raise ValueError(f'--verify compares with the paper, which has no row for {arch}.{tag}: official tags of '
                         f'{arch}: {", ".join(r.tag for r in OFFICIAL_ROWS if r.arch == arch) or "none"}')
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise FileExistsError(f'{out_dir} exists and is not an empty folder: pass --overwrite to replace it')
    source = Path(source)
    if out_dir.resolve() in source.resolve().parents:
        raise ValueError(f'{out_dir} holds the checkpoint {source}: writing there would replace it, choose another')
    weights, epoch = read_official_checkpoint(source)

    model = timm.create_model(f'{arch}.{tag}', num_classes=num_classes).eval()
    members = official_num_members(weights)
    if members != model.num_members:
        raise OfficialCheckpointError(f'{source} holds an official network with M = {members} subnetworks, {arch} '
                                      f'has M = {model.num_members}: choose the {arch} of M = {members}')
    state = convert_state_dict(weights, model.state_dict(), model.num_members,
                               f'{arch} (M = {model.num_members}, {num_classes} classes)')
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = dict(model.pretrained_cfg, license=OFFICIAL_LICENSE)
    name = f'{arch}.{tag}'

    with atomic_dir(out_dir) as tmp:
        save_for_hf(model, str(tmp), model_args=dict(num_members=model.num_members), safe_serialization=True)
        check_round_trip(model, tmp)
        measured = _evaluate(tmp, dataset, data_dir, split, batch_size, dataset_download) \
            if dataset is not None else None
        if verify:
            top1 = measured[measured['split']]['top1']
            if min(abs(top1 - v) for v in row.top1) > tolerance:
                raise ValueError(f'verify failed: measured top-1 {top1:.2f} % on {measured.get("dataset")}, the paper '
                                 f'reports {paper_line(row)}: more than {tolerance} points apart')
        (tmp / 'README.md').write_text(model_card(model, name, row, source, _sha256(source), epoch, measured),
                                       encoding='utf-8')
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f'{out_dir} appeared while converting: not replaced')
    return Conversion(out_dir, name, model.num_members, num_classes, row, measured)
