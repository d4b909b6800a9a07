#!/usr/bin/env python3
"""AutoMix's training step against Mixup's at the same batch size: time and memory ratios, in one run.

Both steps train the same model (same seed and init) on B mixed samples with SGD (momentum 0.9, weight
decay 5e-4); batches are built once, outside the timed region.

- **Mixup**: ``MimoBatchBuilder(M = 1, msda='mixup', msda_prob=1)`` batch; forward, soft-target CE,
  backward, optimizer step.
- **AutoMix** (``timm_mimo.automix``, what ``train.py --msda automix`` runs): momentum-encoder features at
  ``--stage``, the Mix Block (both branches in one call), the momentum encoder's forward of the Mix Block's
  samples (its backward reaches the block through the frozen encoder), the online model's forwards of the
  mixed and the clean images (``L_mix`` and ``L_one``), the mask loss; one backward, one optimizer step
  (online model + Mix Block), one EMA update.

The two steps alternate for ``--repeats`` rounds of ``--iters`` iterations (after ``--warmup`` untimed
ones), so background load hits both alike; each step's figure is the median of its timed iterations and
the ratio is AutoMix / Mixup of the medians.

Memory:

- CUDA: ``torch.cuda.max_memory_allocated`` over one step (after ``reset_peak_memory_stats``): the peak of
  everything allocated (weights, gradients, optimizer state, the momentum encoder, activations).
- CPU: torch's allocations are invisible to ``tracemalloc`` (it sees Python objects only), so activation
  memory is measured as the bytes of the tensors autograd saves for the backward pass, captured with
  ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage (parameters excluded). The
  static state (parameters, gradients, SGD momentum, the momentum encoder's copy, the Mix Block) is counted
  from the tensors themselves. Both are printed, and the ratio of their sums.

Usage:
    python bench/automix_cost.py                                  # wrn16_2, B = 64, CPU, ~1-2 min on 2 cores
    python bench/automix_cost.py --model wrn28_10 --batch-size 100 --device cuda
    python bench/automix_cost.py --threads 1 --json output/automix_cost.json
    python bench/automix_cost.py --breakdown      # + AutoMix without the clean-image loss, as a third row
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import timm
from timm.utils import ModelEmaV3

import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo.automix import build_automix, freeze
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.loss import MemberSoftTargetCrossEntropy

from timm_mimo.eval.benchmark import cpu_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='wrn16_2', help='any timm model with feature_info (M = 1)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='extra create_model kwargs')
    p.add_argument('--batch-size', type=int, default=64, help='mixed samples per step, B (both methods)')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--stage', type=int, default=-2, help='feature level read by the Mix Block')
    p.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations per method before timing')
    p.add_argument('--iters', type=int, default=1, help='timed iterations per method and round')
    p.add_argument('--repeats', type=int, default=5, help='interleaved rounds')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--breakdown', action='store_true',
                   help='also time AutoMix without the clean-image loss L_one (a third, unjudged row)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default='', help='also write the results to this file')
    return p.parse_args(argv)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SavedTensorMeter:
    """Bytes of the tensors autograd saves in a forward pass, once per storage, parameters excluded."""

    def __init__(self, exclude: List[torch.Tensor]):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: Dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr != 0:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Bench:
    """One method: ``loss()`` builds the graph, ``step()`` runs loss, backward, optimizer, (EMA)."""

    def __init__(self, name: str, loss_fn: Callable[[], torch.Tensor], optimizer, params: List[torch.Tensor],
                 static: List[torch.Tensor], after: Callable[[], None] = lambda: None):
        self.name, self.loss_fn, self.optimizer, self.params = name, loss_fn, optimizer, params
        self.static, self.after = static, after
        self.times: List[float] = []

    def step(self):
        loss = self.loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.after()

    def static_bytes(self) -> int:
        """Weights, gradients and optimizer state of the trained tensors, plus the other kept tensors."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensor_bytes(self.params) * 2 + tensor_bytes(state) + tensor_bytes(self.static)

    def saved_bytes(self) -> int:
        meter = SavedTensorMeter(self.params + self.static)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            loss = self.loss_fn()
        del loss
        return meter.total


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if args.device == 'auto' else args.device))
    on_cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    kwargs = {}
    for item in args.model_kwargs:
        import yaml
        key, value = item.split('=', 1)
        kwargs[key] = yaml.safe_load(value)

    def create():
        torch.manual_seed(args.seed)
        return timm.create_model(args.model, num_classes=args.num_classes, **kwargs).to(device).train()

    size = (args.img_size, args.img_size)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, *size, device=device, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=gen)
    criterion = MemberSoftTargetCrossEntropy()

    # Mixup
    mixup_model = create()
    grid = mixup_model.mix_grid_size(size) if hasattr(mixup_model, 'mix_grid_size') else size
    mixup_batch = MimoBatchBuilder(1, args.num_classes, grid, msda='mixup', msda_prob=1.0, msda_alpha=1.0,
                                   seed=args.seed)(images, labels, generator=gen)
    mixup_opt = torch.optim.SGD(mixup_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x_mix = mixup_batch.inputs[:, 0]

    def mixup_loss():
        return criterion(mixup_model(x_mix).float()[:, None], mixup_batch.targets)

    # AutoMix
    auto_model = create()
    automix = build_automix(auto_model, args.stage)
    automix.mixblock.to(device)
    ema = ModelEmaV3(auto_model, decay=0.999)
    freeze(ema.module)
    plain_batch = MimoBatchBuilder(1, args.num_classes, grid, seed=args.seed)(images, labels, generator=gen)
    auto_params = list(auto_model.parameters()) + list(automix.mixblock.parameters())
    auto_opt = torch.optim.SGD(auto_params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    auto_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def automix_loss():
        return automix(auto_model, ema.module, plain_batch, auto_gen).loss

    benches = [
        Bench('mixup', mixup_loss, mixup_opt, list(mixup_model.parameters()),
              [b for b in mixup_model.buffers()]),
        Bench('automix', automix_loss, auto_opt, auto_params,
              list(ema.module.parameters()) + list(ema.module.buffers()) + list(auto_model.buffers()),
              after=lambda: ema.update(auto_model)),
    ]
    if args.breakdown:
        # the same AutoMix without the online model's clean-image loss L_one (reported, not the judged ratio)
        lean_model = create()
        lean = build_automix(lean_model, args.stage, clean_loss=False)
        lean.mixblock.to(device)
        lean_ema = ModelEmaV3(lean_model, decay=0.999)
        freeze(lean_ema.module)
        lean_params = list(lean_model.parameters()) + list(lean.mixblock.parameters())
        lean_opt = torch.optim.SGD(lean_params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        benches.append(Bench(
            'no-L_one', lambda: lean(lean_model, lean_ema.module, plain_batch, auto_gen).loss, lean_opt,
            lean_params, list(lean_ema.module.parameters()) + list(lean_ema.module.buffers())
            + list(lean_model.buffers()), after=lambda: lean_ema.update(lean_model)))

    info = dict(device=torch.cuda.get_device_name(device) if on_cuda else cpu_name(), torch=torch.__version__,
                timm=timm.__version__, threads=torch.get_num_threads(), model=args.model, model_kwargs=kwargs,
                batch_size=args.batch_size, img_size=args.img_size, stage=automix.tap.index,
                feature_module=automix.tap.info.get('module'))
    print(f'AutoMix vs Mixup training step | {args.model} {kwargs or ""} | B = {args.batch_size} | '
          f'{args.img_size} px | Mix Block on level {automix.tap.index} ({info["feature_module"]})')
    print(f'  device  : {info["device"]} | torch {torch.__version__} | timm {timm.__version__} | '
          f'{info["threads"]} threads')
    if not on_cuda and hasattr(os, 'getloadavg'):
        info['loadavg_start'] = os.getloadavg()
        print(f'  load    : 1/5/15 min load average {" ".join(f"{v:.2f}" for v in os.getloadavg())}')

    for bench in benches:
        for _ in range(args.warmup):
            bench.step()
    sync()
    for _ in range(args.repeats):
        for bench in benches:
            for _ in range(args.iters):
                sync()
                start = time.perf_counter()
                bench.step()
                sync()
                bench.times.append(time.perf_counter() - start)

    results = dict(machine=info, methods={})
    for bench in benches:
        entry = dict(step_ms_median=1e3 * statistics.median(bench.times), step_ms_min=1e3 * min(bench.times),
                     samples=len(bench.times))
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            sync()
            bench.step()
            sync()
            entry['peak_allocated_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        entry['saved_activations_mib'] = bench.saved_bytes() / 2 ** 20
        entry['static_mib'] = bench.static_bytes() / 2 ** 20
        results['methods'][bench.name] = entry
    mixup, auto = results['methods']['mixup'], results['methods']['automix']
    ratios = dict(step_time=auto['step_ms_median'] / mixup['step_ms_median'],
                  saved_activations=auto['saved_activations_mib'] / mixup['saved_activations_mib'],
                  activations_plus_static=(auto['saved_activations_mib'] + auto['static_mib'])
                  / (mixup['saved_activations_mib'] + mixup['static_mib']))
    if on_cuda:
        ratios['peak_allocated'] = auto['peak_allocated_mib'] / mixup['peak_allocated_mib']
    results['ratios'] = ratios

    print(f'\n  {"method":8s} {"step ms (median)":>17s} {"min":>8s} {"saved act. MiB":>15s} {"static MiB":>11s}'
          + (f' {"CUDA peak MiB":>14s}' if on_cuda else ''))
    for name, e in results['methods'].items():
        print(f'  {name:8s} {e["step_ms_median"]:17.1f} {e["step_ms_min"]:8.1f} {e["saved_activations_mib"]:15.2f} '
              f'{e["static_mib"]:11.2f}' + (f' {e["peak_allocated_mib"]:14.1f}' if on_cuda else ''))
    if 'no-L_one' in results['methods']:
        lean_ms = results['methods']['no-L_one']['step_ms_median']
        ratios['step_time_without_clean_loss'] = lean_ms / mixup['step_ms_median']
    print(f'\n  AutoMix / Mixup, same B = {args.batch_size}:')
    print(f'    training step time        {ratios["step_time"]:.2f}x   '
          f'(median of {mixup["samples"]} interleaved steps each)')
    if on_cuda:
        print(f'    peak memory (CUDA)        {ratios["peak_allocated"]:.2f}x   (torch.cuda.max_memory_allocated)')
    print(f'    activation memory         {ratios["saved_activations"]:.2f}x   (tensors saved for backward, '
          f'saved_tensors_hooks)')
    print(f'    activations + static      {ratios["activations_plus_static"]:.2f}x   (+ weights, grads, SGD state, '
          f'momentum encoder, Mix Block)')
    if 'step_time_without_clean_loss' in ratios:
        print(f'    (AutoMix without L_one    {ratios["step_time_without_clean_loss"]:.2f}x   breakdown only)')
    if not on_cuda and hasattr(os, 'getloadavg'):
        info['loadavg_end'] = os.getloadavg()
        print(f'  load average at end: {" ".join(f"{v:.2f}" for v in info["loadavg_end"])}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
