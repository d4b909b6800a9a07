"""Fast training settings of the trainer and the benchmarks: torch.compile with a fallback, fused optimizers,
and the CPU threads a run gets (said once, with a warning where they fit the machine badly).

bf16 autocast and channels-last need nothing of their own (Accelerate's ``mixed_precision`` and
``model.to(memory_format=...)``); these two do, because each can be unavailable on a given machine:
``torch.compile`` needs a working compiler toolchain and compiles lazily, at the first call, so a
``try`` around ``torch.compile(model)`` alone never sees the failure; a fused optimizer step exists only
for some of PyTorch's optimizers, not for timm's own (LAMB, LARS, ...).
"""
import logging
import os
from typing import Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)


def _is_compile_error(err: BaseException) -> bool:
    # dynamo's and inductor's failures (unsupported code, backend or toolchain errors) derive from
    # TorchDynamoException; any other error (a shape mismatch, out of memory) is the model's and is raised
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # a torch without dynamo: nothing here is a compile error
        return False
    return isinstance(err, TorchDynamoException)


class CompiledWithFallback:
    """Calls ``torch.compile(module)``; if compiling fails (at any call: recompiles happen for new shapes),
    warns once and runs the eager ``module`` from then on. The eager module is the one that holds the
    parameters, so optimizers, checkpoints and DDP wrappers see no difference.

    A failure inside a graph break may come after an earlier subgraph ran (e.g. updated BatchNorm
    statistics once); the call is then repeated eagerly, which is harmless for training.
    """

    def __init__(self, module: nn.Module, backend: str = 'inductor', mode: Optional[str] = None):
        self.module = module
        self.compiled = None
        self.fallback_reason = ''
        try:
            self.compiled = torch.compile(module, backend=backend, mode=mode)
        except Exception as e:  # noqa: BLE001  an unknown backend or mode is refused here already
            self._fall_back(e)

    def _fall_back(self, err: BaseException):
        self.compiled = None
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        self.fallback_reason = ' '.join(lines[:2]) or type(err).__name__
        _logger.warning(f'torch.compile unavailable ({type(err).__name__}: {self.fallback_reason}); '
                        f'training uncompiled')

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if not _is_compile_error(e):
                    raise
                self._fall_back(e)
        return self.module(*args, **kwargs)


def create_optimizer(model_or_params, opt: str, fused: Optional[bool], device: torch.device, **kwargs):
    """``timm.optim.create_optimizer_v2`` with PyTorch's fused step where the optimizer has one.

    ``fused``: True = required (error if ``opt`` has none), False = never, None = where available on a
    CUDA device (PyTorch's fused SGD / Adam / AdamW run one kernel for all parameters; on the CPU they
    exist too but gain little). Returns ``(optimizer, fused_used)``.
    """
    import timm.optim
    refuse_unused_optimizer_args(opt, kwargs)
    want = fused if fused is not None else torch.device(device).type == 'cuda'
    if want:
        try:
            optimizer = timm.optim.create_optimizer_v2(model_or_params, opt=opt, fused=True, **kwargs)
        except TypeError as e:  # the optimizer class takes no `fused` argument
            if fused:
                raise ValueError(f'--fused-opt: optimizer {opt!r} has no fused implementation ({e})') from e
        else:
            return optimizer, True
    try:
        optimizer = timm.optim.create_optimizer_v2(model_or_params, opt=opt, **kwargs)
    except TypeError as e:  # an argument the optimizer class does not take (--opt-betas, --opt-eps, --opt-kwargs)
        raise ValueError(f'optimizer {opt!r}: {e}') from e
    return optimizer, False


def optimizer_from_settings(model, optim, device: torch.device):
    """The run's optimizer from its :class:`~timm_mimo.train.settings.OptimSettings`: :func:`create_optimizer`
    with every create_optimizer_v2 argument the settings hold. Returns ``(optimizer, fused_used)``."""
    return create_optimizer(model, optim.opt, optim.fused, device, lr=optim.lr, weight_decay=optim.weight_decay,
                            momentum=optim.momentum, filter_bias_and_bn=not optim.decay_all,
                            layer_decay=optim.layer_decay, **optim.optimizer_kwargs())


def refuse_unused_optimizer_args(opt: str, kwargs: dict):
    """timm drops betas and eps that ``opt`` does not take, without a word: a flag that would do nothing is
    refused instead, as are betas of the wrong count."""
    import timm.optim
    info = timm.optim.get_optimizer_info(opt.lower().split('_')[-1])  # 'lookahead_adamw': AdamW's
    for key, has in (('betas', info.has_betas), ('eps', info.has_eps)):
        if kwargs.get(key) is not None and not has:
            raise ValueError(f'--opt-{key}: optimizer {opt!r} takes no {key}')
    betas = kwargs.get('betas')
    if betas is not None and len(betas) != info.num_betas:
        raise ValueError(f'--opt-betas: optimizer {opt!r} takes {info.num_betas} betas, got {len(betas)}')


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
