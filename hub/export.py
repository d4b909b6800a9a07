#!/usr/bin/env python3
"""Export a training run or a checkpoint to a folder in timm's Hugging Face Hub format.

    python hub/export.py output/train/my-run exports/wrn28_10_mixmo2.cifar100          # the run's best weights
    python hub/export.py output/train/my-run exports/last --which last
    python hub/export.py weights.safetensors exports/w --model wrn28_10_mixmo2.cifar100 --results val.json

The folder holds model.safetensors, config.json (architecture, num_classes, num_features, model_args with
num_members, pretrained_cfg) and README.md, a model card with the run's metrics (results.json), recipe,
usage, license and citations. It is written under a temporary name and renamed once complete; an existing
non-empty folder is only replaced with --overwrite. Load it with
``timm.create_model('local-dir:<folder>', pretrained=True)`` after ``import timm_mimo``. See docs/hub.md.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub/_arguments.py, also when loaded by runpy
from _arguments import add_export_arguments, export_options  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(p)
    p.add_argument('out_dir', help='export folder to write')
    p.add_argument('--repo-id', default=None, help='org/name it will be published as (for the card\'s usage)')
    return p


def main(argv=None):
    from timm_mimo.hub import export
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm').setLevel(logging.WARNING)
    result = export(args.source, args.out_dir, repo_id=args.repo_id, **export_options(args))
    print(f'exported {result.architecture}' + (f'.{result.tag}' if result.tag else '') +
          f' (M = {result.num_members}, {result.num_classes} classes) to {result.folder}: {", ".join(result.files)}')
    return 0


if __name__ == '__main__':
    from timm_mimo.hub import run_script
    sys.exit(run_script(main))
