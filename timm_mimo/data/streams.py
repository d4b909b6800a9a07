"""Streamed data sets (``wds/`` webdataset shards, ``hfids/`` Hugging Face streaming, ``tfds/``), read by timm's
iterable readers with the arguments timm's train.py gives them.

The training stream is sharded by timm's reader across processes (torch.distributed) and DataLoader workers
(``set_loader_cfg``) and shuffled by (seed, epoch); each worker yields ``ceil(N / readers)`` samples rounded up to
whole batches, so that every process takes the same number of steps. An epoch sees every sample once and none
twice exactly when the shards divide evenly among the readers (checked where the layout is known, warned
otherwise). Evaluation streams are read whole by every process (no sharding, no padding: exact counts).
"""
import importlib.util
import logging
from pathlib import Path
from typing import Optional

from .factory import create_dataset

__all__ = ['STREAM_PREFIXES', 'MissingSplit', 'is_stream', 'create_stream', 'check_stream_coverage']

_logger = logging.getLogger(__name__)

STREAM_PREFIXES = ('wds/', 'hfids/', 'tfds/')


class MissingSplit(ValueError):
    """The stream has no split of that name."""


def is_stream(name: str) -> bool:
    """Whether timm reads the data set ``name`` as an iterable (streamed) one; its prefix is case-insensitive."""
    return str(name).lower().startswith(STREAM_PREFIXES)


def _check_wds_shards(root, split: str, flag: str):
    """A local shard pattern (``train-{0000..0099}.tar|N``) whose shards do not all exist: a ValueError now,
    rather than a stream that yields nothing (timm's reader only warns per missing shard, and the epoch never
    fills). Remote patterns (``pipe:``, URLs) are left to webdataset."""
    if root is None or '://' in str(root) or str(root).startswith('pipe:'):
        return
    if not Path(root).is_dir():
        raise FileNotFoundError(f'wds/: the shard folder {root} (--data-dir) does not exist')
    if not ('tar' in split or '..' in split):
        return  # a split name, looked up in the folder's _info.json by timm's reader
    from webdataset.shardlists import expand_urls
    shards = expand_urls(split.split('|')[0])
    missing = [name for name in shards if not (Path(root) / name).is_file()]
    if len(missing) == len(shards):
        raise FileNotFoundError(f'{flag} {split}: no shard of the pattern exists in {root}')
    if missing:
        raise FileNotFoundError(f'{flag} {split}: {len(missing)} of its {len(shards)} shards are missing in {root} '
                                f'(first: {missing[0]})')


def _require_tfds():
    """tfds/ is an optional extra: without TensorFlow Datasets timm's reader prints two lines on import and fails
    on the next; one error line instead."""
    missing = [module for module in ('tensorflow', 'tensorflow_datasets') if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f'tfds/ data sets need TensorFlow Datasets, an optional extra not installed here (missing: '
                          f'{", ".join(missing)}): pip install tensorflow tensorflow-datasets (tfds/ is untested in '
                          f'this project; wds/ and hfids/ are the tested streams)')


def _check_hfids_split(dataset, split: str, flag: str):
    """A split the builder does not list: a ValueError now (streaming would only fail when first iterated)."""
    builder = dataset.reader.builder
    known = set(builder.info.splits or {}) | set(getattr(builder.config, 'data_files', None) or {})
    if known and split.split('[')[0] not in known:
        raise MissingSplit(f'{flag} {split}: {dataset.reader.name} has no such split (it has {", ".join(sorted(known))})')


def create_stream(name: str, root, split: str, flag: str, *, is_training: bool, download: bool = False,
                  class_map=None, num_samples: Optional[int] = None, batch_size: int = 1, seed: int = 42,
                  transform=None):
    """One split of a streamed data set, as timm's train.py creates it (``is_training``: shuffled by (seed, epoch),
    ``batch_size`` samples per worker batch, ``num_samples`` for a stream whose length the library does not
    know). An evaluation split is not sharded across processes (every process reads it whole). ``flag`` names
    the command-line flag of ``split`` in error messages."""
    name_flag = '--train-num-samples' if is_training else '--val-num-samples'
    if name.lower().startswith('tfds/'):
        _require_tfds()
    if name.lower().startswith('wds/'):
        _check_wds_shards(root, split, flag)
    try:
        stream = create_dataset(name, root, split=split, is_training=is_training, download=download,
                                class_map=class_map or None, num_samples=num_samples, batch_size=batch_size,
                                seed=seed, repeats=0, transform=transform)
    except (RuntimeError, ValueError) as e:
        text = ' '.join(str(e).split())
        if 'num_samples' in text or 'length is unknown' in text.lower():
            raise ValueError(f'{flag} {split}: the number of samples of {name} is unknown: give {name_flag} N (or, for '
                             f'wds/, end the shard pattern with |N)') from None
        if 'not found in info' in text:
            raise MissingSplit(f'{flag} {split}: no such split in {root}/_info.json; give a shard pattern such as '
                             f'"train-{{0000..0009}}.tar|N"') from None
        raise ValueError(f'{flag} {split}: cannot read {name}: {text}') from None
    except (ConnectionError, FileNotFoundError) as e:  # an offline Hub name absent from the local cache
        raise FileNotFoundError(f'cannot read {name} (split {split}): {" ".join(str(e).split())} (offline, the name '
                                f'must be in the datasets cache under --data-dir, or be a local folder of data '
                                f'files)') from None
    if name.lower().startswith('hfids/'):
        _check_hfids_split(stream, split, flag)
    if not is_training:
        # read whole by every process: sharded evaluation would pad or drop samples to keep processes in step
        stream.reader.dist_rank, stream.reader.dist_num_replicas = 0, 1
    return stream


def check_stream_coverage(stream, workers: int):
    """Warn where an epoch of the training ``stream`` will not see each sample exactly once: padding to equal
    whole batches per reader (process x worker), or wds shards that do not divide among the readers."""
    reader = stream.reader
    stream.set_loader_cfg(num_workers=workers)
    readers = reader.global_num_workers
    per_epoch = len(stream) * reader.dist_num_replicas
    filenames = getattr(getattr(reader, 'split_info', None), 'filenames', None)
    if filenames is not None and len(filenames) % readers:
        _logger.warning(f'data: {len(filenames)} shards do not divide among {readers} readers (processes x workers): '
                        f'each epoch some samples repeat and others are skipped; use a shard count divisible by it')
    if per_epoch != reader.num_samples:
        _logger.warning(f'data: an epoch takes {per_epoch} samples of the {reader.num_samples} in the stream (whole '
                        f'batches of every one of {readers} readers): some repeat each epoch')
    return readers

