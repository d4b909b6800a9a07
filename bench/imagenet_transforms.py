#!/usr/bin/env python3
"""ImageNet-style training data path: timm's transforms per member copy (--aug timm) against timm's own loader.

Generates an ImageNet-like folder (``--images`` JPEGs of ``--side`` px in ``--classes`` class folders) in a temp
dir, then times, in one process and one run, with the same transforms (timm's ``create_transform(is_training=
True)``: random-resized crop to ``--crop`` px, flip, colour jitter 0.4, random erasing ``--reprob``, bicubic /
bilinear at random) and the same ``--workers``:

(a) ours: a DataLoader over ``MemberCopies`` (each image decoded once, the pipeline drawn M x b times, seeded
    per image), U unique images a batch (M = 2, b = ``--batch-repeat``): U x M x b images delivered a batch. The
    batch builder that arranges the copies into the members' inputs runs in the training step, on the device:
    it is judged against the step below, not counted here;
(b) timm: ``timm.data.create_loader(is_training=True, use_prefetcher=False)`` over the same folder, batches of
    the same U x M x b images, each decoded and transformed once.

Rounds alternate (a), (b), (a), (b), ... so background load hits both alike; each rate is the median over the
rounds. Judged: images delivered per second, (a) / (b) >= 0.95; and the batch builder's time on a batch of
copies / a training step of ``--model`` on that batch (forward, loss, backward, SGD) <= 2 %. Also printed: (a)
counted per source image (each decoded image gives M x b copies). Usage::

    python bench/imagenet_transforms.py                        # 2,000 JPEGs of 256 px, 224 px crops, 2 workers
    python bench/imagenet_transforms.py --workers 8 --images 4000
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import timm
import timm.data
import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.eval.benchmark import machine_info, timed
from timm_mimo.loss import MemberSoftTargetCrossEntropy
from timm_mimo.data.transforms import ImageTransforms, MemberCopies, eval_data_config, train_transform


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--images', type=int, default=2000, help='JPEGs generated')
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--side', type=int, default=256, help='side of the generated JPEGs')
    p.add_argument('--crop', type=int, default=224, help='training crop (input size)')
    p.add_argument('--unique', type=int, default=16, help='unique images per batch, U')
    p.add_argument('--batch-repeat', type=int, default=2, help='b (M = 2 members)')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batches', type=int, default=8, help='timed batches per round and path')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--reprob', type=float, default=0.25, help='random erasing probability (timm RandomErasing)')
    p.add_argument('--model', default='mimo_backbone', help='model of the training step (M = 2)')
    p.add_argument('--model-kwargs', default='backbone=resnet10t', help='K=V,... for --model')
    p.add_argument('--steps', type=int, default=3, help='timed training steps')
    return p.parse_args(argv)


def make_folder(root: Path, images: int, classes: int, side: int):
    """Photo-like JPEGs (smooth colour fields with noise, quality 90): decoding cost close to real photos."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f'class{i % classes:03d}'
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-20, 21, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{i:05d}.jpg', quality=90)


def images_per_second(loader, batches: int, count) -> float:
    """Images delivered per second over ``batches`` batches, after the first (worker start, warm-up)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    delivered = 0
    for _ in range(batches):
        delivered += count(next(it))
    return delivered / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    members, repeat, unique = 2, args.batch_repeat, args.unique
    copies = members * repeat
    if (args.batches + 1) * unique > args.images or (args.batches + 1) * unique * copies > args.images:
        print(f'error: {args.batches + 1} batches of {unique * copies} images need more than --images '
              f'{args.images}', file=sys.stderr)
        return 2
    model_kwargs = dict(kv.split('=', 1) for kv in args.model_kwargs.split(',') if kv)
    model = timm.create_model(args.model, num_classes=args.classes, **model_kwargs)
    builder = MimoBatchBuilder.from_model(model, (args.crop, args.crop), batch_repeat=repeat, seed=0)
    config = eval_data_config(args.crop, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    flags = ImageTransforms(reprob=args.reprob)
    info = machine_info(torch.device('cpu'))
    with open('/proc/loadavg') as f:
        load_start = f.read().split()[:3]
    print(f'machine: {info["cpu"]}, {info["cpu_count"]} cores, torch {info["torch"]} ({info["torch_threads"]} '
          f'threads), timm {info["timm"]}; load average {" ".join(load_start)}')

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_folder(Path(tmp), args.images, args.classes, args.side)
        print(f'data: {args.images} JPEGs of {args.side} px in {args.classes} classes ({time.perf_counter() - t0:.0f} s '
              f'to write); crops {args.crop} px; M = {members}, b = {repeat}: {copies} copies per image; U = {unique} '
              f'unique images = {unique * copies} images a batch; {args.workers} workers; {args.rounds} rounds x '
              f'{args.batches} batches per path')
        ours_set = MemberCopies(timm.data.create_dataset('', tmp), train_transform(config, flags), copies, seed=0)
        ours = DataLoader(ours_set, batch_size=unique, shuffle=True, drop_last=True, num_workers=args.workers)
        timm_set = timm.data.create_dataset('', tmp)
        theirs = timm.data.create_loader(
            timm_set, input_size=config['input_size'], batch_size=unique * copies, is_training=True,
            use_prefetcher=False, scale=flags.scale, ratio=flags.ratio, hflip=flags.hflip, vflip=flags.vflip,
            color_jitter=flags.color_jitter, interpolation=flags.train_interpolation, mean=config['mean'],
            std=config['std'], re_prob=flags.reprob, re_mode=flags.remode, re_count=flags.recount,
            num_workers=args.workers, persistent_workers=False, device=torch.device('cpu'))
        rates = {'ours': [], 'timm': []}
        for _ in range(args.rounds):
            rates['ours'].append(images_per_second(ours, args.batches, lambda batch: batch[0].shape[:2].numel()))
            rates['timm'].append(images_per_second(theirs, args.batches, lambda batch: batch[0].shape[0]))
        images, labels = next(iter(ours))

    ours_rate, timm_rate = statistics.median(rates['ours']), statistics.median(rates['timm'])
    paired = statistics.median(a / b for a, b in zip(rates['ours'], rates['timm']))
    ratio = ours_rate / timm_rate
    print(f'(a) ours, MemberCopies loader:   {ours_rate:8.1f} images delivered/s = {ours_rate / copies:7.1f} source '
          f'images/s (rounds: {", ".join(f"{r:.1f}" for r in rates["ours"])})')
    print(f'(b) timm create_loader:           {timm_rate:8.1f} images delivered/s = {timm_rate:7.1f} source '
          f'images/s (rounds: {", ".join(f"{r:.1f}" for r in rates["timm"])})')
    print(f'images delivered/s, (a) / (b): {ratio:.3f} (paired rounds {paired:.3f}) -> '
          f'{"PASS" if ratio >= 0.95 else "FAIL"} (target >= 0.95); per source image {ratio / copies:.3f}')

    # the builder's share of a training step on this batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = MemberSoftTargetCrossEntropy()
    batch = builder(images, labels)

    def step():
        loss = criterion(model(batch.inputs, batch.masks), batch.targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    build_s = statistics.median(timed(lambda: builder(images, labels), 2, 20, lambda: None))
    step_s = statistics.median(timed(step, 1, args.steps, lambda: None))
    share = build_s / step_s
    with open('/proc/loadavg') as f:
        load_end = f.read().split()[:3]
    print(f'batch building: {1000 * build_s:.2f} ms on {tuple(images.shape)} copies; training step of {args.model} '
          f'({args.model_kwargs}) on B = {unique * repeat} x M = {members}: {step_s:.2f} s -> share {100 * share:.2f} % '
          f'{"PASS" if share <= 0.02 else "FAIL"} (target <= 2 %); load average at the end {" ".join(load_end)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
