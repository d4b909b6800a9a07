#!/usr/bin/env python3
"""Train MixMo / MIMO models (and any timm model, as M = 1) with Hugging Face Accelerate.

    python train.py -c configs/digits_mixmo.yaml      # embedded digits data, wrn16_2_mixmo2, ~1-2 min on CPU
    accelerate launch train.py -c configs/cifar100/cut_mixmo.yaml --data-dir data/
    accelerate launch train.py --model wrn28_10_mixmo2 --dataset torch/cifar100 --dataset-download ...
    python train.py --resume output/train/<run>       # continue a run with its own arguments

Batch sizes (README "Batch sizes and processes"): ``-b`` is the GLOBAL number B of mixed samples per optimizer
step; each process draws U = B / (processes x grad_accum_steps x batch_repeat) unique images per micro-step.

The MIMO batch (masks, MSDA, soft targets) is built on the device from a generator seeded by (seed, process,
epoch, step, micro-step) (timm_mimo.train.run.step_seed): a resumed run replays the uninterrupted one's batches.
"""
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
from timm_mimo.train.args import DATA_BACKEND_KEYS, LOWER_IS_BETTER, build_parser, debug_requested, parse_args, \
    recipes_for, run_settings  # noqa: F401  (build_parser: for tools)
from timm_mimo.train.args import check_transform_flags, image_transforms
from timm_mimo.train.run import AbandonableStep, EpochProgress, NonFiniteLoss, StepAbandoned, StopRequest, Training, \
    all_finite, check_resume, record_resume, refuse_non_finite, restore, save_checkpoint, start_in_place
from timm_mimo.train.trackers import start_trackers

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
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration
    accelerator = Accelerator(
        mixed_precision=('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else 'no',
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=list(filter(None, args.log_with.split(','))) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / rundir.TRACKERS_DIR)))
    launched = int(os.environ.get('WORLD_SIZE', '1'))
    if launched > accelerator.num_processes:
        # e.g. `accelerate launch` of several processes on a machine without GPUs: each would run alone
        raise ValueError(f'{launched} processes were launched but Accelerate sees {accelerator.num_processes}: '
                         f'without GPUs, set ACCELERATE_USE_CPU=true for distributed CPU training')
    refuse_lone_cpu_launch(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and (args.model_ema or 'automix' in (args.msda,
                                                                                                  args.mix_mode)):
        raise ValueError('--model-ema and AutoMix keep a whole copy of the model next to the sharded one: '
                         'not supported with FSDP (use DDP)')
    return accelerator


def refuse_lone_cpu_launch(accelerator):
    """`accelerate launch --cpu` asked for several processes or machines: its CPU launcher starts one plain process
    per machine and leaves more to mpirun (it sets MASTER_ADDR, not RANK / WORLD_SIZE), so every machine would
    train the whole job alone. Refused; README "Multi-node" gives the launch that forms the group."""
    from accelerate.utils import parse_flag_from_env
    if accelerator.num_processes == 1 and 'WORLD_SIZE' not in os.environ and os.environ.get('MASTER_ADDR') and \
            parse_flag_from_env('ACCELERATE_USE_CPU'):
        raise ValueError('accelerate launch --cpu started this process alone (Accelerate leaves --num_processes and '
                         '--num_machines on CPUs to mpirun): launch with --multi_gpu and ACCELERATE_USE_CPU=true '
                         'instead, as README "Multi-node" shows')


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


def timm_transforms(args, splits, model, cfg, data_config: dict, process: int):
    """(splits, the preprocessing recorded with the weights) for --aug timm: timm's training pipeline drawn for
    each of the M x b copies of an image, timm's eval pipeline (crop_pct, center crop) for validation and test,
    from the flags and the model's pretrained_cfg (as timm's train.py resolves its data config)."""
    from timm_mimo.data.transforms import TIMM_AUG, timm_transform_splits
    if args.aug != TIMM_AUG:
        return splits, data_config
    copies = getattr(model, 'num_members', 1) * args.batch_repeat
    splits, data_config = timm_transform_splits(splits, image_transforms(args), cfg or model.pretrained_cfg, copies,
                                                args.seed, process)
    size = data_config['input_size'][-1]
    _logger.info(f'transforms: timm\'s training pipeline drawn {copies} times per image (M x b copies), '
                 f'random-resized crop scale {tuple(args.scale)} ratio {tuple(round(r, 3) for r in args.ratio)}, '
                 f'hflip {args.hflip}, color jitter {args.color_jitter}, aa {args.aa}, reprob {args.reprob}; '
                 f'evaluation: resize {int(size / data_config["crop_pct"])}, center crop {size} '
                 f'({data_config["interpolation"]})')
    return splits, data_config


def setup(args, run_dir: Path, stop: StopRequest, wall_start: float) -> Training:
    import timm
    import timm.scheduler
    from accelerate.utils import set_seed
    from timm_mimo.data import native_img_size
    from timm_mimo.data.loaders import build_loaders
    from timm_mimo.data.splits import auto_augment_transform, build_splits
    from timm_mimo.data.transforms import TIMM_AUG, default_aug
    from timm_mimo.models.factory import read_model_source, registered_cfg, resolve_img_size
    from timm_mimo.train.speed import CompiledWithFallback, optimizer_from_settings, report_cpu_threads
    from timm_mimo.train.tasks import build_builder, create_task

    sourced = read_model_source(args.model)  # hf-hub: / local-dir: names: their config.json; bad names: one line
    if sourced is not None:  # recorded in args.yaml and every model folder: which Hub commit or folder was loaded
        args.model_source = sourced.record
    accelerator = make_accelerator(args, run_dir)
    set_seed(args.seed)
    world, accum, repeat = accelerator.num_processes, args.grad_accum_steps, args.batch_repeat
    if args.batch_size % (world * accum * repeat):
        raise ValueError(f'batch size {args.batch_size} is not divisible by processes ({world}) x grad accum '
                         f'steps ({accum}) x batch repetition ({repeat})')
    unique = args.batch_size // (world * accum * repeat)
    model_args = model_arguments(args)
    cfg = registered_cfg(args.model, model_args, sourced)
    img_size, why = resolve_img_size(cfg, model_args, args.img_size, native_img_size(args.dataset, args.data_dir))
    splits = build_splits(args.dataset, args.data_dir, args.dataset_download, img_size,
                          mean=args.mean or (cfg.mean if cfg is not None and args.dataset else None),
                          std=args.std or (cfg.std if cfg is not None and args.dataset else None),
                          val_per_class=args.val_per_class,
                          train_transform=auto_augment_transform(args.aa) if args.aa else None,
                          num_classes=args.num_classes, batch_size=unique, seed=args.seed,
                          **{key: getattr(args, key) for key in DATA_BACKEND_KEYS})
    # batched crop-flip (crop only where a flip changes the label: digits), or timm's pipeline per copy for sets of
    # large images; recorded in args.yaml
    args.aug = args.aug or default_aug(splits, img_size, native_img_size(args.dataset, args.data_dir))
    check_transform_flags(args)
    settings = run_settings(args)
    optim = settings.optim
    model, data_config = build_model(args, splits, model_args)
    splits, data_config = timm_transforms(args, splits, model, cfg, data_config, accelerator.process_index)
    model = sync_batchnorm(model, settings.sync_bn, accelerator)
    mix_mode = settings.mixing.mix_mode or getattr(model, 'default_mix_mode', 'cut')
    builder = build_builder(model, splits.num_classes, splits.img_size, mix_mode, settings.mixing, settings.augment)
    task = create_task(settings, model, builder, mix_mode, (splits.img_size,) * 2, accelerator.device)
    train_loader, validation, test, on_device = build_loaders(
        splits, accelerator, unique, max(unique * repeat, 64), seed=args.seed, device_data=args.device_data,
        per_image_transform=f'--aug {TIMM_AUG}: timm\'s transforms per copy' if args.aug == TIMM_AUG else
        '--aa transforms each image with PIL in the loader' if args.aa else '',
        workers=args.workers, cache_dir=args.data_cache_dir)
    steps = min(len(train_loader) // accum, args.limit_train_batches or math.inf)
    if steps < 1:
        raise ValueError(f'the training split ({len(splits.train)} images) is smaller than one batch of '
                         f'{unique * world * accum} unique images')
    optimizer, fused = optimizer_from_settings(model, optim, accelerator.device)
    for group in task.param_groups(optim.lr, optim.weight_decay, optim.decay_all):
        optimizer.add_param_group(group)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=optim.sched, num_epochs=settings.epochs, decay_milestones=list(optim.decay_milestones),
        decay_rate=optim.decay_rate, min_lr=optim.min_lr, warmup_lr=optim.warmup_lr,
        warmup_epochs=optim.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    task.prepare(accelerator, settings.epochs * steps)
    step_model = CompiledWithFallback(prepared, backend=settings.torchcompile, mode=settings.torchcompile_mode) \
        if settings.torchcompile else prepared
    speed = dict(distributed=accelerator.distributed_type.value.lower(), mixed_precision=accelerator.mixed_precision,
                 channels_last=settings.channels_last, torchcompile=settings.torchcompile, fused_optimizer=fused,
                 device_data=on_device)
    run = Training(settings=settings, accelerator=accelerator, run_dir=run_dir, model=model, prepared=prepared,
                   step_model=step_model, task=task, optimizer=optimizer, scheduler=scheduler,
                   train_loader=train_loader, validation=validation, test=test, splits=splits, model_args=model_args,
                   data_config=data_config, steps_per_epoch=steps, stop=stop, wall_start=wall_start, speed=speed,
                   model_source=sourced.record if sourced is not None else None)
    if accelerator.is_main_process:  # once everything is built: bad input is one error line, alone
        say_where_the_data_comes_from(args)
        _logger.info(f'image size {img_size} px: {why}')
    _logger.info(f'model {args.model}: M={task.outputs.num_members}, '
                 f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | data {splits.description}')
    _logger.info(f'global batch {args.batch_size} mixed samples = {args.batch_size // repeat} unique x {repeat} '
                 f'repeats | {world} process(es) x {unique} unique images x {accum} accumulation steps | {steps} '
                 f'steps/epoch | output {run_dir}')
    if hasattr(task, 'describe'):
        _logger.info(f'AutoMix (M = {task.outputs.num_members}): {task.describe()}')
    _logger.info(f'speed: device {accelerator.device}, ' + ', '.join(f'{k} {v}' for k, v in speed.items()))
    report_cpu_threads(accelerator)
    return run


def sync_batchnorm(model, sync_bn: bool, accelerator):
    """--sync-bn: BatchNorm layers synchronised across processes, before Accelerate wraps the model. timm's
    converter, not PyTorch's alone: timm's BatchNormAct2d (a BatchNorm2d with its activation) keeps its
    activation. One process has nothing to synchronise; PyTorch's SyncBatchNorm runs on GPUs only."""
    from timm.layers import convert_sync_batchnorm
    if not sync_bn or accelerator.num_processes == 1:
        if sync_bn:
            _logger.info('--sync-bn: one process, nothing to synchronise')
        return model
    if accelerator.device.type not in ('cuda', 'xpu', 'hpu'):
        raise ValueError(f'--sync-bn: PyTorch\'s SyncBatchNorm runs on GPUs only, not on {accelerator.device.type}')
    return convert_sync_batchnorm(model)


# ------------------------------------------------------------------------------------------------------
# training

def train_epoch(run: Training, epoch: int) -> bool:
    """One epoch from the saved step on; True when a signal stopped it (a checkpoint is then saved)."""
    settings, accelerator, task = run.settings, run.accelerator, run.task
    task.set_epoch(epoch, settings.epochs)
    run.train_loader.set_epoch(epoch)
    progress, abandonable = EpochProgress(run, epoch), AbandonableStep(run)
    step, micro = run.state.step, 0
    batches = iter(run.train_loader.batches(start_batch=step * settings.grad_accum_steps))
    run.prepared.train()
    try:
        while step < run.steps_per_epoch:
            with abandonable.in_flight():
                batch = next(batches, None)
                if batch is None:
                    break
                images, labels = batch
                generator = run.step_generator(epoch, step, micro, images.device)
                with accelerator.accumulate(run.prepared, *task.trained_modules):
                    with accelerator.autocast():  # the task's forward and loss: MixMo's or AutoMix's
                        out = task.step(run.step_model, images, labels, generator, pictures=progress.pictures)
                    accelerator.backward(out.loss)
                    if settings.optim.clip_grad is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(run.trained_parameters(), settings.optim.clip_grad)
            # from here on the step is kept (a micro-step of accumulation: Accelerate's optimizer skips it)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if progress.pictures:
                progress.pictures = save_mix_picture(run, epoch, out)
            progress.add(out.loss, out.parts, images.shape[0])
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro, step = 0, step + 1
            run.state.num_updates += 1
            run.scheduler.step_update(run.state.num_updates)
            task.after_step(run.model, run.state.num_updates)
            abandonable.completed()
            stopping = run.stop.agreed(accelerator)
            progress.step_completed(step, stopping)
            if stopping and step < run.steps_per_epoch:
                return save_on_stop(run, progress)
    except StepAbandoned:
        abandonable.undo()  # the checkpoint is that of the last completed step
        return save_on_stop(run, progress)
    finally:
        progress.close()
    run.scheduler.step(epoch + 1)
    run.epoch_summary = progress.summary()
    return False


def save_on_stop(run: Training, progress: EpochProgress) -> bool:
    """The checkpoint of a stop request, at the last completed step (with the epoch's sums up to it)."""
    resume = f'continue with: python train.py --resume {run.run_dir}'
    if progress.last_completed.step == run.state.step:  # no step completed since the last checkpoint (or start)
        saved = rundir.complete_checkpoints(run.run_dir)
        _logger.info(f'{run.stop.signal}: nothing trained since {saved[-1] if saved else "the start"}; {resume}')
        return True
    progress.store_last_completed()
    path = save_checkpoint(run, run.settings.checkpoint_hist + 1)
    _logger.info(f'{run.stop.signal}: saved {path}; {resume}')
    return True


def save_mix_picture(run: Training, epoch: int, out) -> bool:
    """PNG grid of this epoch's mixed samples (--mix-vis-interval); returns False: one picture per epoch."""
    from timm_mimo.eval.plots import save_mix_grid
    if out.samples is None:
        _logger.info(f'--mix-vis-interval: {out.what}: no picture')
    else:
        save_mix_grid(run.run_dir / rundir.MIXED_SAMPLES_DIR / f'epoch_{epoch:04d}.png', out.samples, run.splits.mean,
                      run.splits.std, title=f'epoch {epoch}: {out.what}')
    return False


# ------------------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, split, task, outputs=None) -> dict:
    from timm_mimo.eval.predict import collect_predictions
    from timm_mimo.eval.metrics import classification_metrics
    ens, members, labels = collect_predictions(model, split.loader, outputs or task.outputs, split.accelerator)
    return classification_metrics(ens, labels, members)


def end_epoch(run: Training, epoch: int):
    """Validation, the summary row, best/ (on the deployed model's metric) and the epoch's checkpoint."""
    settings, accelerator, task, state, trained = run.settings, run.accelerator, run.task, run.state, run.epoch_summary
    if not all_finite(run):  # before anything of this epoch is written: best/, the summary, the checkpoint
        refuse_non_finite(run, 'the weights are not finite')
    metrics = {'model': evaluate(run.prepared, run.validation, task)}
    metrics.update({name: evaluate(m, run.validation, task) for name, m in task.eval_models.items()})
    m = metrics['model']
    if not all(math.isfinite(x['nll']) for x in metrics.values()):
        refuse_non_finite(run, 'the validation loss is not finite')
    row = dict(epoch=epoch, lr=run.optimizer.param_groups[0]['lr'], train_loss=trained.train_loss, eval_loss=m['nll'],
               eval_top1=m['top1'], eval_top5=m['top5'], eval_nll=m['nll'], eval_ece=m['ece'])
    row.update({f'eval_member{k}_top1': acc for k, acc in enumerate(m['member_top1'])})
    row.update(task.epoch_columns(metrics, trained.parts))
    row.update(train_img_s=trained.seen / max(trained.time_s, 1e-9), epoch_time=trained.time_s, elapsed=run.elapsed())
    run.rows.append(row)
    deployed = metrics[task.deployed]
    _logger.info(f'epoch {epoch}: loss {row["train_loss"]:.4f} | val top1 {m["top1"]:.2f} nll {m["nll"]:.4f} ece '
                 f'{m["ece"]:.4f} | members {" ".join(f"{a:.2f}" for a in m["member_top1"])} | '
                 f'{row["train_img_s"]:.0f} img/s {trained.time_s:.1f}s' + ('' if task.deployed == 'model' else
                 f' | EMA (deployed) top1 {deployed["top1"]:.2f} nll {deployed["nll"]:.4f}'))
    accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=state.num_updates)
    state.start_epoch(epoch + 1, run.elapsed())
    value, best = deployed[settings.eval_metric], state.best_metric
    if run.splits.select_last_epoch or best is None or (value < best if settings.eval_metric in LOWER_IS_BETTER
                                                        else value > best):
        state.best_metric, state.best_epoch = value, epoch
        save_best(run, epoch, metrics)
    if accelerator.is_main_process:
        rundir.write_csv_atomic(run.run_dir / rundir.SUMMARY_FILE, run.rows)
    save_checkpoint(run, settings.checkpoint_hist)


def save_best(run: Training, epoch: int, metrics: dict):
    if run.task.deployed == 'model':
        weights = run.accelerator.get_state_dict(run.prepared)  # a collective under FSDP
        if run.accelerator.is_main_process:
            rundir.save_model_folder(run.model, run.run_dir / rundir.BEST_DIR, run.model_args, run.data_config,
                                     weights, metrics=dict(epoch=epoch, validation=metrics['model']),
                                     model_source=run.model_source)
    elif run.accelerator.is_main_process:  # AutoMix deploys its momentum encoder, chosen on its own metric
        rundir.save_model_folder(run.task.ema.module, run.run_dir / rundir.BEST_DIR, run.model_args, run.data_config,
                                 metrics=dict(epoch=epoch, model=run.task.deployed, validation=metrics[
                                     run.task.deployed], online_validation=metrics['model']),
                                 model_source=run.model_source)


def final_evaluation(run: Training) -> dict:
    """The last and the best weights (the saved best/ folder, loaded as a user would) on validation and test;
    the task's extra models; results.json."""
    from safetensors.torch import save_file
    from timm_mimo.mimo import MemberOutputs
    settings, accelerator, task = run.settings, run.accelerator, run.task
    splits = {'validation': run.validation, 'test': run.test}
    accelerator.wait_for_everyone()
    best = rundir.load_model_folder(run.run_dir / rundir.BEST_DIR).to(accelerator.device)
    if settings.channels_last:
        best = best.to(memory_format=torch.channels_last)
    results = dict(model=settings.model, num_members=task.outputs.num_members, dataset=run.splits.description,
                   test_split=run.splits.test_source if run.test is not None else None, selection=run.splits.selection,
                   epochs=settings.epochs, selection_metric=settings.eval_metric, wall_time_s=run.elapsed(),
                   device=str(accelerator.device), processes=accelerator.num_processes, speed=run.speed)
    for which, model, outputs in (('last', run.prepared, None), ('best', best, MemberOutputs(best))):
        entry = dict(epoch=settings.epochs - 1 if which == 'last' else run.state.best_epoch)
        entry.update({name: evaluate(model, s, task, outputs) for name, s in splits.items() if s is not None})
        results[which] = entry
    results['deployed'] = 'best'
    for name, model in task.eval_models.items():
        results[f'{name}_validation'] = evaluate(model, run.validation, task)
        if accelerator.is_main_process:
            rundir.save_model_folder(model, run.run_dir / name, run.model_args, run.data_config,
                                     metrics=dict(validation=results[f'{name}_validation']),
                                     model_source=run.model_source)
    if task.deployed != 'model':  # best/ holds the momentum encoder (the deployed model); 'last' the online one
        results.update(deployed_model=task.deployed)
        results['best']['model'], results['last']['model'] = task.deployed, 'online'
        model = task.eval_models[task.deployed]
        results[f'{task.deployed}_last'] = dict(epoch=settings.epochs - 1, model=task.deployed, **{
            name: evaluate(model, s, task) for name, s in splits.items() if s is not None})
    results.update(task.results(accelerator))
    if accelerator.is_main_process:
        for name, tensors in task.files().items():
            save_file(tensors, str(run.run_dir / name))
        rundir.write_json_atomic(run.run_dir / rundir.RESULTS_FILE, results)
    return results


def report(run: Training, results: dict):
    if not run.accelerator.is_main_process:
        return
    split = 'test' if 'test' in results['best'] else 'validation'
    best = results['best'][split]
    where = f'test ({results["test_split"]})' if split == 'test' else 'validation (this data set has no test split)'
    print(f'best epoch {run.state.best_epoch}{" (EMA model, deployed)" if run.task.deployed != "model" else ""} on '
          f'{where}: accuracy {best["top1"]:.2f} % | NLL {best["nll"]:.4f} | ECE {best["ece"]:.4f} | members '
          f'{" ".join(f"{a:.2f}" for a in best["member_top1"])} % | results in {run.run_dir}')
    if len(best['member_top1']) > 1:  # what one forward pass of the ensemble buys over its members
        members = enumerate(zip(best['member_top1'], best['member_nll'], best['member_ece']))
        rows = [('ensemble', best['top1'], best['nll'], best['ece'])] + [(f'member {k}', *m) for k, m in members]
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
        run = setup(args, run_dir, stop, wall_start)
        if run.accelerator.is_main_process:
            rundir.remove_leftovers(run_dir)  # what an interrupted save or swap left
            if not args.resume:
                rundir.write_atomic(run_dir / rundir.ARGS_FILE, yaml.safe_dump(vars(args), sort_keys=False))
        else:
            logging.getLogger().setLevel(logging.WARNING)
        run.accelerator.wait_for_everyone()
        if args.resume:
            changes = check_resume(run_dir, resume_from, vars(args))
            restore(run, resume_from) if resume_from is not None else start_in_place(run)
            record_resume(run, resume_from, changes)  # only a resume that was accepted
        start_trackers(run.accelerator, run.settings.trackers, run_dir, args.log_project, vars(args),
                       run.state.num_updates, new_run=not args.resume)
        try:
            first_epoch = run.state.epoch
            for epoch in range(first_epoch, args.epochs):
                if train_epoch(run, epoch):  # a signal: its checkpoint is saved
                    return 130 if stop.signal == 'SIGINT' else 0
                end_epoch(run, epoch)
            if first_epoch == args.epochs and (run_dir / rundir.RESULTS_FILE).exists():
                _logger.info(f'{run_dir} has finished its {args.epochs} epochs: nothing to do')
            else:
                report(run, final_evaluation(run))
        finally:
            run.accelerator.end_training()  # the trackers' last events, also of a stopped run
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
    non-finite loss (``--debug``, or ``debug: true`` in the config, shows the traceback)."""
    from timm_mimo.cli import run_cli
    return run_cli(main, argv, failures={NonFiniteLoss: 1}, debug=debug_requested)


if __name__ == '__main__':
    sys.exit(cli())
