"""Export a training run or a checkpoint to a folder in timm's Hub format, checked by loading it back."""
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import yaml

import timm
from timm.models import split_model_name_tag

from .. import rundir
from ..constants import HUB_NAME_RE, hub_id
from ..mimo import is_mimo
from .card import DEFAULT_LICENSE, RECIPE_FILE, dataset_tag, model_card, training_recipe

# what an export folder holds, and all that push uploads (recipe.yaml when the run recorded its arguments)
EXPORT_FILES = ('README.md', rundir.CONFIG_FILE, rundir.WEIGHTS_FILE)
OPTIONAL_FILES = (RECIPE_FILE,)
REPORT_DIR = 'report'  # the pictures of an evaluation report in the card (--report)
TAG_RE = re.compile(r'[a-z0-9][a-z0-9_]*')


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
    if out_dir.is_symlink():
        raise ValueError(f'export folder {out_dir} is a symbolic link: give the folder itself')
    if rundir.is_inside_training_state(out_dir) or rundir.is_run_dir(out_dir):
        raise ValueError(f'export folder {out_dir} is part of a training run (its checkpoints, training state or '
                         f'run folder): export elsewhere')
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


def check_round_trip(model: nn.Module, folder: Path):
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
           model_kwargs: Optional[dict] = None, num_classes: Optional[int] = None, results: Optional[str] = None, tag: Optional[str] = None,
           license: Optional[str] = None, repo_id: Optional[str] = None, overwrite: bool = False,
           report: Optional[str] = None) -> ExportResult:
    """Write ``source`` (training folder, checkpoint folder or weights file) to ``out_dir`` in timm's Hub format.

    ``out_dir`` is written as a temporary sibling folder and renamed into place once complete and checked
    (it loads back with ``local-dir:`` and reproduces the outputs); an existing non-empty ``out_dir`` is only
    replaced with ``overwrite``. ``tag`` defaults to the run's dataset (cifar10, cifar100, tiny_imagenet);
    ``model_kwargs``: the constructor arguments of a weights file's model (e.g. ``backbone`` and
    ``num_members`` of a ``mimo_backbone``), recorded in config.json; a folder records its own.
    ``repo_id`` only shapes the card's usage snippet. ``report``: a folder of ``validate.py --report``, added
    to the card as its evaluation section with its pictures under ``report/``.
    """
    out_dir = Path(out_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    if tag is not None and not TAG_RE.fullmatch(tag):
        raise ValueError(f'tag {tag!r} must be lower-case letters, digits and "_" (e.g. cifar100)')
    checkpoint = rundir.resolve(source, which)
    if checkpoint.which == 'file' and not model_name:
        raise ValueError(f'{checkpoint.weights} is a weights file: name its architecture with --model')
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs and checkpoint.which != 'file':
        raise ValueError(f'--model-kwargs is for a weights file; {checkpoint.weights} records its own model '
                         f'arguments in {rundir.CONFIG_FILE}')
    _check_destination(out_dir, overwrite, checkpoint.weights)
    run_metrics = rundir.load_results(checkpoint, results)
    run_args = checkpoint.run_args
    kwargs = dict(model_kwargs, **({'num_classes': num_classes} if num_classes is not None else {}))
    model = rundir.load_model(checkpoint, model_name, **kwargs).eval()
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
    model_args = rundir.saved_model_args(checkpoint) or model_kwargs
    if is_mimo(model):
        model_args['num_members'] = num_members
        if model.ensemble != 'logits':
            model_args['ensemble'] = model.ensemble
    name = repo_id.split('/')[-1] if repo_id else (f'{arch}.{tag}' if tag else arch)

    recipe = training_recipe(run_args)
    if out_dir.parent.is_dir():  # what a killed export of this folder left (only its own names: others may live here)
        rundir.remove_leftovers(out_dir.parent, out_dir.name)
    with rundir.atomic_dir(out_dir) as tmp:
        # model.safetensors and config.json by timm's save_for_hf: saved + recorded constructor arguments
        rundir.write_model_files(model, tmp, model_args)
        card = model_card(model, name, run_metrics, run_args, repo_id, license, checkpoint.resumes)
        if report is not None:  # validate.py's evaluation report as a card section, its pictures beside
            from ..eval.report import report_picture_files, report_section
            card += '\n' + report_section(report, image_dir=REPORT_DIR)
            (tmp / REPORT_DIR).mkdir()
            for picture in report_picture_files(report).values():  # regular files inside the report folder only
                shutil.copyfile(Path(report) / picture, tmp / REPORT_DIR / picture)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        if recipe:  # the card's `python train.py -c recipe.yaml`
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        check_round_trip(model, tmp)
        _check_destination(out_dir, overwrite, checkpoint.weights)  # nothing appeared meanwhile
    files = list(EXPORT_FILES) + [f for f in OPTIONAL_FILES if (out_dir / f).exists()] + \
        [f'{REPORT_DIR}/{p.name}' for p in sorted((out_dir / REPORT_DIR).glob('*.png'))]
    return ExportResult(out_dir, arch, tag, num_members, model.num_classes, files)
