"""The run folder: everything ``train.py`` writes and ``validate.py`` and ``hub/`` read back, in one place.

    <run>/args.yaml                  the arguments of the run (``train.py -c`` reads it back)
    <run>/summary.csv                one row per epoch
    <run>/results.json               the final evaluation (best and last epochs, validation and test)
    <run>/best/, <run>/ema/          model folders: model.safetensors + config.json (timm's Hub format)
    <run>/checkpoint-NNNN[-stepSSSSSS]/  a model folder + trainer_state.json + state/ (Accelerate's)
    <run>/.lock                      held (flock) by the train.py that writes the folder

Every file is written under a temporary name and renamed into place, every folder is written as a
temporary sibling and swapped in, so what carries a final name is complete. A checkpoint counts only when
its name is exactly ``checkpoint-NNNN[-stepSSSSSS]`` and it holds its weights, training state and a
readable trainer state: a half-written or renamed-by-hand folder cannot meet that rule.
"""
import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Union

import torch.nn as nn
import yaml

ARGS_FILE = 'args.yaml'
SUMMARY_FILE = 'summary.csv'
RESULTS_FILE = 'results.json'
BEST_DIR = 'best'
EMA_DIR = 'ema'
LOCK_FILE = '.lock'
MIXED_SAMPLES_DIR = 'mixed_samples'
MIXBLOCK_FILE = 'mixblock.safetensors'
RESUMES_FILE = 'resumes.yaml'  # recipe arguments changed on --resume, with the checkpoint they applied from
# inside a checkpoint or model folder
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.json'
STATE_FILE = 'trainer_state.json'
TRAINING_STATE_DIR = 'state'
EXTRA_WEIGHTS_FILE = 'task.safetensors'  # the task's own models (EMA, momentum encoder): never pickled

CHECKPOINT_RE = re.compile(r'checkpoint-(\d{4,})(?:-step(\d{6,}))?')


def _leftover_re(name_pattern: str) -> re.Pattern:
    """What an interrupted write (``.NAME.tmp-*``) or swap (``NAME.old``) of ``name_pattern`` leaves behind."""
    return re.compile(rf'\.{name_pattern}\.tmp(-.*)?|{name_pattern}\.old')


# what an interrupted write or swap of any name leaves behind (removed when the run resumes)
LEFTOVER_RE = _leftover_re('.+')
_FILE_KINDS = ((stat.S_ISLNK, 'a symbolic link'), (stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a named pipe'),
               (stat.S_ISCHR, 'a device'), (stat.S_ISBLK, 'a device'), (stat.S_ISSOCK, 'a socket'))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path):
    """The permissions of a normally created file or folder (mkstemp / mkdtemp make them owner-only)."""
    mask = _umask()
    paths = [path] + (list(path.rglob('*')) if path.is_dir() else [])
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def refuse_to_replace(path: Union[str, Path], folder: bool = False):
    """Only regular files (folders, for a folder) are ever written over: renaming onto a link, a device
    (``/dev/full``) or a pipe would destroy what that name stands for, so such a name is refused, whatever
    ``--overwrite`` says."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a path under a file fails at the write)
        return
    if folder and stat.S_ISDIR(mode):
        return
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), 'a regular file' if folder else None)
    if kind is not None:
        raise FileExistsError(f'{path} exists and is {kind}, not a {"folder" if folder else "regular file"}: '
                              f'refusing to write over it')


def check_regular_file_inside(path: Union[str, Path], folder: Union[str, Path], action: str = 'copy'):
    """A file the scripts copy or upload from a folder: a regular file whose real path lies inside that folder,
    never a link (it could point at any file of the machine), a device or a pipe."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or Path(folder).resolve() not in path.resolve().parents:
        raise ValueError(f'{path} is not a regular file inside {folder}: refusing to {action} it')


def write_atomic(path: Union[str, Path], data: Union[str, bytes]):
    """Write ``data`` to a temporary file next to ``path``, then rename it into place (over a regular file only)."""
    path = Path(path)
    refuse_to_replace(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Union[str, Path], obj):
    write_atomic(path, json.dumps(obj, indent=2))


def write_csv_atomic(path: Union[str, Path], rows: Iterable[dict]):
    """Dict rows (header = union of their keys) written atomically."""
    rows = list(rows)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def read_csv(path: Path) -> List[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def replace_dir(tmp_dir: Path, final_dir: Path):
    """Move a fully written folder into place; an existing one is swapped out first, then deleted."""
    refuse_to_replace(final_dir, folder=True)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def writing(what: Path):
    """A failed write of ``what`` as one ``OSError`` naming it and the space left: safetensors and torch report
    a full disk as errors of their own (``SafetensorError``; ``RuntimeError: basic_ios::clear``)."""
    from safetensors import SafetensorError
    try:
        yield
    except (SafetensorError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        free = shutil.disk_usage(next(p for p in Path(what).parents if p.exists())).free
        raise OSError(f'cannot write {what}: {reason} ({free / 2 ** 20:.1f} MiB free on its disk)') from e


@contextlib.contextmanager
def atomic_dir(final_dir: Union[str, Path]):
    """Yield a temporary sibling of ``final_dir`` to fill; on success it replaces ``final_dir``, on any
    failure (a full disk included) it is removed, so nothing half-written is left under either name."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final_dir.name}.tmp-', dir=final_dir.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(folder: Path, name: Optional[str] = None) -> List[str]:
    """Delete what interrupted writes and swaps left in ``folder`` (temporary and ``.old`` names only); with
    ``name``, only those of the file or folder ``name`` (an export's, in a folder that may hold others)."""
    pattern = LEFTOVER_RE if name is None else _leftover_re(re.escape(name))
    removed = []
    for path in Path(folder).iterdir():
        if pattern.fullmatch(path.name) and path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    return removed


# ------------------------------------------------------------------------------------------------------
# model folders (timm's Hub format) and checkpoints

def save_model_folder(model: nn.Module, folder: Path, model_args: dict, data_config: Optional[dict] = None,
                      state_dict: Optional[dict] = None, metrics: Optional[dict] = None,
                      model_source: Optional[dict] = None):
    """``model.safetensors`` + ``config.json`` written by timm's ``save_for_hf``, atomically.

    ``state_dict``: the weights to write when ``model.state_dict()`` is not them (FSDP: the gathered
    weights of ``accelerator.get_state_dict``). ``data_config``: the preprocessing the weights were trained with.
    ``model_source``: what the run started from (a Hub id and commit, a folder), config.json's ``model_source``.
    """
    with atomic_dir(folder) as tmp, writing(folder):
        write_model_files(model, tmp, model_args, data_config, state_dict, model_source)
        if metrics:
            write_json_atomic(tmp / METRICS_FILE, metrics)


def write_model_files(model: nn.Module, folder: Path, model_args: dict, data_config: Optional[dict] = None,
                      state_dict: Optional[dict] = None, model_source: Optional[dict] = None):
    from timm.models import save_for_hf
    weights = model.state_dict() if state_dict is None else state_dict
    # safetensors refuses non-contiguous tensors (channels-last kernels): timm's save_for_hf reads
    # model.state_dict(), so for the duration of the call it returns contiguous copies of these weights
    contiguous = {k: v.detach().contiguous() for k, v in weights.items()}
    model.state_dict = lambda *args, **kwargs: contiguous
    try:
        save_for_hf(model, str(folder), model_args=model_args, data_config=data_config, safe_serialization=True,
                    model_config={MODEL_SOURCE_KEY: model_source} if model_source else None)
    finally:
        del model.state_dict


# config.json's record of what a fine-tuned model started from (models.factory.SourcedModel.record); timm ignores it
MODEL_SOURCE_KEY = 'model_source'
_INPUT_SIZE_KEYS = ('input_size', 'test_input_size', 'min_input_size')


def read_model_config(folder: Path) -> dict:
    """A model folder's ``config.json``, checked for what timm's ``local-dir:`` reads from it (a registered
    ``architecture``, a ``model_args`` mapping, a ``pretrained_cfg`` mapping with positive input sizes):
    a hand-edited field is an error naming it, not a traceback from deep inside timm."""
    import timm
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f'no {CONFIG_FILE} in {folder}: not a model folder')
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not a valid config file: {e}') from e
    if not isinstance(config, dict):
        raise ValueError(f'{config_path} is not a valid config file: a {type(config).__name__}, not a mapping')
    architecture = config.get('architecture')
    if architecture is not None and not isinstance(architecture, str):
        raise ValueError(f'{config_path}: architecture is a {type(architecture).__name__}, not a model name')
    if not architecture or not timm.is_model(architecture):
        raise ValueError(
            f'unknown architecture {architecture!r} in {config_path}: not in timm\'s registry (timm_mimo '
            f'models are registered by "import timm_mimo" before timm.create_model)')
    for key in ('model_args', 'pretrained_cfg'):
        if key in config and not isinstance(config[key], dict):
            raise ValueError(f'{config_path}: {key} is a {type(config[key]).__name__}, not a mapping')
    cfg = config.get('pretrained_cfg', config)  # timm's legacy format: one mapping, the cfg itself
    for key in _INPUT_SIZE_KEYS:
        size = cfg.get(key)
        if size is not None and not (isinstance(size, list) and len(size) == 3 and all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
            raise ValueError(f'{config_path}: {key} {size!r} is not [channels, height, width] of positive integers')
    return config


def load_model_folder(folder: Path, **kwargs) -> nn.Module:
    """A model folder (ours or any timm Hub-format folder): built from ``config.json`` as timm's ``local-dir:``
    does, weights read with safetensors. ``kwargs`` override the saved model arguments."""
    import timm
    from .models.weights import load_weights
    folder = Path(folder)
    read_model_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f'no {WEIGHTS_FILE} in {folder}')
    try:
        model = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=False, **kwargs)
    except RuntimeError as e:  # timm's, e.g. an architecture it cannot build from this config
        raise ValueError(f'cannot build the model of {folder}: {str(e).strip().splitlines()[0]}') from e
    load_weights(model, weights)
    return model


def checkpoint_name(epoch: int, step: int) -> str:
    return f'checkpoint-{epoch:04d}' + (f'-step{step:06d}' if step else '')


def read_trainer_state(checkpoint: Path) -> Optional[dict]:
    """The trainer state of a complete checkpoint folder, else None. A complete one whose epoch or step is not
    a count (a hand-edited file) is refused, named: training from it would skip or repeat epochs."""
    checkpoint = Path(checkpoint)
    if not (CHECKPOINT_RE.fullmatch(checkpoint.name) and checkpoint.is_dir() and (checkpoint / WEIGHTS_FILE).is_file()
            and (checkpoint / TRAINING_STATE_DIR).is_dir()):
        return None
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(state, dict) and {'epoch', 'step'} <= set(state)):
        return None
    for key in ('epoch', 'step'):
        check_count(state[key], checkpoint / STATE_FILE, key)
    return state


def check_count(value, path: Path, key: str, below: Optional[int] = None, what: str = ''):
    """Refuse a ``key`` of the file ``path`` that is not an integer in [0, ``below``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (below is not None and value >= below):
        bound = f' and < {below}{what}' if below is not None else ''
        raise ValueError(f'{path}: {key} must be an integer >= 0{bound}, got {value!r} (a damaged or edited file)')


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """The complete checkpoints of a run, oldest first by training progress."""
    found = []
    for path in Path(run_dir).glob('checkpoint-*'):
        state = read_trainer_state(path)
        if state is not None:
            found.append(((state['epoch'], state['step']), path))
    return [p for _, p in sorted(found)]


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ARGS_FILE).is_file()


TRACKERS_DIR = 'trackers'  # the experiment trackers' files (timm_mimo.train.trackers)
# what a run writes before its first checkpoint: a folder holding only these (and leftovers) is started again
STUB_ENTRIES = {ARGS_FILE, LOCK_FILE, MIXED_SAMPLES_DIR, TRACKERS_DIR}


def is_stub(run_dir: Path) -> bool:
    """Whether a folder holds nothing worth keeping: what a run that stopped before its first checkpoint
    leaves (arguments, lock, pictures, logs), or nothing. Any other file (a user's too) makes it a run."""
    return all(p.name in STUB_ENTRIES or LEFTOVER_RE.fullmatch(p.name) for p in Path(run_dir).iterdir())


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid YAML: {str(e).splitlines()[0]}') from e


def read_args(run_dir: Path) -> dict:
    path = Path(run_dir) / ARGS_FILE
    args = _read_yaml(path) if path.exists() else None
    return args if isinstance(args, dict) else {}


def read_resumes(run_dir: Path) -> List[dict]:
    """The run's resumes (``[{'from': checkpoint name, 'changes': [...]}, ...]``); a damaged record is an error
    naming it, not an empty one: a card would otherwise claim that the first arguments alone trained the run."""
    path = Path(run_dir) / RESUMES_FILE
    entries = _read_yaml(path) if path.exists() else None
    entries = [] if entries is None else entries  # no file, or an empty one: no resume
    if not isinstance(entries, list):
        raise ValueError(f'{path} is not a list of resumes (the record of train.py --resume)')
    for index, entry in enumerate(entries):
        changes = entry.get('changes') if isinstance(entry, dict) else None
        if not (isinstance(changes, list) and isinstance(entry.get('from'), str)  # a list: entry is a mapping
                and all(isinstance(change, str) for change in changes)):
            raise ValueError(f'{path}: resume {index + 1} is not {{from: <checkpoint>, changes: [<flag change>, ...]}}')
    return entries


def record_resume(run_dir: Path, checkpoint: Path, changes: List[str]):
    """Append the recipe changes of a resume to the run's record, so that its card does not claim the first
    arguments alone trained it."""
    entries = read_resumes(run_dir) + [{'from': Path(checkpoint).name, 'changes': changes}]
    write_atomic(Path(run_dir) / RESUMES_FILE, yaml.safe_dump(entries, sort_keys=False))


class RunLock:
    """An exclusive lock on a run folder, held while one train.py writes it. The kernel releases a flock
    when its process dies, however it dies, so a SIGKILLed run stays resumable."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, 'a+')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or '?'
                f.close()
                raise FileExistsError(f'{self.path.parent} is in use by another train.py (pid {holder}): wait for '
                                      f'it, or choose another --output/--experiment') from None
            # a holder removes the file as it releases it: a lock taken on a removed file guards nothing
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self):
        """Remove the lock file, then unlock: only the holder removes it, so another run's lock never goes."""
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino:
                    os.unlink(self.path)
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------------------
# reading a run back: a source (run folder, checkpoint, model folder, weights file) -> weights

@dataclass
class Checkpoint:
    """Weights and their context. ``which``: best / last / ema (of a run), checkpoint, folder, or file."""
    weights: Path
    which: str
    run_dir: Optional[Path] = None
    epoch: Optional[int] = None  # completed epochs, for checkpoint folders at an epoch's end

    @property
    def run_args(self) -> dict:
        return read_args(self.run_dir) if self.run_dir is not None else {}

    @property
    def resumes(self) -> list:
        """The recipe changes made on --resume (``[{'from': checkpoint, 'changes': [...]}, ...]``)."""
        return read_resumes(self.run_dir) if self.run_dir is not None else []


def resolve(source, which: str = 'best') -> Checkpoint:
    """A training folder (its ``which`` weights: best, last, ema), a checkpoint or model folder, or a file."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if is_run_dir(path):
        if which == 'last':
            found = complete_checkpoints(path)
            if not found:
                raise FileNotFoundError(f'no complete checkpoint in {path}')
            return Checkpoint(found[-1], 'last', path)
        if not (path / which / CONFIG_FILE).exists():
            raise FileNotFoundError(f'{path} has no {which}/ model folder' +
                                    (' (train with --model-ema)' if which == EMA_DIR else ''))
        return Checkpoint(path / which, which, path)
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f'{path} is neither a training folder ({ARGS_FILE}) nor a model folder '
                                    f'({CONFIG_FILE})')
        run_dir = path.parent if is_run_dir(path.parent) else None
        state = read_trainer_state(path)
        if state is not None:
            return Checkpoint(path, 'checkpoint', run_dir, state['epoch'] if not state['step'] else None)
        if run_dir is not None and path.name in (BEST_DIR, EMA_DIR):
            return Checkpoint(path, path.name, run_dir)
        return Checkpoint(path, 'folder', run_dir)
    return Checkpoint(path, 'file')


def load_model(checkpoint: Checkpoint, model_name: Optional[str] = None, **kwargs) -> nn.Module:
    """The model of ``checkpoint``, weights read safely; ``model_name`` / ``num_classes`` must agree with it."""
    import timm
    from timm.models import split_model_name_tag
    from .models.weights import load_weights
    from .models.factory import read_model_source
    num_classes = kwargs.get('num_classes')
    # a registered name, or a hf-hub: / local-dir: one (its config.json names the architecture); else one line
    sourced = read_model_source(model_name) if model_name else None
    if checkpoint.which == 'file':
        if not model_name:
            raise ValueError(f'{checkpoint.weights} is a weights file: name its architecture with --model')
        model = timm.create_model(model_name, **kwargs)
        load_weights(model, checkpoint.weights)
        return model
    model = load_model_folder(checkpoint.weights, **{k: v for k, v in kwargs.items() if k != 'num_classes'})
    arch = model.pretrained_cfg.get('architecture')
    named = sourced.architecture if sourced is not None else split_model_name_tag(model_name or '')[0]
    if model_name and named != arch:
        raise ValueError(f'{checkpoint.weights} holds a {arch}, not a {named}')
    if num_classes is not None and num_classes != model.num_classes:
        raise ValueError(f'{checkpoint.weights} predicts {model.num_classes} classes, not {num_classes}')
    return model


def load_results(checkpoint: Checkpoint, results: Optional[str] = None) -> dict:
    """The metrics of ``checkpoint``'s weights: ``{'epoch', 'splits': {split: metrics}, 'meta', 'source'}``,
    from the run's results.json (train.py: best and last epochs, EMA) or from ``results`` (train.py's or
    validate.py's ``--results-file`` format)."""
    if results is not None:
        path = Path(results)
        if not path.exists():
            raise FileNotFoundError(f'results file not found: {path}')
    elif checkpoint.run_dir is not None:
        path = checkpoint.run_dir / RESULTS_FILE
        if not path.exists():
            raise FileNotFoundError(
                f'no {RESULTS_FILE} in {checkpoint.run_dir}: the model card needs the run\'s metrics (train.py writes '
                f'them when the run completes; or evaluate with validate.py --results-file F and pass --results F)')
    else:
        raise FileNotFoundError(
            f'{checkpoint.weights} is not inside a training folder, so there is no {RESULTS_FILE}: evaluate it with '
            f'validate.py --results-file F and pass --results F')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not a results file: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} is not a results file')

    if 'split' in data and isinstance(data.get(data['split']), dict):  # validate.py --results-file
        splits = {data['split']: data[data['split']]}
        if isinstance(data.get('corruptions'), dict):
            splits['corruptions'] = data['corruptions']
        return dict(epoch=None, splits=splits, meta=data, source=path.name)
    if not isinstance(data.get('best'), dict):
        raise ValueError(f'{path} is neither train.py\'s {RESULTS_FILE} nor validate.py\'s --results-file')

    which = checkpoint.which
    if which == 'checkpoint' and checkpoint.epoch is not None and checkpoint.epoch == data.get('epochs'):
        which = 'last'  # the final checkpoint holds the last epoch's weights
    if which in ('best', 'last'):
        entry = data.get(which) or {}
        splits = {k: v for k, v in entry.items() if isinstance(v, dict)}
        return dict(epoch=entry.get('epoch'), splits=splits, meta=data, source=path.name)
    if which == 'ema':
        if not isinstance(data.get('ema_validation'), dict):
            raise ValueError(f'{path} has no EMA metrics (ema_validation)')
        return dict(epoch=None, splits={'validation': data['ema_validation']}, meta=data, source=path.name)
    raise ValueError(
        f'{path} has metrics for the best and last epochs of the run only, not for {checkpoint.weights}: '
        f'export the run folder (--which best|last|ema), or evaluate these weights with validate.py '
        f'--results-file F and pass --results F')


def saved_model_args(checkpoint: Checkpoint) -> dict:
    """The constructor arguments recorded in a model folder's config.json."""
    if checkpoint.which == 'file':
        return {}
    return dict(read_model_config(checkpoint.weights).get('model_args') or {})


def is_inside_training_state(path: Path) -> bool:
    """Whether ``path`` is (or is inside) a folder whose loss would lose training state: a checkpoint."""
    path = Path(path).resolve()
    return any(read_trainer_state(p) is not None or (p / STATE_FILE).exists() for p in (path, *path.parents))


def check_state_files_are_plain(state_dir: Path):
    """Refuse a training state whose pickled files hold more than tensors, numbers and numpy arrays.

    Accelerate unpickles some of its files in full (``custom_checkpoint_*.pkl``); a crafted file could run
    code. Each pickled file must load with ``torch.load(weights_only=True)`` (with Accelerate's own numpy
    allowances, as for its random states), which runs nothing; one that cannot is refused, named.
    """
    from accelerate.utils.other import load as accelerate_load
    for path in sorted(Path(state_dir).rglob('*')):
        if not path.is_file() or path.suffix == '.safetensors' or path.name.endswith('.json'):
            continue
        try:
            accelerate_load(str(path), map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001  (any failure of the restricted unpickler is a refusal)
            from .models.weights import unpickling_reason
            raise ValueError(f'refusing to resume from {path}: it is not a plain tensor file (weights-only load '
                             f'failed: {unpickling_reason(e, path)})') from None


def resolve_resume(path: Path):
    """(run folder, checkpoint to continue from) for ``--resume``: a run folder (its newest complete
    checkpoint, or None when it has none yet: the run starts in place) or one of its checkpoints."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'--resume path not found: {path}')
    if read_trainer_state(path) is not None:
        return path.parent, path
    checkpoints = complete_checkpoints(path) if path.is_dir() else []
    if checkpoints:
        return path, checkpoints[-1]
    if is_run_dir(path):  # stopped (or killed, or out of disk) before its first checkpoint
        return path, None
    raise FileNotFoundError(f'nothing to resume in {path}: neither a training folder ({ARGS_FILE}) nor a complete '
                            f'checkpoint')
