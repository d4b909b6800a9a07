#!/usr/bin/env python3
"""Model FLOPs utilisation (MFU) of one training step: achieved model FLOP/s over the device's peak.

FLOPs: forward + loss + backward, counted once by ``torch.utils.flop_counter.FlopCounterMode`` on the eager
model and the timed step's exact batch (MIMO: ``model(inputs, masks)`` on a ``MimoBatchBuilder`` batch with
``MemberSoftTargetCrossEntropy``; M = 1 / any timm model: ``model(x)``, timm's ``SoftTargetCrossEntropy``). It
counts matmuls and convs only (no norms, activations, optimizer): MFU in the PaLM sense, useful model FLOPs,
no recomputation. Time: median of ``--iters`` steps (forward, loss, backward, SGD step, zero_grad), CUDA-synced
around each (``mixmo_overhead.TrainBench`` / ``timed``). Peak: on CUDA a table of dense datasheet peaks by GPU
name, or ``--peak-tflops``; on CPU (no reliable spec table) the best measured rate of a 2048^3 matmul and a
3x3 conv, fp32 (+ bf16 under bfloat16 autocast), labelled "vs measured matmul/conv peak".

Usage:
    python bench/mfu.py --model wrn16_4_mixmo2                  # CPU: B = 32, fp32
    python bench/mfu.py --model wrn28_10_mixmo2 --channels-last --compile --json output/mfu_h100.json
    python bench/mfu.py --model resnet50 --img-size 224 --peak-tflops 125   # a GPU not in the table
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.loss import SoftTargetCrossEntropy

import timm_mimo  # noqa: F401  (registers the MIMO models with timm)
from timm_mimo.batch import MimoBatchBuilder
from timm_mimo.loss import MemberSoftTargetCrossEntropy
from timm_mimo.mimo import is_mimo
from timm_mimo.train.speed import CompiledWithFallback
from timm_mimo.eval.benchmark import TrainBench, machine_info, make_sync, timed, to_input_layout

# Dense peak TFLOP/s from NVIDIA datasheets (headline figures are often 2:4-sparse, 2x these). Rows: (substrings
# the upper-cased name must contain, must not contain, peaks). H100/H200 NVL and A10G are left out: --peak-tflops.
GPU_PEAKS = [
    (('H100', 'PCIE'), (), {'bf16': 756.0, 'tf32': 378.0, 'fp32': 51.0}),
    (('H100',), ('NVL',), {'bf16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),  # SXM5, "NVIDIA H100 80GB HBM3"
    (('H200',), ('NVL',), {'bf16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),  # SXM, same compute as H100 SXM
    (('A100',), (), {'bf16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),        # SXM4 and PCIe alike
    (('L4',), ('L40',), {'bf16': 121.0, 'tf32': 60.0, 'fp32': 30.3}),
    (('RTX 4090',), (), {'bf16': 165.2, 'tf32': 82.6, 'fp32': 82.6}),     # fp16/bf16 with fp32 accumulate
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='wrn28_10_mixmo2', help='any timm or timm_mimo model')
    p.add_argument('--batch-size', type=int, default=None, help='mixed samples B (default 128 on CUDA, 32 on CPU)')
    p.add_argument('--batch-repeat', type=int, default=None, help='copies per unique image (2 for MIMO, else 1)')
    p.add_argument('--img-size', type=int, default=None, help="default: the model's pretrained_cfg input size")
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--amp-dtype', default=None, choices=('none', 'bfloat16', 'float16'),
                   help='autocast dtype (default bfloat16 on CUDA, none on CPU); float16 adds a GradScaler')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the timed model (eager if compiling fails)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--warmup', type=int, default=None, help='untimed steps (CPU 2, CUDA 10)')
    p.add_argument('--iters', type=int, default=None, help='timed steps (CPU 5, CUDA 30)')
    p.add_argument('--peak-tflops', type=float, default=None, help='peak TFLOP/s (overrides table / measurement)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results to this JSON file')
    p.add_argument('--overwrite', action='store_true', help='allow --json to replace an existing file')
    p.set_defaults(lr=0.01)  # read by TrainBench's SGD
    p.error = lambda msg: fail(msg)  # one line instead of argparse's usage block
    return p.parse_args(argv)


def fail(msg: str):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def measured_cpu_peaks(dtype: torch.dtype, reps: int = 4) -> dict:
    """Best TFLOP/s of a 2048^3 matmul and a compute-bound 3x3 conv in ``dtype`` (1 warmup, best of ``reps``).
    The conv because fp32 matmul runs in MKL, which on AMD CPUs can take a slower path than oneDNN's convs
    (seen: a WRN step at 1.5x the matmul rate); the faster of the two is this CPU's practical ceiling."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    x, w = torch.randn(32, 256, 16, 16, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
    conv_flops = 2 * x.numel() * w[0].numel()  # 2 * B*H*W * C_out * C_in*9, as FlopCounterMode counts it
    matmul_s = min(timed(lambda: a @ b, 1, reps, lambda: None))
    conv_s = min(timed(lambda: F.conv2d(x, w, padding=1), 1, reps, lambda: None))
    return {'matmul': 2 * 2048 ** 3 / matmul_s / 1e12, 'conv3x3': conv_flops / conv_s / 1e12}


def resolve_peak(args, on_cuda: bool, amp_dtype, info, rates=None):
    """(peak TFLOP/s, precision, basis, source, CPU rates): --peak-tflops > datasheet table (CUDA) > measured
    (CPU; each kernel's best with earlier ``rates``, so that one moment of load from other jobs does not set it)."""
    precision = 'bf16' if amp_dtype == torch.bfloat16 else 'fp32'  # CPU: the matmul dtypes measured below
    if on_cuda:  # fp32 convolutions run in TF32 under cuDNN's default allow_tf32 (plain matmuls do not)
        precision = 'bf16' if amp_dtype is not None else ('tf32' if torch.backends.cudnn.allow_tf32 else 'fp32')
    if args.peak_tflops:
        return args.peak_tflops, precision, 'vs --peak-tflops', '--peak-tflops', None
    if on_cuda:
        name = info['gpu'].upper()
        peak = next((peaks[precision] for need, avoid, peaks in GPU_PEAKS
                     if all(s in name for s in need) and not any(s in name for s in avoid)), None)
        if peak is None:
            fail(f'no peak TFLOP/s known for {info["gpu"]!r}: pass --peak-tflops (dense {precision})')
        return peak, precision, 'vs datasheet peak', f'datasheet table, dense {precision}, {info["gpu"]}', None
    new = {f'fp32 {k}': v for k, v in measured_cpu_peaks(torch.float32).items()}
    if precision == 'bf16':  # bf16 kernels can be faster (AVX512-BF16, AMX) or slower than fp32: the best counts
        new.update({f'bf16 {k}': v for k, v in measured_cpu_peaks(torch.bfloat16).items()})
    rates = {k: max(v, (rates or {}).get(k, 0.0)) for k, v in new.items()}
    best = max(rates, key=rates.get)
    measured = ', '.join(f'{k} {v:.3f}' for k, v in rates.items())
    return (rates[best], best.split()[0], 'vs measured matmul/conv peak', f'measured on this CPU, best of 4 reps '
            f'before and after the timed steps: {measured} TFLOP/s; used {best}', rates)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        fail('--device cuda but CUDA is not available')
    on_cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    device = torch.device('cuda' if on_cuda else 'cpu')
    if not timm.is_model(args.model):
        fail(f'unknown model {args.model!r} (not in timm\'s registry after "import timm_mimo")')
    if args.json and os.path.exists(args.json) and not args.overwrite:
        fail(f'{args.json} exists (pass --overwrite to replace it)')
    for name in ('batch_size', 'batch_repeat', 'img_size', 'iters', 'threads', 'peak_tflops'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f'--{name.replace("_", "-")} must be > 0')
    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.amp_dtype = args.amp_dtype or ('bfloat16' if on_cuda else 'none')
    if args.amp_dtype == 'float16' and not on_cuda:
        print('warning: float16 autocast on CPU is usually slower than fp32 (the peak used is fp32)', file=sys.stderr)
    args.batch_size = args.batch_size or (128 if on_cuda else 32)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.iters = args.iters or (30 if on_cuda else 5)

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    mimo = is_mimo(model) and model.num_members > 1
    args.batch_repeat = args.batch_repeat or (2 if mimo else 1)
    if args.batch_size % args.batch_repeat:
        fail(f'--batch-size {args.batch_size} is not divisible by --batch-repeat {args.batch_repeat}')
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = on_cuda
    in_chans, *size = model.pretrained_cfg.get('input_size', (3, 32, 32))
    img_size = (args.img_size,) * 2 if args.img_size else tuple(size)
    amp_dtype = {'none': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype]
    autocast = (contextlib.nullcontext if amp_dtype is None
                else lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # one fixed batch, built outside the timed region, exactly as mixmo_overhead's training benchmark does
    b, u = args.batch_size, args.batch_size // args.batch_repeat
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(u, in_chans, *img_size, generator=gen).to(device)
    labels = torch.randint(0, args.num_classes, (u,), generator=gen).to(device)
    builder = (MimoBatchBuilder.from_model(model, img_size, batch_repeat=args.batch_repeat, seed=args.seed,
                                           mix_mode=getattr(model, 'default_mix_mode', 'cut')) if mimo
               else MimoBatchBuilder(1, args.num_classes, (1, 1), batch_repeat=args.batch_repeat, seed=args.seed))
    batch = builder(images, labels)
    if mimo:
        x, masks, targets, loss_fn = batch.inputs, batch.masks, batch.targets, MemberSoftTargetCrossEntropy()
    else:  # M = 1: member 0 is the repeated, augmented plain batch, its target one-hot (the masks are unused)
        x, masks, targets, loss_fn = batch.inputs[:, 0], None, batch.targets[:, 0], SoftTargetCrossEntropy()
    x = to_input_layout(x, args.channels_last)

    # the peak first: an unknown GPU fails before any work; the CPU kernels run before the model's steps
    info = machine_info(device)
    info['loadavg'] = os.getloadavg() if hasattr(os, 'getloadavg') else ()  # other jobs skew CPU figures
    peak, precision, basis, source, rates = resolve_peak(args, on_cuda, amp_dtype, info)

    # FLOPs on the eager model, outside the timed loop (FlopCounterMode does not see inside compiled graphs)
    model.train()
    with FlopCounterMode(display=False) as fwd_counter, autocast():
        out = model(x) if masks is None else model(x, masks)
        loss = loss_fn(out.float(), targets)
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    flops_fwd, flops_bwd = fwd_counter.get_total_flops(), bwd_counter.get_total_flops()
    flops_step = flops_fwd + flops_bwd
    bench = TrainBench(model, x, masks, targets, loss_fn, args.lr, autocast, scaler)
    bench.prepare()
    if args.compile:  # compiles in the first (untimed) step; eager from then on if compiling fails
        bench.model = CompiledWithFallback(model)
    sync, warmup = make_sync(device), max(args.warmup, 1 if args.compile else 0)
    times = timed(bench.step, warmup, args.iters, sync)
    step_s = statistics.median(times)
    if rates:  # CPU: measure the peak again after the steps, keep each kernel's best
        peak, precision, basis, source, rates = resolve_peak(args, on_cuda, amp_dtype, info, rates)
    achieved = flops_step / step_s / 1e12  # TFLOP/s
    mfu = achieved / peak
    settings = dict(vars(args), img_size=list(img_size), device=str(device), mimo=mimo,
                    compiled=args.compile and bench.model.compiled is not None,
                    num_members=getattr(model, 'num_members', 1))
    results = {
        'machine': info, 'settings': settings,
        'flops_forward': flops_fwd, 'flops_backward': flops_bwd, 'flops_per_step': flops_step,
        'flops_per_image': flops_step / b, 'flop_counter': 'FlopCounterMode: matmul/conv only, no recomputation',
        'step_time_ms': step_s * 1e3, 'step_times_ms': [t * 1e3 for t in times], 'images_per_s': b / step_s,
        'achieved_tflops': achieved, 'peak_tflops': peak, 'peak_precision': precision, 'peak_source': source,
        'mfu_percent': mfu * 100, 'mfu_basis': basis,
    }
    print('MFU benchmark (model FLOPs utilisation of one training step)')
    print(f'  machine    : {info.get("gpu", info["cpu"])}, {info["cpu_count"]} CPUs, torch threads '
          f'{info["torch_threads"]}, load average {" ".join(f"{v:.2f}" for v in info["loadavg"])}')
    print(f'  versions   : torch {info["torch"]}, timm {info["timm"]}, timm_mimo {info["timm_mimo"]}')
    print(f'  settings   : {args.model} (M={settings["num_members"]}), B={b} (U={u} x repeat {args.batch_repeat}), '
          f'{img_size[0]}x{img_size[1]} px, {args.num_classes} classes, amp {args.amp_dtype}, '
          f'channels_last {args.channels_last}, compiled {settings["compiled"]}, device {device}')
    print(f'  model FLOPs: {flops_step / 1e9:.2f} GFLOP/step (fwd {flops_fwd / 1e9:.2f} + bwd {flops_bwd / 1e9:.2f}),'
          f' {flops_step / b / 1e9:.3f} GFLOP/image  [FlopCounterMode: matmul/conv only, no recomputation]')
    print(f'  step time  : {step_s * 1e3:.1f} ms median of {args.iters} (min {min(times) * 1e3:.1f}, '
          f'max {max(times) * 1e3:.1f}), {b / step_s:.1f} images/s')
    print(f'  achieved   : {achieved:.3f} TFLOP/s')
    print(f'  peak       : {peak:.3f} TFLOP/s ({source})')
    print(f'  MFU        : {mfu * 100:.1f} % ({basis})')
    if mfu > 1:
        print('warning: MFU > 100 %: the peak was measured while other jobs loaded the CPU; rerun, or --threads 1',
              file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
