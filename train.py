#!/usr/bin/env python3
"""Train MixMo / MIMO models (and any timm model, as M = 1) with Hugging Face Accelerate.

    python train.py                                   # embedded digits data, wrn16_2_mixmo2, ~2 min on CPU
    accelerate launch train.py --model wrn28_10_mixmo2 --dataset torch/cifar100 --dataset-download ...
    python train.py -c configs/cifar100/wrn28_10_cut_mixmo.yaml

Batch sizes (see README "Batch sizes and processes"): ``-b`` is the GLOBAL number of mixed samples per
optimizer step, B. Each process draws U = B / (processes x grad_accum_steps x batch_repeat) unique images
per micro-step and builds its own U x batch_repeat mixed samples on its device, so B, the unique images
per step (B / batch_repeat) and the learning rate stay the same whatever the number of processes.

The MIMO batch (masks, MSDA, soft targets) is built on the device from a generator seeded by
(seed, process, epoch, step): a resumed run replays exactly the batches of an uninterrupted one.
"""
import argparse
import csv
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from timm_mimo.batch import random_crop_flip, random_erase
from timm_mimo.engine import STATE_FILE, checkpoint_name, complete_checkpoints, parse_model_kwargs, \
    replace_dir, save_weights_and_config, write_csv_atomic

_logger = logging.getLogger('train')

LOWER_IS_BETTER = ('nll', 'ece', 'brier', 'loss')
LOG_INTERVAL = 10  # optimizer steps between host syncs (loss check, progress bar, SIGTERM agreement)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML file of argument defaults (keys = long flag names)')
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='dataset root, image folder, tar or CIFAR-10 zip')
    g.add_argument('--dataset', default='', help="'' = embedded digits; cifar10-zip, torch/cifar10, ...")
    g.add_argument('--dataset-download', action='store_true', help='download torch/* datasets')
    g.add_argument('--val-per-class', type=int, default=None, help='validation images per class carved from train')
    g.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s)')
    g.add_argument('-j', '--workers', type=int, default=0, help='data loader worker processes')
    g.add_argument('--device-data', default='auto', choices=['auto', 'on', 'off'],
                   help="keep the decoded splits on the device and batch them there (small-image sets: the CIFAR "
                        "zip, torch/cifar10/100, digits); 'auto': whenever the data allows it (no per-image --aa); "
                        "'off': a DataLoader with timm's per-image transforms")
    g.add_argument('--data-cache-dir', default=None,
                   help='where decoded uint8 splits are cached (default $TIMM_MIMO_CACHE_DIR or ~/.cache/timm_mimo)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='wrn16_2_mixmo2', help='any registered timm model')
    g.add_argument('--num-classes', type=int, default=None, help='default: from the dataset')
    g.add_argument('--num-members', type=int, default=None, help='M (MIMO models only); default the model\'s')
    g.add_argument('--ensemble', default=None, choices=['logits', 'probs'], help='ensembling rule (MIMO)')
    g.add_argument('--drop', type=float, default=None, help='dropout before the heads')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate (timm models that have it)')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='extra create_model kwargs')
    g.add_argument('--pretrained', action='store_true', help='start from the registered pretrained weights')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (safetensors / .pth)')
    g = p.add_argument_group('batch and MIMO mixing')
    g.add_argument('-b', '--batch-size', type=int, default=64, help='global mixed samples per optimizer step')
    g.add_argument('--batch-repeat', type=int, default=1, help='copies of each unique image per batch (b)')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--mix-mode', default=None, choices=['mimo', 'linear', 'cut', 'box', 'token', 'automix'],
                   help="MIMO masks; default the model's ('cut' for MixMo CNNs, binary 'box' for MixViT); "
                        "'automix' (M = 2, experimental): Cut-MixMo with a learned Mix Block mask in place of "
                        "the box (--mix-prob of the batches)")
    g.add_argument('--mix-prob', type=float, default=0.5,
                   help='probability of patch mixing (cut mode) or of the learned mask (automix mode)')
    g.add_argument('--mix-alpha', type=float, default=2.0, help='Dirichlet concentration of the ratios')
    g.add_argument('--weight-root', type=float, default=3.0, help='root r of the member loss weights')
    g.add_argument('--msda', default='none', choices=['none', 'cutmix', 'mixup', 'automix'],
                   help="per-member pixel MSDA; 'automix' (M = 1): AutoMix's learned Mix Block")
    g.add_argument('--msda-prob', type=float, default=0.5)
    g.add_argument('--msda-alpha', type=float, default=1.0)
    g.add_argument('--mixup', type=float, default=0.0, help='timm alias: --msda mixup --msda-alpha A')
    g.add_argument('--cutmix', type=float, default=0.0, help='timm alias: --msda cutmix --msda-alpha A')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--aug', default=None, choices=['crop-flip', 'crop', 'reflect-crop-flip', 'none'],
                   help="batched pad-4 crop + flip per member view (CIFAR / Tiny ImageNet recipe), crop only, the "
                        "same with reflect padding (AutoMix's recipe), or none; default: the data set's (crop "
                        "only where a flip changes the label, e.g. digits)")
    g.add_argument('--aa', default=None, help="timm auto-augment policy per image, e.g. 'rand-m9-mstd0.5-inc1'")
    g.add_argument('--reprob', type=float, default=0.0,
                   help="random erasing probability per batch copy (timm's semantics, batched on the device)")
    g.add_argument('--remode', default='pixel', choices=['pixel', 'rand', 'const'], help='random erasing fill')
    g = p.add_argument_group('AutoMix (--msda automix for M = 1, --mix-mode automix for M = 2; docs/automix.md)')
    g.add_argument('--automix-stage', type=int, default=-2,
                   help="feature level (model.feature_info index; negative from the end) read by the Mix Block")
    g.add_argument('--automix-alpha', type=float, default=2.0, help='lambda ~ Beta(alpha, alpha), two per batch')
    g.add_argument('--automix-mask-loss', type=float, default=0.1, help='weight of the L1 mask loss')
    g.add_argument('--automix-margin', type=float, default=0.1, help='margin of the mask loss')
    g.add_argument('--automix-lam-margin', type=float, default=0.08,
                   help='backbone branch falls back to Mixup when lambda is this close to 0 or 1')
    g.add_argument('--automix-momentum', type=float, default=0.999, help='momentum encoder: initial EMA momentum')
    g.add_argument('--automix-momentum-end', type=float, default=0.999999, help='final EMA momentum (cosine)')
    g.add_argument('--automix-momentum-start', type=float, default=0.1,
                   help='fraction of training before the cosine momentum schedule starts')
    g.add_argument('--automix-lam-concat', action='store_true', help='feed lambda to the Mix Block (ImageNet / ViT)')
    g.add_argument('--mixblock-lr', type=float, default=None, help='Mix Block learning rate (default: --lr)')
    g.add_argument('--mix-vis-interval', type=int, default=0,
                   help='write a PNG grid of mixed samples every N epochs (0 = off)')
    g = p.add_argument_group('optimizer and schedule (timm factories)')
    g.add_argument('--opt', default='sgd', help="timm optimizer name ('sgd' is Nesterov SGD)")
    g.add_argument('--lr', type=float, default=0.05)
    g.add_argument('--weight-decay', type=float, default=5e-4)
    g.add_argument('--wd-all', action='store_true',
                   help='decay every parameter incl. BN and biases (MixMo\'s L2 on all parameters)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--sched', default='cosine', help='timm scheduler: cosine, multistep, step, ...')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('--warmup-epochs', type=float, default=1, help='linear warmup, per optimizer step')
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                   help='multistep: epochs (0-based) at which the lr is multiplied by --decay-rate')
    g.add_argument('--decay-rate', type=float, default=0.1)
    g = p.add_argument_group('speed and precision')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision through Accelerate (--no-amp overrides a config)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                   help='channels-last memory format (--no-channels-last overrides a config)')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help="torch.compile the model (backend default inductor; 'none' = off, overriding a config); "
                        "falls back to eager if compiling fails")
    g.add_argument('--torchcompile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune'")
    g.add_argument('--fused-opt', action=argparse.BooleanOptionalAction, default=None,
                   help="PyTorch's fused optimizer step (SGD, Adam, AdamW); default: on for CUDA where available")
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--limit-train-batches', type=int, default=None, help='at most this many steps per epoch')
    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights, evaluated each epoch')
    g.add_argument('--model-ema-decay', type=float, default=0.999)
    g = p.add_argument_group('output')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--output', default='output/train', help='parent folder of the experiment folders')
    g.add_argument('--experiment', default='', help='experiment folder name (default: date-model)')
    g.add_argument('--resume', default='', help='experiment folder (or checkpoint) to continue from')
    g.add_argument('--checkpoint-hist', type=int, default=1, help='complete checkpoints to keep')
    g.add_argument('--eval-metric', default='top1', help='validation metric that selects the best epoch')
    g.add_argument('--log-tensorboard', action='store_true')
    g.add_argument('--debug', action='store_true', help='show tracebacks instead of one-line errors')
    return p


def batch_augment(aug: str, erase_prob: float, erase_mode: str):
    """The batched augmentation of every member view: pad-4 crop (+ flip for 'crop-flip'), then random
    erasing, all drawn from the step's generator (so a resumed run replays them)."""
    if not 0.0 <= erase_prob <= 1.0:
        raise ValueError(f'--reprob must be in [0, 1], got {erase_prob}')
    crop = None if aug == 'none' else functools.partial(
        random_crop_flip, flip=aug.endswith('flip'),
        padding_mode='reflect' if aug.startswith('reflect') else 'constant')
    if erase_prob == 0:
        return crop

    def augment(images, generator=None):
        if crop is not None:
            images = crop(images, generator=generator)
        return random_erase(images, erase_prob, erase_mode, generator=generator)
    return augment


def parse_args(argv=None):
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        path = Path(pre.config)
        if not path.exists():
            raise FileNotFoundError(f'config file not found: {path}')
        config = yaml.safe_load(path.read_text()) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f'unknown config key(s) in {path}: {", ".join(unknown)}')
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    if isinstance(args.torchcompile, bool):  # a config's `torchcompile: true` (the flag's older yes/no form)
        args.torchcompile = 'inductor' if args.torchcompile else None
    if args.torchcompile in ('none', 'off'):
        args.torchcompile = None
    if args.mixup > 0:
        args.msda, args.msda_alpha = 'mixup', args.mixup
    if args.cutmix > 0:
        args.msda, args.msda_alpha = 'cutmix', args.cutmix
    return args


# ------------------------------------------------------------------------------------------------------
# checkpoints: complete folders only (written under a temporary name, then renamed)

def resolve_resume(resume: str):
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f'--resume path not found: {path}')
    if (path / STATE_FILE).exists():
        return path.parent, path
    checkpoints = complete_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(f'no complete checkpoint in {path} to resume from')
    return path, checkpoints[-1]


def save_checkpoint(accelerator, model, output: Path, model_args: dict, data_config: dict, state: dict,
                    keep: int):
    """Weights (timm Hub format) + Accelerate training state + trainer state, as one atomic folder.

    Every process calls this: the training state and, under FSDP, the whole weights are collectives.
    """
    final = output / checkpoint_name(state['epoch'], state['step'])
    tmp = output / f'.{final.name}.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / 'state'))
    weights = accelerator.get_state_dict(model)  # unsharded on the main process (FSDP: FULL_STATE_DICT)
    if accelerator.is_main_process:
        save_weights_and_config(accelerator.unwrap_model(model), tmp, model_args, data_config, weights)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        replace_dir(tmp, final)
        for old in complete_checkpoints(output)[:-max(keep, 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_summary(path: Path):
    if not path.exists():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def is_better(metric: str, value: float, best) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def build_automix_for(args, model, num_members: int, mix_mode: str, img_size, device=None):
    """AutoMix for --msda automix (M = 1) or --mix-mode automix (M = 2): checks, Mix Block, feature level."""
    from timm_mimo.automix import build_automix, check_features
    from timm_mimo.mixing import BINARY_MIX_MODES
    if args.msda == 'automix' and mix_mode == 'automix':
        raise ValueError('use --msda automix (M = 1) or --mix-mode automix (M = 2), not both')
    if args.msda == 'automix' and num_members != 1:
        raise ValueError(f'--msda automix is AutoMix for single networks (M = 1) but {args.model} has '
                         f'M = {num_members}: use --mix-mode automix for M = 2')
    if mix_mode == 'automix':
        if num_members != 2:
            raise ValueError(f'--mix-mode automix learns MixMo masks for M = 2 but {args.model} has M = {num_members}')
        if getattr(model, 'default_mix_mode', 'cut') in BINARY_MIX_MODES:
            raise ValueError(f'--mix-mode automix draws soft masks; {args.model} mixes tokens with binary masks')
    if args.model_ema:
        raise ValueError('AutoMix keeps its own momentum encoder, evaluated and saved as the EMA model: '
                         'drop --model-ema')
    if args.mixblock_lr is not None and args.mixblock_lr < 0:
        raise ValueError(f'--mixblock-lr must be >= 0, got {args.mixblock_lr}')
    if not 0 <= args.automix_momentum <= 1 or not 0 <= args.automix_momentum_end <= 1:
        raise ValueError('--automix-momentum and --automix-momentum-end must be in [0, 1]')
    automix = build_automix(
        model, args.automix_stage, num_members=num_members, lam_concat=args.automix_lam_concat,
        alpha=args.automix_alpha, mask_loss_weight=args.automix_mask_loss, margin=args.automix_margin,
        lam_margin=args.automix_lam_margin, weight_root=args.weight_root,
        mix_prob=args.mix_prob if num_members == 2 else 1.0)
    check_features(automix, model, img_size, getattr(model, 'in_chans', 3), device)
    return automix


def device_data_loaders(args, splits, unique_per_process: int, eval_batch: int, accelerator):
    """(train, validation, test) loaders over device-resident splits (``--device-data``), or three Nones.

    The training split is sharded by process (like Accelerate's sampler: the P shards of a step are the
    1-process step's images) and shuffled by (seed, epoch); evaluation splits are whole on every process.
    """
    from timm_mimo.data.device_loader import default_cache_dir, device_loader_for
    if args.device_data == 'off':
        return None, None, None
    loaders, why_not = [], '--aa transforms each image with PIL in the loader' if args.aa else ''
    if not why_not:
        cache = args.data_cache_dir or default_cache_dir()
        common = (accelerator.device, splits.mean, splits.std, splits.img_size, cache)
        with accelerator.main_process_first():  # one process decodes and caches, the others read the cache
            train, why_not = device_loader_for(splits.train, unique_per_process, *common, seed=args.seed,
                                               num_replicas=accelerator.num_processes, rank=accelerator.process_index)
            loaders.append(train)
            for split in (splits.validation, splits.test):
                if why_not or split is None:
                    loaders.append(None)
                    continue
                loader, why_not = device_loader_for(split, eval_batch, *common, shuffle=False)
                loaders.append(loader)
    if why_not:
        if args.device_data == 'on':
            raise ValueError(f'--device-data on: {splits.description} cannot be kept on the device: {why_not}')
        _logger.info(f'data: per-image DataLoader ({why_not})')
        return None, None, None
    train = loaders[0]
    _logger.info(f'data: decoded splits on {accelerator.device} ({train.images.numel() / 2 ** 20:.0f} MiB of '
                 f'training pixels, {train.images.dtype}), batched there')
    return tuple(loaders)


def write_mix_picture(path: Path, args, batch, images, vis_samples, splits, epoch: int, mix_mode: str):
    """PNG grid of mixed samples (--mix-vis-interval): AutoMix's backbone branch, MixMo masks, or MSDA."""
    from timm_mimo.visualize import mimo_samples, msda_samples, save_mix_grid
    if vis_samples is not None:
        what = 'AutoMix (learned mask, backbone branch)' if batch.inputs.shape[1] == 1 else \
            'AutoMix-MixMo (learned mask on the mixing grid; mixed = pixel illustration)'
        samples = vis_samples
    elif batch.inputs.shape[1] >= 2:
        what, samples = f'MixMo {mix_mode} masks (members 0 and 1; mixed = pixel illustration)', \
            mimo_samples(batch.inputs, batch.masks)
    elif args.msda in ('mixup', 'cutmix'):
        # fresh draws of the same MSDA on this step's images (the builder keeps its partners to itself)
        gen = torch.Generator(device=images.device)
        gen.manual_seed(hash((args.seed, 7919, epoch)) % (2 ** 63))  # ints only: the same in every process
        what, samples = f'{args.msda} (alpha {args.msda_alpha}, drawn for the picture)', \
            msda_samples(images.float(), args.msda, args.msda_alpha, gen)
    else:
        _logger.info('--mix-vis-interval: nothing is mixed in this run (M = 1, no MSDA): no picture')
        return None
    save_mix_grid(path, samples, splits.mean, splits.std, title=f'epoch {epoch}: {what}')
    return path


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops, keeping the last good checkpoint."""


# ------------------------------------------------------------------------------------------------------

def main(argv=None):
    wall_start = time.time()  # time-to-accuracy counts from here: data decoding and compilation included
    # SIGTERM from the start: the flag is read every LOG_INTERVAL steps, which then save a checkpoint and exit
    stop = {'signal': False}

    def on_sigterm(signum, frame):
        stop['signal'] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    # Accelerate and timm log every saved / loaded file at INFO: keep the console to the epoch lines
    for noisy in ('accelerate', 'timm'):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import timm
    import timm.scheduler
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    import timm_mimo  # noqa: F401  (registers the models)
    from timm_mimo.hub import create_model as hub_create_model
    from timm_mimo.batch import MemberSoftTargetCrossEntropy, MimoBatchBuilder
    from timm_mimo.data.splits import auto_augment_transform, build_splits
    from timm_mimo.engine import collect_predictions, is_mimo, load_model_folder, load_weights, save_model_folder, \
        training_member_logits
    from timm_mimo.metrics import classification_metrics
    from timm_mimo.speed import CompiledWithFallback, create_optimizer

    if not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}: not in timm\'s registry (timm_mimo models need '
                         f'"import timm_mimo", which train.py does)')

    # output folder: a new experiment, or the one being resumed; never overwrite another run
    resume_from = None
    if args.resume:
        output, resume_from = resolve_resume(args.resume)
        saved_args = yaml.safe_load((output / 'args.yaml').read_text()) if (output / 'args.yaml').exists() else {}
        for key in ('model', 'num_members', 'num_classes'):
            if saved_args.get(key) is not None and saved_args.get(key) != getattr(args, key):
                raise ValueError(f'cannot resume {output}: it was trained with --{key.replace("_", "-")} '
                                 f'{saved_args[key]}, not {getattr(args, key)}')
    else:
        name = args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}'
        output = Path(args.output) / name
        if output.exists() and any(output.iterdir()):
            raise FileExistsError(f'output folder {output} exists and is not empty: use --resume {output} '
                                  f'or another --experiment')

    mixed_precision = ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else 'no'
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with='tensorboard' if args.log_tensorboard else None,
        project_dir=str(output),
    )
    launched = int(os.environ.get('WORLD_SIZE', '1'))
    if launched > accelerator.num_processes:
        # e.g. `accelerate launch` of several processes on a machine without GPUs: each would run alone
        # and write into the same output folder
        raise ValueError(f'{launched} processes were launched but Accelerate sees {accelerator.num_processes}: '
                         f'without GPUs, set ACCELERATE_USE_CPU=true for distributed CPU training')
    main_process = accelerator.is_main_process
    from accelerate.utils import DistributedType
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and (args.model_ema or 'automix' in (args.msda, args.mix_mode)):
        raise ValueError('--model-ema and AutoMix keep a whole copy of the model next to the sharded one: '
                         'not supported with FSDP (use DDP)')
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)

    # batch sizes: B global mixed samples per optimizer step -> U unique images per process micro-step
    world, accum, repeat = accelerator.num_processes, args.grad_accum_steps, args.batch_repeat
    if args.batch_size % (world * accum * repeat):
        raise ValueError(f'batch size {args.batch_size} is not divisible by processes ({world}) x grad accum '
                         f'steps ({accum}) x batch repetition ({repeat})')
    unique_per_process = args.batch_size // (world * accum * repeat)

    # model
    model_args = parse_model_kwargs(args.model_kwargs)
    for key, value in (('num_members', args.num_members), ('ensemble', args.ensemble),
                       ('drop_rate', args.drop), ('drop_path_rate', args.drop_path)):
        if value is not None:
            model_args[key] = value
    cfg_probe = timm.models.get_pretrained_cfg(args.model)
    default_size = cfg_probe.input_size[-1] if cfg_probe is not None else 32
    splits = build_splits(args.dataset, args.data_dir, args.dataset_download, args.img_size or default_size,
                          mean=cfg_probe.mean if cfg_probe is not None and args.dataset else None,
                          std=cfg_probe.std if cfg_probe is not None and args.dataset else None,
                          val_per_class=args.val_per_class,
                          train_transform=auto_augment_transform(args.aa) if args.aa else None)
    num_classes = args.num_classes or splits.num_classes
    args.aug = args.aug or splits.default_aug  # no flip where it changes the label (digits); recorded in args.yaml
    if num_classes != splits.num_classes:
        raise ValueError(f'--num-classes {num_classes} does not match the dataset\'s {splits.num_classes} classes')
    # timm.create_model, with a one-line error naming the repository when pretrained weights are missing
    model = hub_create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **model_args)
    if args.initial_checkpoint:
        load_weights(model, Path(args.initial_checkpoint))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    num_members = getattr(model, 'num_members', 1)
    mimo = is_mimo(model)
    img = splits.img_size
    # the preprocessing these weights are trained with, recorded in every config.json
    data_config = dict(input_size=(3, img, img), mean=tuple(splits.mean), std=tuple(splits.std), crop_pct=1.0,
                       interpolation='bilinear')
    grid = model.mix_grid_size((img, img)) if mimo else (img, img)

    mix_mode = args.mix_mode or getattr(model, 'default_mix_mode', 'cut')
    # AutoMix mixes the batch itself: the builder then draws no MixMo masks (M = 2: 'mimo', member weights 1)
    # and no MSDA (M = 1); it still repeats, augments, pairs members and makes the soft targets
    automix = build_automix_for(args, model, num_members, mix_mode, (img, img)) \
        if 'automix' in (args.msda, mix_mode) else None
    if args.mix_vis_interval < 0:
        raise ValueError(f'--mix-vis-interval must be >= 0, got {args.mix_vis_interval}')
    builder = MimoBatchBuilder(
        num_members, num_classes, grid, batch_repeat=repeat, mix_mode='mimo' if mix_mode == 'automix' else mix_mode,
        mix_prob=args.mix_prob, mix_alpha=args.mix_alpha, weight_root=args.weight_root,
        msda=None if args.msda in ('none', 'automix') else args.msda, msda_prob=args.msda_prob,
        msda_alpha=args.msda_alpha,
        label_smoothing=args.smoothing,
        augment=batch_augment(args.aug, args.reprob, args.remode))
    criterion = MemberSoftTargetCrossEntropy()

    eval_batch = max(unique_per_process * repeat, 64)
    train_loader, val_loader, test_loader = device_data_loaders(args, splits, unique_per_process, eval_batch,
                                                                accelerator)
    on_device = train_loader is not None
    if not on_device:
        train_loader = DataLoader(splits.train, batch_size=unique_per_process, shuffle=True, drop_last=True,
                                  num_workers=args.workers, pin_memory=accelerator.device.type == 'cuda')
        val_loader = DataLoader(splits.validation, batch_size=eval_batch, num_workers=args.workers)
        test_loader = DataLoader(splits.test, batch_size=eval_batch, num_workers=args.workers) \
            if splits.test is not None else None
    # device-resident evaluation: every process scores the whole split, so there is nothing to gather
    gather = None if on_device else accelerator
    steps_per_epoch = len(train_loader) // accum if on_device else len(train_loader) // world // accum
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    if steps_per_epoch < 1:
        raise ValueError(f'the training split ({len(splits.train)} images) is smaller than one batch of '
                         f'{unique_per_process * world * accum} unique images')

    optimizer, fused = create_optimizer(
        model, args.opt, args.fused_opt, accelerator.device, lr=args.lr, weight_decay=args.weight_decay,
        momentum=args.momentum, filter_bias_and_bn=not args.wd_all)
    mixblock = None
    if automix is not None:
        # the Mix Block: its own parameter group(s) and learning rate, following the same lr schedule
        from timm_mimo.automix import mixblock_param_groups
        mixblock = automix.mixblock.to(accelerator.device)
        for group in mixblock_param_groups(mixblock, args.mixblock_lr if args.mixblock_lr is not None else args.lr,
                                           args.weight_decay, decay_all=args.wd_all):
            optimizer.add_param_group(group)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)

    if on_device:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
        if test_loader is not None:
            test_loader = accelerator.prepare(test_loader)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(unwrapped, decay=args.model_ema_decay, device=accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if automix is not None:
        # the momentum encoder: an EMA of the online model (cosine momentum schedule), frozen; it runs AutoMix's
        # passes in train mode, so its BatchNorm statistics mostly follow its own activations (timm_mimo.automix)
        from timm.utils import ModelEmaV3
        from timm_mimo.automix import freeze, momentum_at
        ema = ModelEmaV3(unwrapped, decay=args.automix_momentum, device=accelerator.device)
        freeze(ema.module)
        accelerator.register_for_checkpointing(ema)
        # prepared on its own (DDP when there are several processes): saved with the training state
        automix.mixblock = accelerator.prepare(mixblock)
        total_updates = args.epochs * steps_per_epoch
        _logger.info(f'AutoMix (M = {num_members}): Mix Block on feature level {automix.tap.index} '
                     f'({automix.tap.info.get("module", "?")}, {mixblock.in_chans} ch), '
                     f'{sum(p.numel() for p in mixblock.parameters())} params, lr '
                     f'{args.mixblock_lr if args.mixblock_lr is not None else args.lr}; momentum encoder '
                     f'{args.automix_momentum} -> {args.automix_momentum_end} (cosine from '
                     f'{args.automix_momentum_start:.0%} of training)')
    train_model = model
    if args.torchcompile:
        train_model = CompiledWithFallback(model, backend=args.torchcompile, mode=args.torchcompile_mode)

    # state: fresh or resumed
    # elapsed_s: wall time of the run so far (training, evaluation, checkpoints), over resumes too
    state = dict(epoch=0, step=0, num_updates=0, best_metric=None, best_epoch=None, elapsed_s=0.0)
    rows = []
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from / 'state'))
        except (RuntimeError, KeyError, OSError) as e:
            raise ValueError(f'cannot resume from {resume_from}: the training state does not match this model '
                             f'or is damaged ({str(e).strip().splitlines()[0]})') from e
        saved = json.loads((resume_from / STATE_FILE).read_text())
        state.update(saved)
        rows = [r for r in read_summary(output / 'summary.csv') if int(r['epoch']) < state['epoch']]
        _logger.info(f'resumed from {resume_from} (epoch {state["epoch"]}, step {state["step"]})')
    elif main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=False))
    accelerator.wait_for_everyone()
    if args.log_tensorboard:
        accelerator.init_trackers('tensorboard')

    _logger.info(f'model {args.model}: M={num_members}, {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M '
                 f'params | data {splits.description}')
    _logger.info(f'global batch {args.batch_size} mixed samples = {args.batch_size // repeat} unique x '
                 f'{repeat} repeats | {world} process(es) x {unique_per_process} unique images x {accum} '
                 f'accumulation steps | {steps_per_epoch} steps/epoch | output {output}')
    speed = dict(distributed=accelerator.distributed_type.value.lower(), mixed_precision=mixed_precision,
                 channels_last=args.channels_last, torchcompile=args.torchcompile, fused_optimizer=fused,
                 device_data=on_device)
    _logger.info(f'speed: device {accelerator.device}, ' + ', '.join(f'{k} {v}' for k, v in speed.items()))

    metric_key = args.eval_metric
    start_epoch = state['epoch']
    elapsed_before = state['elapsed_s']

    def elapsed():
        return elapsed_before + time.time() - wall_start

    for epoch in range(start_epoch, args.epochs):
        builder.set_epoch(epoch, args.epochs)
        if automix is not None:
            automix.progress = builder.progress  # M = 2: learned vs linear masks, decaying like Cut-MixMo's
        train_loader.set_epoch(epoch)
        skip = state['step'] if epoch == start_epoch else 0
        if on_device:
            loader = train_loader.batches(start_batch=skip * accum)
        else:
            loader = accelerator.skip_first_batches(train_loader, skip * accum) if skip else train_loader
        model.train()
        epoch_start, seen, loss_count = time.time(), 0, 0
        loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device: no sync per step
        # a bar only on a terminal: in CI logs and files the per-epoch lines say it all
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True,
                   disable=not (main_process and sys.stderr.isatty()))
        step = skip
        micro = 0
        automix_sums = {}  # AutoMix loss parts, summed on the device like loss_sum
        # a picture of this epoch's mixed samples, from its first step run here (--mix-vis-interval)
        want_vis = main_process and args.mix_vis_interval > 0 and epoch % args.mix_vis_interval == 0

        def check_loss():
            """Host sync, done every LOG_INTERVAL steps and before anything is saved: a non-finite loss stops
            the run before a checkpoint could take the damaged weights."""
            if not torch.isfinite(loss_sum):
                raise NonFiniteLoss(
                    f'loss is {loss_sum.item()} in epoch {epoch} before step {step}: stopping. Last good '
                    f'checkpoint: {(complete_checkpoints(output) or ["none"])[-1]}')
            return loss_sum.item() / max(loss_count, 1)

        for images, labels in loader:
            if step >= steps_per_epoch:
                break
            # draws depend only on (seed, process, epoch, step, micro-step): exact replay after a resume
            gen = torch.Generator(device=images.device)
            gen.manual_seed(hash((args.seed, accelerator.process_index, epoch, step, micro)) % (2 ** 63))
            batch = builder(images, labels, generator=gen)
            vis_samples = None
            with accelerator.accumulate(model, *([automix.mixblock] if automix is not None else [])):
                if automix is not None:
                    # one iteration of AutoMix: both branches, one loss, one backward, one optimizer step
                    with accelerator.autocast():
                        out = automix(train_model, ema.module, batch, gen, mimo=mimo, vis=want_vis)
                    loss, vis_samples = out.loss, out.vis
                    for key, value in out.parts.items():
                        automix_sums[key] = automix_sums.get(key, 0) + value
                else:
                    logits = training_member_logits(train_model, batch.inputs, batch.masks, mimo)
                    loss = criterion(logits.float(), batch.targets)
                accelerator.backward(loss)
                if args.clip_grad is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        list(model.parameters()) + (list(automix.mixblock.parameters()) if automix else []),
                        args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if want_vis:
                want_vis = False
                write_mix_picture(output / 'mixed_samples' / f'epoch_{epoch:04d}.png', args, batch, images,
                                  vis_samples, splits, epoch, mix_mode)
            seen += batch.inputs.shape[0] * world
            loss_sum += loss.detach()
            loss_count += 1
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            step += 1
            state['num_updates'] += 1
            scheduler.step_update(state['num_updates'])
            if automix is not None:
                # momentum for the update after iteration t = num_updates - 1 (spec §6), then the EMA update
                ema.decay = momentum_at(state['num_updates'] - 1, total_updates, args.automix_momentum,
                                        args.automix_momentum_end, args.automix_momentum_start)
                ema.update(unwrapped)
            elif ema is not None:
                ema.update(unwrapped, step=state['num_updates'])
            bar.update()
            if step % LOG_INTERVAL and step < steps_per_epoch:
                continue
            mean_loss = check_loss()
            bar.set_postfix(loss=f'{mean_loss:.3f}', img_s=f'{seen / max(time.time() - epoch_start, 1e-9):.0f}')
            # every process must stop at the same step: agree on the flag (a collective) only when there are several
            stopping = stop['signal']
            if world > 1:
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device),
                                                   'max').item())
            if stopping and step < steps_per_epoch:
                state.update(epoch=epoch, step=step, elapsed_s=elapsed())
                path = save_checkpoint(accelerator, model, output, model_args, data_config, state,
                                       args.checkpoint_hist + 1)
                _logger.info(f'SIGTERM: saved {path}; continue with --resume {output}')
                return 0
        bar.close()
        epoch_time = time.time() - epoch_start
        scheduler.step(epoch + 1)

        # validation and the epoch's summary row
        ens, members, labels = collect_predictions(model, val_loader, gather, unwrapped)
        metrics = classification_metrics(ens, labels, members)
        row = dict(epoch=epoch, lr=optimizer.param_groups[0]['lr'], train_loss=check_loss(),
                   eval_loss=metrics['nll'], eval_top1=metrics['top1'], eval_top5=metrics['top5'],
                   eval_nll=metrics['nll'], eval_ece=metrics['ece'])
        for k, acc in enumerate(metrics['member_top1']):
            row[f'eval_member{k}_top1'] = acc
        if ema is not None:
            ema_ens, ema_members, _ = collect_predictions(ema.module, val_loader, gather)
            ema_metrics = classification_metrics(ema_ens, labels, ema_members)
            row.update(ema_top1=ema_metrics['top1'], ema_nll=ema_metrics['nll'], ema_ece=ema_metrics['ece'])
        if automix is not None:
            # both models are reported; the momentum encoder (EMA) is the deployed one (spec §8)
            row.update(ema_top5=ema_metrics['top5'], ema_loss=ema_metrics['nll'], automix_momentum=ema.decay)
            for k, acc in enumerate(ema_metrics['member_top1']):
                row[f'ema_member{k}_top1'] = acc
            for key, total in automix_sums.items():
                row[f'train_{key}' if key == 'mask_mean' else f'train_loss_{key}'] = \
                    float(total) / max(loss_count, 1)
        row.update(train_img_s=seen / max(epoch_time, 1e-9), epoch_time=epoch_time,
                   elapsed=elapsed())
        rows.append(row)
        value = metrics[metric_key] if automix is None else ema_metrics[metric_key]
        _logger.info(f'epoch {epoch}: loss {row["train_loss"]:.4f} | val top1 {metrics["top1"]:.2f} '
                     f'nll {metrics["nll"]:.4f} ece {metrics["ece"]:.4f} | members '
                     f'{" ".join(f"{a:.2f}" for a in metrics["member_top1"])} | {row["train_img_s"]:.0f} img/s '
                     f'{epoch_time:.1f}s' + ('' if automix is None else
                                             f' | EMA (deployed) top1 {ema_metrics["top1"]:.2f} '
                                             f'nll {ema_metrics["nll"]:.4f}'))
        if args.log_tensorboard:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
        state.update(epoch=epoch + 1, step=0, elapsed_s=elapsed())
        # the metrics are the same on every process (gathered, or each scored the whole split)
        if is_better(metric_key, value, state['best_metric']):
            state.update(best_metric=value, best_epoch=epoch)
            weights = accelerator.get_state_dict(model) if automix is None else None  # a collective under FSDP
            if main_process and automix is None:
                save_model_folder(unwrapped, output / 'best', model_args, dict(epoch=epoch, validation=metrics),
                                  data_config, weights)
            elif main_process:  # AutoMix deploys the momentum encoder: 'best' holds its weights, chosen on its metric
                save_model_folder(ema.module, output / 'best', model_args,
                                  dict(epoch=epoch, model='ema', validation=ema_metrics, online_validation=metrics),
                                  data_config)
        if main_process:
            write_csv_atomic(output / 'summary.csv', rows)
        save_checkpoint(accelerator, model, output, model_args, data_config, state, args.checkpoint_hist)

    # final evaluation: last and best weights, on validation and (if there is one) the test split
    results = dict(model=args.model, num_members=num_members, dataset=splits.description,
                   epochs=args.epochs, selection_metric=metric_key, wall_time_s=elapsed(),
                   device=str(accelerator.device), processes=world, speed=speed)
    if state['epoch'] < args.epochs:
        return 0
    final_eval = {}
    for which in ('last', 'best'):
        net, wrapper = unwrapped, model
        if which == 'best':
            # the saved folder itself, as users load it (any sharding of the trained model plays no part)
            accelerator.wait_for_everyone()
            net = wrapper = load_model_folder(output / 'best').to(accelerator.device)
            if args.channels_last:
                net = wrapper = net.to(memory_format=torch.channels_last)
        entry = dict(epoch=args.epochs - 1 if which == 'last' else state['best_epoch'])
        for split_name, loader in (('validation', val_loader), ('test', test_loader)):
            if loader is None:
                continue
            ens, members, labels = collect_predictions(wrapper, loader, gather, net)
            entry[split_name] = classification_metrics(ens, labels, members)
        final_eval[which] = entry
    results.update(final_eval)
    results['deployed'] = 'best'
    if ema is not None:
        ema_ens, ema_members, ema_labels = collect_predictions(ema.module, val_loader, gather)
        results['ema_validation'] = classification_metrics(ema_ens, ema_labels, ema_members)
        if main_process:
            save_model_folder(ema.module, output / 'ema', model_args, dict(validation=results['ema_validation']),
                              data_config)
    if automix is not None:
        # 'best' holds the momentum encoder (the deployed model, spec §8); 'last' is the online model
        results['deployed_model'] = 'ema'
        final_eval['best']['model'], final_eval['last']['model'] = 'ema', 'online'
        ema_last = dict(epoch=args.epochs - 1, model='ema', validation=results['ema_validation'])
        if test_loader is not None:
            ema_ens, ema_members, ema_labels = collect_predictions(ema.module, test_loader, gather)
            ema_last['test'] = classification_metrics(ema_ens, ema_labels, ema_members)
        results['ema_last'] = ema_last
        mb = accelerator.unwrap_model(automix.mixblock)
        results['automix'] = dict(
            mode='--msda automix' if num_members == 1 else '--mix-mode automix', feature_level=automix.tap.index,
            feature_module=automix.tap.info.get('module'), mixblock_params=sum(p.numel() for p in mb.parameters()),
            final_momentum=ema.decay)
        if main_process:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous() for k, v in mb.state_dict().items()},
                      str(output / 'mixblock.safetensors'), metadata={'in_chans': str(mb.in_chans),
                                                                      'lam_concat': str(mb.lam_concat)})
    if main_process:
        tmp = output / 'results.json.tmp'
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, output / 'results.json')
        report_split = 'test' if 'test' in final_eval['best'] else 'validation'
        best = final_eval['best'][report_split]
        print(f'best epoch {state["best_epoch"]}{" (EMA model, deployed)" if automix is not None else ""} on '
              f'{report_split}: accuracy {best["top1"]:.2f} % | '
              f'NLL {best["nll"]:.4f} | ECE {best["ece"]:.4f} | members '
              f'{" ".join(f"{a:.2f}" for a in best["member_top1"])} % | results in {output}')
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """``main`` with the command line's error handling: one ``error:`` line and exit code 2 for bad input,
    1 for a non-finite loss (``--debug`` shows the traceback instead)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NonFiniteLoss, ImportError) as err:
        if '--debug' in (sys.argv if argv is None else argv):
            raise
        print(f'error: {err}', file=sys.stderr)
        return 1 if isinstance(err, NonFiniteLoss) else 2


if __name__ == '__main__':
    sys.exit(cli())
