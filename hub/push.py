#!/usr/bin/env python3
"""Export a training run or a checkpoint (as hub/export.py) and upload it to the Hugging Face Hub.

    python hub/push.py output/train/my-run --repo-id my-org/wrn28_10_mixmo2.cifar100 --dry-run --export-dir ex
    python hub/push.py output/train/my-run --repo-id my-org/wrn28_10_mixmo2.cifar100
    python hub/push.py output/train/my-run --repo-id me/test --private --revision v1 -m "First weights"

huggingface_hub creates the repository (if needed) and uploads exactly README.md, config.json and
model.safetensors from the export folder. The token comes from HF_TOKEN or `hf auth login`; it is never
printed or written. --dry-run does everything but contact the Hub. For `pretrained=True` on a registered
name, publish to timm_mimo.constants.hub_id(arch, tag) (default '<TIMM_MIMO_HUB_ORG>/<arch>.<tag>').
See docs/hub.md.
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
    p.add_argument('--repo-id', required=True, help='Hub repository, org/name')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    p.add_argument('-m', '--commit-message', default=None)
    p.add_argument('--dry-run', action='store_true', help='export and check everything, upload nothing')
    p.add_argument('--export-dir', default=None, help='keep the exported folder here (default: temporary)')
    p.add_argument('--as-is', action='store_true',
                   help='the source is a finished export folder (e.g. hub/convert_official.py\'s): upload it unchanged')
    return p


def main(argv=None):
    from timm_mimo.hub import push
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logging.getLogger('timm').setLevel(logging.WARNING)
    push(args.source, args.repo_id, revision=args.revision, private=args.private,
         commit_message=args.commit_message, dry_run=args.dry_run, export_dir=args.export_dir, as_is=args.as_is,
         **export_options(args))
    return 0


if __name__ == '__main__':
    from timm_mimo.hub import run_script
    sys.exit(run_script(main))
