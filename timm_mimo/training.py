"""A training run's record and what keeps it safe: signals that stop it cleanly, checkpoints that are complete
and finite, and a resume that unpickles nothing but tensors."""
import json
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from . import rundir

_logger = logging.getLogger('train')


class NonFiniteLoss(RuntimeError):
    """The loss, the weights or the validation loss became NaN or infinite: the run stops, keeping the last
    complete checkpoint (every checkpoint is finite: nothing non-finite is ever saved)."""


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT): finish the current step, save a resumable checkpoint, exit. A second Ctrl-C
    stops at once (what was last saved stays)."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __call__(self, signum, frame):
        if self.signal == 'SIGINT' and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f'{self.signal}: saving a checkpoint after this step (Ctrl-C again to stop at once)', file=sys.stderr)


def epoch_sums_at_start() -> dict:
    """The running sums of an epoch, as it starts. A mid-epoch checkpoint saves them, so that a resumed epoch's
    summary (mean loss and loss parts, images/s, epoch time) covers all of its steps, not only the later ones."""
    return dict(loss_sum=0.0, loss_count=0, part_sums={}, epoch_seen=0, epoch_time_s=0.0)


@dataclass
class Training:
    """Everything a run holds, built once by train.py's ``setup``."""
    args: object
    accelerator: object
    run_dir: Path
    model: torch.nn.Module          # prepared (DDP / FSDP)
    bare: torch.nn.Module           # the model itself, for EMA updates and saving
    task: object
    optimizer: object
    scheduler: object
    train_loader: object
    validation: object
    test: Optional[object]
    splits: object
    model_args: dict
    data_config: dict
    steps_per_epoch: int
    train_model: torch.nn.Module    # what the training step calls (the compiled model, if asked)
    stop: StopRequest
    wall_start: float
    state: dict = field(default_factory=lambda: dict(epoch=0, step=0, num_updates=0, best_metric=None,
                                                     best_epoch=None, elapsed_s=0.0, **epoch_sums_at_start()))
    rows: list = field(default_factory=list)
    speed: dict = field(default_factory=dict)         # the speed settings, logged and kept in results.json
    epoch_train: dict = field(default_factory=dict)   # the last epoch's training loss, samples and time
    elapsed_before_s: float = 0.0   # wall time of the processes this run resumed from

    def elapsed(self) -> float:
        """Wall time of the whole run: earlier processes (from the checkpoint) plus this one so far. What is
        saved in ``state['elapsed_s']`` is this total; it is read back once, at ``restore``, never re-added."""
        return self.elapsed_before_s + time.time() - self.wall_start


def restore(t: Training, checkpoint: Path):
    """Continue from ``checkpoint``: training state (every pickled file checked first), task tensors, trainer
    state and the summary rows of the epochs it completed."""
    state_dir = checkpoint / rundir.TRAINING_STATE_DIR
    rundir.check_state_files_are_plain(state_dir)
    try:
        t.accelerator.load_state(str(state_dir))
        if (checkpoint / rundir.EXTRA_WEIGHTS_FILE).exists():
            t.task.load_state_dict(load_file(str(checkpoint / rundir.EXTRA_WEIGHTS_FILE), device=str(t.accelerator.device)))
        else:
            t.task.start_copies_from(t.bare)
    except Exception as e:  # noqa: BLE001  (torch, safetensors, Accelerate: each has its own errors for a damaged file)
        raise ValueError(f'cannot resume from {checkpoint}: the training state does not match this model or is '
                         f'damaged ({(str(e).strip().splitlines() or [type(e).__name__])[0]})') from e
    t.state.update(rundir.read_trainer_state(checkpoint))
    t.elapsed_before_s = t.state['elapsed_s']
    adopt_newer_best(t)
    t.rows = [r for r in rundir.read_csv(t.run_dir / rundir.SUMMARY_FILE) if int(r['epoch']) < t.state['epoch']]
    _logger.info(f'resumed from {checkpoint} (epoch {t.state["epoch"]}, step {t.state["step"]})')


def adopt_newer_best(t: Training):
    """best/ is written just before the epoch's checkpoint: a run killed between the two resumes from the
    previous checkpoint with a best/ of the epoch it is about to replay. best/ is what gets deployed and
    evaluated, so its epoch and metric become the tracked best; the replay overwrites it only if it does better."""
    try:
        saved = json.loads((t.run_dir / rundir.BEST_DIR / rundir.METRICS_FILE).read_text())
    except (OSError, ValueError):  # no best/ yet (or one without readable metrics): the checkpoint's best stands
        return
    metric = saved.get('validation', {}).get(t.args.eval_metric)
    if saved.get('epoch') is not None and saved['epoch'] >= t.state['epoch'] and metric is not None:
        _logger.warning(f'{rundir.BEST_DIR}/ is of epoch {saved["epoch"]}, newer than the checkpoint: kept as the '
                        f'best so far ({t.args.eval_metric} {metric:.4g})')
        t.state.update(best_metric=metric, best_epoch=saved['epoch'])


def check_resume(t: Training, checkpoint: Path):
    """A resumed run keeps its arguments. Another architecture or fewer epochs than done is refused; what
    else the command line changed in the recipe is warned about and recorded in the run folder
    (resumes.yaml, which the model card reads)."""
    from .train_args import recipe_changes
    saved = rundir.read_args(t.run_dir)
    for key in ('model', 'num_members', 'num_classes'):
        if saved.get(key) is not None and saved.get(key) != getattr(t.args, key):
            raise ValueError(f'cannot resume {t.run_dir}: it was trained with --{key.replace("_", "-")} '
                             f'{saved[key]}, not {getattr(t.args, key)}')
    done = rundir.read_trainer_state(checkpoint)['epoch']
    if done > t.args.epochs:
        raise ValueError(f'cannot resume {t.run_dir} with --epochs {t.args.epochs}: it has trained {done} epochs already')
    changes = recipe_changes(saved, t.args)
    if changes:
        _logger.warning(f'resuming {t.run_dir} with a changed recipe: {"; ".join(changes)} (recorded in '
                        f'{rundir.RESUMES_FILE})')
        if t.accelerator.is_main_process:
            rundir.record_resume(t.run_dir, checkpoint, changes)


def all_finite(t: Training) -> bool:
    """Whether every weight is finite on every process: one reduction on the device, one host sync (only
    before saving). Agreed across processes: under FSDP each holds a shard, and a process that stopped
    alone would leave the others waiting at the checkpoint's collectives."""
    params = [p for m in [t.model, *t.task.trained_modules] for p in m.parameters()]
    # FSDP2 holds DTensors: each process checks its own shard, as a plain tensor the reduction can take
    local = [p.to_local() if hasattr(p, 'to_local') else p for p in params]
    finite = torch.stack([p.detach().isfinite().all() for p in local]).all()
    if t.accelerator.num_processes > 1:
        finite = t.accelerator.reduce(finite.to(torch.float32), reduction='sum') == t.accelerator.num_processes
    return bool(finite)


def refuse_non_finite(t: Training, what: str):
    last = (rundir.complete_checkpoints(t.run_dir) or ['none'])[-1]
    raise NonFiniteLoss(f'{what} in epoch {t.state["epoch"]}: stopping. Last good checkpoint (finite weights): {last}')


def save_checkpoint(t: Training, keep: int) -> Path:
    """Weights (timm's Hub format), the task's tensors, Accelerate's training state and the trainer state, as
    one atomic folder; the oldest are deleted only once it exists. Every process calls this: the training
    state and, under FSDP, the whole weights are collectives."""
    accelerator = t.accelerator
    if not all_finite(t):
        refuse_non_finite(t, 'the weights are not finite')
    final = t.run_dir / rundir.checkpoint_name(t.state['epoch'], t.state['step'])
    tmp = t.run_dir / f'.{final.name}.tmp'  # one name every process knows
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / rundir.TRAINING_STATE_DIR))
        weights = accelerator.get_state_dict(t.model)  # unsharded on the main process (FSDP: FULL_STATE_DICT)
        if accelerator.is_main_process:
            rundir.write_model_files(t.bare, tmp, t.model_args, t.data_config, weights)
            extra = t.task.state_dict()
            if extra:
                save_file({k: v.detach().contiguous() for k, v in extra.items()}, str(tmp / rundir.EXTRA_WEIGHTS_FILE))
            rundir.write_json_atomic(tmp / rundir.STATE_FILE, t.state)  # last: it makes the folder a checkpoint
            rundir.apply_umask(tmp)
            rundir.replace_dir(tmp, final)
            for old in rundir.complete_checkpoints(t.run_dir)[:-keep]:
                    shutil.rmtree(old)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves nothing half-written behind
        raise
    accelerator.wait_for_everyone()
    return final


