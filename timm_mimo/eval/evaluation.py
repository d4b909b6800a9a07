"""Evaluation as one function: :func:`evaluate` loads a model (a training folder, a model folder, a weights
file, several of them as a deep ensemble, a registered name, or a module already built), reads a split the
way train.py reads data sets, and returns the results ``validate.py`` prints and writes: accuracy and
calibration, selective classification, the inference cost, and optionally OOD detection, CIFAR-C corruptions,
temperature scaling, the report page, the raw predictions, JSON and CSV files.

The settings are small dataclasses (:class:`ModelSource`, :class:`DataSettings`, :class:`OODSettings`,
:class:`EvalOptions`, :class:`OutputFiles`); ``validate.py`` turns its command line into them, the
official-weights converter (``timm_mimo.hub.official``) builds them directly. Error messages name
``validate.py``'s flags, since that is where most settings come from.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import rundir
from .ensemble import ENSEMBLE_CHOICES

_logger = logging.getLogger(__name__)

# run arguments that decide which images a run trained and was selected on: the runs of a deep ensemble share them
DATA_ARGS = ('dataset', 'data_dir', 'val_per_class')


@dataclass
class ModelSource:
    """Which model to evaluate: ``checkpoints`` (training folder, model folder or weights file each; several
    form a :class:`~timm_mimo.eval.ensemble.DeepEnsemble`), or with none, the registered ``name`` (with
    ``pretrained``: its published weights)."""
    checkpoints: Sequence[str] = ()
    which: str = rundir.BEST_DIR  # weights of a training folder: best, last or ema
    name: str = ''  # architecture of a weights file, checked against a folder's
    pretrained: bool = False
    num_classes: Optional[int] = None
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    ensemble: Optional[str] = None  # a key of ENSEMBLE_CHOICES; None: mean-prob for several, else the model's own
    model_source: Optional[dict] = None  # set by load: what a hf-hub: / local-dir: name resolved to (Hub commit)

    def load(self) -> Tuple[nn.Module, dict]:
        """(model, the first run's args.yaml dict or {})."""
        from .ensemble import DeepEnsemble
        kwargs = dict(self.model_kwargs)
        if self.num_classes is not None:
            kwargs['num_classes'] = self.num_classes
        if not self.checkpoints:
            if not self.name:
                raise ValueError('give a checkpoint, or --model NAME --pretrained')
            from ..models.factory import create_model, read_model_source  # one-line errors for names and weights
            sourced = read_model_source(self.name)  # hf-hub: / local-dir: names: their config, what they resolve to
            model, run_args = create_model(self.name, pretrained=self.pretrained, **kwargs), {}
            if sourced is not None:
                self.model_source = sourced.record
        else:
            resolved = [rundir.resolve(source, self.which) for source in self.checkpoints]
            models = [rundir.load_model(checkpoint, self.name or None, **kwargs) for checkpoint in resolved]
            check_same_task(self.checkpoints, models, [checkpoint.run_args for checkpoint in resolved])
            run_args = resolved[0].run_args
            model = models[0] if len(models) == 1 else \
                DeepEnsemble(models, ENSEMBLE_CHOICES[self.ensemble or 'mean-prob'])
        if self.ensemble and len(self.checkpoints) < 2:
            if getattr(model, 'num_members', 1) < 2:
                named = self.checkpoints[0] if self.checkpoints else self.name
                raise ValueError(f'--ensemble {self.ensemble}: {named} has one member; give several checkpoints '
                                 f'or a MIMO model')
            model.ensemble = ENSEMBLE_CHOICES[self.ensemble]
        return model, run_args

    def description(self) -> str:
        """The results' ``checkpoint``: the sources, or the registered name."""
        return ', '.join(map(str, self.checkpoints)) or f'{self.name} (pretrained={self.pretrained})'


@dataclass
class DataSettings:
    """The evaluated data, read as train.py reads it; ``None`` takes the run's own setting."""
    dataset: Optional[str] = None  # '' = the embedded digits
    data_dir: Optional[str] = None
    download: bool = False
    split: Optional[str] = None  # default: test when the data set has one, else validation
    val_per_class: Optional[int] = None
    img_size: Optional[int] = None  # default: the model's
    # timm's data set flags, as train.py takes them (data.splits.DATA_BACKEND_KEYS): the splits and the class map
    # are rebuilt as the run built them; None takes the run's recorded value
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    class_map: Optional[str] = None
    select_last_epoch: Optional[bool] = None
    # timm's eval pipeline (validate.py's --crop-pct, --interpolation, --mean, --std; None: see _splits_of)
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def backend_arguments(self, dataset: str, run_args: dict) -> dict:
        """build_splits' data set flags: this evaluation's, else the run's recorded ones, else its defaults.
        A stream evaluated with no selection split named reports on ``val_split`` (or the set's own test /
        validation split): evaluation selects nothing, so it is read as train.py's --select-last-epoch."""
        from ..data.splits import DATA_BACKEND_KEYS
        from ..data.streams import is_stream
        chosen = {key: getattr(self, key) if getattr(self, key) is not None else run_args.get(key)
                  for key in DATA_BACKEND_KEYS}
        chosen = {key: value for key, value in chosen.items() if value is not None}
        if is_stream(dataset) and not chosen.get('val_split') and chosen.get('select_last_epoch') is None:
            chosen['select_last_epoch'] = True
        return chosen


@dataclass
class OODSettings:
    """An out-of-distribution set: a data set name as :class:`DataSettings` takes, or a folder / zip path."""
    dataset: str = ''
    data_dir: Optional[str] = None
    split: Optional[str] = None  # default: test when the set has one, else validation
    val_per_class: Optional[int] = None
    max_samples: Optional[int] = None  # an evenly spaced subset of the split


@dataclass
class EvalOptions:
    batch_size: int = 256
    workers: Optional[int] = None  # loader processes; default: 0 for in-memory tensors, else up to 4
    device: Optional[str] = None  # default: cuda when available, else cpu
    tempscale: bool = False  # temperature scaling, MixMo's two-fold protocol
    corruptions: str = ''  # a CIFAR-10-C / 100-C folder of .npy files
    progress: bool = True  # a bar on a terminal, else a log line every log_interval seconds
    log_interval: float = 30.0


@dataclass
class OutputFiles:
    """Files to write ('' = none); an existing one is only replaced with ``overwrite``."""
    results_file: str = ''  # JSON
    results_csv: str = ''  # one row per evaluated set
    reliability_png: str = ''
    report: str = ''  # a folder: report.md with pictures
    save_predictions: str = ''  # safetensors: logits, member logits, labels (and the OOD ones)
    overwrite: bool = False

    def paths(self):
        return (self.results_file, self.results_csv, self.reliability_png, self.save_predictions,
                self.report and str(Path(self.report) / 'report.md'))


def check_same_task(sources, models, runs_args):
    """The networks of a deep ensemble must predict the same classes from the same inputs, trained on the
    same data: the first that differs from the first network is one error naming both."""
    def setting(model, run_args):
        cfg = getattr(model, 'pretrained_cfg', {}) or {}
        found = {'classes': getattr(model, 'num_classes', None), 'input size': tuple(cfg.get('input_size') or ()),
                 'normalisation mean': tuple(cfg.get('mean') or ()), 'normalisation std': tuple(cfg.get('std') or ())}
        # a run's data set (model folders without args.yaml say nothing about theirs)
        found.update({f'--{key.replace("_", "-")}': value for key, value in run_args.items()
                      if key in DATA_ARGS or 'split' in key})
        return found
    first = setting(models[0], runs_args[0])
    for source, model, run_args in zip(sources[1:], models[1:], runs_args[1:]):
        other = setting(model, run_args)
        for key in first:
            if key in other and other[key] != first[key]:
                raise ValueError(f'the runs do not match: {sources[0]} has {key} {first[key]!r} but {source} has '
                                 f'{other[key]!r} (a deep ensemble needs the same classes and data)')


def default_workers(dataset) -> int:
    """Loader processes that pay off: none for images held as tensors (decoding is free), else up to 4."""
    while isinstance(getattr(dataset, 'dataset', None), torch.utils.data.Dataset):  # Subset, Renormalized
        dataset = dataset.dataset
    if isinstance(getattr(dataset, 'images', None), torch.Tensor):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def with_progress(loader, desc: str, interval: float):
    """Yield the loader's batches; a tqdm bar on a terminal, else a log line every ``interval`` seconds."""
    # a stream's length is unknown, or the library's estimate: its batches are counted as they come
    total = None if isinstance(getattr(loader, 'dataset', None), torch.utils.data.IterableDataset) else len(loader)
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(loader, desc=desc, total=total, unit='batch', leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    seen = 0
    for step, (images, targets) in enumerate(loader, 1):
        yield images, targets
        seen += len(targets)
        now = time.monotonic()
        if now - last >= interval or step == total:
            _logger.info(f'{desc}: {step}/{total or "?"} batches, {seen} images, '
                         f'{seen / max(now - start, 1e-9):.0f} img/s')
            last = now


class Renormalized(torch.utils.data.Dataset):
    """Images normalised with one (mean, std) re-expressed in another: the embedded digits come normalised
    with their own statistics, an OOD set must reach the model the way its training data did."""

    def __init__(self, dataset, mean_from, std_from, mean_to, std_to):
        self.dataset = dataset
        shape = (-1, 1, 1)
        self.scale = torch.tensor(std_from).view(shape) / torch.tensor(std_to).view(shape)
        self.shift = (torch.tensor(mean_from).view(shape) - torch.tensor(mean_to).view(shape)) / torch.tensor(
            std_to).view(shape)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return image * self.scale + self.shift, target


def ood_eval_set(settings: OODSettings, splits, img_size: int, eval_split: str, download: bool = False):
    """(dataset, description) of the out-of-distribution set, read like train.py reads data sets; refused
    when it is the evaluated split itself (every score would rank the same images against themselves)."""
    from ..data.splits import build_splits

    name, data_dir = settings.dataset, settings.data_dir
    if name and data_dir is None:
        if Path(name).exists():  # a path: an image folder, tar or zip
            name, data_dir = '', name
        elif not (name == 'cifar10-zip' or name.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/'))
                  or Path('data', name.replace('/', '_')).exists()):  # build_splits' default root
            raise FileNotFoundError(f'--ood-dataset {name}: neither a file or folder nor a data set name '
                                    f"('' = digits, cifar10-zip, torch/..., or a name with --ood-data-dir)")
    ood = build_splits(name, data_dir, download, img_size, mean=splits.mean, std=splits.std,
                       val_per_class=settings.val_per_class)
    split = settings.split or ('test' if ood.test is not None else 'validation')
    data = getattr(ood, split)
    if data is None:
        raise ValueError(f'the OOD set {ood.description} has no {split} split')
    if ood.description == splits.description:  # the same source, read the same way
        if split == eval_split:
            raise ValueError(f'--ood-dataset {settings.dataset!r} is the in-distribution data ({ood.description}, '
                             f'{split} split): name another data set, or another split with --ood-split')
        _logger.warning(f'the OOD set is the {split} split of the in-distribution data: expect AUROC near 50')
    if tuple(ood.mean) != tuple(splits.mean) or tuple(ood.std) != tuple(splits.std):
        data = Renormalized(data, ood.mean, ood.std, splits.mean, splits.std)
    if settings.max_samples is not None:
        if settings.max_samples < 1:
            raise ValueError(f'--ood-max-samples must be >= 1, got {settings.max_samples}')
        if settings.max_samples < len(data):
            keep = torch.linspace(0, len(data) - 1, settings.max_samples).round().long().unique().tolist()
            data = torch.utils.data.Subset(data, keep)
    return data, f'{ood.description} [{split}]'


def refuse_existing(path_str: str, overwrite: bool):
    """Before any evaluation: an existing file is kept unless ``--overwrite``, a name that is not a regular file
    (a link, a device, a pipe) is never written over; a path under a file is refused."""
    if not path_str:
        return
    rundir.refuse_to_replace(path_str)
    if Path(path_str).exists() and not overwrite:
        raise FileExistsError(f'{path_str} exists: pass --overwrite to replace it')
    parent = next((p for p in Path(path_str).parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f'cannot write {path_str}: {parent} is a file, not a folder')


def summary_lines(results: dict, split: str) -> Tuple[str, ...]:
    """The console lines of one evaluated split and of the inference cost."""
    m = results[split]
    line = (f'{split}: top1 {m["top1"]:.2f} top5 {m["top5"]:.2f} NLL {m["nll"]:.4f} ECE {m["ece"]:.4f} '
            f'Brier {m["brier"]:.4f} | members {" ".join(f"{a:.2f}" for a in m["member_top1"])}')
    if m.get('ensemble_gain') is not None:
        line += f' | gain {m["ensemble_gain"]:+.2f} disagreement {m["disagreement"]:.3f} ' \
                f'ratio-errors {m["ratio_errors"]:.3f}'
    if 'temperature' in m:
        line += f' | T {m["temperature"]:.3f} NLL_c {m["nll_calibrated"]:.4f} ECE_c {m["ece_calibrated"]:.4f}'
    cost = results['cost']
    return (line,
            f'{split}: ECE adaptive {m["ece_adaptive"]:.4f} classwise {m["ece_classwise"]:.4f} | selective: '
            f'AURC {m["aurc"]:.4f} AUGRC {m["augrc"]:.4f} risk@80/90/95 {m["risk_at_80"]:.4f} '
            f'{m["risk_at_90"]:.4f} {m["risk_at_95"]:.4f}',
            f'cost per image: {cost["params"] / 1e6:.3f} M parameters, {cost["flops"] / 1e6:.2f} MFLOPs, '
            f'{cost["forward_passes"]} forward pass(es), {results["num_members"]} member(s)')


ModelLike = Union[ModelSource, nn.Module, str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _model_of(model: ModelLike) -> Tuple[nn.Module, dict, ModelSource, str]:
    """(the module, its run's args.yaml dict or {}, its source, the results' ``checkpoint``)."""
    if isinstance(model, nn.Module):
        cfg = getattr(model, 'pretrained_cfg', {}) or {}
        source = ModelSource(name=cfg.get('architecture', type(model).__name__))
        return model, {}, source, f'{source.name} (in memory)'
    source = model if isinstance(model, ModelSource) else ModelSource(
        checkpoints=[str(model)] if isinstance(model, (str, os.PathLike)) else [str(m) for m in model])
    module, run_args = source.load()
    return module, run_args, source, source.description()


def _splits_of(model: nn.Module, data: DataSettings, run_args: dict):
    """(the data set's splits, the evaluated split's name, its dataset, the image side), read as train.py
    reads them, preprocessed as the model expects.

    The eval transform is timm's (resize, center crop, normalise): with the model's crop_pct and interpolation
    (or --crop-pct / --interpolation) for a run trained with timm's transforms (--aug timm), when either flag is
    given, or for a model without a run record on images larger than its input (as train.py would have chosen);
    else the whole image resized (crop_pct 1, bilinear), as the batched recipes trained."""
    from ..data import native_img_size
    from ..data.splits import build_splits
    from ..data.transforms import TIMM_AUG, default_aug, timm_eval_splits
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    dataset = data.dataset if data.dataset is not None else run_args.get('dataset', '')
    data_dir = data.data_dir if data.data_dir is not None else run_args.get('data_dir')
    img_size = data.img_size or (cfg.get('input_size') or (3, 32, 32))[-1]
    splits = build_splits(dataset, data_dir, data.download, img_size,
                          mean=data.mean or (cfg.get('mean') if dataset else None),
                          std=data.std or (cfg.get('std') if dataset else None),
                          val_per_class=data.val_per_class or run_args.get('val_per_class'),
                          num_classes=getattr(model, 'num_classes', None), **data.backend_arguments(dataset, run_args))
    trained_with = run_args.get('aug')
    if trained_with == TIMM_AUG or data.crop_pct is not None or data.interpolation or (
            trained_with is None and default_aug(splits, img_size, native_img_size(dataset, data_dir)) == TIMM_AUG):
        splits, _ = timm_eval_splits(splits, cfg, data.crop_pct, data.interpolation)
    if getattr(model, 'num_classes', splits.num_classes) != splits.num_classes:
        raise ValueError(f'the model predicts {model.num_classes} classes but the dataset has {splits.num_classes}')
    split = data.split or ('test' if splits.test is not None else 'validation')
    eval_set = getattr(splits, split)
    if eval_set is None:
        raise ValueError(f'{splits.description} has no {split} split')
    return splits, split, eval_set, img_size


def example_image(dataset, model: nn.Module, img_size: int) -> torch.Tensor:
    """An input of the evaluated set's shape, for the inference cost: its first image, or for a stream (no index;
    reading ahead would fix its reader's sharding before the loader's workers start) a blank of the side every
    split is cropped to."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        channels = ((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3,))[0]
        return torch.zeros(channels, img_size, img_size)
    return dataset[0][0]


def _ood_results(predicted, ood_predicted, description: str, count: int, log) -> Tuple[dict, list]:
    """(results['ood'], its CSV rows) from the in-distribution and OOD (ensemble, member) logits; logs a line
    per score."""
    from .uncertainty import SCORE_LABELS, member_ood_metrics, ood_metrics
    (ens, members), (ood_ens, ood_members) = predicted, ood_predicted
    results = dict(dataset=description, num_samples=count, scores=ood_metrics(ens, ood_ens, members, ood_members))
    if members.shape[1] >= 2:
        results['member_scores'] = member_ood_metrics(members, ood_members)
    rows = []
    for score, values in results['scores'].items():
        rows.append(dict(set=f'ood_{score}', **values))
        log(f'OOD {SCORE_LABELS[score]}: AUROC {100 * values["auroc"]:.2f} AUPR-in '
            f'{100 * values["aupr_in"]:.2f} AUPR-out {100 * values["aupr_out"]:.2f} '
            f'FPR95 {100 * values["fpr95"]:.2f}  ({description}, {count} images)')
    for score, per_member in results.get('member_scores', {}).items():
        rows += [dict(set=f'ood_member{index}_{score}', **values) for index, values in enumerate(per_member)]
        log(f'OOD {SCORE_LABELS[score]}, each member alone: AUROC '
            + ' / '.join(f'{100 * values["auroc"]:.2f}' for values in per_member))
    return results, rows


def _write_outputs(outputs: OutputFiles, results: dict, rows: list, logits: Dict[str, torch.Tensor], log):
    """The files asked for; ``logits``: logits, member_logits, labels and, with an OOD set, the OOD ones."""
    if outputs.reliability_png:
        from .plots import reliability_diagram
        reliability_diagram(logits['logits'], logits['labels'], outputs.reliability_png,
                            title=f'{results["model"]} on {results["split"]}')
    if outputs.report:
        from .report import write_report
        page = write_report(outputs.report, results, logits['logits'], logits['member_logits'], logits['labels'],
                            logits.get('ood_logits'), logits.get('ood_member_logits'))
        log(f'report: {page}')
    if outputs.save_predictions:
        from safetensors.torch import save
        rundir.write_atomic(Path(outputs.save_predictions), save({k: v.contiguous() for k, v in logits.items()}))
    if outputs.results_file:
        rundir.write_atomic(Path(outputs.results_file), json.dumps(results, indent=2))
    if outputs.results_csv:
        rundir.write_csv_atomic(Path(outputs.results_csv), rows)


def _table_row(name: str, metrics: dict, **extra) -> dict:
    """A CSV row: the metrics that are numbers (per-member lists stay in the JSON)."""
    return dict(set=name, **{k: v for k, v in metrics.items() if not isinstance(v, list)}, **extra)


def evaluate(model: ModelLike, data: Optional[DataSettings] = None, *, ood: Optional[OODSettings] = None,
             options: Optional[EvalOptions] = None, outputs: Optional[OutputFiles] = None,
             log: Callable[[str], None] = print) -> dict:
    """Evaluate ``model`` on one split of ``data`` (and on ``ood``, the corruptions, ... as asked); returns the
    results ``validate.py --results-file`` writes and writes the files of ``outputs``.

    ``model``: a :class:`ModelSource`, a checkpoint path (training folder, model folder, weights file), a list
    of them (their deep ensemble), or an ``nn.Module`` (moved to the device and put in eval mode). ``data``
    defaults to the run's data set. ``log`` receives the summary lines (``print`` by default).
    Existing output files are refused before anything is evaluated.
    """
    data, options, outputs = data or DataSettings(), options or EvalOptions(), outputs or OutputFiles()
    for path in outputs.paths():
        refuse_existing(path, outputs.overwrite)

    from torch.utils.data import DataLoader
    from ..cli import usable_device
    from ..data.splits import tensor_transform
    from .ensemble import DeepEnsemble, inference_cost
    from .metrics import classification_metrics, temperature_scaled_metrics
    from .predict import collect_predictions
    from .uncertainty import uncertainty_metrics

    device = usable_device(options.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model, run_args, source, checkpoint = _model_of(model)
    model = model.to(device).eval()
    splits, split, eval_set, img_size = _splits_of(model, data, run_args)
    # read the OOD set before the long evaluation so that a bad OOD setting fails at once
    ood_set, ood_description = (ood_eval_set(ood, splits, img_size, split, data.download) if ood is not None
                                else (None, ''))

    def predictions(images, desc):
        workers = default_workers(images) if options.workers is None else options.workers
        if hasattr(images, 'set_loader_cfg'):  # a timm stream: its reader shares the shards among the workers
            images.set_loader_cfg(num_workers=workers)
        loader = DataLoader(images, batch_size=options.batch_size, num_workers=workers)
        batches = with_progress(loader, desc, options.log_interval) if options.progress else loader
        return collect_predictions(model, ((x.to(device), y) for x, y in batches))

    def metrics_of(images, desc):
        ens, members, labels = predictions(images, desc)
        if options.tempscale:
            metrics = temperature_scaled_metrics(ens, labels, members)
        else:
            metrics = classification_metrics(ens, labels, members)
        metrics.update(uncertainty_metrics(ens, labels, members))
        return metrics, dict(logits=ens, member_logits=members, labels=labels)

    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    results = dict(checkpoint=checkpoint, model=cfg.get('architecture', source.name),
                   num_members=getattr(model, 'num_members', 1), dataset=splits.description, split=split,
                   num_samples=None)
    if isinstance(model, DeepEnsemble):
        results.update(checkpoints=list(source.checkpoints), members_per_network=model.members_per_network)
    if source.model_source is not None:
        results['model_source'] = source.model_source
    if hasattr(model, 'ensemble'):
        results['ensemble'] = {rule: name for name, rule in ENSEMBLE_CHOICES.items()}[model.ensemble]
    results['cost'] = inference_cost(model, example_image(eval_set, model, img_size).to(device))
    results[split], logits = metrics_of(eval_set, split)
    # what was read and scored: a stream's length is not known before (or is the library's estimate)
    results['num_samples'] = len(logits['labels'])
    rows = [_table_row(split, results[split], **results['cost'])]
    for line in summary_lines(results, split):
        log(line)

    if ood is not None:
        ood_ens, ood_members, _ = predictions(ood_set, 'ood')
        results['ood'], ood_rows = _ood_results((logits['logits'], logits['member_logits']), (ood_ens, ood_members),
                                                ood_description, len(ood_ens), log)
        rows += ood_rows
        logits.update(ood_logits=ood_ens, ood_member_logits=ood_members)

    if options.corruptions:
        from ..data.corruptions import CorruptionDataset
        corrupted = CorruptionDataset(options.corruptions,
                                      transform=tensor_transform(img_size, splits.mean, splits.std))
        results['corruptions'], _ = metrics_of(corrupted, 'corruptions')
        c = results['corruptions']
        rows.append(_table_row('corruptions', c))
        log(f'corruptions ({len(corrupted)} images): top1 {c["top1"]:.2f} NLL {c["nll"]:.4f} ECE {c["ece"]:.4f}')

    _write_outputs(outputs, results, rows, logits, log)
    return results
