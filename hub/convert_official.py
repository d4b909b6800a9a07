#!/usr/bin/env python3
"""Convert a checkpoint released with the official MixMo code to a folder in timm's Hub format.

    python hub/convert_official.py cifar100_cutmixmo_cutmix.ckpt exports/wrn28_10_mixmo2.official_cut_mixmo_cutmix_cifar100 \\
        --model wrn28_10_mixmo2 --num-classes 100 --tag official_cut_mixmo_cutmix_cifar100 \\
        --dataset torch/cifar100 --data-dir data --verify
    python hub/convert_official.py tiny_res18_2.ckpt exports/x --model preactresnet18_mixmo2 --num-classes 200 \\
        --tag official_cut_mixmo_tiny_imagenet

The checkpoint (github.com/alexrame/mixmo-pytorch's README links one per row of its tables) is read with
torch.load(weights_only=True); every key is mapped onto the timm_mimo model (timm_mimo/hub/official.py) or the
conversion stops naming the keys that do not fit. The folder holds model.safetensors and config.json
(timm's save_for_hf) and a README.md model card: provenance, the paper's top-1 for the row, and with
--dataset the metrics validate.py measures on the converted weights. --verify fails unless that top-1 is
within --tolerance points of the paper's. Nothing is written unless every step succeeds.

    python hub/convert_official.py --rows     # every README row: its download, convert and upload commands

See docs/hub.md, "Publish the paper's weights".
"""
import argparse
import logging
import sys


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='checkpoint written by the official MixMo code')
    p.add_argument('out_dir', help='folder to write (model.safetensors, config.json, README.md)')
    p.add_argument('--model', required=True, help='timm_mimo architecture, e.g. wrn28_10_mixmo2')
    p.add_argument('--num-classes', type=int, required=True, help='10, 100 (CIFAR) or 200 (Tiny ImageNet)')
    p.add_argument('--tag', default=None, help='pretrained tag, e.g. official_cut_mixmo_cutmix_cifar100 '
                                               '(default: the data set of --num-classes)')
    p.add_argument('--dataset', default=None, help="evaluate on this data set as validate.py does (named as train.py's "
                                                   "--dataset) and record the metrics in the card")
    p.add_argument('--data-dir', default=None)
    p.add_argument('--dataset-download', action='store_true', help='let the evaluation download a torch/ data set')
    p.add_argument('--split', default=None, choices=['train', 'validation', 'test'])
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--verify', action='store_true', help="fail unless the measured top-1 matches the paper's row")
    p.add_argument('--tolerance', type=float, default=0.5, help='--verify: allowed top-1 difference in points')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty output folder')
    p.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    return p


def main(argv=None):
    from timm_mimo.hub.official import convert, paper_line
    from timm_mimo.models.official import OFFICIAL_ROWS, publish_commands
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ['--rows']:  # not an argparse flag: the positional arguments would be required
        print('\n\n'.join(publish_commands(row) for row in OFFICIAL_ROWS))
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    result = convert(args.source, args.out_dir, args.model, args.num_classes, tag=args.tag, dataset=args.dataset,
                     data_dir=args.data_dir, split=args.split, verify=args.verify, tolerance=args.tolerance,
                     batch_size=args.batch_size, overwrite=args.overwrite, dataset_download=args.dataset_download)
    print(f'converted {args.source} to {result.name} (M = {result.num_members}, {result.num_classes} classes) '
          f'in {result.folder}')
    if result.measured:
        split = result.measured['split']
        print(f'measured ({split}): top-1 {result.measured[split]["top1"]:.2f} % | paper: {paper_line(result.row)}')
    return 0


if __name__ == '__main__':
    from timm_mimo.hub import run_script
    sys.exit(run_script(main))
