#!/usr/bin/env python3
"""Train MixMo / MIMO models (and any timm model, as M = 1) with Hugging Face Accelerate.

    python train.py -c configs/digits_mixmo.yaml      # embedded digits data, wrn16_2_mixmo2, ~1-2 min on CPU
    accelerate launch train.py -c configs/cifar100/cut_mixmo.yaml --data-dir data/
    accelerate launch train.py --model wrn28_10_mixmo2 --dataset torch/cifar100 --dataset-download ...
    python train.py --resume output/train/<run>       # continue a run with its own arguments

Batch sizes (README "Batch sizes and processes"): ``-b`` is the GLOBAL number of mixed samples per optimizer
step, B. Each process draws U = B / (processes x grad_accum_steps x batch_repeat) unique images per
micro-step and builds its own U x batch_repeat mixed samples on its device.

The MIMO batch (masks, MSDA, soft targets) is built on the device from a generator seeded by
(seed, process, epoch, step): a resumed run replays exactly the batches of an uninterrupted one.
"""
import contextlib
import logging
import math
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from timm_mimo import rundir
from timm_mimo.train.run import LastCompletedStep, NonFiniteLoss, StepAbandoned, StopRequest, Training, all_finite, \
    check_resume, epoch_sums_at_start, record_resume, refuse_non_finite, restore, save_checkpoint, start_in_place
from timm_mimo.train.args import LOWER_IS_BETTER, build_parser, parse_args, recipes_for  # noqa: F401  (for tools)

_logger = logging.getLogger('train')


# ------------------------------------------------------------------------------------------------------
# set-up

def open_run(args):
    """(run folder, checkpoint to resume or None). A new run never reuses a started folder; a folder left by
    a run that stopped before its first checkpoint holds nothing worth keeping and is started again (with
    ``--resume``, also one that holds a best/ already)."""
    if args.resume:
        return rundir.resolve_resume(Path(args.resume))
    run_dir = Path(args.output) / (args.experiment or f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}')
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f'output folder {run_dir} exists and is not a folder')
    if run_dir.exists() and not rundir.is_stub(run_dir):
        raise FileExistsError(f'output folder {run_dir} exists and is not empty: use --resume {run_dir} or another '
                              f'--experiment')
    return run_dir, None


def make_accelerator(args, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType
    accelerator = Accelerator(
        mixed_precision=('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else 'no',
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with='tensorboard' if args.log_tensorboard else None, project_dir=str(run_dir))
    launched = int(os.environ.get('WORLD_SIZE', '1'))
    if launched > accelerator.num_processes:
        # e.g. `accelerate launch` of several processes on a machine without GPUs: each would run alone
        raise ValueError(f'{launched} processes were launched but Accelerate sees {accelerator.num_processes}: '
                         f'without GPUs, set ACCELERATE_USE_CPU=true for distributed CPU training')
    if accelerator.distributed_type == DistributedType.FSDP and (args.model_ema or 'automix' in (args.msda,
                                                                                                  args.mix_mode)):
        raise ValueError('--model-ema and AutoMix keep a whole copy of the model next to the sharded one: '
                         'not supported with FSDP (use DDP)')
    return accelerator


def report_cpu_threads(accelerator) -> int:
    """On the CPU: the threads of this process, said once; a warning where they are fewer than the cores
    (`accelerate launch` gives each process one thread, OMP_NUM_THREADS=1, unless told otherwise) or more than
    the cores that other jobs leave free (OpenMP threads then spin on busy cores: an epoch measured 20-60x
    slower with two threads on two cores next to another torch job than with one). Returns the threads."""
    if accelerator.device.type != 'cpu' or not accelerator.is_main_process:
        return 0
    processes = max(int(os.environ.get('LOCAL_WORLD_SIZE', '1')), 1)
    total = os.cpu_count() or 1
    cores, threads = max(total // processes, 1), torch.get_num_threads()
    _logger.info(f'CPU: {threads} thread(s) per process, {processes} process(es) on {total} core(s)')
    launched = 'ACCELERATE_MIXED_PRECISION' in os.environ  # set by accelerate launch
    busy = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0  # the last minute's, before we add ours
    free = total - busy
    fit = max(int(free + 0.5) // processes, 1)  # half a core of slack: this process's start-up adds to the load
    if threads * processes > free + 0.5:
        busy_line = f'the machine is busy: load average {busy:.1f} on {total} core(s) leaves ~{max(free, 0):.1f} ' \
                    f'free for {threads * processes} thread(s)'
        if threads > fit:
            _logger.warning(f'{busy_line}; threads that share busy cores wait on each other (epochs up to 20-60x '
                            f'slower): set OMP_NUM_THREADS={fit} (accelerate launch: --num_cpu_threads_per_process '
                            f'{fit}), or wait for idle cores')
        else:
            _logger.warning(f'{busy_line}; with one thread per process already, this run shares its core(s) and '
                            f'takes longer than on idle ones')
    elif launched and threads < min(cores, fit):
        _logger.warning(f'training on the CPU with {threads} thread(s) per process for {cores} core(s): accelerate '
                        f'launch sets OMP_NUM_THREADS=1; pass --num_cpu_threads_per_process {min(cores, fit)} to it '
                        f'(or run python train.py)')
    return threads


def say_where_the_data_comes_from(args):
    """Without --dataset: one line that the embedded digits are used, and which config runs the paper's
    setting for the model (configs/ beside train.py), or that none does."""
    if args.dataset or args.data_dir:
        return
    configs = Path(__file__).resolve().parent / 'configs'
    rows, others = recipes_for(args.model, configs) if configs.is_dir() else ([], [])
    shown = [os.path.relpath(p) for p in rows[:1] or others]
    if rows:
        where = f'the paper\'s settings for {args.model}: -c {shown[0]}' + \
                (f' and {len(rows) - 1} more (configs/README.md)' if len(rows) > 1 else '')
    else:
        where = f'no config runs a paper setting for {args.model}' + \
                (f' (its recipes: {", ".join(shown)})' if shown else '') + '; the paper rows: configs/README.md'
    _logger.info(f'no --dataset: training on the embedded digits (scikit-learn, 1,797 8x8 images, offline); {where}')


def model_arguments(args) -> dict:
    """The create_model arguments of the run (recorded with its weights): --model-kwargs and the model flags."""
    from timm_mimo.cli import parse_model_kwargs
    model_args = parse_model_kwargs(args.model_kwargs)
    for key, value in (('num_members', args.num_members), ('ensemble', args.ensemble),
                       ('drop_rate', args.drop), ('drop_path_rate', args.drop_path)):
        if value is not None:
            model_args[key] = value
    return model_args


def build_model(args, splits, model_args: dict):
    """(model, the preprocessing recorded with its weights)."""
    from timm_mimo.models.factory import create_model
    from timm_mimo.models.weights import load_weights
    if args.num_classes is not None and args.num_classes != splits.num_classes:
        raise ValueError(f'--num-classes {args.num_classes} does not match the dataset\'s {splits.num_classes} classes')
    # --pretrained-path: timm's form, a pretrained_cfg overlay that is not recorded as a model argument
    overlay = dict(pretrained_cfg_overlay=dict(file=args.pretrained_path)) if args.pretrained_path else {}
    model = create_model(args.model, pretrained=args.pretrained or bool(overlay), num_classes=splits.num_classes,
                         **model_args, **overlay)
    if args.initial_checkpoint:
        load_weights(model, Path(args.initial_checkpoint))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    img = splits.img_size
    data_config = dict(input_size=(3, img, img), mean=tuple(splits.mean), std=tuple(splits.std), crop_pct=1.0,
                       interpolation='bilinear')
    return model, data_config


def setup(args, run_dir: Path, stop: StopRequest, wall_start: float) -> Training:
    import timm
    import timm.scheduler
    from accelerate.utils import set_seed
    from timm_mimo.data import native_img_size
    from timm_mimo.data.loaders import build_loaders
    from timm_mimo.data.splits import auto_augment_transform, build_splits
    from timm_mimo.models.factory import registered_cfg, resolve_img_size, unknown_model_error
    from timm_mimo.train.speed import CompiledWithFallback, create_optimizer
    from timm_mimo.train.tasks import build_builder, create_task

    if not timm.is_model(args.model):
        raise unknown_model_error(args.model)
    accelerator = make_accelerator(args, run_dir)
    set_seed(args.seed)
    world, accum, repeat = accelerator.num_processes, args.grad_accum_steps, args.batch_repeat
    if args.batch_size % (world * accum * repeat):
        raise ValueError(f'batch size {args.batch_size} is not divisible by processes ({world}) x grad accum '
                         f'steps ({accum}) x batch repetition ({repeat})')
    unique = args.batch_size // (world * accum * repeat)
    model_args = model_arguments(args)
    cfg = registered_cfg(args.model, model_args)
    img_size, why = resolve_img_size(cfg, model_args, args.img_size, native_img_size(args.dataset, args.data_dir))
    splits = build_splits(args.dataset, args.data_dir, args.dataset_download, img_size,
                          mean=cfg.mean if cfg is not None and args.dataset else None,
                          std=cfg.std if cfg is not None and args.dataset else None, val_per_class=args.val_per_class,
                          train_transform=auto_augment_transform(args.aa) if args.aa else None,
                          train_split=args.train_split, val_split=args.val_split, class_map=args.class_map,
                          train_num_samples=args.train_num_samples, val_num_samples=args.val_num_samples,
                          select_last_epoch=args.select_last_epoch, num_classes=args.num_classes,
                          batch_size=unique, seed=args.seed)
    args.aug = args.aug or splits.default_aug  # no flip where it changes the label (digits); recorded in args.yaml
    model, data_config = build_model(args, splits, model_args)
    mix_mode = args.mix_mode or getattr(model, 'default_mix_mode', 'cut')
    builder = build_builder(args, model, splits.num_classes, splits.img_size, mix_mode)
    task = create_task(args, model, builder, mix_mode, (splits.img_size,) * 2, accelerator.device)
    train_loader, validation, test, on_device = build_loaders(
        splits, accelerator, unique, max(unique * repeat, 64), seed=args.seed, device_data=args.device_data,
        per_image_transform='--aa transforms each image with PIL in the loader' if args.aa else '',
        workers=args.workers, cache_dir=args.data_cache_dir)
    steps = min(len(train_loader) // accum, args.limit_train_batches or math.inf)
    if steps < 1:
        raise ValueError(f'the training split ({len(splits.train)} images) is smaller than one batch of '
                         f'{unique * world * accum} unique images')
    optimizer, fused = create_optimizer(
        model, args.opt, args.fused_opt, accelerator.device, lr=args.lr, weight_decay=args.weight_decay,
        momentum=args.momentum, filter_bias_and_bn=not args.wd_all)
    for group in task.param_groups(args.lr, args.weight_decay, args.wd_all):
        optimizer.add_param_group(group)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps)
    bare = model
    model, optimizer = accelerator.prepare(model, optimizer)
    task.prepare(accelerator, args.epochs * steps)
    train_model = CompiledWithFallback(model, backend=args.torchcompile, mode=args.torchcompile_mode) \
        if args.torchcompile else model
    t = Training(args, accelerator, run_dir, model, bare, task, optimizer, scheduler, train_loader, validation, test,
                 splits, model_args, data_config, steps, train_model, stop, wall_start)
    if accelerator.is_main_process:  # once everything is built: bad input is one error line, alone
        say_where_the_data_comes_from(args)
        _logger.info(f'image size {img_size} px: {why}')
    _logger.info(f'model {args.model}: M={task.outputs.num_members}, '
                 f'{sum(p.numel() for p in bare.parameters()) / 1e6:.2f}M params | data {splits.description}')
    _logger.info(f'global batch {args.batch_size} mixed samples = {args.batch_size // repeat} unique x {repeat} '
                 f'repeats | {world} process(es) x {unique} unique images x {accum} accumulation steps | {steps} '
                 f'steps/epoch | output {run_dir}')
    if hasattr(task, 'describe'):
        _logger.info(f'AutoMix (M = {task.outputs.num_members}): {task.describe()}')
    t.speed = dict(distributed=accelerator.distributed_type.value.lower(), mixed_precision=accelerator.mixed_precision,
                   channels_last=args.channels_last, torchcompile=args.torchcompile, fused_optimizer=fused,
                   device_data=on_device)
    _logger.info(f'speed: device {accelerator.device}, ' + ', '.join(f'{k} {v}' for k, v in t.speed.items()))
    report_cpu_threads(accelerator)
    return t


# ------------------------------------------------------------------------------------------------------
# training

def step_generator(t: Training, epoch: int, step: int, micro: int, device) -> torch.Generator:
    # draws depend only on (seed, process, epoch, step, micro-step): exact replay after a resume
    gen = torch.Generator(device=device)
    gen.manual_seed(hash((t.args.seed, t.accelerator.process_index, epoch, step, micro)) % (2 ** 63))
    return gen


def train_epoch(t: Training, epoch: int) -> bool:
    """One epoch from the saved step on; True when a signal stopped it (a checkpoint is then saved)."""
    from tqdm import tqdm
    args, accelerator, task = t.args, t.accelerator, t.task
    task.set_epoch(epoch, args.epochs)
    t.train_loader.set_epoch(epoch)
    # a resumed epoch carries on the sums of the steps before the stop (saved in the trainer state)
    step, micro, seen, start = t.state['step'], 0, 0, time.time()
    loss_sum = torch.full((), t.state['loss_sum'], device=accelerator.device)  # on the device: no sync per step
    loss_count, part_sums = t.state['loss_count'], dict(t.state['part_sums'])
    main = accelerator.is_main_process
    terminal = sys.stderr.isatty()
    bar = tqdm(total=t.steps_per_epoch, initial=step, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True,
               disable=not (main and terminal))
    # a log line every --log-interval steps, every --log-interval-s seconds and at least 4 times an epoch
    log_every, logged_at = min(args.log_interval, max(t.steps_per_epoch // 4, 1)), time.time()
    pictures = main and args.mix_vis_interval > 0 and epoch % args.mix_vis_interval == 0
    # alone, a stop abandons the step in flight; several processes stop together at a step boundary (a
    # process leaving a step would leave the others waiting in its collectives)
    alone = accelerator.num_processes == 1
    last = LastCompletedStep(t) if alone else None
    done = (step, loss_sum, loss_count, dict(part_sums), seen, time.time())  # the sums at the last completed step
    batches = iter(t.train_loader.batches(start_batch=step * args.grad_accum_steps))
    t.model.train()
    try:
        while step < t.steps_per_epoch:
            with t.stop.step_in_flight() if alone else contextlib.nullcontext():
                batch = next(batches, None)
                if batch is None:
                    break
                images, labels = batch
                gen = step_generator(t, epoch, step, micro, images.device)
                with accelerator.accumulate(t.model, *task.trained_modules):
                    with accelerator.autocast():
                        out = task.step(t.train_model, images, labels, gen, pictures=pictures)
                    accelerator.backward(out.loss)
                    if args.clip_grad is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_([p for m in (t.model, *task.trained_modules) for p in m.parameters()],
                                                    args.clip_grad)
            # from here on the step is kept
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            if pictures:
                pictures = save_mix_picture(t, epoch, out)
            seen += images.shape[0] * args.batch_repeat * accelerator.num_processes
            loss_sum = loss_sum + out.loss.detach()
            loss_count += 1
            for key, value in out.parts.items():
                part_sums[key] = part_sums.get(key, 0) + value
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro, step = 0, step + 1
            t.state['num_updates'] += 1
            t.scheduler.step_update(t.state['num_updates'])
            task.after_step(t.bare, t.state['num_updates'])
            if alone:
                last.take()
            done = (step, loss_sum, loss_count, dict(part_sums), seen, time.time())
            bar.update()
            stopping = stop_agreed(t)
            if step % log_every == 0 or step == t.steps_per_epoch or stopping or time.time() - logged_at >= \
                    args.log_interval_s:
                logged_at = time.time()
                mean_loss = check_loss(t, loss_sum, loss_count)
                rate = seen / max(time.time() - start, 1e-9)
                bar.set_postfix(loss=f'{mean_loss:.3f}', img_s=f'{rate:.0f}')
                if main and not terminal:
                    eta = (t.steps_per_epoch - step) * (time.time() - start) / max(step - t.state['step'], 1)
                    _logger.info(f'epoch {epoch} step {step}/{t.steps_per_epoch} | loss {mean_loss:.4f} | lr '
                                 f'{t.optimizer.param_groups[0]["lr"]:.4g} | {rate:.0f} samples/s | ETA {eta:.0f}s')
            if stopping and step < t.steps_per_epoch:
                return save_on_stop(t, epoch, start, done)
    except StepAbandoned:
        last.restore()  # undo what the step in flight changed: the checkpoint is that of the last completed step
        bar.close()
        return save_on_stop(t, epoch, start, done)
    bar.close()
    t.scheduler.step(epoch + 1)
    t.epoch_train = dict(train_loss=check_loss(t, loss_sum, loss_count), seen=t.state['epoch_seen'] + seen,
                         time=t.state['epoch_time_s'] + time.time() - start,
                         parts={k: float(v) / max(loss_count, 1) for k, v in part_sums.items()})
    return False


def save_on_stop(t: Training, epoch: int, start: float, done: tuple) -> bool:
    """The checkpoint of a stop request, at the last completed step ``done`` (its step and running sums)."""
    step, loss_sum, loss_count, part_sums, seen, at = done
    resume = f'continue with: python train.py --resume {t.run_dir}'
    if step == t.state['step']:  # no step completed since the run's last checkpoint (or its start)
        saved = rundir.complete_checkpoints(t.run_dir)
        _logger.info(f'{t.stop.signal}: nothing trained since {saved[-1] if saved else "the start"}; {resume}')
        return True
    t.state.update(epoch=epoch, step=step, elapsed_s=t.elapsed(), loss_sum=check_loss(t, loss_sum, 1),
                   loss_count=loss_count, part_sums={k: float(v) for k, v in part_sums.items()},
                   epoch_seen=t.state['epoch_seen'] + seen, epoch_time_s=t.state['epoch_time_s'] + at - start)
    path = save_checkpoint(t, t.args.checkpoint_hist + 1)
    _logger.info(f'{t.stop.signal}: saved {path}; {resume}')
    return True


def stop_agreed(t: Training) -> bool:
    """A signal was received: every process must stop at the same step, so with several they agree on it (a
    collective); alone, reading the flag is free."""
    stopping = t.stop.signal is not None
    if t.accelerator.num_processes > 1:
        flag = torch.tensor(float(stopping), device=t.accelerator.device)
        stopping = bool(t.accelerator.reduce(flag, 'max').item())
    return stopping


def check_loss(t: Training, loss_sum: torch.Tensor, count: int) -> float:
    """The mean training loss (a host sync); a non-finite one stops the run before anything is saved."""
    if not torch.isfinite(loss_sum):
        refuse_non_finite(t, f'the training loss is {loss_sum.item()}')
    return loss_sum.item() / max(count, 1)


def save_mix_picture(t: Training, epoch: int, out) -> bool:
    """PNG grid of this epoch's mixed samples (--mix-vis-interval); returns False: one picture per epoch."""
    from timm_mimo.eval.plots import save_mix_grid
    if out.samples is None:
        _logger.info(f'--mix-vis-interval: {out.what}: no picture')
    else:
        save_mix_grid(t.run_dir / rundir.MIXED_SAMPLES_DIR / f'epoch_{epoch:04d}.png', out.samples, t.splits.mean,
                      t.splits.std, title=f'epoch {epoch}: {out.what}')
    return False


# ------------------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, split, task, outputs=None) -> dict:
    from timm_mimo.eval.predict import collect_predictions
    from timm_mimo.eval.metrics import classification_metrics
    ens, members, labels = collect_predictions(model, split.loader, outputs or task.outputs, split.accelerator)
    return classification_metrics(ens, labels, members)


def end_epoch(t: Training, epoch: int):
    """Validation, the summary row, best/ (on the deployed model's metric) and the epoch's checkpoint."""
    args, accelerator, task = t.args, t.accelerator, t.task
    if not all_finite(t):  # before anything of this epoch is written: best/, the summary, the checkpoint
        refuse_non_finite(t, 'the weights are not finite')
    metrics = {'model': evaluate(t.model, t.validation, task)}
    metrics.update({name: evaluate(m, t.validation, task) for name, m in task.eval_models.items()})
    m, train = metrics['model'], t.epoch_train
    if not all(math.isfinite(x['nll']) for x in metrics.values()):
        refuse_non_finite(t, 'the validation loss is not finite')
    row = dict(epoch=epoch, lr=t.optimizer.param_groups[0]['lr'], train_loss=train['train_loss'], eval_loss=m['nll'],
               eval_top1=m['top1'], eval_top5=m['top5'], eval_nll=m['nll'], eval_ece=m['ece'])
    row.update({f'eval_member{k}_top1': acc for k, acc in enumerate(m['member_top1'])})
    row.update(task.epoch_columns(metrics, train['parts']))
    row.update(train_img_s=train['seen'] / max(train['time'], 1e-9), epoch_time=train['time'], elapsed=t.elapsed())
    t.rows.append(row)
    deployed = metrics[task.deployed]
    _logger.info(f'epoch {epoch}: loss {row["train_loss"]:.4f} | val top1 {m["top1"]:.2f} nll {m["nll"]:.4f} ece '
                 f'{m["ece"]:.4f} | members {" ".join(f"{a:.2f}" for a in m["member_top1"])} | '
                 f'{row["train_img_s"]:.0f} img/s {train["time"]:.1f}s' + ('' if task.deployed == 'model' else
                 f' | EMA (deployed) top1 {deployed["top1"]:.2f} nll {deployed["nll"]:.4f}'))
    if args.log_tensorboard:
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
    t.state.update(epoch=epoch + 1, step=0, elapsed_s=t.elapsed(), **epoch_sums_at_start())
    value, best = deployed[args.eval_metric], t.state['best_metric']
    if t.splits.select_last_epoch or best is None or (value < best if args.eval_metric in LOWER_IS_BETTER else
                                                      value > best):
        t.state.update(best_metric=value, best_epoch=epoch)
        save_best(t, epoch, metrics)
    if accelerator.is_main_process:
        rundir.write_csv_atomic(t.run_dir / rundir.SUMMARY_FILE, t.rows)
    save_checkpoint(t, args.checkpoint_hist)


def save_best(t: Training, epoch: int, metrics: dict):
    if t.task.deployed == 'model':
        weights = t.accelerator.get_state_dict(t.model)  # a collective under FSDP
        if t.accelerator.is_main_process:
            rundir.save_model_folder(t.bare, t.run_dir / rundir.BEST_DIR, t.model_args, t.data_config, weights,
                                     metrics=dict(epoch=epoch, validation=metrics['model']))
    elif t.accelerator.is_main_process:  # AutoMix deploys its momentum encoder, chosen on its own metric
        rundir.save_model_folder(t.task.ema.module, t.run_dir / rundir.BEST_DIR, t.model_args, t.data_config,
                                 metrics=dict(epoch=epoch, model=t.task.deployed, validation=metrics[t.task.deployed],
                                              online_validation=metrics['model']))


def final_evaluation(t: Training) -> dict:
    """The last and the best weights (the saved best/ folder, loaded as a user would) on validation and test;
    the task's extra models; results.json."""
    from safetensors.torch import save_file
    from timm_mimo.mimo import MemberOutputs
    args, accelerator, task = t.args, t.accelerator, t.task
    splits = {'validation': t.validation, 'test': t.test}
    accelerator.wait_for_everyone()
    best = rundir.load_model_folder(t.run_dir / rundir.BEST_DIR).to(accelerator.device)
    if args.channels_last:
        best = best.to(memory_format=torch.channels_last)
    results = dict(model=args.model, num_members=task.outputs.num_members, dataset=t.splits.description,
                   test_split=t.splits.test_source if t.test is not None else None, selection=t.splits.selection,
                   epochs=args.epochs, selection_metric=args.eval_metric, wall_time_s=t.elapsed(),
                   device=str(accelerator.device), processes=accelerator.num_processes, speed=t.speed)
    for which, model, outputs in (('last', t.model, None), ('best', best, MemberOutputs(best))):
        entry = dict(epoch=args.epochs - 1 if which == 'last' else t.state['best_epoch'])
        entry.update({name: evaluate(model, s, task, outputs) for name, s in splits.items() if s is not None})
        results[which] = entry
    results['deployed'] = 'best'
    for name, model in task.eval_models.items():
        results[f'{name}_validation'] = evaluate(model, t.validation, task)
        if accelerator.is_main_process:
            rundir.save_model_folder(model, t.run_dir / name, t.model_args, t.data_config,
                                     metrics=dict(validation=results[f'{name}_validation']))
    if task.deployed != 'model':  # best/ holds the momentum encoder (the deployed model); 'last' the online one
        results.update(deployed_model=task.deployed)
        results['best']['model'], results['last']['model'] = task.deployed, 'online'
        model = task.eval_models[task.deployed]
        results[f'{task.deployed}_last'] = dict(epoch=args.epochs - 1, model=task.deployed, **{
            name: evaluate(model, s, task) for name, s in splits.items() if s is not None})
    results.update(task.results(accelerator))
    if accelerator.is_main_process:
        for name, tensors in task.files().items():
            save_file(tensors, str(t.run_dir / name))
        rundir.write_json_atomic(t.run_dir / rundir.RESULTS_FILE, results)
    return results


def report(t: Training, results: dict):
    if not t.accelerator.is_main_process:
        return
    split = 'test' if 'test' in results['best'] else 'validation'
    best = results['best'][split]
    where = f'test ({results["test_split"]})' if split == 'test' else 'validation (this data set has no test split)'
    print(f'best epoch {t.state["best_epoch"]}{" (EMA model, deployed)" if t.task.deployed != "model" else ""} on '
          f'{where}: accuracy {best["top1"]:.2f} % | NLL {best["nll"]:.4f} | ECE {best["ece"]:.4f} | members '
          f'{" ".join(f"{a:.2f}" for a in best["member_top1"])} % | results in {t.run_dir}')
    if len(best['member_top1']) > 1:  # what one forward pass of the ensemble buys over its members
        rows = [('ensemble', best['top1'], best['nll'], best['ece'])] + [
            (f'member {k}', *values) for k, values in enumerate(zip(best['member_top1'], best['member_nll'],
                                                                     best['member_ece']))]
        print(f'  {"":<9} {"top-1":>8} {"NLL":>7} {"ECE":>7}\n' +
              '\n'.join(f'  {name:<9} {top1:6.2f} % {nll:7.4f} {ece:7.4f}' for name, top1, nll, ece in rows) +
              f'\n  ensemble gain over its best member: {best["ensemble_gain"]:+.2f} points')


# ------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    wall_start = time.time()  # time-to-accuracy counts from here: data decoding and compilation included
    stop = StopRequest()
    args = parse_args(argv, __doc__)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    for noisy in ('accelerate', 'timm'):  # they log every saved / loaded file at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import timm_mimo  # noqa: F401  (registers the models)
    run_dir, resume_from = open_run(args)
    made = not run_dir.exists()
    lock = rundir.RunLock(run_dir).acquire() if int(os.environ.get('RANK', '0')) == 0 else None
    try:
        t = setup(args, run_dir, stop, wall_start)
        if t.accelerator.is_main_process:
            rundir.remove_leftovers(run_dir)  # what an interrupted save or swap left
            if not args.resume:
                rundir.write_atomic(run_dir / rundir.ARGS_FILE, yaml.safe_dump(vars(args), sort_keys=False))
        else:
            logging.getLogger().setLevel(logging.WARNING)
        t.accelerator.wait_for_everyone()
        if args.resume:
            changes = check_resume(t, resume_from)
            restore(t, resume_from) if resume_from is not None else start_in_place(t)
            record_resume(t, resume_from, changes)  # only a resume that was accepted
        if args.log_tensorboard:
            t.accelerator.init_trackers('tensorboard')
        first_epoch = t.state['epoch']
        for epoch in range(first_epoch, args.epochs):
            if train_epoch(t, epoch):  # a signal: its checkpoint is saved
                return 130 if stop.signal == 'SIGINT' else 0
            end_epoch(t, epoch)
        if first_epoch == args.epochs and (run_dir / rundir.RESULTS_FILE).exists():
            _logger.info(f'{run_dir} has finished its {args.epochs} epochs: nothing to do')
        else:
            report(t, final_evaluation(t))
        t.accelerator.end_training()
        return 0
    except BaseException:
        if made and lock is not None and rundir.is_stub(run_dir):  # nothing of this run is worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def cli(argv=None) -> int:
    """``main`` with the command line's error handling: one ``error:`` line, exit 2 for bad input and 1 for a
    non-finite loss (``--debug`` shows the traceback)."""
    from timm_mimo.cli import run_cli
    return run_cli(main, argv, failures={NonFiniteLoss: 1})


if __name__ == '__main__':
    sys.exit(cli())
