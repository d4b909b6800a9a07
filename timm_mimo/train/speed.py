"""Fast training settings of the trainer and the benchmarks: torch.compile with a fallback, fused optimizers.

bf16 autocast and channels-last need nothing of their own (Accelerate's ``mixed_precision`` and
``model.to(memory_format=...)``); these two do, because each can be unavailable on a given machine:
``torch.compile`` needs a working compiler toolchain and compiles lazily, at the first call, so a
``try`` around ``torch.compile(model)`` alone never sees the failure; a fused optimizer step exists only
for some of PyTorch's optimizers, not for timm's own (LAMB, LARS, ...).
"""
import logging
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
    want = fused if fused is not None else torch.device(device).type == 'cuda'
    if want:
        try:
            optimizer = timm.optim.create_optimizer_v2(model_or_params, opt=opt, fused=True, **kwargs)
        except TypeError as e:  # the optimizer class takes no `fused` argument
            if fused:
                raise ValueError(f'--fused-opt: optimizer {opt!r} has no fused implementation ({e})') from e
        else:
            return optimizer, True
    optimizer = timm.optim.create_optimizer_v2(model_or_params, opt=opt, **kwargs)
    return optimizer, False

