#!/usr/bin/env python3
"""Evaluate a checkpoint, or a deep ensemble of several, with accuracy and uncertainty metrics; works for any
timm model (M = 1).

    python validate.py output/train/my-run                   # a training folder: its best weights
    python validate.py output/train/run-a output/train/run-b output/train/run-c   # their deep ensemble
    python validate.py output/train/my-run --which last      # ... or its last complete checkpoint
    python validate.py path/to/model_folder                  # a folder with config.json + model.safetensors
    python validate.py weights.safetensors --model wrn16_4_mixmo2 --num-classes 10
    python validate.py --model wrn28_10_mixmo2.cifar100 --pretrained --dataset torch/cifar100 --split test
    python validate.py --model hf-hub:org/name --pretrained --dataset torch/cifar100   # a Hub model by its id
    python validate.py output/train/my-wds-run --val-split 'test-{0000..0007}.tar' --select-last-epoch   # a stream

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

The data are read with train.py's data set flags (every timm backend: folder, tar, torch/, hfds/, hfids/, wds/,
tfds/), each defaulting to the evaluated run's args.yaml: its splits, numbered with its training classes.
"""
import argparse
import logging
import sys

import torch

from timm_mimo import rundir
from timm_mimo.eval import DataSettings, EvalOptions, ModelSource, OODSettings, OutputFiles, evaluate
from timm_mimo.eval.ensemble import ENSEMBLE_CHOICES
from timm_mimo.train.args import DATA_BACKEND_KEYS, add_data_backend_args, add_eval_transform_args, \
    check_transform_values


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
    p.add_argument('--model', default='',
                   help="architecture (for a weights file or --pretrained): a registered name, 'hf-hub:org/name[@rev]' "
                        "or 'local-dir:PATH' (its config.json; the Hub commit is written to the results as "
                        "model_source)")
    p.add_argument('--pretrained', action='store_true',
                   help='the pretrained weights of --model (registered, or the hf-hub: / local-dir: ones)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='classes of --model; another count than its weights\' rebuilds the heads (untrained)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V')
    p.add_argument('--dataset', default=None, help="as train.py ('' = embedded digits); default: the run's")
    p.add_argument('--data-dir', default=None)
    p.add_argument('--dataset-download', action='store_true', help="as train.py: timm's reader downloads the set")
    p.add_argument('--split', default=None, choices=['train', 'validation', 'test'],
                   help='default: test when the dataset has one, else validation')
    p.add_argument('--val-per-class', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None, help='input side, 1 to 4096 (default: the model\'s)')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('-j', '--workers', type=int, default=None,
                   help='loader processes; default: 0 for in-memory tensors (digits), else up to 4')
    p.add_argument('--log-interval', type=float, default=30.0,
                   help='seconds between progress lines when stderr is not a terminal (a terminal gets a bar)')
    p.add_argument('--tempscale', action='store_true',
                   help='temperature scaling, two-fold protocol (docs/methods/mixmo.md §6.2)')
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
    add_data_backend_args(p, from_run=True)
    add_eval_transform_args(p.add_argument_group(
        "timm's eval transform (resize to img_size / crop_pct, center crop; defaults: the model's pretrained_cfg "
        "for runs trained with --aug timm and sets of large images, else the whole image)"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from timm_mimo.cli import parse_model_kwargs, refuse_below_one, usable_device
    refuse_below_one(vars(args), ('img_size', 'val_per_class', 'ood_val_per_class'))
    check_transform_values(vars(args))  # folds --input-size into --img-size
    usable_device(args.device)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm').setLevel(logging.WARNING)
    outputs = OutputFiles(results_file=args.results_file, results_csv=args.results_csv,
                          reliability_png=args.reliability_png, report=args.report,
                          save_predictions=args.save_predictions, overwrite=args.overwrite)
    source = ModelSource(checkpoints=args.checkpoints, which=args.which, name=args.model, pretrained=args.pretrained,
                         num_classes=args.num_classes, model_kwargs=parse_model_kwargs(args.model_kwargs),
                         ensemble=args.ensemble)
    data = DataSettings(dataset=args.dataset, data_dir=args.data_dir, download=args.dataset_download,
                        split=args.split, val_per_class=args.val_per_class, img_size=args.img_size,
                        crop_pct=args.crop_pct, interpolation=args.interpolation or None, mean=args.mean,
                        std=args.std,
                        **{key: getattr(args, key) for key in DATA_BACKEND_KEYS})
    ood = None if args.ood_dataset is None else OODSettings(
        dataset=args.ood_dataset, data_dir=args.ood_data_dir, split=args.ood_split,
        val_per_class=args.ood_val_per_class, max_samples=args.ood_max_samples)
    options = EvalOptions(batch_size=args.batch_size, workers=args.workers, device=args.device,
                          tempscale=args.tempscale, corruptions=args.corruptions, log_interval=args.log_interval)
    return evaluate(source, data, ood=ood, options=options, outputs=outputs)


if __name__ == '__main__':
    from timm_mimo.cli import run_cli
    sys.exit(run_cli(main))
