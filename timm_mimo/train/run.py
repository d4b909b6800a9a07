"""A training run's record and what keeps it safe: signals that stop it cleanly, checkpoints that are complete
and finite, and a resume that unpickles nothing but tensors."""
import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .. import rundir

_logger = logging.getLogger('train')


class NonFiniteLoss(RuntimeError):
    """The loss, the weights or the validation loss became NaN or infinite: the run stops, keeping the last
    complete checkpoint (every checkpoint is finite: nothing non-finite is ever saved)."""


class StepAbandoned(Exception):
    """A stop request arrived during a step in flight: the step is dropped and the last completed one saved."""


class StopRequest:
    """SIGTERM or Ctrl-C (SIGINT): save a resumable checkpoint of the last completed step, and exit.

    Launchers wait briefly before they kill (``accelerate launch``: SIGTERM, then SIGKILL 5 s later; torchrun:
    30 s), which one step can outlast. So a step in flight (loading, forward, backward: nothing of it is kept
    yet) is abandoned at once (:class:`StepAbandoned`), and its replay on resume is exact. A stop between steps
    waits for the next one. A second request stops at once, whatever the process is doing (a step that never
    ends: a blocked read, a hung save): :class:`KeyboardInterrupt`. A signal of the other kind within
    ``SAME_REQUEST_S`` of the first is the same request passed on: a terminal's Ctrl-C reaches both the
    launcher and this process, and the launcher then sends SIGTERM."""

    SAME_REQUEST_S = 2.0

    def __init__(self):
        self.signal = None
        self.received_at = 0.0
        self.abandonable = False
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            if name != self.signal and time.monotonic() - self.received_at < self.SAME_REQUEST_S:
                return
            print(f'{name} again: stopping at once (the last saved checkpoint stays)', file=sys.stderr)
            raise KeyboardInterrupt
        self.signal, self.received_at = name, time.monotonic()
        print(f'{name}: saving a checkpoint of the last completed step (send it again to stop at once)',
              file=sys.stderr)
        if self.abandonable:
            self.abandonable = False
            raise StepAbandoned

    @contextlib.contextmanager
    def step_in_flight(self):
        """A stretch that a stop request abandons (one already received abandons it before it starts)."""
        if self.signal is not None:
            raise StepAbandoned
        self.abandonable = True
        try:
            yield
        finally:
            self.abandonable = False


class LastCompletedStep:
    """What a step in flight changes before its optimizer step, as it was when the last step completed: the
    buffers its forward passes update (BatchNorm statistics, of the momentum encoder too), the random
    generators its layers draw from (dropout, drop path) and Accelerate's micro-step count. An abandoned step
    is undone with it, so the checkpoint then saved is the one an uninterrupted run makes at that step."""

    def __init__(self, t: 'Training'):
        self.accelerator = t.accelerator
        modules = [t.model, *t.task.trained_modules, *t.task.eval_models.values()]
        self.buffers = list({id(b): b for m in modules for b in m.buffers()}.values())
        self.saved = [b.detach().clone() for b in self.buffers]
        self.cuda = t.accelerator.device.type == 'cuda'
        self.take()

    def take(self):
        if self.buffers:
            torch._foreach_copy_(self.saved, [b.detach() for b in self.buffers])  # one fused copy per step
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.accelerator.device) if self.cuda else None
        self.micro_steps = self.accelerator.step

    def restore(self):
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_([b.detach() for b in self.buffers], self.saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_rng, self.accelerator.device)
        self.accelerator.step = self.micro_steps


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
    """Continue from ``checkpoint``: training state (every pickled file checked first, every weights file of the
    model's dtypes and shapes), task tensors, trainer state and the summary rows of the epochs it completed."""
    from ..models.weights import TensorMismatchError, check_tensors_match
    state_dir = checkpoint / rundir.TRAINING_STATE_DIR
    rundir.check_state_files_are_plain(state_dir)
    state = rundir.read_trainer_state(checkpoint)
    rundir.check_count(state['step'], checkpoint / rundir.STATE_FILE, 'step', t.steps_per_epoch,
                       ' (the steps per epoch of this run)')
    extra = checkpoint / rundir.EXTRA_WEIGHTS_FILE
    try:
        # Accelerate's own copies of the weights (model.safetensors, model_1.safetensors, ...: one per prepared
        # model) are what load_state reads, and it would cast a retyped tensor without a word
        for index, model in enumerate(t.accelerator._models):
            path = state_dir / ('model.safetensors' if index == 0 else f'model_{index}.safetensors')
            if path.is_file():
                check_tensors_match(model.state_dict(), load_file(str(path)), path)
        t.accelerator.load_state(str(state_dir))
        if extra.exists():
            tensors = load_file(str(extra), device=str(t.accelerator.device))
            check_tensors_match(t.task.state_dict(), tensors, extra)
            t.task.load_state_dict(tensors)
        else:
            t.task.start_copies_from(t.bare)
    except TensorMismatchError:
        raise
    except Exception as e:  # noqa: BLE001  (torch, safetensors, Accelerate: each has its own errors for a damaged file)
        raise ValueError(f'cannot resume from {checkpoint}: the training state does not match this model or is '
                         f'damaged ({(str(e).strip().splitlines() or [type(e).__name__])[0]})') from e
    t.state.update(state)
    t.elapsed_before_s = t.state['elapsed_s']
    adopt_newer_best(t)
    t.rows = [r for r in rundir.read_csv(t.run_dir / rundir.SUMMARY_FILE) if int(r['epoch']) < t.state['epoch']]
    _logger.info(f'resumed from {checkpoint} (epoch {t.state["epoch"]}, step {t.state["step"]})')


def start_in_place(t: Training):
    """``--resume`` of a run folder that holds no checkpoint yet (stopped, killed or out of disk before its
    first): the run starts from its first step in its own folder, keeping a ``best/`` it wrote as the best so far."""
    _logger.info(f'{t.run_dir} holds no checkpoint yet: starting the run in place from epoch 0')
    adopt_newer_best(t)


def adopt_newer_best(t: Training):
    """best/ is written just before the epoch's checkpoint: a run killed between the two resumes from the
    previous checkpoint (or starts in place) with a best/ of the epoch it is about to replay. best/ is what gets
    deployed and evaluated, so its epoch and metric become the tracked best; the replay overwrites it only if it
    does better."""
    path = t.run_dir / rundir.BEST_DIR / rundir.METRICS_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # no best/ yet (or one without readable metrics): the checkpoint's best stands
        return
    validation = saved.get('validation') if isinstance(saved, dict) else None
    metric = validation.get(t.args.eval_metric) if isinstance(validation, dict) else None
    epoch = saved.get('epoch') if isinstance(saved, dict) else None
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and isinstance(metric, (int, float))
            and math.isfinite(metric)):
        _logger.warning(f'{path} is not a metrics file of best/ (edited or damaged): the best so far is the '
                        f'checkpoint\'s')
        return
    if epoch >= t.state['epoch']:
        _logger.warning(f'{rundir.BEST_DIR}/ is of epoch {epoch}, newer than the checkpoint: kept as the best so '
                        f'far ({t.args.eval_metric} {metric:.4g})')
        t.state.update(best_metric=metric, best_epoch=epoch)


def check_resume(t: Training, checkpoint: Optional[Path]) -> list:
    """A resumed run keeps its arguments. Another architecture or fewer epochs than done is refused; what else
    the command line changed in the recipe is warned about and returned, for :func:`record_resume` once the
    resume has been accepted."""
    from .args import recipe_changes
    saved = rundir.read_args(t.run_dir)
    for key in ('model', 'num_members', 'num_classes'):
        if saved.get(key) is not None and saved.get(key) != getattr(t.args, key):
            raise ValueError(f'cannot resume {t.run_dir}: it was trained with --{key.replace("_", "-")} '
                             f'{saved[key]}, not {getattr(t.args, key)}')
    done = rundir.read_trainer_state(checkpoint)['epoch'] if checkpoint is not None else 0
    if done > t.args.epochs:
        raise ValueError(f'cannot resume {t.run_dir} with --epochs {t.args.epochs}: it has trained {done} epochs already')
    rundir.read_resumes(t.run_dir)  # a damaged record is refused before anything changes
    changes = recipe_changes(saved, t.args)
    if changes:
        _logger.warning(f'resuming {t.run_dir} with a changed recipe: {"; ".join(changes)} (recorded in '
                        f'{rundir.RESUMES_FILE})')
    return changes


def record_resume(t: Training, checkpoint: Optional[Path], changes: list):
    """Record an accepted resume's recipe changes in the run folder (resumes.yaml, which the model card reads)."""
    if changes and t.accelerator.is_main_process:
        rundir.record_resume(t.run_dir, checkpoint.name if checkpoint is not None else 'start', changes)


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
        with rundir.writing(final):  # a full disk: one line, not safetensors' or torch's own error
            accelerator.save_state(str(tmp / rundir.TRAINING_STATE_DIR))
            weights = accelerator.get_state_dict(t.model)  # unsharded on the main process (FSDP: FULL_STATE_DICT)
            if accelerator.is_main_process:
                rundir.write_model_files(t.bare, tmp, t.model_args, t.data_config, weights)
                extra = t.task.state_dict()
                if extra:
                    save_file({k: v.detach().contiguous() for k, v in extra.items()},
                              str(tmp / rundir.EXTRA_WEIGHTS_FILE))
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


