#!/usr/bin/env python3
"""Evaluate a checkpoint with accuracy and uncertainty metrics; works for any timm model (M = 1).

    python validate.py output/train/my-run                   # a training folder: its best weights
    python validate.py output/train/my-run --which last      # ... or its last complete checkpoint
    python validate.py path/to/model_folder                  # a folder with config.json + model.safetensors
    python validate.py weights.safetensors --model wrn16_4_mixmo2 --num-classes 10
    python validate.py --model wrn28_10_mixmo2.cifar100 --pretrained --dataset torch/cifar100 --split test

Reports top-1, top-5, NLL, ECE (15 bins), Brier, per-member top-1, the ensemble gain over the best member
and member diversity (disagreement, ratio-errors); optionally temperature scaling with MixMo's two-fold
protocol (``--tempscale``) and CIFAR-10-C / 100-C corruption sets (``--corruptions FOLDER``). Writes JSON
(``--results-file``), CSV (``--results-csv``) and a reliability diagram (``--reliability-png``); an
existing file is never overwritten unless ``--overwrite`` is given.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch

_logger = logging.getLogger('validate')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', nargs='?', default='',
                   help='training folder, model folder (config.json + model.safetensors) or weights file')
    p.add_argument('--which', default='best', choices=['best', 'last', 'ema'], help='weights of a training folder')
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
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=0)
    p.add_argument('--tempscale', action='store_true', help='temperature scaling, two-fold protocol (spec 6.2)')
    p.add_argument('--corruptions', default='', help='CIFAR-10-C / 100-C folder of .npy files')
    p.add_argument('--results-file', default='', help='write the results as JSON')
    p.add_argument('--results-csv', default='', help='write one CSV row per evaluated set')
    p.add_argument('--reliability-png', default='', help='write a reliability diagram')
    p.add_argument('--overwrite', action='store_true', help='allow replacing existing result files')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    return p


def resolve_model(args):
    """(model, the run's args.yaml dict or {}) from the checkpoint argument or a registered name."""
    import timm
    from timm_mimo import rundir
    from timm_mimo.cli import parse_model_kwargs
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if not args.checkpoint:
        if not args.model:
            raise ValueError('give a checkpoint, or --model NAME --pretrained')
        if not timm.is_model(args.model):
            raise ValueError(f'unknown model {args.model!r} (timm_mimo models are registered by validate.py)')
        from timm_mimo.factory import create_model  # one-line errors naming unpublished / uncached weights
        return create_model(args.model, pretrained=args.pretrained, **kwargs), {}
    checkpoint = rundir.resolve(args.checkpoint, args.which)
    return rundir.load_model(checkpoint, args.model or None, **kwargs), checkpoint.run_args


def refuse_existing(path_str: str, overwrite: bool):
    if path_str and Path(path_str).exists() and not overwrite:
        raise FileExistsError(f'{path_str} exists: pass --overwrite to replace it')


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm').setLevel(logging.WARNING)
    for path in (args.results_file, args.results_csv, args.reliability_png):
        refuse_existing(path, args.overwrite)

    import timm_mimo  # noqa: F401  (registers the models)
    from torch.utils.data import DataLoader
    from timm_mimo.data.splits import build_splits, tensor_transform
    from timm_mimo.engine import collect_predictions
    from timm_mimo.rundir import write_atomic, write_csv_atomic
    from timm_mimo.metrics import classification_metrics, reliability_diagram, temperature_scaled_metrics

    model, run_args = resolve_model(args)
    device = torch.device(args.device)
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

    def evaluate(data):
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
        moved = ((x.to(device), y) for x, y in loader)
        ens, members, labels = collect_predictions(model, moved)
        if args.tempscale:
            return temperature_scaled_metrics(ens, labels, members), (ens, labels)
        return classification_metrics(ens, labels, members), (ens, labels)

    results = dict(checkpoint=args.checkpoint or f'{args.model} (pretrained={args.pretrained})',
                   model=cfg.get('architecture', args.model), num_members=getattr(model, 'num_members', 1),
                   dataset=splits.description, split=split)
    results[split], (ens, labels) = evaluate(eval_set)
    rows = [dict(set=split, **{k: v for k, v in results[split].items() if not isinstance(v, list)})]
    m = results[split]
    line = (f'{split}: top1 {m["top1"]:.2f} top5 {m["top5"]:.2f} NLL {m["nll"]:.4f} ECE {m["ece"]:.4f} '
            f'Brier {m["brier"]:.4f} | members {" ".join(f"{a:.2f}" for a in m["member_top1"])}')
    if m.get('ensemble_gain') is not None:
        line += f' | gain {m["ensemble_gain"]:+.2f} disagreement {m["disagreement"]:.3f} ' \
                f'ratio-errors {m["ratio_errors"]:.3f}'
    if args.tempscale:
        line += f' | T {m["temperature"]:.3f} NLL_c {m["nll_calibrated"]:.4f} ECE_c {m["ece_calibrated"]:.4f}'
    print(line)

    if args.corruptions:
        from timm_mimo.data.corruptions import CorruptionDataset
        corrupted = CorruptionDataset(args.corruptions, transform=tensor_transform(img_size, splits.mean, splits.std))
        results['corruptions'], _ = evaluate(corrupted)
        c = results['corruptions']
        rows.append(dict(set='corruptions', **{k: v for k, v in c.items() if not isinstance(v, list)}))
        print(f'corruptions ({len(corrupted)} images): top1 {c["top1"]:.2f} NLL {c["nll"]:.4f} ECE {c["ece"]:.4f}')

    if args.reliability_png:
        reliability_diagram(ens, labels, args.reliability_png, title=f'{results["model"]} on {split}')
    if args.results_file:
        write_atomic(Path(args.results_file), json.dumps(results, indent=2))
    if args.results_csv:
        write_csv_atomic(Path(args.results_csv), rows)
    return results


if __name__ == '__main__':
    from timm_mimo.cli import run_cli
    sys.exit(run_cli(main))
