#!/usr/bin/env python3
"""Evaluate a checkpoint, or a deep ensemble of several, with accuracy and uncertainty metrics; works for any
timm model (M = 1).

    python validate.py output/train/my-run                   # a training folder: its best weights
    python validate.py output/train/run-a output/train/run-b output/train/run-c   # their deep ensemble
    python validate.py output/train/my-run --which last      # ... or its last complete checkpoint
    python validate.py path/to/model_folder                  # a folder with config.json + model.safetensors
    python validate.py weights.safetensors --model wrn16_4_mixmo2 --num-classes 10
    python validate.py --model wrn28_10_mixmo2.cifar100 --pretrained --dataset torch/cifar100 --split test

    python validate.py output/train/my-run --ood-dataset '' --report report/   # digits as OOD, a report page

Several checkpoints form a deep ensemble: their members (one per plain network, M per MIMO network) are
combined by ``--ensemble`` (default mean-prob) and evaluated as one model's members; the runs must predict
the same classes and have trained on the same data. Reports top-1, top-5, NLL, ECE (15 bins), adaptive and
classwise ECE, Brier, per-member top-1 and ECE, the ensemble gain over the best member and member diversity
(disagreement, ratio-errors), selective classification (AURC, AUGRC, risk at 80 / 90 / 95 % coverage), the
inference cost (parameters, FLOPs per image, forward passes); optionally out-of-distribution detection
against any data set train.py reads other than the evaluated one (``--ood-dataset``: AUROC, AUPR-in / -out,
FPR at 95 % TPR for MSP, entropy, energy, max-logit, for M >= 2 mutual information and member disagreement,
and the single-network scores of every member alone), temperature scaling with MixMo's
two-fold protocol (``--tempscale``) and CIFAR-10-C / 100-C corruption sets (``--corruptions FOLDER``).
Writes JSON (``--results-file``), CSV (``--results-csv``), a reliability diagram (``--reliability-png``),
a markdown report with pictures (``--report DIR``) and the raw predictions (``--save-predictions``); an
existing file is never overwritten unless ``--overwrite`` is given. Definitions: docs/evaluation.md.
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from timm_mimo import rundir
from timm_mimo.eval.ensemble import ENSEMBLE_CHOICES

_logger = logging.getLogger('validate')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoints', nargs='*', default=[], metavar='CHECKPOINT',
                   help='training folder, model folder (config.json + model.safetensors) or weights file; '
                        'several: their deep ensemble')
    p.add_argument('--which', default='best', choices=[rundir.BEST_DIR, 'last', rundir.EMA_DIR],
                   help='weights of a training folder')
    p.add_argument('--ensemble', default=None, choices=sorted(ENSEMBLE_CHOICES),
                   help="how the members' predictions combine: mean of the probabilities or of the logits "
                        "(default: mean-prob for several checkpoints, a single model's own rule)")
    p.add_argument('--model', default='', help='architecture (for a weights file or --pretrained)')
    p.add_argument('--pretrained', action='store_true', help='registered pretrained weights of --model')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V')
    p.add_argument('--dataset', default=None, help="as train.py ('' = embedded digits); default: the run's")
    p.add_argument('--data-dir', default=None)
    p.add_argument('--dataset-download', action='store_true')
    p.add_argument('--split', default=None, choices=['train', 'validation', 'test'],
                   help='default: test when the dataset has one, else validation')
    p.add_argument('--val-per-class', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None, help='input side, 1 to 4096 (default: the model\'s)')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=None,
                   help='loader processes; default: 0 for in-memory tensors (digits), else up to 4')
    p.add_argument('--log-interval', type=float, default=30.0,
                   help='seconds between progress lines when stderr is not a terminal (a terminal gets a bar)')
    p.add_argument('--tempscale', action='store_true', help='temperature scaling, two-fold protocol (spec 6.2)')
    p.add_argument('--corruptions', default='', help='CIFAR-10-C / 100-C folder of .npy files')
    p.add_argument('--ood-dataset', default=None, metavar='NAME_OR_PATH',
                   help="out-of-distribution set, as --dataset ('' = embedded digits) or a folder / zip path")
    p.add_argument('--ood-data-dir', default=None, help='root of --ood-dataset (e.g. the CIFAR-10 zip)')
    p.add_argument('--ood-split', default=None, choices=['train', 'validation', 'test'],
                   help='default: test when the OOD set has one, else validation')
    p.add_argument('--ood-val-per-class', type=int, default=None, help='validation carving of the OOD set')
    p.add_argument('--ood-max-samples', type=int, default=None, help='evenly spaced subset of the OOD split')
    p.add_argument('--report', default='', metavar='DIR', help='write DIR/report.md with pictures')
    p.add_argument('--save-predictions', default='', metavar='FILE',
                   help='write the logits, member logits and labels (and the OOD ones) as safetensors')
    p.add_argument('--results-file', default='', help='write the results as JSON')
    p.add_argument('--results-csv', default='', help='write one CSV row per evaluated set')
    p.add_argument('--reliability-png', default='', help='write a reliability diagram')
    p.add_argument('--overwrite', action='store_true', help='allow replacing existing result files')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    return p


# run arguments that decide which images a run trained and was selected on: the runs of a deep ensemble share them
DATA_ARGS = ('dataset', 'data_dir', 'val_per_class')


def resolve_model(args):
    """(model, the first run's args.yaml dict or {}) from the checkpoints or a registered name; several
    checkpoints give their :class:`~timm_mimo.eval.ensemble.DeepEnsemble`."""
    import timm
    from timm_mimo import rundir
    from timm_mimo.cli import parse_model_kwargs
    from timm_mimo.eval.ensemble import DeepEnsemble
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if not args.checkpoints:
        if not args.model:
            raise ValueError('give a checkpoint, or --model NAME --pretrained')
        from timm_mimo.models.factory import create_model, unknown_model_error  # one-line errors for names and weights
        if not timm.is_model(args.model):
            raise unknown_model_error(args.model)
        model, run_args = create_model(args.model, pretrained=args.pretrained, **kwargs), {}
    else:
        resolved = [rundir.resolve(source, args.which) for source in args.checkpoints]
        models = [rundir.load_model(checkpoint, args.model or None, **kwargs) for checkpoint in resolved]
        check_same_task(args.checkpoints, models, [checkpoint.run_args for checkpoint in resolved])
        run_args = resolved[0].run_args
        model = models[0] if len(models) == 1 else DeepEnsemble(models, ENSEMBLE_CHOICES[args.ensemble or 'mean-prob'])
    if args.ensemble and len(args.checkpoints) < 2:
        if getattr(model, 'num_members', 1) < 2:
            raise ValueError(f'--ensemble {args.ensemble}: {args.checkpoints[0] if args.checkpoints else args.model} '
                             f'has one member; give several checkpoints or a MIMO model')
        model.ensemble = ENSEMBLE_CHOICES[args.ensemble]
    return model, run_args


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
    total = len(loader)
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
            _logger.info(f'{desc}: {step}/{total} batches, {seen} images, {seen / max(now - start, 1e-9):.0f} img/s')
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


def ood_eval_set(args, splits, img_size: int, eval_split: str):
    """(dataset, description) of the out-of-distribution set, read like train.py reads data sets; refused
    when it is the evaluated split itself (every score would rank the same images against themselves)."""
    from timm_mimo.data.splits import build_splits

    name, data_dir = args.ood_dataset, args.ood_data_dir
    if name and data_dir is None:
        if Path(name).exists():  # a path: an image folder, tar or zip
            name, data_dir = '', name
        elif not (name == 'cifar10-zip' or name.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/'))
                  or Path('data', name.replace('/', '_')).exists()):  # build_splits' default root
            raise FileNotFoundError(f'--ood-dataset {name}: neither a file or folder nor a data set name '
                                    f"('' = digits, cifar10-zip, torch/..., or a name with --ood-data-dir)")
    ood = build_splits(name, data_dir, args.dataset_download, img_size, mean=splits.mean, std=splits.std,
                       val_per_class=args.ood_val_per_class)
    split = args.ood_split or ('test' if ood.test is not None else 'validation')
    data = getattr(ood, split)
    if data is None:
        raise ValueError(f'the OOD set {ood.description} has no {split} split')
    if ood.description == splits.description:  # the same source, read the same way
        if split == eval_split:
            raise ValueError(f'--ood-dataset {args.ood_dataset!r} is the in-distribution data ({ood.description}, '
                             f'{split} split): name another data set, or another split with --ood-split')
        _logger.warning(f'the OOD set is the {split} split of the in-distribution data: expect AUROC near 50')
    if tuple(ood.mean) != tuple(splits.mean) or tuple(ood.std) != tuple(splits.std):
        data = Renormalized(data, ood.mean, ood.std, splits.mean, splits.std)
    if args.ood_max_samples is not None:
        if args.ood_max_samples < 1:
            raise ValueError(f'--ood-max-samples must be >= 1, got {args.ood_max_samples}')
        if args.ood_max_samples < len(data):
            keep = torch.linspace(0, len(data) - 1, args.ood_max_samples).round().long().unique().tolist()
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    from timm_mimo.cli import refuse_below_one, usable_device
    refuse_below_one(args, ('img_size', 'val_per_class', 'ood_val_per_class'))
    device = usable_device(args.device)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm').setLevel(logging.WARNING)
    for path in (args.results_file, args.results_csv, args.reliability_png, args.save_predictions,
                 args.report and str(Path(args.report) / 'report.md')):
        refuse_existing(path, args.overwrite)

    import timm_mimo  # noqa: F401  (registers the models)
    from torch.utils.data import DataLoader
    from timm_mimo.data.splits import build_splits, tensor_transform
    from timm_mimo.eval.predict import collect_predictions
    from timm_mimo.eval.metrics import classification_metrics, temperature_scaled_metrics
    from timm_mimo.rundir import write_atomic, write_csv_atomic
    from timm_mimo.eval.ensemble import DeepEnsemble, inference_cost
    from timm_mimo.eval.uncertainty import SCORE_LABELS, member_ood_metrics, ood_metrics, uncertainty_metrics
    from timm_mimo.eval.plots import reliability_diagram

    model, run_args = resolve_model(args)
    model = model.to(device).eval()
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    dataset = args.dataset if args.dataset is not None else run_args.get('dataset', '')
    data_dir = args.data_dir if args.data_dir is not None else run_args.get('data_dir')
    img_size = args.img_size or (cfg.get('input_size') or (3, 32, 32))[-1]
    splits = build_splits(dataset, data_dir, args.dataset_download, img_size,
                          mean=cfg.get('mean') if dataset else None, std=cfg.get('std') if dataset else None,
                          val_per_class=args.val_per_class or run_args.get('val_per_class'))
    if getattr(model, 'num_classes', splits.num_classes) != splits.num_classes:
        raise ValueError(f'the model predicts {model.num_classes} classes but the dataset has {splits.num_classes}')
    split = args.split or ('test' if splits.test is not None else 'validation')
    eval_set = getattr(splits, split)
    if eval_set is None:
        raise ValueError(f'{splits.description} has no {split} split')

    # read the OOD set before the long evaluation so that a bad --ood-dataset fails at once
    ood_set, ood_description = (ood_eval_set(args, splits, img_size, split) if args.ood_dataset is not None
                                else (None, ''))

    def predictions(data, desc):
        workers = default_workers(data) if args.workers is None else args.workers
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=workers)
        moved = ((x.to(device), y) for x, y in with_progress(loader, desc, args.log_interval))
        return collect_predictions(model, moved)

    def evaluate(data, desc):
        ens, members, labels = predictions(data, desc)
        if args.tempscale:
            metrics = temperature_scaled_metrics(ens, labels, members)
        else:
            metrics = classification_metrics(ens, labels, members)
        metrics.update(uncertainty_metrics(ens, labels, members))
        return metrics, (ens, members, labels)

    results = dict(checkpoint=', '.join(args.checkpoints) or f'{args.model} (pretrained={args.pretrained})',
                   model=cfg.get('architecture', args.model), num_members=getattr(model, 'num_members', 1),
                   dataset=splits.description, split=split, num_samples=len(eval_set))
    if isinstance(model, DeepEnsemble):
        results.update(checkpoints=list(args.checkpoints), members_per_network=model.members_per_network)
    if hasattr(model, 'ensemble'):
        results['ensemble'] = {rule: name for name, rule in ENSEMBLE_CHOICES.items()}[model.ensemble]
    results['cost'] = inference_cost(model, eval_set[0][0].to(device))
    results[split], (ens, members, labels) = evaluate(eval_set, split)
    rows = [dict(set=split, **{k: v for k, v in results[split].items() if not isinstance(v, list)},
                 **results['cost'])]
    m = results[split]
    line = (f'{split}: top1 {m["top1"]:.2f} top5 {m["top5"]:.2f} NLL {m["nll"]:.4f} ECE {m["ece"]:.4f} '
            f'Brier {m["brier"]:.4f} | members {" ".join(f"{a:.2f}" for a in m["member_top1"])}')
    if m.get('ensemble_gain') is not None:
        line += f' | gain {m["ensemble_gain"]:+.2f} disagreement {m["disagreement"]:.3f} ' \
                f'ratio-errors {m["ratio_errors"]:.3f}'
    if args.tempscale:
        line += f' | T {m["temperature"]:.3f} NLL_c {m["nll_calibrated"]:.4f} ECE_c {m["ece_calibrated"]:.4f}'
    print(line)
    print(f'{split}: ECE adaptive {m["ece_adaptive"]:.4f} classwise {m["ece_classwise"]:.4f} | selective: '
          f'AURC {m["aurc"]:.4f} AUGRC {m["augrc"]:.4f} risk@80/90/95 {m["risk_at_80"]:.4f} '
          f'{m["risk_at_90"]:.4f} {m["risk_at_95"]:.4f}')
    cost = results['cost']
    print(f'cost per image: {cost["params"] / 1e6:.3f} M parameters, {cost["flops"] / 1e6:.2f} MFLOPs, '
          f'{cost["forward_passes"]} forward pass(es), {results["num_members"]} member(s)')

    ood_ens = ood_members = None
    if args.ood_dataset is not None:
        ood_ens, ood_members, _ = predictions(ood_set, 'ood')
        results['ood'] = dict(dataset=ood_description, num_samples=len(ood_set),
                              scores=ood_metrics(ens, ood_ens, members, ood_members))
        if members.shape[1] >= 2:
            results['ood']['member_scores'] = member_ood_metrics(members, ood_members)
        for score, values in results['ood']['scores'].items():
            rows.append(dict(set=f'ood_{score}', **values))
            print(f'OOD {SCORE_LABELS[score]}: AUROC {100 * values["auroc"]:.2f} AUPR-in '
                  f'{100 * values["aupr_in"]:.2f} AUPR-out {100 * values["aupr_out"]:.2f} '
                  f'FPR95 {100 * values["fpr95"]:.2f}  ({ood_description}, {len(ood_set)} images)')
        for score, per_member in results['ood'].get('member_scores', {}).items():
            rows += [dict(set=f'ood_member{index}_{score}', **values) for index, values in enumerate(per_member)]
            print(f'OOD {SCORE_LABELS[score]}, each member alone: AUROC '
                  + ' / '.join(f'{100 * values["auroc"]:.2f}' for values in per_member))

    if args.corruptions:
        from timm_mimo.data.corruptions import CorruptionDataset
        corrupted = CorruptionDataset(args.corruptions, transform=tensor_transform(img_size, splits.mean, splits.std))
        results['corruptions'], _ = evaluate(corrupted, 'corruptions')
        c = results['corruptions']
        rows.append(dict(set='corruptions', **{k: v for k, v in c.items() if not isinstance(v, list)}))
        print(f'corruptions ({len(corrupted)} images): top1 {c["top1"]:.2f} NLL {c["nll"]:.4f} ECE {c["ece"]:.4f}')

    if args.reliability_png:
        reliability_diagram(ens, labels, args.reliability_png, title=f'{results["model"]} on {split}')
    if args.report:
        from timm_mimo.eval.report import write_report
        page = write_report(args.report, results, ens, members, labels, ood_ens, ood_members)
        print(f'report: {page}')
    if args.save_predictions:
        from safetensors.torch import save
        tensors = dict(logits=ens, member_logits=members, labels=labels)
        if ood_ens is not None:
            tensors.update(ood_logits=ood_ens, ood_member_logits=ood_members)
        write_atomic(Path(args.save_predictions), save({k: v.contiguous() for k, v in tensors.items()}))
    if args.results_file:
        write_atomic(Path(args.results_file), json.dumps(results, indent=2))
    if args.results_csv:
        write_csv_atomic(Path(args.results_csv), rows)
    return results


if __name__ == '__main__':
    from timm_mimo.cli import run_cli
    sys.exit(run_cli(main))
