"""``timm.create_model`` with errors that say what to do, for train.py and validate.py.

Our registered names already fail loudly inside timm for unpublished or uncached weights
(``timm_mimo.models._pretrained``); this adds one-line errors for what happens before our code runs: an
unknown architecture (a plugin not imported), an unknown tag, and ``hf-hub:`` downloads that fail.
``hf-hub:org/name`` and ``local-dir:PATH`` names are resolved by timm; :func:`read_model_source` reads their
config.json first (timm's readers), to refuse one that is not a timm model and to name what a run loaded.
"""
import difflib
import json
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
from safetensors import SafetensorError

import timm
from timm.models import PretrainedCfg, split_model_name_tag

from ._pretrained import _download_error
from .mimo_backbone import ARCHITECTURE as MIMO_BACKBONE, DEFAULT_BACKBONE
from .weights import checkpoint_error


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    # a local weights file (--pretrained-path: timm's pretrained_cfg overlay, or the backbone's): its load
    # errors (a crafted, truncated or foreign file) are named as the file's, in one line
    weights_file = next((overlay['file'] for overlay in (kwargs.get('pretrained_cfg_overlay'),
                                                         kwargs.get('backbone_pretrained_cfg_overlay'))
                         if isinstance(overlay, dict) and overlay.get('file')), None) if pretrained else None
    try:
        return _create_model(model_name, pretrained, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as e:
        if weights_file is None:
            raise
        raise checkpoint_error(e, Path(weights_file)) from e


def _create_model(model_name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):
            raise unknown_model_error(model_name, 'timm_mimo architectures are registered by "import timm_mimo", '
                                                  'which must run before timm.create_model') from e
        if message.startswith('Invalid pretrained tag'):
            arch = split_model_name_tag(model_name)[0]
            tags = [n.partition('.')[2] for n in timm.models.get_arch_pretrained_cfgs(arch)]
            raise ValueError(f'{message} Tags: {", ".join(tags) or "none"}') from e
        raise
    except Exception as e:  # noqa: BLE001  (huggingface_hub's download errors, for hf-hub: names)
        repo = model_name.partition(':')[2] if model_name.startswith(('hf-hub:', 'hf_hub:')) else model_name
        error = _download_error(model_name, repo, e)
        if error is None:
            raise
        raise error from e


@dataclass
class SourcedModel:
    """A model named by its source (``hf-hub:org/name[@revision]``, ``local-dir:PATH``), as its config.json
    describes it. ``record``: what a run records of it (args.yaml, best/config.json): the name, the Hub id and the
    commit it resolved to, or the folder."""
    record: Dict[str, Any]
    architecture: str
    pretrained_cfg: Dict[str, Any]


def read_model_source(model_name: str) -> Optional[SourcedModel]:
    """The config of a ``hf-hub:`` / ``local-dir:`` name, read as ``timm.create_model`` reads it; None for a name
    of timm's registry (an unknown one is :func:`unknown_model_error`). One-line errors for a source that is
    not a timm model: no config.json (or an offline Hub name absent from the cache), a config without a
    registered ``architecture``."""
    from timm.models._factory import parse_model_name  # timm's own parsing of the source prefix
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
    try:
        source, model_id = parse_model_name(model_name)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if source is None:
        if not timm.is_model(model_name):
            raise unknown_model_error(model_name)
        return None
    record: Dict[str, Any] = {'model': model_name}
    try:
        if source == 'hf-hub':
            from huggingface_hub import hf_hub_download
            repo, _, revision = model_id.partition('@')
            # the cached file sits in snapshots/<commit>/: the commit the name resolved to (timm reads the same)
            config_file = Path(hf_hub_download(repo, 'config.json', revision=revision or None))
            pretrained_cfg, arch, _ = load_model_config_from_hf(model_id)
            record.update(hf_hub_id=repo, revision=config_file.parent.name
                          if config_file.parent.parent.name == 'snapshots' else revision or None)
        else:
            pretrained_cfg, arch, _ = load_model_config_from_path(model_id)
            record.update(local_dir=str(Path(model_id).resolve()))
    except KeyError as e:  # timm's reader pops 'architecture'
        raise ValueError(f'{model_name} is not a timm model: its config.json names no {e}') from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise ValueError(f'{model_name} is not a timm model: its config.json is not a timm config '
                         f'({" ".join(str(e).split())[:200]})') from None
    except Exception as e:  # noqa: BLE001  local-dir: without config.json, huggingface_hub's download errors
        if source == 'local-dir' and isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f'{model_name}: {" ".join(str(e).split())} (a timm model folder holds '
                                    f'config.json and model.safetensors)') from None
        raise _source_download_error(model_name, e) from e
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(f'{model_name} is not a timm model: its config.json names the architecture {arch!r}, which '
                         f'is not in timm\'s registry (a plugin not imported?)')
    return SourcedModel(record, arch, pretrained_cfg)


def _source_download_error(model_name: str, err: BaseException) -> Exception:
    from huggingface_hub import constants, utils as hf
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return FileNotFoundError(f'{model_name}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and '
                                 f'the Hub cannot be reached (offline or HF_HUB_OFFLINE=1)')
    repo = model_name.partition(':')[2].partition('@')[0]
    return _download_error(model_name, repo, err) or err


def unknown_model_error(model_name: str, hint: str = '') -> ValueError:
    """The error for a name that is not in timm's registry, with the nearest registered names (a typo is the
    usual cause: ``wrn16_2_mixm2`` -> ``wrn16_2_mixmo2``)."""
    arch = split_model_name_tag(model_name)[0]
    near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    return ValueError(f'unknown model {model_name!r}: not in timm\'s registry' +
                      (f'; did you mean {", ".join(near)}?' if near else '') +
                      (f' ({hint})' if hint else ' (timm.list_models("*pattern*") lists the names)'))


def registered_cfg(model_name: str, model_args: Dict[str, Any],
                   sourced: Optional[SourcedModel] = None) -> Optional[PretrainedCfg]:
    """The registered pretrained_cfg whose input size and normalisation the built model will have: the
    backbone's for ``mimo_backbone`` (the wrapper keeps its backbone's preprocessing), that of the config.json
    of a hf-hub: / local-dir: name (``sourced``, :func:`read_model_source`)."""
    if sourced is not None:
        known = {f.name for f in fields(PretrainedCfg)}
        return PretrainedCfg(**{k: v for k, v in sourced.pretrained_cfg.items() if k in known})
    if split_model_name_tag(model_name)[0] == MIMO_BACKBONE:
        model_name = model_args.get('backbone') or DEFAULT_BACKBONE
    return timm.models.get_pretrained_cfg(model_name)


def resolve_img_size(cfg: Optional[PretrainedCfg], model_args: Dict[str, Any], img_size: Optional[int],
                     data_size: Optional[int] = None) -> Tuple[int, str]:
    """(training image side, why that side), for the run's log. In order: ``img_size`` (``--img-size``), the
    model argument, the registered input size of a model built for one size (timm's ``fixed_input_size``: a
    ViT), ``data_size`` (the data set's own side) for a model that takes any size, else the registered size
    of ``cfg`` (:func:`registered_cfg`; 32 if None). Training a CNN at its registered ImageNet size would
    upscale 32 px images 7x (and cost ~49x the compute) for nothing. A fixed-size model given ``img_size`` is
    built for it: it is added to ``model_args``, so that the patch grid matches the data and the saved model
    is rebuilt the same."""
    given = model_args.get('img_size')
    side = given if isinstance(given, int) else given[-1] if given else None
    if img_size is None:
        if side:
            return side, f'the model argument img_size={given}'
        if cfg is None:  # hf-hub: / local-dir: names: their config is read when the model is built
            return data_size or 32, 'the data set\'s own size' if data_size else 'the default for a model read ' \
                'from a config (give --img-size)'
        registered = cfg.input_size[-1]
        if cfg.fixed_input_size:
            return registered, f'the model is built for its registered {registered} px only (--img-size N builds ' \
                               f'it for N)'
        if data_size == registered:
            return data_size, 'the data set\'s own size and the model\'s registered one'
        if data_size:
            return data_size, f'the data set\'s own size; the model takes any input size (registered at ' \
                              f'{registered} px; --img-size N to rescale the images)'
        return registered, 'the model\'s registered size: the data set\'s images have no single size ' \
                           '(--img-size N to change it)'
    if given is not None and side != img_size:
        raise ValueError(f'--img-size {img_size} contradicts the model argument img_size={given}: give one of them')
    if cfg is not None and cfg.fixed_input_size and given is None:
        model_args['img_size'] = img_size
    return img_size, 'asked for (--img-size, or img_size in a config)'
