"""One loader protocol for the training loop, whether the data sits on the device or comes from a DataLoader.

Training: ``len(loader)`` is the number of micro-batches of this process per epoch, ``set_epoch(e)`` fixes the
epoch's order and ``batches(start)`` yields ``(images, labels)`` from micro-batch ``start`` on (a resumed epoch
continues where it stopped). Evaluation: an :class:`EvalSplit`, whose ``accelerator`` gathers the processes'
shares, or is None when every process scores the whole split (device-resident data).
"""
import logging
from itertools import islice
from typing import NamedTuple, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .device_loader import default_cache_dir, device_loader_for
from .streams import check_stream_coverage

_logger = logging.getLogger(__name__)


class EvalSplit(NamedTuple):
    loader: object
    accelerator: object = None  # gathers the processes' predictions; None: each process has the whole split


class PreparedTrainLoader:
    """An Accelerate-prepared DataLoader behind the device loader's interface (Accelerate's seedable sampler
    orders each epoch, ``skip_first_batches`` resumes mid-epoch)."""

    def __init__(self, loader, accelerator):
        self.loader, self.accelerator = loader, accelerator

    def __len__(self) -> int:
        return len(self.loader)  # per process, once prepared

    def set_epoch(self, epoch: int):
        self.loader.set_epoch(epoch)  # the sampler's order, and the dataset's epoch (MemberCopies' draws)

    def batches(self, start_batch: int = 0):
        return iter(self.accelerator.skip_first_batches(self.loader, start_batch) if start_batch else self.loader)


class OnDevice:
    """A DataLoader whose batches are moved to ``device`` (a loader Accelerate does not prepare)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class StreamTrainLoader(OnDevice):
    """A timm streamed training set (wds/, hfids/, tfds/) behind the device loader's interface. Not prepared by
    Accelerate: its dispatcher would read the stream in one process, where timm's reader shards it by process
    and worker itself. An epoch's order depends on (seed, epoch) alone, so a resumed epoch replays it and skips
    the batches already trained on."""

    def __init__(self, stream, batch_size: int, workers: int, device, seed: int):
        self.stream, self.seed, self.workers = stream, seed, workers
        # the loader's generator seeds the workers, whose seed drives the reader's sample shuffle buffer
        self.generator = torch.Generator()
        super().__init__(DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=True,
                                    pin_memory=device.type == 'cuda', generator=self.generator), device)

    def set_epoch(self, epoch: int):
        self.stream.set_epoch(epoch)
        if hasattr(self.stream.transform, 'set_epoch'):
            self.stream.transform.set_epoch(epoch)  # per-copy transforms (StreamCopies): their draws follow the epoch
        self.generator.manual_seed(self.seed * 100_003 + epoch)
        if self.workers == 0:
            # read in this process, the reader keeps its pipeline (and its shuffle buffer's random state) from
            # epoch to epoch; rebuilt, the epoch's order is that of (seed, epoch) alone, as with workers
            self.stream.reader.ds = None

    def batches(self, start_batch: int = 0):
        return islice(iter(self), start_batch, None)


def _stream_loaders(splits, accelerator, unique_per_process: int, eval_batch: int, seed: int, workers: int):
    readers = check_stream_coverage(splits.train, workers)
    _logger.info(f'data: {splits.train.reader.__class__.__name__} stream sharded across {readers} reader(s) '
                 f'({accelerator.num_processes} process(es) x {max(workers, 1)} worker(s)); evaluation splits read '
                 f'whole by every process')
    device = accelerator.device
    train = StreamTrainLoader(splits.train, unique_per_process, workers, device, seed)
    evals = []
    for split in (splits.validation, splits.test):
        if split is not None:
            split.set_loader_cfg(num_workers=workers)
        evals.append(EvalSplit(OnDevice(DataLoader(split, batch_size=eval_batch, num_workers=workers), device))
                     if split is not None else None)
    return train, evals[0], evals[1], False


def _device_loaders(splits, accelerator, unique_per_process: int, eval_batch: int, seed: int, cache_dir):
    """Device-resident loaders for the three splits, or ``(None, why not)``. The training split is sharded by
    process and shuffled by (seed, epoch); one process decodes and caches, the others read the cache."""
    loaders = []
    common = (accelerator.device, splits.mean, splits.std, splits.img_size, cache_dir or default_cache_dir())
    with accelerator.main_process_first():
        train, why_not = device_loader_for(splits.train, unique_per_process, *common, seed=seed,
                                           num_replicas=accelerator.num_processes, rank=accelerator.process_index)
        loaders.append(train)
        for split in (splits.validation, splits.test):
            if why_not or split is None:
                loaders.append(None)
                continue
            loader, why_not = device_loader_for(split, eval_batch, *common, shuffle=False)
            loaders.append(loader)
    return (None, why_not) if why_not else (loaders, '')


def build_loaders(splits, accelerator, unique_per_process: int, eval_batch: int, *, seed: int,
                  device_data: str = 'auto', per_image_transform: str = '', workers: int = 0,
                  cache_dir: Optional[str] = None) -> Tuple[object, EvalSplit, Optional[EvalSplit], bool]:
    """(train loader, validation, test or None, on_device) for ``splits``.

    ``device_data``: 'auto' keeps the decoded splits on the device when they have an array form, 'on' requires
    it, 'off' never. ``per_image_transform``: why the training images need a per-image transform (``--aa``),
    which only the DataLoader path applies.
    """
    if splits.iterable:
        if device_data == 'on':
            raise ValueError(f'--device-data on: {splits.description} is a stream: it cannot be kept on the device')
        return _stream_loaders(splits, accelerator, unique_per_process, eval_batch, seed, workers)
    why_not = per_image_transform or ('--device-data off' if device_data == 'off' else '')
    if not why_not:
        loaders, why_not = _device_loaders(splits, accelerator, unique_per_process, eval_batch, seed, cache_dir)
        if loaders is not None:
            train, val, test = loaders
            _logger.info(f'data: decoded splits on {accelerator.device} ({train.images.numel() / 2 ** 20:.0f} MiB of '
                         f'training pixels, {train.images.dtype}), batched there')
            return train, EvalSplit(val), EvalSplit(test) if test is not None else None, True
    if device_data == 'on':
        raise ValueError(f'--device-data on: {splits.description} cannot be kept on the device: {why_not}')
    _logger.info(f'data: per-image DataLoader ({why_not})')
    pin = accelerator.device.type == 'cuda'
    train = DataLoader(splits.train, batch_size=unique_per_process, shuffle=True, drop_last=True,
                       num_workers=workers, pin_memory=pin)
    evals = [DataLoader(s, batch_size=eval_batch, num_workers=workers, pin_memory=pin) if s is not None else None
             for s in (splits.validation, splits.test)]
    train, *evals = accelerator.prepare(train, *[e for e in evals if e is not None])
    val, test = evals[0], (evals[1] if len(evals) > 1 else None)
    return (PreparedTrainLoader(train, accelerator), EvalSplit(val, accelerator),
            EvalSplit(test, accelerator) if test is not None else None, False)
