"""``timm.create_model`` with errors that say what to do, for train.py and validate.py.

Our registered names already fail loudly inside timm for unpublished or uncached weights
(``timm_mimo.models._pretrained``); this adds one-line errors for what happens before our code runs: an
unknown architecture (a plugin not imported), an unknown tag, and ``hf-hub:`` downloads that fail.
"""
from typing import Any, Dict, Optional

import torch.nn as nn

import timm
from timm.models import PretrainedCfg, split_model_name_tag

from .models._pretrained import _download_error
from .models.mimo_backbone import ARCHITECTURE as MIMO_BACKBONE, DEFAULT_BACKBONE


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        message = str(e)
        if message.startswith('Unknown model'):
            raise ValueError(
                f'{message}: not in timm\'s registry. timm_mimo architectures are registered by "import timm_mimo", '
                f'which must run before timm.create_model (for hf-hub: and local-dir: names too)') from e
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


def registered_cfg(model_name: str, model_args: Dict[str, Any]) -> Optional[PretrainedCfg]:
    """The registered pretrained_cfg whose input size and normalisation the built model will have: the
    backbone's for ``mimo_backbone`` (the wrapper keeps its backbone's preprocessing), None where the name
    is a hf-hub: / local-dir: source (its config is read when the model is built)."""
    if split_model_name_tag(model_name)[0] == MIMO_BACKBONE:
        model_name = model_args.get('backbone') or DEFAULT_BACKBONE
    return timm.models.get_pretrained_cfg(model_name)


def resolve_img_size(cfg: Optional[PretrainedCfg], model_args: Dict[str, Any], img_size: Optional[int]) -> int:
    """The training image side: ``img_size`` (``--img-size``) if given, else the model argument, else the
    input size of ``cfg`` (:func:`registered_cfg`; 32 if None). A model built for one input size (a ViT: timm's
    ``fixed_input_size``) is built for ``img_size``: it is added to ``model_args``, so that the patch grid
    matches the data and the saved model is rebuilt the same."""
    given = model_args.get('img_size')
    side = given if isinstance(given, int) else given[-1] if given else None
    if img_size is None:
        return side or (cfg.input_size[-1] if cfg is not None else 32)
    if given is not None and side != img_size:
        raise ValueError(f'--img-size {img_size} contradicts the model argument img_size={given}: give one of them')
    if cfg is not None and cfg.fixed_input_size and given is None:
        model_args['img_size'] = img_size
    return img_size
