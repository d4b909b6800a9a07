#!/usr/bin/env python3
"""MIMO (M = 2) overhead against the M = 1 network of the same backbone, measured in one process.

Three measurements, each on the vanilla ``<model>`` and the MIMO ``--mimo-model`` (default ``<model>_mixmo2``;
MixViT: ``--model cait_xxs_mixvit1 --mimo-model cait_xxs_mixvit2``) built with the same seed and init scheme. Each model is warmed up once (``--warmup``), then the two are interleaved (vanilla,
mixmo, vanilla, mixmo, ... for ``--repeats`` rounds of ``--iters`` timed iterations each, synchronised on
CUDA) so that background load hits both alike. Every per-model number is the median of all its timed
iterations and the judged ratio is the ratio of these medians; the median of the per-round ratios (a
paired estimate) is printed next to it:

(a) inference throughput, eval mode, ``model(x)`` on (B, 3, H, W) under ``torch.inference_mode``:
    ratio mixmo / vanilla images/s, target >= 0.97.
(b) training step time: forward, loss, backward, SGD step (momentum 0.9, weight decay 5e-4, set_to_none
    zero_grad). MixMo runs ``model(inputs, masks)`` on a (B, 2, 3, H, W) member batch with
    ``MemberSoftTargetCrossEntropy``; vanilla runs what a vanilla timm user runs: ``model(x)`` on a plain
    (B, 3, H, W) batch with timm's ``SoftTargetCrossEntropy`` on one-hot (B, K) targets (``--vanilla-input
    member`` instead feeds it the M = 1 member batch of the same builder). Batches are built once, outside
    the timed region. Ratio mixmo / vanilla step time, target <= 1.05.
(c) batch building: the ``MimoBatchBuilder`` call on U = B / batch_repeat unique images (batch repetition,
    pad-4 crop + flip, member permutations, Cut-MixMo masks, weighted soft targets) on the training device,
    as a share of the median MixMo training step, target <= 2 %. Also reported, not judged: the full
    ``MimoCollate`` on a list of U (image, label) samples on the CPU with one thread (what a DataLoader
    worker runs: workers call ``torch.set_num_threads(1)``).

Targets: MixMo CNNs inference >= 0.97, train step <= 1.05 (issue 2); MixViT inference >= 0.93, train step
<= 1.10 and parameters + < 1 % (issues 3, 7). The MIMO model's own default masks are used (Cut-MixMo for the
CNNs, binary token boxes for MixViT).

Usage:
    python bench/mixmo_overhead.py --model wrn16_4                     # CPU defaults, ~1.5-3 min on 2 cores
    python bench/mixmo_overhead.py --model cait_xxs_mixvit1 --mimo-model cait_xxs_mixvit2 --batch-repeat 1
    python bench/mixmo_overhead.py --model wrn16_4 --threads 1         # steadier on a CPU shared with other jobs
    python bench/mixmo_overhead.py --model resnet18 --mimo-model mimo_backbone --mimo-model-kwargs backbone=resnet18
    python bench/mixmo_overhead.py --model wrn28_10 --batch-size 128 --amp-dtype bfloat16 --channels-last
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import Dict, List

import torch
import torch.nn as nn

import timm
from timm.loss import SoftTargetCrossEntropy

import timm_mimo
from timm_mimo.batch import MimoBatchBuilder, MimoCollate
from timm_mimo.loss import MemberSoftTargetCrossEntropy
from timm_mimo.eval.benchmark import InferenceBench, TrainBench, machine_info, make_sync, timed, to_input_layout  # noqa: F401

TARGETS = {
    'inference_ratio': ('>=', 0.97),
    'train_ratio': ('<=', 1.05),
    'builder_share': ('<=', 0.02),
}
VIT_TARGETS = {
    'inference_ratio': ('>=', 0.93),
    'train_ratio': ('<=', 1.10),
    'builder_share': ('<=', 0.02),
    'param_overhead': ('<=', 0.01),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='wrn16_4', help='the M = 1 model')
    p.add_argument('--mimo-model', default=None, help='the M = 2 model (default <model>_mixmo2)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='create_model kwargs of --model')
    p.add_argument('--mimo-model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='create_model kwargs of --mimo-model (e.g. backbone=resnet18 for mimo_backbone)')
    p.add_argument('--batch-size', type=int, default=None, help='mixed samples B (default 64 on CPU, 128 on CUDA)')
    p.add_argument('--batch-repeat', type=int, default=2, help='copies of each unique image, b (U = B / b)')
    p.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument('--amp-dtype', default='none', choices=('none', 'bfloat16', 'float16'),
                   help='autocast dtype (both models, all three measurements); float16 adds a GradScaler')
    p.add_argument('--channels-last', action='store_true', help='channels_last models and inputs')
    p.add_argument('--warmup', type=int, default=None, help='untimed iterations per model, once before the first round (CPU 2, CUDA 10)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations per model and round (CPU 1, CUDA 20)')
    p.add_argument('--repeats', type=int, default=None, help='interleaved rounds (CPU 7, CUDA 10)')
    p.add_argument('--builder-iters', type=int, default=None, help='timed builder/collate calls per round (CPU 5, CUDA 20)')
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--vanilla-input', default='plain', choices=('plain', 'member'),
                   help="vanilla training batch: 'plain' (B, 3, H, W) + SoftTargetCrossEntropy (default), "
                        "'member' the builder's M = 1 batch (B, 1, 3, H, W) + MemberSoftTargetCrossEntropy")
    p.add_argument('--lr', type=float, default=0.01, help='SGD learning rate of the timed training steps')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    p.add_argument('--skip', default='', help="comma list of 'inference', 'train', 'builder' to skip")
    p.add_argument('--json', default=None, metavar='PATH', help='also write all results to this JSON file')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- helpers

def create(name: str, args, device: torch.device, model_kwargs=()) -> nn.Module:
    from timm_mimo.cli import parse_model_kwargs
    torch.manual_seed(args.seed)  # same seed and init scheme (the model's own _init_weights) for both
    model = timm.create_model(name, num_classes=args.num_classes, **parse_model_kwargs(model_kwargs))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- benchmarks

def interleave(benches: Dict[str, object], args, sync):
    """Run vanilla, mixmo, vanilla, mixmo, ... for ``args.repeats`` rounds.

    Returns all timed samples per model, and per round the ratio of the mixmo to the vanilla median of
    that round (a paired estimate, less sensitive to load that changes between rounds).
    """
    samples = {k: [] for k in benches}
    round_ratios = []
    for b in benches.values():  # warm up once per model (allocator, oneDNN / cuDNN algorithm caches)
        b.prepare()
        timed(b.step, args.warmup, 0, sync)
    for r in range(args.repeats):
        medians = {}
        for k, b in benches.items():
            b.prepare()
            t = timed(b.step, 0, args.iters, sync)
            samples[k].extend(t)
            medians[k] = statistics.median(t)
            print(f'    round {r + 1}/{args.repeats} {k:8s} ' + ' '.join(f'{s * 1e3:.1f}' for s in t) + ' ms',
                  flush=True)
        round_ratios.append(medians['mixmo'] / medians['vanilla'])
    return samples, round_ratios


def summarize(samples: List[float]) -> Dict[str, float]:
    return {
        'median_s': statistics.median(samples),
        'min_s': min(samples),
        'max_s': max(samples),
        'n': len(samples),
    }


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(args.device)
    on_cuda = device.type == 'cuda'
    if on_cuda and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 128 if on_cuda else 64
    for name, cpu_default, cuda_default in (
            ('warmup', 2, 10), ('iters', 1, 20), ('repeats', 7, 10), ('builder_iters', 5, 20)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if on_cuda else cpu_default)
    if args.batch_size % args.batch_repeat:
        print(f'--batch-size {args.batch_size} is not divisible by --batch-repeat {args.batch_repeat}',
              file=sys.stderr)
        return 2
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    skip = {s.strip() for s in args.skip.split(',') if s.strip()}

    amp_dtype = {'none': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype]
    if amp_dtype is None:
        autocast = contextlib.nullcontext
    else:
        autocast = lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)  # noqa: E731
    sync = make_sync(device)

    vanilla_name, mixmo_name = args.model, args.mimo_model or f'{args.model}_mixmo2'
    models = {'vanilla': create(vanilla_name, args, device, args.model_kwargs),
              'mixmo': create(mixmo_name, args, device, args.mimo_model_kwargs)}
    if getattr(models['vanilla'], 'num_members', 1) != 1 or getattr(models['mixmo'], 'num_members', 1) != 2:
        print(f'{vanilla_name} must have one member and {mixmo_name} two', file=sys.stderr)
        return 2
    mix_mode = getattr(models['mixmo'], 'default_mix_mode', 'cut')
    targets = VIT_TARGETS if mix_mode == 'box' else TARGETS
    info = machine_info(device)
    b, u, k = args.batch_size, args.batch_size // args.batch_repeat, args.num_classes
    img_size = (args.img_size, args.img_size)

    print('MIMO overhead benchmark')
    print(f'  machine : {info.get("gpu", info["cpu"])}' + (f' (host CPU {info["cpu"]})' if on_cuda else '')
          + f', {info["cpu_count"]} CPUs, torch threads {info["torch_threads"]}')
    print(f'  versions: torch {info["torch"]}, timm {info["timm"]}, timm_mimo {info["timm_mimo"]}, '
          f'python {info["python"]}' + (f', CUDA {info["cuda"]}, cuDNN {info["cudnn"]}' if on_cuda else ''))
    print(f'  models  : {vanilla_name} ({count_params(models["vanilla"]) / 1e6:.3f} M params) vs '
          f'{mixmo_name} ({count_params(models["mixmo"]) / 1e6:.3f} M params), {k} classes, {img_size[0]} px, '
          f'masks {mix_mode}')
    print(f'  setup   : device {device}, B={b} mixed samples (U={u} unique x batch_repeat {args.batch_repeat}), '
          f'amp {args.amp_dtype}, channels_last {args.channels_last}, vanilla input {args.vanilla_input}')
    print(f'  timing  : {args.warmup} warmup iterations per model, then {args.repeats} interleaved rounds x '
          f'{args.iters} timed iterations per model; median of all timed iterations', flush=True)
    if not on_cuda and hasattr(os, 'getloadavg'):
        info['loadavg_start'] = os.getloadavg()
        print(f'  load    : 1/5/15 min load average {" ".join(f"{v:.2f}" for v in os.getloadavg())} '
              f'(other processes compete for {info["cpu_count"]} CPUs)', flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    unique_images = torch.randn(u, 3, *img_size, generator=gen)
    unique_labels = torch.randint(0, k, (u,), generator=gen)
    results: Dict[str, object] = {'machine': info, 'config': vars(args).copy(), 'models': {
        'vanilla': vanilla_name, 'mixmo': mixmo_name}}
    results['param_overhead'] = count_params(models['mixmo']) / count_params(models['vanilla']) - 1
    rows = []

    # (a) inference --------------------------------------------------------------------------------
    if 'inference' not in skip:
        print('\n(a) inference, eval mode, model(x) on (B, 3, H, W)', flush=True)
        x = to_input_layout(torch.randn(b, 3, *img_size, generator=gen).to(device), args.channels_last)
        benches = {name: InferenceBench(m, x, autocast) for name, m in models.items()}
        samples, round_ratios = interleave(benches, args, sync)
        inf = {name: summarize(s) for name, s in samples.items()}
        for name in inf:
            inf[name]['images_per_s'] = b / inf[name]['median_s']
            rows.append((models[name].default_cfg.get('architecture', name), 'inference images/s',
                         f'{inf[name]["images_per_s"]:.1f}  (best {b / inf[name]["min_s"]:.1f})'))
        results['inference'] = inf
        results['inference_ratio'] = inf['mixmo']['images_per_s'] / inf['vanilla']['images_per_s']
        # throughput ratio = inverse time ratio, per round
        results['inference_ratio_paired'] = statistics.median(1.0 / q for q in round_ratios)
        del x, benches

    # (b) training step ------------------------------------------------------------------------------
    if 'train' not in skip:
        print('\n(b) training step: forward, loss, backward, SGD step', flush=True)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        mix_builder = MimoBatchBuilder.from_model(
            models['mixmo'], img_size, batch_repeat=args.batch_repeat, mix_mode=mix_mode, seed=args.seed)
        mix_batch = mix_builder(unique_images.to(device), unique_labels.to(device))
        benches = {}
        if args.vanilla_input == 'plain':
            # what a vanilla user runs: B plain images (the same repeated+augmented batch), one-hot soft CE
            van_x = to_input_layout(mix_batch.inputs[:, 0].clone(), args.channels_last)
            van_t = mix_batch.targets.new_zeros(b, k)
            van_t[torch.arange(b, device=device), mix_batch.targets[:, 0].argmax(-1)] = 1.0
            benches['vanilla'] = TrainBench(
                models['vanilla'], van_x, None, van_t, SoftTargetCrossEntropy(), args.lr, autocast, scaler)
        else:
            van_builder = MimoBatchBuilder.from_model(
                models['vanilla'], img_size, batch_repeat=args.batch_repeat, seed=args.seed)
            vb = van_builder(unique_images.to(device), unique_labels.to(device))
            benches['vanilla'] = TrainBench(
                models['vanilla'], to_input_layout(vb.inputs, args.channels_last), vb.masks, vb.targets,
                MemberSoftTargetCrossEntropy(), args.lr, autocast, scaler)
        benches['mixmo'] = TrainBench(
            models['mixmo'], to_input_layout(mix_batch.inputs, args.channels_last), mix_batch.masks,
            mix_batch.targets, MemberSoftTargetCrossEntropy(), args.lr, autocast, scaler)
        samples, round_ratios = interleave(benches, args, sync)
        tr = {name: summarize(s) for name, s in samples.items()}
        for name in tr:
            rows.append((models[name].default_cfg.get('architecture', name), 'train step ms',
                         f'{tr[name]["median_s"] * 1e3:.1f}  (best {tr[name]["min_s"] * 1e3:.1f})'))
        results['train'] = tr
        results['train_ratio'] = tr['mixmo']['median_s'] / tr['vanilla']['median_s']
        results['train_ratio_paired'] = statistics.median(round_ratios)
        del benches

    # (c) batch building -----------------------------------------------------------------------------
    if 'builder' not in skip:
        print('\n(c) MimoBatchBuilder on U unique images (and MimoCollate on CPU samples)', flush=True)
        builder = MimoBatchBuilder.from_model(
            models['mixmo'], img_size, batch_repeat=args.batch_repeat, mix_mode=mix_mode, seed=args.seed)
        dev_images, dev_labels = unique_images.to(device), unique_labels.to(device)
        cpu_builder = MimoBatchBuilder.from_model(
            models['mixmo'], img_size, batch_repeat=args.batch_repeat, mix_mode=mix_mode, seed=args.seed)
        collate = MimoCollate(cpu_builder)
        sample_list = [(unique_images[i], int(unique_labels[i])) for i in range(u)]
        bw = max(args.warmup, 2)
        timed(lambda: builder(dev_images, dev_labels), bw, 0, sync)
        timed(lambda: collate(sample_list), bw, 0, lambda: None)
        build_s, collate_s = [], []
        for r in range(args.repeats):
            build_s += timed(lambda: builder(dev_images, dev_labels), 0, args.builder_iters, sync)
            # DataLoader workers run with torch.set_num_threads(1): time the collate the same way
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                collate_s += timed(lambda: collate(sample_list), 0, args.builder_iters, lambda: None)
            finally:
                torch.set_num_threads(threads)
            print(f'    round {r + 1}/{args.repeats} builder median '
                  f'{statistics.median(build_s[-args.builder_iters:]) * 1e3:.2f} ms, collate (cpu, 1 thread) median '
                  f'{statistics.median(collate_s[-args.builder_iters:]) * 1e3:.2f} ms', flush=True)
        bres = {'builder': summarize(build_s), 'collate_cpu': summarize(collate_s)}
        rows.append((mixmo_name, f'builder ms ({device.type})', f'{bres["builder"]["median_s"] * 1e3:.2f}'))
        rows.append((mixmo_name, 'MimoCollate ms (cpu, 1 thread)', f'{bres["collate_cpu"]["median_s"] * 1e3:.2f}'))
        results['builder'] = bres
        if 'train' in results:
            step = results['train']['mixmo']['median_s']
            results['builder_share'] = bres['builder']['median_s'] / step
            results['collate_cpu_share'] = bres['collate_cpu']['median_s'] / step

    # report -------------------------------------------------------------------------------------------
    print('\nresults (medians)')
    w0 = max(len(r[0]) for r in rows) if rows else 5
    w1 = max(len(r[1]) for r in rows) if rows else 6
    print(f'  {"model":{w0}s}  {"metric":{w1}s}  value')
    for name, metric, value in rows:
        print(f'  {name:{w0}s}  {metric:{w1}s}  {value}')

    print('\nratios')
    verdicts = {}
    labels = {
        'inference_ratio': '(a) inference throughput mixmo/vanilla',
        'train_ratio': '(b) train step time mixmo/vanilla',
        'builder_share': '(c) builder time / mixmo train step',
        'param_overhead': 'parameters mixmo/vanilla - 1',
    }
    for key, label in labels.items():
        if key not in results or key not in targets:
            continue
        op, target = targets[key]
        value = results[key]
        ok = value >= target if op == '>=' else value <= target
        verdicts[key] = 'PASS' if ok else 'FAIL'
        if key in ('builder_share', 'param_overhead'):
            print(f'  {label:42s} {value * 100:6.2f} %  target {op} {target * 100:.0f} %   {verdicts[key]}')
        else:
            paired = results[key + '_paired']
            print(f'  {label:42s} {value:6.3f}    target {op} {target:.2f}   {verdicts[key]}'
                  f'   (median of per-round ratios {paired:.3f})')
    if 'collate_cpu_share' in results:
        print(f'  {"    MimoCollate (cpu) / mixmo train step":42s} {results["collate_cpu_share"] * 100:6.2f} %  '
              f'(not judged: DataLoader workers, 1 thread)')
    results['verdicts'] = verdicts
    if hasattr(os, 'getloadavg'):
        results['machine']['loadavg_end'] = os.getloadavg()
        print(f'\n  load average at end: {" ".join(f"{v:.2f}" for v in results["machine"]["loadavg_end"])}')

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2, default=str)
        print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
