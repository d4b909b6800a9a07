"""Pieces shared by ``train.py`` and ``validate.py``: member / ensemble predictions for MIMO and plain timm
models, and model folders in timm's Hub format written atomically."""
import contextlib
import csv
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

import timm
from safetensors.torch import save_file
from timm.models import load_checkpoint
from timm.models._hub import save_config_for_hf

from .mimo import ensemble_logits

STATE_FILE = 'trainer_state.json'


def is_mimo(model: nn.Module) -> bool:
    return hasattr(model, 'forward_members') and hasattr(model, 'num_members')


def training_member_logits(
        model: nn.Module, inputs: torch.Tensor, masks: torch.Tensor, mimo: bool) -> torch.Tensor:
    """Member logits (B, M, K) for a training batch; a plain timm model is the M = 1 case.

    ``mimo`` is read from the unwrapped model: DDP / compile wrappers hide ``forward_members``.
    """
    if mimo:
        return model(inputs, masks)
    return model(inputs[:, 0]).unsqueeze(1)


def predict(model: nn.Module, x: torch.Tensor, ensemble: str = 'logits') -> Tuple[torch.Tensor, torch.Tensor]:
    """Ensemble logits (B, K) and member logits (B, M, K) from one forward pass."""
    if is_mimo(model):
        members = model.forward_members(x)
        return ensemble_logits(members, getattr(model, 'ensemble', ensemble)), members
    out = model(x)
    return out, out.unsqueeze(1)


@contextlib.contextmanager
def full_parameters(model: nn.Module):
    """The whole parameters, gathered for the duration, of a model sharded with FSDP (1 or 2).

    FSDP gathers a sharded module's parameters in its ``forward`` hooks only; evaluation calls
    ``forward_members`` (and timm's ``forward_features``), which those hooks never see. Every process
    must enter this together (it is a collective). Other models are left as they are.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support has no FSDP
        yield
        return
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
        return
    fsdp2 = getattr(torch.distributed.fsdp, 'FSDPModule', None)
    if fsdp2 is not None and isinstance(model, fsdp2):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
        return
    yield


@torch.no_grad()
def collect_predictions(model: nn.Module, loader, accelerator=None, unwrapped: Optional[nn.Module] = None):
    """(ensemble logits, member logits, labels) over a loader, gathered across processes.

    ``model``: the (possibly DDP / FSDP-wrapped) model; ``unwrapped``: the module whose methods predict.
    """
    model.eval()
    net = unwrapped if unwrapped is not None else model
    ensembles, members, labels = [], [], []
    with full_parameters(model):
        for images, targets in loader:
            ens, mem = predict(net, images)
            ens, mem = ens.float(), mem.float()
            if accelerator is not None:
                ens, mem, targets = accelerator.gather_for_metrics((ens, mem, targets))
            ensembles.append(ens.cpu())
            members.append(mem.cpu())
            labels.append(targets.cpu())
    return torch.cat(ensembles), torch.cat(members), torch.cat(labels)


def replace_dir(tmp_dir: Path, final_dir: Path):
    """Move a fully written folder into place; an existing one is swapped out, then deleted."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + '.old')
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old)


def save_model_folder(
        model: nn.Module, folder: Path, model_args: dict, extra: Optional[dict] = None,
        data_config: Optional[dict] = None, state_dict: Optional[dict] = None):
    """``model.safetensors`` + ``config.json`` (timm Hub format, loadable with ``local-dir:``), atomically.

    ``data_config`` (mean, std, input_size, ...) records the preprocessing the weights were trained with;
    ``state_dict``: the weights to write, when ``model.state_dict()`` is not them (a sharded model).
    """
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.tmp-', dir=folder.parent))
    try:
        save_weights_and_config(model, tmp, model_args, data_config, state_dict)
        if extra:
            (tmp / 'metrics.json').write_text(json.dumps(extra, indent=2))
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights_and_config(model: nn.Module, folder: Path, model_args: dict, data_config: Optional[dict] = None,
                            state_dict: Optional[dict] = None):
    """What timm's ``save_for_hf`` writes (model.safetensors + config.json), from contiguous copies of the
    weights: channels-last convolution kernels are not contiguous and safetensors refuses them.

    Under FSDP / DeepSpeed ZeRO-3 pass ``state_dict=accelerator.get_state_dict(model)`` (gathered by every
    process): the module's own ``state_dict()`` then holds shards, which safetensors would write silently.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(state, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
    save_config_for_hf(model, str(folder / 'config.json'), model_args=model_args, data_config=data_config)


def load_model_folder(folder: Path, **kwargs) -> nn.Module:
    """A model saved by :func:`save_model_folder` (or any timm Hub-format folder).

    timm reads ``config.json`` as it does for ``local-dir:`` (saved ``model_args`` and preprocessing, so
    ``model.pretrained_cfg`` describes these weights); the weights then go through :func:`load_weights`.
    ``kwargs`` override the saved model arguments.
    """
    folder = Path(folder)
    config_path = folder / 'config.json'
    if not config_path.exists():
        raise FileNotFoundError(f'no config.json in {folder}: not a model folder')
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not a valid config file: {e}') from e
    architecture = config.get('architecture') if isinstance(config, dict) else None
    if not architecture or not timm.is_model(architecture):
        raise ValueError(
            f'unknown architecture {architecture!r} in {config_path}: not in timm\'s registry (timm_mimo '
            f'models are registered by "import timm_mimo" before timm.create_model)')
    weights = folder / 'model.safetensors'
    if not weights.exists():
        raise FileNotFoundError(f'no model.safetensors in {folder}')
    model = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=False, **kwargs)
    load_weights(model, weights)
    return model


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than tensors and plain containers to unpickle (it could run code)."""


def _unpickling_reason(err: BaseException, path: Path) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(err))  # torch highlights its advice with terminal colours
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    skip = ('Weights only load failed', 'Check the documentation', 'Please file an issue', '(1)', '(2)')
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(skip)]
    reason = lines[0].split(' Please use')[0] if lines else ''
    if not reason and hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'):
        try:  # reads the pickle's opcodes without running them
            reason = 'unsupported globals: ' + ', '.join(
                torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001  (only a better message is lost)
            pass
    return reason or type(err).__name__


def load_weights(model: nn.Module, path: Path):
    """Load a safetensors file or a weights-only torch checkpoint, with one-line errors for bad files.

    Nothing is ever unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``): a
    checkpoint that needs other objects, which could run code, raises :class:`UnsafeCheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        # timm re-raises torch's UnpicklingError as a RuntimeError; older timm lets it through
        refused = e if isinstance(e, pickle.UnpicklingError) else e.__cause__
        if isinstance(refused, pickle.UnpicklingError):
            raise UnsafeCheckpointError(
                f'refusing to load {path}: it is not a plain tensor checkpoint (weights_only load failed: '
                f'{_unpickling_reason(refused, path)})') from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if 'size mismatch' in str(e) or 'Missing key' in str(e) or 'Unexpected key' in str(e):
            raise ValueError(f'checkpoint {path} does not match the model architecture / classes: {first}') from e
        raise ValueError(f'cannot read checkpoint {path}: {first}') from e
    except Exception as e:  # safetensors / pickle errors on truncated or foreign files
        raise ValueError(f'cannot read checkpoint {path} (truncated or not a weights file): {e}') from e


def parse_model_kwargs(items) -> dict:
    """``['k=v', ...]`` from the command line into create_model kwargs (values parsed as YAML)."""
    import yaml
    kwargs = {}
    for item in items:
        if '=' not in item:
            raise ValueError(f'--model-kwargs expects K=V, got {item!r}')
        key, value = item.split('=', 1)
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def checkpoint_name(epoch: int, step: int) -> str:
    return f'checkpoint-{epoch:04d}' + (f'-step{step:06d}' if step else '')


def complete_checkpoints(folder: Path):
    """Checkpoint folders of a training run that hold a trainer state, oldest first by progress."""
    found = []
    for path in Path(folder).glob('checkpoint-*'):
        state = path / STATE_FILE
        if path.is_dir() and state.exists():
            info = json.loads(state.read_text())
            found.append(((info['epoch'], info['step']), path))
    return [p for _, p in sorted(found)]


def write_csv_atomic(path: Path, rows):
    """Write dict rows (header = union of their keys) to a temporary file, then rename it into place."""
    path = Path(path)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
