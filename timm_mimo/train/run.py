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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch
from safetensors.torch import load_file, save_file

from .. import rundir
from .settings import RunSettings

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

    def agreed(self, accelerator) -> bool:
        """Whether to stop now. Every process must stop at the same step, so with several they agree on it (a
        collective); alone, reading the flag is free."""
        stopping = self.signal is not None
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(stopping), device=accelerator.device)
            stopping = bool(accelerator.reduce(flag, 'max').item())
        return stopping

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


class AbandonableStep:
    """The training step in flight, which a stop request abandons, and how to undo it.

    Alone, a stop abandons the step in flight (:meth:`StopRequest.step_in_flight`), and what the step changed
    before its optimizer step is put back as it was when the last step completed: the buffers its forward passes
    update (BatchNorm statistics, of the momentum encoder too), the random generators its layers draw from
    (dropout, drop path) and Accelerate's micro-step count. The checkpoint then saved is the one an uninterrupted
    run makes at that step. Several processes stop together at a step boundary instead (a process leaving a
    step would leave the others waiting in its collectives): nothing is abandoned, nothing kept."""

    def __init__(self, run: 'Training'):
        self.stop, self.accelerator = run.stop, run.accelerator
        self.alone = run.accelerator.num_processes == 1
        modules = [run.prepared, *run.task.trained_modules, *run.task.eval_models.values()] if self.alone else []
        self.buffers = list({id(b): b for m in modules for b in m.buffers()}.values())
        self.saved = [b.detach().clone() for b in self.buffers]
        self.cuda = run.accelerator.device.type == 'cuda'
        self.completed()

    def in_flight(self):
        """The stretch of a step that a stop request abandons (:class:`StepAbandoned`)."""
        return self.stop.step_in_flight() if self.alone else contextlib.nullcontext()

    def completed(self):
        """A step completed: what it changed is kept."""
        if not self.alone:
            return
        if self.buffers:
            torch._foreach_copy_(self.saved, [b.detach() for b in self.buffers])  # one fused copy per step
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.accelerator.device) if self.cuda else None
        self.micro_steps = self.accelerator.step

    def undo(self):
        """Put back what the abandoned step changed."""
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_([b.detach() for b in self.buffers], self.saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_rng, self.accelerator.device)
        self.accelerator.step = self.micro_steps


# a Weyl increment: 2^64 / the golden ratio, rounded to odd (odd: multiplying by it is a bijection modulo 2^k)
SEED_STRIDE = 0x9E3779B97F4A7C15


def step_seed(seed: int, process: int, epoch: int, step: int, micro: int, *, processes: int, steps_per_epoch: int,
              accum_steps: int) -> int:
    """The seed of the generator that draws one micro-step's batch (masks, MSDA, augmentation) on one process::

        draw = ((epoch * steps_per_epoch + step) * accum_steps + micro) * processes + process
        seed of the draw = (seed + draw * SEED_STRIDE) mod 2**64

    ``draw`` numbers the micro-steps of every process of the run in order: it is injective over every epoch and
    0 <= step < steps_per_epoch, 0 <= micro < accum_steps, 0 <= process < processes. Multiplying by an odd number
    and adding ``seed`` are bijections modulo 2^k for every k, so for one run seed, distinct draws get distinct
    generator seeds as long as the run makes fewer than 2^32 draws (epochs x steps x accumulation x processes),
    also in the low 32 bits, the only ones a CPU generator (mt19937) uses; CUDA's Philox uses all 64. The same
    draw under another run seed gets another generator seed. It depends on these numbers alone: a resumed run
    replays the exact batches of an uninterrupted one."""
    draw = ((epoch * steps_per_epoch + step) * accum_steps + micro) * processes + process
    return (seed + draw * SEED_STRIDE) % 2 ** 64


@dataclass
class RunState:
    """Where a run stands: saved as the trainer state (trainer_state.json) of every checkpoint, read back to
    resume. The running sums of the epoch in progress are saved too, so that a resumed epoch's summary (mean loss
    and loss parts, images/s, epoch time) covers all of its steps, not only the later ones. The JSON keys are the
    field names, as checkpoints of earlier versions wrote them."""
    epoch: int = 0                  # the epoch in progress (= the epochs completed)
    step: int = 0                   # optimizer steps completed in it
    num_updates: int = 0            # optimizer steps of the whole run (the scheduler's count)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    elapsed_s: float = 0.0          # wall time of the run up to the checkpoint, earlier processes included
    loss_sum: float = 0.0           # the epoch's running sums, up to ``step``
    loss_count: int = 0
    part_sums: Dict[str, float] = field(default_factory=dict)
    epoch_seen: int = 0
    epoch_time_s: float = 0.0

    @classmethod
    def load(cls, checkpoint: Path, steps_per_epoch: int) -> 'RunState':
        """The trainer state of a complete checkpoint; an epoch or step that is not a count, or a step past this
        run's steps per epoch (a damaged or edited file), is refused, named."""
        saved = rundir.read_trainer_state(checkpoint)
        rundir.check_count(saved['step'], checkpoint / rundir.STATE_FILE, 'step', steps_per_epoch,
                           ' (the steps per epoch of this run)')
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def save(self, folder: Path):
        rundir.write_json_atomic(folder / rundir.STATE_FILE, asdict(self))

    def start_epoch(self, epoch: int, elapsed_s: float):
        """Move to the start of ``epoch``, its running sums at zero."""
        start = RunState(epoch=epoch, num_updates=self.num_updates, best_metric=self.best_metric,
                         best_epoch=self.best_epoch, elapsed_s=elapsed_s)
        self.__dict__.update(start.__dict__)


class EpochSummary(NamedTuple):
    """A trained epoch, for its summary row."""
    train_loss: float
    seen: int                       # mixed samples, all processes
    time_s: float
    parts: Dict[str, float]         # mean loss parts (AutoMix's)


@dataclass(kw_only=True)
class Training:
    """Everything a run holds, built once by train.py's ``setup``.

    Three handles on the network, each for its own use:

    - ``model``: the network itself (the timm module): what is saved, what the EMA copies follow;
    - ``prepared``: Accelerate's wrapper of it (DDP, FSDP; the model itself in one process): what is trained,
      accumulated, clipped, evaluated, and what the checkpoint's weights are gathered from;
    - ``step_model``: what the training step calls: ``prepared``, compiled when --torchcompile asks.
    """
    settings: RunSettings
    accelerator: object
    run_dir: Path
    model: torch.nn.Module
    prepared: torch.nn.Module
    step_model: object
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
    stop: StopRequest
    wall_start: float
    speed: dict                     # the speed settings, logged and kept in results.json
    state: RunState = field(default_factory=RunState)
    rows: list = field(default_factory=list)
    epoch_summary: Optional[EpochSummary] = None   # the last trained epoch
    elapsed_before_s: float = 0.0   # wall time of the processes this run resumed from
    model_source: Optional[dict] = None   # a hf-hub: / local-dir: model's record, written with every model folder

    def elapsed(self) -> float:
        """Wall time of the whole run: earlier processes (from the checkpoint) plus this one so far. What is
        saved in ``state.elapsed_s`` is this total; it is read back once, at ``restore``, never re-added."""
        return self.elapsed_before_s + time.time() - self.wall_start

    def trained_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters the optimizer steps: the model's and the task's own modules'."""
        return [p for m in (self.prepared, *self.task.trained_modules) for p in m.parameters()]

    def step_generator(self, epoch: int, step: int, micro: int, device) -> torch.Generator:
        """The generator of a micro-step's batch on this process (:func:`step_seed`)."""
        seed = step_seed(self.settings.seed, self.accelerator.process_index, epoch, step, micro,
                         processes=self.accelerator.num_processes, steps_per_epoch=self.steps_per_epoch,
                         accum_steps=self.settings.grad_accum_steps)
        return torch.Generator(device=device).manual_seed(seed)


class EpochSums(NamedTuple):
    """An epoch's running sums at one of its steps."""
    step: int
    loss_sum: torch.Tensor          # on the device
    loss_count: int
    part_sums: Dict[str, torch.Tensor]
    seen: int
    at: float                       # time.time() then


class EpochProgress:
    """An epoch's running sums, its progress bar and log lines, and its sums at the last completed step (what
    a stop saves). The loss is summed on the device (no host sync per step) and checked at each log line; a
    resumed epoch carries on the sums of the steps before the stop."""

    def __init__(self, run: Training, epoch: int):
        from tqdm import tqdm
        state, settings = run.state, run.settings
        self.run, self.epoch, self.first_step, self.start = run, epoch, state.step, time.time()
        self.loss_sum = torch.full((), state.loss_sum, device=run.accelerator.device)
        self.loss_count, self.part_sums, self.seen = state.loss_count, dict(state.part_sums), 0
        main, terminal = run.accelerator.is_main_process, sys.stderr.isatty()
        self.log_lines = main and not terminal  # a terminal has the progress bar
        self.bar = tqdm(total=run.steps_per_epoch, initial=state.step, desc=f'epoch {epoch}', leave=False,
                        dynamic_ncols=True, disable=not (main and terminal))
        # a log line every --log-interval steps, every --log-interval-s seconds and at least 4 times an epoch
        self.log_every, self.logged_at = min(settings.log_interval, max(run.steps_per_epoch // 4, 1)), time.time()
        self.pictures = main and settings.mix_vis_interval > 0 and epoch % settings.mix_vis_interval == 0
        self.last_completed = self.sums(state.step)

    def sums(self, step: int) -> EpochSums:
        return EpochSums(step, self.loss_sum, self.loss_count, dict(self.part_sums), self.seen, time.time())

    def add(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor], images: int):
        """A micro-step's loss and loss parts, and its samples: ``images`` unique ones per process, repeated."""
        run = self.run
        self.seen += images * run.settings.mixing.batch_repeat * run.accelerator.num_processes
        self.loss_sum = self.loss_sum + loss.detach()
        self.loss_count += 1
        for key, value in parts.items():
            self.part_sums[key] = self.part_sums.get(key, 0) + value

    def step_completed(self, step: int, stopping: bool):
        """After an optimizer step: its sums are kept; the log line when one is due (always when stopping); the
        trackers' row every --log-interval optimizer steps of the run (the same steps, resumed or not)."""
        self.last_completed = self.sums(step)
        self.bar.update()
        run, steps, now = self.run, self.run.steps_per_epoch, time.time()
        line_due = step % self.log_every == 0 or step == steps or stopping or \
            now - self.logged_at >= run.settings.log_interval_s
        tracker_due = bool(run.settings.trackers) and run.state.num_updates % run.settings.log_interval == 0
        if not (line_due or tracker_due):
            return
        mean_loss = check_loss(run, self.loss_sum, self.loss_count)  # the epoch's so far
        rate, lr = self.seen / max(now - self.start, 1e-9), run.optimizer.param_groups[0]['lr']
        if tracker_due:
            run.accelerator.log({'train/loss': mean_loss, 'train/lr': lr, 'train/samples_per_s': rate},
                                step=run.state.num_updates)
        if line_due:
            self.logged_at = now
            self.bar.set_postfix(loss=f'{mean_loss:.3f}', img_s=f'{rate:.0f}')
            if self.log_lines:
                eta = (steps - step) * (now - self.start) / max(step - self.first_step, 1)
                _logger.info(f'epoch {self.epoch} step {step}/{steps} | loss {mean_loss:.4f} | lr {lr:.4g} | '
                             f'{rate:.0f} samples/s | ETA {eta:.0f}s')

    def summary(self) -> EpochSummary:
        """The finished epoch, all of its steps (those before a resume too)."""
        state = self.run.state
        return EpochSummary(check_loss(self.run, self.loss_sum, self.loss_count), state.epoch_seen + self.seen,
                            state.epoch_time_s + time.time() - self.start,
                            {k: float(v) / max(self.loss_count, 1) for k, v in self.part_sums.items()})

    def store_last_completed(self):
        """Into the run state: the last completed step and the epoch's sums up to it (a stop's checkpoint)."""
        done, state = self.last_completed, self.run.state
        loss_sum = check_loss(self.run, done.loss_sum, 1)
        state.epoch, state.step, state.elapsed_s = self.epoch, done.step, self.run.elapsed()
        state.loss_sum, state.loss_count = loss_sum, done.loss_count
        state.part_sums = {k: float(v) for k, v in done.part_sums.items()}
        state.epoch_seen, state.epoch_time_s = state.epoch_seen + done.seen, state.epoch_time_s + done.at - self.start

    def close(self):
        self.bar.close()


def check_loss(run: Training, loss_sum: torch.Tensor, count: int) -> float:
    """The mean training loss (a host sync); a non-finite one stops the run before anything is saved."""
    if not torch.isfinite(loss_sum):
        refuse_non_finite(run, f'the training loss is {loss_sum.item()}')
    return loss_sum.item() / max(count, 1)


def restore(run: Training, checkpoint: Path):
    """Continue from ``checkpoint``: training state (every pickled file checked first, every weights file of the
    model's dtypes and shapes), task tensors, trainer state and the summary rows of the epochs it completed."""
    from ..models.weights import TensorMismatchError, check_tensors_match
    state_dir = checkpoint / rundir.TRAINING_STATE_DIR
    rundir.check_state_files_are_plain(state_dir)
    state = RunState.load(checkpoint, run.steps_per_epoch)
    extra = checkpoint / rundir.EXTRA_WEIGHTS_FILE
    try:
        # Accelerate's own copies of the weights (model.safetensors, model_1.safetensors, ...: one per prepared
        # model) are what load_state reads, and it would cast a retyped tensor without a word
        for index, model in enumerate(run.accelerator._models):
            path = state_dir / ('model.safetensors' if index == 0 else f'model_{index}.safetensors')
            if path.is_file():
                check_tensors_match(model.state_dict(), load_file(str(path)), path)
        run.accelerator.load_state(str(state_dir))
        if extra.exists():
            tensors = load_file(str(extra), device=str(run.accelerator.device))
            check_tensors_match(run.task.state_dict(), tensors, extra)
            run.task.load_state_dict(tensors)
        else:
            run.task.start_copies_from(run.model)
    except TensorMismatchError:
        raise
    except Exception as e:  # noqa: BLE001  (torch, safetensors, Accelerate: each has its own errors for a damaged file)
        raise ValueError(f'cannot resume from {checkpoint}: the training state does not match this model or is '
                         f'damaged ({(str(e).strip().splitlines() or [type(e).__name__])[0]})') from e
    run.state = state
    run.elapsed_before_s = state.elapsed_s
    adopt_newer_best(run)
    run.rows = [r for r in rundir.read_csv(run.run_dir / rundir.SUMMARY_FILE) if int(r['epoch']) < state.epoch]
    _logger.info(f'resumed from {checkpoint} (epoch {state.epoch}, step {state.step})')


def start_in_place(run: Training):
    """``--resume`` of a run folder that holds no checkpoint yet (stopped, killed or out of disk before its
    first): the run starts from its first step in its own folder, keeping a ``best/`` it wrote as the best so far."""
    _logger.info(f'{run.run_dir} holds no checkpoint yet: starting the run in place from epoch 0')
    adopt_newer_best(run)


def adopt_newer_best(run: Training):
    """best/ is written just before the epoch's checkpoint: a run killed between the two resumes from the
    previous checkpoint (or starts in place) with a best/ of the epoch it is about to replay. best/ is what gets
    deployed and evaluated, so its epoch and metric become the tracked best; the replay overwrites it only if it
    does better."""
    path, metric_name = run.run_dir / rundir.BEST_DIR / rundir.METRICS_FILE, run.settings.eval_metric
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # no best/ yet (or one without readable metrics): the checkpoint's best stands
        return
    validation = saved.get('validation') if isinstance(saved, dict) else None
    metric = validation.get(metric_name) if isinstance(validation, dict) else None
    epoch = saved.get('epoch') if isinstance(saved, dict) else None
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and isinstance(metric, (int, float))
            and math.isfinite(metric)):
        _logger.warning(f'{path} is not a metrics file of best/ (edited or damaged): the best so far is the '
                        f'checkpoint\'s')
        return
    if epoch >= run.state.epoch:
        _logger.warning(f'{rundir.BEST_DIR}/ is of epoch {epoch}, newer than the checkpoint: kept as the best so '
                        f'far ({metric_name} {metric:.4g})')
        run.state.best_metric, run.state.best_epoch = metric, epoch


def check_resume(run_dir: Path, checkpoint: Optional[Path], arguments: dict) -> list:
    """A resumed run keeps its arguments (``arguments``: this process's, in args.yaml's form). Another
    architecture or fewer epochs than done is refused; what else they change in the recipe is warned about and
    returned, for :func:`record_resume` once the resume has been accepted."""
    from .args import recipe_changes
    saved = rundir.read_args(run_dir)
    for key in ('model', 'num_members', 'num_classes'):
        if saved.get(key) is not None and saved.get(key) != arguments[key]:
            raise ValueError(f'cannot resume {run_dir}: it was trained with --{key.replace("_", "-")} '
                             f'{saved[key]}, not {arguments[key]}')
    done = rundir.read_trainer_state(checkpoint)['epoch'] if checkpoint is not None else 0
    if done > arguments['epochs']:
        raise ValueError(f'cannot resume {run_dir} with --epochs {arguments["epochs"]}: it has trained {done} '
                         f'epochs already')
    rundir.read_resumes(run_dir)  # a damaged record is refused before anything changes
    changes = recipe_changes(saved, arguments)
    if changes:
        _logger.warning(f'resuming {run_dir} with a changed recipe: {"; ".join(changes)} (recorded in '
                        f'{rundir.RESUMES_FILE})')
    return changes


def record_resume(run: Training, checkpoint: Optional[Path], changes: list):
    """Record an accepted resume's recipe changes in the run folder (resumes.yaml, which the model card reads)."""
    if changes and run.accelerator.is_main_process:
        rundir.record_resume(run.run_dir, checkpoint.name if checkpoint is not None else 'start', changes)


def all_finite(run: Training) -> bool:
    """Whether every weight is finite on every process: one reduction on the device, one host sync (only
    before saving). Agreed across processes: under FSDP each holds a shard, and a process that stopped
    alone would leave the others waiting at the checkpoint's collectives."""
    # FSDP2 holds DTensors: each process checks its own shard, as a plain tensor the reduction can take
    local = [p.to_local() if hasattr(p, 'to_local') else p for p in run.trained_parameters()]
    finite = torch.stack([p.detach().isfinite().all() for p in local]).all()
    if run.accelerator.num_processes > 1:
        finite = run.accelerator.reduce(finite.to(torch.float32), reduction='sum') == run.accelerator.num_processes
    return bool(finite)


def refuse_non_finite(run: Training, what: str):
    last = (rundir.complete_checkpoints(run.run_dir) or ['none'])[-1]
    raise NonFiniteLoss(f'{what} in epoch {run.state.epoch}: stopping. Last good checkpoint (finite weights): {last}')


def save_checkpoint(run: Training, keep: int) -> Path:
    """Weights (timm's Hub format), the task's tensors, Accelerate's training state and the trainer state, as
    one atomic folder; the oldest are deleted only once it exists. Every process calls this: the training
    state and, under FSDP, the whole weights are collectives."""
    accelerator = run.accelerator
    if not all_finite(run):
        refuse_non_finite(run, 'the weights are not finite')
    final = run.run_dir / rundir.checkpoint_name(run.state.epoch, run.state.step)
    tmp = run.run_dir / f'.{final.name}.tmp'  # one name every process knows
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with rundir.writing(final):  # a full disk: one line, not safetensors' or torch's own error
            accelerator.save_state(str(tmp / rundir.TRAINING_STATE_DIR))
            weights = accelerator.get_state_dict(run.prepared)  # unsharded on the main process (FSDP: FULL_STATE_DICT)
            if accelerator.is_main_process:
                rundir.write_model_files(run.model, tmp, run.model_args, run.data_config, weights, run.model_source)
                extra = run.task.state_dict()
                if extra:
                    save_file({k: v.detach().contiguous() for k, v in extra.items()},
                              str(tmp / rundir.EXTRA_WEIGHTS_FILE))
                run.state.save(tmp)  # last: it makes the folder a checkpoint
                rundir.apply_umask(tmp)
                rundir.replace_dir(tmp, final)
                for old in rundir.complete_checkpoints(run.run_dir)[:-keep]:
                    shutil.rmtree(old)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves nothing half-written behind
        raise
    accelerator.wait_for_everyone()
    return final
