#!/usr/bin/env python3
"""Training-data throughput: the device-resident path against timm's loader with our collate, in one run.

Both paths deliver the same thing, MIMO batches ``MimoBatch(inputs, masks, targets)`` of B = U x b mixed
samples for ``--model`` (default ``wrn28_10_mixmo2``: Cut-MixMo masks on a 32x32 grid, pad-4 crop + flip,
batch repetition b), on the CIFAR-10 JPEG zip of ``../shared/data``:

(a) device path (``timm_mimo.data.device_loader``): the split decoded once into a uint8 tensor (cached on
    disk, not timed), kept on the device; per batch a gather, a normalisation and the batch builder, all on
    the device.
(b) timm's ``create_loader(..., use_prefetcher=False, collate_fn=MimoCollate(builder))`` over the zip
    dataset: PIL decode + to-tensor + normalise per image in ``--workers`` worker processes, then the
    builder in the collate. What the official MixMo code's users run, minus its NumPy masks.

Each path is timed over ``--batches`` batches after one warm-up pass; the ratio (a) / (b) of mixed samples
per second is printed. Usage::

    python bench/loader_throughput.py                         # CPU, 5,000 images, ~1 min on 2 cores
    python bench/loader_throughput.py --device cuda --workers 8 --per-class 4500
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import timm
import timm.data
import timm_mimo  # noqa: F401
from timm_mimo.batch import MimoBatchBuilder, MimoCollate
from timm_mimo.constants import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from timm_mimo.data import CifarZipDataset, default_cifar10_zip
from timm_mimo.data.device_loader import DeviceTensorLoader, resident_arrays
from timm_mimo.data.splits import tensor_transform


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='wrn28_10_mixmo2', help='MIMO model whose mixing grid the masks use')
    p.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda'")
    p.add_argument('--zip', default=None, help='CIFAR-10 zip (default ../shared/data/cifar10/train.zip)')
    p.add_argument('--per-class', type=int, default=500, help='training images per class to use')
    p.add_argument('--batch-size', type=int, default=128, help='mixed samples per batch, B')
    p.add_argument('--batch-repeat', type=int, default=2)
    p.add_argument('--batches', type=int, default=20, help='timed batches per path')
    p.add_argument('--workers', type=int, default=2, help='loader worker processes of path (b)')
    p.add_argument('--cache-dir', default=None, help='where the decoded split is cached (default: a temp dir)')
    return p.parse_args(argv)


def consume(batches, count: int, sync) -> float:
    """Seconds to draw ``count`` batches (after the iterator has started)."""
    it = iter(batches)
    next(it)  # warm-up: worker start, first gather
    sync()
    start = time.perf_counter()
    for _ in range(count):
        batch = next(it)
        batch.inputs.sum()  # touch the data, as a training step would
    sync()
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if args.device == 'auto' else args.device))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    zip_path = Path(args.zip) if args.zip else default_cifar10_zip()
    if not zip_path.exists():
        print(f'error: CIFAR-10 zip not found at {zip_path}', file=sys.stderr)
        return 2
    if args.batch_size % args.batch_repeat:
        print(f'error: --batch-size {args.batch_size} is not divisible by --batch-repeat {args.batch_repeat}',
              file=sys.stderr)
        return 2
    unique = args.batch_size // args.batch_repeat
    need = (args.batches + 1) * unique
    if need > 10 * args.per_class:
        print(f'error: {args.batches + 1} batches of {unique} unique images need {need} images; '
              f'raise --per-class above {need // 10}', file=sys.stderr)
        return 2
    with torch.device('meta'):
        model = timm.create_model(args.model)
    make_builder = lambda: MimoBatchBuilder.from_model(  # noqa: E731
        model, (32, 32), batch_repeat=args.batch_repeat, seed=0)

    transform = tensor_transform(32, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD)
    dataset = CifarZipDataset(zip_path, split='train', max_per_class=args.per_class, transform=transform)
    print(f'loader throughput: {len(dataset)} CIFAR-10 images, B={args.batch_size} (U={unique} x b='
          f'{args.batch_repeat}), model {args.model}, device {device}, {torch.get_num_threads()} threads, '
          f'{args.batches} timed batches per path', flush=True)

    # (a) device-resident
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images, labels = resident_arrays(dataset, cache_dir=args.cache_dir or tmp)
        decode_s = time.perf_counter() - t0
    loader = DeviceTensorLoader(images, labels, unique, device, CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, seed=0)
    builder = make_builder()
    device_batches = (builder(x, y) for x, y in loader)
    device_s = consume(device_batches, args.batches, sync)

    # (b) timm's loader with the MIMO collate (workers decode with PIL every epoch)
    timm_loader = timm.data.create_loader(
        dataset, input_size=(3, 32, 32), batch_size=unique, is_training=True, use_prefetcher=False,
        no_aug=True, crop_pct=1.0, interpolation='bilinear', mean=CIFAR_DEFAULT_MEAN, std=CIFAR_DEFAULT_STD,
        num_workers=args.workers, collate_fn=MimoCollate(make_builder()), persistent_workers=False)
    timm_s = consume(timm_loader, args.batches, sync)

    samples = args.batches * args.batch_size
    device_rate, timm_rate = samples / device_s, samples / timm_s
    print(f'  one-off decode of the split to uint8: {decode_s:.1f} s ({len(dataset)} images)')
    print(f'  (a) device-resident + builder on {device.type}: {device_rate:10.0f} mixed samples/s')
    print(f'  (b) timm create_loader + MimoCollate, {args.workers} workers: {timm_rate:10.0f} mixed samples/s')
    print(f'  ratio (a) / (b): {device_rate / timm_rate:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
