"""The model card of an export: timm's ``generate_readme`` front matter and details, then the sections timm has
no slot for (results, the training recipe, usage, license, citations)."""
import re
from typing import Dict, List, Optional

import torch.nn as nn
import yaml
from timm.models._hub import generate_readme

from ..constants import hub_id
from ..eval.report import code_block, code_span, markdown_text

DEFAULT_LICENSE = 'apache-2.0'
# Hub data sets of the pretrained tags, for the card's metadata
HUB_DATASETS = {'cifar10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100'}
RECIPE_FILE = 'recipe.yaml'


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
_PRIVATE_ARGS = {'config', 'data_dir', 'output', 'experiment', 'resume', 'initial_checkpoint', 'pretrained_path',
                 'debug', 'log_tensorboard', 'log_with', 'log_wandb', 'log_project', 'workers', 'dataset_download',
                 'checkpoint_hist', 'device', 'model_source'}
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
    if run_args.get('pretrained_path'):
        recipe['pretrained_path'] = '<local pretrained weights>'
    return recipe


def card_head(name: str, tags: List[str], license: str, details: dict, description: str) -> str:
    """The card's YAML front matter, then timm's ``generate_readme`` title, description and details.

    timm writes its front matter by string formatting, so a license holding newlines would add keys to it:
    the front matter is written by huggingface_hub's ``ModelCardData`` (a YAML serializer) instead. Values in
    ``details`` and ``description`` are Markdown already (escaped where they come from a file or folder name).
    """
    from huggingface_hub import ModelCardData
    dataset = details.get('Dataset')
    front = ModelCardData(library_name='timm', license=str(license), tags=tags, pipeline_tag='image-classification',
                          datasets=[dataset.lower()] if dataset else None)
    # generate_readme's own front matter holds our constant tags and data set only, and is replaced
    body = generate_readme(dict(tags=tags, details=details, description=description), name).split('---\n', 2)[2]
    return f'---\n{front.to_yaml()}\n---\n{body}'


def _fmt(value, digits: int) -> str:
    return f'{value:.{digits}f}' if isinstance(value, (int, float)) else '-'


def metrics_table(splits: Dict[str, dict]) -> str:
    rows = ['| split | top-1 (%) | top-5 (%) | NLL | ECE | Brier | member top-1 (%) | ensemble gain (pts) |',
            '|---|---|---|---|---|---|---|---|']
    for split, m in splits.items():
        members = ' / '.join(_fmt(a, 2) for a in m.get('member_top1') or []) or '-'
        rows.append(f'| {markdown_text(split)} | {_fmt(m.get("top1"), 2)} | {_fmt(m.get("top5"), 2)} | '
                    f'{_fmt(m.get("nll"), 4)} | '
                    f'{_fmt(m.get("ece"), 4)} | {_fmt(m.get("brier"), 4)} | {members} | '
                    f'{_fmt(m.get("ensemble_gain"), 2)} |')
    return '\n'.join(rows)


def model_card(model: nn.Module, name: str, results: dict, run_args: dict, repo_id: Optional[str],
               license: str, resumes: Optional[list] = None) -> str:
    """README.md for the Hub: timm's front matter and details, then results, recipe, usage, license, citations."""
    cfg = model.pretrained_cfg
    arch, tag = cfg['architecture'], cfg.get('tag')
    num_members = getattr(model, 'num_members', 1)
    meta = results['meta']
    dataset = markdown_text(_scrub_paths(meta.get('dataset') or run_args.get('dataset') or 'unknown'))
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
    text = card_head(name, tags, license, details, description)

    epoch = results.get('epoch')
    text += '\n## Results\n'
    text += (f'\nMetrics of these weights ({"epoch " + str(epoch) + ", " if epoch is not None else ""}from '
             f'{code_span(results["source"])}): top-1/top-5 accuracy in %, negative log-likelihood (NLL), expected '
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
            runtime = (f' The run took {took} on {markdown_text(meta.get("processes", 1))} process(es) '
                       f'({markdown_text(meta.get("device", "?"))}).')
        text += (f'\nTrained with timm_mimo\'s `train.py` on {dataset}.{runtime} The arguments below (train.py\'s '
                 f'flag names; local paths and defaults left out) reproduce the run with `python train.py -c '
                 f'recipe.yaml` (plus `--data-dir` for data read from disk):\n\n'
                 f'{code_block(yaml.safe_dump(recipe, sort_keys=False), "yaml")}\n')
        for resume in resumes or []:  # the recipe alone would not reproduce a run resumed with other arguments
            text += (f'\nThe run was resumed from {code_span(resume["from"])} with changed arguments: '
                     f'{"; ".join(code_span(c) for c in resume["changes"])}.\n')
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

    text += (f'\n## License\n\nThe weights are released under the {code_span(license)} license. The code that '
             f'defines and trained them, timm_mimo, is Apache-2.0. The training data keeps its own terms.\n')
    if keys:
        text += '\n## Citation\n'
        for key in keys:
            text += f'```bibtex\n{CITATIONS[key]}\n```\n'
    return text


