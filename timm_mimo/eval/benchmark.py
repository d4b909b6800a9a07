"""Timing helpers shared by the scripts of ``bench/``: the machine's description, synchronised timing, and
the inference and training steps that the MixMo-vs-vanilla and MFU benchmarks measure."""
import os
import platform
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import timm


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {
        'cpu': cpu_name(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'timm_mimo': _version(),
        'python': platform.python_version(),
        'device': str(device),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
        info['cudnn'] = torch.backends.cudnn.version()
    return info


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None]) -> List[float]:
    """Seconds per call of ``fn``, one sample per call, synchronised on CUDA before and after each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def to_input_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """channels_last for (B, C, H, W); for member inputs (B, M, C, H, W) the layout (B, H, W, M, C), so that
    the stem's ``flatten(1, 2)`` to (B, M * C, H, W) is a channels_last view without a copy."""
    if not channels_last:
        return x.contiguous()
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)



def _version() -> str:
    from .. import __version__
    return __version__


class InferenceBench:
    """(a) eval-mode ``model(x)`` on one (B, 3, H, W) batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, autocast):
        self.model, self.x, self.autocast = model, x, autocast

    def step(self):
        with torch.inference_mode(), self.autocast():
            return self.model(self.x)

    def prepare(self):
        self.model.eval()


class TrainBench:
    """(b) one SGD training step (learning rate ``lr``, MixMo's momentum and weight decay) on a fixed, pre-built
    batch."""

    def __init__(self, model: nn.Module, inputs, masks, targets, loss_fn, lr: float, autocast, scaler):
        self.model, self.inputs, self.masks, self.targets = model, inputs, masks, targets
        self.loss_fn, self.autocast, self.scaler = loss_fn, autocast, scaler
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def prepare(self):
        self.model.train()

    def step(self):
        with self.autocast():
            out = self.model(self.inputs) if self.masks is None else self.model(self.inputs, self.masks)
            loss = self.loss_fn(out.float(), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss
