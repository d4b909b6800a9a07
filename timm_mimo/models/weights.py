"""Reading weights back safely: safetensors, or ``torch.load(weights_only=True)``; nothing else is unpickled."""
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from timm.models import load_checkpoint, load_state_dict


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than tensors and plain containers to unpickle (it could run code)."""


def unpickling_reason(err: BaseException, path: Path) -> str:
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


class TensorMismatchError(ValueError):
    """A weights file whose tensors are not of the model's dtypes or shapes (loading would cast them)."""


def check_tensors_match(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], path: Path):
    """Refuse tensors of ``loaded`` whose shape differs from ``expected``'s, or whose dtype is not the model's:
    ``load_state_dict`` would cast an I32 file into F32 weights, a false model. Another float precision is a
    precision, not a retype (half-precision releases), so it is accepted; an integer or bool must match exactly."""
    for key, tensor in loaded.items():
        own = expected.get(key)
        if own is None or not isinstance(tensor, torch.Tensor):
            continue  # a missing or unexpected key is load_state_dict's error (strict), a non-tensor its own
        same_kind = tensor.dtype == own.dtype or (tensor.is_floating_point() and own.is_floating_point())
        if not same_kind or tuple(tensor.shape) != tuple(own.shape):
            why = 'a damaged, edited or foreign file' if not same_kind else 'weights of another model configuration'
            raise TensorMismatchError(
                f'{path} does not match the model: its {key} is {str(tensor.dtype)[6:]} {list(tensor.shape)}, the '
                f'model\'s {str(own.dtype)[6:]} {list(own.shape)} ({why})')


def load_weights(model: nn.Module, path: Path):
    """Load a safetensors file or a weights-only torch checkpoint, with one-line errors for bad files.

    Nothing is ever unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``): a
    checkpoint that needs other objects, which could run code, raises :class:`UnsafeCheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        if path.suffix.lower() in ('.npz', '.npy'):  # foreign formats: the model's own reader (timm's rule)
            load_checkpoint(model, str(path), strict=True, weights_only=True)
        else:
            state_dict = load_state_dict(str(path), weights_only=True)
            check_tensors_match(model.state_dict(), state_dict, path)
            model.load_state_dict(state_dict, strict=True)
    except TensorMismatchError:
        raise
    except Exception as e:  # noqa: BLE001  (torch / safetensors / pickle errors of a damaged or foreign file)
        raise checkpoint_error(e, path) from e


def checkpoint_error(err: BaseException, path: Path) -> ValueError:
    """The one-line error for a weights file that could not be loaded into a model: refused (it would need
    more than tensors to unpickle), not matching the model, or damaged."""
    # timm re-raises torch's UnpicklingError as a RuntimeError; older timm lets it through
    refused = err if isinstance(err, pickle.UnpicklingError) else err.__cause__
    if isinstance(refused, pickle.UnpicklingError):
        return UnsafeCheckpointError(
            f'refusing to load {path}: it is not a plain tensor checkpoint (weights_only load failed: '
            f'{unpickling_reason(refused, path)})')
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, RuntimeError):
        if 'size mismatch' in str(err) or 'Missing key' in str(err) or 'Unexpected key' in str(err):
            return ValueError(f'checkpoint {path} does not match the model architecture / classes: {first}')
        return ValueError(f'cannot read checkpoint {path}: {first}')
    return ValueError(f'cannot read checkpoint {path} (truncated or not a weights file): {first}')
