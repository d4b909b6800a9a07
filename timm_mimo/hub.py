"""Publishing trained models to the Hugging Face Hub, and loading them back with timm.

Loading (``import timm_mimo`` first: timm has no plugin discovery, our architectures exist in its registry
only once this package is imported, and that holds for ``hf-hub:`` and ``local-dir:`` names too)::

    import timm
    import timm_mimo
    timm.create_model('wrn28_10_mixmo2.cifar100', pretrained=True)   # '<HUB_ORG>/wrn28_10_mixmo2.cifar100'
    timm.create_model('hf-hub:my-org/my-model', pretrained=True)      # any repository in timm's format
    timm.create_model('local-dir:/path/to/export', pretrained=True)   # a folder written by export()

Publishing: :func:`export` turns a training run (``train.py``'s output folder) or a checkpoint into a folder
in timm's Hub format: ``model.safetensors``, ``config.json`` (written by timm's ``save_config_for_hf``) and a
``README.md`` model card with the run's metrics. :func:`push` exports, then lets ``huggingface_hub`` create
the repository and upload exactly those three files. ``hub/export.py`` and ``hub/push.py`` are the command
lines. Weights are read with safetensors or ``torch.load(weights_only=True)`` only (``engine.load_weights``).

:func:`create_model` is ``timm.create_model`` with one-line errors for weights that cannot be found
(unpublished repository, offline without a cached copy) and for architectures timm does not know.
"""
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import yaml

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models._hub import generate_readme

from .constants import HUB_NAME_RE, hub_id
from .engine import STATE_FILE, complete_checkpoints, is_mimo, load_model_folder, load_weights, replace_dir, \
    save_weights_and_config

# what an export folder holds, and all that push uploads
EXPORT_FILES = ('README.md', 'config.json', 'model.safetensors')
DEFAULT_LICENSE = 'apache-2.0'
# Hub data sets of the pretrained tags, for the card's metadata
HUB_DATASETS = {'cifar10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100'}
TAG_RE = re.compile(r'[a-z0-9][a-z0-9_]*')


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message is one line and never holds the token."""


# ------------------------------------------------------------------------------------------------------
# loading: timm.create_model with errors that say what to do

def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` whose failures to find weights or an architecture are one-line ``ValueError``s.

    - unpublished or private repository, missing revision or weights file: the message names the repository;
    - offline (``HF_HUB_OFFLINE=1`` or no network) without a cached copy: it says so, with the cache folder;
    - an architecture timm does not know (``hf-hub:`` / ``local-dir:`` of one of ours without
      ``import timm_mimo``, or another plugin's model): it says to import the plugin first.
    """
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):
            raise ValueError(
                f'{message}: not in timm\'s registry. timm_mimo architectures are registered by "import timm_mimo", '
                f'which must run before timm.create_model (for hf-hub: and local-dir: names too)') from e
        if message.startswith('Invalid pretrained tag'):
            arch = split_model_name_tag(model_name)[0]
            tags = [n.partition('.')[2] for n in timm.models.get_arch_pretrained_cfgs(arch)]
            raise ValueError(f'{message} Tags: {", ".join(tags) or "none"}') from e
        raise
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled,
            HfHubHTTPError) as e:
        repo = _weights_repo(model_name)
        what = f'pretrained weights for {model_name}'
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            from huggingface_hub import constants
            message = (f'{what} ({repo}) are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the '
                       f'Hub could not be reached (offline or HF_HUB_OFFLINE=1): download them once with network '
                       f'access, or load a local export with local-dir:')
        elif isinstance(e, GatedRepoError):
            message = f'{what}: the Hub repository {repo} is gated: accept its terms on the Hub and log in'
        elif isinstance(e, RepositoryNotFoundError):
            message = (f'{what}: the Hugging Face Hub repository {repo} does not exist (not published yet?) or is '
                       f'private (then log in with `hf auth login` or set HF_TOKEN)')
        elif isinstance(e, RevisionNotFoundError):
            message = f'{what}: the revision is not in the Hub repository {repo}'
        elif isinstance(e, EntryNotFoundError):
            message = f'{what}: the Hub repository {repo} has no weights file (model.safetensors)'
        else:
            message = f'{what}: the Hub refused the download of {repo}: {_one_line(e)}'
        raise ValueError(redact(message)) from e


def _weights_repo(model_name: str) -> str:
    """The repository ``model_name`` loads from: the ``hf-hub:`` id, or the registered tag's ``hf_hub_id``."""
    if model_name.startswith(('hf-hub:', 'hf_hub:')):
        return model_name.partition(':')[2]
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        cfg = None
    return (cfg.hf_hub_id if cfg is not None else None) or model_name


# ------------------------------------------------------------------------------------------------------
# what is being exported: weights, their run, their metrics

@dataclass
class Checkpoint:
    """Weights to export and their context. ``which``: best / last / ema (of a run), checkpoint, folder, file."""
    weights: Path
    which: str
    run_dir: Optional[Path] = None
    epoch: Optional[int] = None  # completed epochs, for checkpoint-NNNN folders


def resolve_checkpoint(source, which: str = 'best') -> Checkpoint:
    """A training folder (its ``which`` weights), a model folder (config.json + model.safetensors) or a file."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.is_dir() and (path / 'args.yaml').exists():  # train.py's output folder
        if which == 'last':
            found = complete_checkpoints(path)
            if not found:
                raise FileNotFoundError(f'no complete checkpoint in {path}')
            return Checkpoint(found[-1], 'last', path)
        if not (path / which / 'config.json').exists():
            raise FileNotFoundError(f'{path} has no {which}/ model folder' +
                                    (' (train with --model-ema)' if which == 'ema' else ''))
        return Checkpoint(path / which, which, path)
    if path.is_dir():
        if not (path / 'config.json').exists():
            raise FileNotFoundError(f'{path} is neither a training folder (args.yaml) nor a model folder (config.json)')
        run_dir = path.parent if (path.parent / 'args.yaml').exists() else None
        if (path / STATE_FILE).exists():
            state = json.loads((path / STATE_FILE).read_text())
            epoch = state['epoch'] if not state.get('step') else None  # a mid-epoch checkpoint has no metrics
            return Checkpoint(path, 'checkpoint', run_dir, epoch)
        if run_dir is not None and path.name in ('best', 'ema'):
            return Checkpoint(path, path.name, run_dir)
        return Checkpoint(path, 'folder', run_dir)
    return Checkpoint(path, 'file')


def load_results(checkpoint: Checkpoint, results: Optional[str] = None) -> dict:
    """The metrics of ``checkpoint``'s weights: ``{'epoch', 'splits': {split: metrics}, 'meta': ...}``.

    From the run's ``results.json`` (train.py: best and last epochs, EMA) or from ``results`` (train.py's or
    validate.py's ``--results-file`` format).
    """
    if results is not None:
        path = Path(results)
        if not path.exists():
            raise FileNotFoundError(f'results file not found: {path}')
    elif checkpoint.run_dir is not None:
        path = checkpoint.run_dir / 'results.json'
        if not path.exists():
            raise FileNotFoundError(
                f'no results.json in {checkpoint.run_dir}: the model card needs the run\'s metrics (train.py writes '
                f'them when the run completes; or evaluate with validate.py --results-file F and pass --results F)')
    else:
        raise FileNotFoundError(
            f'{checkpoint.weights} is not inside a training folder, so there is no results.json: evaluate it with '
            f'validate.py --results-file F and pass --results F')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not a results file: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} is not a results file')

    if 'split' in data and isinstance(data.get(data['split']), dict):  # validate.py --results-file
        splits = {data['split']: data[data['split']]}
        if isinstance(data.get('corruptions'), dict):
            splits['corruptions'] = data['corruptions']
        return dict(epoch=None, splits=splits, meta=data, source=path.name)
    if not isinstance(data.get('best'), dict):
        raise ValueError(f'{path} is neither train.py\'s results.json nor validate.py\'s --results-file')

    which = checkpoint.which
    if which == 'checkpoint' and checkpoint.epoch is not None and checkpoint.epoch == data.get('epochs'):
        which = 'last'  # the final checkpoint holds the last epoch's weights
    if which in ('best', 'last'):
        entry = data.get(which) or {}
        splits = {k: v for k, v in entry.items() if isinstance(v, dict)}
        return dict(epoch=entry.get('epoch'), splits=splits, meta=data, source=path.name)
    if which == 'ema':
        if not isinstance(data.get('ema_validation'), dict):
            raise ValueError(f'{path} has no EMA metrics (ema_validation)')
        return dict(epoch=None, splits={'validation': data['ema_validation']}, meta=data, source=path.name)
    raise ValueError(
        f'{path} has metrics for the best and last epochs of the run only, not for {checkpoint.weights}: '
        f'export the run folder (--which best|last|ema), or evaluate these weights with validate.py '
        f'--results-file F and pass --results F')


def load_model(checkpoint: Checkpoint, model_name: Optional[str] = None,
               num_classes: Optional[int] = None) -> nn.Module:
    """The model of ``checkpoint``, weights read safely; ``model_name`` / ``num_classes`` must agree with it."""
    if checkpoint.which == 'file':
        if not model_name:
            raise ValueError(f'{checkpoint.weights} is a weights file: name its architecture with --model')
        model = create_model(model_name, **({'num_classes': num_classes} if num_classes is not None else {}))
        load_weights(model, checkpoint.weights)
        return model
    try:
        model = load_model_folder(checkpoint.weights)
    except RuntimeError as e:  # timm's, e.g. an architecture it cannot build from this config
        raise ValueError(f'cannot build the model of {checkpoint.weights}: {_one_line(e)}') from e
    arch = model.pretrained_cfg.get('architecture')
    if model_name and split_model_name_tag(model_name)[0] != arch:
        raise ValueError(f'{checkpoint.weights} holds a {arch}, not a {split_model_name_tag(model_name)[0]}')
    if num_classes is not None and num_classes != model.num_classes:
        raise ValueError(f'{checkpoint.weights} predicts {model.num_classes} classes, not {num_classes}')
    return model


def dataset_tag(dataset: str) -> Optional[str]:
    """The pretrained tag of a train.py dataset name or description (cifar10, cifar100, tiny_imagenet)."""
    name = (dataset or '').lower().replace('-', '').replace('_', '')
    if 'cifar100' in name:
        return 'cifar100'
    if 'cifar10' in name:
        return 'cifar10'
    if 'tinyimagenet' in name:
        return 'tiny_imagenet'
    return None


# ------------------------------------------------------------------------------------------------------
# the model card

# bibtex of the methods a model may use; which apply is decided by citation_keys()
CITATIONS = {
    'mixmo': """@inproceedings{rame2021mixmo,
  title={MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks},
  author={Ram{\\'e}, Alexandre and Sun, R{\\'e}my and Cord, Matthieu},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2021}
}""",
    'mixvit': """@misc{sun2022mixvit,
  title={Reconciling feature sharing and multiple predictions with {MIMO} Vision Transformers},
  author={Sun, R{\\'e}my and Ram{\\'e}, Alexandre and Masson, Cl{\\'e}ment and Thome, Nicolas and Cord, Matthieu},
  howpublished={OpenReview preprint, submitted to ICLR 2023},
  url={https://openreview.net/forum?id=pOq1HuMI8Dz},
  year={2022}
}""",
    'automix': """@inproceedings{liu2022automix,
  title={AutoMix: Unveiling the Power of Mixup for Stronger Classifiers},
  author={Liu, Zicheng and Li, Siyuan and Wu, Di and Liu, Zihan and Chen, Zhiyuan and Wu, Lirong and Li, Stan Z.},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}""",
}
PAPERS = {
    'mixmo': 'MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep Subnetworks (ICCV 2021): '
             'https://arxiv.org/abs/2103.06132',
    'mixvit': 'Reconciling feature sharing and multiple predictions with MIMO Vision Transformers: '
              'https://openreview.net/forum?id=pOq1HuMI8Dz',
    'automix': 'AutoMix: Unveiling the Power of Mixup for Stronger Classifiers (ECCV 2022): '
               'https://arxiv.org/abs/2103.13027',
}


def citation_keys(architecture: str, pretrained_cfg: dict, run_args: dict) -> List[str]:
    """The papers a model rests on: its architecture family (name and cfg paper ids) and its training mix."""
    paper_ids = str(pretrained_cfg.get('paper_ids') or '')
    keys = []
    if '_mixmo' in architecture or '2103.06132' in paper_ids:
        keys.append('mixmo')
    if '_mixvit' in architecture or 'pOq1HuMI8Dz' in paper_ids:
        keys.append('mixvit')
    if any('automix' in str(v).lower() for k, v in run_args.items() if k not in _PRIVATE_ARGS and v) \
            or '2103.13027' in paper_ids:
        keys.append('automix')
    return keys


# train.py arguments that are local (paths, logging) and stay out of the card
_PRIVATE_ARGS = {'config', 'data_dir', 'output', 'experiment', 'resume', 'initial_checkpoint', 'debug',
                 'log_tensorboard', 'workers', 'dataset_download', 'checkpoint_hist', 'device'}
_PATH_RE = re.compile(r'(?<![\w.])(?:~|[A-Za-z]:)?[/\\][^\s:,;()]+')


def _scrub_paths(value):
    """Local paths in free text (a dataset description, say) reduced to their last component."""
    if isinstance(value, (list, tuple)):
        return [_scrub_paths(v) for v in value]
    if not isinstance(value, str):
        return value
    return _PATH_RE.sub(lambda m: re.split(r'[/\\]', m.group(0).rstrip('/\\'))[-1] or '<path>', value)


def training_recipe(run_args: dict) -> dict:
    """train.py arguments that describe the recipe (reusable with ``train.py -c``), without local paths."""
    recipe = {}
    for key, value in run_args.items():
        if key in _PRIVATE_ARGS or value is None:  # None: train.py's default
            continue
        recipe[key] = _scrub_paths(value)
    if run_args.get('initial_checkpoint'):
        recipe['initial_checkpoint'] = '<a local checkpoint>'
    return recipe


def _fmt(value, digits: int) -> str:
    return f'{value:.{digits}f}' if isinstance(value, (int, float)) else '-'


def metrics_table(splits: Dict[str, dict]) -> str:
    rows = ['| split | top-1 (%) | top-5 (%) | NLL | ECE | Brier | member top-1 (%) | ensemble gain (pts) |',
            '|---|---|---|---|---|---|---|---|']
    for split, m in splits.items():
        members = ' / '.join(_fmt(a, 2) for a in m.get('member_top1') or []) or '-'
        rows.append(f'| {split} | {_fmt(m.get("top1"), 2)} | {_fmt(m.get("top5"), 2)} | {_fmt(m.get("nll"), 4)} | '
                    f'{_fmt(m.get("ece"), 4)} | {_fmt(m.get("brier"), 4)} | {members} | '
                    f'{_fmt(m.get("ensemble_gain"), 2)} |')
    return '\n'.join(rows)


def model_card(model: nn.Module, name: str, results: dict, run_args: dict, repo_id: Optional[str],
               license: str) -> str:
    """README.md for the Hub: timm's front matter and details, then results, recipe, usage, license, citations."""
    cfg = model.pretrained_cfg
    arch, tag = cfg['architecture'], cfg.get('tag')
    num_members = getattr(model, 'num_members', 1)
    meta = results['meta']
    dataset = _scrub_paths(meta.get('dataset') or run_args.get('dataset') or 'unknown')
    keys = citation_keys(arch, cfg, run_args)
    details = {
        'Model Type': f'Image classification, multi-input multi-output (MIMO) ensemble of M = {num_members} '
                      f'subnetworks in one network' if num_members > 1 else 'Image classification',
        'Architecture': f'{arch} (timm_mimo)',
        'Members (M)': num_members,
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        'Image size': 'x'.join(str(s) for s in cfg['input_size'][1:]),
        'Classes': model.num_classes,
    }
    if tag in HUB_DATASETS:
        details['Dataset'] = HUB_DATASETS[tag]  # timm's generate_readme also lists it as the card's `datasets:`
    details['Training data'] = dataset
    if keys:
        details['Papers'] = [PAPERS[k] for k in keys]
    tags = ['image-classification', 'timm', 'timm_mimo'] + (['mimo'] if num_members > 1 else []) + keys
    description = f'A {arch} trained with timm_mimo, a timm plugin for multi-input multi-output networks, on {dataset}.'
    if num_members > 1:
        averaged = 'logits' if getattr(model, 'ensemble', 'logits') == 'logits' else 'probabilities'
        description += (f' It holds M = {num_members} subnetworks that share one core: one forward pass of an image '
                        f'gives {num_members} predictions, whose {averaged} are averaged into the output.')
    # timm's own card layout (front matter, description, details), then the sections it has no slot for
    text = generate_readme(dict(tags=tags, license=license, details=details, description=description), name)

    epoch = results.get('epoch')
    text += '\n## Results\n'
    text += (f'\nMetrics of these weights ({"epoch " + str(epoch) + ", " if epoch is not None else ""}from '
             f'`{results["source"]}`): top-1/top-5 accuracy in %, negative log-likelihood (NLL), expected '
             f'calibration error (ECE, 15 bins), Brier score, each member\'s top-1 and the ensemble\'s gain over the '
             f'best member.\n\n')
    text += metrics_table(results['splits']) + '\n'

    text += '\n## Training\n'
    recipe = training_recipe(run_args)
    if recipe:
        runtime = ''
        seconds = meta.get('wall_time_s')
        if isinstance(seconds, (int, float)):
            took = f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'
            runtime = f' The run took {took} on {meta.get("processes", 1)} process(es) ({meta.get("device", "?")}).'
        text += (f'\nTrained with timm_mimo\'s `train.py` on {dataset}.{runtime} The arguments below (train.py\'s '
                 f'flag names; local paths and defaults left out) reproduce the run with `python train.py -c '
                 f'recipe.yaml` (plus `--data-dir` for data read from disk):\n\n'
                 f'```yaml\n{yaml.safe_dump(recipe, sort_keys=False).strip()}\n```\n')
    else:
        text += '\nThe training arguments were not recorded with these weights.\n'

    if repo_id and tag and repo_id == hub_id(arch, tag):  # the registered name resolves to this repository
        load = f"model = timm.create_model('{arch}.{tag}', pretrained=True).eval()  # or 'hf-hub:{repo_id}'"
    elif repo_id:
        load = f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"
    else:
        load = "model = timm.create_model('local-dir:/path/to/this/folder', pretrained=True).eval()"
    text += f"""
## Model Usage

The architecture is defined by the `timm_mimo` package (a timm plugin): install it, and **import it before
calling `timm.create_model`** (timm only knows the models of imported plugins; without the import timm
raises `Unknown model ({arch})`).

```python
import timm
import timm_mimo  # registers the timm_mimo architectures with timm: import it first
from PIL import Image

{load}
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
x = transform(Image.open('image.png').convert('RGB')).unsqueeze(0)
logits = model(x)  # ensemble logits (1, {model.num_classes})
"""
    if num_members > 1:
        text += f'members = model.forward_members(x)  # logits of each member (1, {num_members}, {model.num_classes})\n'
    text += '```\n'

    text += (f'\n## License\n\nThe weights are released under the `{license}` license. The code that defines and '
             f'trained them, timm_mimo, is Apache-2.0. The training data keeps its own terms.\n')
    if keys:
        text += '\n## Citation\n'
        for key in keys:
            text += f'```bibtex\n{CITATIONS[key]}\n```\n'
    return text


# ------------------------------------------------------------------------------------------------------
# export and push

@dataclass
class ExportResult:
    folder: Path
    architecture: str
    tag: Optional[str]
    num_members: int
    num_classes: int
    files: List[str] = field(default_factory=lambda: list(EXPORT_FILES))


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the Hub accepts it, else a ``ValueError``."""
    org, sep, name = str(repo_id).partition('/')
    if not sep or not HUB_NAME_RE.fullmatch(org) or not HUB_NAME_RE.fullmatch(name) or '--' in repo_id \
            or '..' in repo_id or name.endswith('.git') or len(repo_id) > 96:
        raise ValueError(f'repository id {repo_id!r} is not of the form org/name (letters, digits, "-", "_" and '
                         f'"." in each part)')
    return repo_id


def _check_destination(out_dir: Path, overwrite: bool, source: Path):
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} exists and is not a folder')
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'export folder {out_dir} exists and is not empty: pass --overwrite to replace it')
    out, src = out_dir.resolve(), source.resolve()
    if out == src or out in src.parents:
        raise ValueError(f'export folder {out_dir} would replace the checkpoint {source} itself: choose another')


def _check_registered_defaults(model: nn.Module, name: str, repo_id: str):
    """``pretrained=True`` on a registered name builds the registered defaults and ignores the repository's
    config.json: weights published there must fit that model exactly, or they would load into another one."""
    with torch.device('meta'):  # shapes and attributes only, no initialisation
        default = timm.create_model(name)
    differences = [f'{attr}={getattr(model, attr, None)!r} (registered: {getattr(default, attr, None)!r})'
                   for attr in ('num_classes', 'num_members', 'ensemble', 'in_chans')
                   if getattr(model, attr, None) != getattr(default, attr, None)]
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (model, default)]
    if shapes[0] != shapes[1]:
        differences.append('other layers or shapes')
    if differences:
        raise ValueError(
            f'{repo_id} is where timm.create_model(\'{name}\', pretrained=True) loads from, with the registered '
            f'defaults, but this checkpoint differs ({", ".join(differences)}): publish it under another '
            f'repository id and load it with hf-hub:')


def _check_round_trip(model: nn.Module, folder: Path):
    """The folder loads back with timm's own ``local-dir:`` and gives the same outputs as ``model``."""
    loaded = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()
    model.eval()
    x = torch.randn((2, *model.pretrained_cfg['input_size']), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.allclose(model(x), loaded(x), rtol=1e-5, atol=1e-6)
        if same and is_mimo(model):
            same = torch.allclose(model.forward_members(x), loaded.forward_members(x), rtol=1e-5, atol=1e-6)
    if not same:
        raise ValueError(f'export check failed: the model loaded back from {folder} gives other outputs')


def export(source, out_dir, *, which: str = 'best', model_name: Optional[str] = None,
           num_classes: Optional[int] = None, results: Optional[str] = None, tag: Optional[str] = None,
           license: Optional[str] = None, repo_id: Optional[str] = None, overwrite: bool = False) -> ExportResult:
    """Write ``source`` (training folder, checkpoint folder or weights file) to ``out_dir`` in timm's Hub format.

    ``out_dir`` is written as a temporary sibling folder and renamed into place once complete and checked
    (it loads back with ``local-dir:`` and reproduces the outputs); an existing non-empty ``out_dir`` is only
    replaced with ``overwrite``. ``tag`` defaults to the run's dataset (cifar10, cifar100, tiny_imagenet);
    ``repo_id`` only shapes the card's usage snippet.
    """
    out_dir = Path(out_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    if tag is not None and not TAG_RE.fullmatch(tag):
        raise ValueError(f'tag {tag!r} must be lower-case letters, digits and "_" (e.g. cifar100)')
    checkpoint = resolve_checkpoint(source, which)
    if checkpoint.which == 'file' and not model_name:
        raise ValueError(f'{checkpoint.weights} is a weights file: name its architecture with --model')
    _check_destination(out_dir, overwrite, checkpoint.weights)
    run_metrics = load_results(checkpoint, results)
    run_args = {}
    if checkpoint.run_dir is not None and (checkpoint.run_dir / 'args.yaml').exists():
        run_args = yaml.safe_load((checkpoint.run_dir / 'args.yaml').read_text()) or {}

    model = load_model(checkpoint, model_name, num_classes).eval()
    arch = model.pretrained_cfg['architecture']
    num_members = getattr(model, 'num_members', 1)
    meta = run_metrics['meta']
    if meta.get('model') and split_model_name_tag(str(meta['model']))[0] != arch:
        raise ValueError(f'the results are for a {meta["model"]}, the checkpoint is a {arch}')
    if meta.get('num_members') is not None and meta['num_members'] != num_members:
        raise ValueError(f'the results are for M = {meta["num_members"]} members, the checkpoint has {num_members}')
    for split, metrics in run_metrics['splits'].items():
        if len(metrics.get('member_top1') or [None] * num_members) != num_members:
            raise ValueError(f'the {split} results have {len(metrics["member_top1"])} members, the checkpoint '
                             f'has {num_members}')

    tag = tag or dataset_tag(str(run_args.get('dataset') or '')) or dataset_tag(str(meta.get('dataset') or ''))
    registered = timm.models.get_arch_pretrained_cfgs(arch).get(f'{arch}.{tag}')
    if registered is not None and registered.num_classes != model.num_classes:
        raise ValueError(f'{arch}.{tag} has {registered.num_classes} classes but the checkpoint predicts '
                         f'{model.num_classes}: wrong --tag or checkpoint')
    if repo_id is not None and tag and repo_id == hub_id(arch, tag):
        _check_registered_defaults(model, f'{arch}.{tag}', repo_id)
    license = license or model.pretrained_cfg.get('license') or DEFAULT_LICENSE
    # the source cfg (preprocessing the weights were trained with) is kept; only the tag and license change
    model.pretrained_cfg = dict(model.pretrained_cfg, tag=tag, license=license)
    # constructor arguments: those recorded with the checkpoint (train.py's overrides), M made explicit
    model_args = dict(_saved_model_args(checkpoint))
    if is_mimo(model):
        model_args['num_members'] = num_members
        if model.ensemble != 'logits':
            model_args['ensemble'] = model.ensemble
    name = repo_id.split('/')[-1] if repo_id else (f'{arch}.{tag}' if tag else arch)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        # config.json by timm's save_config_for_hf: saved + recorded constructor arguments, the source cfg
        save_weights_and_config(model, tmp, model_args)
        (tmp / 'README.md').write_text(model_card(model, name, run_metrics, run_args, repo_id, license),
                                       encoding='utf-8')
        _check_round_trip(model, tmp)
        _make_readable(tmp)
        _check_destination(out_dir, overwrite, checkpoint.weights)  # nothing appeared meanwhile
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, arch, tag, num_members, model.num_classes)


def _saved_model_args(checkpoint: Checkpoint) -> dict:
    if checkpoint.which == 'file':
        return {}
    config = json.loads((checkpoint.weights / 'config.json').read_text())
    return dict(config.get('model_args') or {})


def _make_readable(folder: Path):
    """Permissions of a normally created folder (mkdtemp and safetensors make them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def upload_files(folder: Path) -> List[str]:
    """The files of an export folder that push uploads: regular files inside it, never links out of it."""
    folder = Path(folder).resolve()
    for name in EXPORT_FILES:
        path = folder / name
        if path.is_symlink() or not path.is_file() or path.resolve().parent != folder:
            raise ValueError(f'{path} is not a regular file inside the export folder: refusing to upload')
    return list(EXPORT_FILES)


def _token() -> Optional[str]:
    from huggingface_hub import get_token
    try:
        return get_token()
    except Exception:  # noqa: BLE001  (an unusable login is no login; its error may quote the token)
        return None


def redact(text: str) -> str:
    """``text`` without the Hugging Face token (the current one, and anything shaped like one)."""
    token = _token()
    text = str(text)
    if token:
        text = text.replace(token, '***')
    return re.sub(r'hf_[A-Za-z0-9]{20,}', '***', text)


def _size(num_bytes: int) -> str:
    return f'{num_bytes / 1e6:.1f} MB' if num_bytes >= 1e6 else f'{num_bytes / 1e3:.1f} kB'


def _one_line(err: BaseException) -> str:
    """An exception as one line; for an HTTP error, its status and what the server said."""
    status = getattr(getattr(err, 'response', None), 'status_code', None)
    server = ' '.join(str(getattr(err, 'server_message', None) or '').split())
    if status is not None and server:
        return f'HTTP {status}: {server}'
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


def push(source, repo_id: str, *, revision: Optional[str] = None, private: bool = False,
         commit_message: Optional[str] = None, dry_run: bool = False, export_dir: Optional[str] = None,
         overwrite: bool = False, log: Callable[[str], None] = print, **export_options) -> Optional[str]:
    """Export ``source`` and upload the folder to the Hub repository ``repo_id``; returns the commit URL.

    huggingface_hub does the work (``HfApi.create_repo``, ``create_branch`` for a new ``revision``,
    ``upload_folder`` restricted to :data:`EXPORT_FILES`), with the token of ``HF_TOKEN`` or of
    ``hf auth login``; it is never printed or written. ``dry_run`` does everything but contact the Hub.
    The export goes to ``export_dir`` (kept) or to a temporary folder (removed).
    """
    check_repo_id(repo_id)
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise ValueError(f'revision {revision!r} is not a branch name')
    has_token = _token() is not None
    if not dry_run and not has_token:
        raise HubError('no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (nothing was uploaded)')
    with tempfile.TemporaryDirectory(prefix='timm_mimo_push-') as tmp:
        folder = Path(export_dir) if export_dir else Path(tmp) / 'export'
        result = export(source, folder, repo_id=repo_id, overwrite=overwrite, **export_options)
        files = upload_files(folder)
        message = commit_message or f'Add {result.architecture}{"." + result.tag if result.tag else ""} weights ' \
                                    f'(timm_mimo export)'
        where = f'{repo_id}' + (f'@{revision}' if revision else '') + (' (private)' if private else '')
        sizes = ', '.join(f'{f} ({_size((folder / f).stat().st_size)})' for f in files)
        if dry_run:
            log(f'dry run: would upload {sizes} to {where} with commit message "{message}"')
            log(f'export folder: {folder if export_dir else "temporary (pass --export-dir to keep it)"}; '
                f'Hugging Face token: {"found" if has_token else "NOT found (set HF_TOKEN or run `hf auth login`)"}')
            return None
        from huggingface_hub import HfApi
        from . import __version__
        try:
            api = HfApi(library_name='timm_mimo', library_version=__version__)
            repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
            if revision and revision != 'main':
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                                       revision=revision, commit_message=message)
        except Exception as e:  # noqa: BLE001  (HTTP, connection, permission: one line, token removed)
            raise HubError(redact(f'upload to {where} failed, {_one_line(e)}')) from e
        url = getattr(commit, 'commit_url', None) or str(commit)
        log(f'uploaded {sizes} to {where}: {url}')
        return url


# ------------------------------------------------------------------------------------------------------
# the command lines of hub/export.py and hub/push.py

def add_export_arguments(parser):
    """Flags shared by hub/export.py and hub/push.py."""
    parser.add_argument('source', help='training folder (train.py output), checkpoint or model folder, or weights file')
    parser.add_argument('--which', default='best', choices=['best', 'last', 'ema'],
                        help='weights of a training folder (default: best)')
    parser.add_argument('--model', default=None, help='architecture of a weights file; checked against a folder')
    parser.add_argument('--num-classes', type=int, default=None, help='expected class count (checked)')
    parser.add_argument('--results', default=None,
                        help='metrics file (train.py results.json or validate.py --results-file); default: the '
                             'run\'s results.json')
    parser.add_argument('--tag', default=None, help='pretrained tag, e.g. cifar100 (default: from the dataset)')
    parser.add_argument('--license', default=None, help=f'license of the weights (default: the model\'s, '
                                                        f'else {DEFAULT_LICENSE})')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty export folder')
    parser.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')


def export_options(args) -> dict:
    return dict(which=args.which, model_name=args.model, num_classes=args.num_classes, results=args.results,
                tag=args.tag, license=args.license, overwrite=args.overwrite)


def run_script(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a hub script's ``main``: bad input and Hub failures give one ``error:`` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, HubError) as err:
        if '--debug' in argv:
            raise
        print(f'error: {redact(err)}', file=sys.stderr)
        return 2
